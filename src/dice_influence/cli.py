"""The ``dice`` command line: thin wrappers that load a config, call the library, print.

Start-up stays fast (``dice --help`` and ``dice --version`` import neither torch nor the
experiments): the feature modules in :data:`EXTENSIONS` are imported only when one of their
commands runs or their group's help is shown.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from .cli_support import (
    DATA_DIR_HELP,
    SET_HELP,
    console,
    err_console,
    esc,
    fail,
    friendly,
    load_run_config,
    overwrite_option,
    print_nodes,
)

EXTENSIONS = (
    "dice_influence.experiments.alignment",
    "dice_influence.experiments.anomaly",
    "dice_influence.experiments.selection",
    "dice_influence.experiments.aggregation",
    "dice_influence.experiments.cascade",
    "dice_influence.experiments.contribution",
    "dice_influence.experiments.cleaning",
    "dice_influence.distributed.cli",
    "dice_influence.bench.cli",
)
"""Modules with ``register(app, experiment_app, bench_app)``; imported on first use."""

TOP_LEVEL: dict[str, str] = {
    "peer": "Run ONE peer; rank and world size from RANK / WORLD_SIZE (torchrun sets them).",
    "launch": "Start one local peer per node on loopback (one process each); collect outputs.",
}
"""Top-level commands that extensions add, with the line ``dice --help`` shows for them."""


class _LazyGroup(TyperGroup):
    """A command group whose extension commands are imported only when needed."""

    source = "root"
    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        if self.source != "root":
            self._load()
        names = list(super().list_commands(ctx))
        return names + [n for n in TOP_LEVEL if n not in names and self.source == "root"]

    def get_command(self, ctx: Any, name: str) -> Any:
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            return cmd
        if self.source == "root":
            if name not in TOP_LEVEL:
                return None
            if self._listing:  # `dice --help`: the line, without importing the module
                return TyperCommand(name=name, help=TOP_LEVEL[name])
        self._load()
        return super().get_command(ctx, name)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_commands(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and super().get_command(ctx, args[0]) is None and args[0] not in TOP_LEVEL:
            self._load()
        return super().resolve_command(ctx, args)

    def main(self, args: Any = None, *a: Any, **kw: Any) -> Any:
        if self.source == "root":
            from ._threads import hoist_threads_option

            if args is None:  # the real command line (the `dice` script calls app())
                _process_setup()
                args = sys.argv[1:]
            args = hoist_threads_option(list(args))  # `dice train X --threads 2` works too
        return super().main(args, *a, **kw)

    def _load(self) -> None:
        _register_extensions()
        built = typer.main.get_group({"root": app, "experiment": experiment_app,
                                      "bench": bench_app}[self.source])
        for name, cmd in built.commands.items():
            self.commands.setdefault(name, cmd)


def _group(source: str) -> type[_LazyGroup]:
    return type(f"_{source.capitalize()}Group", (_LazyGroup,), {"source": source})


app = typer.Typer(
    cls=_group("root"),
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="dice-influence: data influence cascades in decentralized learning (DICE).\n\n"
    "Sign convention: influence = loss with the data - loss without it; positive = harmful.",
)
bench_app = typer.Typer(cls=_group("bench"), no_args_is_help=True,
                        help="Benchmarks that write their numbers to JSON.")
experiment_app = typer.Typer(cls=_group("experiment"), no_args_is_help=True,
                             help="Experiments: config in, run dir (with report.html) out.")
app.add_typer(bench_app, name="bench")
app.add_typer(experiment_app, name="experiment")

_registered = False


def _register_extensions() -> None:
    """Feature modules add their commands through ``register(app, experiment_app, bench_app)``."""
    global _registered
    if _registered:
        return
    _registered = True
    for name in EXTENSIONS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        mod.register(app, experiment_app, bench_app)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        sys.stdout.write(f"dice-influence {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    threads: int = typer.Option(
        None, "--threads", min=1, help="torch threads for every command (also accepted after "
        "the command's name); default: one unless the run is large and cores are idle "
        "(train.threads and OMP_NUM_THREADS also set it)."),
) -> None:
    """dice-influence: data influence cascades in decentralized learning (DICE)."""
    from ._threads import request

    request(threads)


@app.command()
@friendly
def train(
    config: Path = typer.Argument(..., help="YAML run config."),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Run directory to write."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    data_dir: Path = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its latest checkpoint (same "
        "config; train.rounds may grow)."),
    overwrite: bool = overwrite_option(),
) -> None:
    """Train decentralized SGD; write a run directory (config, metrics, CSVs, checkpoints,
    report.html). Checkpoints go to OUT/progress/ as training goes, so a killed run continues
    with --resume."""
    from .config import check_device
    from .folders import claim_folder
    from .manifest import RunIdentity
    from .report import write_report
    from .rundir import check_writable, open_run, progress_writer, write_run_dir
    from .simulator import build_problem
    from .trajectory import DivergenceError

    cfg = load_run_config(config, set_, data_dir)
    check_device(cfg)
    check_writable(out)
    problem = build_problem(cfg)
    claim_folder(out, "train", RunIdentity.of(cfg, problem.dataset.files), overwrite=overwrite,
                 resume=resume)
    traj = open_run(out, problem, resume=resume, overwrite=overwrite)
    try:
        traj.run(cfg.train.rounds - traj.rounds_done, progress=not quiet,
                 on_checkpoint=progress_writer(traj, out))
    except DivergenceError as exc:
        write_run_dir(traj, out)
        fail(f"{exc}; {out} holds the run up to that checkpoint")
    write_run_dir(traj, out)
    report = write_report(out, "train")
    if not quiet:
        print_nodes(traj)
    console.print(f"run directory: [bold]{esc(out)}[/]; report: [bold]{esc(report)}[/]")



@app.command()
@friendly
def config(
    path: Path = typer.Argument(None, help="A config to validate and print with its defaults."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Print a complete config (every key with its default and what it means) as YAML; with
    PATH, validate it."""
    from .config_doc import annotated_config

    sys.stdout.write(annotated_config(load_run_config(path, set_)))


@app.command()
@friendly
def topology(
    name: str = typer.Argument(..., help="ring, exponential, directed-ring, star, grid, torus, "
                               "complete, erdos-renyi, random-regular, watts-strogatz, isolated"),
    n: int = typer.Option(16, "-n", help="Number of nodes."),
    weights: str = typer.Option("uniform", help="uniform or metropolis"),
    seed: int = typer.Option(0, help="Seed for random graphs."),
    p: float = typer.Option(None, help="Edge probability (erdos-renyi, watts-strogatz)."),
    degree: int = typer.Option(None, help="Degree (random-regular)."),
    k: int = typer.Option(None, help="Ring neighbours (watts-strogatz)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: Path = typer.Option(None, "--plot", help="Draw the graph to this PNG file."),
) -> None:
    """Print a mixing matrix's properties (W[k][j] = weight receiver k puts on sender j)."""
    from rich.table import Table

    from . import topology as T

    if n < 1:
        raise T.TopologyError(f"-n must be >= 1, got {n}")
    kw = {key: v for key, v in (("p", p), ("degree", degree), ("k", k)) if v is not None}
    W = T.mixing_matrix(name, n, weights=weights, seed=seed, **kw)
    info = T.describe(W)
    if plot is not None:
        T.plot_topology(W, plot, title=f"{name} (n={n})")
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    table = Table(title=f"{name}, n={n}, {weights} weights")
    table.add_column("property")
    table.add_column("value")
    for key in ("spectral_gap", "symmetric", "doubly_stochastic", "strongly_connected",
                "diameter"):
        table.add_row(key, str(info[key]))
    table.add_row("in-degree (min/max)", f"{min(info['in_degree'])}/{max(info['in_degree'])}")
    ow = info["out_weight"]
    table.add_row("out-weight (min/max)", f"{min(ow):.3f}/{max(ow):.3f}")
    console.print(table)
    if n <= 16:
        console.print("W (rows = receivers, columns = senders):")
        for row in info["W"]:
            console.print("  " + " ".join(f"{v:5.3f}" if v else "  .  " for v in row))
    if plot is not None:
        console.print(f"graph drawn to [bold]{esc(plot)}[/]")


@app.command()
@friendly
def report(
    run_dir: Path = typer.Argument(..., help="A run directory written by a dice command."),
    check: bool = typer.Option(False, "--check", help="Also open it in headless Chromium: "
                               "console errors, network requests, images; save a screenshot."),
) -> None:
    """Write RUN_DIR/report.html: one self-contained page (config, headline numbers, every
    plot with what it shows) that opens from a file without network."""
    from .folders import open_for_report
    from .report import SCREENSHOT_NAME, write_report

    for problem in open_for_report(run_dir):
        err_console.print(f"[bold yellow]warning:[/] {esc(problem)}")
    path = write_report(run_dir)
    console.print(f"report: [bold]{esc(path)}[/] (open it in a browser)")
    if check:
        from .report.browser import BrowserError, check_report

        try:
            res = check_report(path, path.parent / SCREENSHOT_NAME)
        except BrowserError as exc:
            fail(exc)
        for line in res.problems:
            console.print(f"[red]problem:[/] {esc(line)}")
        console.print(f"browser check: {len(res.images)} images, {len(res.problems)} problems, "
                      f"screenshot [bold]{esc(res.screenshot)}[/] ({res.seconds:.1f} s)")
        if res.problems:
            raise typer.Exit(1)


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Directory to write."),
    rounds: int = typer.Option(150, help="Training rounds."),
    overwrite: bool = overwrite_option(),
) -> None:
    """End to end on the embedded digits data: train 16 nodes on an exponential graph, draw one
    removal's influence cascade, check DICE-E against DICE-GT, then catch label-flipping
    neighbours and heal the network. Ends with one report of everything."""
    from .demo import run_demo
    from .folders import claim_folder, experiment_identity

    claim_folder(out, "demo", experiment_identity("demo", None, rounds=rounds),
                 overwrite=overwrite)
    run_demo(out, rounds, console)


def _process_setup() -> None:  # pragma: no cover - the real command line only
    from ._alloc import keep_freed_memory
    from ._threads import quiet_openmp

    quiet_openmp()  # before torch is imported: waiting OpenMP threads sleep, never spin
    keep_freed_memory()  # large per-round buffers from the heap (measured: n=1024 0.46 -> 0.30 s/round)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
