"""Per-node stacked data, declarative corruptions and the seeded batch schedule.

Everything here is deterministic given its seeds; :func:`make_node_data` always copies.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .datasets import CORRUPTION_KINDS, DataError, Dataset
from .partition import _rng, partition

# --------------------------------------------------------------------------------------------
# Corruptions and per-node data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corruption:
    """Declarative corruption of a seeded ``fraction`` of each listed node's samples.

    kinds: "label_flip" (y -> permutation[y], default (y + 1) mod C), "random_labels" (uniform
    over the C - 1 wrong labels, so every chosen sample really changes), "gaussian_noise" (adds
    N(0, sigma^2) to every feature, in normalised feature units), "inject_flip" (injected
    poison: the node keeps all its samples and gets, appended after them, a copy of each chosen
    sample whose label ``permutation`` changes, with that changed label; only the copies count
    as corrupted, they carry their source's dataset index, and the node grows by their number).
    The number of samples chosen on node k is round(fraction * size_k); ``inject_flip`` chooses
    exactly the samples a ``label_flip`` with the same seed, fraction and nodes would flip.
    """

    kind: str
    nodes: tuple[int, ...]
    fraction: float = 1.0
    sigma: float = 1.0
    permutation: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in CORRUPTION_KINDS:
            raise DataError(
                f"unknown corruption kind {self.kind!r}; use one of {', '.join(CORRUPTION_KINDS)}"
            )
        object.__setattr__(self, "nodes", tuple(int(k) for k in self.nodes))
        if self.permutation is not None:
            object.__setattr__(self, "permutation", tuple(int(c) for c in self.permutation))
        if not 0.0 <= self.fraction <= 1.0:
            raise DataError(f"corruption fraction={self.fraction} must be in [0, 1]")
        if self.kind == "gaussian_noise" and not (math.isfinite(self.sigma) and self.sigma > 0):
            raise DataError(f"gaussian_noise sigma={self.sigma} must be > 0")
        if self.seed < 0:
            raise DataError(f"corruption seed={self.seed} must be >= 0")

    def validate(self, n_nodes: int, num_classes: int | None) -> None:
        """Check node ids and the label mapping against a concrete setup."""
        if num_classes is None and self.kind != "gaussian_noise":
            raise DataError(f"{self.kind} corrupts class ids, but this data's targets are not "
                            "class ids; use gaussian_noise, or corrupt your data before loading")
        for k in self.nodes:
            if not 0 <= k < n_nodes:
                raise DataError(
                    f"{self.kind}: node id {k} out of range for n={n_nodes} nodes (use 0..{n_nodes - 1})"
                )
        if self.kind in ("label_flip", "inject_flip") and self.permutation is not None:
            p = self.permutation
            if len(p) != num_classes or any(not 0 <= c < num_classes for c in p):
                raise DataError(
                    f"{self.kind} permutation {p} must map each of the {num_classes} classes to a "
                    f"class in 0..{num_classes - 1}"
                )
        if self.kind == "random_labels" and num_classes < 2:
            raise DataError("random_labels needs at least 2 classes")

    def count(self, size: int) -> int:
        """Number of samples altered on a node holding ``size`` samples."""
        return min(size, int(math.floor(self.fraction * size + 0.5)))


@dataclass
class NodeData:
    """Per-node stacked, padded local data for a vectorised simulator.

    ``x``: (n, m_max, *input_shape) float32; ``y``: (n, m_max, *target_shape) (int64 class
    ids for the built-in data; any shape and dtype for data of one's own); ``sizes``: (n,) int64
    real sample counts (positions >= sizes[k] are padding: x = 0, y = 0); ``index``: (n, m_max)
    int64 dataset index of each sample (-1 for padding); ``corrupted``: (n, m_max) bool, True
    where a :class:`Corruption` altered the sample.
    """

    x: torch.Tensor
    y: torch.Tensor
    sizes: torch.Tensor
    index: torch.Tensor
    corrupted: torch.Tensor
    corruptions: tuple[Corruption, ...] = field(default=())

    @property
    def n_nodes(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def max_size(self) -> int:
        return int(self.x.shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[2:])

    @property
    def target_shape(self) -> tuple[int, ...]:
        return tuple(self.y.shape[2:])

    @property
    def mask(self) -> torch.Tensor:
        """(n, m_max) bool, True for real (non-padding) samples."""
        return self.index >= 0

    def to(self, device: torch.device | str) -> NodeData:
        """A copy with every tensor on ``device``."""
        return replace(
            self,
            x=self.x.to(device),
            y=self.y.to(device),
            sizes=self.sizes.to(device),
            index=self.index.to(device),
            corrupted=self.corrupted.to(device),
        )


def make_node_data(
    dataset: Dataset,
    parts: list[np.ndarray],
    *,
    split: str = "train",
    corruptions: Sequence[Corruption] = (),
) -> NodeData:
    """Stack each node's samples (``parts[k]`` = dataset indices) into padded tensors.

    Corruptions are applied to copies, in order; the dataset is never modified. Which samples a
    corruption picks depends only on (its seed, node, kind). Tensors live on the dataset's device.
    """
    if split not in ("train", "test"):
        raise DataError(f"split={split!r} must be 'train' or 'test'")
    x_all: torch.Tensor = getattr(dataset, f"x_{split}")
    y_all: torch.Tensor = getattr(dataset, f"y_{split}")
    n_total = int(y_all.shape[0])
    n = len(parts)
    if n < 1:
        raise DataError("parts is empty; need at least one node")
    arrays = [np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]
    for k, p in enumerate(arrays):
        if p.size and (p.min() < 0 or p.max() >= n_total):
            raise DataError(
                f"node {k} has dataset index {int(p.min() if p.min() < 0 else p.max())} outside "
                f"the {split} split of size {n_total}"
            )
    dev = x_all.device
    sizes = torch.tensor([len(p) for p in arrays], dtype=torch.int64)
    m_max = max(1, int(sizes.max()))
    index = torch.full((n, m_max), -1, dtype=torch.int64)
    for k, p in enumerate(arrays):
        index[k, : len(p)] = torch.from_numpy(p)
    sizes, index = sizes.to(dev), index.to(dev)
    real = index >= 0
    safe = index.clamp(min=0)
    x = x_all[safe]  # one gather; copies
    y = y_all[safe]
    x[~real] = 0.0
    y[~real] = 0
    corrupted = torch.zeros((n, m_max), dtype=torch.bool, device=dev)
    for c in corruptions:
        c.validate(n, dataset.num_classes)
        # inject_flip draws the samples label_flip would: the same images, copied not relabelled
        kind_id = CORRUPTION_KINDS.index("label_flip" if c.kind == "inject_flip" else c.kind)
        copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for k in c.nodes:
            size = int(sizes[k])
            cnt = c.count(size)
            if cnt == 0:
                continue
            rng = _rng(c.seed, k, kind_id)
            pos = torch.from_numpy(np.sort(rng.choice(size, size=cnt, replace=False))).to(dev)
            if c.kind in ("label_flip", "inject_flip"):
                if c.permutation is None:
                    new = (y[k, pos] + 1) % dataset.num_classes
                else:
                    mapping = torch.tensor(c.permutation, dtype=torch.int64, device=dev)
                    new = mapping[y[k, pos]]
                changed = new != y[k, pos]
                if c.kind == "inject_flip":
                    copies[k] = (pos[changed], new[changed])
                    continue
                y[k, pos] = new
                corrupted[k, pos[changed]] = True
            elif c.kind == "random_labels":  # shift by 1..C-1: uniform over the wrong labels
                shift = torch.from_numpy(rng.integers(1, dataset.num_classes, size=cnt)).to(dev)
                y[k, pos] = (y[k, pos] + shift) % dataset.num_classes
                corrupted[k, pos] = True
            else:
                noise = rng.normal(0.0, c.sigma, size=(cnt, *x.shape[2:])).astype(np.float32)
                x[k, pos] += torch.from_numpy(noise).to(dev)
                corrupted[k, pos] = True
        if copies:
            x, y, sizes, index, corrupted = _append_copies(x, y, sizes, index, corrupted, copies)
    return NodeData(
        x=x, y=y, sizes=sizes, index=index, corrupted=corrupted, corruptions=tuple(corruptions)
    )


def _append_copies(
    x: torch.Tensor, y: torch.Tensor, sizes: torch.Tensor, index: torch.Tensor,
    corrupted: torch.Tensor, copies: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``inject_flip``: append to node k, after its samples, copies of its samples at positions
    ``copies[k][0]`` labelled ``copies[k][1]``, flagged corrupted; the tensors grow (zero
    padding) when a node outgrows ``m_max``. Positions below the old sizes are untouched."""
    new_sizes = sizes.clone()
    for k, (pos, _) in copies.items():
        new_sizes[k] += len(pos)
    n, m_old = index.shape
    m_new = max(m_old, int(new_sizes.max()))
    if m_new > m_old:
        pad = m_new - m_old
        x = torch.cat([x, x.new_zeros((n, pad, *x.shape[2:]))], 1)
        y = torch.cat([y, y.new_zeros((n, pad, *y.shape[2:]))], 1)
        index = torch.cat([index, index.new_full((n, pad), -1)], 1)
        corrupted = torch.cat([corrupted, corrupted.new_zeros((n, pad))], 1)
    for k, (pos, new) in copies.items():
        a, b = int(sizes[k]), int(new_sizes[k])
        x[k, a:b] = x[k, pos]
        y[k, a:b] = new
        index[k, a:b] = index[k, pos]
        corrupted[k, a:b] = True
    return x, y, new_sizes, index, corrupted


def test_partition(
    dataset: Dataset,
    n_nodes: int,
    *,
    samples_per_node: int,
    start: int = 0,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 1.0,
    classes_per_node: int = 2,
) -> list[np.ndarray]:
    """Per-node test-split indices: :func:`partition` of ``y_test[start:]`` (indices into the
    whole test split; ``start`` keeps the first test samples out, e.g. a shared test set)."""
    parts = partition(
        dataset.y_test[start:],
        n_nodes,
        scheme=scheme,
        samples_per_node=samples_per_node,
        alpha=alpha,
        classes_per_node=classes_per_node,
        seed=seed,
    )
    return [p + start for p in parts]


def node_test_splits(
    dataset: Dataset,
    n_nodes: int,
    *,
    samples_per_node: int,
    start: int = 0,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 1.0,
    classes_per_node: int = 2,
) -> NodeData:
    """Per-node test sets (:func:`test_partition`) stacked like :func:`make_node_data`."""
    parts = test_partition(
        dataset,
        n_nodes,
        samples_per_node=samples_per_node,
        start=start,
        scheme=scheme,
        seed=seed,
        alpha=alpha,
        classes_per_node=classes_per_node,
    )
    return make_node_data(dataset, parts, split="test")


# --------------------------------------------------------------------------------------------
# Hidden groups of nodes (collaborator selection)
# --------------------------------------------------------------------------------------------

GROUP_TRANSFORMS = ("permute_labels", "rotate")


def group_assignment(n_nodes: int, count: int, *, seed: int, assign: str = "seeded") -> np.ndarray:
    """Group id in ``0..count-1`` of every node (sizes differ by at most one).

    ``contiguous``: node ``k`` is in group ``k * count // n_nodes``; ``seeded``: the same sizes
    over a permutation of the nodes drawn from ``(seed, "groups")``."""
    if not 1 <= count <= n_nodes:
        raise DataError(f"groups.count={count} must be in 1..{n_nodes} (the number of nodes)")
    if assign not in ("seeded", "contiguous"):
        raise DataError(f"groups.assign={assign!r}: choose 'seeded' or 'contiguous'")
    base = (np.arange(n_nodes) * count) // n_nodes
    if assign == "contiguous":
        return base
    perm = _rng(seed, 0x6770).permutation(n_nodes)
    out = np.empty(n_nodes, dtype=np.int64)
    out[perm] = base
    return out


def group_label_maps(count: int, num_classes: int, seed: int) -> np.ndarray:
    """``(count, C)`` label maps: group 0 keeps its labels, every other group a seeded
    derangement (no class keeps its label), drawn from ``(seed, "labels", g)``."""
    maps = np.tile(np.arange(num_classes), (count, 1))
    for g in range(1, count):
        rng = _rng(seed, 0x6C61, g)
        while True:
            p = rng.permutation(num_classes)
            if num_classes < 2 or (p != np.arange(num_classes)).all():
                break
        maps[g] = p
    return maps


def transform_group(
    x: torch.Tensor, y: torch.Tensor, group: int, transform: str, label_maps: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``x`` (m, *input_shape), ``y`` (m,) as group ``group`` sees them (copies):
    ``permute_labels``: ``y -> label_maps[group][y]``; ``rotate``: images turned by
    ``group`` x 90 degrees (square images only)."""
    if transform == "permute_labels":
        mapping = torch.as_tensor(label_maps[group], dtype=torch.int64, device=y.device)
        return x.clone(), mapping[y]
    if transform == "rotate":
        if x.ndim < 3 or x.shape[-1] != x.shape[-2]:
            raise DataError(f"groups.transform=rotate needs square images, got samples of shape "
                            f"{tuple(x.shape[1:])}; use permute_labels")
        return torch.rot90(x, int(group) % 4, dims=(-2, -1)).clone(), y.clone()
    raise DataError(f"unknown group transform {transform!r}; use one of {GROUP_TRANSFORMS}")


def apply_groups(
    nd: NodeData, groups: np.ndarray, transform: str, label_maps: np.ndarray
) -> NodeData:
    """A copy of ``nd`` where node ``k``'s samples are :func:`transform_group` of its group
    ``groups[k]`` (padding stays zero)."""
    x, y = nd.x.clone(), nd.y.clone()
    for k in range(nd.n_nodes):
        size = int(nd.sizes[k])
        x[k, :size], y[k, :size] = transform_group(nd.x[k, :size], nd.y[k, :size],
                                                   int(groups[k]), transform, label_maps)
    return replace(nd, x=x, y=y)


# --------------------------------------------------------------------------------------------
# Batch schedule
# --------------------------------------------------------------------------------------------


class BatchSchedule:
    """Seeded, order-independent mini-batch positions for every node and round.

    Node k's round t lies in epoch e = t // (sizes[k] // batch_size); an epoch is a permutation
    of ``range(sizes[k])`` drawn from ``default_rng([seed, k, e])``, cut into consecutive
    non-overlapping batches (the incomplete tail is dropped). ``indices(t)`` is therefore a pure
    function of (seed, node, round), whatever order rounds are requested in.
    """

    def __init__(
        self, sizes: Sequence[int] | torch.Tensor, batch_size: int, seed: int, *, cache: int = 0
    ) -> None:
        if isinstance(sizes, torch.Tensor):
            sizes = sizes.detach().cpu().reshape(-1).tolist()
        self.sizes = [int(s) for s in sizes]
        if not self.sizes:
            raise DataError("BatchSchedule needs at least one node size")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if seed < 0:
            raise DataError(f"seed={seed} must be >= 0")
        for k, s in enumerate(self.sizes):
            if s < batch_size:
                raise DataError(
                    f"batch_size={batch_size} exceeds node {k}'s {s} local samples; use "
                    f"batch_size <= {min(self.sizes)}"
                )
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self._rpe = [s // self.batch_size for s in self.sizes]
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = cache or max(64, 4 * len(self.sizes))
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_nodes(self) -> int:
        return len(self.sizes)

    def rounds_per_epoch(self, k: int) -> int:
        """Rounds (batches) in one epoch of node k: sizes[k] // batch_size."""
        return self._rpe[k]

    def _perm(self, k: int, e: int) -> np.ndarray:
        key = (k, e)
        perm = self._cache.get(key)
        if perm is None:
            perm = np.random.default_rng([self.seed, k, e]).permutation(self.sizes[k])
            self._cache[key] = perm
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return perm

    def node_indices(self, k: int, t: int) -> np.ndarray:
        """Positions (batch_size,) into node k's local data at round t."""
        r = self._rpe[k]
        e, j = divmod(int(t), r)
        b = self.batch_size
        return self._perm(k, e)[j * b : (j + 1) * b]

    def indices(self, t: int) -> torch.Tensor:
        """(n, batch_size) int64 positions into each node's local data for round ``t`` >= 0."""
        if t < 0:
            raise DataError(f"round t={t} must be >= 0")
        from .._perm_kernel import batch_rows

        out = None
        if len(self.sizes) > 32:  # all nodes in one compiled call (numba), same bits as NumPy
            if self._arrays is None:
                self._arrays = (np.asarray(self.sizes, dtype=np.int64),
                                np.asarray(self._rpe, dtype=np.int64))
            out = batch_rows(self.seed, *self._arrays, int(t), self.batch_size)
        if out is None:
            out = np.stack([self.node_indices(k, t) for k in range(len(self.sizes))])
        return torch.from_numpy(out)


def gather_batch(nd: NodeData, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather (x (n, B, *input_shape), y (n, B, *target_shape)) for positions ``idx`` (n, B) in
    one indexing op."""
    if idx.ndim != 2 or idx.shape[0] != nd.n_nodes:
        raise DataError(f"batch indices have shape {tuple(idx.shape)}; need ({nd.n_nodes}, B)")
    idx = idx.to(device=nd.x.device, dtype=torch.int64)
    n, m = nd.n_nodes, nd.max_size
    flat = (torch.arange(n, device=nd.x.device).unsqueeze(1) * m + idx).reshape(-1)
    x = nd.x.reshape(n * m, -1).index_select(0, flat).reshape(n, idx.shape[1], *nd.input_shape)
    y = nd.y.reshape(n * m, -1).index_select(0, flat).reshape(n, idx.shape[1], *nd.target_shape)
    return x, y
