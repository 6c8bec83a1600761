"""Foundation pretraining of the tiny backbone (the role of LaVIT's pretraining, docs/design.md §2).

Three phases, each resumable from ``checkpoint_every``-step checkpoints:
(a) ``vq``: the VQ tokenizer on images (AdamW, bf16 autocast with the quantizer in fp32, codebook
    initialised from encoder outputs, codes unused for ``dead_code_every`` steps re-seeded);
(b) ``lm``: the LM on Pigeon's own sequence ``[caption] [style tokens] [reference grid] <img> codes
    </img>`` (docs/design.md §2). As LaVIT pretrains on interleaved documents, the "history" is a
    vendor's own emoji set: H *other* emoji drawn in the target's style (each swapped for a random
    image with probability ``context_noise``), so the LM learns in-context style. The reference is
    the target's style-stripped view with a random share of its tokens masked. A quarter of the
    captions are empty and a tenth of the contexts dropped. No sequence ever holds the same emoji in
    two styles. Loss on the codes and ``</img>`` over the visual vocabulary;
(c) ``diffusion``: the diffusion detokenizer (DDPM loss), when enabled and ``diffusion_steps > 0``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from pigeon.config import FoundationConfig
from pigeon.errors import DataError
from pigeon.evaluation import metrics
from pigeon.models.batching import reference_codes
from pigeon.models.pigeon import context_embeds, history_style, query_embeds
from pigeon.models.tiny import TinyBackbone
from pigeon.models.vq import decode_latents, init_codebook_from_data, quantize, reseed_dead_codes
from pigeon.pixels import to_pixels
from pigeon.runtime import autocast
from pigeon.seeds import step_generator
from pigeon.training.checkpoint import load_optimizer, load_state, optimizer_tensors, save_state
from pigeon.training.loop import LoopProgress, StepOutput, TrainingLoop, batch_indices

PLAIN_SHARE = 0.25  # share of LM sequences with an empty caption
NO_CONTEXT_SHARE = 0.1  # share of LM sequences whose style context is dropped (all style tokens zero)
WARMUP_STEPS = 20
MIN_LR_RATE = 0.1  # the cosine decays to a tenth of the base rate
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
    return to_pixels(images_uint8, device)


def edge_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the images' horizontal and vertical differences: outlines, line weight and shading
    edges are what tells vendors apart, and pixel MSE alone blurs them away."""
    def grads(x):
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    (rx, ry), (tx, ty) = grads(recon), grads(target)
    return F.l1_loss(rx, tx) + F.l1_loss(ry, ty)


@dataclass
class FoundationData:
    images: torch.Tensor  # [N, S, S, 3] uint8, training images
    captions: list[str]
    holdout_images: torch.Tensor
    holdout_captions: list[str]
    styles: list[str]  # style of each training image (the LM's style contexts come from it)
    holdout_styles: list[str]

    def fingerprint(self) -> str:
        digest = hashlib.md5(self.images.numpy().tobytes())
        digest.update(self.holdout_images.numpy().tobytes())
        digest.update(json.dumps([self.captions, self.holdout_captions, self.styles, self.holdout_styles]).encode())
        return digest.hexdigest()


class StyleContexts:
    """Draws, for target images, H context images of the same style and other emoji (training images)."""

    def __init__(self, styles: list[str], history_len: int, noise: float):
        names = sorted(set(styles))
        self.style = torch.tensor([names.index(s) for s in styles])
        self.members = [torch.nonzero(self.style == k).flatten() for k in range(len(names))]
        self.names = names
        self.history_len, self.noise = history_len, noise

    def draw(self, style: torch.Tensor, exclude: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """style [B] (indices into ``names``) → training image ids [B, H]; never an ``exclude`` image."""
        b, h = len(style), self.history_len
        sizes = torch.tensor([len(m) for m in self.members])[style]  # [B]
        out = torch.empty(b, h, dtype=torch.long)
        for row in range(b):
            members = self.members[int(style[row])]
            count = int(sizes[row]) - (exclude is not None)
            pick = (torch.rand(h, generator=generator) * count).long().clamp_max(count - 1)
            if exclude is not None:  # skip the target itself within its style's list
                pos = int(torch.searchsorted(members, exclude[row]))
                pick = pick + (pick >= pos).long()
            out[row] = members[pick]
        swap = torch.rand(b, h, generator=generator) < self.noise
        out[swap] = torch.randint(0, len(self.style), (int(swap.sum()),), generator=generator)
        if exclude is not None:  # a random swap may hit the target: put the same-style pick back
            hit = out == exclude[:, None]
            out[hit] = torch.roll(out, 1, dims=1)[hit]
        return out


@dataclass
class Progress(LoopProgress):
    """The current phase's loop position; ``rows`` hold every phase's curve (phase, step, losses, lr)."""

    phase: str = "vq"
    seconds: dict = field(default_factory=dict)


class FoundationTrainer:
    def __init__(self, backbone: TinyBackbone, data: FoundationData, cfg: FoundationConfig, seed: int,
                 checkpoint_dir: Path, fingerprint: str, progress_bars: bool = True, history_len: int = 5,
                 reference_views: int = 4):
        self.model, self.data, self.cfg, self.seed = backbone, data, cfg, seed
        self.contexts = StyleContexts(data.styles, history_len, cfg.context_noise)
        self.holdout_style = torch.tensor([self.contexts.names.index(s) for s in data.holdout_styles])
        self.reference_views = reference_views
        self.references: torch.Tensor | None = None  # [N, 1 + V, T] reference-view codes of training images
        self.holdout_references: torch.Tensor | None = None  # [M, 1, T]
        self.device = backbone.device
        self.checkpoint_dir, self.fingerprint = Path(checkpoint_dir), fingerprint
        self.bars = progress_bars
        self.state = Progress()
        self.codes: torch.Tensor | None = None  # [N, T] training codes after the vq phase
        self.holdout_codes: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.usage = torch.zeros(backbone.codebook_size, dtype=torch.long)
        length = backbone.cfg.lm.max_caption_tokens
        self.caption_ids, self.caption_mask = backbone.tokenize_captions(data.captions, length)
        self.empty_ids, self.empty_mask = backbone.tokenize_captions([""], length)
        self.resumed_from: tuple[str, int] | None = None
        self._mark = time.perf_counter()

    # --- checkpoints ----------------------------------------------------------------------------
    def _save(self) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.base_state_dict().items()}
        optimizer_meta = scheduler_meta = None
        if self.optimizer is not None:
            opt_tensors, optimizer_meta = optimizer_tensors(self.optimizer)
            tensors.update(opt_tensors)
            scheduler_meta = self.scheduler.state_dict()
        tensors["vq_usage"] = self.usage
        if self.codes is not None:
            tensors["codes"], tensors["holdout_codes"] = self.codes, self.holdout_codes
            tensors["references"], tensors["holdout_references"] = self.references, self.holdout_references
        meta = {"fingerprint": self.fingerprint, "phase": self.state.phase, "step": self.state.step,
                "curves": self.state.rows, "seconds": self.state.seconds, "optimizer": optimizer_meta,
                "scheduler": scheduler_meta}
        save_state(self.checkpoint_dir, tensors, meta)

    def _resume(self) -> None:
        found = load_state(self.checkpoint_dir, self.fingerprint)
        if found is None:
            return
        tensors, meta = found
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state, strict=True)
        self.state = Progress(step=meta["step"], rows=meta["curves"], phase=meta["phase"], seconds=meta["seconds"])
        self.usage = tensors["vq_usage"]
        if "codes" in tensors:
            self.codes = tensors["codes"].to(self.device)
            self.holdout_codes = tensors["holdout_codes"].to(self.device)
            self.references = tensors["references"].to(self.device)
            self.holdout_references = tensors["holdout_references"].to(self.device)
        self._make_optimizer(self.state.phase)
        if meta["optimizer"]:
            load_optimizer(self.optimizer, tensors, meta["optimizer"])
            self.scheduler.load_state_dict(meta["scheduler"])
        self.resumed_from = (self.state.phase, self.state.step)
        tqdm.write(f"foundation: resuming at {self.state.phase} step {self.state.step}")

    def _phase_plan(self, phase: str) -> tuple[torch.nn.Module | None, int, float]:
        """(trained module, steps, base learning rate) of a phase."""
        return {"vq": (self.model.vq, self.cfg.vq_steps, self.cfg.vq_lr),
                "lm": (self.model.lm, self.cfg.lm_steps, self.cfg.lm_lr),
                "diffusion": (self.model.diffusion, self.cfg.diffusion_steps, self.cfg.diffusion_lr)
                }.get(phase, (None, 0, 0.0))

    def _make_optimizer(self, phase: str) -> None:
        """AdamW on the phase's module; linear warm-up, then cosine decay to a tenth of the base rate."""
        module, steps, lr = self._phase_plan(phase)
        self.optimizer = self.scheduler = None
        if module is not None:
            self.optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
            warmup = min(WARMUP_STEPS, max(1, steps // 10))
            self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(self.optimizer, warmup, steps,
                                                                         min_lr_rate=MIN_LR_RATE)

    def _next_phase(self) -> None:
        order = list(PHASES)
        phase = order[order.index(self.state.phase) + 1]
        if phase == "diffusion" and (self.model.diffusion is None or self.cfg.diffusion_steps == 0):
            phase = "done"
        self.state.phase, self.state.step = phase, 0
        self._make_optimizer(phase)

    # --- the phases -----------------------------------------------------------------------------
    def run(self) -> Progress:
        self._resume()
        if self.optimizer is None and self.state.step == 0:
            self._make_optimizer(self.state.phase)
        while self.state.phase != "done":
            phase, self._mark = self.state.phase, time.perf_counter()
            if phase == "encode":
                self.codes = self.encode_all(self.data.images)
                self.holdout_codes = self.encode_all(self.data.holdout_images)
                with autocast(self.device):
                    self.references = reference_codes(self.model, self.data.images.numpy(), self.reference_views,
                                                      self.seed).to(self.device)
                    self.holdout_references = reference_codes(self.model, self.data.holdout_images.numpy(), 0,
                                                              self.seed).to(self.device)
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
        module, steps, _ = self._phase_plan(phase)
        step_fn = {"vq": self.vq_step, "lm": self.lm_step, "diffusion": self.diffusion_step}[phase]

        def labelled(step: int) -> StepOutput:
            out = step_fn(step)
            out.figures = {k: round(v, 6) for k, v in out.figures.items()}
            out.extra["phase"] = phase
            return out

        loop = TrainingLoop(f"foundation {phase}", module.parameters(), self.optimizer, steps,
                            scheduler=self.scheduler, checkpoint_every=self.cfg.checkpoint_every,
                            save=lambda: (self._tick(phase), self._save()), progress_bar=self.bars)
        loop.run(self.state, labelled, self.vq_after_step if phase == "vq" else None)

    def vq_step(self, step: int) -> StepOutput:
        vq = self.model.vq
        idx = batch_indices(len(self.data.images), self.cfg.vq_batch_size, step, self.seed, "vq")
        x = to_model_images(self.data.images[idx], self.device)
        with autocast(self.device):
            latents = vq.encode(x).latents
        if step == 0:
            init_codebook_from_data(vq, latents.detach(), step_generator(self.seed, "vq-init", 0))
        z_q, codes, vq_loss = quantize(vq, latents)
        with autocast(self.device):
            recon = decode_latents(vq, z_q)
        recon_loss = F.mse_loss(recon.float(), x)
        edges = edge_loss(recon.float(), x)
        loss = recon_loss + vq_loss + self.cfg.vq_edge_weight * edges
        self._last_vq = (latents.detach(), codes)
        return StepOutput(loss, {"loss": loss.item(), "recon": recon_loss.item(), "vq": vq_loss.item(),
                                 "edges": edges.item()})

    def vq_after_step(self, step: int, row: dict) -> None:
        """Count code usage; every ``dead_code_every`` steps re-seed the codes no batch used."""
        latents, codes = self._last_vq
        self.usage += torch.bincount(codes.flatten().cpu(), minlength=self.usage.numel())
        row["reseeded"] = 0
        if (step + 1) % self.cfg.dead_code_every == 0 and step + 1 < self.cfg.vq_steps:
            gen = step_generator(self.seed, "vq-dead", step)
            row["reseeded"] = reseed_dead_codes(self.model.vq, self.usage, latents, gen)
            self.usage.zero_()

    def lm_step(self, step: int) -> StepOutput:
        idx = batch_indices(len(self.codes), self.cfg.lm_batch_size, step, self.seed, "lm")
        generator = step_generator(self.seed, "lm-context", step)
        b = len(idx)
        plain = torch.rand(b, generator=generator) < PLAIN_SHARE
        ids = torch.where(plain[:, None], self.empty_ids, self.caption_ids[idx])
        mask = torch.where(plain[:, None], self.empty_mask, self.caption_mask[idx])
        context = self.contexts.draw(self.contexts.style[idx], idx, generator)
        history_keep = (torch.rand(b, generator=generator) >= NO_CONTEXT_SHARE)[:, None, None].expand(
            -1, context.shape[1], self.model.tokens_per_image)
        view = torch.randint(0, self.references.shape[1], (b,), generator=generator)
        reference = self.references[idx, view]
        alpha = torch.rand(b, 1, generator=generator)
        reference_keep = torch.rand(b, self.model.tokens_per_image, generator=generator) >= alpha
        loss = self.conditioned_loss(ids, mask, self.codes[context], history_keep, reference, reference_keep,
                                     self.codes[idx])
        return StepOutput(loss, {"loss": loss.item()})

    def conditioned_loss(self, ids, mask, history_codes, history_keep, reference, reference_keep,
                         codes) -> torch.Tensor:
        """CE of ``codes </img>`` after Pigeon's prompt (caption, style tokens, reference grid, ``<img>``)."""
        model, device = self.model, self.device
        b, h, t = history_codes.shape
        with autocast(device):
            history = model.embed_codes(history_codes.reshape(b, h * t).to(device)).reshape(b, h, t, -1)
            context, attention = context_embeds(model, ids.to(device), mask.to(device), history,
                                                history_keep.float().to(device))
            style = history_style(history, history_keep.float().to(device))
            query = query_embeds(model, reference.to(device), reference_keep.float().to(device), context.dtype,
                                 style=style)
            target = model.embed_codes(codes.to(device)).to(context.dtype)
            ones = attention.new_ones(b, query.shape[1] + t)
            attention = torch.cat([attention, ones], dim=1)
            positions = (attention.cumsum(1) - 1).clamp(min=0)
            hidden, _ = model.transformer(torch.cat([context, query, target], dim=1), attention_mask=attention,
                                          position_ids=positions)
            start = context.shape[1] + query.shape[1] - 1  # <img>, c_1 … c_T predict c_1 … </img>
            logits = model.image_logits(hidden[:, start:])
        end = torch.full((b, 1), model.codebook_size, dtype=torch.long, device=device)
        targets = torch.cat([codes.to(device), end], dim=1)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def image_sequence_loss(self, ids: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """CE of ``codes </img>`` from the caption alone (no style context, no reference)."""
        b, t = codes.shape
        h = self.contexts.history_len
        none = torch.zeros(b, h, t, dtype=torch.bool)
        return self.conditioned_loss(ids, mask, codes.new_zeros(b, h, t), none, codes,
                                     torch.zeros(b, t, dtype=torch.bool), codes)

    def diffusion_step(self, step: int) -> StepOutput:
        idx = batch_indices(len(self.codes), self.cfg.diffusion_batch_size, step, self.seed, "diffusion")
        x = to_model_images(self.data.images[idx], self.device)
        vectors = self.model.code_vectors(self.codes[idx]).detach()
        with autocast(self.device):
            loss = self.model.diffusion.loss(x, vectors, step_generator(self.seed, "diffusion", step))
        return StepOutput(loss, {"loss": loss.item()})

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
                         top_k: int = 0, history_codes: torch.Tensor | None = None,
                         reference: torch.Tensor | None = None, history_len: int = 5) -> torch.Tensor:
    """caption (+ optional style context [B, H, T] and fully kept reference grid [B, T]) → T visual codes,
    sampled over the visual vocabulary with a KV cache. Absent parts enter masked, as in pretraining."""
    device, t = model.device, model.tokens_per_image
    ids, mask = model.tokenize_captions(captions, model.cfg.lm.max_caption_tokens)
    b, generator = len(captions), step_generator(seed, "samples", 0)
    has_history = history_codes is not None
    if history_codes is None:
        history_codes = torch.zeros(b, history_len, t, dtype=torch.long)
    history_keep = torch.full(history_codes.shape, float(has_history))
    if reference is None:
        reference, reference_keep = torch.zeros(b, t, dtype=torch.long), torch.zeros(b, t)
    else:
        reference_keep = torch.ones(b, t)
    h = history_codes.shape[1]
    with autocast(device):
        history = model.embed_codes(history_codes.reshape(b, h * t).to(device)).reshape(b, h, t, -1)
        context, attn = context_embeds(model, ids.to(device), mask.to(device), history, history_keep.to(device))
        query = query_embeds(model, reference.to(device), reference_keep.to(device), context.dtype,
                             style=history_style(history, history_keep.to(device)))
        embeds = torch.cat([context, query], dim=1)
    attn = torch.cat([attn, attn.new_ones(b, embeds.shape[1] - attn.shape[1])], dim=1)
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
    """Mean caption → image CE (nats per code) on the given items, without context or reference."""
    model, total = trainer.model, 0.0
    for lo in range(0, len(codes), batch_size):
        ids, mask = model.tokenize_captions(captions[lo : lo + batch_size], model.cfg.lm.max_caption_tokens)
        chunk = codes[lo : lo + batch_size]
        total += trainer.image_sequence_loss(ids, mask, chunk).item() * len(chunk)
    return round(total / max(1, len(codes)), 4)


@torch.no_grad()
def conditioned_lm_loss(trainer: FoundationTrainer, captions: list[str], codes: torch.Tensor,
                        references: torch.Tensor, style: torch.Tensor, with_context: bool = True,
                        keep: float = 0.5, batch_size: int = 64) -> float:
    """Mean CE (nats per code) of held-out images given their caption, a seeded style context of training
    images (or none) and their plain reference view with a seeded ``keep`` share of tokens kept."""
    model, total = trainer.model, 0.0
    generator = step_generator(trainer.seed, "holdout-context", 0)
    t = model.tokens_per_image
    for lo in range(0, len(codes), batch_size):
        hi = min(lo + batch_size, len(codes))
        ids, mask = model.tokenize_captions(captions[lo:hi], model.cfg.lm.max_caption_tokens)
        context = trainer.contexts.draw(style[lo:hi], None, generator)
        history_keep = torch.full((hi - lo, context.shape[1], t), with_context)
        reference_keep = torch.rand(hi - lo, t, generator=generator) < keep
        loss = trainer.conditioned_loss(ids, mask, trainer.codes[context], history_keep, references[lo:hi],
                                        reference_keep, codes[lo:hi])
        total += loss.item() * (hi - lo)
    return round(total / max(1, len(codes)), 4)
