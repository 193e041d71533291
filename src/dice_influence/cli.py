"""The ``dice`` command line: thin wrappers that load a config, call the library, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from .cli_support import SET_HELP, console, fail, friendly, load_run_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="dice-influence: data influence cascades in decentralized learning (DICE).\n\n"
    "Sign convention: influence = loss with the data - loss without it; positive = harmful.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that write their numbers to JSON.")
experiment_app = typer.Typer(no_args_is_help=True, help="Experiments: config in, run dir out.")
app.add_typer(bench_app, name="bench")
app.add_typer(experiment_app, name="experiment")


@app.command()
@friendly
def train(
    config: Path = typer.Argument(..., help="YAML run config."),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Run directory to write."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its latest checkpoint (same "
        "config; train.rounds may grow)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace another run's files in --out."),
) -> None:
    """Train decentralized SGD and write a run directory (config, metrics, CSVs, checkpoints).
    Checkpoints go to OUT/progress/ as training goes, so a killed run continues with --resume."""
    from rich.markup import escape

    from .config import check_device
    from .rundir import check_writable, open_run, progress_writer, write_run_dir
    from .simulator import build_problem
    from .trajectory import DivergenceError

    cfg = load_run_config(config, set_)
    check_device(cfg)
    check_writable(out)
    traj = open_run(out, build_problem(cfg), resume=resume, overwrite=overwrite)
    try:
        traj.run(cfg.train.rounds - traj.rounds_done, progress=not quiet,
                 on_checkpoint=progress_writer(traj, out))
    except DivergenceError as exc:
        write_run_dir(traj, out)
        fail(f"{exc}; {out} holds the run up to that checkpoint")
    write_run_dir(traj, out)
    if not quiet:
        _print_nodes(traj)
    console.print(f"run directory: [bold]{escape(str(out))}[/]")


def _print_nodes(traj: Any, title: str | None = None) -> None:
    final = traj.final_metrics
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


@app.command()
@friendly
def config(
    path: Path = typer.Argument(None, help="A config to validate and print with its defaults."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Print a complete config (every key, with defaults) as YAML; with PATH, validate it."""
    from .config import dump_config

    sys.stdout.write(dump_config(load_run_config(path, set_)))


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
        console.print(f"graph drawn to [bold]{plot}[/]")


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Directory to write."),
    rounds: int = typer.Option(150, help="Training rounds."),
) -> None:
    """End to end on the embedded digits data: train 16 nodes on an exponential graph, check
    DICE-E against DICE-GT, then catch label-flipping neighbours and heal the network."""
    from .config import load_config
    from .rundir import write_run_dir
    from .simulator import train as run_train

    cfg = load_config({
        "seed": 0,
        "data": {"dataset": "digits", "partition": "iid"},
        "topology": {"name": "exponential", "n": 16},
        "model": {"name": "mlp", "hidden": [64, 32]},
        "train": {"rounds": rounds, "batch_size": 16, "lr": 0.1, "eval_every": 25},
    })
    console.rule("[bold]1. decentralized SGD on digits (16 nodes, exponential graph)")
    traj = run_train(cfg, progress=True)
    write_run_dir(traj, out / "train")
    _print_nodes(traj)
    console.print(f"run directory: [bold]{out / 'train'}[/]")

    from .experiments.alignment import DEMO_ALIGNMENT, print_results, run_alignment

    console.rule("[bold]2. influence: DICE-E vs exact counterfactual replay (DICE-GT)")
    acfg = load_config(DEMO_ALIGNMENT)
    metrics = run_alignment(acfg, out / "alignment", progress=False, log=console.print)
    print_results(metrics, console, title="one- and two-hop alignment (positive = harmful)")
    console.print(f"scatter plot: [bold]{out / 'alignment' / 'scatter.png'}[/]")

    try:
        from .experiments.anomaly import demo_anomaly
    except ImportError:
        return
    console.rule("[bold]3. malicious neighbours: detection and self-healing")
    demo_anomaly(out / "anomaly", console)


EXTENSIONS = (
    "dice_influence.experiments.alignment",
    "dice_influence.experiments.anomaly",
    "dice_influence.distributed.cli",
    "dice_influence.bench.cli",
)


def _register_extensions() -> None:
    """Feature modules add their commands through ``register(app, experiment_app, bench_app)``."""
    import importlib

    for name in EXTENSIONS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        mod.register(app, experiment_app, bench_app)


_register_extensions()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
