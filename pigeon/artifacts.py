"""The workspace's model files, seen by the stages, the evaluation and serving: which folder a backbone
and a Pigeon head come from, the fingerprints of those folders and of a run's inputs, and the cache of
item codes. ``pigeon.models`` takes config sections and folders; this module maps ``Params`` and a
``Workspace`` onto them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pigeon.config import Params, section_dict
from pigeon.errors import CheckpointError
from pigeon.io import file_md5, load_tensors, save_tensors, tree_hash
from pigeon.models.backbone import Backbone
from pigeon.models.batching import ItemCodes, WindowEncoder, item_codes, reference_codes
from pigeon.models.pigeon import PigeonModel
from pigeon.paths import Workspace

LARGE_CHECKPOINT_BYTES = 1 << 30


def backbone_source(params: Params, ws: Workspace) -> Path:
    """The folder the backbone's weights come from: tiny, ``models/foundation`` (written by the
    foundation stage); janus, ``backbone.janus_path``."""
    if params.backbone.kind == "janus":
        return Path(params.backbone.janus_path).expanduser()
    return ws.foundation


def load_backbone(params: Params, ws: Workspace, device) -> Backbone:
    from pigeon.models.loading import load_backbone as load_from

    source = backbone_source(params, ws)
    if params.backbone.kind == "tiny" and not source.is_dir():
        raise CheckpointError(f"{source}: foundation model not found (run `pigeon stage foundation`)")
    return load_from(params.backbone, source, device)


def load_pigeon(params: Params, ws: Workspace, weights: str | Path | None, device) -> PigeonModel:
    """weights None: a fresh Pigeon head with untrained LoRA (``stage1.lora``); "stage1" / "dpo": that
    stage's output; any other value: a folder written by ``PigeonModel.save_trainable``. In eval mode."""
    model = PigeonModel(load_backbone(params, ws, device), params.model)
    if weights is None:
        model.add_lora(params.stage1.lora)
    else:
        folder = {"stage1": ws.stage1, "dpo": ws.dpo}.get(str(weights), Path(weights))
        if not (folder / "pigeon_config.json").is_file():
            raise CheckpointError(f"{folder}: no trained Pigeon weights (pigeon_config.json missing)")
        model.load_trainable(folder)
    return model.to(device).eval()


# --- fingerprints ----------------------------------------------------------------------------------
def fingerprint(*parts: Any) -> str:
    """Hash of the JSON of ``parts``: a checkpoint or a shard only serves a run with the same config and
    inputs."""
    return hashlib.md5(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(folder: Path) -> str:
    """Content hash of a checkpoint folder; multi-GB external checkpoints are fingerprinted by their
    JSON files and the names, sizes and modification times of the weight files."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if sum(p.stat().st_size for p in files) < LARGE_CHECKPOINT_BYTES:
        return tree_hash(folder)
    digest = hashlib.md5()
    for p in files:
        stat = p.stat()
        detail = file_md5(p) if p.suffix == ".json" else f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"{p.relative_to(folder)}={detail};".encode())
    return digest.hexdigest()


def inputs_fingerprint(params: Params, ws: Workspace, sections: tuple[str, ...], *files) -> str:
    """What a resumable run depends on: its params sections, the backbone weights and input files."""
    return fingerprint(section_dict(params, "seed", "backbone", "model", *sections),
                       weights_fingerprint(backbone_source(params, ws)), [file_md5(f) for f in files])


# --- item codes ------------------------------------------------------------------------------------
def cached_item_codes(params: Params, ws: Workspace, backbone: Backbone) -> ItemCodes:
    """All item codes and reference-view codes, encoded once per (backbone weights, raw data, image size,
    views, seed) and cached under ``.pigeon/cache/``."""
    from pigeon.data.raw import load_images, read_items

    size = params.backbone.image_size
    key = json.dumps({"weights": weights_fingerprint(backbone_source(params, ws)),
                      "items": file_md5(ws.raw / "items.parquet"),
                      "images": tree_hash(ws.raw / "images" / str(size)), "size": size,
                      "views": params.model.reference_views, "seed": params.seed, "view_format": 1}, sort_keys=True)
    path = ws.root / ".pigeon" / "cache" / f"codes-{hashlib.md5(key.encode()).hexdigest()[:16]}.safetensors"
    items = read_items(ws.raw)
    views = params.model.reference_views
    if path.is_file():
        cached = load_tensors(path)
        if (cached.get("codes") is not None and cached["codes"].shape == (len(items), backbone.tokens_per_image)
                and cached.get("reference") is not None and cached["reference"].shape[1] == views + 1):
            return ItemCodes(cached["codes"], cached["reference"])
    images = load_images(ws.raw, size, items)
    found = ItemCodes(item_codes(backbone, images), reference_codes(backbone, images, views, params.seed))
    save_tensors(path, {"codes": found.codes, "reference": found.reference})
    return found


def window_encoder(params: Params, ws: Workspace, model: PigeonModel) -> WindowEncoder:
    """Window rows → WindowBatch for ``model``'s backbone (item codes cached per backbone + data)."""
    from pigeon.data.raw import read_items
    from pigeon.distributed import main_process_first

    with main_process_first():  # under `accelerate launch` only the main process writes the cache
        codes = cached_item_codes(params, ws, model.backbone)
    return WindowEncoder(model.backbone, codes, read_items(ws.raw), params.model, params.backbone.lm.max_caption_tokens)
