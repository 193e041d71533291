"""Print the docs/anomaly.md result tables from the committed metrics.json files.

    python benchmarks/anomaly_docs.py anomaly-blog anomaly-blog-er ...

Each table cell is "mean / worst over seeds" exactly as the experiment wrote it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DET = ("auroc_edge", "auroc_node", "precision", "recall", "f1", "min_precision", "min_recall",
       "rounds_to_90pct", "honest_edges_flagged")
ARM = ("honest_acc_mean", "honest_acc_worst", "honest_edges_pruned", "malicious_edges_pruned",
       "honest_graph_connected")


def fmt(v, key: str) -> str:
    if v is None:
        return "–"
    if key in ("auroc_edge", "auroc_node", "precision", "recall", "f1", "min_precision",
               "min_recall"):
        return f"{v:.3f}"
    if key in ("rounds_to_90pct", "malicious_edges_pruned", "honest_graph_connected"):
        return f"{float(v):.2f}"
    return f"{v:.4f}"


def tables(name: str) -> str:
    m = json.loads((Path(__file__).parent / name / "metrics.json").read_text())
    rule = m.get("detection_rule", {})
    lines = [f"`dice experiment anomaly configs/{name}.yaml --out runs/{name} --seeds "
             f"{','.join(map(str, m['seeds']))}`", ""]
    if "detection" in m:
        d, w = m["detection"], m["detection_worst"]
        lines += ["| detection (mean / worst over seeds) | " + " | ".join(DET) + " |",
                  "|---|" + "---|" * len(DET),
                  f"| `{rule.get('readout')}` read-out, {rule.get('rule')} rule | "
                  + " | ".join(f"{fmt(d.get(k), k)} / {fmt(w.get(k), k)}" for k in DET) + " |",
                  ""]
    lines += ["| arm (mean / worst over seeds) | " + " | ".join(ARM) + " |",
              "|---|" + "---|" * len(ARM)]
    for arm, d in m["defense"].items():
        w = m["defense_worst"][arm]
        lines.append(f"| {arm} | " + " | ".join(f"{fmt(d.get(k), k)} / {fmt(w.get(k), k)}"
                                               for k in ARM) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"### {name}\n\n{tables(name)}")
