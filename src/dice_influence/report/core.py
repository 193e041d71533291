"""Run reports: what a section is, which code provides it, and how a run dir becomes a page.

A run directory records its kind in ``metrics.json`` (``{"kind": "alignment", ...}``). The
report of a run is the page of its sections; a section provider is a function
``fn(run: Run) -> list[Section]`` registered for a kind with :func:`report_sections`. The
provider of kind ``K`` is looked up in :data:`PROVIDERS` and otherwise in the module
``dice_influence.experiments.K``, imported only when a report of that kind is built, so an
experiment adds its report by decorating one function in its own module.

Sign convention everywhere: influence = loss with the data − loss without it; positive = harmful.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIGN_CONVENTION = (
    "influence = test loss with the data − test loss without it. Positive = the data was "
    "harmful (removing it lowers the loss); negative = helpful."
)

REPORT_NAME = "report.html"
SCREENSHOT_NAME = "report-screenshot.png"

PROVIDERS: dict[str, str] = {
    "train": "dice_influence.report.builtin",
    "alignment": "dice_influence.report.builtin",
    "p2p": "dice_influence.report.builtin",
    "demo": "dice_influence.report.builtin",
    "cascade-demo": "dice_influence.report.builtin",
    "anomaly": "dice_influence.experiments.anomaly_report",
}
"""Module that provides the sections of a kind, where it is not ``dice_influence.experiments.<kind>``."""

_REGISTRY: dict[str, Callable[[Run], list[Section]]] = {}


@dataclass
class Stat:
    """One headline number: ``label``, the formatted ``value`` and an optional short ``note``."""

    label: str
    value: str
    note: str = ""


@dataclass
class Table:
    """A small table; cells are shown as given (format numbers before)."""

    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Figure:
    """A plot: a PNG/SVG file of the run (``path``) or PNG bytes made for the page (``png``),
    with a "what this shows" ``caption``."""

    caption: str
    path: Path | None = None
    png: bytes | None = None
    title: str = ""
    hotspots: list[dict[str, Any]] | None = None
    """Hover targets: ``{"x", "y", "r", "label"}`` in image pixels (origin top left); when None,
    read from the PNG's ``dice:hotspots`` text chunk if it has one (see :func:`png_hotspots`)."""

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else self.title


@dataclass
class Section:
    """One block of a report: a title, a sentence or two, headline numbers, tables, figures."""

    title: str
    text: str = ""
    stats: list[Stat] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    claims: list[str] = field(default_factory=list)
    """Plot files of the run this section stands in for (not repeated under "Other plots")."""
    highlights: list[str] = field(default_factory=list)
    """How to read the section (e.g. which number to trust), shown in a box above its tables."""


@dataclass
class Run:
    """A run directory as the section providers see it."""

    path: Path
    kind: str
    metrics: dict[str, Any]

    def file(self, name: str) -> Path | None:
        """``path / name`` when that file exists, else None."""
        p = self.path / name
        return p if p.is_file() else None

    def json(self, name: str) -> Any:
        """Parsed JSON file of the run, or None when missing or unreadable."""
        return read_json(self.path / name)

    def csv(self, name: str) -> list[dict[str, str]]:
        """Rows of a CSV file of the run ([] when missing)."""
        p = self.file(name)
        if p is None:
            return []
        with p.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def figure(self, name: str, caption: str, title: str = "") -> Figure | None:
        """A :class:`Figure` for the plot file ``name`` of the run, or None when it is missing
        (sections drop missing figures, so a provider need not check)."""
        p = self.file(name)
        return None if p is None else Figure(caption=caption, path=p, title=title)

    @property
    def config_text(self) -> str | None:
        p = self.file("config.yaml")
        return p.read_text() if p is not None else None


def report_sections(kind: str) -> Callable[[Callable[[Run], list[Section]]],
                                           Callable[[Run], list[Section]]]:
    """Decorator: register ``fn(run) -> list[Section]`` as the report of runs of ``kind``."""

    def deco(fn: Callable[[Run], list[Section]]) -> Callable[[Run], list[Section]]:
        _REGISTRY[kind] = fn
        return fn

    return deco


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def detect_kind(path: str | Path) -> str | None:
    """The kind a run dir records (``metrics.json["kind"]``), else a guess from its files (for
    run dirs written before kinds were recorded); None when ``path`` is no run dir."""
    path = Path(path)
    m = read_json(path / "metrics.json")
    if isinstance(m, dict) and isinstance(m.get("kind"), str):
        return m["kind"]
    if isinstance(m, dict):
        if "peer" in m and "status" in m:
            return "p2p-peer"  # one peer of a `dice launch` run: part of its parent's report
        if "results" in m and "setting" in m:
            return "alignment"
        if "defense" in m:
            return "anomaly"
        if (path / "trajectory.json").is_file() or "per_node" in m:
            return "train"
    if (path / "summary.json").is_file() and (path / "peer-0").is_dir():
        return "p2p"
    if isinstance(m, dict):
        return "run"
    return None


def child_runs(path: Path) -> list[Path]:
    """Sub-directories of ``path`` that are run dirs themselves, in the order they were
    written (the modification time of their ``metrics.json``), then by name."""
    if not path.is_dir():
        return []
    runs = [p for p in path.iterdir()
            if p.is_dir() and not p.name.startswith(".")
            and detect_kind(p) not in (None, "run", "p2p-peer")]

    def written(p: Path) -> tuple[float, str]:
        m = p / "metrics.json"
        return (m.stat().st_mtime if m.is_file() else float("inf"), p.name)

    return sorted(runs, key=written)


def sections_for(run: Run) -> list[Section]:
    """Sections of ``run`` from its kind's provider (a generic metrics section if none)."""
    fn = _REGISTRY.get(run.kind)
    if fn is None:
        module = PROVIDERS.get(run.kind, f"dice_influence.experiments.{run.kind}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise
        fn = _REGISTRY.get(run.kind)
    if fn is None:
        return [generic_section(run)]
    return list(fn(run))


def generic_section(run: Run) -> Section:
    """Every scalar of ``metrics.json`` as a table (for kinds without a provider)."""
    rows = [[k, fmt(v)] for k, v in flatten(run.metrics).items()][:200]
    return Section(title="Metrics", text=f"Scalars of metrics.json (run kind {run.kind!r}).",
                   tables=[Table(["key", "value"], rows)] if rows else [])


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{"a.b": scalar}`` (lists of scalars kept when short)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list):
        if len(d) <= 16 and all(not isinstance(v, dict | list) for v in d):
            out[prefix[:-1]] = ", ".join(fmt(v) for v in d)
    else:
        out[prefix[:-1]] = d
    return out


def fmt(v: Any, digits: int = 4) -> str:
    """A value as a person reads it: booleans yes/no, None as a dash, whole numbers without
    decimals (``24.0`` → ``24``), other floats with ``digits`` decimals (scientific below
    ``10**-(digits-1)`` and from 1e6), never rounded onto a whole number they are not
    (``0.99998`` → ``0.99998``, not ``1.0000``; closer still: ``≈1``)."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v.is_integer() and abs(v) < 1e6:
            return str(int(v))
        if digits <= 0:
            return f"{v:.0f}"
        if abs(v) < 10 ** -(digits - 1) or abs(v) >= 1e6:
            return f"{v:.{digits - 1}e}"
        text = f"{v:.{digits}f}"
        if abs(v) < 1.5:  # a fraction or correlation: 0.99998 is not 1, 1e-5 is not 0
            for d in range(digits + 1, digits + 4):
                if not float(text).is_integer():
                    return text
                text = f"{v:.{d}f}"
            return text if not float(text).is_integer() else f"≈{round(v)}"
        return text
    return str(v)


def figure_paths(sections: Sequence[Section], root: Path | None = None) -> set[Path]:
    """The plot files the sections show or stand in for (resolved)."""
    out = {f.path.resolve() for s in sections for f in s.figures if f.path is not None}
    if root is not None:
        out |= {(root / name).resolve() for s in sections for name in s.claims}
    return out


HOTSPOTS_KEY = "dice:hotspots"
"""PNG text chunk holding a figure's hover targets (JSON list of ``{x, y, r, label}``)."""


def hotspots_of(fig: Any, points: Any, labels: Sequence[str], ax: Any,
                radius_pt: float = 7.0) -> list[dict[str, Any]]:
    """Hover targets for data points ``points`` ((m, 2)) of axes ``ax`` in matplotlib figure
    ``fig``, in pixels of the PNG that ``fig.savefig`` writes (no ``bbox_inches``)."""
    import numpy as np

    fig.draw_without_rendering()  # applies layout and equal aspect, as savefig will
    xy = ax.transData.transform(np.asarray(points, dtype=float))
    h = fig.get_figheight() * fig.dpi
    r = radius_pt * fig.dpi / 72
    return [{"x": round(float(x), 1), "y": round(float(h - y), 1), "r": round(r, 1),
             "label": str(lab)} for (x, y), lab in zip(xy, labels, strict=True)]


def png_hotspots(data: bytes) -> list[dict[str, Any]] | None:
    """The hover targets stored in a PNG's ``dice:hotspots`` text chunk (None if absent)."""
    import struct
    import zlib

    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    pos = 8
    while pos + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            key, _, rest = body.partition(b"\0")
            if key.decode("latin-1") != HOTSPOTS_KEY:
                continue
            try:
                if kind == b"zTXt":
                    text = zlib.decompress(rest[1:]).decode("latin-1")
                elif kind == b"iTXt":
                    comp, rest = rest[0], rest[2:]
                    rest = rest.split(b"\0", 2)[2]
                    text = (zlib.decompress(rest) if comp else rest).decode("utf-8")
                else:
                    text = rest.decode("latin-1")
                spots = json.loads(text)
            except (ValueError, zlib.error, IndexError):
                return None
            return spots if isinstance(spots, list) else None
    return None
