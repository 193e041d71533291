"""Where peers meet: the loopback guard and the rendezvous store.

torch.distributed has no authentication or encryption: anyone who can reach the rendezvous
store or a gloo port can join the group, read what is sent or inject packets. Use it on trusted
networks only. Peers therefore stay on loopback unless ``allow_network`` is set, and the
``env://`` and ``tcp://`` stores listen on the one address given (``MASTER_ADDR``, or the
``tcp://`` host), never on every interface.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

from ..config import ConfigError
from .settings import DistributedSettings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def guard_network(s: DistributedSettings, init_method: str) -> None:
    """Keep traffic on loopback unless ``allow_network`` is set. (torch.distributed has no
    authentication: anyone who reaches the rendezvous or a gloo port can join or inject; use
    it on trusted networks only.)"""
    if s.allow_network:
        return
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    if iface not in (None, "lo"):
        raise ConfigError(
            f"GLOO_SOCKET_IFNAME={iface!r} is not loopback; set "
            "experiment.distributed.allow_network=true to run across machines"
        )
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    if init_method.startswith("env://"):
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        if addr not in LOOPBACK:
            raise ConfigError(
                f"MASTER_ADDR={addr!r} is not loopback; set "
                "experiment.distributed.allow_network=true to run across machines"
            )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    elif init_method.startswith("tcp://"):
        host = init_method[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
        if host not in LOOPBACK:
            raise ConfigError(
                f"init_method {init_method!r} is not loopback; set "
                "experiment.distributed.allow_network=true to run across machines"
            )


_LISTENERS: list[socket.socket] = []  # the store server's socket lives as long as the process


def _store_address(init_method: str) -> tuple[str, str | None, str]:
    """``(address, port text, what to name in errors)`` of an ``env://`` or ``tcp://`` init."""
    if init_method.startswith("tcp://"):
        rest = init_method[len("tcp://"):].split("?", 1)[0].rstrip("/")
        host, _, port = rest.rpartition(":")
        return host.strip("[]") or "127.0.0.1", port, f"init_method {init_method!r}"
    return (os.environ.get("MASTER_ADDR") or "127.0.0.1", os.environ.get("MASTER_PORT"),
            "MASTER_ADDR/MASTER_PORT")


def rendezvous_store(init_method: str, rank: int, world: int,
                     timeout: datetime.timedelta) -> Any:
    """For ``env://`` and ``tcp://host:port``: the rendezvous TCPStore, its server (rank 0)
    listening on that one address only (torch's own ``env://`` and ``tcp://`` stores listen on
    every interface, so a loopback address would still be reachable from the network). Under
    torchrun's agent store every rank is a client, as in torch. None for ``file://`` (no
    listener)."""
    from torch.distributed import TCPStore

    if not init_method.startswith(("env://", "tcp://")):
        return None
    addr, raw_port, what = _store_address(init_method)
    try:
        port = int(raw_port or "")
        if not 0 < port < 2**16:
            raise ValueError
    except ValueError:
        fix = ("write it as tcp://127.0.0.1:29500" if init_method.startswith("tcp://") else
               "set MASTER_PORT, or start peers with torchrun or `dice launch`")
        raise ConfigError(f"{what}: port {raw_port!r} is not a port number (1..65535); "
                          f"{fix}") from None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or rank != 0:
        return TCPStore(addr, port, world, is_master=False, timeout=timeout)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            addr, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(max(world, 16))
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {addr!r} port {port} ({what}; {exc.strerror or exc}); "
            "pick a free port and an address of this machine"
        ) from None
    _LISTENERS.append(sock)
    return TCPStore(addr, port, world, is_master=True, timeout=timeout, wait_for_workers=False,
                    master_listen_fd=sock.fileno(), use_libuv=True)
