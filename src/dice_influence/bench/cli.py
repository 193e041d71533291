"""``dice bench train|influence|wholerun|proximal|contribution|threads|progress|distributed``: each writes its
numbers to a JSON file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..cli_support import console, esc, friendly, overwrite_option
from ..folders import claim_file


def _log(message: str) -> None:
    """A benchmark's progress line, printed as plain text (it may quote a command's output)."""
    console.print(message, markup=False, highlight=False)


def register(app: Any, experiment_app: Any, bench_app: Any) -> None:
    """Add the ``dice bench`` commands."""

    @bench_app.command("train")
    @friendly
    def bench_train(
        json_path: Path = typer.Option(Path("bench-train.json"), "--json", help="Output JSON file."),
        nodes: str = typer.Option("4,16,64,256", help="Comma-separated node counts."),
        rounds: int = typer.Option(20, help="Timed rounds per measurement."),
        loop_max: int = typer.Option(64, help="Skip the per-node loop baseline above this n."),
        data_dir: Path = typer.Option(None, help="Folder with Fashion-MNIST idx files."),
        overwrite: bool = overwrite_option(),
        keep_others: bool = typer.Option(False, "--keep-others", help="Keep the records of "
                                         "other node counts already in the JSON file."),
        config: Path = typer.Option(None, help="Time this run config (e.g. "
                                    "configs/lm-fortunes.yaml) instead of the Fashion-MNIST "
                                    "MLP; --nodes defaults to its topology.n."),
    ) -> None:
        """Seconds per round of the vectorized simulator vs its floor and a per-node loop."""
        claim_file(json_path, "train", overwrite=overwrite)
        from .train import bench_train as run

        if config is not None:
            from ..cli_support import load_run_config

            n_cfg = load_run_config(config, None, None).topology.n
            nodes = str(n_cfg) if nodes == "4,16,64,256" else nodes
        ns = [int(v) for v in nodes.split(",") if v.strip()]
        res = run(ns, rounds=rounds, loop_max=loop_max, out=json_path, data_dir=data_dir,
                  keep_others=keep_others, log=_log, config=config)
        table = Table(title=f"dice bench train ({res['setting']})" if config is not None else
                      "dice bench train (MLP 784-128-64-10, Fashion-MNIST, batch 64)")
        for col in ("n", "vectorized s/round", "floor s/round", "ratio", "loop s/round",
                    "speed-up vs loop", "peak RSS MB"):
            table.add_column(col, justify="right")
        for r in res["results"]:
            loop = r["loop_s_per_round"]
            table.add_row(str(r["n"]), f"{r['vectorized_s_per_round']:.4f}",
                          f"{r['floor_s_per_round']:.4f}", f"{r['ratio_to_floor']:.2f}",
                          "-" if loop is None else f"{loop:.4f}",
                          "-" if loop is None else f"{loop / r['vectorized_s_per_round']:.1f}x",
                          f"{r['peak_rss_mb']:.0f}")
        console.print(table)
        console.print(f"wrote [bold]{esc(json_path)}[/]")



    @bench_app.command("influence")
    @friendly
    def bench_influence_cmd(
        json_path: Path = typer.Option(Path("bench-influence.json"), "--json"),
        max_hops: int = typer.Option(8, help="Hops 1..max_hops."),
        batched: int = typer.Option(32, help="Events in the batched measurement."),
        overwrite: bool = overwrite_option(),
    ) -> None:
        """Time per event of DICE-GT and DICE-E vs hops; all-sample attribution vs training."""
        claim_file(json_path, "influence", overwrite=overwrite)
        from .influence import bench_influence

        res = bench_influence(max_hops=max_hops, batched=batched, out=json_path,
                              log=_log)
        t = Table(title="dice bench influence (s per event)")
        for c in ("hops", "GT x1", f"GT x{batched}", "E lin x1", f"E lin x{batched}",
                  f"E mid x{batched}"):
            t.add_column(c, justify="right")
        for r in res["per_hop"]:
            t.add_row(str(r["hops"]), f"{r['gt_single']:.4f}", f"{r['gt_batched']:.4f}",
                      f"{r['e_linear_single']:.4f}", f"{r['e_linear_batched']:.4f}",
                      f"{r['e_midpoint_batched']:.4f}")
        console.print(t)
        a = res["attribution"]
        console.print(
            f"all-sample attribution of {a['samples']} samples over {a['rounds']} rounds: "
            f"{a['seconds']:.2f} s warm = {a['ratio_to_training']:.2f}x the training rounds "
            f"(first call {a['cold_seconds']:.2f} s = {a['cold_ratio_to_training']:.2f}x), "
            f"{a['speedup_vs_replay']:.0f}x faster than replaying each sample")
        for d in res.get("attribution_digits", []):
            console.print(
                f"digits, momentum {d['momentum']}: {d['samples']} samples, "
                f"{d['seconds']:.3f} s warm = {d['ratio_to_training']:.2f}x training "
                f"(first call on that run {d['first_call_seconds']:.2f} s)")
        console.print(f"wrote [bold]{esc(json_path)}[/]")

    @bench_app.command("wholerun")
    @friendly
    def bench_wholerun_cmd(
        json_path: Path = typer.Option(Path("bench-wholerun.json"), "--json"),
        repeats: int = typer.Option(2, help="Interleaved repetitions (the minimum is kept)."),
        nodes: int = typer.Option(64, help="Nodes of the Fashion-MNIST run."),
        rounds: int = typer.Option(200, help="Rounds of the Fashion-MNIST run."),
        window: bool = typer.Option(True, help="Also time attribute() over a 5-round window."),
        overwrite: bool = overwrite_option(),
    ) -> None:
        """Whole-run sample attribution vs the training it covers (and its memory)."""
        claim_file(json_path, "wholerun", overwrite=overwrite)
        from .wholerun import bench_wholerun

        res = bench_wholerun(out=json_path, repeats=repeats, fmnist_nodes=nodes,
                             fmnist_rounds=rounds, window=window, log=_log)
        for r in res["results"]:
            m = r["memory"]
            console.print(f"{r['setting']}: sweep {r['sweep_seconds']:.2f} s = "
                          f"{r['ratio_to_training']:.2f}x training ({r['training_seconds']:.2f}"
                          f" s); holds {m['peak_parameter_sets']} of {m['full_memory_parameter_sets']}"
                          f" parameter sets ({m['peak_bytes'] / 2**20:.0f} MiB)", markup=False)
        for w in res["window"]:
            console.print(f"window, {w['setting']}, {w['variant']}: "
                          f"{w['ratio_to_training']:.2f}x training", markup=False)
        console.print(f"wrote [bold]{esc(json_path)}[/]")

    @bench_app.command("proximal")
    @friendly
    def bench_proximal_cmd(
        json_path: Path = typer.Option(Path("bench-proximal.json"), "--json"),
        config: Path = typer.Option(None, help="Config to time (default: anomaly-blog)."),
        rounds: int = typer.Option(30, help="Timed rounds per measurement."),
        repeats: int = typer.Option(5, help="Alternated repetitions (the minimum is kept)."),
        overwrite: bool = overwrite_option(),
    ) -> None:
        """Overhead of online proximal influence vs plain training (s/round, ratios)."""
        claim_file(json_path, "proximal", overwrite=overwrite)
        from .proximal import bench_proximal

        res = bench_proximal(config, rounds=rounds, repeats=repeats, out=json_path)
        for row in res["results"]:
            console.print(
                f"{row['mode']:>28s}: {row['s_per_round']:.4f} s/round "
                f"(× {row['ratio']:.2f} of plain training)"
            )
        console.print(f"wrote [bold]{esc(json_path)}[/]")

    @bench_app.command("contribution")
    @friendly
    def bench_contribution_cmd(
        json_path: Path = typer.Option(Path("bench-contribution.json"), "--json"),
        config: list[Path] = typer.Option(
            None, "--config", help="Config(s) to time, overrides after @ (default: "
            "contribution-digits-clean, contribution-fmnist, "
            "contribution-digits@train.rounds=200)."),
        repeats: int = typer.Option(5, help="Alternated repetitions (the minimum is kept)."),
        overwrite: bool = overwrite_option(),
    ) -> None:
        """Contribution observer vs plain training: online overhead, sweep vs training."""
        claim_file(json_path, "contribution", overwrite=overwrite)
        from .contribution import DEFAULT_CONFIGS, bench_contribution

        res = bench_contribution(config or DEFAULT_CONFIGS, repeats=repeats, out=json_path,
                                 log=_log)
        for r in res["results"]:
            for arm, a in r["arms"].items():
                console.print(f"{r['config']} [{arm}]: {a['online_overhead']:.2f}x plain "
                              f"training (CPU), sweep {a['sweep_over_training']:.2f}x the "
                              f"training it covers", markup=False)
        console.print(f"wrote [bold]{esc(json_path)}[/]")

    @bench_app.command("threads")
    @friendly
    def bench_threads_cmd(
        json_path: Path = typer.Option(Path("bench-threads.json"), "--json"),
        workloads: str = typer.Option("demo,alignment,contribution,train256",
                                      help="Comma-separated workloads."),
        quick: bool = typer.Option(False, "--quick", help="Tiny settings (a smoke test)."),
        timeout: float = typer.Option(400.0, help="Seconds before a cell is given up."),
        load: str = typer.Option("both", "--load", help="Phase to run: quiet, loaded or both "
                                 "(one phase is merged into an existing --json)."),
        overwrite: bool = overwrite_option(),
    ) -> None:
        """Automatic thread rule vs 1 and 2 threads, quiet and under load (wall-clock s)."""
        from .threads import LOADS, THREADS, bench_threads

        if load not in (*LOADS, "both"):
            raise typer.BadParameter(f"--load {load}: choose quiet, loaded or both")
        claim_file(json_path, "threads", overwrite=overwrite)
        only = [w.strip() for w in workloads.split(",") if w.strip()]
        res = bench_threads(out=json_path, quick=quick, only=only, timeout=timeout,
                            loads=LOADS if load == "both" else (load,), log=_log)
        t = Table(title="dice bench threads (wall-clock s per command)")
        t.add_column("workload")
        for load in LOADS:
            for th in THREADS:
                t.add_column(f"{load} {th}", justify="right")
        for w in dict.fromkeys(r["workload"] for r in res["results"]):
            cells = {(r["load"], r["threads"]): r["seconds"] for r in res["results"]
                     if r["workload"] == w}
            t.add_row(w, *("-" if cells.get((ld, th)) is None else f"{cells[(ld, th)]:.1f}"
                           for ld in LOADS for th in THREADS))
        console.print(t)
        console.print(f"wrote [bold]{esc(json_path)}[/]")

    @bench_app.command("progress")
    @friendly
    def bench_progress_cmd(
        json_path: Path = typer.Option(Path("progress-gaps.json"), "--json"),
        workloads: str = typer.Option("", help="Comma-separated workloads (default: all: demo, "
                                      "every experiment, snippet)."),
        timeout: float = typer.Option(1800.0, help="Seconds before a command is stopped."),
        events: bool = typer.Option(False, "--events", help="Keep every time-stamped line."),
        overwrite: bool = overwrite_option(),
    ) -> None:
        """Longest silence of the demo, every experiment and the README snippet under a
        pseudo-terminal (target <= 5 s on a quiet machine)."""
        claim_file(json_path, "progress", overwrite=overwrite)
        from .progress import bench_progress

        only = [w.strip() for w in workloads.split(",") if w.strip()] or None
        res = bench_progress(out=json_path, only=only, timeout=timeout, keep_events=events,
                             log=_log)
        t = Table(title="dice bench progress (longest silence under a terminal)")
        for c in ("workload", "settings", "seconds", "longest silence s", "after"):
            t.add_column(c)
        for r in res["results"]:
            t.add_row(r["workload"], r["settings"], f"{r['seconds']:.1f}",
                      f"{r['longest_gap_s']:.1f}", esc(r["gap_after_line"][:50]))
        console.print(t)
        console.print(f"wrote [bold]{esc(json_path)}[/]")

    @bench_app.command("distributed")
    @friendly
    def bench_distributed(
        json_path: Path = typer.Option(
            Path("bench-distributed.json"), "--json", help="Output JSON file."
        ),
        peers: str = typer.Option("4,8,16", help="Comma-separated peer counts."),
        rounds: int = typer.Option(30, help="Rounds per measurement."),
        overwrite: bool = overwrite_option(),
    ) -> None:
        """Rounds/s of N local peers vs the simulator at the same n; bytes per peer per round."""
        claim_file(json_path, "distributed", overwrite=overwrite)
        from .distributed import bench_distributed as run

        ns = [int(v) for v in peers.split(",") if v.strip()]
        res = run(ns, rounds=rounds, out=json_path, log=_log)
        table = Table(title=f"dice bench distributed ({res['setting']})")
        for col in ("peers", "p2p rounds/s", "simulator rounds/s", "slowdown", "bytes/peer/round"):
            table.add_column(col, justify="right")
        for r in res["results"]:
            table.add_row(
                str(r["n"]),
                f"{r['p2p_rounds_per_s']:.1f}",
                f"{r['simulator_rounds_per_s']:.1f}",
                f"{r['simulator_rounds_per_s'] / r['p2p_rounds_per_s']:.1f}x",
                f"{r['bytes_sent_per_peer_per_round']:.0f}",
            )
        console.print(table)
        console.print(f"wrote [bold]{esc(json_path)}[/]")
