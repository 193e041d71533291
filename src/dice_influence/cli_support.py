"""What every ``dice`` command shares: consoles, the user-error wrapper and option help texts.

Feature modules (experiments, the peer runtime, benchmarks) add their commands through a
``register(app, experiment_app, bench_app)`` function and import only this module, never the
CLI module itself, so nothing imports in a circle. Importing it is cheap (no torch, no
pydantic): ``dice --help`` must answer at once.
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
DATA_DIR_HELP = ("Folder with the dataset files (Fashion-MNIST/MNIST idx, CIFAR-10); "
                 "sets data.data_dir.")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "bad input": printed as one line, exit code 2."""
    from .config import ConfigError
    from .data import DataError
    from .models import ModelError
    from .report.html import ReportError
    from .topology import TopologyError

    return (ConfigError, DataError, ModelError, TopologyError, ReportError, FileNotFoundError)


def esc(x: Any) -> str:
    """``x`` as text rich prints literally (a path or value may contain ``[...]``)."""
    return escape(str(x))


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


def load_run_config(config: Path | None, overrides: list[str] | None,
                    data_dir: Path | str | None = None):
    """Load and validate a run config with ``--set`` overrides and ``--data-dir`` (raises
    ConfigError). A bad ``--set`` value is named as such, not blamed on the config file."""
    from .config import ConfigError, load_config

    overrides = list(overrides or [])
    cfg = load_config(config)  # errors in the file itself name the file
    if overrides:
        try:
            cfg = load_config(config, overrides)
        except ConfigError as exc:
            raise ConfigError(_blame_overrides(config, overrides, exc)) from None
    if data_dir is not None:
        cfg.data.data_dir = str(data_dir)
    return cfg


def _blame_overrides(config: Path | None, overrides: list[str], exc: Exception) -> str:
    """The message for overrides that broke a valid config: each bad ``--set`` by name."""
    from .config import ConfigError, load_config

    bad = []
    for pair in overrides:
        try:
            load_config(config, [pair])
        except ConfigError as one:
            lines = str(one).splitlines()
            detail = "; ".join(s.strip() for s in lines[1:]) if len(lines) > 1 else lines[0]
            bad.append(f"--set {pair}: {detail}")
    if not bad:
        sets = " ".join(f"--set {p}" for p in overrides)
        return f"{sets} (together): {exc}"
    return "\n".join(bad)


def print_nodes(traj: Any, title: str | None = None) -> None:
    """Per-node final test accuracy of a trained run, and the network averages."""
    from rich.table import Table

    final = traj.final_metrics
    if "acc" not in final:  # a loss without accuracy (mse, custom): losses only
        table = Table(title=title or f"round {traj.rounds_done}: per-node test loss")
        table.add_column("node", justify="right")
        table.add_column("test loss", justify="right")
        for k, lo in enumerate(final["loss"]):
            table.add_row(str(k), f"{lo:.4g}")
        console.print(table)
        console.print(f"mean node test loss [bold]{final['mean_loss']:.4g}[/], averaged model "
                      f"{final['avg_model_loss']:.4g}, consensus distance "
                      f"{final['consensus_distance']:.3g}")
        return
    table = Table(title=title or f"round {traj.rounds_done}: per-node test accuracy")
    table.add_column("node", justify="right")
    table.add_column("test acc", justify="right")
    table.add_column("test loss", justify="right")
    for k, (a, lo) in enumerate(zip(final["acc"], final["loss"], strict=True)):
        table.add_row(str(k), f"{a:.3f}", f"{lo:.3f}")
    console.print(table)
    console.print(
        f"mean node accuracy [bold]{final['mean_acc']:.3f}[/], averaged model "
        f"{final['avg_model_acc']:.3f}, consensus distance {final['consensus_distance']:.3g}"
    )
