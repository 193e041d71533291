"""Point-to-point messages between neighbouring peers over torch.distributed.

Only plain tensors travel (``isend``/``irecv``; nothing is ever pickled). A parameter packet is
one flat tensor in the model dtype: a small int64 header (bit-cast into the first slots) followed
by the sender's half-step parameters ``θ_j^{t+½}`` and its update ``u_j^t``. It is preceded by an
int64 *announcement* (magic, round, sender, kind, element count, dtype code): the receiver checks
it before posting the payload receive, so a packet of the wrong length or dtype is refused with a
:class:`PeerFailure` naming its sender instead of aborting the receiving process inside gloo.
Receive buffers are filled with NaN (never uninitialised memory), so a payload shorter than
announced fails the finiteness check. A control message is an int64 tensor (header + one flag
per edge). Receives are posted only for a peer's configured in-neighbours (``src`` is always
explicit); the header (magic, round, sender, kind) is checked on arrival. A peer whose own step
turned non-finite stops with a PeerFailure naming itself ("diverged") before sending anything.

What the announcement cannot catch: gloo matches a message to the receive posted for it by
sender and tag only, and a message *longer* than that receive (an announcement longer than its
fixed 6 slots, or a payload longer than the count it announced) aborts the receiving process
inside gloo (``op.preamble.length <= op.nbytes``), before Python sees it. Honest peers never send
one (the announcement is always 6 int64 and the payload always the announced length, both
built here); a peer that does is broken or hostile, and torch.distributed has no
authentication to stop a hostile one (see :mod:`~dice_influence.distributed.rendezvous`). The
other peers then stop within ``timeout_s`` naming the aborted peer, as for any dead peer.

torch.distributed has no per-operation timeout for point-to-point work, so every wait runs
against a deadline; a neighbour that died (connection reset) or stalled (deadline passed) raises
:class:`PeerFailure` naming the peer and the round.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

MAGIC = 0x44494345  # "DICE"
HEADER = 4  # int64 slots: magic, round, sender, kind
ANNOUNCE = HEADER + 2  # ... + element count, dtype code
KIND_PACKET = 1
KIND_CONTROL = 2
KIND_ADJOINT = 3
TAG_PACKET = 1
TAG_CONTROL = 2
TAG_ANNOUNCE = 3
TAG_ADJOINT_ANNOUNCE = 4
TAG_ADJOINT = 5
DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4}
_DTYPE_NAMES = {v: str(k).replace("torch.", "") for k, v in DTYPE_CODES.items()}
FLAG_KEEP = 0
FLAG_DROP = 1


class PeerFailure(RuntimeError):
    """A neighbour died, stalled or sent something malformed. ``peer`` is that neighbour's rank,
    ``round`` the round in which it was noticed."""

    def __init__(self, peer: int, round: int, reason: str):
        self.peer, self.round, self.reason = peer, round, reason
        super().__init__(f"peer {peer} at round {round}: {reason}")


@dataclass
class Transport:
    """Neighbour-to-neighbour messaging for peer ``rank`` with a ``timeout_s`` deadline."""

    rank: int
    d: int
    dtype: torch.dtype
    device: torch.device
    timeout_s: float
    poll: bool = False  # NCCL: poll is_completed() instead of wait(timeout)
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    _slots: int = field(init=False)
    _in_flight: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        if (HEADER * 8) % itemsize:
            raise ValueError(f"unsupported dtype {self.dtype} for the packet header")
        self._slots = HEADER * 8 // itemsize

    @property
    def packet_numel(self) -> int:
        return self._slots + 2 * self.d

    @property
    def packet_bytes(self) -> int:
        return self.packet_numel * torch.empty((), dtype=self.dtype).element_size()

    # ------------------------------------------------------------------------------ packing

    def _header(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[: self._slots].view(torch.int64)

    def pack(self, t: int, half: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One packet ``[header | θ^{t+½} | u^t]`` for round ``t``. Raises a PeerFailure naming
        this peer when its own step is non-finite (it diverged: nothing is sent)."""
        if not (bool(torch.isfinite(half).all()) and bool(torch.isfinite(u).all())):
            raise PeerFailure(
                self.rank, t, "diverged: this peer's own parameters or update became non-finite "
                "in its local step (lower train.lr, or use train.dtype=float64)"
            )
        buf = torch.empty(self.packet_numel, dtype=self.dtype, device=self.device)
        self._header(buf).copy_(torch.tensor([MAGIC, t, self.rank, KIND_PACKET]))
        buf[self._slots : self._slots + self.d] = half.reshape(-1)
        buf[self._slots + self.d :] = u.reshape(-1)
        return buf

    def unpack(self, buf: torch.Tensor, src: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a received packet's header and finiteness; return ``(half, u)`` views (1, d)."""
        self._check(self._header(buf), src, t, KIND_PACKET)
        body = buf[self._slots :]
        if not bool(torch.isfinite(body).all()):
            raise PeerFailure(src, t, "sent non-finite parameters or update")
        return body[: self.d].view(1, -1), body[self.d :].view(1, -1)

    def announcement(self, t: int, packet: torch.Tensor) -> torch.Tensor:
        """What precedes ``packet`` on the wire: header, element count and dtype code."""
        return torch.tensor(
            [MAGIC, t, self.rank, KIND_PACKET, packet.numel(), DTYPE_CODES.get(packet.dtype, 0)],
            dtype=torch.int64, device=self.device,
        )

    def check_announcement(self, ann: torch.Tensor, src: int, t: int, kind: int = KIND_PACKET,
                           expect: int | None = None) -> None:
        """Refuse a packet of another length or dtype before receiving it."""
        self._check(ann[:HEADER], src, t, kind)
        expect = self.packet_numel if expect is None else expect
        numel, code = (int(v) for v in ann[HEADER:].cpu().tolist())
        want = DTYPE_CODES.get(self.dtype, 0)
        if code != want:
            raise PeerFailure(
                src, t, f"sends {_DTYPE_NAMES.get(code, f'dtype code {code}')} packets but this "
                f"peer expects {_DTYPE_NAMES.get(want, self.dtype)} (train.dtype differs between "
                "peers?)"
            )
        if numel != expect:
            raise PeerFailure(
                src, t, f"announced a packet of {numel} values, expected {expect} "
                f"(d={self.d} parameters: the model or config differs between peers?)"
            )

    def _check(self, header: torch.Tensor, src: int, t: int, kind: int) -> None:
        magic, rnd, sender, knd = (int(v) for v in header.cpu().tolist())
        if magic != MAGIC or knd != kind:
            raise PeerFailure(src, t, f"malformed message (magic {magic:#x}, kind {knd})")
        if sender != src:
            raise PeerFailure(src, t, f"message claims sender {sender}")
        if rnd != t:
            raise PeerFailure(src, t, f"is at round {rnd}, expected {t} (inconsistent resume?)")

    # ------------------------------------------------------------------------------ exchange

    def exchange_packets(
        self, t: int, packet: torch.Tensor, to: list[int], frm: list[int]
    ) -> tuple[dict[int, torch.Tensor], list[tuple[int, str, dist.Work]]]:
        """Post receives from ``frm`` and sends of ``packet`` to ``to``. Returns the receive
        buffers and the pending work; call :meth:`wait` on the work to complete it. Each
        receive first takes the sender's announcement and checks it (see :meth:`wait`)."""
        bufs = {
            j: torch.full((self.packet_numel,), float("nan"), dtype=self.dtype,
                          device=self.device) for j in frm
        }
        work: list[tuple[int, str, Any]] = []
        for j in frm:
            ann = torch.full((ANNOUNCE,), -1, dtype=torch.int64, device=self.device)
            first = _posted(j, t, "receive its parameters", dist.irecv, ann, src=j,
                            tag=TAG_ANNOUNCE)
            work.append((j, "receive its parameters", _Announced(self, j, t, ann, first, bufs[j])))
        announcement = self.announcement(t, packet)
        self._in_flight = announcement  # kept alive until the next round's sends
        for j in to:
            what = "send it our parameters"
            work.append((j, what, _posted(j, t, what, dist.isend, announcement, dst=j,
                                          tag=TAG_ANNOUNCE)))
            work.append((j, what, _posted(j, t, what, dist.isend, packet, dst=j,
                                          tag=TAG_PACKET)))
        nbytes = packet.numel() * packet.element_size() + ANNOUNCE * 8
        self.bytes_sent += len(to) * nbytes
        self.bytes_received += len(frm) * (self.packet_bytes + ANNOUNCE * 8)
        self.messages_sent += len(to)
        return bufs, work

    def exchange_adjoint(self, t: int, sends: dict[int, torch.Tensor], frm: list[int],
                         m: int = 1) -> dict[int, torch.Tensor]:
        """One round of the reverse sweep: send ``sends[j]`` (``(m, d)``: the cotangent this peer
        passes back to its in-neighbour ``j``, ``m`` targets) and receive one from each peer in
        ``frm`` (its out-neighbours in round ``t``). Same announcement, header and finiteness
        checks as the forward packets (kind ``adjoint``); returns the received ``(m, d)``."""
        numel = self._slots + m * self.d
        bufs = {j: torch.full((numel,), float("nan"), dtype=self.dtype, device=self.device)
                for j in frm}
        work: list[tuple[int, str, Any]] = []
        for j in frm:
            ann = torch.full((ANNOUNCE,), -1, dtype=torch.int64, device=self.device)
            first = _posted(j, t, "receive its adjoint", dist.irecv, ann, src=j,
                            tag=TAG_ADJOINT_ANNOUNCE)
            work.append((j, "receive its adjoint", _Announced(self, j, t, ann, first, bufs[j],
                                                              KIND_ADJOINT, TAG_ADJOINT)))
        keep = []
        for j, vec in sends.items():
            if not bool(torch.isfinite(vec).all()):
                raise PeerFailure(self.rank, t, "its own adjoint became non-finite in the sweep")
            buf = torch.empty(numel, dtype=self.dtype, device=self.device)
            self._header(buf).copy_(torch.tensor([MAGIC, t, self.rank, KIND_ADJOINT]))
            buf[self._slots:] = vec.reshape(-1)
            ann = torch.tensor([MAGIC, t, self.rank, KIND_ADJOINT, numel,
                                DTYPE_CODES.get(self.dtype, 0)], dtype=torch.int64,
                               device=self.device)
            keep += [buf, ann]
            what = "send it our adjoint"
            work.append((j, what, _posted(j, t, what, dist.isend, ann, dst=j,
                                          tag=TAG_ADJOINT_ANNOUNCE)))
            work.append((j, what, _posted(j, t, what, dist.isend, buf, dst=j, tag=TAG_ADJOINT)))
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.bytes_sent += len(sends) * (numel * itemsize + ANNOUNCE * 8)
        self.bytes_received += len(frm) * (numel * itemsize + ANNOUNCE * 8)
        self.messages_sent += len(sends)
        self.wait(t, work)
        out = {}
        for j, buf in bufs.items():
            self._check(self._header(buf), j, t, KIND_ADJOINT)
            body = buf[self._slots:]
            if not bool(torch.isfinite(body).all()):
                raise PeerFailure(j, t, "sent a non-finite adjoint in the reverse sweep")
            out[j] = body.view(m, self.d)
        del keep
        return out

    def exchange_control(self, t: int, flags: dict[int, int], frm: list[int]) -> dict[int, int]:
        """Send one flag to each peer in ``flags`` and receive one from each peer in ``frm``."""
        bufs = {j: torch.full((HEADER + 1,), -1, dtype=torch.int64, device=self.device)
                for j in frm}
        work: list[tuple[int, str, dist.Work]] = []
        for j in frm:
            work.append(
                (j, "receive its control flag",
                 _posted(j, t, "receive its control flag", dist.irecv, bufs[j], src=j,
                         tag=TAG_CONTROL))
            )
        sends = []
        for j, flag in flags.items():
            msg = torch.tensor(
                [MAGIC, t, self.rank, KIND_CONTROL, flag], dtype=torch.int64, device=self.device
            )
            sends.append(msg)
            what = "send it our control flag"
            work.append((j, what, _posted(j, t, what, dist.isend, msg, dst=j, tag=TAG_CONTROL)))
        self.bytes_sent += len(flags) * (HEADER + 1) * 8
        self.bytes_received += len(frm) * (HEADER + 1) * 8
        self.messages_sent += len(flags)
        self.wait(t, work)
        out = {}
        for j, buf in bufs.items():
            self._check(buf[:HEADER], j, t, KIND_CONTROL)
            flag = int(buf[HEADER])
            if flag not in (FLAG_KEEP, FLAG_DROP):
                raise PeerFailure(j, t, f"sent an unknown control flag {flag}")
            out[j] = flag
        return out

    def wait(
        self, t: int, work: list[tuple[int, str, Any]], deadline: float | None = None
    ) -> None:
        """Complete ``work`` before ``deadline`` (default: now + timeout) or raise PeerFailure."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        for peer, what, w in work:
            remaining = deadline - time.monotonic()
            try:
                if self.poll:
                    while not w.is_completed():
                        if time.monotonic() > deadline:
                            raise TimeoutError
                        time.sleep(1e-4)
                    w.wait()
                else:
                    w.wait(timeout=datetime.timedelta(seconds=max(remaining, 1e-3)))
            except PeerFailure:
                raise
            except TimeoutError:
                raise self._stalled(peer, t, what) from None
            except RuntimeError as exc:
                msg = str(exc)
                if "Timed out" in msg or "timed out" in msg:
                    raise self._stalled(peer, t, what) from None
                raise _lost(peer, t, f"while waiting to {what}", exc) from None

    def _stalled(self, peer: int, t: int, what: str) -> PeerFailure:
        return PeerFailure(
            peer,
            t,
            f"stalled: no progress within timeout_s={self.timeout_s:g} while waiting to {what}",
        )


class _Announced:
    """A packet receive in two steps: the announcement, checked, then the payload (posted only
    when the announcement matches). Behaves like a ``dist.Work`` for :meth:`Transport.wait`."""

    def __init__(self, tp: Transport, src: int, t: int, ann: torch.Tensor, first: Any,
                 buf: torch.Tensor, kind: int = KIND_PACKET, tag: int = TAG_PACKET):
        self.tp, self.src, self.t, self.ann, self.first, self.buf = tp, src, t, ann, first, buf
        self.kind, self.tag = kind, tag
        self.second: Any = None

    def _post(self) -> None:
        self.tp.check_announcement(self.ann, self.src, self.t, self.kind, self.buf.numel())
        self.second = dist.irecv(self.buf, src=self.src, tag=self.tag)

    def is_completed(self) -> bool:
        if self.second is None:
            if not self.first.is_completed():
                return False
            self.first.wait()
            self._post()
        return bool(self.second.is_completed())

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout.total_seconds()
        if self.second is None:
            self.first.wait(timeout=timeout) if timeout is not None else self.first.wait()
            self._post()
        if end is None:
            return bool(self.second.wait())
        left = datetime.timedelta(seconds=max(end - time.monotonic(), 1e-3))
        return bool(self.second.wait(timeout=left))


def _lost(peer: int, t: int, when: str, exc: BaseException) -> PeerFailure:
    first = (str(exc).splitlines() or [""])[0][:200]
    return PeerFailure(peer, t, f"connection lost {when} (the peer died or closed its "
                                f"connection): {first}")


def _posted(peer: int, t: int, what: str, op: Any, tensor: torch.Tensor, **kw: Any) -> Any:
    """``op(tensor, **kw)`` (``dist.isend`` / ``dist.irecv``); gloo refuses to post on a
    connection that is already gone: that is the peer's failure too, not a crash of this one."""
    try:
        return op(tensor, **kw)
    except RuntimeError as exc:
        raise _lost(peer, t, f"before we could {what}", exc) from None
