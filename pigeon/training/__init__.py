"""Training algorithms (foundation, stage 1, candidates, reward, DPO) and their resumable state.

A checkpoint is one folder ``<dir>/latest/`` holding ``state.safetensors`` (weights, optimizer
tensors, torch RNG state) and ``state.json`` (step, optimizer hyper-parameters, numpy/python RNG
states, curves), swapped in whole by ``atomic_dir``: a killed run leaves the old or the new
checkpoint, never a mix. Nothing is pickled.

Data order and all sampling inside a step come from :func:`step_generator` (a function of the
seed, a name and the step), so a resumed run replays exactly the steps it missed.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pigeon.errors import CheckpointError
from pigeon.io import atomic_dir, load_tensors, read_json, save_tensors, write_json

LATEST = "latest"


def step_generator(seed: int, name: str, step: int) -> torch.Generator:
    """A CPU generator seeded by (seed, name, step): independent streams, replayable after a resume."""
    digest = hashlib.sha256(f"{seed}/{name}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def epoch_batch(n: int, batch_size: int, step: int, seed: int, name: str) -> torch.Tensor:
    """Indices of batch ``step`` in a stream of per-epoch permutations of range(n)."""
    first, last = step * batch_size, (step + 1) * batch_size
    parts = []
    for epoch in range(first // n, (last - 1) // n + 1):
        perm = torch.randperm(n, generator=step_generator(seed, f"{name}/epoch", epoch))
        lo, hi = max(first - epoch * n, 0), min(last - epoch * n, n)
        parts.append(perm[lo:hi])
    return torch.cat(parts)


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict, list]:
    """Optimizer state as flat tensors + JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{prefix}{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, groups: list, prefix: str) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict, dict]:
    """Global RNG states: torch as a tensor, numpy and python as JSON."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}
    return {"rng.torch": torch.get_rng_state()}, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    rng_tensors, rng_meta = rng_state()
    with atomic_dir(Path(folder) / LATEST) as tmp:
        save_tensors(tmp / "state.safetensors", {**tensors, **rng_tensors})
        write_json(tmp / "state.json", {**meta, "rng": rng_meta})


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The latest checkpoint (and restores the global RNG states), or None if there is none."""
    folder = Path(folder)
    path = folder / LATEST
    if not path.is_dir():
        # atomic_dir swaps through `.latest.old`; a kill inside that swap leaves only the old one.
        path = folder / f".{LATEST}.old"
        if not path.is_dir():
            return None
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path}: checkpoint incomplete (state.json missing)")
    meta = read_json(path / "state.json")
    tensors = load_tensors(path / "state.safetensors")
    set_rng_state(tensors, meta["rng"])
    return tensors, meta
