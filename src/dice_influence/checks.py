"""One clear error for each usual mistake with a model of one's own (dropout under ``vmap``, a
dtype mix, a loss that does not return one value per sample, targets of the wrong shape),
checked on a real batch by :func:`check_problem` (called by ``from_torch`` and by
``build_problem`` for own models and losses)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ConfigError


class APIError(ConfigError):
    """A bad argument of :func:`from_torch`; the message names the argument and the fix."""


# ------------------------------------------------------------------------------ the checks


def check_problem(problem: Any) -> None:
    """Run the model and loss once on a real batch (as the round does, vectorized over nodes)
    and turn the usual mistakes into one clear error each: dropout under ``vmap``, a dtype
    mix, a loss that does not return one value per sample, targets of the wrong shape."""
    from .gossip import node_grads, node_losses

    fm = problem.fm
    _check_module(fm.module)
    ty = problem.node_data.y
    if fm.loss_name in ("cross_entropy", "token_cross_entropy") and ty.is_floating_point():
        raise APIError(f"targets: {fm.loss_name} needs integer class/token ids but the targets "
                       f"are {ty.dtype}; use loss='mse' for float targets, or pass int64 ids")
    if fm.loss_name == "token_cross_entropy" and ty.ndim != 3:
        raise APIError(f"targets: token_cross_entropy needs one token sequence per sample, "
                       f"(N, L) ids, but one sample's target has shape {tuple(ty.shape[2:])}")
    x, y = problem.batch(0)
    x, y = x[:1], y[:1]
    theta = problem.init_theta()[:1]
    B = x.shape[1]
    try:
        with torch.no_grad():
            out = fm.forward(theta[0], x[0])
            losses = fm.loss_fn(out, y[0])
    except Exception as exc:
        raise _translate(exc, problem, "the model or loss on one batch") from None
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (B,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise APIError(f"loss: returned {shape} for a batch of {B} samples; it must return one "
                       f"value per sample, shape ({B},) (use reduction='none' and average any "
                       "other axes, e.g. .mean(-1))")
    if not losses.is_floating_point():
        raise APIError(f"loss: returned dtype {losses.dtype}; it must return float losses")
    try:
        node_grads(fm, theta, x, y)
        node_losses(fm, theta, problem.val_x[:B], problem.val_y[:B])
    except Exception as exc:
        raise _translate(exc, problem, "one vectorized step") from None


def _check_module(module: nn.Module) -> None:
    drop = [name or type(m).__name__ for name, m in module.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
    if drop:
        raise APIError(f"model: {', '.join(drop[:3])} is nn.Dropout in train mode; a DICE round "
                       "must be a deterministic function of the parameters (exact replays, "
                       "vmap over nodes); call model.eval() before passing it (a factory: return "
                       "model.eval()), or remove the dropout")


def _translate(exc: Exception, problem: Any, what: str) -> APIError:
    msg = str(exc)
    low = msg.lower()
    if "randomness" in low:
        return APIError(f"model: {what} draws random numbers (dropout or torch.rand* in "
                        "forward); a DICE round must be deterministic: call model.eval(), "
                        "remove the randomness, or draw it from the input")
    if "dtype" in low or "scalar type" in low or "expected both" in low or (
            "found" in low and "float" in low and "double" in low):
        return APIError(f"model: {what} mixes dtypes ({msg.splitlines()[0]}); the run computes in "
                        f"{problem.dtype} (dtype=...): create tensors inside forward() with "
                        "dtype=x.dtype (or the parameters' dtype), or pass "
                        "dtype='float32'/'float64' (train.dtype in a config) to match the model")
    if "out of bounds" in low or "target" in low:
        return APIError(f"targets: {what} failed ({msg.splitlines()[0]}); the targets do not "
                        f"fit the loss {problem.fm.loss_name!r} and the model's outputs "
                        "(class ids in 0..C-1 for C outputs; float targets need loss='mse'; "
                        "token ids (B, L) need logits (B, L, V) and loss='token_cross_entropy')")
    if "shape" in low or "size" in low or "mat1" in low:
        return APIError(f"model/targets: {what} failed on shapes ({msg.splitlines()[0]}); check "
                        "that the model accepts the inputs' sample shape "
                        f"{tuple(problem.node_data.input_shape)} and that its outputs fit the "
                        f"targets {tuple(problem.node_data.target_shape)} under loss "
                        f"{problem.fm.loss_name!r}")
    return APIError(f"model/loss: {what} raised {type(exc).__name__}: {msg.splitlines()[0]}")


