"""Run reports: one self-contained HTML page per run directory (``dice report RUN_DIR``).

An experiment adds its part of the page by registering a section provider for its run kind::

    from ..report import Run, Section, Stat, report_sections

    @report_sections("contribution")
    def _report(run: Run) -> list[Section]:
        m = run.metrics                      # metrics.json of the run dir
        return [Section(title="Contributions", text="...",
                        stats=[Stat("Spearman vs leave-one-out", f"{m['spearman']:.3f}")],
                        figures=[run.figure("contrib.png", "what this plot shows")])]

and by writing ``"kind": "contribution"`` into its ``metrics.json`` and calling
``write_report(out)`` at the end of its run. Importing this package is cheap (Jinja2,
matplotlib and the browser check load on use).

Sign convention: influence = loss with the data − loss without it; positive = harmful.
"""

from __future__ import annotations

from typing import Any

from .core import (
    PROVIDERS,
    REPORT_NAME,
    SCREENSHOT_NAME,
    SIGN_CONVENTION,
    Figure,
    Run,
    Section,
    Stat,
    Table,
    detect_kind,
    fmt,
    report_sections,
)

__all__ = [
    "PROVIDERS",
    "REPORT_NAME",
    "SCREENSHOT_NAME",
    "SIGN_CONVENTION",
    "Figure",
    "Run",
    "Section",
    "Stat",
    "Table",
    "cascade_figure",
    "detect_kind",
    "fmt",
    "plot_cascade",
    "report_sections",
    "write_report",
]


def write_report(run_dir: Any, kind: str | None = None, **kw: Any) -> Any:
    """Write ``run_dir/report.html``; see :func:`dice_influence.report.html.write_report`."""
    from .html import write_report as _write

    return _write(run_dir, kind, **kw)


def plot_cascade(*args: Any, **kw: Any) -> Any:
    """Draw one event's cascade; see :func:`dice_influence.report.cascade.plot_cascade`."""
    from .cascade import plot_cascade as _plot

    return _plot(*args, **kw)


def cascade_figure(*args: Any, **kw: Any) -> Any:
    """Matplotlib figure of one event's cascade; see :mod:`dice_influence.report.cascade`."""
    from .cascade import cascade_figure as _fig

    return _fig(*args, **kw)
