"""The composed Pigeon model: mask generator + personalization module on a backbone LMM.

Sequence fed to the LM as ``inputs_embeds`` (docs/design.md §1)::

    [caption (left-padded)] [style_1 … style_H] [ref_1 … ref_T ⊙ keep] [<img>] → T codes, end-of-image

``style_i`` is the mean of history image i's kept token embeddings; ``ref_j`` is token j of the
reference's style-stripped view (its embedding plus the adapter's residual), zeroed when masked.
With ``model.reference: pooled`` the grid is replaced by the paper's single ``<emb>`` vector.
Every path (loss, scoring, cached and uncached generation, foundation pretraining) builds the same
sequence with :func:`context_embeds` and :func:`query_embeds`, with position ids
``cumsum(attention_mask) - 1``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pigeon.config import LoraConfig, ModelConfig, SamplingConfig
from pigeon.errors import CheckpointError, PigeonError
from pigeon.io import load_tensors, read_json, save_tensors, write_json
from pigeon.models.backbone import Backbone
from pigeon.models.generation import sample_codes
from pigeon.models.loading import peft_lora_config
from pigeon.models.mask import MaskGenerator
from pigeon.models.personalization import Adapter, masked_mean, style_tokens
from pigeon.models.style_transfer import decode_in_style
from pigeon.models.types import Conditioning, GenerationOutput, WindowBatch


def context_embeds(bb: Backbone, caption_ids, caption_mask, history_embeds, history_mask):
    """[caption] [one style token per history image] → (embeds [B, L + H, d], attention [B, L + H]).
    history_embeds [B, H, T, d] (input embeddings of the history codes), history_mask [B, H, T]."""
    text = bb.embed_text(caption_ids)
    styles = style_tokens(history_embeds.to(text.dtype), history_mask.to(text.dtype))
    attention = torch.cat([caption_mask.long().to(text.device),
                           caption_mask.new_ones(styles.shape[:2]).long().to(text.device)], dim=1)
    return torch.cat([text, styles], dim=1), attention


def history_style(history_embeds, history_mask) -> torch.Tensor:
    """One style vector per window [B, d]: the mean of the kept history tokens' embeddings over every
    history image (zero when nothing is kept)."""
    b, h, t, d = history_embeds.shape
    return masked_mean(history_embeds.reshape(b, h * t, d), history_mask.reshape(b, h * t).to(history_embeds.dtype))


def query_embeds(bb: Backbone, reference_codes, reference_mask, dtype, adapter: Adapter | None = None,
                 pooled: bool = False, style: torch.Tensor | None = None) -> torch.Tensor:
    """The reference and ``<img>``: [ref grid ⊙ keep + style] [<img>] → [B, T + 1, d]; pooled: [<emb>] [<img>].

    ``style`` [B, d] (:func:`history_style`) is added to every grid position, rescaled to the grid tokens'
    RMS: each target position reads its reference token and the user's style in one place, a far
    shorter path than attending to the style tokens (measured: with the style tokens alone, dropping
    the whole context moved the pretrained LM's held-out loss by 0.014 nats)."""
    b = reference_codes.shape[0]
    img = bb.special_embedding("img").to(dtype).expand(b, 1, -1)
    if pooled:
        if adapter is None:
            emb = bb.special_embedding("emb").to(dtype).expand(b, 1, -1)
        else:
            emb = adapter(bb.condition_features(reference_codes), reference_mask)[:, None].to(dtype)
        return torch.cat([emb, img], dim=1)
    keep = reference_mask.to(dtype).unsqueeze(-1)
    tokens = bb.embed_codes(reference_codes).to(dtype)
    grid = tokens
    if adapter is not None:
        grid = grid + adapter(bb.condition_features(reference_codes), reference_mask).to(dtype)
    grid = grid * keep
    if style is not None:
        # eps inside the root: a zero style (no kept history) must not send an infinite gradient through sqrt
        rms = tokens.detach().float().pow(2).mean(dim=(1, 2)).sqrt()[:, None]  # per row: batch-independent
        scale = rms / (style.float().pow(2).mean(-1, keepdim=True) + 1e-12).sqrt()
        grid = grid + (style.float() * scale).to(dtype)[:, None]
    return torch.cat([grid, img], dim=1)


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n draws from U(0, 1) on ``device``, from ``generator`` (on its own device) or the global stream."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device).to(device)


class PigeonModel(nn.Module):
    def __init__(self, backbone: Backbone, cfg: ModelConfig):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.history_len = cfg.history_len
        self.mask_generator = MaskGenerator(backbone.hidden_size, cfg.history_len, cfg.mask)
        self.pooled_reference = cfg.reference == "pooled"
        self.adapter = (Adapter(backbone.cond_dim, cfg.adapter_hidden, backbone.hidden_size, pool=self.pooled_reference)
                        if cfg.use_adapter else None)
        self.lora_config: LoraConfig | None = None
        for name, param in backbone.named_parameters():
            param.requires_grad_("lora_" in name)

    # --- LoRA ---------------------------------------------------------------------------------
    def add_lora(self, lora: LoraConfig) -> None:
        """Wrap the backbone LM with a LoRA adapter (once); only LoRA weights of the backbone train."""
        if self.lora_config is not None:
            if lora != self.lora_config:
                raise PigeonError(f"LoRA already added with {self.lora_config}, cannot re-add with {lora}")
            return
        self.backbone.add_lora(lora.r, lora.alpha, lora.dropout, tuple(lora.target_modules))
        self.lora_config = lora
        for name, param in self.backbone.named_parameters():
            param.requires_grad_("lora_" in name)
        self.train(self.training)  # new LoRA layers start in train mode (dropout on): match the model

    def trainable_parameters(self, lora=True, mask_generator=True, adapter=True) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        if lora:
            params += [p for n, p in self.backbone.named_parameters() if "lora_" in n]
        if mask_generator:
            params += list(self.mask_generator.parameters())
        if adapter and self.adapter is not None:
            params += list(self.adapter.parameters())
        return params

    @property
    def query_length(self) -> int:
        """Tokens after the context: the reference grid (T) or the pooled <emb> (1), then <img>."""
        return 2 if self.pooled_reference else self.backbone.tokens_per_image + 1

    # --- conditioning -------------------------------------------------------------------------
    def _alpha_rows(self, alpha_ref, n: int, training: bool, generator, device) -> torch.Tensor:
        if alpha_ref is None:
            if not training:
                raise PigeonError("alpha_ref is required at inference")
            return _uniform(n, generator, device)
        alpha = torch.as_tensor(alpha_ref, dtype=torch.float32, device=device).flatten()
        if alpha.numel() == 1:
            alpha = alpha.expand(n)
        if alpha.numel() != n or bool(((alpha < 0) | (alpha > 1)).any()):
            raise PigeonError(f"alpha_ref must be one value or {n} values in [0, 1], got {alpha.tolist()}")
        return alpha.clone()

    def _masks(self, batch: WindowBatch, alpha_ref, training: bool, generator=None, repeat: int = 1):
        """→ (Conditioning, history mask [N,H,T] float, reference mask [N,T] float, history embeds [B,H*T,d])
        for N = B × ``repeat`` rows (row i*repeat + s from window i); scores are computed once per window."""
        b, h, t = batch.history_codes.shape
        history_embeds = self.backbone.embed_codes(batch.history_codes.reshape(b, h * t)).reshape(b, h, t, -1)
        reference_embeds = self.backbone.embed_codes(batch.reference_codes)
        alpha = self._alpha_rows(alpha_ref, b * repeat, training, generator, batch.history_codes.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mask_generator.mode == "trained"):
            history_scores, reference_scores = self.mask_generator.scores(history_embeds, reference_embeds)
            history_keep, history_mask = self.mask_generator.history_mask(history_scores)
            reference_scores = reference_scores.repeat_interleave(repeat, dim=0)
            reference_keep, reference_mask = self.mask_generator.reference_mask(reference_scores, alpha, training)
        if repeat > 1:
            history_keep, history_mask = (x.repeat_interleave(repeat, dim=0) for x in (history_keep, history_mask))
        if training and self.cfg.history_dropout > 0:  # no draw when off: the default's random stream is unchanged
            kept = (_uniform(len(history_keep), generator, history_keep.device) >= self.cfg.history_dropout)
            kept = kept[:, None, None]
            history_keep, history_mask = history_keep & kept, history_mask * kept.to(history_mask.dtype)
        cond = Conditioning(history_keep, reference_keep, alpha)
        return cond, history_mask, reference_mask, history_embeds

    def condition(self, batch: WindowBatch, alpha_ref=None, training: bool = False, generator=None) -> Conditioning:
        """History: keep the top (1 − α_h) jointly by score. Reference: keep (1 − α_r); training masks the
        high-scoring tokens (α_r ~ U(0, 1) when ``alpha_ref`` is None), inference the low-scoring ones."""
        with torch.no_grad():
            return self._masks(batch, alpha_ref, training, generator)[0]

    # --- the sequence -------------------------------------------------------------------------
    def context(self, batch: WindowBatch, history_mask, history_embeds=None):
        """[caption] [style tokens of the kept history] → (embeds [B, L + H, d], attention mask)."""
        if history_embeds is None:
            b, h, t = batch.history_codes.shape
            history_embeds = self.backbone.embed_codes(batch.history_codes.reshape(b, h * t)).reshape(b, h, t, -1)
        return context_embeds(self.backbone, batch.caption_ids, batch.caption_mask, history_embeds,
                              history_mask.reshape(batch.history_codes.shape))

    def query_tokens(self, batch: WindowBatch, reference_mask, dtype: torch.dtype, history_mask) -> torch.Tensor:
        """[reference grid ⊙ keep + history style] [<img>] → [B, T + 1, d] (pooled: [<emb>] [<img>])."""
        b, h, t = batch.history_codes.shape
        history = self.backbone.embed_codes(batch.history_codes.reshape(b, h * t)).reshape(b, h, t, -1)
        style = history_style(history, history_mask.reshape(b, h, t))
        return query_embeds(self.backbone, batch.reference_codes, reference_mask, dtype, self.adapter,
                            self.pooled_reference, style)

    def prefix(self, batch: WindowBatch, history_mask, reference_mask, history_embeds=None):
        """The whole prompt → (embeds [B, P, d] ending with <img>, attention mask [B, P])."""
        context, attention = self.context(batch, history_mask, history_embeds)
        query = self.query_tokens(batch, reference_mask, context.dtype, history_mask)
        return (torch.cat([context, query], dim=1),
                torch.cat([attention, attention.new_ones(len(batch), query.shape[1])], dim=1))

    @staticmethod
    def positions(attention: torch.Tensor) -> torch.Tensor:
        """Position ids that skip left padding (the same in every path)."""
        return (attention.cumsum(dim=1) - 1).clamp_min(0)

    def _code_logits(self, batch, codes, history_mask, reference_mask, history_embeds=None) -> torch.Tensor:
        """Teacher-forced logits [B, T+1, K+1] for the T codes and end-of-image."""
        prefix, attention = self.prefix(batch, history_mask, reference_mask, history_embeds)
        target = self.backbone.embed_codes(codes).to(prefix.dtype)
        attention = torch.cat([attention, attention.new_ones(codes.shape)], dim=1)
        hidden, _ = self.backbone.transformer(torch.cat([prefix, target], dim=1), attention,
                                              self.positions(attention))
        return self.backbone.image_logits(hidden[:, prefix.shape[1] - 1:]).float()

    def _targets(self, codes: torch.Tensor) -> torch.Tensor:
        end = codes.new_full((codes.shape[0], 1), self.backbone.codebook_size)
        return torch.cat([codes, end], dim=1)

    @staticmethod
    def _cond_masks(cond: Conditioning, device: torch.device):
        cond = cond.to(device)
        return cond.history_keep.float(), cond.reference_keep.float()

    def loss(self, batch: WindowBatch, cond: Conditioning | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Stage-1 cross-entropy on the target codes and end-of-image."""
        if batch.target_codes is None:
            raise PigeonError("loss needs target_codes in the batch")
        history_embeds = None
        if cond is None:
            cond, history_mask, reference_mask, history_embeds = self._masks(batch, None, training=True)
        else:
            history_mask, reference_mask = self._cond_masks(cond, batch.history_codes.device)
        logits = self._code_logits(batch, batch.target_codes, history_mask, reference_mask, history_embeds)
        targets = self._targets(batch.target_codes)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        with torch.no_grad():
            accuracy = (logits[:, :-1].argmax(-1) == targets[:, :-1]).float().mean()
        metrics = {"loss": float(loss.detach()), "code_accuracy": float(accuracy),
                   "alpha_ref": float(cond.alpha_ref.float().mean()),
                   "history_kept": float(cond.history_keep.float().mean())}
        return loss, metrics

    def sequence_logps(self, batch: WindowBatch, codes: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """[B] summed log-probabilities of ``codes`` and end-of-image under the given conditioning."""
        history_mask, reference_mask = self._cond_masks(cond, batch.history_codes.device)
        logits = self._code_logits(batch, codes, history_mask, reference_mask)
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, self._targets(codes).unsqueeze(-1)).squeeze(-1).sum(dim=1)

    # --- generation ---------------------------------------------------------------------------
    def _sample_rows(self, b: int, alpha_ref, num_samples: int, device):
        """→ (samples per window S, α_r per row [B*S]); a list gives one sample per value."""
        if isinstance(alpha_ref, (list, tuple)):
            if num_samples not in (1, len(alpha_ref)):
                raise PigeonError(f"num_samples={num_samples} but alpha_ref lists {len(alpha_ref)} values")
            s = len(alpha_ref)
            return s, torch.tensor(alpha_ref, dtype=torch.float32, device=device).repeat(b)
        alpha = torch.as_tensor(alpha_ref, dtype=torch.float32, device=device).flatten()
        alpha = alpha.expand(b) if alpha.numel() == 1 else alpha
        return num_samples, alpha.repeat_interleave(num_samples)

    @torch.no_grad()
    def generate(self, batch: WindowBatch, alpha_ref, num_samples: int = 1,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0,  # noqa: B008 (frozen)
                 cond: Conditioning | None = None, use_cache: bool = True,
                 fast_decode: bool = True) -> GenerationOutput:
        """Sample T visual codes per window × sample (never end-of-image), in eval mode. With ``cond``
        (B or B*S rows) its recorded masks and α_r are used; ``alpha_ref`` then only sets S.
        ``use_cache=False`` (every step re-reads the whole sequence) and ``fast_decode=False`` (every
        cached step is a library forward) are the reference paths the fast one is tested against."""
        was_training = self.training
        self.eval()
        try:
            return self._generate(batch, alpha_ref, num_samples, sampling, seed, cond, use_cache, fast_decode)
        finally:
            self.train(was_training)

    def _generate(self, batch, alpha_ref, num_samples, sampling, seed, cond, use_cache, fast_decode) -> GenerationOutput:
        device = batch.history_codes.device
        b = len(batch)
        s, alpha_rows = self._sample_rows(b, alpha_ref, num_samples, device)
        window_index = torch.arange(b, device=device).repeat_interleave(s)
        rows = batch.select(window_index) if s > 1 else batch
        if cond is None:
            cond = self._masks(batch, alpha_rows, training=False, repeat=s)[0]
        elif len(cond) == b and s > 1:
            cond = cond.repeat_interleave(s)
        if len(cond) != len(rows):
            raise PigeonError(f"conditioning has {len(cond)} rows, expected {b} or {len(rows)}")
        cond = cond.to(device)
        codes = sample_codes(self, batch, rows, cond, s, sampling, seed, use_cache, fast_decode)
        return GenerationOutput(codes=codes, conditioning=cond, window_index=window_index)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [N, T] → images [N, 3, S, S] in [-1, 1]."""
        return self.backbone.decode_codes(codes)

    def decode_generated(self, out: GenerationOutput, batch: WindowBatch, style_strength: float = 0.0) -> torch.Tensor:
        """The images of :meth:`generate`'s output. With ``style_strength`` > 0 the detokenizer takes the
        feature statistics of each row's kept history tokens (docs/design.md §1.4, style transfer)."""
        if style_strength <= 0:
            return self.decode(out.codes)
        index = out.window_index.to(batch.history_codes.device)
        return decode_in_style(self.backbone, out.codes, batch.history_codes.index_select(0, index),
                               out.conditioning.history_keep, style_strength)

    # --- persistence --------------------------------------------------------------------------
    def _signature(self) -> dict:
        bb = self.backbone
        return {"codebook_size": bb.codebook_size, "tokens_per_image": bb.tokens_per_image,
                "hidden_size": bb.hidden_size, "cond_dim": bb.cond_dim}

    def save_trainable(self, path: Path) -> None:
        """LoRA in peft format (adapter_model.safetensors + adapter_config.json), mask_generator and
        adapter safetensors, pigeon_config.json. Each file is written atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.lora_config is not None:
            save_tensors(path / "adapter_model.safetensors", self.backbone.lora_state_dict(),
                         metadata={"format": "pt"})
            write_json(path / "adapter_config.json", peft_lora_config(self.lora_config))
        save_tensors(path / "mask_generator.safetensors", self.mask_generator.state_dict())
        if self.adapter is not None:
            save_tensors(path / "adapter.safetensors", self.adapter.state_dict())
        lora = None if self.lora_config is None else self.lora_config.model_dump(mode="json")
        write_json(path / "pigeon_config.json", {"model": self.cfg.model_dump(mode="json"), "lora": lora,
                                                 "backbone": self._signature()})

    def load_trainable(self, path: Path) -> None:
        """Load what :meth:`save_trainable` wrote (adds the saved LoRA first when the backbone lacks it)."""
        path = Path(path)
        meta = read_json(path / "pigeon_config.json")
        if meta.get("backbone") != self._signature():
            raise CheckpointError(f"{path}: saved for backbone {meta.get('backbone')}, this one is {self._signature()}")
        if meta.get("lora") is not None:
            self.add_lora(LoraConfig(**meta["lora"]))
            self.backbone.load_lora_state_dict(load_tensors(path / "adapter_model.safetensors"))
        _load_module(self.mask_generator, path / "mask_generator.safetensors")
        if self.adapter is not None:
            _load_module(self.adapter, path / "adapter.safetensors")


def _load_module(module: nn.Module, file: Path) -> None:
    state = load_tensors(file)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{file}: does not fit {type(module).__name__} ({str(exc).splitlines()[0]})") from exc
