"""An independent check of DICE-GT on a run whose W^t a policy chose: replay each removal by
hand (one local step per round, then the recorded matrix or the schedule's as a dense matmul)
and compare every node's loss change with ``ground_truth`` (positive = harmful)."""

from __future__ import annotations

import numpy as np
import torch

from dice_influence.gossip import node_losses
from dice_influence.influence import ground_truth


def assert_gt_equals_naive_replay(traj, events, t_ev: int, hops: int) -> None:
    p = traj.train_problem
    gt = ground_truth(traj, events, hops=hops)

    def W_of(t):  # independent of the replay code: the recorded matrix or the schedule's
        return traj.W_used.get(t, p.schedule.W(t))

    def losses(theta):
        return node_losses(p.fm, theta, p.val_x, p.val_y)[0].double()

    theta0, _ = traj.params_at(t_ev)
    for i, e in enumerate(events):
        w = torch.ones(p.n, p.cfg.train.batch_size, dtype=p.dtype)
        w[e.node, list(e.samples) if e.samples else slice(None)] = 0.0
        f, c = theta0.clone(), theta0.clone()
        for s in range(hops):
            t = t_ev + s
            fh, _ = p.local_step(f, None, t)
            ch, _ = p.local_step(c, None, t, w if s == 0 else None)
            Wt = torch.as_tensor(W_of(t), dtype=p.dtype)
            f, c = Wt @ fh, Wt @ ch
            assert torch.allclose(gt.per_node[i, s + 1], losses(f) - losses(c), atol=1e-10,
                                  rtol=0)
        assert np.abs(gt.per_node[i].numpy()).max() > 1e-6
