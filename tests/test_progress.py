"""Every long stage of the demo's and experiments' work announces itself before it runs (what
is computed; the timing of the silences is measured by `dice bench progress`, never here)."""

from __future__ import annotations

import io

from rich.console import Console

from dice_influence.config import load_config


def _first(lines: list[str], needle: str) -> int:
    hits = [i for i, s in enumerate(lines) if needle in s]
    assert hits, f"no line announces {needle!r}; got {lines}"
    return hits[0]


def test_alignment_announces_training_replay_and_every_estimate(tmp_path):
    from dice_influence.experiments.alignment import run_alignment

    cfg = load_config("configs/alignment-digits.yaml", [
        "train.rounds=6", "train.dtype=float32", "experiment.alignment.events=2",
        "experiment.alignment.hops=1", "experiment.alignment.first_round=2"])
    lines: list[str] = []
    run_alignment(cfg, tmp_path / "a", progress=False, log=lines.append)
    order = [_first(lines, "training: 6 rounds of 16 nodes"), _first(lines, "DICE-GT: exact"),
             _first(lines, "DICE-E 1/9: readout linear"), _first(lines, "DICE-E 9/9"),
             _first(lines, "writing tables")]
    assert order == sorted(order)
    assert "s left" in lines[_first(lines, "DICE-E 2/9")]  # an estimate from the ones done


def test_cascade_announces_every_graph(tmp_path):
    from dice_influence.experiments.cascade import run_experiment

    cfg = load_config("configs/cascade-digits.yaml", [
        "experiment.warmup=2", "experiment.event_rounds=1", "experiment.hops=2",
        "train.rounds=4"])
    lines: list[str] = []
    run_experiment(cfg, tmp_path / "c", log=lines.append)
    starts = [s for s in lines if s.startswith("seed 0 graph ")]
    assert len(starts) == 6 and "DICE-GT of 16 batch removals x 2 hops" in starts[0]
    assert starts[-1].startswith("seed 0 graph ") and "(6/6)" in starts[-1]


def test_anomaly_announces_detection_and_outputs(tmp_path):
    from dice_influence.experiments.anomaly import demo_config, run_experiment

    c = demo_config()
    c["train"]["rounds"] = 6
    lines: list[str] = []
    run_experiment(load_config(c), tmp_path / "an", log=lines.append)
    assert _first(lines, "scoring detection") < _first(lines, "writing tables")


def test_demo_stages_announce_themselves(tmp_path, monkeypatch):
    import dice_influence.demo as demo

    buf = io.StringIO()
    console = Console(file=buf, width=120)
    demo._train(tmp_path / "t", 4, console)
    demo.cascade_stage(tmp_path / "c", console, hops=1)
    text = buf.getvalue()
    assert "training 4 rounds" in text and "loading torch" in text and "replaying node 0's batch removal" in text


def test_contribution_announces_timing_ablation_and_retrainings(tmp_path):
    from dice_influence.experiments.contribution import run_experiment

    cfg = load_config("configs/contribution-digits.yaml", [
        "train.rounds=4", "experiment.timing_repeats=2", "experiment.shapley.permutations=0",
        "experiment.shapley.exact=false"])
    lines: list[str] = []
    run_experiment(cfg, tmp_path / "co", log=lines.append)
    order = [_first(lines, "timing 4 rounds of 16 nodes"), _first(lines, "timing 1/2"),
             _first(lines, "timing 2/2"), _first(lines, "ablation: 3 observer variants"),
             _first(lines, "leave-one-node-out: 2 x 16 retrainings")]
    assert order == sorted(order)


def test_train_announces_the_build_before_its_bar(capsys):
    from dice_influence.simulator import train

    cfg = load_config({"data": {"dataset": "digits", "samples_per_node": 20},
                       "topology": {"name": "ring", "n": 4}, "model": {"name": "mlp",
                       "hidden": [8]}, "train": {"rounds": 2, "batch_size": 4}})
    train(cfg, progress=True)
    assert "building the problem: digits data of 4 nodes (ring graph), model mlp [8]" in \
        capsys.readouterr().err
    train(cfg, progress=False)
    assert "building" not in capsys.readouterr().err


def test_contribution_observer_sweep_announces_itself(monkeypatch):
    """The end-of-run reverse sweep (seconds on a large run) runs under a bar when asked to."""
    import contextlib

    import dice_influence._util as U
    from dice_influence.apps.contribution import ContributionObserver
    from dice_influence.loop import Loop
    from dice_influence.simulator import build_problem

    seen: list[tuple[bool, int, str]] = []

    @contextlib.contextmanager
    def spy(enabled, total, label, **kw):
        seen.append((enabled, total, label))
        yield lambda: None

    monkeypatch.setattr(U, "progress_bar", spy)
    cfg = load_config({"data": {"dataset": "digits", "samples_per_node": 20},
                       "topology": {"name": "ring", "n": 4}, "model": {"name": "mlp",
                       "hidden": [8]}, "train": {"rounds": 3, "batch_size": 4}})
    problem = build_problem(cfg)
    for progress in (True, False):
        obs = ContributionObserver(4, problem, rounds=3)
        obs.progress = progress
        theta = problem.init_theta()
        Loop(problem, [obs]).run(theta, problem.opt.init_state(theta), 0, 3)
    assert seen == [(True, 3, "contribution: reverse sweep"),
                    (False, 3, "contribution: reverse sweep")]


def test_bench_progress_rerun_of_one_workload_keeps_the_others(tmp_path, monkeypatch):
    """`dice bench progress --workloads X` replaces X's record and keeps every other one."""
    import json

    import dice_influence.bench.progress as BP

    calls: list[str] = []

    def fake_watch(argv, **kw):
        calls.append(argv[-1])
        return {"exit_code": 0, "timed_out": False, "seconds": 1.0, "lines": 1,
                "longest_gap_s": float(len(calls)), "gap_starts_at_s": 0.0,
                "gap_after_line": "(start)", "gap_ends_with_line": "", "events": []}

    monkeypatch.setattr(BP, "watch", fake_watch)
    out = tmp_path / "gaps.json"
    BP.bench_progress(out=out, only=["demo", "snippet"], log=lambda _m: None)
    BP.bench_progress(out=out, only=["snippet"], log=lambda _m: None)
    doc = json.loads(out.read_text())
    assert [r["workload"] for r in doc["results"]] == ["demo", "snippet"]
    assert [r["longest_gap_s"] for r in doc["results"]] == [1.0, 3.0]
    assert doc["records_kept_from_an_earlier_run"] == ["demo"]


def test_read_benchmark_keeps_only_its_own_readable_file(tmp_path):
    """What a partial benchmark rerun may keep: the same benchmark's readable JSON, else nothing."""
    from dice_influence._util import read_benchmark

    f = tmp_path / "b.json"
    assert read_benchmark(f, "train") is None and read_benchmark(None, "train") is None
    f.write_text('{"benchmark": "train", "results": [{"n": 4}]}')
    assert read_benchmark(f, "train") == {"benchmark": "train", "results": [{"n": 4}]}
    assert read_benchmark(f, "progress") is None
    f.write_text('{"benchmark": "tra')
    assert read_benchmark(f, "train") is None
