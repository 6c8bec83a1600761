"""The tiny backbone honours every method of the Backbone contract; it saves, loads and adapts."""

from __future__ import annotations

import json

import pytest
import torch

from pigeon.config import BackboneConfig
from pigeon.errors import CheckpointError, PigeonError
from pigeon.models.backbone import Backbone
from pigeon.models.text import build_caption_tokenizer, load_caption_tokenizer, save_caption_tokenizer
from pigeon.models.tiny import TinyBackbone
from pigeon.models.vq import init_codebook_from_data, nearest_codes, reseed_dead_codes
from pigeon.training.foundation import psnr, ssim

CAPTIONS = ["Grinning Face", "red apple", "smiling face with heart-eyes", "flag: Japan"]
K, S = 32, 32


def tiny_cfg(detokenizer: str = "vq") -> BackboneConfig:
    return BackboneConfig.model_validate({
        "detokenizer": detokenizer,
        "vq": {"block_channels": [8, 16, 16], "latent_channels": 8, "code_dim": 4, "codebook_size": K},
        "lm": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
               "max_caption_tokens": 6},
        "diffusion": {"block_channels": [8, 16, 16], "cross_attention_dim": 16, "inference_steps": 2},
    })


@pytest.fixture(scope="module", params=["vq", "diffusion"])
def backbone(request) -> TinyBackbone:
    torch.set_num_threads(1)
    return TinyBackbone.create(tiny_cfg(request.param), CAPTIONS, seed=0).eval()


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_every_backbone_method_has_the_contract_shapes(backbone: TinyBackbone):
    assert isinstance(backbone, Backbone)
    t, d = backbone.tokens_per_image, backbone.hidden_size
    assert (t, backbone.codebook_size, backbone.image_size) == (64, K, S)
    with torch.no_grad():
        codes = backbone.encode_images(images())
        assert codes.shape == (3, t) and codes.dtype == torch.long
        assert 0 <= codes.min() and codes.max() < K
        decoded = backbone.decode_codes(codes)
        assert decoded.shape == (3, 3, S, S) and decoded.abs().max() <= 1.0
        assert torch.equal(decoded, backbone.decode_codes(codes))  # deterministic, diffusion included
        assert backbone.condition_features(codes).shape == (3, t, backbone.cond_dim)
        features = backbone.image_features(images())
        assert features.ndim == 2 and features.shape[0] == 3 and torch.isfinite(features).all()
        ids, mask = backbone.tokenize_captions(["red apple", "grinning face with many extra words"], 6)
        assert ids.shape == mask.shape == (2, 6)
        assert backbone.embed_text(ids).shape == (2, 6, d)
        assert backbone.embed_codes(codes).shape == (3, t, d)
        assert backbone.special_embedding("img").shape == backbone.special_embedding("emb").shape == (d,)
        hidden, cache = backbone.transformer(backbone.embed_codes(codes), use_cache=True)
        assert hidden.shape == (3, t, d) and cache.get_seq_length() == t
        assert backbone.image_logits(hidden).shape == (3, t, K + 1)
    with pytest.raises(PigeonError, match="special token"):
        backbone.special_embedding("eos")


def test_cond_dim_follows_the_detokenizer(backbone: TinyBackbone):
    expected = 16 if backbone.cfg.detokenizer == "diffusion" else 4
    assert backbone.cond_dim == expected


def test_image_logits_are_the_visual_slice_of_the_lm_head(backbone: TinyBackbone):
    codes = torch.randint(0, K, (2, 5))
    with torch.no_grad():
        hidden, _ = backbone.transformer(backbone.embed_codes(codes))
        full = backbone.lm(inputs_embeds=backbone.embed_codes(codes)).logits
    sliced = backbone.image_logits(hidden)
    codes_part = full[..., backbone.code_offset : backbone.code_offset + K]
    assert torch.allclose(sliced[..., :K], codes_part, atol=1e-5)
    assert torch.allclose(sliced[..., K], full[..., backbone.img_end_id], atol=1e-5)


def test_kv_cache_gives_the_same_hidden_states(backbone: TinyBackbone):
    embeds = backbone.embed_codes(torch.randint(0, K, (2, 7)))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full, _ = backbone.transformer(embeds, attention_mask=mask, position_ids=positions)
        head, cache = backbone.transformer(embeds[:, :5], mask[:, :5], positions[:, :5], use_cache=True)
        tail, _ = backbone.transformer(embeds[:, 5:], mask, positions[:, 5:], past_key_values=cache,
                                       use_cache=True)
    assert torch.allclose(torch.cat([head, tail], 1)[:, 2:], full[:, 2:], atol=1e-5)


def test_caption_tokenizer_lowercases_pads_left_and_round_trips(tmp_path):
    tok = build_caption_tokenizer(CAPTIONS)
    assert {"[PAD]", "[BOS]", "[UNK]", "grinning", "japan"} <= set(tok.get_vocab())
    out = tok(["GRINNING face", "zebra apple"], padding="max_length", max_length=5, return_tensors="pt")
    vocab = tok.get_vocab()
    assert out["input_ids"][0].tolist() == [0, 0, vocab["[BOS]"], vocab["grinning"], vocab["face"]]
    assert out["input_ids"][1, -2].item() == vocab["[UNK]"]
    assert out["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]
    save_caption_tokenizer(tok, tmp_path / "tok")
    again = load_caption_tokenizer(tmp_path / "tok")
    assert again.get_vocab() == vocab and again.padding_side == "left"
    with pytest.raises(CheckpointError, match="tokenizer missing"):
        load_caption_tokenizer(tmp_path / "nothing")


def test_save_and_load_give_an_identical_backbone(backbone: TinyBackbone, tmp_path):
    backbone.save_pretrained(tmp_path / "bb")
    meta = json.loads((tmp_path / "bb" / "backbone.json").read_text())
    assert meta["backbone"]["detokenizer"] == backbone.cfg.detokenizer
    loaded = TinyBackbone.from_pretrained(tmp_path / "bb")
    original, restored = backbone.base_state_dict(), loaded.base_state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    with torch.no_grad():
        codes = backbone.encode_images(images())
        assert torch.equal(codes, loaded.encode_images(images()))
        assert torch.equal(backbone.decode_codes(codes), loaded.decode_codes(codes))
        assert torch.equal(backbone.transformer(backbone.embed_codes(codes))[0],
                           loaded.transformer(loaded.embed_codes(codes))[0])
    caption = ["red apple"]
    assert torch.equal(loaded.tokenize_captions(caption, 6)[0], backbone.tokenize_captions(caption, 6)[0])


def test_loading_a_broken_folder_fails_with_one_line(tmp_path, backbone: TinyBackbone):
    with pytest.raises(PigeonError, match="backbone.json"):
        TinyBackbone.from_pretrained(tmp_path)
    backbone.save_pretrained(tmp_path / "bb")
    (tmp_path / "bb" / "weights.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="pickle"):
        TinyBackbone.from_pretrained(tmp_path / "bb")


def test_lora_wraps_q_v_and_only_lora_trains(tmp_path):
    model = TinyBackbone.create(tiny_cfg(), CAPTIONS, seed=0)
    base = {k: v.clone() for k, v in model.base_state_dict().items()}
    codes = torch.randint(0, K, (2, 6))
    before = model.transformer(model.embed_codes(codes))[0].detach()
    model.add_lora(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in trainable} == {"q_proj", "v_proj"}
    assert torch.allclose(model.transformer(model.embed_codes(codes))[0], before, atol=1e-6)  # B = 0 at init

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    hidden, _ = model.transformer(model.embed_codes(codes))
    model.image_logits(hidden).logsumexp(-1).mean().backward()
    optimizer.step()
    after = model.transformer(model.embed_codes(codes))[0].detach()
    assert not torch.allclose(after, before, atol=1e-4)
    assert all(torch.equal(base[k], v) for k, v in model.base_state_dict().items())  # base untouched
    with pytest.raises(PigeonError, match="already"):
        model.add_lora(4, 8, 0.0, ("q_proj",))

    # LoRA weights move to another backbone; the base saves without them.
    other = TinyBackbone.create(tiny_cfg(), CAPTIONS, seed=0)
    other.add_lora(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    other.load_lora_state_dict(model.lora_state_dict())
    assert torch.allclose(other.transformer(other.embed_codes(codes))[0], after, atol=1e-6)
    with pytest.raises(CheckpointError, match="do not match"):
        other.load_lora_state_dict({"nope": torch.zeros(1)})
    model.save_pretrained(tmp_path / "bb")
    reloaded = TinyBackbone.from_pretrained(tmp_path / "bb")
    assert torch.allclose(reloaded.transformer(reloaded.embed_codes(codes))[0], before, atol=1e-6)
    with pytest.raises(PigeonError, match="no LoRA"):
        reloaded.lora_state_dict()


def test_vq_helpers_find_nearest_codes_and_revive_dead_ones():
    gen = torch.Generator().manual_seed(0)
    book = torch.randn(K, 4, generator=gen)
    latents = torch.randn(2, 4, 3, 3, generator=gen)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(nearest_codes(latents, book).flatten(), torch.cdist(flat, book).argmin(1))

    model = TinyBackbone.create(tiny_cfg(), CAPTIONS, seed=0)
    init_codebook_from_data(model.vq, latents, gen)  # 18 vectors for 32 codes: repeats, jittered
    distances = torch.cdist(model.vq.quantize.embedding.weight.detach(), flat)
    assert distances.min(1).values.max() < 0.1
    usage = torch.zeros(K, dtype=torch.long)
    usage[:5] = 3
    old = model.vq.quantize.embedding.weight.detach().clone()
    assert reseed_dead_codes(model.vq, usage, latents, gen) == K - 5
    new = model.vq.quantize.embedding.weight.detach()
    assert torch.equal(new[:5], old[:5])
    assert all(torch.isclose(flat, row).all(1).any() for row in new[5:])


def test_psnr_and_ssim_rank_degradations():
    x = images(4)
    slightly, badly = (x + 0.05 * images(4, 1)).clamp(-1, 1), (x + 0.8 * images(4, 2)).clamp(-1, 1)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-5)
    assert (ssim(x, slightly) > ssim(x, badly)).all() and (psnr(x, slightly) > psnr(x, badly)).all()
    assert torch.allclose(ssim(x, badly), ssim(badly, x), atol=1e-6)
    half = torch.zeros(1, 3, 8, 8)
    assert torch.allclose(psnr(half, half + 0.2), torch.tensor([20.0]), atol=1e-3)  # mse 0.01 on [0, 1]


def test_diffusion_loss_trains_the_denoiser():
    model = TinyBackbone.create(tiny_cfg("diffusion"), CAPTIONS, seed=0)
    x = images(2)
    vectors = model.code_vectors(model.encode_images(x)).detach()
    loss = model.diffusion.loss(x, vectors, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.diffusion.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and any(g.abs().sum() > 0 for g in grads)
    assert model.diffusion.condition_encoder.proj.weight.grad is not None  # the conditioning path learns


def test_reward_features_of_items_match_a_separate_centre_and_encode(backbone: TinyBackbone):
    """One encoder pass (``fit_items``) gives the centre of the centre's items alone and the features
    that a separate encode with that centre gives."""
    from pigeon.evaluation.reward import RewardEncoder

    items = ((images(7, seed=3).permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    centre_ids = [4, 1, 1, 6]
    separate = RewardEncoder(backbone, batch_size=3)
    separate.center = separate.raw_features(items[sorted(set(centre_ids))]).mean(dim=0)
    one_pass = RewardEncoder(backbone, batch_size=3)
    feats = one_pass.fit_items(items, centre_ids)
    assert torch.allclose(one_pass.center, separate.center, atol=1e-5)
    assert torch.allclose(feats, separate.features(items), atol=1e-5)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(7))
    assert not torch.allclose(one_pass.center, one_pass.raw_features(items).mean(dim=0))  # the centre's items only


def test_split_reward_reads_style_for_the_history_and_layout_for_the_reference(backbone: TinyBackbone):
    """With split features the history term changes only with the style statistics and the reference term
    only with the layout grid: a candidate that swaps layout keeps its history similarity."""
    from pigeon.evaluation.reward import RewardEncoder, candidate_rewards

    items = ((images(6, seed=5).permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    encoder = RewardEncoder(backbone, split=True)
    feats = encoder.fit_items(items, [0, 1, 2, 3, 4, 5])
    k = encoder.style_dims
    assert k == backbone.image_style_dims < feats.shape[-1]
    assert torch.allclose(feats[:, :k].norm(dim=-1), torch.ones(6)) and torch.allclose(feats[:, k:].norm(dim=-1), torch.ones(6))
    history, reference = feats[None, :3], feats[3][None]
    candidate = feats[4].clone()
    moved = candidate.clone()
    moved[k:] = feats[3, k:]  # the reference's layout, the candidate's own style
    scored = candidate_rewards(torch.stack([candidate, moved])[None], history, reference, 1.0, 1.0, k)
    assert scored["history_sim"][0, 0] == pytest.approx(float(scored["history_sim"][0, 1]))
    assert float(scored["reference_sim"][0, 1]) == pytest.approx(1.0, abs=1e-5)
    assert float(scored["reference_sim"][0, 0]) < 0.99
    whole = RewardEncoder(backbone).fit_items(items, [0, 1, 2, 3, 4, 5])
    assert torch.allclose(whole.norm(dim=-1), torch.ones(6))  # pooled: one unit vector, as before
