"""The DPO losses equal their closed forms (trl's DPOConfig meaning) on hand-computed pairs."""

import math

import pytest
import torch

from pigeon.errors import PigeonError
from pigeon.training.dpo import dpo_loss, dpo_metrics

# Two pairs: policy/reference summed log-probs of the chosen (w) and rejected (l) sequences.
POLICY_CHOSEN = torch.tensor([-10.0, -40.0])
POLICY_REJECTED = torch.tensor([-12.0, -20.0])
REF_CHOSEN = torch.tensor([-11.0, -30.0])
REF_REJECTED = torch.tensor([-11.5, -30.0])
BETA = 0.1
# h = (π_w − ref_w) − (π_l − ref_l): pair 0: 1 − (−0.5) = 1.5; pair 1: −10 − 10 = −20.
H = (1.5, -20.0)


def _loss(loss_type, num_tokens=1):
    return dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA, loss_type, num_tokens)


def test_sigmoid_is_minus_log_sigmoid_of_beta_h():
    expected = [math.log1p(math.exp(-BETA * h)) for h in H]  # −log σ(x) = log(1 + e^−x)
    assert _loss("sigmoid").losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[0] == pytest.approx(0.620957, rel=1e-6)  # hand value: log(1 + e^−0.15)


def test_hinge_is_relu_one_minus_beta_h():
    assert _loss("hinge").losses.tolist() == pytest.approx([0.85, 3.0], rel=1e-6)


def test_ipo_is_squared_distance_to_half_inverse_beta_per_token():
    # (h/n − 1/(2β))² with 1/(2β) = 5: n=1 → (1.5−5)², (−20−5)²; n=4 → (0.375−5)², (−5−5)².
    assert _loss("ipo").losses.tolist() == pytest.approx([12.25, 625.0], rel=1e-6)
    assert _loss("ipo", num_tokens=4).losses.tolist() == pytest.approx([21.390625, 100.0], rel=1e-6)


def test_rewards_and_logged_metrics():
    out = _loss("sigmoid")
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -1.0], rel=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, 1.0], rel=1e-6)
    m = dpo_metrics(out)
    assert m["rewards/accuracies"] == 0.5
    assert m["rewards/margins"] == pytest.approx((0.15 - 2.0) / 2, rel=1e-6)
    assert m["loss"] == pytest.approx(float(out.losses.mean()))


def test_equal_policy_and_reference_gives_log_two_and_gradient_prefers_chosen():
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-7.0], requires_grad=True)
    out = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), BETA, "sigmoid")
    assert out.losses.item() == pytest.approx(math.log(2))
    out.losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-BETA / 2) and rejected.grad.item() == pytest.approx(BETA / 2)


def test_unknown_loss_type_is_a_pigeon_error():
    with pytest.raises(PigeonError, match="dpo.loss_type 'kto'"):
        _loss("kto")
