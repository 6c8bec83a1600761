"""Stage ``stage1``: masked preference reconstruction on the training windows.

Reads the foundation backbone, ``data/raw`` and ``data/users``; writes ``models/stage1/``
(``PigeonModel.save_trainable`` + ``metrics.json`` + ``curves.csv`` + ``loss.png``), replaced
atomically. Progress is checkpointed under ``.pigeon/checkpoints/stage1`` so a killed run resumes.
"""

from __future__ import annotations

import time

import torch

from pigeon.artifacts import inputs_fingerprint, load_pigeon, window_encoder
from pigeon.config import Params
from pigeon.data.users import read_windows
from pigeon.distributed import is_main, local_device
from pigeon.io import atomic_dir, write_json
from pigeon.paths import Workspace
from pigeon.runtime import resolve_device
from pigeon.training.checkpoint import clear_checkpoint, plot_curves, write_curves
from pigeon.training.stage1 import train_stage1


def run(params: Params, ws: Workspace) -> dict:
    start = time.perf_counter()
    device = local_device(resolve_device(params.device))
    model = load_pigeon(params, ws, None, device)
    encoder = window_encoder(params, ws, model)
    train = read_windows(ws, "train", params.model.history_len)
    val = read_windows(ws, "val", params.model.history_len)
    checkpoint_dir = ws.checkpoint_dir("stage1")
    run_id = inputs_fingerprint(params, ws, ("stage1",), ws.users / "windows_train.parquet",
                                ws.users / "windows_val.parquet")

    result = train_stage1(model, encoder, train, val, params.stage1, params.seed, device, checkpoint_dir, run_id)
    if not is_main():
        return {}  # the main process writes the outputs

    trainables = dict(model.named_parameters())
    with torch.no_grad():  # the kept model is the best evaluation, not the last step
        for name, value in result.best_weights.items():
            trainables[name].copy_(value.to(trainables[name].device))
    metrics = {**result.metrics, "device": str(device), "seconds": round(time.perf_counter() - start, 2)}
    with atomic_dir(ws.stage1) as tmp:
        model.save_trainable(tmp)
        write_json(tmp / "metrics.json", metrics)
        write_curves(tmp / "curves.csv", result.curve_rows)
        plot_curves(tmp / "loss.png", result.curve_rows,
                    {"stage-1 loss": ["train_loss", "val_loss"], "learning rate": ["lr"]},
                    {"stage-1 loss": {"val loss, untrained head": metrics["foundation_val_loss"]}})
    clear_checkpoint(checkpoint_dir)
    return {"stage": "stage1", **{k: metrics[k] for k in (
        "steps", "foundation_val_loss", "best_val_loss", "best_step", "stopped_early", "seconds")}}
