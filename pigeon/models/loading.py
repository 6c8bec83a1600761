"""Build a backbone from its config section and a folder: the one place that knows the backbone kinds.

Which folder a pipeline stage reads (``models/foundation``, ``backbone.janus_path``) is decided by
:mod:`pigeon.artifacts`; nothing here knows the workspace.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pigeon.config import BackboneConfig, LoraConfig
from pigeon.models.backbone import Backbone


def load_backbone(cfg: BackboneConfig, folder: str | Path, device) -> Backbone:
    """The ``cfg.kind`` backbone saved in ``folder`` (a Janus checkpoint, or a tiny backbone's
    ``save_pretrained`` folder), on ``device`` in eval mode."""
    device, folder = torch.device(device), Path(folder).expanduser()
    if cfg.kind == "janus":
        from pigeon.models.janus import JanusBackbone

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        backbone = JanusBackbone.from_pretrained(folder, cfg.trust_remote_code, dtype=dtype)
    else:
        from pigeon.models.tiny import TinyBackbone

        backbone = TinyBackbone.from_pretrained(folder)
    return backbone.to(device).eval()


def peft_lora_config(lora: LoraConfig) -> dict:
    """``adapter_config.json`` content in peft's own format (``peft.LoraConfig.to_dict``)."""
    from peft import LoraConfig as PeftLoraConfig

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules)).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
