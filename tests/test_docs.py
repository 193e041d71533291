"""The docs stand alone: nothing cites a file outside the repository, and every citation of the
method (``docs/method.md §N``) names a section that docs/method.md has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# spelled in pieces, so that this file does not match itself
OUTSIDE = ("../" + "shared", "SPEC" + ".md")


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "src", "docs", "tests", "configs", "README.md"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / p for p in out.split()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        files = [p for d in ("src", "docs", "tests", "configs") for p in (ROOT / d).rglob("*")]
        files.append(ROOT / "README.md")
    return [p for p in files if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".yml",
                                                             ".j2", ".txt", ".toml", ".cfg")]


def test_no_file_cites_outside_the_repository():
    files = _tracked()
    assert len(files) > 20 and ROOT / "docs" / "method.md" in files
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
           if any(s in line for s in OUTSIDE)]
    assert not bad, "cite docs/method.md §N instead:\n" + "\n".join(bad)


def test_method_citations_name_existing_sections():
    text = (ROOT / "docs" / "method.md").read_text()
    have = {int(m) for m in re.findall(r"^## (\d+)\. ", text, re.M)}
    assert {1, 2, 3, 4, 5, 6} <= have
    for needed in ("Sign: influence = test loss with the data − test loss without it",
                   "### Read-outs and propagation", "### Known error sources",
                   "### The adjoint form", "### Whole-run attribution",
                   "### The sweep on real peers", "Which leave-one-node-out"):
        assert needed in text, needed
    cited = re.compile(r"method\.md\)? §(\d+)(?:[–-](\d+))?")
    bad = []
    for p in _tracked():
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for m in cited.finditer(line):
                secs = range(int(m[1]), int(m[2] or m[1]) + 1)
                if not set(secs) <= have:
                    bad.append(f"{p.relative_to(ROOT)}:{i}: §{m[1]}")
    assert not bad, bad


def test_every_config_key_has_a_description_and_dice_config_prints_it():
    import yaml
    from typer.testing import CliRunner

    from dice_influence.cli import app
    from dice_influence.config import RunConfig
    from dice_influence.config_doc import fields, missing, plugin_fields

    assert missing() == []
    assert {"train.lr", "data.corruptions.fraction", "data.groups.count"} <= set(fields(RunConfig))
    assert "policy:prune.rule" in plugin_fields()
    r = CliRunner().invoke(app, ["config"])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.output)["train"]["lr"] == 0.1  # comments keep it valid YAML
    lines = r.output.splitlines()
    keys = [i for i, ln in enumerate(lines) if re.match(r"^ *[a-z_]+:", ln)]
    assert len(keys) > 40
    for i in keys:  # every key of the config has its description right above it
        assert lines[i - 1].lstrip().startswith("#"), lines[i]
    assert max(len(ln) for ln in lines) <= 100
    # plug-in descriptions are whole, not cut after their first line
    text = " ".join(ln.lstrip("# ") for ln in lines if ln.startswith("#"))
    assert "reciprocity and free-rider statistics" in text
    assert "removes them from W^t" in text
