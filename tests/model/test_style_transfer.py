"""The detokenizer's style transfer (docs/design.md §1.4): AdaIN toward the kept history's statistics."""

from __future__ import annotations

import pytest
import torch

from pigeon.errors import ConfigError
from pigeon.models.style_transfer import decode_in_style, keep_weights, renormalise, weighted_statistics
from tests.model.test_pigeon import make_batch, make_model, one_thread, tiny_backbone  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def backbone():
    bb = tiny_backbone()
    bb.eval()
    return bb


def test_weighted_statistics_count_only_kept_positions():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 4, 2, 2, generator=g)  # [N, H, C, h, w]
    weights = torch.zeros(2, 3, 1, 2, 2)
    weights[0, 1] = 1.0  # row 0: only image 1 counts
    mean, std, total = weighted_statistics(feats, weights)
    assert torch.allclose(mean[0], feats[0, 1].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(std[0], feats[0, 1].std(dim=(1, 2), unbiased=False), atol=1e-6)
    assert total.tolist() == [4.0, 0.0]


def test_renormalise_reaches_the_target_statistics_and_blends():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 4, 8, 8, generator=g) * 3 + 1
    mean, std = torch.randn(2, 4, generator=g), torch.rand(2, 4, generator=g) + 0.5
    full = renormalise(feats, mean, std, torch.ones(2))
    assert torch.allclose(full.mean(dim=(2, 3)), mean, atol=1e-5)
    assert torch.allclose(full.std(dim=(2, 3)), std, atol=1e-3)
    assert torch.equal(renormalise(feats, mean, std, torch.zeros(2)), feats)
    half = renormalise(feats, mean, std, torch.tensor([0.5, 0.5]))
    assert torch.allclose(half, (feats + full) / 2, atol=1e-5)


def test_keep_weights_follow_the_token_grid():
    keep = torch.zeros(1, 1, 4, dtype=torch.bool)
    keep[0, 0, 1] = True  # token (row 0, column 1) of a 2 × 2 grid
    w = keep_weights(keep, (4, 4))[0, 0, 0]
    assert w[:2, 2:].eq(1).all() and w.sum() == 4


def test_style_transfer_decodes_toward_the_kept_history(backbone):
    g = torch.Generator().manual_seed(2)
    k, t = backbone.codebook_size, backbone.tokens_per_image
    codes = torch.randint(0, k, (2, t), generator=g)
    history = torch.randint(0, k, (2, 3, t), generator=g)
    history[:, 0] = history[:, 0, :1]  # image 0 of each history is one code repeated: a flat "style"
    keep_all = torch.ones(2, 3, t, dtype=torch.bool)
    with torch.no_grad():
        plain = backbone.decode_codes(codes)
        styled = decode_in_style(backbone, codes, history, keep_all, 1.0)
        assert torch.equal(decode_in_style(backbone, codes, history, keep_all, 0.0), plain)  # strength 0
        assert not torch.allclose(styled, plain, atol=1e-3)

        # Only kept tokens set the style: image 0 kept alone gives the same image whatever images 1-2 hold.
        only_first = torch.zeros_like(keep_all)
        only_first[:, 0] = True
        other = history.clone()
        other[:, 1:] = torch.randint(0, k, other[:, 1:].shape, generator=g)
        a = decode_in_style(backbone, codes, history, only_first, 1.0)
        b = decode_in_style(backbone, codes, other, only_first, 1.0)
        assert torch.allclose(a, b, atol=1e-5)
        assert not torch.allclose(a, styled, atol=1e-3)

        # A row whose mask keeps nothing decodes plainly.
        nothing = keep_all.clone()
        nothing[1] = False
        mixed = decode_in_style(backbone, codes, history, nothing, 1.0)
        assert torch.allclose(mixed[1], plain[1], atol=1e-5) and torch.allclose(mixed[0], styled[0], atol=1e-5)

        # The decoded image's colours move toward the flat history image's.
        flat = backbone.decode_codes(history[:, 0])
        kept_flat = torch.zeros_like(keep_all)
        kept_flat[:, 0] = True
        toward = decode_in_style(backbone, codes, history, kept_flat, 1.0)
    gap = lambda x: (x.mean(dim=(2, 3)) - flat.mean(dim=(2, 3))).abs().sum()
    assert gap(toward) < gap(plain)


def test_decode_generated_applies_the_generation_masks():
    model = make_model()
    model.eval()
    batch = make_batch(model, b=2, seed=5)
    with torch.no_grad():
        out = model.generate(batch, [0.0, 0.5], num_samples=2, seed=0)
        plain = model.decode_generated(out, batch, 0.0)
        styled = model.decode_generated(out, batch, 1.0)
        history = batch.history_codes.index_select(0, out.window_index)
        expected = decode_in_style(model.backbone, out.codes, history, out.conditioning.history_keep, 1.0)
    assert torch.equal(plain, model.decode(out.codes))
    assert torch.allclose(styled, expected, atol=1e-6)
    assert styled.shape == plain.shape == (4, 3, model.backbone.image_size, model.backbone.image_size)


def test_a_detokenizer_without_style_layers_is_a_config_error(backbone, monkeypatch):
    monkeypatch.setattr(type(backbone), "style_layers", lambda self: [])
    codes = torch.zeros(1, backbone.tokens_per_image, dtype=torch.long)
    keep = torch.ones(1, 2, backbone.tokens_per_image, dtype=torch.bool)
    with pytest.raises(ConfigError, match="style_strength"):
        decode_in_style(backbone, codes, codes[:, None].repeat(1, 2, 1), keep, 0.5)
