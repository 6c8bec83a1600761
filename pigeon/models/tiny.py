"""The built-in ``tiny`` backbone (docs/design.md §2), trained from scratch by the foundation stage.

- visual tokenizer: diffusers ``VQModel`` (×4 down at 32 px → 8×8 = 64 codes, codebook K);
- detokenizer: the VQ decoder, or the LaVIT-style diffusion decoder (``pigeon.models.diffusion``);
- LM: transformers ``LlamaForCausalLM`` over one vocabulary:
  ``[text words][<img>][<emb>][K visual codes][</img>]`` — the visual codes and ``</img>`` are
  contiguous, so ``image_logits`` is one slice of ``lm_head``;
- caption tokenizer: word-level, built from the captions (``pigeon.models.text``).

Saved as ``backbone.json`` + library configs (``vq_config.json``, ``lm_config.json``,
``unet_config.json``) + ``weights.safetensors`` + ``tokenizer/``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, VQModel
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pigeon.config import BackboneConfig
from pigeon.errors import CheckpointError, ConfigError, PigeonError
from pigeon.io import atomic_write_text, load_tensors, read_json, save_tensors, write_json
from pigeon.models.backbone import Backbone
from pigeon.models.diffusion import DiffusionDetokenizer
from pigeon.models.text import build_caption_tokenizer, load_caption_tokenizer, save_caption_tokenizer
from pigeon.models.vq import (
    build_vq_model,
    codebook,
    codes_to_latents,
    decode_latents,
    latent_side,
    nearest_codes,
    pooled_features,
)

FORMAT = "pigeon-tiny-backbone/1"
MAX_POSITIONS = 2048  # the longest prompt (caption + 5 history images + target) is ~410 tokens at T=64
DECODE_SEED = 0  # diffusion decoding draws its noise from this seed: decode_codes is deterministic


def llama_config(cfg: BackboneConfig, vocab_size: int, pad_id: int, bos_id: int, end_id: int) -> LlamaConfig:
    lm = cfg.lm
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=lm.hidden_size,
        intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads,
        num_key_value_heads=lm.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=end_id,
    )


class TinyBackbone(Backbone):
    def __init__(
        self,
        cfg: BackboneConfig,
        text_tokenizer: PreTrainedTokenizerFast,
        vq: VQModel | None = None,
        lm: LlamaForCausalLM | None = None,
        unet: UNet2DConditionModel | None = None,
    ):
        super().__init__()
        if cfg.kind != "tiny":
            raise ConfigError(f"backbone.kind: TinyBackbone needs 'tiny' (got {cfg.kind!r})")
        self.cfg = cfg
        self.text_tokenizer = text_tokenizer
        self.image_size = cfg.image_size
        self.vq = vq if vq is not None else build_vq_model(cfg.vq, cfg.image_size)
        self.latent_side = latent_side(cfg.vq, cfg.image_size)
        self.tokens_per_image = self.latent_side**2
        self.codebook_size = cfg.vq.codebook_size
        # Vocabulary layout: text | <img> | <emb> | K codes | </img>.
        self.num_text_tokens = len(text_tokenizer)
        self.img_id = self.num_text_tokens
        self.emb_id = self.num_text_tokens + 1
        self.code_offset = self.num_text_tokens + 2
        self.img_end_id = self.code_offset + self.codebook_size
        if lm is None:
            lm = LlamaForCausalLM(
                llama_config(cfg, self.img_end_id + 1, text_tokenizer.pad_token_id,
                             text_tokenizer.bos_token_id, self.img_end_id)
            )
        if lm.config.vocab_size != self.img_end_id + 1:
            raise CheckpointError(f"LM vocabulary {lm.config.vocab_size} != {self.img_end_id + 1} expected")
        self.lm = lm
        self.hidden_size = cfg.lm.hidden_size
        self.diffusion = None
        if cfg.detokenizer == "diffusion":
            self.diffusion = DiffusionDetokenizer(cfg.diffusion, cfg.vq.code_dim, self.tokens_per_image,
                                                  cfg.image_size)
            if unet is not None:
                self.diffusion.unet = unet
        self.cond_dim = self.diffusion.cond_dim if self.diffusion is not None else cfg.vq.code_dim

    @classmethod
    def create(cls, cfg: BackboneConfig, captions: Iterable[str], seed: int = 0) -> TinyBackbone:
        """A freshly initialised backbone; the same (cfg, captions, seed) give the same weights."""
        tokenizer = build_caption_tokenizer(captions)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(cfg, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    def _causal_lm(self) -> LlamaForCausalLM:
        return self.lm.get_base_model() if self.has_lora else self.lm

    @property
    def has_lora(self) -> bool:
        return hasattr(self.lm, "peft_config")

    # --- visual tokenizer / detokenizer -------------------------------------------------------
    def encoder_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents [B, code_dim, h, w]."""
        return self.vq.encode(images.to(self.device)).latents

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return nearest_codes(self.encoder_latents(images), codebook(self.vq))

    def vq_decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes → images through the VQ decoder (whatever the configured detokenizer)."""
        latents = codes_to_latents(self.vq, codes.to(self.device), self.latent_side)
        return decode_latents(self.vq, latents).float().clamp(-1, 1)

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T] → codebook vectors [B, T, code_dim]."""
        return F.embedding(codes.to(self.device), codebook(self.vq))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if self.diffusion is None:
            return self.vq_decode(codes)
        generator = torch.Generator().manual_seed(DECODE_SEED)
        return self.diffusion.sample(self.code_vectors(codes), generator)

    def style_layers(self) -> list[nn.Module]:
        # The 8 × 8 maps right after the codebook (post-quant conv, middle block): one position per token,
        # so the kept-history weights apply as they are. Measured: adding the upsampling blocks lost
        # content for no style (README, experiments). The diffusion detokenizer offers none.
        return [self.vq.post_quant_conv, self.vq.decoder.mid_block] if self.diffusion is None else []

    def condition_features(self, codes: torch.Tensor) -> torch.Tensor:
        vectors = self.code_vectors(codes)
        return vectors if self.diffusion is None else self.diffusion.condition_encoder(vectors)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.encoder_latents(images))

    @property
    def image_style_dims(self) -> int:
        """The leading :meth:`image_features` that are style statistics (channel mean and std)."""
        return 2 * self.cfg.vq.code_dim

    # --- language model ---------------------------------------------------------------------
    def tokenize_captions(self, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded to ``max_tokens``, [BOS] first; returned on the CPU (tokenizing is CPU work)."""
        out = self.text_tokenizer(
            [str(c) for c in captions], padding="max_length", truncation=True, max_length=max_tokens,
            return_tensors="pt",
        )
        return out["input_ids"], out["attention_mask"]

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids.to(self.device))

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(codes.to(self.device) + self.code_offset)

    def special_embedding(self, name: str) -> torch.Tensor:
        ids = {"img": self.img_id, "emb": self.emb_id, "end": self.img_end_id}
        if name not in ids:
            raise PigeonError(f"special token {name!r} unknown (known: {', '.join(ids)})")
        return self.lm.get_input_embeddings().weight[ids[name]]

    def transformer(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False):
        body = self._causal_lm().model
        out = body(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                   cache=past_key_values, use_cache=use_cache)
        return out.last_hidden_state, out.cache

    def decoder_body(self):
        return self._causal_lm().model

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self._causal_lm().get_output_embeddings().weight
        return F.linear(hidden, head[self.code_offset : self.img_end_id + 1])

    # --- adapters -----------------------------------------------------------------------------
    def add_lora(self, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                 target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> None:
        from peft import LoraConfig, get_peft_model

        if self.has_lora:
            raise PigeonError("the backbone already has a LoRA adapter")
        for param in self.parameters():
            param.requires_grad_(False)
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                            bias="none")
        self.lm = get_peft_model(self.lm, config)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        if not self.has_lora:
            raise PigeonError("the backbone has no LoRA adapter (call add_lora first)")
        return {k: v.detach() for k, v in get_peft_model_state_dict(self.lm).items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        if not self.has_lora:
            raise PigeonError("the backbone has no LoRA adapter (call add_lora first)")
        expected = set(self.lora_state_dict())
        if set(state) != expected:
            odd = sorted(set(state) ^ expected)[:3]
            raise CheckpointError(f"LoRA weights do not match the adapter (e.g. {', '.join(odd)})")
        set_peft_model_state_dict(self.lm, state)

    # --- persistence --------------------------------------------------------------------------
    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight of the base backbone, under the names of an un-adapted model (LoRA left out)."""
        state = {}
        for key, value in self.state_dict().items():
            if "lora_" in key:
                continue
            state[key.replace("lm.base_model.model.", "lm.").replace(".base_layer.", ".")] = value
        return state

    def save_pretrained(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / "backbone.json", {
            "format": FORMAT, "backbone": self.cfg.model_dump(mode="json"),
            "num_text_tokens": self.num_text_tokens, "tokens_per_image": self.tokens_per_image,
        })
        atomic_write_text(path / "vq_config.json", self.vq.to_json_string())
        atomic_write_text(path / "lm_config.json", self._causal_lm().config.to_json_string(use_diff=False))
        if self.diffusion is not None:
            atomic_write_text(path / "unet_config.json", self.diffusion.unet.to_json_string())
        save_caption_tokenizer(self.text_tokenizer, path / "tokenizer")
        save_tensors(path / "weights.safetensors", self.base_state_dict(), metadata={"format": FORMAT})

    @classmethod
    def from_pretrained(cls, path: Path, device: str | torch.device = "cpu") -> TinyBackbone:
        path = Path(path)
        meta = read_json(path / "backbone.json")
        if meta.get("format") != FORMAT:
            found = meta.get("format")
            raise CheckpointError(f"{path / 'backbone.json'}: format {found!r}, expected {FORMAT}")
        try:
            cfg = BackboneConfig.model_validate(meta["backbone"])
        except Exception as exc:
            raise CheckpointError(f"{path / 'backbone.json'}: invalid backbone config ({exc})") from exc
        tokenizer = load_caption_tokenizer(path / "tokenizer")
        vq = VQModel.from_config(read_json(path / "vq_config.json"))
        lm = LlamaForCausalLM(LlamaConfig.from_dict(read_json(path / "lm_config.json")))
        unet = None
        if cfg.detokenizer == "diffusion":
            unet = UNet2DConditionModel.from_config(read_json(path / "unet_config.json"))
        model = cls(cfg, tokenizer, vq=vq, lm=lm, unet=unet)
        state = load_tensors(path / "weights.safetensors")
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a tensor of the wrong shape (strict=False only forgives names)
            odd = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line][:1]
            raise CheckpointError(f"{path / 'weights.safetensors'}: weights do not fit the config "
                                  f"({odd[0] if odd else str(exc).splitlines()[0]})") from None
        if missing or unexpected:
            names = ", ".join((missing + unexpected)[:3])
            raise CheckpointError(f"{path / 'weights.safetensors'}: weights do not fit the config ({names})")
        return model.to(device).eval()

    def parameter_counts(self) -> dict[str, int]:
        def count(module) -> int:
            return sum(p.numel() for p in module.parameters())

        out = {"vq": count(self.vq), "lm": count(self._causal_lm())}
        if self.diffusion is not None:
            out["diffusion"] = count(self.diffusion)
        out["total"] = sum(out.values())
        return out

