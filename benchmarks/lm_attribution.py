"""All-sample attribution on the language model: are the most harmful sequences the scrambled ones?

Run from the repository root (docs/language-model.md), after writing both data folders:
    python -m dice_influence.data.text runs/lm-fortunes-data --scramble-node 3 \
        --pretrain-sequences 256 --pretrain-sources default
    python -m dice_influence.data.text runs/lm-fortunes-half-data --scramble-node 3 --scramble-fraction 0.5
    dice train configs/lm-pretrain.yaml --out runs/lm-pretrain
    python -m dice_influence.init_params runs/lm-pretrain runs/lm-pretrain.npy
    python benchmarks/lm_attribution.py --json benchmarks/lm-attribution.json \
        --folders runs/lm-fortunes-data
    python benchmarks/lm_attribution.py --json benchmarks/lm-attribution-half.json \
        --folders runs/lm-fortunes-half-data
    # the one-language design (configs/lm-english.yaml; its header writes the data):
    python -m dice_influence.data.text runs/lm-english-half-data --sources english \
        --scramble-node 3 --scramble-fraction 0.5 --test-sequences 8
    python benchmarks/lm_attribution.py --config configs/lm-english.yaml --window 0 \
        --json benchmarks/lm-attribution-english.json \
        --folders runs/lm-english-data,runs/lm-english-half-data

Trains configs/lm-fortunes.yaml or ``--config`` (no observers; every node starts from the pretrained
runs/lm-pretrain.npy) on each folder, scores every training sequence
of every node drawn in the last ``--window`` rounds (default 20) with one reverse sweep (``influence.adjoint.attribute``, target
= the nodes' mean test loss at the last round, factual read-out), sums each sequence's scores
over the batches it was drawn in (first-order effect of removing it from those rounds;
positive = harmful; ``--window 0``: the whole run) and reports precision@20:

* ``network``: of the 20 most harmful sequences of the whole network (16 x 128), the share that
  are scrambled (run with node 3's text fully scrambled: base rate 1/16; and half scrambled);
* ``node``: of node 3's 20 most harmful sequences, the share that are scrambled (run with half
  of node 3's sequences scrambled: base rate 0.5; with all scrambled it is 1 trivially).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from dice_influence._util import write_json
from dice_influence.config import load_config
from dice_influence.influence.adjoint import attribute
from dice_influence.simulator import train

CONFIG = "configs/lm-fortunes.yaml"
NODE = 3
K = 20


def sequence_scores(traj, att) -> np.ndarray:
    """Summed score of every (node, local sequence) over the window: (n, N)."""
    p = traj.train_problem
    n, N = p.n, int(p.node_data.sizes.max())
    out = np.zeros((n, N))
    for s, t in enumerate(att.rounds):
        pos = p.batches.indices(t).numpy()  # (n, B) positions into each node's data
        sc = att.scores[s].double().numpy()
        for k in range(n):
            np.add.at(out[k], pos[k], sc[k])
    return out


def precision_at(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, kind="stable")[:k]
    return float(truth[top].mean())


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth, scores)) if 0 < truth.sum() < len(truth) else float("nan")


def one(folder: str, seed: int, window: int, config: str = CONFIG) -> dict:
    cfg = load_config(config, [f"data.path={folder}", "observers=[]", f"seed={seed}"])
    t0 = time.perf_counter()
    traj = train(cfg)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    t1 = traj.rounds_done
    att = attribute(traj, (max(0, t1 - window) if window else 0, t1), progress=True)
    t_att = time.perf_counter() - t0
    meta = json.loads((Path(folder) / "corpus.json").read_text())
    scr = np.zeros_like(sequence_scores(traj, att), dtype=bool)
    for k, pos in meta["scrambled"].items():
        scr[int(k), pos] = True
    S = sequence_scores(traj, att)
    used = np.zeros_like(scr)
    for t in att.rounds:
        pos = traj.train_problem.batches.indices(t).numpy()
        for k in range(S.shape[0]):
            used[k, pos[k]] = True
    flat_s, flat_t, flat_u = S.reshape(-1), scr.reshape(-1), used.reshape(-1)
    node_s, node_t, node_u = S[NODE], scr[NODE], used[NODE]
    res = {
        "data": folder, "seed": seed, "scrambled_node": NODE, "window": [att.rounds[0],
                                                                          att.rounds[-1] + 1],
        "scrambled_sequences": int(scr.sum()), "sequences": int(scr.size),
        "sequences_drawn": int(used.sum()),
        "final_mean_test_loss": traj.final_metrics.get("mean_loss"),
        "network": {"precision_at_20": precision_at(flat_s[flat_u], flat_t[flat_u], K),
                    "base_rate": float(flat_t[flat_u].mean()),
                    "auroc": auroc(flat_s[flat_u], flat_t[flat_u]),
                    "top20": [{"node": int(i // S.shape[1]), "sequence": int(i % S.shape[1]),
                               "score": float(flat_s[i]), "scrambled": bool(flat_t[i])}
                              for i in np.argsort(-np.where(flat_u, flat_s, -np.inf))[:K]]},
        "node": {"precision_at_20": precision_at(node_s[node_u], node_t[node_u], K),
                 "base_rate": float(node_t[node_u].mean()),
                 "auroc": auroc(node_s[node_u], node_t[node_u])},
        "node_sums": S.sum(1).tolist(),
        "seconds": {"train": t_train, "attribution": t_att,
                    "ratio": t_att / t_train},
    }
    print(f"{folder} seed {seed}: network precision@20 {res['network']['precision_at_20']:.2f} "
          f"(base {res['network']['base_rate']:.3f}), node {NODE} precision@20 "
          f"{res['node']['precision_at_20']:.2f} (base {res['node']['base_rate']:.2f}); "
          f"train {t_train:.0f} s, attribution {t_att:.0f} s", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/lm-attribution.json")
    ap.add_argument("--folders", default="runs/lm-fortunes-data,runs/lm-fortunes-half-data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=CONFIG,
                    help="the run config (configs/lm-english.yaml: the one-language design)")
    ap.add_argument("--window", type=int, default=20,
                    help="score the sequences of the last WINDOW rounds (0: the whole run)")
    a = ap.parse_args()
    results = [one(f, a.seed, a.window, a.config) for f in a.folders.split(",") if f]
    write_json(a.json, {
        "benchmark": "lm-attribution",
        "sign": "influence = loss with the sequence - loss without it; positive = harmful",
        "config": a.config, "window": f"the last {a.window} rounds" if a.window else "the whole run",
        "target": "horizon (mean test loss at the last round)", "readout": "factual", "k": K,
        "command": f"python benchmarks/lm_attribution.py --json {a.json} --folders {a.folders} "
                   f"--window {a.window}" + (f" --config {a.config}" if a.config != CONFIG else ""),
        "load_average": list(os.getloadavg()), "results": results})


if __name__ == "__main__":
    main()
