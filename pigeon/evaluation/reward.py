"""Reward ranking of candidates (docs/design.md §1).

Reward = w_history · mean cosine similarity to the window's history images
       + w_reference · cosine similarity to its reference image.

With ``split`` features (``rank.features``) the history term compares only the style statistics
(the latents' channel mean and std: how the images are drawn, wherever things are) and the
reference term only the layout (the 2×2 grid: what is where). Comparing everything in both terms
rewards a candidate for taking the reference's *style* too, and for the history images' layouts,
which say nothing about the image to make.

The reward encoder is ``Backbone.image_features``: the foundation visual tokenizer's encoder,
pre-quantisation, pooled (spatial mean and std, which carry style, plus a coarse layout grid).
Why this encoder: it is part of the model being aligned and was trained only on training-split
images by the foundation stage, so ranking adds no outside knowledge and never touches test
images; and it is *not* the evaluation encoder (``models/evaluators`` is trained separately and
used only for metrics), so DPO cannot overfit the yardstick it is measured with.

Features are centred on the mean feature of the training windows' own images before the cosine:
pooled latents share a large common component, and without centring every cosine is close to 1
and the ranking is decided by that shared offset rather than by content and style.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pigeon.models.batching import images_to_tensor


class RewardEncoder:
    """Pooled tokenizer-encoder features of uint8 images, centred, L2-normalised — as a whole, or with
    ``split`` the style part (the first ``backbone.image_style_dims``) and the layout part separately."""

    def __init__(self, backbone, batch_size: int = 256, split: bool = False):
        self.backbone = backbone
        self.batch_size = batch_size
        self.center: torch.Tensor | None = None
        dims = getattr(backbone, "image_style_dims", None)
        self.style_dims: int | None = dims if split else None

    @torch.no_grad()
    def raw_features(self, images_uint8: np.ndarray) -> torch.Tensor:
        """[N, S, S, 3] uint8 → [N, D] float on the CPU."""
        device = next(self.backbone.parameters()).device
        out = []
        for start in range(0, len(images_uint8), self.batch_size):
            images = images_to_tensor(images_uint8[start : start + self.batch_size], self.backbone.image_size, device)
            out.append(self.backbone.image_features(images).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def fit_items(self, item_images: np.ndarray, center_items: np.ndarray) -> torch.Tensor:
        """Centre on the mean feature of ``center_items`` (ids into ``item_images``: the training windows'
        images) and return every item's unit features, from one encoder pass over the items."""
        raw = self.raw_features(item_images)
        self.center = raw[torch.from_numpy(np.unique(np.asarray(center_items, dtype=np.int64)))].mean(dim=0)
        return self._unit(raw)

    def features(self, images_uint8: np.ndarray) -> torch.Tensor:
        return self._unit(self.raw_features(images_uint8))

    def _unit(self, raw: torch.Tensor) -> torch.Tensor:
        centred = raw if self.center is None else raw - self.center
        if self.style_dims is None or self.style_dims >= raw.shape[-1]:
            return F.normalize(centred, dim=-1)
        k = self.style_dims
        return torch.cat([F.normalize(centred[..., :k], dim=-1), F.normalize(centred[..., k:], dim=-1)], dim=-1)

def candidate_rewards(candidates: torch.Tensor, history: torch.Tensor, reference: torch.Tensor,
                      w_history: float, w_reference: float, style_dims: int | None = None) -> dict[str, torch.Tensor]:
    """candidates [W, S, D], history [W, H, D], reference [W, D] (:class:`RewardEncoder` features) → [W, S]
    rewards and parts. ``style_dims`` (the encoder's, when split): the history term reads the first
    ``style_dims`` features, the reference term the rest."""
    style = slice(None, style_dims)
    layout = slice(style_dims, None) if style_dims is not None else slice(None)
    history_sim = torch.einsum("wsd,whd->wsh", candidates[..., style], history[..., style]).mean(dim=-1)
    reference_sim = torch.einsum("wsd,wd->ws", candidates[..., layout], reference[..., layout])
    return {"reward": w_history * history_sim + w_reference * reference_sim,
            "history_sim": history_sim, "reference_sim": reference_sim}


def choose_pairs(rewards: torch.Tensor, min_margin: float) -> dict[str, torch.Tensor]:
    """Chosen = best, rejected = worst candidate of each window; ``keep`` drops windows whose margin is
    below ``min_margin`` or zero (no preference to learn)."""
    chosen = rewards.argmax(dim=1)
    rejected = rewards.argmin(dim=1)
    margin = rewards.max(dim=1).values - rewards.min(dim=1).values
    return {"chosen": chosen, "rejected": rejected, "margin": margin,
            "keep": (margin >= min_margin) & (margin > 0)}


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=1).argsort(dim=1).float()


def ranking_agreement(rewards: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How often two rewards pick the same chosen / rejected / pair, and their mean Spearman correlation."""
    a, b = choose_pairs(rewards, 0.0), choose_pairs(other, 0.0)
    ra, rb = _ranks(rewards), _ranks(other)
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    spearman = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
    same_chosen = a["chosen"] == b["chosen"]
    same_rejected = a["rejected"] == b["rejected"]
    return {"chosen": float(same_chosen.float().mean()), "rejected": float(same_rejected.float().mean()),
            "pair": float((same_chosen & same_rejected).float().mean()), "spearman": float(spearman.mean())}
