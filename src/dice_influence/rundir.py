"""Run directories: everything a training run leaves behind, readable by a person.

Layout: ``config.yaml``, ``metrics.json``, ``nodes.csv`` (per-node final test loss/accuracy),
``history.csv`` (evaluation over rounds), ``final.safetensors`` (final stacked parameters),
``trajectory.json`` + ``checkpoints.safetensors`` (exact replay), ``accuracy.png``,
``README.md``, then ``manifest.json`` (each file's hash, the run identity and the data files
read), written last as the commit marker: while a folder is rewritten it has no manifest, and
loaders refuse it. ``progress/round-<t>.safetensors`` are the checkpoints ``dice train`` writes
as it goes (parameters, optimizer state, history so far, run identity); ``--resume`` continues
from the latest one of the same run. Every file is written atomically (temporary file, fsync,
rename).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._util import (
    atomic_path,
    atomic_savefig,
    atomic_write_text,
    csv_text,
    json_safe,
    save_tensors,
    temp_name,
    write_json,
)
from .config import ConfigError, data_label, dump_config
from .manifest import MANIFEST, RunDirError, RunIdentity, remove_manifest, write_manifest
from .problem import Problem
from .trajectory import Trajectory

if TYPE_CHECKING:
    import torch

RUN_FILES = ("config.yaml", "metrics.json", "nodes.csv", "history.csv", "final.safetensors",
             "trajectory.json", "checkpoints.safetensors", "accuracy.png", "README.md")
PROGRESS = "progress"
PROGRESS_FORMAT = "dice-influence.progress/1"


def write_run_dir(traj: Trajectory, out: str | Path, *, extra: dict[str, Any] | None = None,
                  plots: bool = True) -> Path:
    """Write the run directory for ``traj`` into ``out`` and return its path; the manifest
    goes last, so an interrupted write leaves a folder that is never loaded."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_manifest(out)
    p = traj.problem
    final = traj.final_metrics
    atomic_write_text(out / "config.yaml", dump_config(p.cfg))
    metrics = {
        "kind": "train",  # the report's section provider (dice_influence.report)
        "rounds": traj.rounds_done,
        "n_nodes": p.n,
        "n_params": p.d,
        "run": describe_run(p),
        "final": {k: v for k, v in final.items() if k not in ("loss", "acc")},
        "per_node": {"test_loss": final.get("loss"), "test_acc": final.get("acc")},
        "history": [{k: v for k, v in h.items() if k not in ("loss", "acc")}
                    for h in traj.history],
        **_plugin_summaries(traj),
        "diverged": traj.diverged,
        **(extra or {}),
    }
    write_json(out / "metrics.json", metrics)
    has_acc = "acc" in final
    rows = [{"node": k, "train_samples": int(p.node_data.sizes[k]), "test_loss": final["loss"][k],
             **({"test_acc": final["acc"][k]} if has_acc else {})} for k in range(p.n)]
    atomic_write_text(out / "nodes.csv", csv_text(rows))
    hist = [{"round": h["round"], "mean_acc": h["mean_acc"], "mean_loss": h["mean_loss"],
             "min_acc": min(h["acc"]), "avg_model_acc": h["avg_model_acc"],
             "consensus_distance": h["consensus_distance"]} if "acc" in h else
            {"round": h["round"], "mean_loss": h["mean_loss"], "max_loss": max(h["loss"]),
             "avg_model_loss": h["avg_model_loss"],
             "consensus_distance": h["consensus_distance"]} for h in traj.history]
    atomic_write_text(out / "history.csv", csv_text(hist))
    save_tensors(out / "final.safetensors", {"theta": traj.theta.contiguous().cpu()},
                 metadata={"layout": "theta[k] = flat parameters of node k"})
    traj.save(out, manifest=False)
    written = [f for f in RUN_FILES if f != "accuracy.png"]
    if plots and traj.history:
        plot_history(traj, out / "accuracy.png")
        written.append("accuracy.png")
    else:
        (out / "accuracy.png").unlink(missing_ok=True)  # never leave another run's plot
    atomic_write_text(out / "README.md", _readme(traj, metrics))
    write_manifest(out, written, traj.identity, rounds_done=traj.rounds_done,
                   data_files=list(p.dataset.files))
    return out


def describe_run(problem: Problem) -> dict[str, Any]:
    """What actually ran (for ``metrics.json`` and the README): the model's class and
    parameter count and where it came from, the loss, the data's source and shapes."""
    cfg, fm, nd = problem.cfg, problem.fm, problem.node_data
    mc, dc = cfg.model, cfg.data
    model: dict[str, Any] = {"kind": mc.kind, "class": type(fm.module).__name__,
                             "n_params": fm.dim}
    if mc.kind == "builtin":
        model["name"] = mc.name
    elif mc.kind == "python":
        model.update(factory=mc.factory, kwargs=mc.kwargs)
        src = [f for f in problem.dataset.files if f not in _data_only(problem)]
        if src:
            model.update(module_file=src[0]["path"], module_sha256=src[0]["sha256"])
    else:
        model["built_with"] = "dice_influence.from_torch"
    data: dict[str, Any] = {"dataset": dc.dataset,
                            "source": dc.source if dc.dataset == "api" else (dc.path or
                                                                             dc.dataset),
                            "x": [*nd.input_shape], "x_dtype": str(nd.x.dtype).removeprefix(
                                "torch."),
                            "y": [*nd.target_shape], "y_dtype": str(nd.y.dtype).removeprefix(
                                "torch."),
                            "train_samples": int(nd.sizes.sum()),
                            "test_samples": int(problem.val_x.shape[0])}
    return {"model": model, "loss": fm.loss_name if fm.loss_name != "custom" else
            f"custom ({cfg.loss.description})", "data": data}


def _data_only(problem: Problem) -> list[dict[str, Any]]:
    from .models import factory_files

    mc = problem.cfg.model
    mod = factory_files(mc.factory) if mc.kind == "python" else ()
    return [f for f in problem.dataset.files if f not in mod]


def _plugin_summaries(traj: Trajectory) -> dict[str, Any]:
    """``"observers"`` / ``"policy"``: what each plug-in of the run measured or decided, and
    ``"W_used_rounds"``: the rounds whose mixing matrix a policy chose (replayed exactly)."""
    pl = traj.plugins
    if pl is None or (not pl.observers and pl.policy is None):
        return {}
    out: dict[str, Any] = {
        "observers": {o.name: o.summary() for o in pl.observers},
        "W_used_rounds": sorted(traj.W_used),
    }
    if pl.policy is not None:
        out["policy"] = {pl.policy.name: pl.policy.summary()}
    return out


def plot_history(traj: Trajectory, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3.5), dpi=110)
    ax = fig.add_subplot()
    rounds = [h["round"] for h in traj.history]
    what = "acc" if all("acc" in h for h in traj.history) else "loss"  # mse: losses only
    accs = [h[what] for h in traj.history]
    for k in range(traj.problem.n):
        ax.plot(rounds, [a[k] for a in accs], color="0.75", lw=0.7)
    ax.plot(rounds, [h[f"mean_{what}"] for h in traj.history], color="C0", lw=2,
            label="mean node")
    ax.plot(rounds, [h[f"avg_model_{what}"] for h in traj.history], color="C1", lw=1.5, ls="--",
            label="averaged model")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy" if what == "acc" else "test loss")
    ax.set_title(f"{data_label(traj.problem.cfg)}: {traj.problem.n} nodes, "
                 f"{traj.problem.cfg.topology.name}")
    ax.legend(loc="lower right" if what == "acc" else "upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path)


def _readme(traj: Trajectory, metrics: dict[str, Any]) -> str:
    cfg = traj.problem.cfg
    f = metrics["final"]
    run = metrics.get("run") or describe_run(traj.problem)
    m, dd = run["model"], run["data"]
    split = (f" ({cfg.data.partition})" if cfg.data.dataset not in ("nodes", "api") else
             " (one file per node)" if cfg.data.dataset == "nodes" else "")
    source = f" from `{dd['source']}`" if cfg.data.dataset in ("npz", "nodes") else \
        " (tensors passed to `dice_influence.from_torch`)" if cfg.data.dataset == "api" else ""
    where = {"builtin": f"`{m.get('name')}`",
             "python": f"`{m.get('factory')}`"
                       + (f" (module `{m['module_file']}`, sha256 {m['module_sha256'][:12]})"
                          if m.get("module_file") else ""),
             "api": "passed to `dice_influence.from_torch`"}[m["kind"]]
    score = (f"- final mean node test accuracy: {f['mean_acc']:.4f}; averaged model: "
             f"{f.get('avg_model_acc', float('nan')):.4f}; " if "mean_acc" in f else
             f"- final mean node test loss: {f.get('mean_loss', float('nan')):.4g}; averaged "
             f"model: {f.get('avg_model_loss', float('nan')):.4g}; ")
    rerun = ("`config.yaml` (re-run with `dice train config.yaml`)" if cfg.model.kind != "api"
             else "`config.yaml` (describes the run; a from_torch run is rebuilt in Python: "
             "`Trajectory.load(folder, problem=from_torch(...))`)")
    return (
        f"# dice-influence run\n\n"
        f"- data: `{dd['dataset']}`{split}{source}, {traj.problem.n} nodes, "
        f"{dd['train_samples']} training samples, x {tuple(dd['x'])} {dd['x_dtype']}, "
        f"y {tuple(dd['y'])} {dd['y_dtype']}, {dd['test_samples']} test samples; "
        f"topology `{cfg.topology.name}`"
        f"{' (time-varying: ' + cfg.topology.time_varying + ')' if cfg.topology.time_varying else ''}\n"
        f"- model: {m['class']} {where}, {m['n_params']} parameters; loss `{run['loss']}`; "
        f"{traj.rounds_done} rounds, batch {cfg.train.batch_size}, lr {cfg.train.lr}\n"
        f"{score}"
        f"consensus distance: {f.get('consensus_distance', float('nan')):.3g}\n\n"
        f"Files: {rerun}, `metrics.json`, "
        "`nodes.csv`, `history.csv`, `final.safetensors`, `trajectory.json` + "
        "`checkpoints.safetensors` (exact replay), `accuracy.png`, `manifest.json` (hashes, run "
        "identity, data files read; written last).\n\n"
        "Sign convention for every influence value in this project: influence = loss with the "
        "data − loss without it; positive = harmful.\n"
    )


# ------------------------------------------------------------------------------ as training goes


def check_writable(out: str | Path) -> Path:
    """Create ``out`` and write a probe file there, before any training; raises
    :class:`ConfigError` naming the folder."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = temp_name(out / "write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"--out {str(out)!r} is not a writable folder ({exc.strerror or exc}"
            f"{': ' + exc.filename if getattr(exc, 'filename', None) else ''}); "
            "choose a folder you can write to"
        ) from None
    return out


def save_progress(traj: Trajectory, out: str | Path, t: int,
                  identity: RunIdentity | None = None) -> Path:
    """Write checkpoint ``t`` of ``traj`` (parameters, optimizer state, history so far, run
    identity) to ``out/progress/round-<t>.safetensors`` atomically."""
    from safetensors.torch import save_file

    theta, state = traj.checkpoints[t]
    tensors = {"theta": theta.contiguous().cpu()}
    if state is not None:
        tensors["state"] = state.contiguous().cpu()
    plug, plug_meta = traj.plugin_checkpoint(t)
    tensors.update(plug)
    ident = identity or traj.identity
    meta = {
        "format": PROGRESS_FORMAT,
        "round": str(t),
        "checkpoint_every": str(traj.checkpoint_every),
        "identity": json.dumps(ident.to_json(), allow_nan=False),
        "history": json.dumps(json_safe([h for h in traj.history if h["round"] <= t]),
                              allow_nan=False),
    }
    if plug_meta is not None:
        meta["plugins"] = plug_meta
    path = Path(out) / PROGRESS / f"round-{t}.safetensors"
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def progress_writer(traj: Trajectory, out: str | Path) -> Callable[[int], None]:
    """``on_checkpoint`` for :meth:`Trajectory.run` that writes each checkpoint to ``out``."""
    ident = traj.identity
    return lambda t: save_progress(traj, out, t, ident)


def _progress_files(out: Path) -> dict[int, Path]:
    d = out / PROGRESS
    found = {}
    for p in d.glob("round-*.safetensors") if d.is_dir() else []:
        try:
            found[int(p.name[len("round-"):-len(".safetensors")])] = p
        except ValueError:
            continue
    return found


def _progress_meta(path: Path) -> tuple[dict[str, str], RunIdentity]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise RunDirError(f"{path} is damaged ({exc}); delete it and resume again") from None
    if meta.get("format") != PROGRESS_FORMAT:
        raise RunDirError(f"{path} is not a {PROGRESS_FORMAT} checkpoint")
    try:
        ident_json = json.loads(meta["identity"])
    except (KeyError, ValueError):
        ident_json = None
    return meta, RunIdentity.from_json(ident_json, str(path))


def _found_runs(out: Path) -> list[tuple[str, RunIdentity | None]]:
    """What ``out`` holds of earlier runs: (where, identity or None when unverifiable)."""
    found: list[tuple[str, RunIdentity | None]] = []
    man = out / MANIFEST
    if man.is_file():
        try:
            doc = json.loads(man.read_text())
            found.append((str(man), RunIdentity.from_json(doc.get("identity"), str(man))))
        except (OSError, ValueError, AttributeError):
            found.append((str(man), None))
    elif (out / "trajectory.json").is_file() or (out / "checkpoints.safetensors").is_file():
        found.append((f"{out / 'trajectory.json'} (no {MANIFEST})", None))
    for _t, path in sorted(_progress_files(out).items()):
        try:
            found.append((str(path), _progress_meta(path)[1]))
        except RunDirError:
            found.append((str(path), None))
    return found


def clear_run_dir(out: str | Path) -> None:
    """Remove what a run wrote into ``out`` (its known files and progress checkpoints only;
    anything else in the folder is left alone). The manifest goes first."""
    out = Path(out)
    remove_manifest(out)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for path in _progress_files(out).values():
        path.unlink(missing_ok=True)


def open_run(out: str | Path, problem: Problem, *, resume: bool = False,
             overwrite: bool = False) -> Trajectory:
    """The trajectory to train into ``out``: with ``resume``, the latest state of this same run
    found there (progress checkpoints or the committed run; round 0 when ``out`` holds nothing
    of any run, e.g. after a kill before the first checkpoint); otherwise a fresh start,
    refused when ``out`` holds another run unless ``overwrite``. Raises :class:`RunDirError`."""
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite discards it; "
                          "pass one of them")
    ident = RunIdentity.of(problem.cfg, problem.dataset.files)
    found = _found_runs(out)
    if resume and found:
        return _resume(out, problem, ident)
    foreign = [(w, i) for w, i in found if i is None or i.digest != ident.digest]
    if foreign and not overwrite:
        where, other = foreign[0]
        why = (f"files whose run cannot be verified ({where})" if other is None else
               f"another run's files ({where}: {ident.differences(other)})")
        raise RunDirError(f"--out {out} holds {why}; pass --overwrite to replace them, "
                          "--resume to continue a run of this config, or choose another --out")
    clear_run_dir(out)
    return Trajectory.start(problem)


def _resume(out: Path, problem: Problem, ident: RunIdentity) -> Trajectory:
    from safetensors.torch import load_file

    fix = "resume with the config it was trained with, or start afresh with --overwrite"
    sources: dict[int, list[dict[str, Any]]] = {}  # round -> history up to it
    checkpoints: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    plugins: dict[int, tuple[dict[str, torch.Tensor], str | None]] = {}  # round -> state
    every = None
    if (out / MANIFEST).is_file():
        for _where, other in _found_runs(out)[:1]:
            if other is not None:
                ident.require_same(other, f"--resume: {out}", fix)
        done = Trajectory.load(out, problem=problem)  # refuses a damaged folder
        checkpoints.update(done.checkpoints)
        sources[done.rounds_done] = done.history
        plugins[done.rounds_done] = done.plugin_checkpoint(done.rounds_done)
        every = done.checkpoint_every
    for t, path in sorted(_progress_files(out).items()):
        meta, other = _progress_meta(path)
        ident.require_same(other, f"--resume: {path}", fix)
        tensors = load_file(str(path))
        checkpoints[t] = (tensors["theta"], tensors.get("state"))
        sources[t] = json.loads(meta["history"])
        plugins[t] = ({k: v for k, v in tensors.items() if k.startswith(("plugin/", "W_used/"))},
                      meta.get("plugins"))
        every = int(meta["checkpoint_every"])
    target = problem.cfg.train.rounds
    if not sources:
        raise RunDirError(f"--resume: {out} holds no checkpoint to continue from (only run "
                          "files that cannot be verified); start afresh with --overwrite")
    usable = [t for t in sources if t <= target]
    if not usable:
        raise RunDirError(f"--resume: the run in {out} is already at round {min(sources)}, past "
                          f"train.rounds={target}; pass --set train.rounds={max(sources)} or more")
    t = max(usable)
    if 0 not in checkpoints:
        theta0 = problem.init_theta()
        checkpoints[0] = (theta0, problem.opt.init_state(theta0))
    plug_tensors, plug_meta = plugins.get(t, ({}, None))
    traj = Trajectory.restore(problem, checkpoints, sources[t], t, every,
                              plugin_tensors=plug_tensors, plugin_meta=plug_meta)
    if t == target and (not traj.history or traj.history[-1]["round"] != t):
        traj._eval(t, traj.theta)
    return traj
