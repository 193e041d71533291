"""One rule for every command that writes a folder: never mix two runs' files, never let two
writers share one folder.

Each output folder a ``dice`` command writes (``train``, ``launch``, ``demo``, every
``experiment``, ``report``) is claimed with :func:`claim_folder` before anything is computed:

- an exclusive lock (``fcntl.flock`` on ``.dice-lock`` in the folder) is taken for the whole
  command, so a second writer fails at once with one line instead of silently replacing files;
- the folder's marker (``.dice-folder.json``: the command kind and the run identity, see
  :mod:`dice_influence.manifest`) is compared with what is about to run. Another kind's files,
  another run's files, or files that no dice command wrote are refused with one line naming the
  fix; ``--overwrite`` replaces the folder as a whole (everything in it is removed first, so old
  and new files never mix); ``--resume`` (``train``, ``launch``) keeps it for the same run;
- at the end :func:`commit_folder` writes ``manifest.json`` over every file of the folder
  (``report.html`` included), with the hashes of the bytes this process wrote.

The user's own config files in the folder (any top-level ``*.yaml`` but ``config.yaml``, e.g.
``dice train run/c.yaml -o run``) are left alone: never refused, removed or committed.
Folders written before markers existed are recognised by their files (``metrics.json``'s
``kind``, ``manifest.json``, ``trajectory.json``, ``summary.json`` + ``peer-0/``).
``dice bench`` writes one JSON file, claimed with :func:`claim_file` by the same rules.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ._util import write_json, written_digest
from .manifest import (
    MANIFEST,
    MANIFEST_FORMAT,
    RunDirError,
    RunIdentity,
    file_digest,
    remove_manifest,
    write_manifest,
)

LOCK = ".dice-lock"
MARKER = ".dice-folder.json"
FOLDER_FORMAT = "dice-influence.folder/1"
IGNORED = (LOCK, MARKER, ".DS_Store", ".gitkeep")
NOT_COMMITTED_DIRS = ("progress", "checkpoints")  # resume state, rewritten as a run goes on
COMMANDS = {
    "train": "dice train", "launch": "dice launch", "demo": "dice demo",
    "alignment": "dice experiment alignment", "anomaly": "dice experiment anomaly",
    "selection": "dice experiment selection", "aggregation": "dice experiment aggregation",
    "cascade": "dice experiment cascade", "contribution": "dice experiment contribution",
}
LEGACY_KINDS = {"p2p": "launch"}  # metrics.json / report kinds that differ from the command
RESUMABLE = ("train", "launch")

_HELD: dict[str, int] = {}  # absolute folder -> fd of its lock file, held by this process
_CLAIMED: list[Path] = []  # folders claimed by the running command, committed when it succeeds


# ------------------------------------------------------------------------------ lock


def lock_folder(out: str | Path) -> None:
    """Hold an exclusive lock on ``out`` (created if missing) until :func:`release_folders` or
    the end of the process; raises :class:`RunDirError` when another process holds it."""
    import fcntl

    out = Path(out)
    key = os.path.abspath(out)
    if key in _HELD:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunDirError(f"--out {out}: cannot create its lock file ({exc.strerror or exc}); "
                          "choose a folder you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        except OSError:
            holder = "?"
        os.close(fd)
        raise RunDirError(
            f"--out {out} is being written by another dice process (pid {holder}); wait for it "
            "to finish or choose another --out (two writers in one folder would mix their files)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


def release_folders() -> None:
    """Release every folder lock this process holds (the CLI does this when a command ends)."""
    _CLAIMED.clear()
    while _HELD:
        _key, fd = _HELD.popitem()
        os.close(fd)  # closing the descriptor releases the flock


def holds_lock(out: str | Path) -> bool:
    return os.path.abspath(out) in _HELD


# ------------------------------------------------------------------------------ what is there


def _entries(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name not in IGNORED
                  and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def read_marker(out: str | Path) -> dict[str, Any] | None:
    p = Path(out) / MARKER
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FOLDER_FORMAT else None


def folder_kind(out: str | Path) -> str | None:
    """The command that wrote ``out`` (its marker, else a guess from a legacy folder's files);
    None when it holds nothing a dice command wrote."""
    out = Path(out)
    marker = read_marker(out)
    if marker is not None and isinstance(marker.get("kind"), str):
        return marker["kind"]
    try:
        m = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        m = None
    if isinstance(m, dict) and isinstance(m.get("kind"), str):
        return LEGACY_KINDS.get(m["kind"], m["kind"])
    if (out / "summary.json").is_file() and (out / "peer-0").is_dir():
        return "launch"
    if any((out / f).exists() for f in (MANIFEST, "trajectory.json", "progress")):
        return "train"
    if isinstance(m, dict):
        return "run"
    return None


def _recorded_identity(out: Path) -> RunIdentity | None:
    """The identity ``out`` records (marker, else a legacy manifest); None if unverifiable."""
    marker = read_marker(out)
    doc = marker
    if doc is None:
        try:
            doc = json.loads((out / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
    try:
        return RunIdentity.from_json(doc.get("identity") if isinstance(doc, dict) else None,
                                     str(out))
    except RunDirError:
        return None


def describe(kind: str | None) -> str:
    if kind is None:
        return "files that no dice command wrote"
    cmd = COMMANDS.get(kind)
    return f"a `{cmd}` run's files" if cmd else f"a {kind!r} run's files"


# ------------------------------------------------------------------------------ claim


def _kept(out: Path) -> set[str]:
    """The user's own config files at the top of ``out`` (``dice train run/c.yaml -o run``):
    every ``*.yaml``/``*.yml`` but ``config.yaml``, the only YAML a dice command writes. They
    are never removed, never refused and never committed as the run's."""
    if not out.is_dir():
        return set()
    return {p.name for p in out.iterdir()
            if p.is_file() and p.suffix in (".yaml", ".yml") and p.name != "config.yaml"}


def clear_folder(out: str | Path) -> None:
    """Remove everything in ``out`` except its lock file and the user's kept config files (the
    manifest first)."""
    out = Path(out)
    keep = _kept(out) | {LOCK}
    remove_manifest(out)
    for p in out.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def claim_folder(out: str | Path, kind: str, identity: RunIdentity | None = None, *,
                 overwrite: bool = False, resume: bool = False) -> Path:
    """Lock ``out`` and make it this run's (module docstring). ``identity``: what is about to
    run (None: any run of ``kind`` counts as this one). With ``resume`` the folder is kept when
    it holds this kind (the caller checks the run identity and continues); otherwise a folder
    of this same run is emptied and a fresh run starts. Raises :class:`RunDirError`."""
    from .config import ConfigError

    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite discards it; "
                          "pass one of them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose a folder path")
    lock_folder(out)
    _remove_orphans(out)
    kept = _kept(out)
    entries = [p for p in _entries(out) if p.name not in kept]
    found = folder_kind(out) if entries or read_marker(out) else None
    if entries and found is None:
        names = ", ".join(p.name for p in entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise RunDirError(
            f"--out {out} holds files that no dice command wrote ({names}); choose an empty or "
            "new folder (--overwrite never deletes files dice did not write)")
    fix_resume = ", --resume to continue that run" if kind in RESUMABLE else ""
    if found is not None and found != kind and not overwrite:
        raise RunDirError(
            f"--out {out} holds {describe(found)}, and `{COMMANDS.get(kind, kind)}` would mix "
            "its files with them; pass --overwrite to replace the folder as a whole, or choose "
            "another --out")
    if resume and kind in RESUMABLE and found == kind:
        _write_marker(out, kind, identity)
        _CLAIMED.append(out)
        return out
    if found == kind and identity is not None and not overwrite and entries:
        other = _recorded_identity(out)
        if other is None or other.digest != identity.digest:
            why = ("whose run cannot be verified (no identity recorded)" if other is None
                   else f"of another run ({identity.differences(other)})")
            raise RunDirError(
                f"--out {out} holds {describe(found)} {why}; pass --overwrite to replace the "
                f"folder as a whole{fix_resume}, or choose another --out")
    if entries or read_marker(out):
        clear_folder(out)  # another kind/run (with --overwrite) or a rerun of this one
    _write_marker(out, kind, identity)
    _CLAIMED.append(out)
    return out


def _write_marker(out: Path, kind: str, identity: RunIdentity | None) -> None:
    write_json(out / MARKER, {"format": FOLDER_FORMAT, "kind": kind,
                              "identity": None if identity is None else identity.to_json()})


def _remove_orphans(out: Path) -> None:
    """Temporary files left by a killed writer (``.NAME.<pid>.<random>.tmp``), anywhere in
    ``out``; only called while holding the folder's lock, so no live writer owns them."""
    for p in out.rglob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)


def claim_file(path: str | Path, kind: str, *, overwrite: bool = False) -> Path:
    """``dice bench``'s output JSON: refuse a file that is not this benchmark's JSON (unless
    ``overwrite``) and a folder that holds a run. (Written atomically; no lock file is left in
    the folder, which is often the working directory.)"""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise RunDirError(f"--json {path} is a folder; pass a file name such as {path}/"
                          f"bench-{kind}.json")
    found = folder_kind(folder) if folder.is_dir() else None
    if found not in (None, "run"):
        raise RunDirError(f"--json {path}: {folder} holds {describe(found)}; write the "
                          "benchmark JSON elsewhere (a run folder is never mixed)")
    if path.exists() and not overwrite:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            doc = None
        if not (isinstance(doc, dict) and doc.get("benchmark") == kind):
            raise RunDirError(f"--json {path} exists and is not a `dice bench {kind}` result; "
                              "pass --overwrite to replace it, or choose another file")
    return path


# ------------------------------------------------------------------------------ commit


def _committed_files(out: Path) -> list[str]:
    kept = _kept(out)
    names = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if not p.is_file() or p.name in IGNORED or p.name == MANIFEST and rel.parent == Path():
            continue
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            continue
        if rel.parent == Path() and p.name in kept:
            continue
        if any(part in NOT_COMMITTED_DIRS for part in rel.parts[:-1]):
            continue
        names.append(rel.as_posix())
    return names


def commit_folder(out: str | Path, identity: RunIdentity | None = None, **extra: Any) -> None:
    """Write ``out/manifest.json`` over every file in ``out`` (``report.html`` included; not
    the resume state under ``progress/`` or ``checkpoints/``). The identity is ``identity``,
    else the marker's, else the committed manifest's; keys of a manifest this process wrote
    (``rounds_done``, ``data_files``) are kept."""
    out = Path(out)
    old: dict[str, Any] = {}
    man = out / MANIFEST
    if man.is_file():
        try:
            doc = json.loads(man.read_text())
            if isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT:
                old = doc
        except (OSError, ValueError):
            old = {}
    if identity is None:
        marker = read_marker(out)
        src = (marker or {}).get("identity") or old.get("identity")
        if src is None:
            identity = RunIdentity.from_fields({"kind": folder_kind(out) or "run"})
        else:
            identity = RunIdentity.from_json(src, str(out))
    keep = {k: v for k, v in old.items() if k not in ("format", "identity", "files")}
    write_manifest(out, _committed_files(out), identity, **{**keep, **extra})


def commit_claimed() -> None:
    """Commit every folder claimed since the last :func:`release_folders` (the CLI calls it
    when a command returns normally)."""
    for out in list(dict.fromkeys(_CLAIMED)):
        if out.is_dir():
            commit_folder(out)
    _CLAIMED.clear()


def experiment_identity(kind: str, cfg: Any, seeds: Any = None, **extra: Any) -> RunIdentity:
    """Identity of an experiment or demo folder: its kind, its whole config (the experiment
    settings included; not ``data.data_dir``) and the seeds and options it ran with."""
    raw = cfg.model_dump(mode="json") if cfg is not None else None
    if raw is not None:
        raw["data"].pop("data_dir", None)
    return RunIdentity.from_fields({"kind": kind, "config": raw, "seeds": seeds, **extra})


def open_for_report(run_dir: str | Path) -> list[str]:
    """Lock ``run_dir`` for ``dice report`` and return its problems (and its child runs');
    folders without problems are re-committed once the new ``report.html`` is written."""
    from .report.core import child_runs

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    lock_folder(run_dir)
    problems: list[str] = []
    for d in [run_dir, *child_runs(run_dir)]:
        found = folder_problems(d)
        problems += found
        if not found:
            _CLAIMED.append(d)
    return problems


def folder_problems(out: str | Path) -> list[str]:
    """Why ``out`` is not one complete run: no manifest (interrupted, or an older version),
    files that differ from it (replaced by another run) or that it does not list (another
    run's, mixed in). [] for a committed, consistent folder."""
    out = Path(out)
    man = out / MANIFEST
    if not man.is_file():
        return [f"{out} has no {MANIFEST}: it was not completely written (interrupted, still "
                "running, or written by an older version); its numbers may be partial"]
    try:
        doc = json.loads(man.read_text())
        files = doc["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return [f"{man} is damaged; write the run again"]
    problems = []
    changed = [name for name, rec in files.items() if not (out / name).is_file()
               or file_digest(out / name) != {"size": rec.get("size"),
                                              "sha256": rec.get("sha256")}]
    if changed:
        problems.append(f"{out}: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} "
                        f"differ from {MANIFEST} (replaced by another run, edited or damaged)")
    from .report.html import REPORT_NAME

    extra = [n for n in _committed_files(out) if n not in files and Path(n).name not in
             (REPORT_NAME, "report-screenshot.png")]
    if extra:
        problems.append(f"{out}: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''} "
                        f"not listed in {MANIFEST} (another run's files mixed in?)")
    return problems


def written_by_me(path: str | Path) -> bool:
    """Whether ``path`` holds exactly the bytes this process last wrote there."""
    rec = written_digest(path)
    return rec is not None and Path(path).is_file() and file_digest(path) == rec
