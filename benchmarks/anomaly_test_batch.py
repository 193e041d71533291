"""What the anomaly application sees with fewer test samples (docs/anomaly.md, "Test
mini-batches"): configs/anomaly-blog.yaml (50 nodes, 5 label-flip attackers, each node's own
64-sample test split), seeds 0-2, proximal tracking on the whole split vs ``test_batch`` 8 / 16 /
32 read as a rotating slice (``test_batch_order: rotate``) or always the first m (``first``),
every round and every 5th round.

Per variant and seed: detection in the ``attack`` arm (the rule at the end and at every round
3-100: AUROC, precision, recall, rounds to flag 90 % of attacker edges), the ``attack_defended``
arm (attacker / honest edges pruned, honest accuracy), and the error of the cumulative
(nominal-weight) score against the whole split's on the same run (relative error, Spearman,
sign agreement on the edges). Seeds and arms as ``dice experiment anomaly`` runs them.

Run from the repository root (about 5 minutes on one core):
    python benchmarks/anomaly_test_batch.py   # writes benchmarks/anomaly-test-batch.json
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "anomaly-test-batch.json"
CONFIG = ROOT / "configs" / "anomaly-blog.yaml"
SEEDS = (0, 1, 2)
# (label, test_batch, order, every)
VARIANTS = [("full split", None, "rotate", 1)] + [
    (f"test_batch {m}, {order}", m, order, 1) for m in (32, 16, 8) for order in ("rotate", "first")
] + [("every 5th, full split", None, "rotate", 5)] + [
    (f"every 5th, test_batch {m}, {order}", m, order, 5) for m in (32, 16) for order in
    ("rotate", "first")]
DETECTION = ("auroc_edge", "precision", "recall", "f1", "honest_edges_flagged",
             "min_auroc_edge", "min_precision", "min_recall", "rounds_to_90pct",
             "max_honest_edges_flagged")
DEFENSE = ("malicious_edges_pruned", "honest_edges_pruned", "rounds_to_isolate",
           "honest_acc_mean", "honest_acc_worst")


def main() -> None:
    from dice_influence._util import write_json
    from dice_influence.bench.proximal import score_error
    from dice_influence.config import load_config
    from dice_influence.experiments import anomaly as X

    load0 = list(os.getloadavg())
    cfg = load_config(CONFIG)
    ex0 = X.parse_experiment(cfg)
    ref: dict[tuple[int, int], Any] = {}  # (every, seed) -> the whole split's cumulative score
    results = []
    t_all = time.perf_counter()
    for label, m, order, every in VARIANTS:
        tracking = ex0.tracking.model_copy(update={"test_batch": m, "test_batch_order": order,
                                                   "every": every})
        ex = ex0.model_copy(update={"tracking": tracking, "arms": ["attack", "attack_defended"]})
        seeds = []
        for s in SEEDS:
            t0 = time.perf_counter()
            r = X.run_seed(cfg.model_copy(update={"seed": s}), ex)
            S = r["_runs"]["attack"].tracker.score
            if m is None:
                ref[every, s] = S
            det, dfd = r["detection"], r["arms"]["attack_defended"]
            seeds.append({
                "seed": s,
                "detection": {k: det[k] for k in DETECTION},
                "attack_defended": {k: dfd[k] for k in DEFENSE},
                "score_error_vs_full_split": None if m is None else score_error(S, ref[every, s]),
            })
            print(f"{label}, seed {s}: auroc {det['auroc_edge']:.3f}, min precision "
                  f"{det['min_precision']:.3f}, min recall {det['min_recall']:.3f}, attacker "
                  f"edges pruned {dfd['malicious_edges_pruned']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        summary: dict[str, Any] = {}
        for part in ("detection", "attack_defended", "score_error_vs_full_split"):
            if seeds[0][part] is None:
                continue
            keys = seeds[0][part]
            summary[part] = {k: _mean_worst([x[part][k] for x in seeds], k) for k in keys}
        results.append({"variant": label, "test_batch": m, "test_batch_order": order if m else
                        None, "every": every, "mean_worst_over_seeds": summary,
                        "per_seed": seeds})
    doc = {
        "benchmark": "anomaly detection with test mini-batches",
        "command": "python benchmarks/anomaly_test_batch.py",
        "config": "configs/anomaly-blog.yaml",
        "seeds": list(SEEDS),
        "arms": {"detection": "attack (nothing pruned; rule sign, cumulative score, pre)",
                 "defense": "attack_defended (prune policy)"},
        "worst": "min over seeds, except max for rounds, flagged/pruned honest edges and the "
                 "relative error",
        "loadavg": {"before": load0, "after": list(os.getloadavg())},
        "seconds": time.perf_counter() - t_all,
        "results": results,
    }
    write_json(OUT, doc)
    print(f"wrote {OUT}")


_MAX = ("rounds_to_90pct", "honest_edges_flagged", "max_honest_edges_flagged",
        "honest_edges_pruned", "rounds_to_isolate", "relative_error")


def _mean_worst(vals: list[Any], key: str) -> dict[str, Any]:
    nums = [float(v) for v in vals if v is not None]
    if not nums:
        return {"mean": None, "worst": None}
    worst = max(nums) if key in _MAX else min(nums)
    if len(nums) < len(vals):
        worst = None  # a missing round count (never reached) is the worst
    return {"mean": sum(nums) / len(nums), "worst": worst}


if __name__ == "__main__":
    sys.exit(main())
