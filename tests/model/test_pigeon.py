"""PigeonModel on the built-in tiny backbone (smoke sizes): the model API contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pigeon.config import ModelConfig, SamplingConfig, load_params
from pigeon.models.pigeon import Conditioning, PigeonModel, WindowBatch
from pigeon.models.tiny import TinyBackbone

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ["grinning face", "red star", "blue circle with stripe", "cat face"]
B = 3


def smoke():
    return load_params(REPO / "params.yaml", profile="smoke")


def tiny_backbone() -> TinyBackbone:
    return TinyBackbone.create(smoke().backbone, CAPTIONS, seed=0)


def make_model(mode: str = "trained", use_adapter: bool = True, lora: bool = True) -> PigeonModel:
    params = smoke()
    cfg = params.model.model_copy(update={"use_adapter": use_adapter,
                                          "mask": params.model.mask.model_copy(update={"mode": mode})})
    torch.manual_seed(0)
    model = PigeonModel(tiny_backbone(), cfg)
    if lora:
        model.add_lora(params.stage1.lora)
        with torch.no_grad():  # LoRA B and the grid adapter's output start at zero: make them matter
            for p in model.trainable_parameters(mask_generator=False):
                p.normal_(0, 0.05)
    return model


def make_batch(model: PigeonModel, b: int = B, seed: int = 0) -> WindowBatch:
    bb, g = model.backbone, torch.Generator().manual_seed(seed)
    k, t, h = bb.codebook_size, bb.tokens_per_image, model.history_len
    ids, mask = bb.tokenize_captions([CAPTIONS[i % len(CAPTIONS)] for i in range(b)], 12)
    return WindowBatch(torch.randint(0, k, (b, h, t), generator=g), torch.randint(0, k, (b, t), generator=g),
                       ids, mask, torch.randint(0, k, (b, t), generator=g))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Oversubscribed threads on the shared CPU were measured 50x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(one_thread) -> PigeonModel:
    return make_model().eval()


def manual_logps(model: PigeonModel, batch: WindowBatch, codes: torch.Tensor, cond: Conditioning):
    """Row by row, padding stripped, default positions: the sequence of docs/design.md §1 built by hand:
    caption, one style token per history image (mean of its kept token embeddings), the reference grid
    (token embedding + adapter residual, masked tokens zero, plus the window's history style at the
    grid tokens' RMS), <img>, codes."""
    bb, out = model.backbone, []
    k = bb.codebook_size
    for i in range(len(batch)):
        caption = batch.caption_ids[i][batch.caption_mask[i].bool()]
        styles = []
        for j in range(model.history_len):
            kept = cond.history_keep[i, j]
            embeds = bb.embed_codes(batch.history_codes[i, j][kept])
            styles.append(embeds.mean(0) if kept.any() else torch.zeros(bb.hidden_size))
        ref = batch.reference_codes[i]
        grid = bb.embed_codes(ref) + model.adapter.mlp(bb.condition_features(ref[None])[0])
        grid = grid * cond.reference_keep[i].float()[:, None]
        kept = bb.embed_codes(batch.history_codes[i][cond.history_keep[i]])
        style = kept.mean(0)
        grid = grid + style * bb.embed_codes(ref).pow(2).mean().sqrt() / style.pow(2).mean().sqrt()
        seq = torch.cat([bb.embed_text(caption[None])[0], torch.stack(styles), grid, bb.special_embedding("img")[None],
                         bb.embed_codes(codes[i])])
        hidden, _ = bb.transformer(seq[None])
        logp = torch.log_softmax(bb.image_logits(hidden[0, -(codes.shape[1] + 1):]).float(), dim=-1)
        targets = torch.cat([codes[i], torch.tensor([k])])
        out.append(sum(logp[j, targets[j]] for j in range(len(targets))))
    return torch.stack(out)


def test_condition_shapes_and_counts(model):
    batch = make_batch(model)
    t, h = model.backbone.tokens_per_image, model.history_len
    cond = model.condition(batch, alpha_ref=torch.tensor([0.0, 0.5, 1.0]))
    assert cond.history_keep.shape == (B, h, t) and cond.history_keep.dtype == torch.bool
    assert cond.history_keep.reshape(B, -1).sum(1).tolist() == [round(0.8 * h * t)] * B
    assert cond.reference_keep.sum(1).tolist() == [t, t // 2, 0]
    train = model.condition(batch, training=True, generator=torch.Generator().manual_seed(0))
    assert bool(((train.alpha_ref >= 0) & (train.alpha_ref <= 1)).all()) and train.alpha_ref.unique().numel() == B
    sub = cond.select(torch.tensor([2, 0]))
    assert torch.equal(sub.reference_keep, cond.reference_keep[[2, 0]])
    assert len(cond.repeat_interleave(2)) == 2 * B and len(batch.select(torch.tensor([1]))) == 1


def test_sequence_logps_equals_manual_sum_and_loss(model):
    batch = make_batch(model)
    cond = model.condition(batch, alpha_ref=0.4)
    codes = batch.target_codes
    with torch.no_grad():
        logps = model.sequence_logps(batch, codes, cond)
        expected = manual_logps(model, batch, codes, cond)
        loss, metrics = model.loss(batch, cond)
    assert logps.shape == (B,)
    torch.testing.assert_close(logps, expected, rtol=1e-4, atol=1e-3)
    t = model.backbone.tokens_per_image
    torch.testing.assert_close(loss, -logps.sum() / (B * (t + 1)), rtol=1e-5, atol=1e-5)
    assert set(metrics) >= {"loss", "code_accuracy"}


def test_conditioning_replay_gives_equal_logps(model):
    batch = make_batch(model)
    cond = model.condition(batch, training=True, generator=torch.Generator().manual_seed(5))
    again = model.condition(batch, training=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(cond.reference_keep, again.reference_keep)
    replay = Conditioning.from_numpy({k: v.copy() for k, v in cond.to_numpy().items()})
    with torch.no_grad():
        first = model.sequence_logps(batch, batch.target_codes, cond)
        second = model.sequence_logps(batch, batch.target_codes, replay)
        other = model.sequence_logps(batch, batch.target_codes, model.condition(batch, alpha_ref=0.9))
    assert torch.equal(first, second)
    assert (first - other).abs().max() > 1e-5  # the conditioning does matter


@pytest.mark.parametrize("mode", ["trained", "released", "none"])
def test_gradients_reach_mask_generator_only_when_trained(mode):
    model = make_model(mode).train()
    loss, _ = model.loss(make_batch(model))
    loss.backward()
    for name, param in model.mask_generator.named_parameters():
        if mode == "trained":
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    for param in model.trainable_parameters(mask_generator=False):
        assert param.grad is not None and param.grad.abs().sum() > 0
    base = [p for n, p in model.backbone.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in base)


def test_generation_same_codes_with_and_without_cache(model):
    batch = make_batch(model, b=2)
    k, t = model.backbone.codebook_size, model.backbone.tokens_per_image
    cached = model.generate(batch, [0.0, 1.0], seed=7)
    uncached = model.generate(batch, [0.0, 1.0], seed=7, use_cache=False)
    assert cached.codes.shape == (4, t) and cached.codes.dtype == torch.long
    assert torch.equal(cached.codes, uncached.codes)
    assert int(cached.codes.min()) >= 0 and int(cached.codes.max()) < k
    assert cached.window_index.tolist() == [0, 0, 1, 1]
    assert cached.conditioning.alpha_ref.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert cached.conditioning.reference_keep.sum(1).tolist() == [t, 0, t, 0]
    assert not torch.equal(cached.codes, model.generate(batch, [0.0, 1.0], seed=8).codes)
    # replaying the recorded conditioning reproduces the codes
    replay = model.generate(batch, [0.0, 1.0], seed=7, cond=cached.conditioning)
    assert torch.equal(replay.codes, cached.codes)


@pytest.mark.parametrize("alpha_ref, samples, guidance", [([0.0, 1.0], 1, 1.0), (0.5, 3, 1.0), (0.3, 1, 1.0),
                                                            (0.5, 3, 2.5)])
def test_fast_decode_gives_the_library_forward_codes(model, alpha_ref, samples, guidance):
    """The lean decode step (LoRA merged, fused products) against a library forward per step and no cache;
    with history guidance too (guided rows beside their history-free twins)."""
    from pigeon.models.decoding import fast_decoder

    assert fast_decoder(model.backbone.decoder_body(), torch.float32) is not None  # the fast path is taken
    batch = make_batch(model, b=4, seed=3)  # four captions of different lengths: left padding in play
    sampling = SamplingConfig(history_guidance=guidance)
    fast = model.generate(batch, alpha_ref, num_samples=samples, seed=11, sampling=sampling)
    library = model.generate(batch, alpha_ref, num_samples=samples, seed=11, fast_decode=False, sampling=sampling)
    uncached = model.generate(batch, alpha_ref, num_samples=samples, seed=11, use_cache=False, sampling=sampling)
    assert torch.equal(fast.codes, library.codes) and torch.equal(fast.codes, uncached.codes)


def test_fast_decode_step_matches_the_library_hidden_state(model):
    """One decode step's hidden state equals the library's teacher-forced one at that position."""
    from pigeon.models.decoding import fast_decoder
    from pigeon.models.generation import preallocated_cache

    bb, batch = model.backbone, make_batch(model, b=3, seed=5)
    cond = model.condition(batch, alpha_ref=0.4)
    history_mask, reference_mask = cond.history_keep.float(), cond.reference_keep.float()
    with torch.no_grad():
        prefix, attention = model.prefix(batch, history_mask, reference_mask)
        new = bb.embed_codes(batch.target_codes[:, :1])
        full_attention = torch.cat([attention, attention.new_ones(len(batch), 1)], dim=1)
        positions = model.positions(full_attention)
        reference, _ = bb.transformer(torch.cat([prefix, new], dim=1), full_attention, positions)
        p = prefix.shape[1]
        cache = preallocated_cache(p + 1)
        bb.transformer(prefix, attention, positions[:, :p], past_key_values=cache, use_cache=True)
        decoder = fast_decoder(bb.decoder_body(), torch.float32)
        cos, sin = decoder.rotary(positions[:, p], torch.float32)
        hidden = decoder.step(new[:, 0], cos, sin, p, [layer.key_buffer for layer in cache.layers],
                              [layer.value_buffer for layer in cache.layers], full_attention.bool()[:, None, None])
    torch.testing.assert_close(hidden, reference[:, -1], rtol=1e-4, atol=1e-4)
    # the LoRA weights are part of it: without them the state differs
    model.backbone.lm.disable_adapter_layers()
    try:
        plain = fast_decoder(bb.decoder_body(), torch.float32)
        assert not torch.allclose(plain.layers[0].qkv, decoder.layers[0].qkv)
    finally:
        model.backbone.lm.enable_adapter_layers()


def test_generation_top_k_and_never_end_of_image(model, monkeypatch):
    batch = make_batch(model, b=2)
    greedy = SamplingConfig(top_k=1)
    first = model.generate(batch, 0.5, num_samples=2, sampling=greedy, seed=0)
    assert torch.equal(first.codes, model.generate(batch, 0.5, num_samples=2, sampling=greedy, seed=1).codes)
    assert torch.equal(first.codes[0], first.codes[1])  # top-1 is greedy: the samples agree
    logits = model.backbone.image_logits

    def end_of_image_dominates(hidden):
        out = logits(hidden).clone()
        out[..., -1] += 1e4
        return out

    monkeypatch.setattr(model.backbone, "image_logits", end_of_image_dominates)
    out = model.generate(batch, torch.tensor([0.2, 0.8]), sampling=SamplingConfig(temperature=2.0), seed=3)
    assert int(out.codes.max()) < model.backbone.codebook_size
    assert out.conditioning.alpha_ref.tolist() == pytest.approx([0.2, 0.8])


def test_no_adapter_grid_is_the_kept_reference_embeddings():
    model = make_model(use_adapter=False, lora=False).eval()
    assert model.adapter is None
    batch = make_batch(model)
    cond = model.condition(batch, alpha_ref=0.5)
    prefix, _ = model.prefix(batch, cond.history_keep.float(), cond.reference_keep.float())
    t = model.backbone.tokens_per_image
    grid = prefix[:, -(t + 1):-1]
    tokens = model.backbone.embed_codes(batch.reference_codes)
    kept = cond.history_keep.float()[..., None]
    style = (model.backbone.embed_codes(batch.history_codes.flatten(1)).reshape(*kept.shape[:3], -1) * kept
             ).sum((1, 2)) / kept.sum((1, 2))
    style = style * tokens.pow(2).mean((1, 2)).sqrt()[:, None] / style.pow(2).mean(-1, keepdim=True).sqrt()
    expected = tokens * cond.reference_keep.float()[..., None] + style[:, None]
    torch.testing.assert_close(grid, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(model.loss(batch)[0])


def test_pooled_reference_ablation_feeds_one_emb_vector():
    params = smoke()
    cfg = params.model.model_copy(update={"reference": "pooled"})
    torch.manual_seed(0)
    model = PigeonModel(tiny_backbone(), cfg).eval()
    batch = make_batch(model)
    cond = model.condition(batch, alpha_ref=0.5)
    prefix, attention = model.prefix(batch, cond.history_keep.float(), cond.reference_keep.float())
    assert prefix.shape[1] == attention.shape[1] == batch.caption_ids.shape[1] + model.history_len + 2
    pooled = model.adapter(model.backbone.condition_features(batch.reference_codes), cond.reference_keep.float())
    torch.testing.assert_close(prefix[:, -2], pooled)
    out = model.generate(batch, 0.5, sampling=SamplingConfig(top_k=1), seed=0)
    assert out.codes.shape == (B, model.backbone.tokens_per_image)


def test_reference_grid_and_style_tokens_change_the_prediction(model):
    """The two pathways are wired: cutting the reference grid or emptying the history changes the
    log-probabilities of the same target."""
    batch = make_batch(model)
    cond = model.condition(batch, alpha_ref=0.0)
    no_reference = Conditioning(cond.history_keep, torch.zeros_like(cond.reference_keep), cond.alpha_ref)
    no_history = Conditioning(torch.zeros_like(cond.history_keep), cond.reference_keep, cond.alpha_ref)
    with torch.no_grad():
        full = model.sequence_logps(batch, batch.target_codes, cond)
        for other in (no_reference, no_history):
            assert (model.sequence_logps(batch, batch.target_codes, other) - full).abs().min() > 1e-3


def test_save_load_trainable_round_trip(tmp_path, model):
    model.save_trainable(tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json", "mask_generator.safetensors",
            "adapter.safetensors", "pigeon_config.json"} <= {p.name for p in tmp_path.iterdir()}
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["r"] == 8 and peft_config["peft_type"] == "LORA"
    fresh = PigeonModel(tiny_backbone(), model.cfg).eval()
    fresh.load_trainable(tmp_path)
    assert fresh.lora_config == model.lora_config
    for mine, theirs in zip(model.trainable_parameters(), fresh.trainable_parameters(), strict=True):
        assert torch.equal(mine, theirs)
    batch = make_batch(model)
    cond = model.condition(batch, alpha_ref=0.3)
    with torch.no_grad():
        assert torch.equal(model.sequence_logps(batch, batch.target_codes, cond),
                           fresh.sequence_logps(batch, batch.target_codes, cond))


def test_window_encoder_and_item_code_cache(tmp_path, synthetic_raw):
    from pigeon.artifacts import cached_item_codes
    from pigeon.data.raw import load_images, read_items
    from pigeon.models.batching import WindowEncoder, item_codes
    from pigeon.models.personalization import reference_view
    from pigeon.paths import Workspace

    ws = Workspace.at(tmp_path)
    (ws.root / "data").mkdir()
    (ws.root / "data" / "raw").symlink_to(synthetic_raw)
    backbone = tiny_backbone().eval()
    backbone.save_pretrained(ws.foundation)
    params = smoke()
    items = read_items(ws.raw)
    found = cached_item_codes(params, ws, backbone)
    codes, views = found.codes, found.reference
    assert codes.shape == (len(items), backbone.tokens_per_image)
    assert views.shape == (len(items), params.model.reference_views + 1, backbone.tokens_per_image)
    cache = list((ws.root / ".pigeon" / "cache").glob("codes-*.safetensors"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    assert torch.equal(cached_item_codes(params, ws, backbone).reference, views)
    assert cache[0].stat().st_mtime_ns == stamp
    images = load_images(ws.raw, 32, items)[:5]
    assert torch.equal(item_codes(backbone, images, batch_size=2), codes[:5])
    # view 0 is the plain grayscale reference; the training views differ from it
    assert torch.equal(item_codes(backbone, reference_view(images)), views[:5, 0])
    assert not torch.equal(views[:, 1], views[:, 0])

    cfg = ModelConfig()
    windows = pd.DataFrame({**{f"history_{i}": [i, i + 1] for i in range(5)},
                            "target_item": [7, 9], "reference_item": [11, 3]})
    encoder = WindowEncoder(backbone, found, items, cfg, 12)
    batch = encoder.batch(windows, reference_col="reference_item")
    assert torch.equal(batch.history_codes[1, 4], codes[5])
    assert torch.equal(batch.reference_codes, views[[11, 3], 0]) and torch.equal(batch.target_codes, codes[[7, 9]])
    trained = encoder.batch(windows, views=torch.Generator().manual_seed(0))
    assert all(any(torch.equal(trained.reference_codes[r], views[i, v]) for v in range(views.shape[1]))
               for r, i in enumerate([7, 9]))
    ids, _ = backbone.tokenize_captions([items.loc[11, "name"]], 12)
    assert torch.equal(batch.caption_ids[0], ids[0])
    none = encoder.batch(windows, target_col=None)
    assert none.target_codes is None and torch.equal(none.reference_codes, views[[7, 9], 0])
    assert np.array_equal(batch.caption_mask.sum(1).numpy() > 0, [True, True])


def test_history_code_prior_counts_only_kept_tokens():
    from pigeon.models.generation import history_code_prior

    codes = torch.tensor([[[3, 3, 5, 7]], [[1, 2, 2, 2]]])  # [N=2, H=1, T=4]
    keep = torch.tensor([[[True, True, True, False]], [[False, False, False, False]]])
    prior = history_code_prior(codes, keep, codebook_size=8)
    assert prior.shape == (2, 8)
    assert prior[0, 3] > prior[0, 5] > prior[0, 7] == prior[0, 0]  # code 7 is masked out: never counted
    assert torch.equal(prior[1], torch.zeros(8))  # nothing kept: no prior
    assert prior[0].mean().abs() < 1e-6  # centred: it moves probability between codes, not the scale


def test_history_prior_pulls_sampled_codes_toward_the_history(model):
    batch = make_batch(model, b=2, seed=4)
    with_prior = SamplingConfig(history_prior=50.0)
    cond = model.generate(batch, 0.0, sampling=SamplingConfig(), seed=0).conditioning
    plain = model.generate(batch, 0.0, sampling=SamplingConfig(), seed=0, cond=cond).codes
    pulled = model.generate(batch, 0.0, sampling=with_prior, seed=0, cond=cond).codes

    def share_in_history(codes):
        return np.mean([np.isin(codes[i].numpy(), batch.history_codes[i][cond.history_keep[i]].numpy()).mean()
                        for i in range(len(codes))])

    assert share_in_history(pulled) > 0.9 > share_in_history(plain)


def test_history_guidance_zero_samples_the_history_free_model(model):
    """Guidance scale 0 leaves only the history-free logits: the same codes as sampling plainly with every
    history token masked (the guided rows run beside their history-free twins in one batch)."""
    batch = make_batch(model, b=3, seed=5)
    cond = model.generate(batch, 0.0, seed=0).conditioning
    free = Conditioning(torch.zeros_like(cond.history_keep), cond.reference_keep, cond.alpha_ref)
    cool = SamplingConfig(temperature=0.1)  # at 1.0 the random model's history moves few draws
    guided = model.generate(batch, 0.0, sampling=cool.model_copy(update={"history_guidance": 0.0}), seed=0,
                            cond=cond).codes
    plain_free = model.generate(batch, 0.0, sampling=cool, seed=0, cond=free).codes
    plain = model.generate(batch, 0.0, sampling=cool, seed=0, cond=cond).codes
    assert guided.shape == plain.shape
    assert (guided == plain_free).float().mean() > 0.95  # batch-size rounding may flip a rare near-tie
    assert (plain_free == plain).float().mean() < 0.9  # the history matters in this model: the test can fail


def test_history_guidance_moves_samples_away_from_the_history_free_ones(model):
    batch = make_batch(model, b=4, seed=6)
    cond = model.generate(batch, 0.0, seed=0).conditioning
    free = Conditioning(torch.zeros_like(cond.history_keep), cond.reference_keep, cond.alpha_ref)
    cool = SamplingConfig(temperature=0.1)
    plain_free = model.generate(batch, 0.0, sampling=cool, seed=0, cond=free).codes

    def agreement(scale):
        sampling = cool.model_copy(update={"history_guidance": scale})
        return float((model.generate(batch, 0.0, sampling=sampling, seed=0, cond=cond).codes == plain_free)
                     .float().mean())

    assert agreement(0.0) > agreement(1.0) > agreement(4.0)


def test_history_dropout_masks_whole_histories_in_training_only():
    params = smoke()
    torch.manual_seed(0)
    dropping = PigeonModel(tiny_backbone(), params.model.model_copy(update={"history_dropout": 0.5}))
    batch = make_batch(dropping, b=64, seed=7)
    cond = dropping.condition(batch, training=True, generator=torch.Generator().manual_seed(0))
    per_row = cond.history_keep.flatten(1).any(dim=1)
    assert 0.25 < float((~per_row).float().mean()) < 0.75  # about half the windows lose their whole history
    assert bool(cond.history_keep[per_row].any())
    inference = dropping.condition(batch, alpha_ref=0.0)
    assert bool(inference.history_keep.flatten(1).any(dim=1).all())  # never at inference
    loss, metrics = dropping.loss(batch)
    assert torch.isfinite(loss) and metrics["history_kept"] < inference.history_keep.float().mean()
