"""The mask generator: a token-level noise filter over the history and reference images (docs/design.md §1).

Input: the LMM input embeddings of the H history images and of the reference image, plus a
per-image position embedding and a type embedding (history / reference). One transformer encoder
layer; a token's score is the cosine similarity between its input embedding and its encoder output.

The hard keep mask is applied by multiplication. In mode ``trained`` it carries a straight-through
gradient (``hard + soft - soft.detach()``, with ``soft`` a sigmoid of the score relative to the
keep threshold), so the generator learns from the generation loss; mode ``released`` applies the
same hard mask without gradient (the authors' released code); ``none`` keeps every history token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pigeon.config import MaskConfig
from pigeon.errors import ConfigError

HISTORY, REFERENCE = 0, 1


def keep_count(fraction_masked: torch.Tensor, total: int) -> torch.Tensor:
    """Tokens kept when ``fraction_masked`` of ``total`` are masked (round half up), as long."""
    return torch.floor((1.0 - fraction_masked) * total + 0.5).long().clamp(0, total)


def keep_top(scores: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, keep the ``counts[row]`` highest scores.

    scores [N, M], counts [N] → (keep [N, M] bool, threshold [N, 1]) where the threshold lies
    halfway between the last kept and the first dropped score (beyond the ends when all or none kept).
    """
    n, m = scores.shape
    detached = scores.detach()
    order = detached.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m, device=scores.device).expand(n, m))
    keep = ranks < counts[:, None]
    ordered = detached.gather(1, order)
    padded = torch.cat([ordered[:, :1] + 1.0, ordered, ordered[:, -1:] - 1.0], dim=1)
    index = counts[:, None]
    threshold = (padded.gather(1, index) + padded.gather(1, index + 1)) / 2
    return keep, threshold


class MaskGenerator(nn.Module):
    def __init__(self, d_model: int, history_len: int, cfg: MaskConfig):
        super().__init__()
        if d_model % cfg.num_heads:
            raise ConfigError(
                f"model.mask.num_heads: {cfg.num_heads} does not divide the backbone width {d_model}"
            )
        self.history_len = history_len
        self.alpha_hist = cfg.alpha_hist
        self.mode = cfg.mode
        self.image_position = nn.Embedding(history_len + 1, d_model)
        self.token_type = nn.Embedding(2, d_model)
        self.encoder = nn.TransformerEncoderLayer(
            d_model, cfg.num_heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        nn.init.normal_(self.image_position.weight, std=0.02)
        nn.init.normal_(self.token_type.weight, std=0.02)

    def scores(self, history_embeds: torch.Tensor, reference_embeds: torch.Tensor):
        """history_embeds [B, H, T, d], reference_embeds [B, T, d] → scores [B, H, T], [B, T]."""
        b, h, t, d = history_embeds.shape
        dtype = self.token_type.weight.dtype
        # fp32 scores: bf16 cosines tie often, which would make the top-k keep set arbitrary.
        with torch.autocast(history_embeds.device.type, enabled=False):
            embeds = torch.cat([history_embeds, reference_embeds[:, None]], dim=1).to(dtype)  # [B, H+1, T, d]
            image_ids = torch.arange(h + 1, device=embeds.device)
            type_ids = (image_ids == h).long()
            marks = self.image_position(image_ids) + self.token_type(type_ids)  # [H+1, d]
            encoded = self.encoder((embeds + marks[None, :, None, :]).reshape(b, (h + 1) * t, d))
            cosine = F.cosine_similarity(embeds.reshape(b, (h + 1) * t, d), encoded, dim=-1, eps=1e-6)
        cosine = cosine.reshape(b, h + 1, t)
        return cosine[:, :h], cosine[:, h]

    def _select(self, scores: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep, threshold = keep_top(scores, counts)
        hard = keep.to(scores.dtype)
        if self.mode != "trained" or not torch.is_grad_enabled():
            return keep, hard
        # Scale by the scores' spread so the sigmoid passes gradient to many tokens, not only the nearest.
        spread = scores.detach().std(dim=1, keepdim=True).clamp_min(1e-4)
        soft = torch.sigmoid((scores - threshold) / spread)
        return keep, hard + (soft - soft.detach())  # forward value is exactly `hard`

    def history_mask(self, history_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the top (1 − α_h) of all history tokens jointly → (keep [B, H, T] bool, mask float)."""
        b, h, t = history_scores.shape
        if self.mode == "none":
            keep = torch.ones_like(history_scores, dtype=torch.bool)
            return keep, keep.to(history_scores.dtype)
        counts = keep_count(torch.full((b,), self.alpha_hist, device=history_scores.device), h * t)
        keep, mask = self._select(history_scores.reshape(b, h * t), counts)
        return keep.reshape(b, h, t), mask.reshape(b, h, t)

    def reference_mask(
        self, reference_scores: torch.Tensor, alpha_ref: torch.Tensor, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep (1 − α_r) of the reference tokens: training masks the high-scoring ones, inference the
        low-scoring ones → (keep [B, T] bool, mask float)."""
        counts = keep_count(alpha_ref.to(reference_scores.device), reference_scores.shape[1])
        signed = -reference_scores if training else reference_scores
        return self._select(signed, counts)
