"""Foundation pretraining of the tiny backbone (the role of LaVIT's pretraining, DESIGN.md §2).

Three phases, each resumable from ``checkpoint_every``-step checkpoints:
(a) ``vq``: the VQ tokenizer on images (AdamW, bf16 autocast with the quantizer in fp32, codebook
    initialised from encoder outputs, codes unused for ``dead_code_every`` steps re-seeded);
(b) ``lm``: the LM on ``[caption] <img> codes </img>``, a quarter of them with an empty caption
    (plain image-code sequences), loss on the codes and ``</img>`` over the visual vocabulary;
(c) ``diffusion``: the diffusion detokenizer (DDPM loss), when enabled and ``diffusion_steps > 0``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pigeon.config import FoundationConfig
from pigeon.errors import DataError
from pigeon.evaluation import metrics
from pigeon.models.tiny import TinyBackbone
from pigeon.models.vq import decode_latents, init_codebook_from_data, quantize, reseed_dead_codes
from pigeon.runtime import autocast
from pigeon.training.checkpoint import (
    epoch_batch,
    load_optimizer,
    load_state,
    optimizer_tensors,
    save_state,
    step_generator,
)

PLAIN_SHARE = 0.25  # share of LM sequences with an empty caption (unconditional image codes)
WARMUP_STEPS = 20
PHASES = ("vq", "encode", "lm", "diffusion", "done")


def split_holdout(items: pd.DataFrame, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train item ids, held-out item ids): whole emoji (every style of them) are held out."""
    keys = np.array(sorted(items["emoji_key"].unique()))
    if len(keys) < 2:
        raise DataError(f"items: {len(keys)} distinct emoji_key, need at least 2 to hold some out")
    count = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    held = set(np.random.default_rng(seed).permutation(keys)[:count])
    mask = items["emoji_key"].isin(held).to_numpy()
    ids = items["item_id"].to_numpy()
    return ids[~mask], ids[mask]


def to_model_images(images_uint8: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """[N, S, S, 3] uint8 → [N, 3, S, S] float in [-1, 1] on device."""
    x = torch.as_tensor(images_uint8).to(device)
    # contiguous NCHW: a channels-last batch made the VQ step ~1.5× slower on CPU.
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of the base rate."""
    warmup = min(WARMUP_STEPS, max(1, total // 10))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class FoundationData:
    images: torch.Tensor  # [N, S, S, 3] uint8, training images
    captions: list[str]
    holdout_images: torch.Tensor
    holdout_captions: list[str]

    def fingerprint(self) -> str:
        digest = hashlib.md5(self.images.numpy().tobytes())
        digest.update(self.holdout_images.numpy().tobytes())
        digest.update(json.dumps([self.captions, self.holdout_captions]).encode())
        return digest.hexdigest()


@dataclass
class Progress:
    phase: str = "vq"
    step: int = 0
    curves: list = field(default_factory=list)  # rows: phase, step, loss, part losses
    seconds: dict = field(default_factory=dict)


class FoundationTrainer:
    def __init__(self, backbone: TinyBackbone, data: FoundationData, cfg: FoundationConfig, seed: int,
                 checkpoint_dir: Path, fingerprint: str, progress_bars: bool = True):
        self.model, self.data, self.cfg, self.seed = backbone, data, cfg, seed
        self.device = backbone.device
        self.checkpoint_dir, self.fingerprint = Path(checkpoint_dir), fingerprint
        self.bars = progress_bars
        self.state = Progress()
        self.codes: torch.Tensor | None = None  # [N, T] training codes after the vq phase
        self.holdout_codes: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.usage = torch.zeros(backbone.codebook_size, dtype=torch.long)
        length = backbone.cfg.lm.max_caption_tokens
        self.caption_ids, self.caption_mask = backbone.tokenize_captions(data.captions, length)
        self.empty_ids, self.empty_mask = backbone.tokenize_captions([""], length)
        self.resumed_from: tuple[str, int] | None = None
        self._mark = time.perf_counter()

    # --- checkpoints ----------------------------------------------------------------------------
    def _save(self) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.base_state_dict().items()}
        optimizer_meta = None
        if self.optimizer is not None:
            opt_tensors, optimizer_meta = optimizer_tensors(self.optimizer)
            tensors.update(opt_tensors)
        tensors["vq_usage"] = self.usage
        if self.codes is not None:
            tensors["codes"], tensors["holdout_codes"] = self.codes, self.holdout_codes
        meta = {"fingerprint": self.fingerprint, "phase": self.state.phase, "step": self.state.step,
                "curves": self.state.curves, "seconds": self.state.seconds, "optimizer": optimizer_meta}
        save_state(self.checkpoint_dir, tensors, meta)

    def _resume(self) -> None:
        found = load_state(self.checkpoint_dir, self.fingerprint)
        if found is None:
            return
        tensors, meta = found
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state, strict=True)
        self.state = Progress(meta["phase"], meta["step"], meta["curves"], meta["seconds"])
        self.usage = tensors["vq_usage"]
        if "codes" in tensors:
            self.codes = tensors["codes"].to(self.device)
            self.holdout_codes = tensors["holdout_codes"].to(self.device)
        if meta["optimizer"]:
            self.optimizer = self._make_optimizer(self.state.phase)
            load_optimizer(self.optimizer, tensors, meta["optimizer"])
        self.resumed_from = (self.state.phase, self.state.step)
        tqdm.write(f"foundation: resuming at {self.state.phase} step {self.state.step}")

    def _make_optimizer(self, phase: str) -> torch.optim.Optimizer | None:
        module, lr = {"vq": (self.model.vq, self.cfg.vq_lr), "lm": (self.model.lm, self.cfg.lm_lr),
                      "diffusion": (self.model.diffusion, self.cfg.diffusion_lr)}.get(phase, (None, 0.0))
        return None if module is None else torch.optim.AdamW(module.parameters(), lr=lr)

    def _next_phase(self) -> None:
        order = list(PHASES)
        phase = order[order.index(self.state.phase) + 1]
        if phase == "diffusion" and (self.model.diffusion is None or self.cfg.diffusion_steps == 0):
            phase = "done"
        self.state.phase, self.state.step = phase, 0
        self.optimizer = self._make_optimizer(phase)

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> Progress:
        self._resume()
        if self.optimizer is None and self.state.step == 0:
            self.optimizer = self._make_optimizer(self.state.phase)
        while self.state.phase != "done":
            phase, self._mark = self.state.phase, time.perf_counter()
            if phase == "encode":
                self.codes = self.encode_all(self.data.images)
                self.holdout_codes = self.encode_all(self.data.holdout_images)
            else:
                self._train_phase(phase)
            self._tick(phase)
            self._next_phase()
            self._save()
        return self.state

    def _tick(self, phase: str) -> None:
        """Add the time spent since the last mark to the phase (seconds survive a resume)."""
        now = time.perf_counter()
        self.state.seconds[phase] = round(self.state.seconds.get(phase, 0.0) + now - self._mark, 3)
        self._mark = now

    def _train_phase(self, phase: str) -> None:
        steps, base_lr, step_fn = {
            "vq": (self.cfg.vq_steps, self.cfg.vq_lr, self.vq_step),
            "lm": (self.cfg.lm_steps, self.cfg.lm_lr, self.lm_step),
            "diffusion": (self.cfg.diffusion_steps, self.cfg.diffusion_lr, self.diffusion_step),
        }[phase]
        bar = tqdm(total=steps, initial=self.state.step, desc=f"foundation {phase}", disable=not self.bars,
                   dynamic_ncols=True, leave=False)
        while self.state.step < steps:
            step = self.state.step
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, steps, base_lr)
            losses = step_fn(step, steps)
            rounded = {k: round(v, 6) for k, v in losses.items()}
            self.state.curves.append({"phase": phase, "step": step, **rounded})
            self.state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", refresh=False)
            if self.state.step % self.cfg.checkpoint_every == 0 and self.state.step < steps:
                self._tick(phase)
                self._save()
        bar.close()

    def _optimize(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def vq_step(self, step: int, steps: int) -> dict[str, float]:
        vq = self.model.vq
        idx = epoch_batch(len(self.data.images), self.cfg.vq_batch_size, step, self.seed, "vq")
        x = to_model_images(self.data.images[idx], self.device)
        with autocast(self.device):
            latents = vq.encode(x).latents
        if step == 0:
            init_codebook_from_data(vq, latents.detach(), step_generator(self.seed, "vq-init", 0))
        z_q, codes, vq_loss = quantize(vq, latents)
        with autocast(self.device):
            recon = decode_latents(vq, z_q)
        recon_loss = F.mse_loss(recon.float(), x)
        loss = recon_loss + vq_loss
        self._optimize(loss)
        self.usage += torch.bincount(codes.flatten().cpu(), minlength=self.usage.numel())
        reseeded = 0
        if (step + 1) % self.cfg.dead_code_every == 0 and step + 1 < steps:
            gen = step_generator(self.seed, "vq-dead", step)
            reseeded = reseed_dead_codes(vq, self.usage, latents.detach(), gen)
            self.usage.zero_()
        return {"loss": loss.item(), "recon": recon_loss.item(), "vq": vq_loss.item(), "reseeded": reseeded}

    def lm_step(self, step: int, steps: int) -> dict[str, float]:
        idx = epoch_batch(len(self.codes), self.cfg.lm_batch_size, step, self.seed, "lm")
        plain = torch.rand(len(idx), generator=step_generator(self.seed, "lm-plain", step)) < PLAIN_SHARE
        ids = torch.where(plain[:, None], self.empty_ids, self.caption_ids[idx])
        mask = torch.where(plain[:, None], self.empty_mask, self.caption_mask[idx])
        loss = self.image_sequence_loss(ids, mask, self.codes[idx])
        self._optimize(loss)
        return {"loss": loss.item()}

    def image_sequence_loss(self, ids: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """CE of ``codes </img>`` after ``[caption] <img>``, over the visual vocabulary only."""
        model, b, t = self.model, codes.shape[0], codes.shape[1]
        with autocast(self.device):
            embeds = torch.cat([model.embed_text(ids), model.special_embedding("img").expand(b, 1, -1),
                                model.embed_codes(codes)], dim=1)
            ones = torch.ones(b, 1 + t, dtype=mask.dtype, device=self.device)
            attn = torch.cat([mask.to(self.device), ones], dim=1)
            positions = (attn.cumsum(1) - 1).clamp(min=0)
            hidden, _ = model.transformer(embeds, attention_mask=attn, position_ids=positions)
            logits = model.image_logits(hidden[:, ids.shape[1] :])  # <img>, c_1 … c_T predict c_1 … </img>
        end = torch.full((b, 1), model.codebook_size, dtype=torch.long, device=self.device)
        targets = torch.cat([codes, end], dim=1)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def diffusion_step(self, step: int, steps: int) -> dict[str, float]:
        idx = epoch_batch(len(self.codes), self.cfg.diffusion_batch_size, step, self.seed, "diffusion")
        x = to_model_images(self.data.images[idx], self.device)
        vectors = self.model.code_vectors(self.codes[idx]).detach()
        with autocast(self.device):
            loss = self.model.diffusion.loss(x, vectors, step_generator(self.seed, "diffusion", step))
        self._optimize(loss)
        return {"loss": loss.item()}

    @torch.no_grad()
    def encode_all(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        out = []
        for lo in tqdm(range(0, len(images), batch_size), desc="foundation encode", disable=not self.bars,
                       leave=False):
            with autocast(self.device):
                batch = to_model_images(images[lo : lo + batch_size], self.device)
                out.append(self.model.encode_images(batch))
        return torch.cat(out)


# --- evaluation -----------------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1], measured on the [0, 1] scale."""
    return metrics.psnr((a.float() + 1) / 2, (b.float() + 1) / 2)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: gaussian window, valid region, mean over RGB) of [-1, 1] images."""
    return metrics.ssim((a.float() + 1) / 2, (b.float() + 1) / 2)


@torch.no_grad()
def reconstruct(model: TinyBackbone, images_uint8: torch.Tensor, decoder: str = "vq",
                batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(originals, reconstructions) in [-1, 1] through the tokenizer and the named decoder."""
    device, originals, recons = model.device, [], []
    for lo in range(0, len(images_uint8), batch_size):
        x = to_model_images(images_uint8[lo : lo + batch_size], device)
        with autocast(device):
            codes = model.encode_images(x)
            y = model.vq_decode(codes) if decoder == "vq" else model.decode_codes(codes)
        originals.append(x.cpu())
        recons.append(y.float().cpu())
    return torch.cat(originals), torch.cat(recons)


def reconstruction_metrics(originals: torch.Tensor, recons: torch.Tensor) -> dict[str, float]:
    return {"psnr": round(psnr(originals, recons).mean().item(), 4),
            "ssim": round(ssim(originals, recons).mean().item(), 4)}


@torch.no_grad()
def sample_caption_codes(model: TinyBackbone, captions: list[str], seed: int, temperature: float = 1.0,
                         top_k: int = 0) -> torch.Tensor:
    """caption → T visual codes, sampled over the visual vocabulary with a KV cache."""
    device, t = model.device, model.tokens_per_image
    ids, mask = model.tokenize_captions(captions, model.cfg.lm.max_caption_tokens)
    b, generator = len(captions), step_generator(seed, "samples", 0)
    embeds = torch.cat([model.embed_text(ids), model.special_embedding("img").expand(b, 1, -1)], dim=1)
    attn = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1).to(device)
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    cache, codes = None, []
    for _ in range(t):
        with autocast(device):
            hidden, cache = model.transformer(embeds, attention_mask=attn, position_ids=positions,
                                              past_key_values=cache, use_cache=True)
            logits = model.image_logits(hidden[:, -1]).float()[:, : model.codebook_size] / temperature
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        code = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).to(device)
        codes.append(code)
        embeds = model.embed_codes(code)
        attn = torch.cat([attn, torch.ones(b, 1, dtype=attn.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.cat(codes, dim=1)


@torch.no_grad()
def lm_loss(trainer: FoundationTrainer, captions: list[str], codes: torch.Tensor,
            batch_size: int = 64) -> float:
    """Mean caption → image CE (nats per code) on the given items."""
    model, total = trainer.model, 0.0
    for lo in range(0, len(codes), batch_size):
        ids, mask = model.tokenize_captions(captions[lo : lo + batch_size], model.cfg.lm.max_caption_tokens)
        chunk = codes[lo : lo + batch_size]
        total += trainer.image_sequence_loss(ids, mask, chunk).item() * len(chunk)
    return round(total / max(1, len(codes)), 4)
