"""``dice peer``, ``dice launch`` and ``dice bench distributed`` (registered by the main CLI)."""

from __future__ import annotations

from pathlib import Path

import typer

SET_HELP = "Override a config value, e.g. --set train.lr=0.05 (repeatable)."


def register(app: typer.Typer, experiment_app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add the peer-to-peer commands to the ``dice`` app."""
    from ..cli_support import (
        DATA_DIR_HELP,
        console,
        friendly,
        load_run_config,
        overwrite_option,
    )

    @app.command()
    @friendly
    def peer(
        config: Path = typer.Argument(..., help="YAML run config (same as the simulator's)."),
        out: Path = typer.Option(Path("runs/p2p"), "--out", "-o", help="Output directory."),
        set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    ) -> None:
        """Run ONE peer; rank and world size from RANK / WORLD_SIZE (torchrun sets them)."""
        from .__main__ import run_cli

        code = run_cli(str(config), str(out), set_ or [])
        if code:
            raise typer.Exit(code)

    @app.command()
    @friendly
    def launch(
        config: Path = typer.Argument(..., help="YAML run config (same as the simulator's)."),
        peers: int = typer.Option(
            None, "--peers", "-n", help="Number of local peers; default and only valid value: "
            "topology.n of the config (one peer per node)."
        ),
        out: Path = typer.Option(Path("runs/p2p"), "--out", "-o", help="Output directory."),
        set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
        data_dir: Path = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
        resume: bool = typer.Option(
            False, "--resume", help="Continue from the last checkpoint all peers share."
        ),
        overwrite: bool = overwrite_option(),
        timeout: float = typer.Option(None, "--timeout", help="Kill everything after SECONDS."),
    ) -> None:
        """Start one local peer per node on loopback (one process each); collect outputs."""
        from rich.markup import escape
        from rich.table import Table

        from ..config import ConfigError
        from ..folders import claim_folder
        from ..report import write_report
        from .launch import LaunchInterrupted
        from .launch import launch as run_launch
        from .peer import peer_identity

        cfg = load_run_config(config, set_, data_dir)
        n = cfg.topology.n
        if peers is not None and peers != n:
            raise ConfigError(
                f"--peers {peers} but topology.n={n} in {config}: one peer per node; drop "
                f"--peers (it defaults to {n}) or pass --set topology.n={peers}"
            )
        claim_folder(out, "launch", peer_identity(cfg), overwrite=overwrite, resume=resume)
        console.print(f"launching {n} peers on loopback -> [bold]{escape(str(out))}[/]")
        try:
            res = run_launch(cfg, n, out, resume=resume, overwrite=overwrite,
                             wall_timeout=timeout)
        except LaunchInterrupted as stop:
            done = [m and m["rounds_done"] for m in stop.result.metrics]
            console.print(
                f"[bold red]interrupted[/] after {stop.result.seconds:.1f} s: all {n} peers "
                f"stopped, rendezvous removed; rounds done per peer {done}; "
                f"{escape(str(out / 'summary.json'))} written; continue with --resume")
            raise typer.Exit(130) from None
        table = Table(title=f"{n} peers, {res.seconds:.1f} s",
                      caption="rounds/s: rounds done / wall time of each peer, single "
                      "measurement")
        for col in ("peer", "status", "rounds", "test acc", "rounds/s", "bytes/round", "dropped"):
            table.add_column(col, justify="right")
        for k, m in enumerate(res.metrics):
            if m is None:
                table.add_row(str(k), "missing", "-", "-", "-", "-", "-")
                continue
            fin = m["final"] or {}
            rps = m["rounds_per_s"]
            dropped = [e["peer"] for e in m["events"] if e["event"] == "dropped"]
            table.add_row(
                str(k),
                m["status"],
                str(m["rounds_done"]),
                f"{fin.get('acc', float('nan')):.3f}",
                "-" if rps is None else f"{rps:.1f}",
                f"{m['bytes_sent_per_round']:.0f}",
                ",".join(map(str, dropped)) or "-",
            )
        console.print(table)
        for e in res.errors:  # peers' messages quote gloo, e.g. "[/pytorch/...]": not markup
            console.print(f"[bold red]{escape(str(e))}[/]")
        if res.first_failure is not None:
            console.print(f"[bold red]first to fail: peer {res.first_failure}[/] (the others "
                          "stopped because of it; each names the neighbour it noticed first)")
        report = write_report(out, "p2p")
        console.print(
            f"outputs: [bold]{escape(str(out))}[/] (report.html, summary.json, proximal.csv, "
            "final.safetensors, peer-<k>/); proximal influence sign: positive = harmful"
        )
        console.print(f"report: [bold]{escape(str(report))}[/]")
        if not res.ok:
            raise typer.Exit(1)
