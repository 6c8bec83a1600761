"""The backbone interface (docs/design.md §2): everything the Pigeon model needs from an LMM.

Code above this interface never asks which backbone it has. Two implementations:
``pigeon.models.tiny.TinyBackbone`` (built-in, trained here) and ``pigeon.models.janus.JanusBackbone``.

Conventions
- images are float tensors [B, 3, S, S] in [-1, 1]; codes are long tensors [B, T] in [0, K).
- the language model runs on ``inputs_embeds`` only; ``image_logits`` scores the K visual codes
  plus one end-of-image class (index K), so sampling is restricted to the visual vocabulary.
- captions are tokenized left-padded to a fixed length with an attention mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn


class Backbone(nn.Module, ABC):
    codebook_size: int  # K: visual vocabulary
    tokens_per_image: int  # T: codes per image
    hidden_size: int  # d_model of the LM
    cond_dim: int  # width of condition_features (d_cond)
    image_size: int  # pixels per side

    # --- visual tokenizer / detokenizer -------------------------------------------------------
    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [-1, 1] → codes [B, T]."""

    @abstractmethod
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T] → images [B, 3, S, S] in [-1, 1] (VQ decoder or diffusion detokenizer)."""

    def style_layers(self) -> list[nn.Module]:
        """Detokenizer modules whose output feature maps carry style statistics (docs/design.md §1.4:
        the style transfer renormalises them); empty where the detokenizer has none to offer."""
        return []

    @abstractmethod
    def condition_features(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T] → dense visual features [B, T, cond_dim] (codebook vectors, through the
        diffusion decoder's conditioning encoder where that decoder is enabled)."""

    @abstractmethod
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] → pooled continuous tokenizer-encoder features [B, D] (pre-quantisation).
        Used by the reward encoder; never by the evaluators."""

    # --- language model ---------------------------------------------------------------------
    @abstractmethod
    def tokenize_captions(self, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (ids [B, L], attention_mask [B, L]); left-padded, L = max_tokens, starts with BOS."""

    @abstractmethod
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] → [B, L, d_model]."""

    @abstractmethod
    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """visual codes [B, T] → LMM input embeddings [B, T, d_model]."""

    @abstractmethod
    def special_embedding(self, name: str) -> torch.Tensor:
        """Input embedding [d_model] of a special token: 'img' (<img>) or 'emb' (<emb> placeholder)."""

    @abstractmethod
    def transformer(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, object]:
        """Run the (possibly LoRA-wrapped) LM body → (last hidden states [B, L, d_model], cache)."""

    def decoder_body(self) -> nn.Module | None:
        """The Llama-style LM body (``layers``, ``norm``, ``rotary_emb``) that generation may step
        through with :mod:`pigeon.models.decoding`; None keeps the library forward for every step."""
        return None

    @abstractmethod
    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d_model] → logits [..., K + 1]: K visual codes, then end-of-image."""

    # --- adapters and persistence -----------------------------------------------------------
    @abstractmethod
    def add_lora(self, r: int, alpha: int, dropout: float, target_modules: tuple[str, ...]) -> None:
        """Wrap the LM with a peft LoRA adapter; afterwards only LoRA weights of the LM train."""

    @abstractmethod
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights only (what stage 1 and DPO save)."""

    @abstractmethod
    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def save_pretrained(self, path: Path) -> None:
        """Write the base backbone (safetensors + JSON configs + text tokenizer) to a folder."""
