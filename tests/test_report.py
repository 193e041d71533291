"""Run reports: the page is self-contained, sections plug in by run kind, and a real browser
(headless Chromium) opens it without errors or network requests, every image decoding."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from dice_influence.cli import app
from dice_influence.report import Run, Section, Stat, Table, report_sections, write_report
from dice_influence.report.browser import check_report, find_browser
from dice_influence.report.cascade import cascade_figure, concentric_layout, hop_distances
from dice_influence.report.html import ReportError

runner = CliRunner()

TINY = {"topology": {"n": 4}, "model": {"hidden": [8]}, "data": {"samples_per_node": 40},
        "train": {"rounds": 3, "batch_size": 8, "eval_every": 1}}


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory) -> Path:
    """A small real run dir with two child runs (train + cascade), like `dice demo` writes."""
    from dice_influence.config import load_config
    from dice_influence.demo import cascade_stage

    root = tmp_path_factory.mktemp("report")
    cfg = root / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    r = runner.invoke(app, ["train", str(cfg), "--out", str(root / "train"), "-q"])
    assert r.exit_code == 0, r.output
    small = load_config({"data": {"samples_per_node": 30, "validation_samples": 60},
                         "topology": {"name": "ring", "n": 6}, "model": {"hidden": [8]},
                         "train": {"rounds": 6, "batch_size": 8, "dtype": "float64",
                                   "checkpoint_every": 2, "eval_every": 6}})
    cascade_stage(root / "cascade", cfg=small, event=(0, 2), hops=3)
    (root / "metrics.json").write_text(json.dumps(
        {"kind": "demo", "seconds": 1.0, "stages": [], "next": ["dice report <dir> & more"]}))
    write_report(root, "demo")
    return root


def _html(path: Path) -> str:
    return (path / "report.html").read_text()


def test_every_run_dir_has_a_self_contained_report(demo_like):
    for d in (demo_like, demo_like / "train", demo_like / "cascade"):
        html = _html(d)
        assert "positive = the data was harmful" in html.lower() or "Positive = the data" in html
        assert "<script" not in html and "<link" not in html
        srcs = re.findall(r'<img src="([^"]*)"', html)
        assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
        assert not re.findall(r'(?:src|href)="(?:https?:|//)', html)
        assert "@import" not in html and "url(" not in html
    top = _html(demo_like)
    assert top.count("<img") == _html(demo_like / "train").count("<img") + _html(
        demo_like / "cascade").count("<img")  # the top page embeds both children
    assert 'href="train/report.html"' in top and "&lt;dir&gt; &amp; more" in top


def test_report_opens_in_headless_chromium(demo_like):
    if find_browser() is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium; ./quickstart.sh test "
                    "installs it) - set $DICE_BROWSER to use another Chrome binary")
    shot = demo_like / "report-screenshot.png"
    res = check_report(demo_like / "report.html", shot)
    assert res.problems == [], res.problems
    assert len(res.images) == 2 and all(i["width"] > 100 and i["colours"] >= 2 for i in res.images)
    assert res.title == "dice demo"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_browser_check_catches_network_requests_and_blank_images(tmp_path):
    if find_browser() is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium)")
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "white").save(buf, format="PNG")
    blank = base64.b64encode(buf.getvalue()).decode()
    (tmp_path / "bad.html").write_text(
        f'<html><body><img src="data:image/png;base64,{blank}">'
        '<img src="http://127.0.0.1:9/x.png"><script>console.error("boom")</script></body></html>')
    res = check_report(tmp_path / "bad.html")
    text = "\n".join(res.problems)
    assert "blank (one colour)" in text
    assert "request to http://127.0.0.1:9/x.png" in text
    assert "console error: boom" in text


def test_sections_plug_in_by_kind_and_escape_outside_text(tmp_path):
    @report_sections("unit-test-kind")
    def _sections(run: Run) -> list[Section]:
        return [Section(title="Custom", text=run.metrics["note"],
                        stats=[Stat("answer", "42")],
                        tables=[Table(["a", "b"], [[1, "<b>x</b>"]])],
                        figures=[run.figure("missing.png", "dropped: no such file")])]

    (tmp_path / "metrics.json").write_text(json.dumps(
        {"kind": "unit-test-kind", "note": "<script>alert(1)</script>"}))
    html = write_report(tmp_path).read_text()
    assert "Custom" in html and "42" in html
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html
    # no provider: every scalar of metrics.json, in a generic table
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({"kind": "nobody", "a": {"b": 1.5}}))
    assert "a.b" in write_report(other).read_text()


def test_unclaimed_plots_still_appear(tmp_path):
    from dice_influence.report.cascade import plot_cascade

    (tmp_path / "metrics.json").write_text(json.dumps({"kind": "nobody"}))
    plot_cascade(np.eye(3), np.array([[1.0, 0, 0], [0.5, -0.2, 0]]), 0, tmp_path / "extra.png")
    html = write_report(tmp_path).read_text()
    assert "Other plots" in html and "extra.png" in html


def test_report_errors_name_the_path(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        write_report(tmp_path / "nope")
    with pytest.raises(ReportError, match="not a run directory"):
        write_report(tmp_path)
    r = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not found" in r.output


def test_report_command_rebuilds_a_report(demo_like):
    (demo_like / "train" / "report.html").unlink()
    r = runner.invoke(app, ["report", str(demo_like / "train")])
    assert r.exit_code == 0, r.output
    assert (demo_like / "train" / "report.html").is_file()


def test_cascade_layout_follows_hop_distance():
    n = 8
    W = np.zeros((n, n))
    for k in range(n):  # undirected ring
        W[k, k] = W[k, (k + 1) % n] = W[k, (k - 1) % n] = 1 / 3
    d = hop_distances(W, 2)
    assert d.tolist() == [2, 1, 0, 1, 2, 3, 4, 3]
    pos = concentric_layout(W, d)
    assert np.allclose(np.hypot(*pos.T), d)
    reach = np.zeros((3, n), dtype=bool)
    reach[0, 2] = reach[1, [1, 3]] = reach[2, [0, 4]] = True
    d2 = hop_distances(W, 2, reach)
    assert d2.tolist() == [2, 1, 0, 1, 2, -1, -1, -1]  # beyond the replayed hops: unreached
    V = np.zeros((3, n))
    V[0, 2], V[1, [1, 3]], V[2, :5] = -0.3, 0.1, 0.01
    fig = cascade_figure(W, V, 2, reach=reach, round=5)
    assert len(fig.axes) == 4  # three hops + the colour bar
    with pytest.raises(ValueError, match="per_node has 8 nodes"):
        cascade_figure(np.eye(3), V, 0)
