"""The mask generator on its own: keep counts, which tokens are kept, and where gradients go."""

from __future__ import annotations

import pytest
import torch

from pigeon.config import MaskConfig
from pigeon.models.mask import MaskGenerator, keep_count, keep_top

H, T, D = 5, 16, 32


def _generator(mode: str = "trained", alpha_hist: float = 0.2) -> MaskGenerator:
    torch.manual_seed(0)
    return MaskGenerator(D, H, MaskConfig(alpha_hist=alpha_hist, mode=mode, num_heads=4))


def _embeds(b: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, H, T, D, generator=g), torch.randn(b, T, D, generator=g)


def test_keep_top_matches_sorting():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 20, generator=g)
    counts = torch.tensor([0, 1, 7, 10, 19, 20])
    keep, threshold = keep_top(scores, counts)
    assert keep.sum(1).tolist() == counts.tolist()
    for row in range(6):
        top = set(scores[row].argsort(descending=True)[: counts[row]].tolist())
        assert set(keep[row].nonzero().flatten().tolist()) == top
        # the threshold separates kept from dropped scores
        assert bool((scores[row][keep[row]] > threshold[row]).all())
        assert bool((scores[row][~keep[row]] < threshold[row]).all())


def test_keep_count_rounds_half_up():
    assert keep_count(torch.tensor([0.0, 0.2, 0.5, 1.0]), 64).tolist() == [64, 51, 32, 0]


def test_history_keeps_top_tokens_jointly():
    gen = _generator()
    history, reference = _embeds()
    with torch.no_grad():
        hist_scores, ref_scores = gen.scores(history, reference)
        keep, mask = gen.history_mask(hist_scores)
    assert hist_scores.shape == (3, H, T) and ref_scores.shape == (3, T)
    assert bool((hist_scores.abs() <= 1 + 1e-5).all())  # cosine similarities
    expected = round(0.8 * H * T)
    assert keep.reshape(3, -1).sum(1).tolist() == [expected] * 3
    flat_scores, flat_keep = hist_scores.reshape(3, -1), keep.reshape(3, -1)
    for row in range(3):  # every kept token outscores every dropped one, across images
        assert flat_scores[row][flat_keep[row]].min() > flat_scores[row][~flat_keep[row]].max()
    assert torch.equal(mask, keep.float())


def test_reference_training_masks_high_inference_masks_low():
    gen = _generator()
    history, reference = _embeds()
    alpha = torch.tensor([0.5, 0.25, 1.0])
    with torch.no_grad():
        _, scores = gen.scores(history, reference)
        train_keep, _ = gen.reference_mask(scores, alpha, training=True)
        infer_keep, _ = gen.reference_mask(scores, alpha, training=False)
    expected = [8, 12, 0]
    assert train_keep.sum(1).tolist() == expected and infer_keep.sum(1).tolist() == expected
    for row in range(2):
        # training keeps the lowest-scoring tokens, inference the highest-scoring ones
        assert scores[row][train_keep[row]].max() < scores[row][~train_keep[row]].min()
        assert scores[row][infer_keep[row]].min() > scores[row][~infer_keep[row]].max()
    assert not (train_keep[0] & infer_keep[0]).any()  # α = 0.5: complementary halves


def test_straight_through_mask_is_exactly_hard_and_reaches_every_parameter():
    gen = _generator("trained")
    history, reference = _embeds()
    hist_scores, ref_scores = gen.scores(history, reference)
    hist_keep, hist_mask = gen.history_mask(hist_scores)
    ref_keep, ref_mask = gen.reference_mask(ref_scores, torch.tensor([0.3, 0.6, 0.9]), training=True)
    assert torch.equal(hist_mask.detach(), hist_keep.float()) and torch.equal(ref_mask.detach(), ref_keep.float())
    g = torch.Generator().manual_seed(2)
    loss = (hist_mask * torch.randn(hist_mask.shape, generator=g)).sum() + (
        ref_mask * torch.randn(ref_mask.shape, generator=g)).sum()
    loss.backward()
    for name, param in gen.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", ["released", "none"])
def test_untrained_modes_carry_no_gradient(mode):
    gen = _generator(mode)
    history, reference = _embeds()
    hist_scores, ref_scores = gen.scores(history, reference)
    hist_keep, hist_mask = gen.history_mask(hist_scores)
    _, ref_mask = gen.reference_mask(ref_scores, torch.tensor([0.5, 0.5, 0.5]), training=True)
    assert hist_mask.grad_fn is None and ref_mask.grad_fn is None
    if mode == "none":
        assert bool(hist_keep.all())
    else:
        assert hist_keep.reshape(3, -1).sum(1).tolist() == [round(0.8 * H * T)] * 3
