"""Resumable training state in safetensors + JSON only (never pickle).

A checkpoint is one folder, replaced whole on every save (``pigeon.io.atomic_dir``):

```
state.safetensors   param.<name>            trainable weights
                    optimizer.<idx>.<key>   optimizer state tensors (AdamW moments, step)
                    rng.torch, rng.cuda.<i>, rng.numpy   random generator states
                    extra.<name>            loop-specific tensors (best weights, reference log-probs)
state.json          progress (step, counters, curve rows), optimizer param groups and scalar
                    state, scheduler state, numpy/python RNG scalars, the run's fingerprint
```

Together with a batch order that is a function of (seed, stream, step) (``pigeon.training.loop``), restoring this state makes a killed run finish with the same weights as
an uninterrupted one (CPU, same seed, same thread count). ``save_checkpoint``/``load_checkpoint``
hold one optimizer, one scheduler and a set of trainables (stage 1, DPO); ``save_state``/``load_state``
hold any tensors + JSON (the foundation's phases, whose optimizer changes from phase to phase).
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pigeon.errors import CheckpointError
from pigeon.io import atomic_dir, atomic_write_bytes, atomic_write_text, load_tensors, read_json, save_tensors

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
LATEST = "latest"


def named_trainables(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train, by their module path (stable across processes)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def freeze_all_but(model: nn.Module, trainable: list[nn.Parameter]) -> dict[str, nn.Parameter]:
    """Make exactly ``trainable`` require gradients; returns them by name."""
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return named_trainables(model)


# --- RNG -----------------------------------------------------------------------------------------
def _capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss_next]}
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# --- optimizer / scheduler ------------------------------------------------------------------------
def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as ``optimizer.<idx>.<key>`` tensors + JSON-able param groups and scalars."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what :func:`optimizer_tensors` returned."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- save / load ----------------------------------------------------------------------------------
def _latest_dir(folder: Path) -> Path | None:
    for latest in (Path(folder) / LATEST, Path(folder) / f".{LATEST}.old"):
        # atomic_dir swaps through `.latest.old`: a kill inside the swap leaves only the previous one.
        if (latest / STATE_JSON).is_file():
            return latest
    return None


def save_state(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and ``meta`` with the global RNG states to ``folder/latest`` (replaced whole)."""
    rng_tensors, rng_meta = _capture_rng()
    with atomic_dir(Path(folder) / LATEST) as tmp:
        save_tensors(tmp / STATE_TENSORS, {**tensors, **rng_tensors})
        atomic_write_text(tmp / STATE_JSON, json.dumps({**meta, "rng": rng_meta}, sort_keys=True))


def load_state(folder: Path, run_fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(tensors, meta)`` saved by :func:`save_state` for the run ``run_fingerprint``, with the global RNG
    states restored; None when there is no checkpoint or it belongs to a run with another config or inputs."""
    latest = _latest_dir(folder)
    if latest is None:
        return None
    meta = read_json(latest / STATE_JSON)
    tensors = load_tensors(latest / STATE_TENSORS)  # read first: a torn file is an error, never skipped
    if meta.get("fingerprint") != run_fingerprint:
        return None
    _restore_rng(tensors, meta["rng"])
    return tensors, meta


def save_checkpoint(
    folder: Path,
    trainables: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
    run_fingerprint: str,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the whole training state to ``folder/latest`` (atomically replaced)."""
    tensors = {f"param.{name}": p.detach() for name, p in trainables.items()}
    optim_tensors, optim_meta = optimizer_tensors(optimizer)
    tensors.update(optim_tensors)
    tensors.update({f"extra.{k}": v for k, v in (extra_tensors or {}).items()})
    meta = {"fingerprint": run_fingerprint, "progress": progress, "optimizer": optim_meta,
            "scheduler": scheduler.state_dict()}
    save_state(folder, tensors, meta)


def load_checkpoint(
    folder: Path,
    trainables: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    run_fingerprint: str,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Restore the state saved by :func:`save_checkpoint` into the given objects.

    Returns ``(progress, extra_tensors)``, or None when there is no checkpoint or it belongs to a
    run with another config or other inputs (then training starts over).
    """
    found = load_state(folder, run_fingerprint)
    if found is None:
        return None
    tensors, meta = found
    source = _latest_dir(folder) / STATE_TENSORS
    saved = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    if set(saved) != set(trainables):
        missing = sorted(set(trainables) ^ set(saved))[:3]
        raise CheckpointError(f"{source}: trainable parameters differ from the model ({missing})")
    with torch.no_grad():
        for name, p in trainables.items():
            if saved[name].shape != p.shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(saved[name].shape)}")
            p.copy_(saved[name].to(p.device))
    load_optimizer(optimizer, tensors, meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    return meta["progress"], extra


def clear_checkpoint(folder: Path) -> None:
    """Drop a finished run's checkpoint (its outputs are written)."""
    shutil.rmtree(folder, ignore_errors=True)


# --- curves ---------------------------------------------------------------------------------------
def write_curves(path: Path, rows: list[dict[str, Any]]) -> None:
    """One CSV row per step; columns are the union of the rows' keys (missing cells empty)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plot_curves(path: Path, rows: list[dict[str, Any]], panels: dict[str, list[str]],
                levels: dict[str, dict[str, float]] | None = None) -> None:
    """A PNG with one panel per ``{title: columns}`` against step; ``levels[title]`` adds labelled
    dashed reference lines to that panel."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(4.2 * len(panels), 3.2), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, columns) in zip(axes, panels.items()):
        for column in columns:
            points = [(r["step"], r[column]) for r in rows if r.get(column) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=column)
        for label, level in (levels or {}).get(title, {}).items():
            ax.axhline(level, linestyle="--", color="grey", label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
