"""What the selection, aggregation and cascade experiments share: settings validation, seeds,
running one arm on the one loop, mean/worst over seeds, and the CLI command shape."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from ..config import ConfigError, RunConfig, data_label

SIGN = "influence = loss with the data - loss without it; positive = harmful"


def parse_settings(model: type[BaseModel], cfg: RunConfig) -> Any:
    """Validate ``cfg.experiment`` with ``model``; one :class:`ConfigError` naming each bad key."""
    try:
        return model.model_validate(cfg.experiment or {})
    except ValidationError as err:
        from .._util import did_you_mean
        from ..config import _keys_at

        lines = ["invalid experiment settings:"]
        for e in err.errors():
            loc = ".".join(str(p) for p in ("experiment", *e["loc"]))
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                keys = _keys_at(e["loc"][:-1], model)
                hint = did_you_mean(str(e["loc"][-1]), keys) if keys else ""
                msg = (f"unknown key{hint}" if hint else f"unknown key; valid keys here: "
                       f"{', '.join(keys)}" if keys else "unknown key (check the spelling)")
            got = e.get("input")
            lines.append(f"  {loc}: {msg}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
        raise ConfigError("\n".join(lines)) from None


def check_attacks(attacks: list[Any], n: int) -> None:
    """Each ``experiment.attacks`` entry's node ids and count must fit ``topology.n``."""
    for i, a in enumerate(attacks):
        if a.nodes is not None and any(not 0 <= k < n for k in a.nodes):
            raise ConfigError(f"experiment.attacks.{i}.nodes: ids {a.nodes} out of range "
                              f"0..{n - 1}")
        if a.count is not None and a.count > n:
            raise ConfigError(f"experiment.attacks.{i}.count={a.count} exceeds topology.n={n}")


def run_arm(cfg: RunConfig, *, evaluate: Callable[[Any, torch.Tensor], dict[str, Any]],
            eval_every: int, problem: Any = None, progress: bool = False,
            label: str = "training") -> dict[str, Any]:
    """Train ``cfg`` (its ``observers:``/``policy:``/``aggregator:`` plug-ins) on the one loop;
    ``evaluate(problem, theta)`` every ``eval_every`` rounds and at the end. Returns the final
    parameters, the evaluations, the plug-ins and the recorded ``W^t``."""
    from .._util import progress_bar
    from ..loop import Loop
    from ..plugins import build
    from ..simulator import build_problem

    p = problem if problem is not None else build_problem(cfg)
    plugins = build(cfg, p)
    loop = Loop.from_plugins(p, plugins)
    theta = p.init_theta()
    state = p.opt.init_state(theta)
    R = cfg.train.rounds
    evals = [{"round": 0, **evaluate(p, theta)}]
    with progress_bar(progress, R, label) as advance:
        def on_round(t: int, th: torch.Tensor, st: torch.Tensor | None) -> None:
            if t % eval_every == 0 or t == R:
                evals.append({"round": t, **evaluate(p, th)})
            advance()

        theta, _ = loop.run(theta, state, 0, R, on_round=on_round)
    return {"theta": theta, "evals": evals, "plugins": plugins, "W_used": dict(loop.recorded),
            "problem": p}


def run_seeds(cfg: RunConfig, ex: Any, run_seed: Callable[..., Any], out: str | Path,
              seeds: list[int] | None, log: Any = None, **kw: Any) -> tuple[Path, list[int],
                                                                           list[Any]]:
    """Create the run dir ``out`` and call ``run_seed(cfg with seed s, ex, log=log, **kw)`` for
    every seed (default: the config's). Returns ``(out, seeds, per-seed results)``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = seeds if seeds else [cfg.seed]
    per_seed = []
    for s in seeds:
        if log:
            log(f"seed {s}:")
        per_seed.append(run_seed(cfg.model_copy(update={"seed": int(s)}), ex, log=log, **kw))
    return out, seeds, per_seed


def mean_worst(values: list[float], worst: str = "min") -> tuple[float, float]:
    """Mean and worst (``min`` or ``max``) of per-seed values."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.min() if worst == "min" else a.max())


def parse_seeds(seeds: str | None, fail: Callable[[str], None]) -> list[int] | None:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a bad list fails with the fix."""
    if not seeds:
        return None
    try:
        return [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds {seeds!r}: give comma-separated integers, e.g. --seeds 0,1,2")
        return None


def add_command(experiment_app: Any, name: str, help_text: str,
                run: Callable[..., dict[str, Any]], table: Callable[[dict[str, Any]], str],
                parse: Callable[[RunConfig], Any]) -> None:
    """Register ``dice experiment NAME CONFIG --out DIR [--set ..] [--seeds ..] [-q]``."""
    import typer

    from ..cli_support import SET_HELP, console, esc, fail, friendly, overwrite_option
    from ..config import load_config
    from ..folders import claim_folder, experiment_identity

    def cmd(
        config: Path = typer.Argument(..., help="YAML config with an experiment: mapping."),
        out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
        set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
        seeds: str = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2."),
        quiet: bool = typer.Option(False, "--quiet", "-q"),
        overwrite: bool = overwrite_option(),
    ) -> None:
        cfg = load_config(config, set_ or [])
        parse(cfg)
        seed_list = parse_seeds(seeds, fail)
        if not quiet:
            console.print(f"experiment {name}: {cfg.topology.n} nodes on {data_label(cfg)}, "
                          f"{cfg.train.rounds} training rounds per run, seeds "
                          f"{seed_list or [cfg.seed]}; loading the data", markup=False)
        claim_folder(out, name, experiment_identity(name, cfg, seed_list), overwrite=overwrite)
        m = run(cfg, out, seeds=seed_list, progress=not quiet,
                log=None if quiet else console.print)
        console.print(table(m), markup=False)
        console.print(f"run directory: [bold]{esc(out)}[/]")

    cmd.__doc__ = help_text
    experiment_app.command(name)(friendly(cmd))


def markdown_tables(text: str) -> tuple[list[Any], list[str]]:
    """The pipe tables of a markdown text as report :class:`~dice_influence.report.Table` s,
    and its other non-empty lines (shown as notes)."""
    from ..report import Table

    tables, lines, block = [], [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2:
            tables.append(Table(block[0], [r for r in block[2:]]))
        block = []
        if line.strip():
            lines.append(line.strip())
    return tables, lines


def register_report(kind: str, title: str, text: str,
                    table: Callable[[dict[str, Any]], str],
                    figures: list[tuple[str, str]]) -> None:
    """Register the report section of run kind ``kind``: ``text``, the experiment's summary
    tables (``table(metrics)``) and the plots ``figures`` (file name, "what this shows")."""
    from ..report import Section, report_sections

    @report_sections(kind)
    def _sections(run: Any) -> list[Any]:
        tables, lines = markdown_tables(table(run.metrics))
        return [Section(title=title, text=text, tables=tables,
                        figures=[f for f in (run.figure(n, c) for n, c in figures) if f],
                        notes=[*lines, SIGN + "."])]


def finish_run(out: Path, kind: str) -> None:
    """Write the run's ``report.html`` (its ``metrics.json`` records ``kind``); the torch
    threads used (``_threads.decision``) are added to ``metrics.json`` as ``threads``."""
    import json

    from .._threads import decision
    from .._util import write_json
    from ..report import write_report

    path = out / "metrics.json"
    if path.exists():
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and "threads" not in doc:
            write_json(path, {**doc, "threads": decision()})

    write_report(out, kind)
