"""A lean one-token decode step for Llama-family LM bodies (the tiny backbone's and Janus's).

Why not the library forward: with a batch of 16–64 rows and one new token per step, each step of
transformers' ``LlamaModel`` spends most of its time outside the matrix products (profiled on the
default profile, 2-core CPU: mask construction, the rotary module, per-layer cache bookkeeping,
peft's LoRA wrappers running two extra products per projection, and bf16 autocast re-casting every
weight at every step). :class:`FastDecoder` takes the weights once per ``generate`` call — LoRA
merged in, q/k/v and gate/up fused into one product each, cast once to the compute dtype — and
runs the same arithmetic as the library layer (RMSNorm, rotary embedding, SDPA, SwiGLU) on the KV
buffers the library's prefill filled. Anything it does not recognise (another attention or norm
class, a scaled rope, biases it cannot fuse) makes :func:`fast_decoder` return ``None`` and the
caller keeps the library path; ``tests/model/test_pigeon.py`` checks both give the same codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class _Layer:
    norm_in: torch.Tensor
    eps_in: float
    qkv: torch.Tensor  # [(nq + 2 nkv) * hd, d]
    qkv_bias: torch.Tensor | None
    out: torch.Tensor  # [d, nq * hd]
    norm_post: torch.Tensor
    eps_post: float
    gate_up: torch.Tensor  # [2 * ff, d]
    down: torch.Tensor  # [d, ff]


def _weight(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Effective (weight, bias) of a Linear or of a peft LoRA Linear (active, unmerged adapters added)."""
    base = getattr(linear, "base_layer", None)
    if base is None:
        return linear.weight, linear.bias
    weight = base.weight
    if not getattr(linear, "disable_adapters", False) and not getattr(linear, "merged", False):
        for name in linear.active_adapters:
            if name in getattr(linear, "lora_A", {}):
                weight = weight + linear.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias


def _supported(body: nn.Module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rope = getattr(body, "rotary_emb", None)
    if rope is None or getattr(rope, "rope_type", None) != "default" or not hasattr(body, "layers"):
        return False
    if getattr(body.config, "hidden_act", None) not in ("silu", "swish"):
        return False
    for layer in body.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return False
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return False
        if not isinstance(layer.input_layernorm, LlamaRMSNorm):
            return False
        if not isinstance(layer.post_attention_layernorm, LlamaRMSNorm) or not isinstance(body.norm, LlamaRMSNorm):
            return False
        if any(_weight(m)[1] is not None for m in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            return False
    return True


class FastDecoder:
    """One decode step over all layers, writing the new keys/values into preallocated buffers."""

    def __init__(self, body: nn.Module, compute_dtype: torch.dtype):
        config = body.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.inv_freq = body.rotary_emb.inv_freq.float()
        self.rope_scale = float(body.rotary_emb.attention_scaling)
        self.final_norm, self.final_eps = body.norm.weight, body.norm.variance_epsilon
        self.dtype = compute_dtype
        self.layers = [self._take(layer) for layer in body.layers]

    def _take(self, layer: nn.Module) -> _Layer:
        attn, mlp, cast = layer.self_attn, layer.mlp, (lambda w: w.detach().to(self.dtype).contiguous())
        (wq, bq), (wk, bk), (wv, bv) = (_weight(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        bias = None
        if any(b is not None for b in (bq, bk, bv)):
            bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in
                              ((wq, bq), (wk, bk), (wv, bv))])
        return _Layer(
            norm_in=layer.input_layernorm.weight.detach(), eps_in=layer.input_layernorm.variance_epsilon,
            qkv=cast(torch.cat([wq, wk, wv])), qkv_bias=None if bias is None else cast(bias),
            out=cast(_weight(attn.o_proj)[0]),
            norm_post=layer.post_attention_layernorm.weight.detach(),
            eps_post=layer.post_attention_layernorm.variance_epsilon,
            gate_up=cast(torch.cat([_weight(mlp.gate_proj)[0], _weight(mlp.up_proj)[0]])),
            down=cast(_weight(mlp.down_proj)[0]),
        )

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., head_dim] for integer positions (the library's default rope, same arithmetic)."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    @staticmethod
    def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * normed.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot: int,
             keys: list[torch.Tensor], values: list[torch.Tensor], attn_mask: torch.Tensor) -> torch.Tensor:
        """x [N, d] (the new token's input embedding) → final hidden state [N, d].

        ``cos``/``sin`` [N, head_dim] for this token's positions; the new keys/values are written at
        column ``slot`` of each layer's buffers ``[N, kv_heads, capacity, head_dim]``; ``attn_mask``
        [N, 1, 1, slot + 1] (boolean, True = attend, or additive) hides the prompt's left padding.
        """
        n, nq, nkv, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = cos[:, None], sin[:, None]
        for layer, key_buffer, value_buffer in zip(self.layers, keys, values):
            h = self._rms(x, layer.norm_in, layer.eps_in).to(self.dtype)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split((nq * hd, nkv * hd, nkv * hd), dim=-1)
            q = self._rotate(q.view(n, nq, hd), cos, sin)
            key_buffer[:, :, slot] = self._rotate(k.view(n, nkv, hd), cos, sin)
            value_buffer[:, :, slot] = v.view(n, nkv, hd)
            cache_dtype = key_buffer.dtype
            attended = F.scaled_dot_product_attention(
                q.to(cache_dtype)[:, :, None], key_buffer[:, :, :slot + 1], value_buffer[:, :, :slot + 1],
                attn_mask=attn_mask, enable_gqa=nq != nkv)
            x = x + F.linear(attended.reshape(n, nq * hd).to(self.dtype), layer.out).to(x.dtype)
            h = self._rms(x, layer.norm_post, layer.eps_post).to(self.dtype)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down).to(x.dtype)
        return self._rms(x, self.final_norm, self.final_eps)


def fast_decoder(body: nn.Module, compute_dtype: torch.dtype) -> FastDecoder | None:
    """A :class:`FastDecoder` over ``body`` (a Llama-style LM body), or None when it does not fit."""
    return FastDecoder(body, compute_dtype) if _supported(body) else None
