"""Render a run directory (and the run dirs inside it) to one self-contained HTML page."""

from __future__ import annotations

import base64
import datetime as _dt
import struct
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .._util import atomic_write_text
from .core import (
    REPORT_NAME,
    SCREENSHOT_NAME,
    SIGN_CONVENTION,
    Figure,
    Run,
    Section,
    child_runs,
    detect_kind,
    figure_paths,
    png_hotspots,
    read_json,
    sections_for,
)

SORT_SCRIPT = """
(function () {
  function key(td) {
    var s = td.textContent.trim().replace(/\u2212/g, '-').replace(/^[\u2248+]/, '');
    var v = parseFloat(s);
    return (isNaN(v) || !/^-?[0-9.]/.test(s)) ? null : v;
  }
  function sortBy(t, th, i) {
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    var heads = t.tHead.rows[0].cells;
    for (var h = 0; h < heads.length; h++) heads[h].setAttribute('aria-sort', 'none');
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (x, y) {
      var a = key(x.cells[i]), b = key(y.cells[i]), d;
      if (a !== null && b !== null) d = a - b;
      else if (a !== null) d = -1;
      else if (b !== null) d = 1;
      else d = x.cells[i].textContent.localeCompare(y.cells[i].textContent, undefined, {numeric: true});
      return asc ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll('table.sortable').forEach(function (t) {
    var heads = t.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, i) {
      th.tabIndex = 0;
      th.setAttribute('aria-sort', 'none');
      th.title = 'sort by this column (click again to reverse)';
      th.addEventListener('click', function () { sortBy(t, th, i); });
      th.addEventListener('keydown', function (e) {
        if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sortBy(t, th, i); }
      });
    });
  });
})();
"""
"""The page's one script: click (or Enter on) a column head to sort a table by it. Allowed by
the page's Content-Security-Policy through its SHA-256 hash, and nothing else is."""


def _csp_hash(script: str) -> str:
    import hashlib

    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()


MAX_DEPTH = 1
"""Run dirs nested deeper than this below the report's own dir are linked, not embedded."""

_TITLES = {
    "train": "Decentralized training",
    "alignment": "DICE-E vs DICE-GT alignment",
    "anomaly": "Malicious neighbours: detection and self-healing",
    "p2p": "Real peers (torch.distributed)",
    "demo": "dice demo",
    "cascade-demo": "One event's influence cascade",
}


class ReportError(ValueError):
    """A report cannot be written (the message names the path and the fix)."""


def write_report(run_dir: str | Path, kind: str | None = None, *, title: str | None = None,
                 children: bool = True) -> Path:
    """Write ``run_dir/report.html`` (and the report of every run dir inside it when
    ``children``) and return its path. ``kind`` overrides what the run dir records."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a directory" if run_dir.exists() else "not found"
        raise ReportError(f"run directory {str(run_dir)!r} {what}; pass a directory that a "
                          "dice command wrote (e.g. runs/demo)")
    kind = kind or detect_kind(run_dir)
    if kind is None:
        raise ReportError(f"{str(run_dir)!r} is not a run directory (no metrics.json, "
                          "summary.json or run dirs inside); pass a directory a dice command wrote")
    if children:
        for child in child_runs(run_dir):
            write_report(child, children=True)
    html = render_report(run_dir, kind, title=title)
    path = run_dir / REPORT_NAME
    atomic_write_text(path, html)
    return path


def render_report(run_dir: Path, kind: str, *, title: str | None = None) -> str:
    """The HTML text of the report of ``run_dir`` (Jinja2 template ``report.html.j2``)."""
    import jinja2
    from markupsafe import Markup

    from .. import __version__

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dice_influence.report", "templates"),
        autoescape=True, trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    blocks: list[dict[str, Any]] = []
    _collect(run_dir, run_dir, kind, 0, blocks)
    toc = ([{"id": b["id"], "label": b["title"]} for b in blocks] if len(blocks) > 1 else
           [{"id": s["id"], "label": s["title"]} for s in blocks[0]["sections"]])
    page = {
        "title": title or _block_title(run_dir, kind, 0),
        "path": str(run_dir),
        "written": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "version": __version__,
        "sign": SIGN_CONVENTION,
        "blocks": blocks,
        "toc": toc,
        "script": Markup(SORT_SCRIPT),
        "script_hash": _csp_hash(SORT_SCRIPT),
    }
    return env.get_template("report.html.j2").render(page=page)


def _block_title(path: Path, kind: str, depth: int) -> str:
    base = _TITLES.get(kind, kind.replace("-", " ").capitalize() + " run")
    return base if depth == 0 else f"{base} ({path.name}/)"


def _collect(root: Path, path: Path, kind: str, depth: int, blocks: list[dict[str, Any]]) -> None:
    metrics = read_json(path / "metrics.json")
    run = Run(path=path, kind=kind, metrics=metrics if isinstance(metrics, dict) else {})
    sections = sections_for(run)
    sections = [s for s in sections if s is not None]
    for s in sections:
        s.figures = [f for f in s.figures if f is not None]
    claimed = figure_paths(sections, path)
    others = [p for p in sorted(path.iterdir())
              if p.suffix.lower() in (".png", ".svg") and p.is_file()
              and not p.name.startswith((".", "report")) and p.resolve() not in claimed]
    if others:
        sections.append(Section(
            title="Other plots",
            figures=[Figure(caption="a plot of this run (its experiment gives no caption)", path=p)
                     for p in others]))
    bid = f"b{len(blocks)}"
    rel = "." if path == root else path.relative_to(root).as_posix()
    block = {
        "id": bid,
        "depth": depth,
        "title": _block_title(path, kind, depth),
        "kind": kind,
        "rel": str(path) if depth == 0 else rel + "/",
        "link": f"{quote(rel)}/{REPORT_NAME}" if depth and (path / REPORT_NAME).is_file() else "",
        "sections": [_render_section(s, f"{bid}s{i}") for i, s in enumerate(sections)],
        "config": run.config_text or "",
        "files": _files(path, root),
    }
    blocks.append(block)
    for child in child_runs(path):
        ck = detect_kind(child)
        if ck is None:
            continue
        if depth + 1 <= MAX_DEPTH:
            _collect(root, child, ck, depth + 1, blocks)


def _render_section(s: Section, sid: str) -> dict[str, Any]:
    figs = []
    for f in s.figures:
        src, (w, h), data = _data_uri(f)
        spots = f.hotspots if f.hotspots is not None else png_hotspots(data)
        figs.append({"src": src, "width": w, "height": h, "caption": f.caption,
                     "name": f.title or f.name, "alt": f.title or f.name or "plot",
                     "spots": spots if spots and w and h else []})
    return {
        "id": sid, "title": s.title, "text": s.text, "notes": s.notes,
        "highlights": s.highlights,
        "stats": [{"label": st.label, "value": st.value, "note": st.note} for st in s.stats],
        "tables": [{"columns": t.columns, "rows": [[str(v) for v in r] for r in t.rows],
                    "caption": t.caption, "sortable": len(t.rows) > 2} for t in s.tables],
        "figures": figs,
    }


def _data_uri(f: Figure) -> tuple[str, tuple[int | str, int | str], bytes]:
    """``data:`` URI of a figure, its pixel size (read from the PNG header) and its bytes."""
    if f.png is not None:
        data, mime = f.png, "image/png"
    elif f.path is not None:
        data = f.path.read_bytes()
        mime = "image/svg+xml" if f.path.suffix.lower() == ".svg" else "image/png"
    else:
        raise ReportError(f"figure {f.title!r} has neither a path nor PNG bytes")
    size: tuple[int | str, int | str] = ("", "")
    if mime == "image/png" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        size = struct.unpack(">II", data[16:24])
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", size, data


def _files(path: Path, root: Path) -> list[dict[str, str]]:
    out = []
    for p in sorted(path.iterdir()):
        if p.name.startswith(".") or p.name in (REPORT_NAME, SCREENSHOT_NAME):
            continue
        rel = quote(p.relative_to(root).as_posix())
        if p.is_dir():
            sub = p / REPORT_NAME
            out.append({"name": p.name + "/", "href": (rel + "/" + REPORT_NAME) if sub.is_file()
                        else rel + "/", "size": "report" if sub.is_file() else "folder"})
        else:
            out.append({"name": p.name, "href": rel, "size": _size(p.stat().st_size)})
    return out


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return ""
