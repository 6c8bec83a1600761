"""Style statistics transfer in the detokenizer (docs/design.md §1.4).

The LM writes the codes; while the detokenizer decodes them, its feature maps at the backbone's
``style_layers()`` are renormalised, channel by channel, to the mean and standard deviation that the same
layers show when they decode the user's history — counted only over the history tokens the mask
generator kept, so the noise filter decides which images set the style. This is adaptive instance
normalisation (AdaIN, Huang & Belongie 2017), the feature-statistics alignment that training-free style
methods (StyleAligned, Hertz et al. 2023) apply inside a generator: first-order statistics of a
decoder's features are where palette, shading and contrast live, while the spatial arrangement (the
reference's layout the LM kept) is left to the codes. It has no parameters and trains on nothing, so the
method's premise holds: no example ever pairs an emoji in two styles. ``strength`` blends the
renormalised map with the plain one (0 = the plain decoder).

Why our own hooks rather than a library: diffusers and transformers have no hook for "decode with another
image's feature statistics", and the two detokenizers here (diffusers ``VQModel``, transformers'
Janus VQ) share only ``nn.Module`` forward hooks.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from pigeon.errors import ConfigError

EPS = 1e-5


def _tensor(output) -> torch.Tensor:
    return output if torch.is_tensor(output) else output[0]


def _replace(output, value: torch.Tensor):
    return value if torch.is_tensor(output) else (value, *output[1:])


def keep_weights(keep: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """keep [N, H, T] (T = side²) → per-pixel weights [N, H, 1, h, w] at a feature map's resolution."""
    n, h, t = keep.shape
    side = round(t ** 0.5)
    if side * side != t:
        raise ValueError(f"{t} tokens per image do not form a square grid")
    grid = keep.float().reshape(n * h, 1, side, side)
    return F.interpolate(grid, size=size, mode="nearest").reshape(n, h, 1, *size)


def weighted_statistics(features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """features [N, H, C, h, w], weights [N, H, 1, h, w] → (mean [N, C], std [N, C], weight total [N])
    over every kept position of the N rows' H images, in fp32."""
    f, w = features.float(), weights.float()
    total = w.sum(dim=(1, 3, 4))  # [N, 1]
    denom = total.clamp_min(EPS)
    mean = (f * w).sum(dim=(1, 3, 4)) / denom
    var = ((f - mean[:, None, :, None, None]) ** 2 * w).sum(dim=(1, 3, 4)) / denom
    return mean, var.clamp_min(0).sqrt(), total.squeeze(1)


def renormalise(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """AdaIN of features [N, C, h, w] to (mean, std) [N, C], blended per row by strength [N]."""
    f = features.float()
    own_mean = f.mean(dim=(2, 3), keepdim=True)
    own_std = f.std(dim=(2, 3), keepdim=True) + EPS
    styled = (f - own_mean) / own_std * std[:, :, None, None] + mean[:, :, None, None]
    s = strength[:, None, None, None]
    return (s * styled + (1 - s) * f).to(features.dtype)


@contextmanager
def _hooks(layers: list[nn.Module], hook_for):
    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def decode_in_style(backbone, codes: torch.Tensor, history_codes: torch.Tensor, history_keep: torch.Tensor,
                    strength: float) -> torch.Tensor:
    """codes [N, T] → images [N, 3, S, S], decoded with the feature statistics of each row's kept history.

    history_codes / history_keep: [N, H, T], one history per row (a window's rows repeat its history). A
    row whose mask keeps no history token decodes plainly."""
    layers = backbone.style_layers()
    if not layers:
        raise ConfigError(f"evaluate.style_strength: {type(backbone).__name__} with this detokenizer has no "
                          "style layers; set it to 0")
    n, h, t = history_codes.shape
    if codes.shape[0] != n or history_keep.shape != history_codes.shape:
        raise ValueError(f"codes {tuple(codes.shape)}, history codes {tuple(history_codes.shape)} and keep "
                         f"{tuple(history_keep.shape)} disagree")
    targets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(layers)

    def record(i):
        def hook(module, args, output):
            f = _tensor(output)
            feats = f.reshape(n, h, *f.shape[1:])
            targets[i] = weighted_statistics(feats, keep_weights(history_keep.to(f.device), f.shape[-2:]))
        return hook

    with _hooks(layers, record):
        backbone.decode_codes(history_codes.reshape(n * h, t))
    if any(target is None for target in targets):
        raise ConfigError("evaluate.style_strength: the detokenizer did not run the backbone's style layers")

    def apply(i):
        def hook(module, args, output):
            mean, std, total = targets[i]
            blend = torch.where(total > 0, torch.full_like(total, float(strength)), torch.zeros_like(total))
            return _replace(output, renormalise(_tensor(output), mean, std, blend))
        return hook

    with _hooks(layers, apply):
        return backbone.decode_codes(codes)
