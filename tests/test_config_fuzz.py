"""Issue 21: hostile config files (UTF-16, invalid UTF-8, deep nesting, alias bombs, huge
integers, duplicate keys, non-finite numbers) each give one clear ConfigError in bounded time
and memory; 300 seeded mutations of the shipped configs never give anything else."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dice_influence.cli import app
from dice_influence.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join([*lines, "experiment: {x: *i}"]) + "\n"


HOSTILE = {
    "utf16": ("seed: 1\n".encode("utf-16"), "UTF-16"),
    "latin1": (b"seed: 1\ntrain: {lr: 0.1}\n# caf\xe9\n", "not UTF-8"),
    "deep-lists": (("a: " + "[" * 600 + "]" * 600 + "\n").encode(), "nested more than"),
    "deep-maps": ("".join("  " * i + f"k{i}:\n" for i in range(500)).encode() + b"x\n",
                  "nested more than"),
    "alias-bomb": (_bomb().encode(), "expands to"),
    "many-aliases": (("a: &a 1\nexperiment: {x: [" + ",".join(["*a"] * 500) + "]}\n").encode(),
                     "aliases"),
    "bigint": (("seed: " + "9" * 5000 + "\n").encode(), "5000 digits"),
    "duplicate-section": (b"train:\n  lr: 0.1\ntopology:\n  n: 4\ntrain:\n  rounds: 3\n",
                          "duplicate key 'train'"),
    "nan-policy": (b"policy: {kind: prune, margin: .nan}\n", "policy.margin"),
    "inf-experiment": (b"experiment: {distributed: {timeout_s: .inf}}\n",
                       "experiment.distributed.timeout_s"),
    "seed-true": (b"seed: true\n", "seed"),
    "python-tag": (b"seed: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "huge-file": (b"# " + b"x" * (2 << 20) + b"\n", "bytes"),
}


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) if one case runs away; not a timing assertion."""
    def boom(*_):
        raise AssertionError("config loading did not finish")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_config_is_one_clear_error(tmp_path, name, no_hang):
    data, words = HOSTILE[name]
    p = tmp_path / f"{name}.yaml"
    p.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert words in msg, msg
    assert len(msg) < 600, msg  # the input is never echoed whole
    r = CliRunner().invoke(app, ["config", str(p)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.output.startswith("error:")


def test_merge_keys_still_work(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("experiment:\n  base: &b {x: 1}\n  other:\n    <<: *b\n    y: 2\n")
    assert load_config(p).experiment["other"] == {"x": 1, "y": 2}


TOKENS = [".nan", ".inf", "-.inf", "1e400", "1.0e400", "9" * 5000, "true", "null", "[]", "{}",
          "~", "&x", "*x", "*undefined", "'unterminated", "\t", "0x" + "f" * 60, "-1", "1e300",
          "!!python/name:os.system", "{a: 1, a: 2}", "[" * 80, "<<: *x", "? [1]\n: 2", "%",
          "\x00", "\ufeff", "é", "2**40", "1_000_000", "0o777", "-0", "'\\\\'", "|\n  x"]


def _mutate(rng: random.Random, text: str) -> bytes:
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        i = rng.randrange(len(lines)) if lines else 0
        if op == 0 and lines:  # replace a value with a hostile token
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {rng.choice(TOKENS)}"
        elif op == 1 and lines:  # duplicate a line (duplicate keys)
            lines.insert(rng.randrange(len(lines) + 1), lines[i])
        elif op == 2 and lines:  # delete a span
            del lines[i:i + rng.randint(1, 3)]
        elif op == 3:  # insert a token line
            lines.insert(i, rng.choice(TOKENS))
        elif op == 4 and lines:  # break the indentation
            lines[i] = " " * rng.randint(0, 5) + lines[i].lstrip()
        elif op == 5 and lines:  # random characters inside a line
            s = lines[i]
            j = rng.randrange(len(s) + 1)
            lines[i] = s[:j] + "".join(chr(rng.randrange(1, 0x250)) for _ in range(3)) + s[j:]
        elif op == 6:  # deep nesting under an experiment key
            d = rng.randint(40, 700)
            lines.append("experiment: " + "[" * d + "1" + "]" * d)
        else:  # swap two lines
            j = rng.randrange(len(lines)) if lines else 0
            if lines:
                lines[i], lines[j] = lines[j], lines[i]
    out = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    r = rng.random()
    if r < 0.05:
        return ("\n".join(lines)).encode("utf-16")
    if r < 0.10:
        k = rng.randrange(len(out) + 1)
        return out[:k] + bytes([rng.randrange(0x80, 0x100)]) + out[k:]
    return out


def test_300_fuzzed_configs_load_or_fail_with_one_clear_error(tmp_path, no_hang):
    rng = random.Random(21)
    outcomes = {"ok": 0, "error": 0}
    for case in range(300):
        src = CONFIGS[case % len(CONFIGS)]
        data = _mutate(rng, src.read_text())
        p = tmp_path / f"fuzz-{case}.yaml"
        p.write_bytes(data)
        try:
            cfg = load_config(p)
        except ConfigError as exc:
            msg = str(exc)
            assert msg and len(msg) < 4000 and max(map(len, msg.splitlines())) < 600, (case, msg)
            outcomes["error"] += 1
        except Exception as exc:  # anything else is a bug: name the case
            raise AssertionError(f"case {case} ({src.name}): {type(exc).__name__}: "
                                 f"{str(exc)[:300]}\n{data[:400]!r}") from exc
        else:
            assert isinstance(cfg, RunConfig)
            load_config(cfg.model_dump(mode="json"))  # what loads, dumps and reloads
            outcomes["ok"] += 1
    assert outcomes["ok"] > 10 and outcomes["error"] > 100, outcomes  # both sides exercised
