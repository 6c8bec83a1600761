"""Evaluation encoders (docs/design.md §5): a small CNN trained here on real images, and optional local
CLIP/DINO models.

The CNN has two heads — style (which vendor drew it) and content (which emoji) — and its
penultimate features serve the similarity and Fréchet metrics. It never sees generated images and
is never the reward encoder. Held-out accuracy is measured inside the one training run by masking
labels: the style head never gets the style label of the held-out emoji, the content head never
gets the content label of the held-out style; the saved model is the one that was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pigeon.config import EvaluatorsConfig
from pigeon.errors import CheckpointError, ConfigError
from pigeon.io import load_tensors, read_json, save_tensors, write_json
from pigeon.models.personalization import gaussian_blur
from pigeon.pixels import to_pixels

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class EvaluatorNet(nn.Module):
    """Four conv stages (32 → 4 px) → the 4 × 4 map, flattened → features [N, feature_dim] → the content
    head. The map is kept, not averaged away: which emoji it is lies in the layout (measured on the real
    data: 36% vs 10% content accuracy after the same 600 steps).

    ``pooled_style=True``: the style head reads the map's per-channel mean and standard deviation
    instead — how a vendor draws (line weight, shading, palette) is the same wherever it is in the
    image, and a head on the layout learns the training emoji rather than the vendor."""

    GRID = 4

    def __init__(self, num_styles: int, num_contents: int, width: int = 32, feature_dim: int = 128,
                 pooled_style: bool = False):
        super().__init__()
        self.pooled_style = pooled_style

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.trunk = nn.Sequential(
            block(3, width), nn.MaxPool2d(2),
            block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), nn.MaxPool2d(2),
            block(4 * width, 4 * width), nn.AdaptiveAvgPool2d(self.GRID),
        )
        self.embed = nn.Sequential(nn.Linear(4 * width * self.GRID**2, feature_dim), nn.ReLU())
        self.style_head = nn.Linear(8 * width if pooled_style else feature_dim, num_styles)
        self.content_head = nn.Linear(feature_dim, num_contents)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [N, 3, S, S] in [-1, 1] → (features, style logits, content logits)."""
        grid = self.trunk(images)
        features = self.embed(grid.flatten(1))
        style_in = torch.cat([grid.mean((2, 3)), grid.std((2, 3))], 1) if self.pooled_style else features
        return features, self.style_head(style_in), self.content_head(features)


def to_model_input(images_uint8: np.ndarray | torch.Tensor, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, H, W, 3] uint8 → [N, 3, size, size] float in [-1, 1] (resized if needed)."""
    return to_pixels(images_uint8, device, size)


def augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 3, brightness: float = 0.03) -> torch.Tensor:
    """Random whole-pixel shifts (white fill) and a slight brightness jitter.

    Whole pixels because sub-pixel resampling blurs 32-px art and erases thin outlines, a style
    cue; no zoom because each vendor's drawing scale is a style cue too; hue, saturation and
    contrast are left alone because colour is one as well.
    """
    n, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (max_shift,) * 4, value=1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator, device=device)
    rows = (offsets[0][:, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = (offsets[1][:, None] + torch.arange(w, device=device))[:, None, None, :]
    channels = torch.arange(images.shape[1], device=device)[None, :, None, None]
    moved = padded[torch.arange(n, device=device)[:, None, None, None], channels, rows, cols]
    offset = (torch.rand(n, 1, 1, 1, generator=generator, device=device) * 2 - 1) * brightness * 2
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
    gray = (images * torch.tensor([0.299, 0.587, 0.114], device=images.device)[None, :, None, None]).sum(1, keepdim=True)
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


@dataclass
class Evaluator:
    """A trained evaluator with its class order; scores uint8 images of any size."""

    net: EvaluatorNet
    styles: list[str]
    emoji_keys: list[str]
    image_size: int
    device: torch.device

    @torch.no_grad()
    def predict(self, images_uint8: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
        """→ features [N, D] float32, style and content predictions as class indices [N]."""
        self.net.eval()
        feats, styles, contents, top5 = [], [], [], []
        for start in range(0, len(images_uint8), batch_size):
            x = to_model_input(images_uint8[start : start + batch_size], self.image_size, self.device)
            f, s, c = self.net(x)
            feats.append(f.float().cpu())
            styles.append(s.argmax(-1).cpu())
            contents.append(c.argmax(-1).cpu())
            top5.append(c.topk(min(5, c.shape[-1]), dim=-1).indices.cpu())
        if not feats:
            return {"features": np.zeros((0, self.net.embed[0].out_features), np.float32),
                    "style": np.zeros(0, np.int64), "content": np.zeros(0, np.int64),
                    "content_top5": np.zeros((0, 5), np.int64)}
        return {"features": torch.cat(feats).numpy(), "style": torch.cat(styles).numpy(),
                "content": torch.cat(contents).numpy(), "content_top5": torch.cat(top5).numpy()}

    def style_index(self, names) -> np.ndarray:
        lookup = {s: i for i, s in enumerate(self.styles)}
        return np.array([lookup.get(s, -1) for s in names], dtype=np.int64)

    def content_index(self, keys) -> np.ndarray:
        lookup = {k: i for i, k in enumerate(self.emoji_keys)}
        return np.array([lookup.get(k, -1) for k in keys], dtype=np.int64)


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
                    device: torch.device, autocast=None, progress: bool = True,
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
    net = EvaluatorNet(len(styles), len(emoji_keys), cfg.width, cfg.feature_dim, cfg.pooled_style).to(device)
    evaluator = Evaluator(net, styles, emoji_keys, images.shape[1], device)

    all_x = to_model_input(images, images.shape[1], device)
    recon_x = None if reconstructions is None else to_model_input(reconstructions, images.shape[1], device)
    style_y = torch.tensor(evaluator.style_index(items["style"]), device=device)
    content_y = torch.tensor(evaluator.content_index(items["emoji_key"]), device=device)
    style_ok = torch.tensor(split.style_train, device=device)
    content_ok = torch.tensor(split.content_train, device=device)
    usable = np.flatnonzero(split.style_train | split.content_train)
    release_step = min(cfg.steps, max(1, round(cfg.release_holdout_at * cfg.steps)))

    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warmup = max(1, cfg.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps)))
    generator = torch.Generator(device=device).manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    order, cursor = order_rng.permutation(usable), 0
    curve, held_out = [], None
    net.train()
    for step in tqdm(range(cfg.steps), desc="evaluators", disable=not progress, leave=False):
        if step == release_step:
            held_out = _held_out_report(evaluator, images, items, split, reconstructions)
            net.train()
            style_ok[:], content_ok[:] = True, True
            usable, cursor = np.arange(len(items)), len(order)  # reshuffle over every image
        if cursor + cfg.batch_size > len(order):
            order, cursor = order_rng.permutation(usable), 0
        index = torch.as_tensor(order[cursor : cursor + cfg.batch_size], device=device)
        cursor += cfg.batch_size
        x = all_x[index]
        if recon_x is not None and cfg.reconstruction_share > 0:
            use = torch.rand(len(index), generator=generator, device=device) < cfg.reconstruction_share
            x = torch.where(use[:, None, None, None], recon_x[index], x)
        if cfg.degrade:
            x = degrade(x, torch.Generator().manual_seed(seed * 100_019 + step))
        x = augment(x, generator)
        s_mask, c_mask = style_ok[index], content_ok[index]
        if cfg.content_views:  # a second, style-destroyed copy of the batch: content labels only
            cpu_generator = torch.Generator().manual_seed(seed * 100_003 + step)
            x = torch.cat([x, content_view(x, cpu_generator)])
            c_mask = torch.cat([c_mask, c_mask])
            s_mask = torch.cat([s_mask, torch.zeros_like(s_mask)])
            index = torch.cat([index, index])
        with autocast if autocast is not None else nullcontext():
            _, style_logits, content_logits = net(x)
        zero = style_logits.sum() * 0.0  # a batch may hold no label of one kind
        loss_style = F.cross_entropy(style_logits.float()[s_mask], style_y[index][s_mask]) if s_mask.any() else zero
        loss_content = (F.cross_entropy(content_logits.float()[c_mask], content_y[index][c_mask])
                        if c_mask.any() else zero)
        loss = loss_style + loss_content
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, cfg.steps // 20) == 0 or step == cfg.steps - 1:
            curve.append({"step": step, "loss": loss.item(), "loss_style": loss_style.item(),
                          "loss_content": loss_content.item()})
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


def save_evaluator(evaluator: Evaluator, folder: Path, cfg: EvaluatorsConfig, extra: dict | None = None) -> None:
    """Weights as safetensors + the architecture and class order as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / WEIGHTS_FILE, evaluator.net.state_dict())
    config = {"width": cfg.width, "feature_dim": cfg.feature_dim, "pooled_style": cfg.pooled_style,
              "image_size": evaluator.image_size,
              "styles": evaluator.styles, "emoji_keys": evaluator.emoji_keys, **(extra or {})}
    write_json(folder / CONFIG_FILE, config)


def load_evaluator(folder: str | Path, device: torch.device | str = "cpu") -> Evaluator:
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder / CONFIG_FILE}: evaluator config missing (run `pigeon stage evaluators`)")
    config = read_json(folder / CONFIG_FILE)
    try:
        net = EvaluatorNet(len(config["styles"]), len(config["emoji_keys"]), config["width"], config["feature_dim"],
                           bool(config.get("pooled_style", False)))
    except KeyError as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE}: missing key {exc}") from exc
    state = load_tensors(folder / WEIGHTS_FILE)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: weights do not match {CONFIG_FILE} "
                              f"({str(exc).splitlines()[0]})") from exc
    device = torch.device(device)
    return Evaluator(net.to(device).eval(), list(config["styles"]), list(config["emoji_keys"]),
                     int(config["image_size"]), device)


class PretrainedEncoder:
    """A local CLIP or DINO image encoder (transformers, local files only) for the paper's metrics."""

    def __init__(self, kind: str, path: str | Path, device: torch.device | str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel, CLIPModel

        path = Path(path).expanduser()
        self.kind = kind
        self.device = torch.device(device)
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        if kind == "clip":
            self.model = CLIPModel.from_pretrained(path, local_files_only=True)
        else:
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def features(self, images_uint8: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(images_uint8), batch_size):
            batch = list(np.asarray(images_uint8[start : start + batch_size]))
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            if self.kind == "clip":
                feats = self.model.get_image_features(pixel_values=pixels)
                feats = getattr(feats, "pooler_output", feats)
            else:
                feats = self.model(pixel_values=pixels).last_hidden_state[:, 0]  # CLS token, as DINO
            out.append(feats.float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def check_pretrained_paths(cfg: EvaluatorsConfig) -> list[str]:
    """Names of the configured local CLIP/DINO encoders; a set path without a model folder is an error."""
    found = []
    for kind, path in (("clip", cfg.clip_path), ("dino", cfg.dino_path)):
        if path:
            if not (Path(path).expanduser() / "config.json").is_file():
                raise ConfigError(f"evaluators.{kind}_path: {path} is not a local model folder (no config.json)")
            found.append(kind)
    return found


def pretrained_encoders(cfg: EvaluatorsConfig, device) -> dict[str, PretrainedEncoder]:
    """The configured local CLIP/DINO encoders ({} when none is set)."""
    paths = {"clip": cfg.clip_path, "dino": cfg.dino_path}
    return {kind: PretrainedEncoder(kind, paths[kind], device) for kind in check_pretrained_paths(cfg)}
