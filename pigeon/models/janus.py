"""The real-scale backbone: transformers ``JanusForConditionalGeneration`` from a local folder (docs/design.md §2).

Parts used: the VQ model (encode / decode, codebook vectors as condition features), the generation
embeddings + aligner (visual code → LM input), the Llama language model (the LoRA target), the
generation head (K visual-code logits) and the text ``lm_head`` row of ``<end_of_image>`` (the
end-of-image logit). ``<img>`` is ``<begin_of_image>``; the ``<emb>`` slot, when the adapter is
off, is the ``<image_placeholder>`` token Janus uses for visual features.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pigeon.errors import CheckpointError, PigeonError
from pigeon.models.backbone import Backbone

USER_PREFIX = "<|User|>:"
ASSISTANT_SUFFIX = "\n\n<|Assistant|>:"


class JanusBackbone(Backbone):
    def __init__(self, model, text_tokenizer):
        super().__init__()
        self.model = model
        self.text_tokenizer = text_tokenizer
        cfg = model.config
        self.codebook_size = int(cfg.vq_config.num_embeddings)
        self.tokens_per_image = int(cfg.vq_config.num_patches) ** 2
        self.hidden_size = int(cfg.text_config.hidden_size)
        self.cond_dim = int(cfg.vq_config.embed_dim)
        self.image_size = int(cfg.vision_config.image_size)
        self.eoi_token_id = self._token_id(getattr(text_tokenizer, "eoi_token", None) or "<end_of_image>")
        self.boi_token_id = self._token_id(getattr(text_tokenizer, "boi_token", None) or "<begin_of_image>")
        self.placeholder_token_id = int(cfg.image_token_id)
        object.__setattr__(self, "_peft", None)  # the peft wrapper of the language model (see add_lora)

    def _token_id(self, token: str) -> int:
        token_id = self.text_tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.text_tokenizer.unk_token_id:
            raise CheckpointError(f"Janus tokenizer has no {token!r} token")
        return int(token_id)

    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False,
                        dtype: torch.dtype = torch.float32) -> JanusBackbone:
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"backbone.janus_path: {path} has no config.json (not a local Janus checkpoint)")
        try:
            model = JanusForConditionalGeneration.from_pretrained(
                path, trust_remote_code=trust_remote_code, local_files_only=True, dtype=dtype, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"backbone.janus_path: cannot load {path} ({str(exc).splitlines()[0]})") from exc
        model.eval()
        return cls(model, tokenizer)

    # --- parts --------------------------------------------------------------------------------
    @property
    def vqmodel(self):
        return self.model.model.vqmodel

    @property
    def language_model(self):
        return self.model.model.language_model

    def _dtype(self) -> torch.dtype:
        return self.model.model.generation_embeddings.weight.dtype

    # --- visual tokenizer / detokenizer -------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vqmodel.encode(images.to(self._dtype()), return_dict=True)
        return out.image_tokens.reshape(images.shape[0], -1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vqmodel.decode(codes).float().clamp(-1.0, 1.0)

    def style_layers(self) -> list[nn.Module]:
        # As the tiny VQ: the maps at the token grid's resolution, before any upsampling.
        return [self.vqmodel.post_quant_conv, self.vqmodel.decoder.mid]

    def condition_features(self, codes: torch.Tensor) -> torch.Tensor:
        # The codebook vectors the VQ decoder reads (l2-normalised there too).
        return F.normalize(self.vqmodel.quantize.embedding(codes), p=2, dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.vqmodel.encoder(images.to(self._dtype())).float().mean(dim=(2, 3))

    # --- language model ---------------------------------------------------------------------
    def tokenize_captions(self, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BOS + ``<|User|>: caption\\n\\n<|Assistant|>:``; the caption, not the template, is truncated."""
        tok = self.text_tokenizer
        prefix = tok(USER_PREFIX, add_special_tokens=False)["input_ids"]
        suffix = tok(ASSISTANT_SUFFIX, add_special_tokens=False)["input_ids"]
        budget = max_tokens - 1 - len(prefix) - len(suffix)
        if budget < 1:
            raise PigeonError(f"backbone.lm.max_caption_tokens: {max_tokens} is too short for the Janus "
                              f"prompt (needs at least {max_tokens - budget + 1})")
        # " " + caption: a byte-level BPE then splits it exactly as inside the whole prompt
        bodies = tok([" " + str(c) for c in captions], add_special_tokens=False)["input_ids"] if captions else []
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(bodies), max_tokens), int(pad), dtype=torch.long)
        mask = torch.zeros((len(bodies), max_tokens), dtype=torch.long)
        for row, body in enumerate(bodies):
            seq = [tok.bos_token_id, *prefix, *body[:budget], *suffix]
            ids[row, max_tokens - len(seq):] = torch.tensor(seq)
            mask[row, max_tokens - len(seq):] = 1
        return ids, mask

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.prepare_embeddings_for_image_generation(codes)

    def special_embedding(self, name: str) -> torch.Tensor:
        ids = {"img": self.boi_token_id, "emb": self.placeholder_token_id}
        if name not in ids:
            raise PigeonError(f"unknown special token {name!r} (known: img, emb)")
        weight = self.model.get_input_embeddings().weight
        return weight[ids[name]]

    def transformer(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False):
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, cache=past_key_values, use_cache=use_cache)
        return out.last_hidden_state, out.cache

    def decoder_body(self):
        return self.language_model

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        visual = self.model.model.generation_head(hidden)
        end = hidden @ self.model.lm_head.weight[self.eoi_token_id].to(hidden.dtype)
        return torch.cat([visual, end.unsqueeze(-1).to(visual.dtype)], dim=-1)

    # --- adapters and persistence -----------------------------------------------------------
    def add_lora(self, r: int, alpha: int, dropout: float, target_modules: tuple[str, ...]) -> None:
        from peft import LoraConfig, get_peft_model

        if self._peft is not None:
            raise PigeonError("the Janus language model already has a LoRA adapter")
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
        for param in self.model.parameters():
            param.requires_grad_(False)
        # get_peft_model injects the LoRA layers into the language model in place; the wrapper is kept
        # out of the module tree so the same weights are not registered twice.
        object.__setattr__(self, "_peft", get_peft_model(self.language_model, config))

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        if self._peft is None:
            return {}
        return {k: v.detach() for k, v in get_peft_model_state_dict(self._peft).items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        if self._peft is None:
            raise PigeonError("add_lora must come before load_lora_state_dict")
        result = set_peft_model_state_dict(self._peft, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise CheckpointError(f"LoRA weights do not fit the Janus language model "
                                  f"(unexpected {list(result.unexpected_keys)[:3]}, missing {missing[:3]})")

    def save_pretrained(self, path: Path) -> None:
        """The base checkpoint (LoRA layers left out) and the text tokenizer."""
        state = {k.replace(".base_layer.", "."): v for k, v in self.model.state_dict().items() if "lora_" not in k}
        self.model.save_pretrained(Path(path), state_dict=state)
        self.text_tokenizer.save_pretrained(Path(path))
