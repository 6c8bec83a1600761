"""Stage ``dpo``: stage-2 preference alignment of the stage-1 model on the ranked pairs.

Reads ``models/stage1`` and ``artifacts/pairs``; writes ``models/dpo/`` (``save_trainable`` +
``metrics.json`` with the held-out pair accuracy before and after + ``curves.csv`` +
``curves.png``), replaced atomically. Checkpoints under ``.pigeon/checkpoints/dpo``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch

from pigeon.artifacts import inputs_fingerprint, load_pigeon, window_encoder
from pigeon.config import Params
from pigeon.data.raw import read_items
from pigeon.distributed import is_main, local_device
from pigeon.errors import DataError
from pigeon.io import atomic_dir, load_tensors, tree_hash, write_json
from pigeon.models.types import Conditioning
from pigeon.paths import Workspace
from pigeon.runtime import resolve_device
from pigeon.training.candidates import lookup_windows
from pigeon.training.checkpoint import clear_checkpoint, plot_curves, write_curves
from pigeon.training.dpo import PairSet, train_dpo


def load_pairs(params: Params, ws: Workspace) -> dict[str, PairSet]:
    """``artifacts/pairs`` as one PairSet per split (train, val), rows joined to their windows."""
    path = ws.pairs / "pairs.parquet"
    if not path.is_file():
        raise DataError(f"{path}: missing (run `pigeon stage rank`)")
    table = pd.read_parquet(path)
    tensors = load_tensors(ws.pairs / "pairs.safetensors")
    if len(tensors["chosen_codes"]) != len(table):
        raise DataError(f"{ws.pairs / 'pairs.safetensors'}: {len(tensors['chosen_codes'])} pairs, "
                        f"pairs.parquet has {len(table)}")
    windows = lookup_windows(ws, table["window_id"].tolist(), params.model.history_len, path, read_items(ws.raw),
                             params.candidates, params.seed)
    cond = Conditioning(tensors["history_keep"], tensors["reference_keep"], tensors["alpha_ref"])
    out = {}
    for split in ("train", "val"):
        rows = torch.as_tensor(np.flatnonzero((table["split"] == split).to_numpy()))
        out[split] = PairSet(windows.iloc[rows.numpy()].reset_index(drop=True), tensors["chosen_codes"][rows],
                             tensors["rejected_codes"][rows], cond.select(rows))
    return out


def run(params: Params, ws: Workspace) -> dict:
    start = time.perf_counter()
    cfg = params.dpo
    device = local_device(resolve_device(params.device))
    model = load_pigeon(params, ws, "stage1", device)
    encoder = window_encoder(params, ws, model)
    pairs = load_pairs(params, ws)
    # The mask generator does not train: every pair is scored under its recorded masks.
    trainable = model.trainable_parameters(lora=True, mask_generator=False, adapter=cfg.train_adapter)
    run_id = inputs_fingerprint(params, ws, ("dpo",), ws.pairs / "pairs.parquet",
                                ws.pairs / "pairs.safetensors") + tree_hash(ws.stage1)
    checkpoint_dir = ws.checkpoint_dir("dpo")
    num_tokens = model.backbone.tokens_per_image + 1  # codes + end-of-image, as sequence_logps scores
    result = train_dpo(model, encoder, pairs["train"], pairs["val"], trainable, cfg, params.seed, device,
                       num_tokens, checkpoint_dir, run_id)
    if not is_main():
        return {}  # the main process writes the outputs
    metrics = {**result.metrics, "device": str(device), "seconds": round(time.perf_counter() - start, 2)}
    levels = {"loss": {"ln 2 (policy = reference)": math.log(2)}} if cfg.loss_type == "sigmoid" else {}
    with atomic_dir(ws.dpo) as tmp:
        model.save_trainable(tmp)
        write_json(tmp / "metrics.json", metrics)
        write_curves(tmp / "curves.csv", result.curve_rows)
        plot_curves(tmp / "curves.png", result.curve_rows, {
            "loss": ["loss"],
            "implicit rewards": ["rewards/chosen", "rewards/rejected", "rewards/margins"],
            "reward accuracy": ["rewards/accuracies"],
        }, levels)
    clear_checkpoint(checkpoint_dir)
    return {"stage": "dpo", **{k: metrics[k] for k in (
        "train_pairs", "val_pairs", "steps", "first_loss", "final_loss", "val_pair_accuracy_stage1",
        "val_pair_accuracy_dpo", "seconds")}}
