"""Model zoo and the functional view of a model used by the vectorized simulator.

Every node's parameters are one row of a flat matrix ``theta`` of shape ``(n_nodes, d)``;
:class:`FunctionalModel` maps a flat row back to named parameter views and evaluates the
model with :func:`torch.func.functional_call`, so that per-node computations can be
``vmap``-ed over nodes and differentiated with ``grad`` / ``jvp`` / ``vjp``.

Models carry no buffers (the small ResNet uses GroupNorm, not BatchNorm), so one round of
training is a pure function of the stacked parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

MODELS = ("logreg", "mlp", "cnn", "resnet")
ACTIVATIONS = ("relu", "gelu", "tanh", "softplus")
"""Hidden-unit non-linearities. ``relu`` is the paper's; the smooth ones (``gelu``, ``tanh``,
``softplus``) have a continuous batch gradient, which first-order influence needs for single
samples (a ReLU unit switching on or off moves the next step by a finite amount)."""


class ModelError(ValueError):
    """A model name or shape that cannot be built."""


def make_activation(name: str) -> nn.Module:
    """The activation module called ``name`` (one of :data:`ACTIVATIONS`)."""
    mods = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "softplus": nn.Softplus}
    if name not in mods:
        raise ModelError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return mods[name]()


class MLP(nn.Module):
    """Fully connected network (ReLU by default); the paper's 3-layer MLP is
    ``hidden=(128, 64)``."""

    def __init__(self, in_dim: int, num_classes: int, hidden: Sequence[int] = (128, 64),
                 activation: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), make_activation(activation)]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """The paper's 3-layer CNN: two conv+activation+max-pool blocks and a linear classifier
    (ReLU by default; max-pooling keeps a kink whatever the activation)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 channels: Sequence[int] = (16, 32), activation: str = "relu"):
        super().__init__()
        c, h, w = _image_shape(input_shape)
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1),
            make_activation(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            make_activation(activation),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(c2 * (h // 4) * (w // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.GroupNorm(groups, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.skip(x))


class ResNet(nn.Module):
    """A small ResNet (one basic block per stage) with GroupNorm, so it has no buffers."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 16, groups: int = 4):
        super().__init__()
        c, _, _ = _image_shape(input_shape)
        self.stem = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width), nn.ReLU()
        )
        self.stages = nn.Sequential(
            _Block(width, width, 1, groups),
            _Block(width, 2 * width, 2, groups),
            _Block(2 * width, 4 * width, 2, groups),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def _image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ModelError(
            f"this model needs image inputs of shape (C, H, W), got {tuple(input_shape)}; "
            "use model 'mlp' or 'logreg' for flat features"
        )
    c, h, w = input_shape
    return int(c), int(h), int(w)


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (128, 64),
    channels: Sequence[int] = (16, 32),
    width: int = 16,
    activation: str = "relu",
) -> nn.Module:
    """Build a model by name (one of :data:`MODELS`). ``activation`` (one of
    :data:`ACTIVATIONS`) applies to the MLP's hidden layers and the CNN's conv blocks; the
    ResNet keeps ReLU (``logreg`` has no hidden units)."""
    in_dim = math.prod(input_shape)
    make_activation(activation)  # one clear error for an unknown name, whatever the model
    if name == "resnet" and activation != "relu":
        raise ModelError(f"activation {activation!r} is not available for the resnet (ReLU "
                         "only); use model 'mlp' or 'cnn' for a smooth activation")
    if name == "logreg":
        return MLP(in_dim, num_classes, hidden=())
    if name == "mlp":
        return MLP(in_dim, num_classes, hidden=hidden, activation=activation)
    if name == "cnn":
        return CNN(input_shape, num_classes, channels=channels, activation=activation)
    if name == "resnet":
        return ResNet(input_shape, num_classes, width=width)
    raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


# ------------------------------------------------------------------------------------ losses

LOSSES = ("cross_entropy", "mse", "token_cross_entropy")
"""Built-in per-sample losses: ``cross_entropy`` (logits ``(B, C)``, class ids ``(B,)``),
``mse`` (outputs and float targets of one shape, the per-sample mean over the target's
dimensions) and ``token_cross_entropy`` (logits ``(B, L, V)``, token ids ``(B, L)``, the mean
over a sequence's tokens, skipping ``ignore_index``)."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.shape != y.shape and out.numel() == y.numel():
        y = y.reshape(out.shape)  # (B,) targets against (B, 1) outputs
    return ((out - y.to(out.dtype)) ** 2).reshape(out.shape[0], -1).mean(1)


def _token_ce(ignore_index: int | None) -> LossFn:
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = out.shape[0]
        if ignore_index is None:
            ce = nn.functional.cross_entropy(out.flatten(0, -2), y.reshape(-1), reduction="none")
            return ce.reshape(B, -1).mean(1)
        keep = y != ignore_index
        safe = torch.where(keep, y, torch.zeros_like(y))
        ce = nn.functional.cross_entropy(out.flatten(0, -2), safe.reshape(-1), reduction="none")
        keep = keep.reshape(B, -1).to(ce.dtype)
        return (ce.reshape(B, -1) * keep).sum(1) / keep.sum(1).clamp(min=1)

    return loss


def _class_acc(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(-1) == y).to(out.dtype).mean()


def _token_acc(ignore_index: int | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def acc(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hit = (out.argmax(-1) == y).to(out.dtype)
        if ignore_index is None:
            return hit.mean()
        keep = (y != ignore_index).to(out.dtype)
        return (hit * keep).sum() / keep.sum().clamp(min=1)

    return acc


def make_loss(kind: str | LossFn = "cross_entropy", *, ignore_index: int | None = None
              ) -> tuple[LossFn, Callable | None, str]:
    """``(loss_fn, accuracy_fn, name)`` for a built-in loss name (one of :data:`LOSSES`) or a
    user callable ``loss_fn(outputs, targets) -> (B,)`` (then no accuracy, name ``"custom"``).

    Accuracy is defined for ``cross_entropy`` (argmax = class id) and ``token_cross_entropy``
    (the fraction of non-ignored tokens predicted right); ``mse`` and user losses have none:
    evaluation then reports losses only (no accuracy keys, never NaN placeholders)."""
    if callable(kind):
        return kind, None, "custom"
    if kind == "cross_entropy":
        return _cross_entropy, _class_acc, kind
    if kind == "mse":
        return _mse, None, kind
    if kind == "token_cross_entropy":
        return _token_ce(ignore_index), _token_acc(ignore_index), kind
    raise ModelError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)} or pass a "
                     "callable loss_fn(outputs, targets) -> per-sample losses (B,)")


# ------------------------------------------------------------------------- functional model


@dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


_BUFFER_FIX = ("models with buffers (e.g. BatchNorm running statistics) are not supported by the "
               "functional core; use GroupNorm (as the built-in 'resnet' does)")


def _decompose_layer_norms(module: nn.Module) -> None:
    """Evaluate every ``nn.LayerNorm`` of ``module`` by its formula (mean, variance, scale,
    shift) instead of torch's fused kernel — the same function, so training is unchanged up
    to rounding. Why: in torch 2.13, forward-mode AD over ``vmap(grad(...))`` through the fused
    ``layer_norm`` with a learned weight returns wrong Hessian-vector products (the curvature
    term of DICE-E and of the adjoint; measured 0.78 off on a value of 4.6), while the formula
    is differentiated correctly. The module's instances are patched in place (their
    ``forward``), so the user's model computes the same values outside the library too."""
    for sub in module.modules():
        if type(sub) is nn.LayerNorm and "forward" not in vars(sub):
            sub.forward = _layer_norm_formula(sub)  # type: ignore[method-assign]


def _layer_norm_formula(mod: nn.LayerNorm):
    dims = tuple(range(-len(mod.normalized_shape), 0))

    def forward(x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(dims, keepdim=True)
        var = (x - mu).square().mean(dims, keepdim=True)
        out = (x - mu) * torch.rsqrt(var + mod.eps)
        if mod.weight is not None:  # read at call time: functional_call's swapped tensors
            out = out * mod.weight
        if mod.bias is not None:
            out = out + mod.bias
        return out

    return forward


class FunctionalModel:
    """A model seen as a function of one flat parameter vector, with its per-sample loss.

    ``loss(flat, x, y, w)`` is the batch loss ``sum_i w_i * l(f(x_i), y_i) / B`` (``B`` = batch
    size, so ``w = 1`` is the ordinary mean and zeroing ``w_i`` removes sample ``i`` while keeping
    the denominator, docs/method.md §3). ``loss_fn(outputs, targets) -> (B,)`` is the per-sample
    loss (default cross-entropy on class ids; see :func:`make_loss`); ``target_ndim`` is the
    number of dimensions of one sample's target (0 for class ids, 1 for a token sequence), so
    that a stacked per-node set ``(n, N, *target)`` is told from a shared one ``(N, *target)``.
    """

    def __init__(self, module: nn.Module, loss: str | LossFn = "cross_entropy", *,
                 ignore_index: int | None = None, target_ndim: int | None = None):
        if list(module.buffers()):
            raise ModelError(_BUFFER_FIX)
        self.module = module
        _decompose_layer_norms(module)
        self.loss_fn, self.accuracy_fn, self.loss_name = make_loss(loss, ignore_index=ignore_index)
        self.target_ndim = (1 if self.loss_name == "token_cross_entropy" else 0) \
            if target_ndim is None else int(target_ndim)
        slots, offset = [], 0
        for name, p in module.named_parameters():
            slots.append(ParamSlot(name, tuple(p.shape), offset, p.numel()))
            offset += p.numel()
        self.slots: tuple[ParamSlot, ...] = tuple(slots)
        self.dim = offset

    @property
    def has_accuracy(self) -> bool:
        return self.accuracy_fn is not None

    def per_node(self, y: torch.Tensor) -> bool:
        """Whether targets ``y`` are stacked per node, ``(n, N, *target)``."""
        return y.ndim == self.target_ndim + 2

    def sample_losses(self, params: dict[str, torch.Tensor], x: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``(B,)`` of the module with named ``params`` on ``(x, y)``."""
        return self.loss_fn(functional_call(self.module, params, (x,)), y)

    def flat_init(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The module's current parameters as a flat vector of length ``dim``."""
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).to(dtype)

    def init_params(
        self, n_nodes: int, seed: int, *, same_init: bool = True, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Initial stacked parameters ``(n_nodes, dim)`` from the module's default initialiser."""
        rows = []
        for k in range(n_nodes if not same_init else 1):
            torch.manual_seed(seed * 100_003 + k)
            for m in self.module.modules():
                if hasattr(m, "reset_parameters") and m is not self.module:
                    m.reset_parameters()
            rows.append(self.flat_init(dtype))
        theta = torch.stack(rows)
        return theta.expand(n_nodes, -1).clone() if same_init else theta

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            s.name: flat[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots
        }

    def forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.unflatten(flat), (x,))

    def per_sample_loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.forward(flat, x), y)

    def loss(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Weighted batch loss ``sum_i w_i l_i / B`` (``w=None``: plain mean)."""
        losses = self.per_sample_loss(flat, x, y)
        if w is None:
            return losses.mean()
        return (losses * w).sum() / losses.shape[0]


# -------------------------------------------------------------------------- model factories


def resolve_factory(spec: str) -> tuple[Callable[..., Any], Path | None]:
    """The function named by ``model.factory`` (``"pkg.module:make_model"``), imported from the
    working directory or an installed package (nothing else is imported), and the file of its
    module (None for a module without one)."""
    import importlib
    import os
    import sys

    mod_name, _, fn_name = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and mod_name.startswith(exc.name):
            raise ModelError(f"model.factory={spec!r}: no module {exc.name!r} in the working "
                             f"directory ({cwd}) or the installed packages; run from the folder "
                             "that holds it, or install it") from None
        raise ModelError(f"model.factory={spec!r}: importing {mod_name} failed: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise ModelError(f"model.factory={spec!r}: importing {mod_name} raised "
                         f"{type(exc).__name__}: {exc}") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelError(f"model.factory={spec!r}: module {mod_name} has no function "
                         f"{fn_name!r}; define def {fn_name}(**kwargs) -> nn.Module there")
    where = getattr(module, "__file__", None)
    return fn, Path(where) if where else None


def load_factory_model(spec: str, kwargs: dict[str, Any], seed: int = 0) -> nn.Module:
    """Call ``model.factory`` with ``model.kwargs`` (torch's generator seeded with ``seed``
    during the call, so parameters it draws itself are the same every time); one clear error
    if it fails or returns something other than an ``nn.Module``."""
    fn, _ = resolve_factory(spec)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = fn(**kwargs)
    except Exception as exc:
        raise ModelError(f"model.factory={spec!r} with model.kwargs={kwargs!r} raised "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"model.factory={spec!r} returned {type(module).__name__}, not an "
                         "nn.Module; return the model instance")
    return module


def factory_files(spec: str | None) -> tuple[dict[str, Any], ...]:
    """``{"path", "size", "sha256"}`` of the module file of ``model.factory`` (recorded with
    the data files, so the run identity changes when the model's code does)."""
    if not spec:
        return ()
    from .data.files import file_records

    _, path = resolve_factory(spec)
    return file_records([path]) if path is not None and path.is_file() else ()


def describe_model(module: nn.Module) -> str:
    """``"ClassName, 12,345 parameters"``."""
    n = sum(p.numel() for p in module.parameters())
    return f"{type(module).__name__}, {n:,} parameters"
