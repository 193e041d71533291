"""What every config key means: the text ``dice config`` prints above each key.

A key's description is its pydantic ``Field(description=...)`` when it has one, else the entry
of :data:`DESCRIPTIONS` (dotted path; plug-in keys as ``role:kind.key``). :func:`missing`
lists keys with neither, and a test keeps it empty, so a new key cannot ship undocumented.
"""

from __future__ import annotations

import textwrap
from typing import Any, get_args, get_origin

from pydantic import BaseModel

WIDTH = 100

DESCRIPTIONS: dict[str, str] = {
    "seed": "drives every random draw (data split, batches, initialisation, random graphs); "
            "same seed, same bits",
    "data": "which data, and how it is split over the nodes",
    "data.dataset": "digits (embedded, offline), fashion-mnist, mnist, cifar10 (files in "
                    "data_dir), synthetic, npz (your own arrays in one file) or nodes (one "
                    "node_<k>.npz per node plus test.npz, in data.path)",
    "data.data_dir": "folder holding the dataset files (default: $DICE_DATA_DIR, then the "
                     "system's dataset packages)",
    "data.partition": "who holds what: iid, dirichlet (label skew, see alpha) or shards "
                      "(classes_per_node classes per node)",
    "data.samples_per_node": "training samples per node (default: the dataset split evenly)",
    "data.alpha": "Dirichlet concentration of the dirichlet partition (small = more skew)",
    "data.classes_per_node": "classes each node holds under the shards partition",
    "data.corruptions": "corrupted data on chosen nodes (label flips, random labels, "
                        "Gaussian noise)",
    "data.corruptions.kind": "label_flip, random_labels, gaussian_noise or inject_flip "
                             "(mislabelled copies added to the node's data)",
    "data.corruptions.nodes": "node ids whose data is corrupted",
    "data.corruptions.fraction": "share of each such node's samples corrupted (0..1)",
    "data.corruptions.sigma": "standard deviation of gaussian_noise (in pixel units)",
    "data.corruptions.permutation": "label map of label_flip and inject_flip (default: "
                                    "y -> y + 1 mod C)",
    "data.corruptions.seed": "seed of the corruption's own random draws",
    "topology": "the graph and its mixing matrix W (W[k][j] = weight receiver k puts on "
                "sender j; rows sum to 1)",
    "topology.name": "ring, exponential, directed-ring, star, grid, torus, complete, "
                     "erdos-renyi, random-regular, watts-strogatz or isolated "
                     "(`dice topology NAME` prints its properties)",
    "topology.n": "number of nodes",
    "topology.weights": "uniform (row k puts 1/|closed in-neighbourhood| on itself and each "
                        "in-neighbour) or metropolis (undirected graphs: 1/(1+max(deg_k, deg_j)) "
                        "per edge, doubly stochastic)",
    "topology.time_varying": "a new W every round: one-peer-exponential, random-matching or "
                             "permuted (null: static)",
    "topology.p": "edge probability (erdos-renyi) or rewiring probability (watts-strogatz)",
    "topology.degree": "degree of random-regular",
    "topology.k": "ring neighbours of watts-strogatz",
    "loss": "the per-sample loss every node trains on and every influence is measured in: "
            "cross_entropy (class ids), mse or token_cross_entropy (sequences)",
    "model": "the network every node trains (all nodes share the architecture)",
    "model.name": "logreg, mlp, cnn or resnet",
    "model.hidden": "hidden layer widths of the mlp",
    "model.channels": "conv channels of the cnn, one per block",
    "model.width": "base width of the resnet (a multiple of 4)",
    "model.activation": "relu, gelu, tanh or softplus (smooth activations remove the kink "
                        "floor of first-order influence, docs/method.md §4)",
    "train": "decentralized SGD (docs/method.md §2): local step, then gossip",
    "train.rounds": "number of rounds (each: one local step per node, then one gossip)",
    "train.batch_size": "samples per node per local step",
    "train.lr": "learning rate η of the local step",
    "train.lr_schedule": "constant, step (× lr_gamma every lr_step_size rounds) or cosine",
    "train.lr_step_size": "rounds between decays of the step schedule",
    "train.lr_gamma": "factor of each decay of the step schedule",
    "train.momentum": "heavy-ball momentum of the local optimizer (0: plain SGD)",
    "train.nesterov": "Nesterov momentum (needs momentum > 0)",
    "train.weight_decay": "L2 weight decay of the local optimizer",
    "train.same_init": "every node starts from the same parameters (false: one seeded draw "
                       "per node)",
    "train.checkpoint_every": "keep parameters every c rounds for exact replay (more: less "
                              "memory, more recomputation)",
    "train.eval_every": "evaluate every node's test loss and accuracy every e rounds (and at "
                        "the last round)",
    "train.dtype": "float32, or float64 for influence of single samples (tiny loss "
                   "differences keep their digits)",
    "observer:proximal.kind": "proximal: online proximal influence on every edge",
    "observer:contribution.kind": "contribution: node contribution, reciprocity, free riders",
    "policy:prune.kind": "prune: detect harmful neighbours and cut them off",
    "policy:prune.rule": "sign (score > margin), zscore (robust z-score among the node's "
                         "neighbours > z_threshold), or both combined (and / or)",
    "policy:prune.score": "cumulative (the whole run so far) or window (the last rounds of "
                          "the proximal observer's window)",
    "policy:prune.z_threshold": "robust z-score above which the zscore rule flags a neighbour",
    "policy:prune.check_every": "rounds between two decisions",
    "policy:select.kind": "select: choose collaborators by measured influence",
    "policy:pens.kind": "pens: choose collaborators by their loss on the node's own data",
    "policy:influence_weight.kind": "influence_weight: reweight W from measured influence",
    "policy:influence_weight.score": "cumulative (the whole run so far) or window (the last "
                                     "rounds of the proximal observer's window)",
    "aggregator:clipped_gossip.kind": "clipped_gossip: robust gossip that clips far-away "
                                      "neighbours",
    "aggregator:trimmed_mean.kind": "trimmed_mean: coordinate-wise trimmed mean",
}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``M``, ``M | None`` or ``list[M]`` (else None)."""
    todo = [annotation]
    while todo:
        a = todo.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        if get_origin(a) is not None or get_args(a):
            todo.extend(get_args(a))
    return None


def fields(model: type[BaseModel], prefix: str = "") -> dict[str, str | None]:
    """Every key of ``model`` (nested models included) → its description, None if it has none."""
    out: dict[str, str | None] = {}
    for name, f in model.model_fields.items():
        key = prefix + name
        out[key] = f.description or DESCRIPTIONS.get(key)
        sub = _model_of(f.annotation)
        if sub is not None:
            out.update(fields(sub, key + "."))
    return out


def plugin_fields() -> dict[str, str | None]:
    """``role:kind.key`` of every plug-in setting → its description."""
    from .plugins import CATALOGUE

    out: dict[str, str | None] = {}
    for role, kinds in CATALOGUE.items():
        for kind, entry in kinds.items():
            for key, d in fields(entry.settings).items():
                full = f"{role}:{kind}.{key}"
                out[full] = d or DESCRIPTIONS.get(full)
    return out


def missing() -> list[str]:
    """Config and plug-in keys without a description (kept empty by a test)."""
    from .config import RunConfig

    both = {**fields(RunConfig), **plugin_fields()}
    return sorted(k for k, d in both.items() if not d)


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - len(indent) - 2, initial_indent=indent + "# ",
                         subsequent_indent=indent + "# ", break_on_hyphens=False)


def annotate_yaml(text: str, descriptions: dict[str, str | None], prefix: str = "",
                  indent: str = "") -> list[str]:
    """YAML ``text`` (a block mapping, as ``yaml.safe_dump`` writes it) with each key's
    description as a comment above it; the result still loads as the same YAML."""
    out: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    for line in text.splitlines():
        body = line.lstrip(" ")
        depth = len(line) - len(body)
        key = body.split(":", 1)[0] if ":" in body and not body.startswith(("-", "#")) else ""
        if key and " " not in key:
            while stack and stack[-1][0] >= depth:
                stack.pop()
            path = ".".join([k for _, k in stack] + [key])
            d = descriptions.get(prefix + path)
            if d:
                out += _comment(d, indent + " " * depth)
            stack.append((depth, key))
        out.append(indent + line)
    return out


def annotated_config(cfg: Any) -> str:
    """``dice config``: the whole config as YAML, every key with its description above it,
    then every plug-in kind with its full description and its keys."""
    from .config import RunConfig, dump_config

    desc = fields(RunConfig)
    return "\n".join(annotate_yaml(dump_config(cfg), desc)) + "\n" + catalogue_text()


def catalogue_text() -> str:
    """Every plug-in kind: its description (whole, wrapped), its keys with defaults and a
    description each, as YAML comments."""
    import yaml

    from .plugins import CATALOGUE, SECTIONS

    desc = plugin_fields()
    lines = ["", "# plug-ins of the training loop (sections observers: / policy: / aggregator:):"]
    for role, kinds in CATALOGUE.items():
        for kind, entry in kinds.items():
            doc = (entry.settings.__doc__ or "").strip().split("\n\n")[0]
            doc = " ".join(doc.split())
            lines += _comment(f"{SECTIONS[role]}: kind {kind} - {doc}", "")
            body = yaml.safe_dump(entry.settings().model_dump(mode="json"), sort_keys=False)
            block = annotate_yaml(body, desc, prefix=f"{role}:{kind}.", indent="    ")
            lines += ["#" + ln for ln in block]
    return "\n".join(lines) + "\n"
