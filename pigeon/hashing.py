"""Stage cache keys, read from the one description of the pipeline: ``dvc.yaml``.

A stage's key is its name + the params keys it lists + the content hashes of its data inputs +
the hash of its code. The Prefect flow uses it to skip a stage (with the output hashes recorded
at the end of the run that made them); DVC computes the same facts for ``dvc repro``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pigeon.config import Params
from pigeon.errors import ConfigError
from pigeon.io import tree_hash
from pigeon.paths import Workspace

MISSING = "missing"


@dataclass(frozen=True)
class StageSpec:
    """One ``dvc.yaml`` stage: what it reads and writes, split by where the paths live."""

    name: str
    params: tuple[str, ...]  # params keys: a section ("dpo") or a dotted key ("backbone.image_size")
    inputs: tuple[str, ...]  # data the stage reads, relative to the workspace
    code: tuple[str, ...]  # code and config the stage runs, relative to the project root
    outs: tuple[str, ...]  # everything the stage writes (outs, metrics, plots), relative to the workspace


def _entry_path(entry: Any) -> str:
    """A dvc.yaml list entry is a path, or a one-key mapping {path: options}."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and len(entry) == 1:
        return str(next(iter(entry)))
    raise ConfigError(f"dvc.yaml: cannot read entry {entry!r}")


def _params_keys(entries: list) -> list[str]:
    keys: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):  # {params-file: [keys]}
            for value in entry.values():
                keys.extend(str(k) for k in (value or []))
        else:
            raise ConfigError(f"dvc.yaml: cannot read params entry {entry!r}")
    return keys


def load_stage_specs(dvc_yaml: str | Path, profile: str) -> dict[str, StageSpec]:
    """Parse ``dvc.yaml`` into specs; ``${profile}`` is filled in as DVC does from params."""
    dvc_yaml = Path(dvc_yaml)
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {})["stages"]
    except FileNotFoundError as exc:
        raise ConfigError(f"{dvc_yaml}: file not found") from exc
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigError(f"{dvc_yaml}: no readable 'stages' mapping ({exc})") from exc

    def fill(path: str) -> str:
        return path.replace("${profile}", profile)

    outs_of = {
        name: [fill(_entry_path(e)) for key in ("outs", "metrics", "plots") for e in body.get(key) or []]
        for name, body in stages.items()
    }
    produced = {path for outs in outs_of.values() for path in outs}
    specs: dict[str, StageSpec] = {}
    for name, body in stages.items():
        deps = [fill(_entry_path(e)) for e in body.get("deps") or []]
        # Data is what some stage writes or what lives under data/; anything else is code/config.
        is_data = [d in produced or d.startswith("data/") for d in deps]
        specs[name] = StageSpec(
            name=name,
            params=tuple(_params_keys(body.get("params") or [])),
            inputs=tuple(d for d, data in zip(deps, is_data) if data),
            code=tuple(d for d, data in zip(deps, is_data) if not data),
            outs=tuple(outs_of[name]),
        )
    return specs


def params_value(params: Params, key: str) -> Any:
    """The value of a params key such as ``dpo`` or ``backbone.image_size``, as plain data."""
    value: Any = params
    for part in key.split("."):
        if not hasattr(value, part):
            raise ConfigError(f"dvc.yaml: params key {key!r} is not in the params schema")
        value = getattr(value, part)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def source_hash(path: str | Path) -> str:
    """Hash of a code file or folder: source files only (compiled caches change without edits)."""
    path = Path(path)
    if path.is_file():
        return tree_hash(path)
    if not path.is_dir():
        return MISSING
    digest = hashlib.md5()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if not f.is_file() or f.suffix == ".pyc" or any(p == "__pycache__" or p.startswith(".") for p in rel.parts):
            continue
        digest.update(str(rel).encode())
        digest.update(tree_hash(f).encode())
    return digest.hexdigest()


_content_hashes: dict[tuple[str, str], str] = {}  # (path, stat signature) → content hash, this process


def data_hash(path: Path) -> str:
    """Content hash of a data file or folder; re-read only when a file's size, mtime or inode moved
    (as DVC does), so a 17k-image dataset is read once per process, not once per stage."""
    if not path.exists():
        return MISSING
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))  # what tree_hash reads
    signature = hashlib.md5()
    for f in files:
        st = f.stat()
        signature.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    key = (str(path), signature.hexdigest())
    if key not in _content_hashes:
        _content_hashes[key] = tree_hash(path)
    return _content_hashes[key]


def output_hashes(spec: StageSpec, ws: Workspace) -> dict[str, str]:
    """Content hash of each output as it is on disk now (``missing`` for an absent one)."""
    return {out: data_hash(ws.root / out) for out in spec.outs}


def stage_fingerprint(spec: StageSpec, params: Params, ws: Workspace, project_root: Path) -> dict[str, Any]:
    """Everything a stage's result depends on, as plain data. A stage that lists the whole ``backbone``
    section also depends on the Janus folder's content when the backbone is loaded from one (the input
    ``dvc.yaml`` cannot name: its path is a param)."""
    fingerprint = {
        "stage": spec.name,
        "params": {key: params_value(params, key) for key in spec.params},
        "inputs": {path: data_hash(ws.root / path) for path in spec.inputs},
        "code": {path: source_hash(project_root / path) for path in spec.code},
    }
    if "backbone" in spec.params and params.backbone.kind == "janus":
        from pigeon.artifacts import backbone_source, weights_fingerprint

        source = backbone_source(params, ws)
        fingerprint["backbone_weights"] = weights_fingerprint(source) if source.is_dir() else MISSING
    return fingerprint


def cache_key(fingerprint: dict[str, Any], extra: str = "") -> str:
    """A readable, filename-safe key: ``<stage>[-<extra>]-<md5 of the fingerprint>``."""
    blob = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    name = fingerprint["stage"] + (f"-{extra}" if extra else "")
    return f"{name}-{hashlib.md5(blob.encode()).hexdigest()}"
