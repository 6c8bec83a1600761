"""Training the evaluation CNN (``pigeon.evaluation.evaluators.EvaluatorNet``) on real images.

Held-out accuracy is measured inside the one training run by masking labels: the style head never
gets the style label of the held-out emoji, the content head never gets the content label of the
held-out style; the saved model is the one that was measured. The evaluators never see generated
images and are never the reward encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from pigeon.config import EvaluatorsConfig
from pigeon.errors import ConfigError
from pigeon.evaluation.evaluators import Evaluator, EvaluatorNet, to_model_input
from pigeon.models.personalization import LUMA, gaussian_blur
from pigeon.seeds import step_generator
from pigeon.training.loop import LoopProgress, StepOutput, TrainingLoop, batch_indices


def augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 3, brightness: float = 0.03) -> torch.Tensor:
    """Random whole-pixel shifts (white fill) and a slight brightness jitter.

    Whole pixels because sub-pixel resampling blurs 32-px art and erases thin outlines, a style
    cue; no zoom because each vendor's drawing scale is a style cue too; hue, saturation and
    contrast are left alone because colour is one as well.
    """
    n, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (max_shift,) * 4, value=1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(device)
    rows = (offsets[0][:, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = (offsets[1][:, None] + torch.arange(w, device=device))[:, None, None, :]
    channels = torch.arange(images.shape[1], device=device)[None, :, None, None]
    moved = padded[torch.arange(n, device=device)[:, None, None, None], channels, rows, cols]
    offset = ((torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * brightness * 2).to(device)
    return (moved + offset).clamp(-1.0, 1.0)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What generated images look like besides the tokenizer's own artifacts: a third of the images get a
    slight blur (σ ∈ [0.3, 0.9] px), another third a palette quantised to 8–16 levels per channel."""
    n, c = images.shape[:2]
    u = torch.rand(n, 2, generator=generator).to(images.device)
    kind = (u[:, 0] * 3).long()
    sigma = (0.3 + 0.6 * u[:, 1]).repeat_interleave(c)  # one blur per image, the same on each channel
    blurred = gaussian_blur(images.reshape(n * c, 1, *images.shape[2:]), sigma).reshape_as(images)
    levels = (8 + (u[:, 1] * 9).floor())[:, None, None, None] - 1
    quantised = ((images + 1) / 2 * levels).round() / levels * 2 - 1
    kind = kind[:, None, None, None]
    return torch.where(kind == 0, blurred, torch.where(kind == 1, quantised, images))


def content_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A style-destroyed view per image for the content head: grayscale, black line art on white (the
    edges of the luminance), or a random swap of the colour channels, one of them at random. What
    emoji it is survives; the vendor's palette and fills do not."""
    n = images.shape[0]
    gray = (images * torch.tensor(LUMA, device=images.device)[None, :, None, None]).sum(1, keepdim=True)
    gx = F.pad(gray[..., :, 1:] - gray[..., :, :-1], (0, 1, 0, 0)).abs()
    gy = F.pad(gray[..., 1:, :] - gray[..., :-1, :], (0, 0, 0, 1)).abs()
    lines = torch.where(gx + gy > 0.25, -1.0, 1.0)
    perm = torch.stack([torch.randperm(3, generator=generator) for _ in range(n)]).to(images.device)
    swapped = images.gather(1, perm[:, :, None, None].expand_as(images))
    kind = torch.randint(0, 3, (n, 1, 1, 1), generator=generator).to(images.device)
    return torch.where(kind == 0, gray.expand_as(images), torch.where(kind == 1, lines.expand_as(images), swapped))


@dataclass(frozen=True)
class HoldoutSplit:
    style_train: np.ndarray  # bool [N]: the style label is used for training
    content_train: np.ndarray  # bool [N]: the content label is used for training
    holdout_style: str
    holdout_emoji: tuple[str, ...]


def make_holdout_split(items: pd.DataFrame, cfg: EvaluatorsConfig, seed: int) -> HoldoutSplit:
    """Style is held out by emoji (unseen emoji), content by style (an unseen style)."""
    rng = np.random.default_rng(seed)
    styles = sorted(items["style"].unique())
    keys = np.array(sorted(items["emoji_key"].unique()))
    if cfg.holdout_style is not None and cfg.holdout_style not in styles:
        raise ConfigError(f"evaluators.holdout_style: {cfg.holdout_style!r} is not a dataset style "
                          f"({', '.join(styles)})")
    holdout_style = cfg.holdout_style or str(rng.choice(styles))
    n_hold = min(len(keys) - 1, max(1, round(cfg.holdout_emoji_fraction * len(keys))))
    holdout_emoji = tuple(sorted(rng.choice(keys, size=n_hold, replace=False).tolist()))
    style_train = ~items["emoji_key"].isin(holdout_emoji).to_numpy()
    content_train = (items["style"] != holdout_style).to_numpy()
    return HoldoutSplit(style_train, content_train, holdout_style, holdout_emoji)


def _accuracies(evaluator: Evaluator, images: np.ndarray, items: pd.DataFrame, mask: np.ndarray) -> dict[str, float]:
    if not mask.any():
        return {"style": float("nan"), "content": float("nan"), "content_top5": float("nan"), "n": 0}
    pred = evaluator.predict(images[mask])
    sub = items[mask]
    content = evaluator.content_index(sub["emoji_key"])
    return {"style": float((pred["style"] == evaluator.style_index(sub["style"])).mean()),
            "content": float((pred["content"] == content).mean()),
            "content_top5": float((pred["content_top5"] == content[:, None]).any(axis=1).mean()),
            "n": int(mask.sum())}


def _held_out_report(evaluator: Evaluator, images: np.ndarray, items: pd.DataFrame, split: HoldoutSplit,
                     reconstructions: np.ndarray | None = None) -> dict:
    held_style = _accuracies(evaluator, images, items, ~split.style_train)
    held_content = _accuracies(evaluator, images, items, ~split.content_train)
    train = _accuracies(evaluator, images, items, split.style_train & split.content_train)
    report = {"style_accuracy": held_style["style"],  # on held-out emoji
              "content_accuracy": held_content["content"],  # on the held-out style
              "content_top5_accuracy": held_content["content_top5"],
              "train_style_accuracy": train["style"], "train_content_accuracy": train["content"],
              "holdout_emoji_images": held_style["n"], "holdout_style_images": held_content["n"]}
    if reconstructions is not None:  # the same held-out images through the foundation tokenizer
        recon_style = _accuracies(evaluator, reconstructions, items, ~split.style_train)
        recon_content = _accuracies(evaluator, reconstructions, items, ~split.content_train)
        report.update({"style_accuracy_reconstructed": recon_style["style"],
                       "content_accuracy_reconstructed": recon_content["content"],
                       "content_top5_accuracy_reconstructed": recon_content["content_top5"]})
    return report


def train_evaluator(images: np.ndarray, items: pd.DataFrame, cfg: EvaluatorsConfig, seed: int,
                    device: torch.device, autocast=None, progress_bar: bool = True,
                    reconstructions: np.ndarray | None = None) -> tuple[Evaluator, dict]:
    """Train on real images [N, S, S, 3] uint8 (rows = items); → (evaluator, report).

    ``reconstructions`` (optional, same shape): the same real images passed through the foundation
    tokenizer (encode → decode). A ``cfg.reconstruction_share`` of each batch is drawn from them, so the
    evaluator judges images with the tokenizer's artifacts as it judges real ones (a generator can never
    do better than its tokenizer; an evaluator that reads every reconstruction as a different vendor
    would hide that). They are real images, never a generated output of a model under test. Held-out
    accuracies are measured on the real images and, reported beside them, on their reconstructions.

    Held-out labels are masked for the first ``cfg.release_holdout_at`` of the steps; the held-out
    accuracies are measured then, and the held-out labels join training for the remaining steps,
    so the saved evaluator has no blind style or emoji (and is at least as good as measured).
    """
    from contextlib import nullcontext

    styles = sorted(items["style"].unique())
    emoji_keys = sorted(items["emoji_key"].unique())
    split = make_holdout_split(items, cfg, seed)
    torch.manual_seed(seed)
    net = EvaluatorNet(len(styles), len(emoji_keys), cfg.width, cfg.feature_dim, cfg.pooled_style,
                       cfg.style_width).to(device)
    evaluator = Evaluator(net, styles, emoji_keys, images.shape[1], device)

    all_x = to_model_input(images, images.shape[1], device)
    recon_x = None if reconstructions is None else to_model_input(reconstructions, images.shape[1], device)
    style_y = torch.tensor(evaluator.style_index(items["style"]), device=device)
    content_y = torch.tensor(evaluator.content_index(items["emoji_key"]), device=device)
    style_ok = torch.tensor(split.style_train, device=device)
    content_ok = torch.tensor(split.content_train, device=device)
    masked_rows = np.flatnonzero(split.style_train | split.content_train)  # rows with a label to learn
    release_step = min(cfg.steps, max(1, round(cfg.release_holdout_at * cfg.steps)))
    held_out: dict | None = None

    def mix(index: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
        """The real images of ``index``, a ``share`` of them swapped for their reconstructions."""
        x = all_x[index]
        if recon_x is None or share <= 0:
            return x
        use = (torch.rand(len(index), generator=generator) < share).to(device)
        return torch.where(use[:, None, None, None], recon_x[index], x)

    def step_fn(step: int) -> StepOutput:
        nonlocal held_out
        if step == release_step:
            held_out = _held_out_report(evaluator, images, items, split, reconstructions)
            net.train()
            style_ok[:], content_ok[:] = True, True
        if step < release_step:
            rows = masked_rows[batch_indices(len(masked_rows), cfg.batch_size, step, seed, "evaluators")]
        else:  # every image, held-out labels included
            rows = batch_indices(len(items), cfg.batch_size, step - release_step, seed, "evaluators-all")
        index = torch.as_tensor(rows, device=device)
        generator = step_generator(seed, "evaluators-augment", step)
        x = mix(index, cfg.reconstruction_share, generator)
        if cfg.degrade:
            x = degrade(x, generator)
        x = augment(x, generator)
        s_mask, c_mask = style_ok[index], content_ok[index]
        c_index = index
        if cfg.content_views:  # a second, style-destroyed copy of the batch: content labels only
            x = torch.cat([x, content_view(x, generator)])
            c_mask = torch.cat([c_mask, c_mask])
            c_index = torch.cat([index, index])
        with autocast if autocast is not None else nullcontext():
            if net.style_trunk is None:
                _, style_logits, content_logits = net(x)
                style_logits = style_logits[: len(index)]
            else:  # the style network sees its own mix, undegraded
                x_style = augment(mix(index, cfg.style_reconstruction_share, generator), generator)
                style_logits = net.style_logits(x_style)
                content_logits = net.content(x)[1]
        zero = content_logits.sum() * 0.0  # a batch may hold no label of one kind
        loss_style = (F.cross_entropy(style_logits.float()[s_mask], style_y[index][s_mask]) if s_mask.any()
                      else zero)
        loss_content = (F.cross_entropy(content_logits.float()[c_mask], content_y[c_index][c_mask])
                        if c_mask.any() else zero)
        loss = loss_style + loss_content
        return StepOutput(loss, {"loss": loss.item(), "loss_style": loss_style.item(),
                                 "loss_content": loss_content.item()})

    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, cfg.steps // 20), cfg.steps)
    net.train()
    progress = TrainingLoop("evaluators", net.parameters(), optimizer, cfg.steps, scheduler=scheduler,
                            log_every=max(1, cfg.steps // 20), progress_bar=progress_bar).run(LoopProgress(), step_fn)
    curve = progress.rows
    if held_out is None:  # release_holdout_at = 1: measured on the final model
        held_out = _held_out_report(evaluator, images, items, split, reconstructions)
    final = _accuracies(evaluator, images, items, np.ones(len(items), dtype=bool))
    report = {
        **held_out,
        "measured_at_step": release_step,
        "style_accuracy_chance": 1.0 / len(styles),
        "content_accuracy_chance": 1.0 / len(emoji_keys),
        "final_style_accuracy_all_images": final["style"],
        "final_content_accuracy_all_images": final["content"],
        "holdout_style": split.holdout_style,
        "holdout_emoji_count": len(split.holdout_emoji),
        "num_styles": len(styles),
        "num_emoji": len(emoji_keys),
        "image_size": int(images.shape[1]),
        "steps": cfg.steps,
        "final_loss": curve[-1]["loss"] if curve else float("nan"),
        "curve": curve,
        "holdout_emoji": list(split.holdout_emoji),
    }
    return evaluator, report


