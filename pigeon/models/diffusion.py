"""The LaVIT-style diffusion detokenizer: visual codes → pixels by a conditional denoiser.

The codes' codebook vectors go through a small conditioning encoder (linear + position embedding
+ one transformer layer) and condition a diffusers ``UNet2DConditionModel`` by cross-attention.
Trained with the DDPM noise-prediction loss; sampled with DDIM (deterministic, η = 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn

from pigeon.config import DiffusionConfig
from pigeon.models.vq import norm_groups


class ConditionEncoder(nn.Module):
    """Codebook vectors [B, T, code_dim] → conditioning tokens [B, T, cross_dim]."""

    def __init__(self, code_dim: int, cross_dim: int, tokens: int):
        super().__init__()
        self.proj = nn.Linear(code_dim, cross_dim)
        self.position = nn.Parameter(torch.zeros(1, tokens, cross_dim))
        heads = max(1, cross_dim // 32)
        self.layer = nn.TransformerEncoderLayer(
            cross_dim, heads, dim_feedforward=2 * cross_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(cross_dim)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layer(self.proj(vectors) + self.position[:, : vectors.shape[1]]))


def build_unet(cfg: DiffusionConfig, image_size: int) -> UNet2DConditionModel:
    blocks = len(cfg.block_channels)
    # Cross-attention everywhere but the full-resolution block (32 px: at 16² and 8²).
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (blocks - 1)
    up = ("CrossAttnUpBlock2D",) * (blocks - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_channels),
        layers_per_block=1,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=tuple(max(1, c // 32) for c in cfg.block_channels),  # = heads in diffusers
        norm_num_groups=norm_groups(*cfg.block_channels),
    )


def scheduler_config(cfg: DiffusionConfig) -> dict:
    return {
        "num_train_timesteps": cfg.train_timesteps,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "clip_sample": True,
    }


class DiffusionDetokenizer(nn.Module):
    def __init__(self, cfg: DiffusionConfig, code_dim: int, tokens_per_image: int, image_size: int):
        super().__init__()
        self.cfg = cfg
        self.image_size = image_size
        self.condition_encoder = ConditionEncoder(code_dim, cfg.cross_attention_dim, tokens_per_image)
        self.unet = build_unet(cfg, image_size)
        self.train_scheduler = DDPMScheduler(**scheduler_config(cfg))

    @property
    def cond_dim(self) -> int:
        return self.cfg.cross_attention_dim

    def loss(self, images: torch.Tensor, vectors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """DDPM ε-prediction loss on images [B, 3, S, S] given codebook vectors [B, T, code_dim]."""
        b = images.shape[0]
        noise = torch.randn(images.shape, generator=generator).to(images.device)
        steps = torch.randint(0, self.cfg.train_timesteps, (b,), generator=generator).to(images.device)
        noisy = self.train_scheduler.add_noise(images, noise, steps)
        cond = self.condition_encoder(vectors)
        pred = self.unet(noisy, steps, encoder_hidden_states=cond).sample
        return F.mse_loss(pred.float(), noise)

    @torch.no_grad()
    def sample(self, vectors: torch.Tensor, generator: torch.Generator,
               steps: int | None = None) -> torch.Tensor:
        """DDIM sampling conditioned on codebook vectors [B, T, code_dim] → images in [-1, 1]."""
        scheduler = DDIMScheduler(**scheduler_config(self.cfg))
        scheduler.set_timesteps(steps or self.cfg.inference_steps, device=vectors.device)
        cond = self.condition_encoder(vectors)
        shape = (vectors.shape[0], 3, self.image_size, self.image_size)
        x = torch.randn(shape, generator=generator).to(vectors.device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = self.unet(x, t, encoder_hidden_states=cond).sample.float()
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        return x.clamp(-1, 1)
