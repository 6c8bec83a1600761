"""Stage 2: pairwise preference alignment (DPO) on chosen/rejected visual-token sequences.

Why the loop is the project's own and not a ``trl.DPOTrainer`` subclass (measured; README, "Why the DPO
loop is the project's own"): the trainer's constructor needs a text causal LM with a tokenizer (it
tokenizes the dataset and patches a fused LM head), while Pigeon's prompt is embeddings (masked history
codes, the reference grid) scored by a separate visual head, so a subclass keeps only
``transformers.Trainer``'s loop with the loss overridden. On the smoke sizes that loop was 1.31× slower
per step than this one (over the 20 % allowed), and its resume, though exact, reloads pickled optimizer,
scheduler and RNG files, which this project never loads. The losses and the logged quantities here
follow trl's ``DPOConfig`` meaning (``loss_type``, ``beta``, dropout disabled, the ``rewards/*`` metrics).

The reference model is the frozen stage-1 model. The policy starts as an exact copy of it, so the
reference log-probs are computed once, before the first step, with the policy itself under the
conditioning recorded with the candidates (same masks and α_r for policy and reference).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from pigeon.config import DPOConfig
from pigeon.distributed import DataParallel
from pigeon.errors import PigeonError
from pigeon.runtime import autocast
from pigeon.training.candidates import REFERENCE_COL
from pigeon.training.checkpoint import freeze_all_but, load_checkpoint, save_checkpoint
from pigeon.training.loop import LoopProgress, StepOutput, TrainingLoop, batch_indices

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


class DPOLoss(NamedTuple):
    losses: torch.Tensor  # [B] per pair
    chosen_rewards: torch.Tensor  # [B] β·(log π(y_w) − log π_ref(y_w)), detached
    rejected_rewards: torch.Tensor  # [B]


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    num_tokens: int = 1,
) -> DPOLoss:
    """Per-pair DPO loss from summed sequence log-probs, as trl's ``DPOConfig.loss_type`` defines it.

    With h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)):
    sigmoid −log σ(β·h); hinge max(0, 1 − β·h); ipo (h/n − 1/(2β))², where n = ``num_tokens`` scored
    per sequence (trl averages the IPO log-ratios over the completion tokens).
    """
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    delta = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        losses = (delta / num_tokens - 1 / (2 * beta)) ** 2
    else:
        raise PigeonError(f"dpo.loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    return DPOLoss(losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach())


def dpo_metrics(out: DPOLoss) -> dict[str, float]:
    """What trl logs per step: loss and the implicit rewards of chosen and rejected."""
    margins = out.chosen_rewards - out.rejected_rewards
    return {
        "loss": float(out.losses.detach().mean()),
        "rewards/chosen": float(out.chosen_rewards.mean()),
        "rewards/rejected": float(out.rejected_rewards.mean()),
        "rewards/accuracies": float((out.chosen_rewards > out.rejected_rewards).float().mean()),
        "rewards/margins": float(margins.mean()),
    }


@dataclass
class PairSet:
    """Preference pairs of one split, ready to score: window rows, codes and the recorded conditioning."""

    windows: pd.DataFrame  # one row per pair (history items, target/reference item)
    chosen_codes: torch.Tensor  # [P, T]
    rejected_codes: torch.Tensor  # [P, T]
    conditioning: Any  # pigeon.models.pigeon.Conditioning for the P pairs

    def __len__(self) -> int:
        return len(self.windows)


def pair_logps(model, encoder, pairs: PairSet, rows: np.ndarray, device: torch.device,
               sequence_logps: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and rejected codes of ``rows``, in one forward over 2·B sequences
    (through ``sequence_logps``, e.g. a ``DataParallel.forward``; ``model.sequence_logps`` by default)."""
    index = torch.as_tensor(rows, dtype=torch.long)
    batch = encoder.batch(pairs.windows.iloc[rows], reference_col=REFERENCE_COL, target_col=None)
    both = torch.arange(len(rows)).repeat(2)  # chosen rows, then the same rows for rejected
    codes = torch.cat([pairs.chosen_codes[index], pairs.rejected_codes[index]])
    cond = pairs.conditioning.select(index).select(both)
    with autocast(device):
        logps = (sequence_logps or model.sequence_logps)(batch.select(both).to(device), codes.to(device),
                                                         cond.to(device))
    logps = logps.float()
    return logps[: len(rows)], logps[len(rows) :]


@torch.no_grad()
def score_pairs(model, encoder, pairs: PairSet, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every pair's chosen and rejected sequence (no gradient), on the CPU."""
    chosen, rejected = [torch.empty(0)], [torch.empty(0)]
    for start in range(0, len(pairs), batch_size):
        c, r = pair_logps(model, encoder, pairs, np.arange(start, min(start + batch_size, len(pairs))), device)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


def disable_dropout(model: torch.nn.Module) -> None:
    """As trl's ``disable_dropout``: policy and reference log-probs must agree before the first step."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def evaluate_pairs(policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
                   cfg: DPOConfig, num_tokens: int) -> dict[str, float]:
    """Held-out figures: pair accuracy (the model gives the chosen the higher log-prob) and DPO metrics."""
    out = dpo_loss(policy[0], policy[1], reference[0], reference[1], cfg.beta, cfg.loss_type, num_tokens)
    return {"pair_accuracy": float((policy[0] > policy[1]).float().mean()), **dpo_metrics(out)}


@dataclass
class DPOResult:
    metrics: dict[str, Any]
    curve_rows: list[dict[str, Any]]


def train_dpo(
    model,
    encoder,
    train_pairs: PairSet,
    val_pairs: PairSet,
    trainable: list[torch.nn.Parameter],
    cfg: DPOConfig,
    seed: int,
    device: torch.device,
    num_tokens: int,
    checkpoint_dir: Path,
    run_fingerprint: str,
) -> DPOResult:
    """DPO on ``train_pairs``; held-out pair accuracy on ``val_pairs`` before (stage 1) and after."""
    if len(train_pairs) == 0:
        raise PigeonError("dpo: no training pairs (artifacts/pairs has none for split 'train'; lower rank.min_margin?)")
    model.train()
    disable_dropout(model)
    trainables = freeze_all_but(model, trainable)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train_pairs) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, total_steps)  # trl's default schedule
    dp = DataParallel(model, "sequence_logps", device)
    eval_batch = cfg.batch_size * 2

    resumed = load_checkpoint(checkpoint_dir, trainables, optimizer, scheduler, run_fingerprint)
    if resumed is None:
        ref_train = score_pairs(model, encoder, train_pairs, eval_batch, device)
        ref_val = score_pairs(model, encoder, val_pairs, eval_batch, device)
        progress = LoopProgress(state={"before": evaluate_pairs(ref_val, ref_val, cfg, num_tokens)
                                       if len(val_pairs) else {}})
    else:
        progress, extra = LoopProgress.from_json(resumed[0]), resumed[1]
        ref_train = (extra["ref_train_chosen"], extra["ref_train_rejected"])
        ref_val = (extra["ref_val_chosen"], extra["ref_val_rejected"])
    resumed_from_step = None if resumed is None else progress.step

    def step_fn(step: int) -> StepOutput:
        # Every process draws the same global batch and trains on its share of the pairs.
        rows, weight = dp.split(batch_indices(len(train_pairs), cfg.batch_size, step, seed, "dpo", whole_epochs=True))
        dp.seed_step(seed, step)
        chosen, rejected = pair_logps(model, encoder, train_pairs, rows, device, dp.forward)
        index = torch.as_tensor(rows)
        out = dpo_loss(chosen, rejected, ref_train[0][index].to(device), ref_train[1][index].to(device),
                       cfg.beta, cfg.loss_type, num_tokens)
        extra = {}
        if step == 0:  # policy == reference before the first update: log-ratios must be 0
            gap = torch.cat([chosen.detach().cpu() - ref_train[0][index],
                             rejected.detach().cpu() - ref_train[1][index]])
            extra["initial_logp_gap"] = dp.batch_max(float(gap.abs().max()))
        return StepOutput(out.losses.mean(), dpo_metrics(out), weight, extra)

    def save() -> None:
        save_checkpoint(checkpoint_dir, trainables, optimizer, scheduler, progress.to_json(), run_fingerprint, {
            "ref_train_chosen": ref_train[0], "ref_train_rejected": ref_train[1],
            "ref_val_chosen": ref_val[0], "ref_val_rejected": ref_val[1]})

    start = time.perf_counter()
    TrainingLoop("dpo", trainable, optimizer, total_steps, scheduler=scheduler, dp=dp, max_grad_norm=1.0,
                 checkpoint_every=cfg.checkpoint_every, save=save,
                 postfix=("loss", "rewards/accuracies")).run(progress, step_fn)
    seconds = time.perf_counter() - start

    after = evaluate_pairs(score_pairs(model, encoder, val_pairs, eval_batch, device), ref_val, cfg,
                           num_tokens) if len(val_pairs) else {}
    train_after = evaluate_pairs(score_pairs(model, encoder, train_pairs, eval_batch, device), ref_train, cfg,
                                 num_tokens)
    rows = progress.rows
    metrics = {
        "loss_type": cfg.loss_type,
        "beta": cfg.beta,
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "steps": total_steps,
        "train_seconds_this_run": round(seconds, 2),
        "resumed_from_step": resumed_from_step,
        "world_size": dp.world_size,
        "first_loss": rows[0]["loss"],
        "final_loss": rows[-1]["loss"],
        "initial_logp_gap": rows[0].get("initial_logp_gap"),
        "val_pair_accuracy_stage1": progress.state["before"].get("pair_accuracy"),
        "val_pair_accuracy_dpo": after.get("pair_accuracy"),
        "val_before": progress.state["before"],
        "val_after": after,
        "train_pair_accuracy_stage1": float((ref_train[0] > ref_train[1]).float().mean()),
        "train_after": train_after,
    }
    return DPOResult(metrics, rows)
