"""Sampling visual codes: batched over windows × samples, KV-cached, seeded.

Two measured costs shape this loop (tiny default LM, batch 64, CPU):
- ``DynamicCache`` grows every layer's keys/values by concatenation at each step; writing into a
  buffer allocated once (:class:`PreallocatedLayer`, a transformers cache layer) halved decoding time;
- the samples of one window share the caption and history, ~99% of the prompt: that part is run
  once per window and its cache rows are copied to the samples.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol

import torch
from transformers.cache_utils import Cache, DynamicLayer

from pigeon.config import SamplingConfig
from pigeon.models.backbone import Backbone
from pigeon.models.decoding import fast_decoder
from pigeon.models.types import Conditioning, WindowBatch


class PromptModel(Protocol):
    """What sampling needs of a model (:class:`pigeon.models.pigeon.PigeonModel`): its backbone and the
    pieces of its prompt."""

    backbone: Backbone
    history_len: int
    query_length: int

    def positions(self, attention: torch.Tensor) -> torch.Tensor: ...
    def context(self, batch: WindowBatch, history_mask, history_embeds=None): ...
    def query_tokens(self, batch: WindowBatch, reference_mask, dtype: torch.dtype, history_mask) -> torch.Tensor: ...
    def prefix(self, batch: WindowBatch, history_mask, reference_mask, history_embeds=None): ...


class PreallocatedLayer(DynamicLayer):
    """A dynamic cache layer whose keys/values live in one buffer of ``capacity`` positions:
    appending writes in place and the layer returns views of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, heads, _, _ = key_states.shape
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(b, heads, self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(b, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} positions)")
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select (and repeat) rows: one window's cache becomes its samples' caches."""
        if self.is_initialized:
            index = beam_idx.to(self.device)
            self.key_buffer = self.key_buffer.index_select(0, index)
            self.value_buffer = self.value_buffer.index_select(0, index)
            self.keys = self.key_buffer[:, :, :self.length]
            self.values = self.value_buffer[:, :, :self.length]


def preallocated_cache(capacity: int) -> Cache:
    return Cache(layer_class_to_replicate=partial(PreallocatedLayer, capacity=capacity))


def gumbel_sample(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """One categorical draw per row (Gumbel-max, top-k / temperature). It always consumes one uniform
    per logit, so the random stream, and hence the codes, do not depend on how logits were computed."""
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-20, 1.0)
    return (logits - torch.log(-torch.log(uniform))).argmax(dim=-1)


PRIOR_SMOOTHING = 0.1  # share of the prior's mass spread evenly over the codebook


def history_code_prior(history_codes: torch.Tensor, history_keep: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """A cache model of the user's visual tokens: log p(code) under the frequencies of the kept history
    tokens, smoothed with a uniform share, centred per row → [N, K] logit offsets (0 where nothing is kept).

    history_codes, history_keep [N, H, T]. Which codes a vendor uses (its palette, outline and shading
    patches) is what the history knows and the reference view does not; the mask generator's masks decide
    which history tokens count, so noise it filters out never enters the prior."""
    n = history_codes.shape[0]
    keep = history_keep.reshape(n, -1).float()
    counts = torch.zeros(n, codebook_size, device=history_codes.device).scatter_add_(
        1, history_codes.reshape(n, -1), keep)
    total = counts.sum(dim=1, keepdim=True)
    p = (1 - PRIOR_SMOOTHING) * counts / total.clamp_min(1) + PRIOR_SMOOTHING / codebook_size
    logp = p.log()
    return torch.where(total > 0, logp - logp.mean(dim=1, keepdim=True), torch.zeros_like(logp))


def compute_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype products run in: autocast's when it is on for ``device``, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype


def sample_codes(model: PromptModel, windows: WindowBatch, rows: WindowBatch, cond: Conditioning,
                 samples: int, sampling: SamplingConfig, seed: int, use_cache: bool,
                 fast_decode: bool = True) -> torch.Tensor:
    """codes [N, T] for the N = len(rows) rows (row i*samples + s comes from window i).

    ``use_cache`` with ``fast_decode`` steps through :class:`~pigeon.models.decoding.FastDecoder`
    after the library's prefill; without it every step is a library forward (the reference)."""
    bb = model.backbone
    t, k = bb.tokens_per_image, bb.codebook_size
    device = rows.history_codes.device
    history_mask, reference_mask = cond.history_keep.float(), cond.reference_keep.float()
    out_rows = len(rows)
    guided = sampling.history_guidance != 1.0
    if guided:  # rows [0, N) with the history, [N, 2N) without it; both halves are fed the same sampled codes
        rows = rows.select(torch.arange(out_rows, device=device).repeat(2))
        history_mask = torch.cat([history_mask, torch.zeros_like(history_mask)])
        reference_mask = reference_mask.repeat(2, 1)
    n = len(rows)
    attention = torch.cat([rows.caption_mask.long(),
                           rows.caption_mask.new_ones(n, model.history_len + model.query_length + t)], dim=1)
    positions = model.positions(attention)
    p = attention.shape[1] - t  # prompt length, through <img>
    codes = torch.empty(n, t, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    if use_cache:
        share = not guided and samples > 1 and torch.equal(
            cond.history_keep[::samples].repeat_interleave(samples, 0), cond.history_keep)
        context_rows, context_mask = (windows, history_mask[::samples]) if share else (rows, history_mask)
        context, context_attention = model.context(context_rows, context_mask)
        cache = preallocated_cache(p + t)
        bb.transformer(context, context_attention, model.positions(context_attention), past_key_values=cache,
                       use_cache=True)
        if share:
            cache.reorder_cache(torch.arange(len(windows), device=device).repeat_interleave(samples))
        query = model.query_tokens(rows, reference_mask, context.dtype, history_mask)
        c = context.shape[1]
        hidden, cache = bb.transformer(query, attention[:, :p], positions[:, c:p], past_key_values=cache,
                                       use_cache=True)
    else:
        prefix, _ = model.prefix(rows, history_mask, reference_mask)
        hidden, _ = bb.transformer(prefix, attention[:, :p], positions[:, :p])
    body = bb.decoder_body() if use_cache and fast_decode else None
    decoder = None if body is None else fast_decoder(body, compute_dtype(device, next(body.parameters()).dtype))
    if decoder is not None:
        # Attention reads the cache in the compute dtype: under autocast the library re-casts the whole
        # fp32 cache at every step and layer (the largest cost in the profile); cast it once here.
        keys = [layer.key_buffer.to(decoder.dtype) for layer in cache.layers]
        values = [layer.value_buffer.to(decoder.dtype) for layer in cache.layers]
        cos, sin = decoder.rotary(positions[:, p:], query.dtype)
        # additive mask in the attention dtype: a boolean one is converted inside every SDPA call
        visible = torch.zeros(n, 1, 1, attention.shape[1], dtype=decoder.dtype, device=device).masked_fill_(
            ~attention.bool()[:, None, None, :], float("-inf"))
    hidden = hidden[:, -1]
    prior = None
    if sampling.history_prior > 0:
        prior = sampling.history_prior * history_code_prior(rows.history_codes[:out_rows], cond.history_keep, k)
    for step in range(t):
        logits = bb.image_logits(hidden)[:, :k]
        if guided:  # classifier-free guidance on the history (as LlamaGen and Janus-Pro guide on text)
            with_history, without = logits.float().chunk(2)
            logits = without + sampling.history_guidance * (with_history - without)
        sampled = gumbel_sample(logits if prior is None else logits.float() + prior, sampling, generator)
        codes[:, step] = sampled.repeat(2) if guided else sampled
        if step == t - 1:
            break
        end = p + step + 1
        if decoder is not None:
            new = bb.embed_codes(codes[:, step:step + 1])[:, 0].to(query.dtype)
            hidden = decoder.step(new, cos[:, step], sin[:, step], end - 1, keys, values, visible[..., :end])
        elif use_cache:
            new = bb.embed_codes(codes[:, step:step + 1])
            hidden, cache = bb.transformer(new.to(query.dtype), attention[:, :end], positions[:, end - 1:end],
                                           past_key_values=cache, use_cache=True)
            hidden = hidden[:, -1]
        else:
            seq = torch.cat([prefix, bb.embed_codes(codes[:, :step + 1]).to(prefix.dtype)], dim=1)
            hidden = bb.transformer(seq, attention[:, :end], positions[:, :end])[0][:, -1]
    return codes[:out_rows]
