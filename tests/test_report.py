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
        assert "<link" not in html and "<iframe" not in html
        _one_hashed_script(html)
        srcs = re.findall(r'<img src="([^"]*)"', html)
        assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
        assert not re.findall(r'(?:src|href)="(?:https?:|//)', html)
        assert "@import" not in html and "url(" not in html
    top = _html(demo_like)
    assert top.count("<img") == _html(demo_like / "train").count("<img") + _html(
        demo_like / "cascade").count("<img")  # the top page embeds both children
    assert 'href="train/report.html"' in top and "&lt;dir&gt; &amp; more" in top


def _one_hashed_script(html: str) -> None:
    """The page's only script is inline, and the CSP allows exactly it (by its hash)."""
    import base64
    import hashlib

    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert len(scripts) == 1 and scripts[0][0] == ""  # no src=, no second script
    digest = base64.b64encode(hashlib.sha256(scripts[0][1].encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html)[1]
    assert "default-src 'none'" in csp and f"script-src 'sha256-{digest}'" in csp
    assert "unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
    assert "<div onclick" not in html and " onclick=" not in html  # inline handlers: blocked


def _need_browser() -> None:
    if find_browser() is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium; ./quickstart.sh test "
                    "installs it) - set $DICE_BROWSER to use another Chrome binary")


SORT_PROBE = r"""
(() => {
  const t = [...document.querySelectorAll('table.sortable')].find(
      x => x.tHead.rows[0].cells[0].textContent === 'node');
  const col = () => [...t.tBodies[0].rows].map(r => r.cells[1].textContent);
  const before = col();
  t.tHead.rows[0].cells[1].click();
  const up = col();
  t.tHead.rows[0].cells[1].click();
  const down = col();
  const hot = [...document.querySelectorAll('svg.hot circle title')].map(x => x.textContent);
  return {before, up, down, hot, sortable: document.querySelectorAll('table.sortable').length,
          width: document.documentElement.scrollWidth};
})()
"""


def test_report_opens_in_headless_chromium(demo_like):
    _need_browser()
    shot = demo_like / "report-screenshot.png"
    res = check_report(demo_like / "report.html", shot, probe=SORT_PROBE)
    assert res.problems == [], res.problems
    assert len(res.images) == 2 and all(i["width"] > 100 and i["colours"] >= 2 for i in res.images)
    assert res.title == "dice demo"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    p = res.probe  # the script ran under the page's CSP: a click on a table head sorts it
    num = [float(x) for x in p["before"]]
    assert [float(x) for x in p["up"]] == sorted(num)
    assert [float(x) for x in p["down"]] == sorted(num, reverse=True)
    # hover: every node of every cascade panel (ring of 6, hops 0..3) has a tooltip
    assert len(p["hot"]) == 6 * 4 and any("node 0, hop 0" in h and "source" in h
                                          for h in p["hot"])
    assert sum("not reached yet" in h for h in p["hot"]) == 5 + 3 + 1  # hops 0, 1, 2
    assert p["width"] <= 1280


def test_report_reflows_at_phone_width(demo_like, tmp_path):
    _need_browser()
    shot = tmp_path / "phone.png"
    res = check_report(demo_like / "report.html", shot, width=390, probe=r"""
(() => ({width: document.documentElement.scrollWidth,
         wide: [...document.querySelectorAll('figure, .tablewrap, .stats, pre')]
                 .filter(e => e.getBoundingClientRect().right > 391).length,
         imgs: [...document.images].map(i => i.getBoundingClientRect().width)}))()""")
    assert res.problems == [], res.problems
    assert res.probe["width"] <= 390, res.probe  # no sideways scrolling of the page
    assert res.probe["wide"] == 0 and max(res.probe["imgs"]) <= 390


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


def test_ring_is_drawn_as_a_ring_and_every_panel_has_its_own_scale():
    from matplotlib import colormaps

    from dice_influence.report.cascade import CMAP, cascade_layout, cycle_order

    W = np.zeros((8, 8))
    for k in range(8):
        W[k, k] = W[k, (k + 1) % 8] = W[k, (k - 1) % 8] = 1 / 3
    assert cycle_order(W) in ([0, 1, 2, 3, 4, 5, 6, 7], [0, 7, 6, 5, 4, 3, 2, 1])
    pos = cascade_layout(W, hop_distances(W, 2), 2)
    assert np.allclose(np.hypot(*pos.T), 1.0) and np.allclose(pos[2], [0, 1])  # source on top
    assert np.ptp(pos[:, 0]) > 1.9 and np.ptp(pos[:, 1]) > 1.9  # a circle, not a line
    assert len({(round(x, 6), round(y, 6)) for x, y in pos}) == 8
    assert cycle_order(np.ones((5, 5))) is None  # complete graph: concentric
    with pytest.raises(ValueError, match="one cycle"):
        cascade_layout(np.ones((5, 5)), np.zeros(5, int), 0, "ring")
    # influence that thins out 10x per hop: each panel still spans the full colour range
    V = np.zeros((4, 8))
    for s in range(4):
        for k in range(8):
            d = min(abs(k - 2), 8 - abs(k - 2))
            if d <= s:
                V[s, k] = -(10.0 ** -s) * (1 + k / 8)
    fig = cascade_figure(W, V, 2)
    cmap = colormaps[CMAP]
    for s in range(4):
        faces = fig.axes[s].collections
        colours = np.vstack([c.get_facecolors() for c in faces])
        assert np.isclose(colours, cmap(0.0), atol=1e-6).all(1).any(), s  # darkest blue reached
    assert "colours ±1.9e-03" in fig.axes[3].get_title()  # 1e-3 × (1 + 7/8)
    assert len(fig.dice_hotspots) == 8 * 4


def _text_px(fig, shown_px: float = 1030.0) -> float:
    """Smallest text height in CSS pixels when the figure is shown at most ``shown_px`` wide
    (the report's column at a 1280-px window)."""
    fig.draw_without_rendering()
    scale = min(1.0, shown_px / (fig.get_figwidth() * fig.dpi))
    sizes = [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_text"))
             if t.get_visible() and t.get_text().strip()]
    return min(sizes) * fig.dpi / 72 * scale


def test_figure_text_is_readable_at_1280():
    W = np.zeros((16, 16))
    for k in range(16):
        for m in (0, 1, 2, 4, 8):
            W[k, (k + m) % 16] = 1 / 5
    V = np.random.default_rng(0).normal(size=(5, 16))
    assert _text_px(cascade_figure(W, V, 0, title="t", round=3)) >= 10


def test_hover_targets_travel_inside_the_png(tmp_path):
    from PIL import Image

    from dice_influence.report.cascade import plot_cascade
    from dice_influence.report.core import png_hotspots

    W = np.full((4, 4), 0.25)
    V = np.arange(8.0).reshape(2, 4) - 3
    path = plot_cascade(W, V, 1, tmp_path / "c.png")
    spots = png_hotspots(path.read_bytes())
    w, h = Image.open(path).size
    assert len(spots) == 8 and all(0 < p["x"] < w and 0 < p["y"] < h for p in spots)
    assert spots[4]["label"].startswith("node 0, hop 1: +1.000e+00")
    assert png_hotspots(b"not a png") is None


def test_fade_sentence_says_what_fades_from_the_numbers():
    from dice_influence.report.cascade import fade_sentence

    text = fade_sentence([-0.037, -0.046, -0.044, -0.045, -0.043],
                         [0.037, 0.010, 0.0054, 0.0044, 0.0036], [1, 5, 11, 15, 16])
    assert "sum over all nodes does not fade" in text
    assert "single node fades" in text and "10% of its first value" in text
    assert "from 1 node to 16" in text
    assert "fades from" in fade_sentence([1.0, 0.1], [1.0, 0.1])
    assert "grows" in fade_sentence([0.1, 1.0], [0.1, 1.0])


def test_training_caption_claims_consensus_only_when_curves_agree():
    from dice_influence.report.builtin import training_caption

    hist = {"round": [0, 10, 20, 30],
            "acc": np.array([[0.1] * 3, [0.4, 0.5, 0.6], [0.58, 0.7, 0.84], [0.58, 0.7, 0.84]])}
    text = training_caption(hist)
    assert "do not agree" in text and "0.58–0.84" in text and "consensus" in text
    hist["acc"][3] = [0.90, 0.91, 0.92]
    text = training_caption(hist)
    assert "At the end the nodes agree" in text and "widest spread was 0.58–0.84" in text


def test_numbers_read_as_numbers():
    from dice_influence.report import fmt

    assert [fmt(24.0), fmt(242.0, 3), fmt(0.0), fmt(1.0)] == ["24", "242", "0", "1"]
    assert fmt(0.99998) == "0.99998" and fmt(0.99998, 3) == "0.99998"  # not 1.0000 / 1.000
    assert fmt(0.9998) == "0.9998" and fmt(0.12345, 3) == "0.123" and fmt(None) == "–"
    assert fmt(1 - 1e-12) == "≈1" and fmt(3e-5) == "3.000e-05" and fmt(float("inf")) == "∞"


def test_alignment_page_says_which_read_out_to_trust():
    from dice_influence.experiments.alignment import readout_guide

    def rec(ro, p, sp, rel):
        return {"hops": 2, "readout": ro, "curvature": True, "propagation": "factual",
                "pearson": p, "spearman": sp, "median_rel_error": rel}

    m = {"setting": {"unit": "batch", "lr": 0.1},
         "results": [rec("linear", 0.956, 0.83, 0.09), rec("factual", 0.740, 0.958, 0.16),
                     rec("midpoint", 0.9998, 0.998, 0.003)]}
    text = "\n".join(readout_guide(m))
    assert "Trust `midpoint` for the values: Pearson 0.9998" in text
    assert "`factual`" in text and "ranks the events better than it measures them" in text
    assert "whole batch at lr 0.1" in text and "docs/method.md §4" in text


def test_alignment_report_cards_match_the_table_and_name_the_timing(tmp_path):
    def rec(h, ro, p, sp):
        return {"hops": h, "readout": ro, "curvature": True, "propagation": "factual",
                "pearson": p, "spearman": sp, "kendall": sp, "sign_agreement": 1.0,
                "median_rel_error": 0.01, "gt_s_per_event": 0.25, "e_s_per_event": 0.125}

    res = [rec(1, "factual", 0.6929, 0.9278), rec(1, "midpoint", 0.99984, 0.99999)]
    m = {"kind": "alignment", "setting": {"events": 20, "unit": "batch", "lr": 0.1},
         "results": res, "seconds": {"total": 3.0}}
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    html = write_report(tmp_path).read_text()
    cards = re.findall(r'<div class="v">([^<]*)</div><div class="l">1-hop Pearson', html)
    assert cards == ["0.9998"] and "<td>0.9998</td>" in html  # same digits, not 1.000
    assert ">1.000<" not in html and "<td>0.99999</td>" in html
    assert "Which read-out to trust" in html and "Trust midpoint for the values" in html
    assert "DICE-GT (exact replay)</td><td>0.2500" in html
    assert "divided by 20" in html and "whatever its hops" in html
