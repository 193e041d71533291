"""One round of Adapt-Then-Communicate decentralized SGD as a function of stacked parameters.

SPEC §2: every node ``k`` takes a local step on its batch, ``θ_k^{t+½} = θ_k^t + u_k^t``, then
gossips, ``θ_k^{t+1} = Σ_j W^t[k, j] θ_j^{t+½}`` (``W[k, j]``: weight receiver ``k`` puts on
sender ``j``).

Parameters of all nodes are one contiguous matrix ``theta`` of shape ``(n_nodes, d)``. The local
step (:func:`node_grads` + :class:`Optimizer`) and the mixing (:class:`Mixer`) are separate
functions, so that a runtime with one process per peer reuses the local step and differs only in
how neighbours' parameters arrive. Everything here is written once and used both by the fast
in-place training loop and by the pure functional paths that influence code differentiates
(``jvp`` / ``vjp``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from .models import FunctionalModel


def _param_views(fm: FunctionalModel, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views ``(n, *shape)`` of the columns of ``theta`` (n, d) that hold each parameter."""
    n = theta.shape[0]
    return {
        s.name: theta[:, s.offset : s.offset + s.numel].reshape(n, *s.shape) for s in fm.slots
    }


def param_views(fm: FunctionalModel, theta: torch.Tensor) -> list[torch.Tensor]:
    """Per-parameter views ``(n, *shape)`` of ``theta`` (n, d), in slot order (no copy)."""
    n = theta.shape[0]
    return [theta[:, s.offset : s.offset + s.numel].view(n, *s.shape) for s in fm.slots]


def _batch_loss_fn(fm: FunctionalModel):
    def loss(p, xb, yb, wb):
        losses = fm.sample_losses(p, xb, yb)
        if wb is None:
            return losses.mean()
        return (losses * wb).sum() / losses.shape[0]

    return loss


def repeat_rows(t: torch.Tensor, times: int) -> torch.Tensor:
    """``t`` repeated ``times`` times along its first axis (any number of trailing axes)."""
    return t.repeat(times, *([1] * (t.ndim - 1)))


def node_grad_list(
    fm: FunctionalModel,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Like :func:`node_grads` but returns per-parameter gradients ``(n, *shape)`` (slot
    order), saving the copy into one flat matrix; used by the fused in-place training step."""
    in_dims = (0, 0, 0, None if w is None else 0)
    g = vmap(grad(_batch_loss_fn(fm)), in_dims=in_dims)(_param_views(fm, theta), x, y, w)
    return [g[s.name] for s in fm.slots]


def node_grads(
    fm: FunctionalModel,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch-loss gradients of every node, ``(n, d)``, vectorized over nodes (no Python loop).

    ``x``: ``(n, B, *input_shape)``; ``y``: ``(n, B, *target_shape)``; ``w``: optional per-sample weights
    ``(n, B)``; node ``k``'s loss is ``Σ_i w_ki ℓ_ki / B`` (SPEC §3 keeps the denominator).
    """
    n = theta.shape[0]
    return torch.cat([g.reshape(n, -1) for g in node_grad_list(fm, theta, x, y, w)], dim=1)


def node_losses(
    fm: FunctionalModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-node mean loss and accuracy on a shared set (``x``: ``(N, ...)``) or on per-node sets
    (``x``: ``(n, N, ...)``, flagged by targets with one more axis, :meth:`FunctionalModel.per_node`).
    Returns two ``(n,)`` tensors; the accuracy is None for a loss without one (``mse``, a custom
    loss; see :func:`dice_influence.models.make_loss`)."""
    module = fm.module
    per_node = fm.per_node(y)
    acc_fn = fm.accuracy_fn

    def f(p, xb, yb):
        out = functional_call(module, p, (xb,))
        loss = fm.loss_fn(out, yb).mean()
        if acc_fn is None:
            return loss, loss
        return loss, acc_fn(out, yb)

    in_dims = (0, 0 if per_node else None, 0 if per_node else None)
    loss, acc = vmap(f, in_dims=in_dims)(_param_views(fm, theta), x, y)
    return loss, acc if acc_fn is not None else None


def require_accuracy(acc: torch.Tensor | None, what: str) -> torch.Tensor:
    """``acc`` from :func:`node_losses`, or one clear error when the loss has no accuracy."""
    if acc is None:
        from .config import ConfigError

        raise ConfigError(f"{what} measures test accuracy, which the run's loss (mse or a "
                          "custom loss) does not define; use loss.kind=cross_entropy or "
                          "token_cross_entropy, or an experiment that reads losses only")
    return acc


def loss_grads(
    fm: FunctionalModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-node test loss ``(n,)`` and its gradient ``(n, d)`` on a shared or per-node test set."""
    per_node = fm.per_node(y)

    def loss(p, xb, yb):
        return fm.sample_losses(p, xb, yb).mean()

    from torch.func import grad_and_value

    in_dims = (0, 0 if per_node else None, 0 if per_node else None)
    g, v = vmap(grad_and_value(loss), in_dims=in_dims)(_param_views(fm, theta), x, y)
    n = theta.shape[0]
    return v, torch.cat([g[s.name].reshape(n, -1) for s in fm.slots], dim=1)


def functional_step(
    fm: FunctionalModel,
    opt: Optimizer,
    theta: torch.Tensor,
    state: torch.Tensor | None,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    *,
    w: torch.Tensor | None = None,
    t: int = 0,
    transforms: tuple = (),
    ids: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pure local step ``θ^{t+½} = θ^t + u^t`` of the rows of ``theta`` (``(m, d)``; node
    ids ``ids``, default ``0..m-1``) and the new optimizer state, with the round's transforms
    (update attacks) applied to ``u``. Differentiable (``jvp`` / ``vjp``); the in-place
    training step :func:`dice_influence.loop.local_step_` computes the same numbers."""
    g = node_grads(fm, theta, x, y, w)
    u, new_state = opt.update(theta, state, g, lr)
    for tr in transforms:
        if tr.active(t):
            u = tr.transform(t, list(range(theta.shape[0])) if ids is None else ids, u)
    return theta + u, new_state


# ----------------------------------------------------------------------------------- optimizer


@dataclass(frozen=True)
class Optimizer:
    """Functional SGD with optional (heavy-ball or Nesterov) momentum and weight decay.

    Follows ``torch.optim.SGD`` (dampening 0): ``g' = g + wd·θ``; ``b ← μ b + g'``;
    update ``u = −η (g' + μ b)`` (Nesterov) or ``u = −η b``; without momentum ``u = −η g'``.
    """

    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    @property
    def stateful(self) -> bool:
        return self.momentum != 0.0

    def init_state(self, theta: torch.Tensor) -> torch.Tensor | None:
        return torch.zeros_like(theta) if self.stateful else None

    def update(
        self, theta: torch.Tensor, state: torch.Tensor | None, g: torch.Tensor, lr: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pure: returns the update ``u`` (same shape as ``theta``) and the new state."""
        if self.weight_decay:
            g = g + self.weight_decay * theta
        if not self.stateful:
            return -lr * g, None
        assert state is not None
        buf = self.momentum * state + g
        step = g + self.momentum * buf if self.nesterov else buf
        return -lr * step, buf

    def update_(
        self, theta: list[torch.Tensor], state: list[torch.Tensor] | None,
        g: list[torch.Tensor], lr: float,
    ) -> None:
        """Fused in place over per-parameter views (``torch._foreach_*``): ``theta ← θ^{t+½}``,
        ``state ← new state``; ``g`` is clobbered. Same arithmetic as :meth:`update`."""
        if self.weight_decay:
            torch._foreach_add_(g, theta, alpha=self.weight_decay)
        if self.stateful:
            assert state is not None
            torch._foreach_mul_(state, self.momentum)
            torch._foreach_add_(state, g)
            if self.nesterov:
                torch._foreach_add_(g, state, alpha=self.momentum)
            else:
                g = state
        torch._foreach_add_(theta, g, alpha=-lr)


def lr_at(t: int, lr: float, schedule: str = "constant", *, total: int = 1, step_size: int = 30,
          gamma: float = 0.1) -> float:
    """Learning rate at round ``t``: ``constant``, ``step`` (×gamma every step_size rounds) or
    ``cosine`` (from lr to 0 over ``total`` rounds)."""
    if schedule == "constant":
        return lr
    if schedule == "step":
        return lr * gamma ** (t // step_size)
    if schedule == "cosine":
        return 0.5 * lr * (1 + math.cos(math.pi * min(t, total) / max(total, 1)))
    raise ValueError(f"unknown lr schedule {schedule!r}; choose constant, step or cosine")


# -------------------------------------------------------------------------------------- mixing


def _tracked(t: torch.Tensor) -> bool:
    """Whether autograd or torch.func tracks ``t`` (sparse CSR products cannot be differentiated
    here, so the mixer then uses the dense matmul)."""
    return (t.requires_grad and torch.is_grad_enabled()) or \
        torch._C._functorch.is_functorch_wrapped_tensor(t)


class Mixer:
    """Gossip with a fixed mixing matrix: ``out = W @ theta`` over the node axis.

    Small or dense ``W`` uses one dense matmul; sparse ``W`` (large ``n``) uses a CSR product
    over column blocks of ``theta``. Zero entries never touch their sender: a sender whose
    parameters are NaN/inf leaks nothing into receivers that put weight 0 on it.
    """

    def __init__(self, W: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        Wt = torch.as_tensor(np.asarray(W), dtype=dtype, device=device)
        self.W = Wt
        self.n = Wt.shape[0]
        nnz = int((Wt != 0).sum())
        self.has_zeros = nnz < self.n * self.n
        self.sparse = self.n > 32 and nnz <= 0.25 * self.n * self.n
        self._csr = None
        self._kernel = None
        if self.sparse:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self._csr = Wt.to_sparse_csr()
            if Wt.device.type == "cpu":
                from ._kernels import csr_kernel

                self._kernel = csr_kernel(self._csr)

    def __call__(self, theta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Mix ``theta`` of shape ``(n, d)`` or ``(..., n, d)`` (leading batch dims)."""
        if theta.ndim > 2:
            lead = theta.shape[:-2]
            flat = theta.reshape(-1, self.n, theta.shape[-1]).transpose(0, 1).reshape(self.n, -1)
            mixed = self(flat)
            return (mixed.reshape(self.n, -1, theta.shape[-1]).transpose(0, 1)
                    .reshape(*lead, self.n, theta.shape[-1]))
        if self.sparse and not _tracked(theta):  # autograd / torch.func: the dense matmul
            return self._sparse_mm(theta, out)
        if self.has_zeros and not bool(torch.isfinite(theta.sum(1)).all()):
            mixed = self._masked(theta)
            if out is None:
                return mixed
            return out.copy_(mixed)
        return torch.mm(self.W, theta, out=out) if out is not None else self.W @ theta

    def _sparse_mm(self, theta: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            out = torch.empty_like(theta)
        if self._kernel is not None and self._kernel(theta, out):
            return out
        block = 4096
        for c in range(0, theta.shape[1], block):
            out[:, c : c + block] = torch.sparse.mm(self._csr, theta[:, c : c + block])
        return out

    def _masked(self, theta: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(theta)
        for k in range(self.n):  # slow path, only when some sender is non-finite
            js = torch.nonzero(self.W[k]).flatten()
            out[k] = self.W[k, js] @ theta[js]
        return out
