"""The personalization module (DESIGN.md §1): the multimodal instruction.

The reference caption becomes the text prompt; the reference tokens the mask generator keeps become
dense visual features (``backbone.condition_features``), are mean-pooled and mapped by an adapter
MLP to the single ``<emb>`` vector. Reference tokens never enter the sequence themselves.
"""

from __future__ import annotations

import torch
from torch import nn


def build_prompt(caption: str) -> str:
    """The text prompt of a window: the reference's caption (its content, never its style).

    The backbone wraps it in its own instruction format (``tokenize_captions``); here it is only
    normalised, so that the built-in word-level tokenizer sees the words it was built from.
    """
    return " ".join(str(caption).split())


def masked_mean(features: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """features [B, T, c], keep_mask [B, T] (float, may carry gradient) → [B, c]; all-masked rows → 0."""
    weights = keep_mask.to(features.dtype).unsqueeze(-1)
    return (features * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class Adapter(nn.Module):
    """Pooled kept-reference features (cond_dim) → the ``<emb>`` input vector (d_model)."""

    def __init__(self, cond_dim: int, hidden: int, d_model: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, d_model))

    def forward(self, features: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
        """features [B, T, cond_dim], keep_mask [B, T] → [B, d_model]."""
        dtype = self.mlp[0].weight.dtype
        return self.mlp(masked_mean(features.to(dtype), keep_mask.to(dtype)))
