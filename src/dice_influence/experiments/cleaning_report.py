"""Files and report of ``dice experiment cleaning``: the per-sample score tables, the pictured
most harmful / most helpful samples, the Markdown tables and the report section.

Sign convention: score = test loss with the sample − without it; positive = harmful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._util import atomic_savefig, atomic_write_text
from ._common import SIGN

METHODS = ("dice", "loss", "self_influence", "random", "window")


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _write_scores(out: Path, name: str, r: dict[str, Any]) -> None:
    from .._util import csv_text

    d = r["_scores"]
    cols = d.columns()
    rows = []
    for i in range(len(d)):
        row = {k: (v[i].item()) for k, v in cols.items()}
        row["score"] = float(d.score[i])
        for m, s in r["_all"].items():
            if m != "dice":
                row[m] = float(s[i])
        rows.append(row)
    atomic_write_text(out / f"scores-{name}.csv", csv_text(rows))


def _plot_samples(r: dict[str, Any], path: Path, k: int, title: str) -> None:
    """The ``k`` most harmful and ``k`` most helpful samples as images, with node and label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, p = r["_scores"], r["_problem"]
    nd, ds = p.node_data, p.dataset
    fig, axes = plt.subplots(2, k, figsize=(1.5 * k, 4.8), squeeze=False)
    for row, direction in enumerate(("harmful", "helpful")):
        for col, i in enumerate(d.order(direction)[:k]):
            ax = axes[row][col]
            img = nd.x[int(d.node[i]), int(d.position[i])].detach().double().cpu().numpy()
            img = img.reshape(ds.input_shape[-2:]) if img.size == np.prod(
                ds.input_shape[-2:]) else img.reshape(-1, ds.input_shape[-1])
            ax.imshow(img, cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            orig = int(ds.y_train[int(d.dataset_index[i])])
            lab = int(d.label[i])
            tag = f"y={lab}" + (f" (true {orig})" if orig != lab else "")
            if d.corrupted[i] and orig == lab:
                tag += " noisy"
            ax.set_title(f"node {int(d.node[i])}\n{tag}\n{d.score[i]:+.1e}", fontsize=7,
                         color="crimson" if d.corrupted[i] else "black")
        axes[row][0].set_ylabel("most harmful" if row == 0 else "most helpful", fontsize=8)
    fig.suptitle(f"{title}: whole-run DICE score (red = corrupted sample)", fontsize=9)
    fig.tight_layout(h_pad=1.5)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def table(m: dict[str, Any]) -> str:
    lines = []
    for name, s in m["scenarios"].items():
        lines += [f"Scenario {name}:", "",
                  "| method | AUROC mean | AUROC worst | precision@k mean | precision@k worst |",
                  "|---|---|---|---|---|"]
        for meth in METHODS:
            d, w = s["detection"][meth], s["detection_worst"][meth]
            lines.append(f"| {meth} | {_f(d['auroc'])} | {_f(w['auroc'])} | "
                         f"{_f(d['precision_at_k'])} | {_f(w['precision_at_k'])} |")
        lines += ["", "| removed | accuracy clean / corrupted / after (dice) | recovered "
                  "accuracy (dice: seed means / worst seed) | test loss clean / corrupted / "
                  "after (dice) | recovered loss (dice: seed means / worst seed) | recovered "
                  "loss: loss / self_influence / random / window |",
                  "|---|---|---|---|---|---|"]
        for k, r in s["retrain"].items():
            bm, w = r["by_method"], s["retrain_worst"][k]
            base = " / ".join(_f(bm[x]["loss_fraction_recovered"]) for x in METHODS[1:])
            lines.append(f"| top {k} | {_f(r['clean'])} / {_f(r['corrupted'])} / "
                         f"{_f(r['after_removal'])} | {_f(r['fraction_recovered'])} / "
                         f"{_f(w['fraction_recovered'])} | {_f(r['clean_loss'])} / "
                         f"{_f(r['corrupted_loss'])} / {_f(r['after_removal_loss'])} | "
                         f"{_f(r['loss_fraction_recovered'])} / "
                         f"{_f(w['loss_fraction_recovered'])} | {base} |")
        o = s["oracle_removal"]
        lines.append(f"| exactly the corrupted | | {_f(o['fraction_recovered'])} | "
                     f"after {_f(o['after_removal_loss'])} | "
                     f"{_f(o['loss_fraction_recovered'])} | |")
        lo = s.get("corrupted_scored_lowest")
        if lo:
            lines += ["", f"The corrupted samples dice scores lowest ({lo['samples']} over the "
                      f"seeds), replayed exactly: removing them lowers the test loss for "
                      f"{1 - lo['gt_helpful_fraction']:.0%} and raises it (they helped) for "
                      f"{lo['gt_helpful_fraction']:.0%} (dice: {lo['dice_helpful_fraction']:.0%}"
                      f" helpful; Pearson {_f(lo['pearson'])})."]
        if s["fidelity"]:
            f, w = s["fidelity"], s["fidelity_worst"]
            lines += ["", "| fidelity vs exact replay | Pearson | Spearman | sign agreement |",
                      "|---|---|---|---|",
                      f"| mean | {_f(f['pearson'])} | {_f(f['spearman'])} | "
                      f"{_f(f['sign_agreement'])} |",
                      f"| worst seed | {_f(w['pearson'])} | {_f(w['spearman'])} | "
                      f"{_f(w['sign_agreement'])} |"]
        lines.append("")
    return "\n".join(lines)


TEXT = ("Every training sample of every node scored by one reverse sweep over the whole run "
        "(its first-order effect on all nodes' mean test loss at the end, summed over its "
        "draws), against per-sample loss, TracIn self-influence, random and the one-hop window "
        "attribution: detection of corrupted samples (AUROC, precision@k), fidelity against "
        "exact replay, and the accuracy recovered by removing the top-k and retraining.")


def _sections(run: Any) -> list[Any]:
    from ..report import Section, report_sections  # noqa: F401
    from ._common import markdown_tables

    tables, lines = markdown_tables(table(run.metrics))
    figs = []
    for png in sorted(run.path.glob("samples-*.png")):
        name = png.stem.removeprefix("samples-")
        figs.append(run.figure(png.name, f"Scenario {name}, first seed: the most harmful (top "
                               "row) and most helpful (bottom row) training samples of the "
                               "whole network by their whole-run DICE score, with node, the "
                               "label trained on (the true label where it was flipped) and "
                               "the score; red titles = corrupted samples."))
    return [Section(title="Find the bad data: whole-run sample attribution", text=TEXT,
                    tables=tables, figures=[f for f in figs if f], notes=[*lines, SIGN + "."])]


def _register_report() -> None:
    from ..report import report_sections

    report_sections("cleaning")(_sections)


_register_report()
