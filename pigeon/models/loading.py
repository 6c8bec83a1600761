"""Build backbones and Pigeon models from the workspace: the one place that knows which backbone is used."""

from __future__ import annotations

from pathlib import Path

import torch

from pigeon.config import LoraConfig, Params
from pigeon.errors import CheckpointError
from pigeon.models.backbone import Backbone
from pigeon.models.pigeon import PigeonModel
from pigeon.paths import Workspace


def backbone_source(params: Params, ws: Workspace) -> Path:
    """The folder the backbone's weights come from."""
    if params.backbone.kind == "janus":
        return Path(params.backbone.janus_path).expanduser()
    return ws.foundation


def load_backbone(params: Params, ws: Workspace, device) -> Backbone:
    """tiny: ``models/foundation`` (written by the foundation stage); janus: ``backbone.janus_path``."""
    device = torch.device(device)
    source = backbone_source(params, ws)
    if params.backbone.kind == "janus":
        from pigeon.models.janus import JanusBackbone

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        backbone = JanusBackbone.from_pretrained(source, params.backbone.trust_remote_code, dtype=dtype)
    else:
        from pigeon.models.tiny import TinyBackbone

        if not source.is_dir():
            raise CheckpointError(f"{source}: foundation model not found (run `pigeon stage foundation`)")
        backbone = TinyBackbone.from_pretrained(source)
    return backbone.to(device).eval()


def load_pigeon(params: Params, ws: Workspace, weights: str | Path | None, device) -> PigeonModel:
    """weights None: a fresh Pigeon head with untrained LoRA; "stage1" / "dpo": that stage's output;
    any other value: a folder written by ``PigeonModel.save_trainable``. Returned in eval mode."""
    model = PigeonModel(load_backbone(params, ws, device), params.model)
    if weights is None:
        model.add_lora(params.stage1.lora)
    else:
        folder = {"stage1": ws.stage1, "dpo": ws.dpo}.get(str(weights), Path(weights))
        if not (folder / "pigeon_config.json").is_file():
            raise CheckpointError(f"{folder}: no trained Pigeon weights (pigeon_config.json missing)")
        model.load_trainable(folder)
    return model.to(device).eval()


def peft_lora_config(lora: LoraConfig) -> dict:
    """``adapter_config.json`` content in peft's own format (``peft.LoraConfig.to_dict``)."""
    from peft import LoraConfig as PeftLoraConfig

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules)).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
