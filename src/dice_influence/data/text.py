"""A real text corpus for the language model: Debian's fortune files, split by source.

The corpus installs offline from Debian (``apt-get install fortunes fortunes-de fortunes-es
fortunes-it``; ``quickstart.sh`` does it) into ``/usr/share/games/fortunes``. Each node holds
the text of one fortune file (16 by default: four English, four German, four Spanish, four
Italian files), so nodes differ in language and topic; the shared test set holds a few held-out
sequences of every source.

Tokenizer: UTF-8 bytes (vocabulary 256, nothing to download or fit). A source's fortunes are
joined in file order (whitespace runs collapsed to one space, one fortune per line), cut into
windows of ``context + 1`` bytes at stride ``context``; a window gives one sequence, inputs
``x = w[:-1]`` and next-token targets ``y = w[1:]`` (both ``(context,)`` int64). Windows are
drawn by a seeded permutation: the first ``test_sequences`` of each source go to the shared test
set, the next ``train_sequences`` to the node.

One node's text can be scrambled (``scramble_node``): a seeded share ``scramble_fraction`` of its
windows has its bytes shuffled before ``x`` and ``y`` are cut, so the node still sees the
language's bytes but no order. Which sequences were scrambled is recorded
(:attr:`TextCorpus.scrambled`, ``corpus.json``).

``python -m dice_influence.data.text DIR [--scramble-node K] ...`` writes ``DIR/node_<k>.npz``
(arrays ``x``, ``y``) for every node, ``DIR/test.npz`` and ``DIR/corpus.json`` (sources, file
hashes, scrambled sequences): the ``data: {dataset: nodes, path: DIR}`` layout that
``configs/lm-*.yaml`` read.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .files import file_records

FORTUNES_DIR = "/usr/share/games/fortunes"
FORTUNE_PACKAGES = ("fortunes", "fortunes-de", "fortunes-es", "fortunes-it")
DEFAULT_SOURCES: tuple[str, ...] = (
    "literature", "science", "definitions", "politics",
    "de/witze", "de/zitate", "de/infodrom", "de/unfug",
    "es/refranes.fortunes", "es/sabiduria.fortunes", "es/sentimientos.fortunes",
    "es/arte.fortunes",
    "it/italia", "it/zuse", "it/norm", "it/leggi",
)
"""One fortune file per node (paths under :data:`FORTUNES_DIR`): English, German, Spanish,
Italian, four each."""

PRETRAIN_SOURCES: tuple[str, ...] = (
    "wisdom", "people", "humorists", "work",
    "de/fussball", "de/hauptgericht", "de/linuxtag", "de/mathematiker",
    "es/ciencia.fortunes", "es/humanos.fortunes", "es/poder.fortunes", "es/vida.fortunes",
    "it/computer", "it/luke", "it/luttazzi", "it/paolotedeschi",
)
"""Other fortune files, four per language, that no node holds (``--pretrain-sources
default``): the text of the shared pretrained model of ``configs/lm-pretrain.yaml``."""

ENGLISH_SOURCES: tuple[str, ...] = (
    "art", "computers", "cookie", "definitions", "education", "food", "humorists", "kids",
    "law", "literature", "love", "medicine", "politics", "riddles", "science", "sports",
)
"""One English fortune file per node (``--sources english``): 16 topics of one language, so
the nodes differ by source only (``configs/lm-english.yaml``)."""

ENGLISH_PRETRAIN_SOURCES: tuple[str, ...] = (
    "people", "wisdom", "work", "songs-poems", "men-women", "knghtbrd", "linux",
    "miscellaneous", "perl", "tao", "zippy", "drugs", "platitudes", "startrek", "ethnic",
    "fortunes",
)
"""Other English fortune files that no node of :data:`ENGLISH_SOURCES` holds
(``--pretrain-sources english``): the text of ``configs/lm-english-pretrain.yaml``."""

SOURCE_SETS: dict[str, tuple[str, ...]] = {"default": DEFAULT_SOURCES,
                                           "english": ENGLISH_SOURCES}
PRETRAIN_SETS: dict[str, tuple[str, ...]] = {"default": PRETRAIN_SOURCES,
                                             "english": ENGLISH_PRETRAIN_SOURCES}

VOCAB = 256
_WS = re.compile(r"\s+")


def encode(text: str) -> np.ndarray:
    """Byte-level token ids (``uint8`` → values 0..255) of ``text``'s UTF-8 encoding."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Text of byte-level token ids (invalid UTF-8, e.g. a cut multi-byte character, shown
    as U+FFFD)."""
    return bytes(int(i) for i in np.asarray(ids).reshape(-1)).decode("utf-8", errors="replace")


def parse_fortunes(raw: str) -> list[str]:
    """The fortunes of a fortune file's text: entries separated by lines holding only ``%``,
    whitespace runs collapsed to one space, empty entries dropped."""
    entries = re.split(r"^%[ \t]*$", raw.replace("\r\n", "\n"), flags=re.MULTILINE)
    return [s for s in (_WS.sub(" ", e).strip() for e in entries) if s]


def read_source(path: str | Path) -> str:
    """A fortune file as one text: its fortunes in file order, one per line (UTF-8, Latin-1 as
    a fallback for files that are not UTF-8)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read fortune file {path} ({exc.strerror or exc}); install "
                        f"the Debian packages: apt-get install {' '.join(FORTUNE_PACKAGES)}"
                        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return "\n".join(parse_fortunes(text)) + "\n"


def windows(tokens: np.ndarray, context: int) -> np.ndarray:
    """Non-overlapping windows ``(W, context + 1)`` of ``tokens`` at stride ``context`` (every
    token is a target once)."""
    count = (len(tokens) - 1) // context
    if count < 1:
        return np.zeros((0, context + 1), dtype=np.int64)
    idx = np.arange(count)[:, None] * context + np.arange(context + 1)[None, :]
    return tokens[idx].astype(np.int64)


@dataclass
class TextCorpus:
    """Per-node training sequences and a shared test set (arrays are int64 token ids).

    ``nodes[k] = (x, y)``: ``x`` (N, context) inputs, ``y`` (N, context) next tokens.
    ``test = (x, y)``: the shared test set (``test_sequences`` per source, in source order).
    ``scrambled[k]``: positions (into node ``k``'s sequences) whose bytes were shuffled."""

    sources: list[str]
    nodes: list[tuple[np.ndarray, np.ndarray]]
    test: tuple[np.ndarray, np.ndarray]
    scrambled: dict[int, list[int]] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    pretrain: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.nodes)

    def scrambled_mask(self, node: int) -> np.ndarray:
        """Boolean mask over node ``node``'s sequences: True where scrambled."""
        mask = np.zeros(len(self.nodes[node][0]), dtype=bool)
        mask[self.scrambled.get(node, [])] = True
        return mask

    def manifest(self) -> dict[str, Any]:
        return {"kind": "text-corpus", "tokenizer": "utf-8 bytes", "vocab": VOCAB,
                "sources": self.sources, "files": self.files, "settings": self.settings,
                "train_sequences": [len(x) for x, _ in self.nodes],
                "test_sequences": len(self.test[0]),
                "pretrain_sequences": [len(x) for x, _ in self.pretrain],
                "scrambled": {str(k): v for k, v in self.scrambled.items()}}


def build_corpus(
    sources: Sequence[str] = DEFAULT_SOURCES,
    *,
    root: str | Path = FORTUNES_DIR,
    texts: Sequence[str] | None = None,
    context: int = 64,
    train_sequences: int = 128,
    test_sequences: int = 4,
    scramble_node: int | None = None,
    scramble_fraction: float = 1.0,
    seed: int = 0,
    pretrain_sequences: int = 0,
    pretrain_sources: Sequence[str] | None = None,
) -> TextCorpus:
    """One node per source: ``train_sequences`` windows of ``context + 1`` bytes each, plus
    ``test_sequences`` held-out windows per source in the shared test set.

    ``texts``: the sources' texts themselves (then ``sources`` only names them and nothing is
    read). ``scramble_node``: the node whose sequences (a seeded share ``scramble_fraction``)
    get their bytes shuffled. ``pretrain_sequences``: further held-out windows per source,
    never scrambled and disjoint from the nodes' and the test set's (:attr:`TextCorpus.pretrain`,
    for a shared model to start from: ``model.init``); adding them leaves the node and test
    windows as they are. ``pretrain_sources``: take them from these other files instead
    (``pretrain_sequences`` windows of each, read under ``root``). Deterministic given
    ``seed``."""
    if context < 1 or train_sequences < 1 or test_sequences < 0 or pretrain_sequences < 0:
        raise DataError(f"context={context}, train_sequences={train_sequences}, "
                        f"test_sequences={test_sequences}, pretrain_sequences="
                        f"{pretrain_sequences}: need context >= 1, train_sequences >= 1 and "
                        "test_sequences, pretrain_sequences >= 0")
    if not 0.0 <= scramble_fraction <= 1.0:
        raise DataError(f"scramble_fraction={scramble_fraction} must be in [0, 1]")
    sources = list(sources)
    if pretrain_sources and texts is not None:
        raise DataError("pretrain_sources are read from fortune files; with texts= give "
                        "pretrain_sources=None")
    if texts is None:
        paths = [Path(root) / s for s in sources]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"fortune files not found: {', '.join(missing[:4])}"
                            f"{' ...' if len(missing) > 4 else ''}; install the Debian "
                            f"packages (apt-get install {' '.join(FORTUNE_PACKAGES)}, as "
                            "./quickstart.sh does) or pass root= / --root to another copy")
        texts = [read_source(p) for p in paths]
        files = list(file_records(paths))
    else:
        if len(texts) != len(sources):
            raise DataError(f"{len(texts)} texts for {len(sources)} source names; give one "
                            "name per text")
        files = []
    if scramble_node is not None and not 0 <= scramble_node < len(sources):
        raise DataError(f"scramble_node={scramble_node} out of range for {len(sources)} "
                        f"sources (valid: 0..{len(sources) - 1})")
    other = list(pretrain_sources or [])
    own_pre = 0 if other else pretrain_sequences
    need = train_sequences + test_sequences + own_pre
    nodes, tx, ty, scrambled, pre = [], [], [], {}, []
    for k, (name, text) in enumerate(zip(sources, texts, strict=True)):
        win = windows(encode(text), context)
        if len(win) < need:
            raise DataError(f"source {name!r} gives {len(win)} sequences of {context + 1} "
                            f"bytes, fewer than train_sequences + test_sequences + "
                            f"pretrain_sequences = {need}; "
                            "lower them or pick a longer source")
        rng = np.random.default_rng([seed, k, 0x7E47])
        win = win[rng.permutation(len(win))[:need]]
        cut = test_sequences + train_sequences
        test, train, held = win[:test_sequences], win[test_sequences:cut].copy(), win[cut:]
        if own_pre:
            pre.append(_pairs(held))
        if k == scramble_node:
            srng = np.random.default_rng([seed, k, 0x5C7A])
            m = int(round(scramble_fraction * len(train)))
            chosen = np.sort(srng.permutation(len(train))[:m])
            for i in chosen:
                train[i] = train[i][srng.permutation(context + 1)]
            scrambled[k] = chosen.tolist()
        nodes.append(_pairs(train))
        tx.append(test[:, :-1])
        ty.append(test[:, 1:])
    for k, name in enumerate(other):
        path = Path(root) / name
        if not path.is_file():
            raise DataError(f"pretraining fortune file not found: {path}; install the Debian "
                            f"packages (apt-get install {' '.join(FORTUNE_PACKAGES)}) or name "
                            "other --pretrain-sources")
        files.extend(file_records([path]))
        win = windows(encode(read_source(path)), context)
        if len(win) < pretrain_sequences:
            raise DataError(f"pretraining source {name!r} gives {len(win)} sequences of "
                            f"{context + 1} bytes, fewer than pretrain_sequences = "
                            f"{pretrain_sequences}; lower it or pick a longer source")
        rng = np.random.default_rng([seed, 1000 + k, 0x7E47])
        held = win[rng.permutation(len(win))[:pretrain_sequences]]
        pre.append(_pairs(held))
    settings = {"context": context, "train_sequences": train_sequences,
                "test_sequences": test_sequences, "scramble_node": scramble_node,
                "scramble_fraction": scramble_fraction, "seed": seed, "root": str(root),
                "pretrain_sequences": pretrain_sequences, "pretrain_sources": other or None}
    return TextCorpus(sources=sources, nodes=nodes,
                      test=(np.concatenate(tx).copy(), np.concatenate(ty).copy()),
                      scrambled=scrambled, files=files, settings=settings,
                      pretrain=pre if pretrain_sequences else [])


def write_nodes(corpus: TextCorpus, out: str | Path) -> Path:
    """Write ``node_<k>.npz`` (``x``, ``y``) for every node, ``test.npz`` and ``corpus.json``
    into ``out`` (atomically, file by file); with pretraining windows also ``out/pretrain/``
    (``node_<k>.npz`` of source ``k``'s clean held-out windows and the same ``test.npz``), a
    nodes folder of its own for the pretraining run. Returns ``out``."""
    import io

    from .._util import atomic_write_bytes, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def save(path: Path, x: np.ndarray, y: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, x=x, y=y)
        atomic_write_bytes(path, buf.getvalue())

    for k, (x, y) in enumerate(corpus.nodes):
        save(out / f"node_{k}.npz", x, y)
    save(out / "test.npz", *corpus.test)
    if corpus.pretrain:
        (out / "pretrain").mkdir(exist_ok=True)
        for k, (x, y) in enumerate(corpus.pretrain):
            save(out / "pretrain" / f"node_{k}.npz", x, y)
        save(out / "pretrain" / "test.npz", *corpus.test)
    write_json(out / "corpus.json", corpus.manifest())
    return out


def _pairs(win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets ``(w[:, :-1], w[:, 1:])`` of ``(N, context + 1)`` windows
    (contiguous copies)."""
    return win[:, :-1].copy(), win[:, 1:].copy()


def _named(arg: str, sets: dict[str, tuple[str, ...]]) -> list[str]:
    """A named set's files, or the comma-separated file names of ``arg``."""
    return list(sets[arg]) if arg in sets else [s for s in arg.split(",") if s]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dice_influence.data.text",
        description="Write the fortunes corpus as per-node files (node_<k>.npz, test.npz, "
                    "corpus.json) for data: {dataset: nodes, path: DIR}.")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--root", default=FORTUNES_DIR, help="folder holding the fortune files")
    ap.add_argument("--sources", default="default",
                    help="comma-separated fortune files, one per node, or a named set: "
                         + "; ".join(f"'{k}': {','.join(v)}" for k, v in SOURCE_SETS.items()))
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--train-sequences", type=int, default=128)
    ap.add_argument("--test-sequences", type=int, default=4)
    ap.add_argument("--scramble-node", type=int, default=None)
    ap.add_argument("--scramble-fraction", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-sequences", type=int, default=0,
                    help="clean held-out windows per source for a shared pretrained model "
                         "(written to OUT/pretrain/)")
    ap.add_argument("--pretrain-sources", default="",
                    help="comma-separated other fortune files to take them from instead, or "
                         "a named set: " + "; ".join(f"'{k}': {','.join(v)}"
                                                     for k, v in PRETRAIN_SETS.items()))
    a = ap.parse_args(argv)
    try:
        corpus = build_corpus(_named(a.sources, SOURCE_SETS), root=a.root,
                              context=a.context, train_sequences=a.train_sequences,
                              test_sequences=a.test_sequences, scramble_node=a.scramble_node,
                              scramble_fraction=a.scramble_fraction, seed=a.seed,
                              pretrain_sequences=a.pretrain_sequences,
                              pretrain_sources=_named(a.pretrain_sources, PRETRAIN_SETS))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_nodes(corpus, a.out)
    print(f"wrote {corpus.n} nodes x {len(corpus.nodes[0][0])} sequences of {a.context} "
          f"tokens and {len(corpus.test[0])} test sequences to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
