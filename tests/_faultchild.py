"""Body of a `dice` command run in a child process for the kill tests (test_faults.py): output
to a log file, one torch thread (so every child computes in the same order), exit code of the
command."""

from __future__ import annotations

import os
import sys


def run_cli(argv: list[str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)
    from dice_influence.cli import app

    code = 0
    try:
        app(argv, prog_name="dice")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
