"""Which run an artifact belongs to, and whether it was written completely.

**Run identity.** A hash of everything that changes a run's numbers: the config without its
purely operational keys, plus the size and SHA-256 of every data file read. Left out:
``experiment`` (settings of what is built on the run; the peer runtime adds the distributed
keys that change numbers, see ``distributed.peer.peer_identity``), ``data.data_dir`` (the files'
hashes stand for it, so moving the data keeps the identity), ``train.eval_every`` and
``train.checkpoint_every`` (when to measure and save, not what is computed) and
``train.rounds`` (so a run can be extended) except under the cosine schedule, whose learning
rate depends on it. Every other key counts, including sections added later (``policy``,
``observers``, ``aggregator``): unknown keys are in by default.

**Manifest.** ``manifest.json`` is written last, as the commit marker of a folder: the identity
and each file's size and SHA-256. A folder without one (interrupted, or written by an older
version) or whose files do not match it is refused by the loaders with :class:`RunDirError`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._util import fsync_dir, write_json
from .config import ConfigError, RunConfig, drop_own_defaults

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dice-influence.manifest/1"
IDENTITY_FORMAT = 1
OPERATIONAL_TRAIN_KEYS = ("eval_every", "checkpoint_every")


class RunDirError(ConfigError):
    """A run folder or checkpoint that is incomplete, inconsistent or from another run."""


def identity_fields(
    cfg: RunConfig, data_files: Any = (), extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The parts of ``cfg`` (and of the data read) that change the run's numbers."""
    raw = drop_own_defaults(cfg.model_dump(mode="json"))
    raw.pop("experiment", None)
    raw["data"].pop("data_dir", None)
    tr = raw["train"]
    for key in OPERATIONAL_TRAIN_KEYS:
        tr.pop(key, None)
    if tr.get("lr_schedule") != "cosine":
        tr.pop("rounds", None)
    raw["data_files"] = sorted(
        ({"name": Path(f["path"]).name, "size": int(f["size"]), "sha256": f["sha256"]}
         for f in data_files),
        key=lambda f: (f["name"], f["sha256"]),
    )
    raw["identity_format"] = IDENTITY_FORMAT
    if extra:
        raw.update(extra)
    return raw


@dataclass(frozen=True)
class RunIdentity:
    """``fields`` (what counts, as JSON-able data) and ``digest`` (SHA-256 of their canonical
    JSON)."""

    fields: dict[str, Any]
    digest: str

    @classmethod
    def of(
        cls, cfg: RunConfig, data_files: Any = (), extra: dict[str, Any] | None = None
    ) -> RunIdentity:
        return cls.from_fields(identity_fields(cfg, data_files, extra))

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> RunIdentity:
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return cls(fields, hashlib.sha256(text.encode()).hexdigest())

    @property
    def short(self) -> str:
        return self.digest[:12]

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "fields": self.fields}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> RunIdentity:
        if not isinstance(obj, dict) or not isinstance(obj.get("fields"), dict):
            raise RunDirError(f"{where}: no run identity recorded (written by an older "
                              "version, or damaged)")
        ident = cls.from_fields(obj["fields"])
        if obj.get("digest") != ident.digest:
            raise RunDirError(f"{where}: the recorded run identity does not match its own "
                              "fields (the file was edited or damaged)")
        return ident

    def differences(self, other: RunIdentity, limit: int = 6) -> str:
        """``"train.lr: 0.1 there, 0.05 here; seed: ..."`` (keys whose values differ)."""
        a, b = _flatten(other.fields), _flatten(self.fields)
        keys = sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))
        parts = [f"{k}: {_show(a.get(k, _MISSING))} there, {_show(b.get(k, _MISSING))} here"
                 for k in keys[:limit]]
        if len(keys) > limit:
            parts.append(f"and {len(keys) - limit} more")
        return "; ".join(parts) or "(same fields, different digest)"

    def require_same(self, other: RunIdentity, what: str, fix: str) -> None:
        """Raise :class:`RunDirError` unless ``other`` (found in ``what``) is this run."""
        if other.digest != self.digest:
            raise RunDirError(
                f"{what} belongs to another run ({self.differences(other)}); {fix}"
            )


_MISSING = object()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _show(v: Any) -> str:
    if v is _MISSING:
        return "(absent)"
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ------------------------------------------------------------------------------ manifests


def file_digest(path: str | Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def remove_manifest(folder: str | Path) -> None:
    """Un-commit ``folder`` before its files are replaced (durably)."""
    p = Path(folder) / MANIFEST
    if p.exists():
        p.unlink()
        fsync_dir(folder)


def write_manifest(
    folder: str | Path, files: list[str], identity: RunIdentity, **extra: Any
) -> None:
    """Commit ``folder``: record ``files`` (names inside it) with their hashes, and the run
    identity. Call after every listed file is durably written."""
    folder = Path(folder)
    doc = {
        "format": MANIFEST_FORMAT,
        "identity": identity.to_json(),
        "files": {name: file_digest(folder / name) for name in files},
        **extra,
    }
    write_json(folder / MANIFEST, doc)


def read_manifest(folder: str | Path, needed: list[str]) -> tuple[dict[str, Any], RunIdentity]:
    """The manifest of ``folder`` and its identity, after checking that every file in
    ``needed`` is listed and unchanged; raises :class:`RunDirError`."""
    folder = Path(folder)
    p = folder / MANIFEST
    if not p.is_file():
        raise RunDirError(
            f"{folder} has no {MANIFEST}: it was not completely written (interrupted, or "
            "written by an older version), so it is not loaded; write it again (`dice train`, "
            "or `dice train --resume` to continue from its checkpoints)"
        )
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{p} is not readable JSON ({exc}); write the run again") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise RunDirError(f"{p}: not a {MANIFEST_FORMAT} manifest")
    ident = RunIdentity.from_json(doc.get("identity"), str(p))
    files = doc.get("files")
    if not isinstance(files, dict):
        raise RunDirError(f"{p}: no file list")
    for name in needed:
        rec = files.get(name)
        if not isinstance(rec, dict):
            raise RunDirError(f"{p} does not list {name}; the folder is incomplete")
        path = folder / name
        if not path.is_file():
            raise RunDirError(f"{path} is missing (listed in {MANIFEST})")
        if file_digest(path) != {"size": rec.get("size"), "sha256": rec.get("sha256")}:
            raise RunDirError(
                f"{path} differs from what {MANIFEST} recorded (replaced by another run, "
                "edited or damaged); it is not loaded"
            )
    return doc, ident
