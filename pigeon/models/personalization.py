"""The personalization module (docs/design.md §1): the multimodal instruction.

Three inputs reach the LM besides the caption:

- **style tokens**: one vector per history image, the mean of its *kept* token embeddings (the mask
  generator's keep mask weights the mean, so its straight-through gradient reaches the generator).
  A bag of visual codes says which palette, outline and shading an image uses, and a pooled vector
  is a much shorter path for the optimizer than attention over H × T history tokens;
- **the reference grid**: the reference image's *style-stripped view* (:func:`reference_view`:
  grayscale; in training also randomly rescaled, shifted, blurred and re-contrasted), tokenized, and
  entered token by token (each token's embedding plus the adapter's residual on its dense
  features, masked tokens zeroed), so its layout passes position by position;
- or, as the paper's pathway and an ablation (``model.reference: pooled``), the kept reference
  features mean-pooled and mapped by the adapter MLP to a single ``<emb>`` vector.

Why a stripped view: stage 1 reconstructs the target from itself, so a reference that still carries
its vendor's colours lets the model copy the style and ignore the history (measured: a colour grid
reference gives recognisable emoji in the *reference's* style, style accuracy 0.05). Grayscale and
random geometry remove the cheapest style cues (palette, drawing scale and position); the history
is then the only reliable source of style. Generic image operations only: no example ever shows an
emoji re-drawn in another vendor's style.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LUMA = (0.299, 0.587, 0.114)


def build_prompt(caption: str) -> str:
    """The text prompt of a window: the reference's caption (its content, never its style).

    The backbone wraps it in its own instruction format (``tokenize_captions``); here it is only
    normalised, so that the built-in word-level tokenizer sees the words it was built from.
    """
    return " ".join(str(caption).split())


def masked_mean(features: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """features [..., T, c], keep_mask [..., T] (float, may carry gradient) → [..., c]; all-masked → 0."""
    weights = keep_mask.to(features.dtype).unsqueeze(-1)
    return (features * weights).sum(dim=-2) / weights.sum(dim=-2).clamp_min(1.0)


def style_tokens(history_embeds: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
    """history_embeds [B, H, T, d], history_mask [B, H, T] → one style vector per image [B, H, d]."""
    return masked_mean(history_embeds, history_mask)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable gaussian blur (5 taps); x [N, 1, S, S], sigma [N] (0 = unchanged)."""
    taps = torch.arange(-2, 3, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [N, 5]
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate").reshape(1, n, x.shape[2] + 4, x.shape[3] + 4)
    out = F.conv2d(padded, kernel.reshape(n, 1, 1, 5), groups=n)
    out = F.conv2d(out, kernel.reshape(n, 1, 5, 1), groups=n)
    return out.reshape_as(x)


def reference_view(images_uint8: np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
    """The style-stripped view of reference images: [N, S, S, 3] uint8 → [N, S, S, 3] uint8 gray.

    Without ``generator``: plain luminance (inference, deterministic). With it (training views): also a
    random scale in [0.8, 1.2] and shift of up to 2 px (white fill), a blur of σ ∈ [0, 1.2] and a random
    gamma and contrast, so neither the vendor's drawing geometry nor its line weight can be trusted.
    """
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).float().div(255.0)
    gray = (x @ torch.tensor(LUMA))[:, None]  # [N, 1, S, S] in [0, 1]
    if generator is not None and len(gray):
        n, size = gray.shape[0], gray.shape[-1]
        u = torch.rand(n, 6, generator=generator)
        scale = 0.8 + 0.4 * u[:, 0]
        shift = (u[:, 1:3] * 2 - 1) * (2.0 * 2 / size)  # ±2 px in grid units
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(gray.shape), align_corners=False)
        gray = 1.0 - F.grid_sample(1.0 - gray, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        gray = gaussian_blur(gray, 1.2 * u[:, 3])
        gamma = torch.exp((u[:, 4] * 2 - 1) * 0.5)[:, None, None, None]
        contrast = (0.7 + 0.6 * u[:, 5])[:, None, None, None]
        gray = 1.0 - (1.0 - gray.clamp(0, 1) ** gamma) * contrast
    return (gray.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy().copy()


class Adapter(nn.Module):
    """Dense reference features (cond_dim) → LM input vectors (d_model).

    ``pool=True`` (the paper's pathway): the kept features are mean-pooled into one ``<emb>`` vector.
    ``pool=False`` (the grid): applied token by token as a residual on the tokens' own embeddings; its
    output layer starts at zero, so an untrained adapter leaves the pretrained grid unchanged.
    """

    def __init__(self, cond_dim: int, hidden: int, d_model: int, pool: bool = False):
        super().__init__()
        self.pool = pool
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, d_model))
        if not pool:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, features: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
        """features [B, T, cond_dim], keep_mask [B, T] → [B, d_model] (pooled) or [B, T, d_model]."""
        dtype = self.mlp[0].weight.dtype
        if self.pool:
            return self.mlp(masked_mean(features.to(dtype), keep_mask.to(dtype)))
        return self.mlp(features.to(dtype)) * keep_mask.to(dtype).unsqueeze(-1)
