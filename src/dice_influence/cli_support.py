"""What every ``dice`` command shares: consoles, the user-error wrapper and option help texts.

Feature modules (experiments, the peer runtime, benchmarks) add their commands through a
``register(app, experiment_app, bench_app)`` function and import only this module, never the
CLI module itself, so nothing imports in a circle.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

# wide enough for the result tables when output is piped to a file or a CI log
console = Console(width=None if sys.stdout.isatty() else 130)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 130)

SET_HELP = "Override a config value, e.g. --set train.lr=0.05 (repeatable)."


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "bad input": printed as one line, exit code 2."""
    from .config import ConfigError
    from .data import DataError
    from .models import ModelError
    from .topology import TopologyError

    return (ConfigError, DataError, ModelError, TopologyError, FileNotFoundError)


def fail(exc: BaseException | str, code: int = 2) -> None:
    """Print one red error line (outside text escaped, never read as markup) and exit."""
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(code)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's user-facing errors into one red message and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except user_errors() as exc:
            fail(exc)

    return wrapper


def load_run_config(config: Path | None, overrides: list[str] | None):
    """Load and validate a run config with ``--set`` overrides (raises ConfigError)."""
    from .config import load_config

    return load_config(config, overrides or [])
