"""``dice demo``: the whole method end to end on the embedded digits data, in under a minute.

Stages (each its own run directory with a report): ``train/`` (16 nodes, exponential graph),
``cascade/`` (one removed batch's influence spreading hop by hop, exact replay), ``alignment/``
(DICE-E against DICE-GT) and ``anomaly/`` (label-flipping neighbours caught and cut off). The
top-level ``report.html`` shows them all; the console ends with a summary.

Sign convention: influence = loss with the data − loss without it; positive = harmful.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.markup import escape

CASCADE: dict[str, Any] = {
    "seed": 0,
    "data": {"dataset": "digits", "samples_per_node": 80, "validation_samples": 300},
    "topology": {"name": "exponential", "n": 16},
    "model": {"name": "mlp", "hidden": [32]},
    "train": {"rounds": 24, "batch_size": 16, "lr": 0.1, "dtype": "float64",
              "checkpoint_every": 5, "eval_every": 24},
}
"""The small float64 run of the cascade stage; its event is node 0's batch at round 20."""
CASCADE_EVENT = (0, 20)
CASCADE_HOPS = 4

NEXT = [
    "dice report RUN_DIR  - rebuild the report of any run directory",
    "dice train configs/p2p-digits.yaml -o runs/mine  - your own run (edit the YAML; "
    "`dice config` lists every key)",
    "dice experiment alignment configs/alignment-digits.yaml -o runs/alignment",
    "dice experiment anomaly configs/anomaly-digits.yaml -o runs/anomaly --seeds 0,1,2",
    "dice experiment contribution configs/contribution-digits.yaml -o runs/contribution  - who "
    "helped, rewards, free riders (about 30 s per seed)",
    "dice experiment selection configs/selection-digits.yaml -o runs/selection  - choose "
    "collaborators by influence",
    "dice launch configs/p2p-digits.yaml  - the same training on real peers "
    "(torch.distributed)",
]


def run_demo(out: Path, rounds: int, console: Any) -> dict[str, Any]:
    """Run every stage into ``out``, write ``out/report.html`` and print the summary."""
    from ._util import write_json
    from .report import write_report

    t_start = time.perf_counter()
    stages: list[dict[str, Any]] = []

    def stage(name: str, sub: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        res = fn()
        stages.append({"name": name, "dir": sub + "/", "seconds": time.perf_counter() - t0})
        return res

    console.rule("[bold]1. decentralized SGD on digits (16 nodes, exponential graph)")
    stage("train", "train", lambda: _train(out / "train", rounds, console))
    console.rule("[bold]2. one removal's influence cascade (exact replay, DICE-GT)")
    stage("cascade", "cascade", lambda: cascade_stage(out / "cascade", console))
    console.rule("[bold]3. influence: DICE-E vs exact counterfactual replay (DICE-GT)")
    stage("alignment", "alignment", lambda: _alignment(out / "alignment", console))
    try:
        from .experiments.anomaly import demo_anomaly
    except ImportError:  # pragma: no cover - the anomaly app is optional
        demo_anomaly = None
    if demo_anomaly is not None:
        console.rule("[bold]4. malicious neighbours: detection and self-healing")
        stage("anomaly", "anomaly", lambda: demo_anomaly(out / "anomaly", console))

    total = time.perf_counter() - t_start
    console.print("writing the demo's report (every stage's plots and numbers)")
    from ._threads import decision

    write_json(out / "metrics.json", {"kind": "demo", "seconds": total, "stages": stages,
                                      "next": NEXT, "threads": decision()})
    report = write_report(out, "demo", children=False)
    total = time.perf_counter() - t_start
    console.rule("[bold]done")
    parts = ", ".join(f"{s['name']} {s['seconds']:.1f} s" for s in stages)
    console.print(f"total [bold]{total:.1f} s[/] ({parts}; single measurement)")
    console.print(f"report: [bold]{escape(str(report))}[/]  <- open it in a browser "
                  "(one self-contained page: every plot, number and config)")
    console.print("next:")
    for line in NEXT:
        console.print(f"  {escape(line)}")
    return {"seconds": total, "stages": stages, "report": report}


def _train(out: Path, rounds: int, console: Any) -> None:
    console.print(f"loading torch and the digits, building 16 nodes; then training {rounds} "
                  "rounds (MLP 64-32, batch 16, lr 0.1)")
    from .cli_support import print_nodes
    from .config import load_config
    from .report import write_report
    from .rundir import write_run_dir
    from .simulator import train

    cfg = load_config({
        "seed": 0,
        "data": {"dataset": "digits", "partition": "iid"},
        "topology": {"name": "exponential", "n": 16},
        "model": {"name": "mlp", "hidden": [64, 32]},
        "train": {"rounds": rounds, "batch_size": 16, "lr": 0.1, "eval_every": 5},
    })
    traj = train(cfg, progress=True)
    write_run_dir(traj, out)
    write_report(out, "train")
    print_nodes(traj)


def _alignment(out: Path, console: Any) -> None:
    from .config import load_config
    from .experiments.alignment import DEMO_ALIGNMENT, print_results, run_alignment

    metrics = run_alignment(load_config(DEMO_ALIGNMENT), out, progress=True, log=console.print)
    print_results(metrics, console, title="one- and two-hop alignment (positive = harmful)")


def cascade_stage(out: Path, console: Any | None = None, *, cfg: Any = None,
                  event: tuple[int, int] = CASCADE_EVENT, hops: int = CASCADE_HOPS
                  ) -> dict[str, Any]:
    """Train a small run, replay one removal exactly for ``hops`` rounds and draw its cascade
    (``cascade.png``); writes ``metrics.json`` (kind ``cascade-demo``), ``config.yaml`` and
    ``influence_gt.json`` (axes event, hop, node) into ``out``."""
    from ._util import atomic_write_text, write_json
    from .config import dump_config, load_config
    from .influence import Event, ground_truth
    from .report.cascade import event_cascade, hop_sums
    from .simulator import train

    cfg = cfg or load_config(CASCADE)
    if console is not None:
        console.print(f"training {cfg.train.rounds} rounds in float64, then replaying node "
                      f"{event[0]}'s batch removal at round {event[1]} for {hops} hops")
    traj = train(cfg, progress=False)
    node, rnd = event
    res = ground_truth(traj, [Event(node, rnd)], hops=hops)
    W = traj.problem.W(rnd)
    W = W.numpy() if hasattr(W, "numpy") else W
    out.mkdir(parents=True, exist_ok=True)
    event_cascade(res, 0, W, out / "cascade.png", max_cols=3,
                  title=f"removing node {node}'s batch at round {rnd}: influence at every node, "
                        "hop by hop (DICE-GT)")
    per = res.per_node[0]
    reach = res.reach[0]
    sums = hop_sums(per)
    rows = [{"hop": s, "round": rnd + s, "nodes_reached": int(reach[: s + 1].any(0).sum()),
             "sum": sums[s], "max_abs": float(per[s].abs().max())} for s in range(hops + 1)]
    metrics = {
        "kind": "cascade-demo",
        "sign": "influence = loss with the data - loss without it; positive = harmful",
        "event": {"node": node, "round": rnd, "unit": "batch"},
        "hops": hops,
        "hop_sums": sums,
        "per_hop": rows,
        "seconds": res.seconds,
    }
    write_json(out / "metrics.json", metrics)
    write_json(out / "influence_gt.json", res.to_dict())
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    from .report import write_report

    write_report(out, "cascade-demo")
    if console is not None:
        from rich.table import Table

        t = Table(title=f"node {node}'s batch removed at round {rnd} (positive = harmful)")
        for c in ("hop", "round", "nodes reached", "sum of influence", "max |influence|"):
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(str(r["hop"]), str(r["round"]), str(r["nodes_reached"]),
                      f"{r['sum']:+.3e}", f"{r['max_abs']:.3e}")
        console.print(t)
        console.print(f"cascade picture: [bold]{escape(str(out / 'cascade.png'))}[/]")
    return metrics
