"""Every Python block of docs/own-model.md runs, in order, in one namespace (from a folder
that holds the repository's examples/, as the page says: "from the repository root")."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own-model.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_first_snippet_is_short():
    first = [ln for ln in blocks()[0].splitlines() if ln.strip()]
    assert len(first) < 25  # from tensors to a cascade and a report in under 25 lines


def test_every_snippet_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "own_model_docs"}
    code = blocks()
    assert len(code) >= 4
    for i, src in enumerate(code):
        exec(compile(src, f"{DOC.name}[block {i}]", "exec"), ns)  # noqa: S102
    assert (tmp_path / "runs/own-model/report.html").is_file()
    assert (tmp_path / "runs/own-model-cascade.png").stat().st_size > 1000
    assert "Sequential" in (tmp_path / "runs/own-model/README.md").read_text()
    assert ns["traj3"].rounds_done == 10
    gt = ns["gt"].per_node[0, 1:].sum(1)
    est = ns["est"].per_node[0, 1:].sum(1)
    assert float(abs(gt).max()) > 0 and float(abs(gt - est).max()) < 0.2 * float(abs(gt).max())
