"""Stage 1: masked preference reconstruction (docs/design.md §1).

A window's target is also its reference, masked with α_r ~ U(0, 1) per sample (drawn inside
``PigeonModel.loss``); the loss is cross-entropy on the target's visual tokens. LoRA on the LM,
the adapter and the mask generator train; α_h stays fixed.

Validation uses a fixed, seeded subset of validation windows and a fixed, seeded α_r per window,
so every evaluation (and the untrained head's baseline) sees the same problem; the masks
themselves come from the mask generator being evaluated, with the training rule (high-scoring
reference tokens masked), because learning them is part of what stage 1 trains.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import get_cosine_schedule_with_warmup

from pigeon.config import Stage1Config
from pigeon.distributed import DataParallel
from pigeon.errors import DataError
from pigeon.runtime import autocast
from pigeon.seeds import numpy_rng, step_generator, subset_rows
from pigeon.training.checkpoint import freeze_all_but, load_checkpoint, save_checkpoint
from pigeon.training.loop import LoopProgress, StepOutput, TrainingLoop, batch_indices


def validation_subset(windows: pd.DataFrame, size: int, seed: int) -> tuple[pd.DataFrame, torch.Tensor]:
    """A fixed, seeded subset of ``windows`` and one fixed α_r per window."""
    if len(windows) == 0:
        raise DataError("windows_val.parquet: no validation windows (stage1 needs a validation subset)")
    rng = numpy_rng(seed, "stage1-validation")  # never the train order's stream
    rows = subset_rows(rng, len(windows), size)
    alpha_ref = torch.from_numpy(rng.random(len(rows))).float()
    return windows.iloc[rows].reset_index(drop=True), alpha_ref


@torch.no_grad()
def validation_loss(model, encoder, windows: pd.DataFrame, alpha_ref: torch.Tensor, batch_size: int,
                    device: torch.device, dp: DataParallel | None = None) -> float:
    """Window-weighted mean stage-1 loss on ``windows`` under the fixed α_r (with ``dp``, the processes
    share the batches and add up their sums)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for index, start in enumerate(range(0, len(windows), batch_size)):
        if dp is not None and not dp.owns(index):
            continue
        batch = encoder.batch(windows.iloc[start : start + batch_size]).to(device)
        with autocast(device):
            cond = model.condition(batch, alpha_ref=alpha_ref[start : start + batch_size].to(device), training=True)
            loss, _ = model.loss(batch, cond)
        total += float(loss) * len(batch)
    model.train(was_training)
    return (total if dp is None else dp.sum(total)) / len(windows)


@dataclass
class Stage1Result:
    best_weights: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    curve_rows: list[dict[str, Any]]


def train_stage1(
    model,
    encoder,
    train_windows: pd.DataFrame,
    val_windows: pd.DataFrame,
    cfg: Stage1Config,
    seed: int,
    device: torch.device,
    checkpoint_dir: Path,
    run_fingerprint: str,
) -> Stage1Result:
    """Train the stage-1 trainables of ``model`` in place; returns the best weights by validation loss.

    Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same run (``run_fingerprint``).
    """
    if len(train_windows) == 0:
        raise DataError("windows_train.parquet: no training windows")
    val_subset, val_alpha = validation_subset(val_windows, cfg.val_windows, seed)
    trainable = model.trainable_parameters(lora=True, mask_generator=True, adapter=True)
    trainables = freeze_all_but(model, trainable)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train_windows) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, total_steps), total_steps)
    dp = DataParallel(model, "loss", device)

    def evaluate() -> float:  # the same figure on every process: early stopping stops them all
        return validation_loss(model, encoder, val_subset, val_alpha, cfg.batch_size, device, dp)

    resumed = load_checkpoint(checkpoint_dir, trainables, optimizer, scheduler, run_fingerprint)
    if resumed is None:
        progress = LoopProgress(state={"best_val_loss": None, "best_step": None, "evals_without_improvement": 0,
                                       "stopped_early": False, "foundation_val_loss": evaluate()})
        best_weights: dict[str, torch.Tensor] = {}
    else:
        progress, best_weights = LoopProgress.from_json(resumed[0]), resumed[1]
    resumed_from_step = None if resumed is None else progress.step
    state = progress.state

    def step_fn(step: int) -> StepOutput:
        # Every process draws the same global batch and trains on its share of the rows.
        rows, weight = dp.split(batch_indices(len(train_windows), cfg.batch_size, step, seed, "stage1",
                                              whole_epochs=True))
        dp.seed_step(seed, step)
        # each reference takes a random style-stripped view (one stream per step: a resume replays it)
        batch = encoder.batch(train_windows.iloc[rows], views=step_generator(seed, "stage1-views", step))
        with autocast(device):
            loss, logs = dp.forward(batch.to(device))
        figures = {"train_loss": loss.item(), **{k: float(v) for k, v in logs.items() if k != "loss"}}
        return StepOutput(loss, figures, weight)

    def after_step(step: int, row: dict[str, Any]) -> bool:
        nonlocal best_weights
        if (step + 1) % cfg.eval_every == 0 or step + 1 == total_steps:
            row["val_loss"] = evaluate()
            if state["best_val_loss"] is None or row["val_loss"] < state["best_val_loss"]:
                state.update(best_val_loss=row["val_loss"], best_step=step + 1, evals_without_improvement=0)
                best_weights = {k: p.detach().cpu().clone() for k, p in trainables.items()}
            else:
                state["evals_without_improvement"] += 1
                state["stopped_early"] = state["evals_without_improvement"] >= cfg.patience
        return state["stopped_early"]

    def save() -> None:
        save_checkpoint(checkpoint_dir, trainables, optimizer, scheduler, progress.to_json(), run_fingerprint,
                        best_weights)

    model.train()
    start = time.perf_counter()
    TrainingLoop("stage1", trainable, optimizer, total_steps, scheduler=scheduler, dp=dp, max_grad_norm=1.0,
                 checkpoint_every=cfg.checkpoint_every, save=save,
                 postfix=("train_loss", "val_loss")).run(progress, step_fn, after_step)

    rows = progress.rows
    val_rows = [r for r in rows if "val_loss" in r]
    metrics = {
        "steps": progress.step,
        "planned_steps": total_steps,
        "stopped_early": state["stopped_early"],
        "train_windows": len(train_windows),
        "val_windows": len(val_subset),
        "foundation_val_loss": state["foundation_val_loss"],
        "best_val_loss": state["best_val_loss"],
        "best_step": state["best_step"],
        "final_val_loss": val_rows[-1]["val_loss"],
        "final_train_loss": rows[-1]["train_loss"],
        "train_seconds_this_run": round(time.perf_counter() - start, 2),
        "resumed_from_step": resumed_from_step,
        "world_size": dp.world_size,
    }
    return Stage1Result(best_weights, metrics, rows)
