"""The visual tokenizer of the tiny backbone: a diffusers ``VQModel`` and the helpers that train it.

``VQModel``'s own quantizer is used for the codebook (``vq.quantize.embedding``); the nearest-code
search and the losses run here in fp32 so that bf16 autocast never touches the codebook distances.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import VQModel

from pigeon.config import VQConfig
from pigeon.errors import ConfigError

COMMITMENT_WEIGHT = 0.25  # β of VQ-VAE: encoder commitment vs codebook loss


def norm_groups(*channels: int) -> int:
    """The largest group count ≤ 32 that divides every channel width (GroupNorm needs it)."""
    groups = math.gcd(*channels)
    for candidate in range(min(32, groups), 0, -1):
        if groups % candidate == 0:
            return candidate
    return 1


def build_vq_model(cfg: VQConfig, image_size: int) -> VQModel:
    """Encoder/decoder with len(block_channels) blocks: downsampling ×2^(blocks-1)."""
    blocks = len(cfg.block_channels)
    factor = 2 ** (blocks - 1)
    if blocks < 1 or image_size % factor:
        raise ConfigError(f"backbone.vq.block_channels: {blocks} blocks do not divide image size "
                          f"{image_size}")
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(cfg.block_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        sample_size=image_size,
        num_vq_embeddings=cfg.codebook_size,
        norm_num_groups=norm_groups(*cfg.block_channels, cfg.latent_channels),
        vq_embed_dim=cfg.code_dim,
    )


def latent_side(cfg: VQConfig, image_size: int) -> int:
    return image_size // 2 ** (len(cfg.block_channels) - 1)


def codebook(vq: VQModel) -> torch.Tensor:
    return vq.quantize.embedding.weight


def nearest_codes(latents: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """latents [B, D, h, w] → code indices [B, h*w] (row-major), distances in fp32."""
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
    book = book.float()
    # ||z||² − 2 z·e + ||e||²: one matmul, cheaper than cdist and exact enough for an argmin.
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.t() + book.pow(2).sum(1)[None]
    return dist.argmin(1).view(latents.shape[0], -1)


def quantize(vq: VQModel, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-quant latents [B, D, h, w] → (straight-through quantized latents, codes [B, h*w], VQ loss)."""
    with torch.autocast(latents.device.type, enabled=False):
        z = latents.float()
        codes = nearest_codes(z, codebook(vq))
        z_q = codes_to_latents(vq, codes, z.shape[-1])
        loss = F.mse_loss(z_q, z.detach()) + COMMITMENT_WEIGHT * F.mse_loss(z, z_q.detach())
        z_st = z + (z_q - z).detach()
    return z_st, codes, loss


def codes_to_latents(vq: VQModel, codes: torch.Tensor, side: int) -> torch.Tensor:
    """codes [B, side*side] → codebook vectors laid out as [B, D, side, side]."""
    b = codes.shape[0]
    return vq.quantize.get_codebook_entry(codes.reshape(-1), (b, side, side, codebook(vq).shape[1]))


def decode_latents(vq: VQModel, quantized: torch.Tensor) -> torch.Tensor:
    """Quantized latents → images in [-1, 1] (unclamped while training)."""
    return vq.decode(quantized, force_not_quantize=True).sample


@torch.no_grad()
def init_codebook_from_data(vq: VQModel, latents: torch.Tensor, generator: torch.Generator) -> None:
    """Set every codebook vector to a distinct random encoder output, so no code starts dead."""
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
    book = codebook(vq)
    pick = torch.randperm(flat.shape[0], generator=generator)[: book.shape[0]]
    if pick.numel() < book.shape[0]:  # fewer vectors than codes: repeat with a little jitter
        pick = pick[torch.randint(0, pick.numel(), (book.shape[0],), generator=generator)]
    chosen = flat[pick.to(flat.device)]
    jitter = 1e-3 * torch.randn(chosen.shape, generator=generator).to(chosen.device)
    book.copy_(chosen + jitter * chosen.std())


@torch.no_grad()
def reseed_dead_codes(vq: VQModel, usage: torch.Tensor, latents: torch.Tensor,
                      generator: torch.Generator) -> int:
    """Codes unused since the last call take the place of random current encoder outputs."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
    pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator).to(flat.device)
    codebook(vq)[dead.to(flat.device)] = flat[pick]
    return int(dead.numel())


def pooled_features(latents: torch.Tensor) -> torch.Tensor:
    """Pre-quant latents [B, D, h, w] → [B, 6D]: spatial mean and std (style) + 2×2 means (layout)."""
    z = latents.float()
    grid = F.adaptive_avg_pool2d(z, 2).flatten(1)
    return torch.cat([z.mean((2, 3)), z.std((2, 3)), grid], dim=1)
