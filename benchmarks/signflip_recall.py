"""Why does the score rule's per-round recall dip in the defended sign-flip arm (docs/anomaly.md)?

Run from the repository root: python benchmarks/signflip_recall.py (seed 0 of configs/anomaly-signflip.yaml).
"""
import numpy as np

from dice_influence.apps import anomaly as A
from dice_influence.apps.defense import guarded_train
from dice_influence.attacks import AttackPlan, with_data_attacks
from dice_influence.config import load_config
from dice_influence.experiments import anomaly as X
from dice_influence.simulator import build_problem

cfg = load_config("configs/anomaly-signflip.yaml")
ex = X.parse_experiment(cfg)
cfg = cfg.model_copy(update={"observers": [], "policy": None, "aggregator": None})
plan = AttackPlan.resolve(ex.attacks, cfg.topology.n, cfg.seed)
mal = plan.mask
p = build_problem(with_data_attacks(cfg, plan))
res = guarded_train(p, plan, X._options(ex, "attack_defended", cfg.train.eval_every), malicious=mal)
tk = res.tracker
E = tk.seen.numpy()
de = ex.detection
ser = A.over_rounds(tk.history(), tk.rounds, E, mal, rule=de.rule)
judged, bad = A.edge_sets(E, mal)
cum = np.cumsum(tk.history().astype(np.float64), axis=0)
worst = min((r for r in ser if 3 <= r["round"] <= 100), key=lambda r: r["recall"])
print("worst round", worst["round"], "recall", worst["recall"], "auroc", worst["auroc_edge"])
i = worst["round"] - 1 - tk.rounds[0]
S = cum[i]
F = A.flags(S, E, de.rule, de.z_threshold, de.margin)
missed = np.argwhere(judged & bad & ~F)
print("missed attacker edges (k <- j):", missed.tolist()[:12])
pr = {}
for (t, k, j, s) in res.prune_log:
    pr.setdefault((k, j), []).append((t, s))
for k, j in missed[:6]:
    inc = tk.history()[:, k, j]
    print(f"edge {k}<-{j}: pruned/readmitted {pr.get((k, j))}; cumulative score at that round "
          f"{S[k, j]:+.3e}; increments first 5 {np.round(inc[:5], 6).tolist()} ... around "
          f"{np.round(inc[max(0, i - 3):i + 1], 6).tolist()}")
print("recall by round:", [(r["round"], round(r["recall"], 2)) for r in ser[:40]])
print("final blocked attacker edges:", int((res.blocked & bad).sum()), "of", int(bad[judged].sum()))
