"""Hand-written batched passes for the built-in MLP (``model.name: mlp``), over all nodes at once.

The generic paths differentiate the model with ``torch.func`` (``vmap(grad(...))`` over nodes),
whose per-call bookkeeping dominates on the small models the experiments use. For the built-in
MLP (linear layers with biases, one elementwise activation) with the cross-entropy loss the same
numbers come from a few batched matrix products. Every pass here equals its generic counterpart
up to float rounding (tests compare them in float64); any other model or loss takes the generic
path. :data:`FAST` switches the fast passes off (benchmarks time both).
"""

from __future__ import annotations

import math
from typing import Any

import torch

FAST = True
"""Use the hand-written passes where they apply (see :func:`mlp_spec`)."""


def mlp_layers(module: Any) -> tuple[list[tuple[str, str]], Any] | None:
    """``([(weight slot, bias slot)], activation module)`` of the built-in MLP, else None."""
    from torch import nn

    from .models import MLP

    if type(module) is not MLP:
        return None
    layers, act = [], None
    for i, m in enumerate(module.net):
        if isinstance(m, nn.Linear):
            if m.bias is None:
                return None
            layers.append((f"net.{i}.weight", f"net.{i}.bias"))
        elif isinstance(m, nn.ReLU | nn.Tanh | nn.GELU | nn.Softplus):
            if act is not None and type(act) is not type(m):
                return None
            act = m
        elif not isinstance(m, nn.Flatten):
            return None
    if isinstance(act, nn.GELU) and act.approximate != "none":
        return None
    if isinstance(act, nn.Softplus) and act.beta != 1:
        return None
    return layers, act


def mlp_spec(fm: Any) -> tuple[list[tuple[str, str]], Any] | None:
    """:func:`mlp_layers` of ``fm``'s module when the fast passes apply (:data:`FAST`, the
    built-in MLP, the ``cross_entropy`` loss on class ids), else None."""
    if not FAST or getattr(fm, "loss_name", None) != "cross_entropy":
        return None
    return cached_layers(fm.module)


_SPECS: dict[int, tuple[Any, Any]] = {}  # module id -> (module, mlp_layers): walked once


def act_derivs(act: Any, z: torch.Tensor, h: torch.Tensor):
    """First and second derivative of the activation at ``z`` (``h = act(z)``); the second is
    None where it is zero (ReLU, as autograd has it: the derivative at 0 is 0)."""
    from torch import nn

    if isinstance(act, nn.ReLU):
        return (z > 0).to(z.dtype), None
    if isinstance(act, nn.Tanh):
        s1 = 1 - h * h
        return s1, -2 * h * s1
    if isinstance(act, nn.Softplus):
        sig = torch.sigmoid(z)
        lin = z * act.beta > act.threshold
        return (torch.where(lin, torch.ones_like(z), sig),
                torch.where(lin, torch.zeros_like(z), sig * (1 - sig)))
    phi = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # exact GELU
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    return cdf + z * phi, phi * (2 - z * z)


def softmax(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(softmax(z), z − max z, Σ exp(z − max z))`` over the last axis, written out: torch's
    fused CPU softmax is 3–5× slower on the small class axis of these models (measured: 45 vs
    15 µs at 16 × 16 × 10, 550 vs 100 µs at 50 × 64 × 10); the log-softmax is
    ``shifted − log(total)``."""
    shifted = z - z.amax(-1, keepdim=True)
    e = shifted.exp()
    total = e.sum(-1, keepdim=True)
    return e.div_(total), shifted, total


def _act_grad(act: Any, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """First derivative only (ReLU: a mask, no second derivative computed)."""
    from torch import nn

    if isinstance(act, nn.ReLU):
        return (z > 0).to(z.dtype)
    return act_derivs(act, z, h)[0]


def cached_layers(module: Any) -> tuple[list[tuple[str, str]], Any] | None:
    """:func:`mlp_layers` of ``module``, walked once per module (the sweeps ask every round)."""
    return _by_identity(_SPECS, module, mlp_layers)


def _by_identity(store: dict[int, tuple[Any, Any]], obj: Any, build: Any) -> Any:
    """``build(obj)``, kept in ``store`` under ``id(obj)`` (the object is kept beside it, so a
    recycled id is never taken for it; at most 64 entries)."""
    hit = store.get(id(obj))
    if hit is None or hit[0] is not obj:
        if len(store) > 64:
            store.clear()
        hit = store[id(obj)] = (obj, build(obj))
    return hit[1]


def _slot_views(fm: Any, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-parameter views ``(n, *shape)`` of the rows of ``flat`` (n, d), no copy: one
    ``as_strided`` per slot where ``flat``'s rows are unit-stride (4-6x cheaper than slicing
    then reshaping, which the sweeps do three times a round), else by slicing."""
    n = flat.shape[0]
    if flat.ndim != 2 or flat.stride(1) != 1 or flat.requires_grad:
        return {s.name: flat[:, s.offset : s.offset + s.numel].view(n, *s.shape)
                for s in fm.slots}
    layout = _by_identity(_STRIDES, fm.slots, lambda slots: [
        (s.name, s.offset, tuple(s.shape),
         tuple(math.prod(s.shape[i + 1:]) for i in range(len(s.shape)))) for s in slots])
    r, base = flat.stride(0), flat.storage_offset()
    return {name: flat.as_strided((n, *shape), (r, *inner), base + off)
            for name, off, shape, inner in layout}


_STRIDES: dict[int, tuple[Any, list]] = {}  # id(fm.slots) -> (slots, [(name, offset, shape, strides)])


def loss_grads(fm: Any, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-node mean loss ``(n,)`` and its gradient ``(n, d)`` on a shared (``x``: ``(N, ...)``)
    or per-node (``x``: ``(n, N, ...)``) set: :func:`dice_influence.gossip.loss_grads`, by the
    hand-written pass for the built-in MLP with cross-entropy (forward, then the backward of the
    mean loss; the input layer needs no input gradient), else by the generic one."""
    loss, g = _loss_grads(fm, theta, x, y, True)
    assert loss is not None
    return loss, g


def grads(fm: Any, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient half of :func:`loss_grads` (the loss is not computed)."""
    return _loss_grads(fm, theta, x, y, False)[1]


def _loss_grads(fm: Any, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                want_loss: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    spec = mlp_spec(fm)
    if spec is None or theta.requires_grad:
        from .gossip import loss_grads as generic

        with torch.enable_grad():
            return generic(fm, theta, x, y)
    layers, act = spec
    n = theta.shape[0]
    per_node = fm.per_node(y)
    N = y.shape[-1]
    with torch.no_grad():
        prm = _slot_views(fm, theta)
        h = x.reshape(n, N, -1) if per_node else x.reshape(N, -1)
        hs, s1s = [], []
        for i, (wn, bn) in enumerate(layers):
            W = prm[wn].transpose(1, 2)
            hs.append(h)
            if h.ndim == 2:  # a shared input: one broadcast product for all nodes
                z = torch.matmul(h, W).add_(prm[bn].unsqueeze(1))
            else:
                z = torch.baddbmm(prm[bn].unsqueeze(1), h, W)
            if i < len(layers) - 1:
                h = act(z)
                s1s.append(_act_grad(act, z, h))
        yi = (y if per_node else y.expand(n, N)).unsqueeze(-1)
        G, shifted, total = softmax(z)
        loss = None
        if want_loss:  # cross-entropy = log Σ exp(z − max) − (z_y − max)
            loss = (total.log().squeeze(-1) - shifted.gather(-1, yi).squeeze(-1)).mean(-1)
        G.scatter_add_(-1, yi, torch.full(yi.shape, -1.0, dtype=G.dtype, device=G.device))
        G.div_(N)  # d(mean loss)/dz
        out = torch.empty_like(theta)
        g = _slot_views(fm, out)
        for i in range(len(layers) - 1, -1, -1):
            wn, bn = layers[i]
            Gt = G.transpose(1, 2)
            if hs[i].ndim == 2:
                g[wn].copy_(torch.matmul(Gt, hs[i]))
            else:  # a contiguous product, then one copy: bmm into the strided slot view
                g[wn].copy_(torch.bmm(Gt, hs[i]))  # took a slow path (3.7x at n=50, d=50890)
            torch.sum(G, dim=1, out=g[bn])
            if i > 0:
                G = torch.bmm(G, prm[wn]).mul_(s1s[i - 1])
    return loss, out
