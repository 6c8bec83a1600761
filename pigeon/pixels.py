"""Pixel conversion between stored images and model tensors, in one place.

Stored images are ``[N, S, S, 3]`` uint8 (numpy or torch, NHWC); every model in the project reads and
writes ``[N, 3, S, S]`` float in ``[-1, 1]`` (NCHW). Resizing, where asked, is bilinear with
antialiasing (an area-like filter for downscaling).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_pixels(images_uint8: np.ndarray | torch.Tensor, device: torch.device | str = "cpu",
              size: int | None = None) -> torch.Tensor:
    """[N, S, S, 3] uint8 → contiguous [N, 3, size, size] float in [-1, 1] on ``device``.

    Contiguous NCHW on purpose: a channels-last batch made the VQ step ~1.5× slower on CPU.
    """
    x = torch.as_tensor(np.ascontiguousarray(images_uint8) if isinstance(images_uint8, np.ndarray)
                        else images_uint8).to(device)
    x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
    return x


def to_uint8(pixels: torch.Tensor, size: int | None = None) -> np.ndarray:
    """[N, 3, S', S'] float in [-1, 1] → [N, size, size, 3] uint8 numpy (resized when S' differs)."""
    pixels = pixels.float()
    if size is not None and pixels.shape[-1] != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
