"""``python -m dice_influence.distributed CONFIG [--out DIR] [--set k=v ...]``: run one peer.

Rank and world size come from the torch.distributed environment (``RANK``, ``WORLD_SIZE``;
``MASTER_ADDR``/``MASTER_PORT`` for the default ``env://`` rendezvous), so this is the module to
give ``torchrun``: ``torchrun --nproc-per-node 8 -m dice_influence.distributed CONFIG``.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dice_influence.distributed",
        description="Run one DICE peer (rank from RANK/WORLD_SIZE).",
    )
    ap.add_argument("config", help="YAML run config (the same file the simulator trains)")
    ap.add_argument("--out", default="runs/p2p", help="output directory (peer-<rank>/ inside)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="override a config value, e.g. --set train.lr=0.05 (repeatable)",
    )
    args = ap.parse_args(argv)
    return run_cli(args.config, args.out, args.overrides)


def run_cli(config: str, out: str, overrides: list[str]) -> int:
    """Run one peer; print one line; returns 0 when done, else exits with 1 (peer failure,
    crash) or 2 (bad configuration).

    After a failure the process exits at once (``os._exit``): torch.distributed cannot cancel a
    pending receive, and tearing the process group down could wait on the failed neighbour."""
    from ..config import ConfigError, load_config
    from .peer import run_peer
    from .transport import PeerFailure

    rank = os.environ.get("RANK", "?")
    try:
        cfg = load_config(config, overrides)
        from .._threads import use_threads

        use_threads(None, threads=cfg.train.threads)  # a peer: one thread unless told
        st = run_peer(cfg, out)
    except ConfigError as exc:
        print(f"peer {rank}: error: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except PeerFailure as exc:
        print(f"peer {rank}: stopped: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except Exception as exc:  # any crash must not leave neighbours hanging
        print(f"peer {rank}: crashed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    print(f"peer {rank}: done, {st.t} rounds", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
