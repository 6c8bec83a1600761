"""DPO: one epoch with reference log-probs precomputed once vs recomputed by a frozen copy every step.

As in ``pigeon.training.dpo``, chosen and rejected are scored in one forward over 2·B sequences. The
precompute is a one-time cost before the first epoch (reported on its own); the goal compares epochs.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks.common import random_batch, random_model, save, table
from pigeon.config import DPOConfig
from pigeon.runtime import autocast
from pigeon.training.dpo import dpo_loss


def _pair_logps(model, batch, chosen, rejected, cond, device):
    both = torch.arange(len(batch), device=chosen.device).repeat(2)
    with autocast(device):
        logps = model.sequence_logps(batch.select(both), torch.cat([chosen, rejected]), cond.select(both)).float()
    return logps[: len(batch)], logps[len(batch):]


def precompute(reference, pairs, cond, device) -> tuple[list, float]:
    start = time.perf_counter()
    with torch.no_grad():
        cache = [_pair_logps(reference, b, c, r, cond, device) for b, c, r in pairs]
    return cache, time.perf_counter() - start


def epoch(model, reference, pairs, cond, cfg: DPOConfig, device, ref_cache: list | None) -> float:
    """Seconds for one epoch over ``pairs`` (list of (batch, chosen, rejected))."""
    trainable = model.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)
    start = time.perf_counter()
    for i, (batch, chosen, rejected) in enumerate(pairs):
        if ref_cache is not None:
            ref_c, ref_r = ref_cache[i]
        else:
            with torch.no_grad():
                ref_c, ref_r = _pair_logps(reference, batch, chosen, rejected, cond, device)
        pol_c, pol_r = _pair_logps(model, batch, chosen, rejected, cond, device)
        loss = dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.beta, cfg.loss_type, chosen.shape[1]).losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(steps: int = 8, batch_size: int = 16, device: str = "cpu", rounds: int = 2) -> list[dict]:
    dev = torch.device(device)
    cfg = DPOConfig(batch_size=batch_size)
    model = random_model(device=device).train()
    reference = copy.deepcopy(model).eval()
    k = model.backbone.codebook_size
    pairs = []
    for step in range(steps):
        batch = random_batch(model, batch_size, device, seed=step)
        pairs.append((batch, batch.target_codes, torch.randint(0, k, batch.target_codes.shape, device=dev)))
    cond = model.condition(pairs[0][0], alpha_ref=0.5)
    epoch(model, reference, pairs[:1], cond, cfg, dev, None)  # warm-up
    cache, precompute_s = precompute(reference, pairs, cond, dev)
    # Alternate the two kinds of epoch and keep each one's best, so neither gains from running second
    # (warm allocator, caches) or loses to a burst of load on a shared machine.
    pre, every = float("inf"), float("inf")
    for _ in range(rounds):
        pre = min(pre, epoch(model, reference, pairs, cond, cfg, dev, cache))
        every = min(every, epoch(model, reference, pairs, cond, cfg, dev, None))
    rows = [{"steps": steps, "batch": batch_size, "precompute_once_s": precompute_s,
             "reference_forward_s": precompute_s / steps, "train_step_s": pre / steps,
             "epoch_precomputed_s": pre, "epoch_recomputed_s": every, "speedup_per_epoch": every / pre}]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    rows = run(args.steps, device=args.device)
    print(table(rows, list(rows[0])))
    save("dpo", rows)


if __name__ == "__main__":
    main()
