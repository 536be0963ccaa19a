"""DST losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from bundles.dst_ica_calcification.scripts.losses import (
    DSTLoss,
    classification_loss,
    landmark_loss,
    landmark_target,
    presence_loss,
    total_loss,
)

LN2 = math.log(2.0)
# softmax([0, ln 2, 0]) = [1/4, 1/2, 1/4]
LOGITS = torch.tensor([[[0.0, LN2, 0.0]]])
MASK3 = torch.ones(1, 3, dtype=torch.bool)


def test_hard_target_cross_entropy_is_minus_log_of_the_true_slice_probability():
    loss = landmark_loss(LOGITS, MASK3, torch.tensor([[1.0]]), torch.tensor([[1.0]]), sigma=0.0)
    assert loss.item() == pytest.approx(LN2)


def test_fractional_target_goes_to_the_nearest_slice():
    loss = landmark_loss(LOGITS, MASK3, torch.tensor([[0.4]]), torch.tensor([[1.0]]), sigma=0.0)
    assert loss.item() == pytest.approx(math.log(4.0))


def test_padded_slices_do_not_count_even_with_large_logits():
    logits = torch.tensor([[[0.0, LN2, 0.0, 100.0]]])
    mask = torch.tensor([[True, True, True, False]])
    loss = landmark_loss(logits, mask, torch.tensor([[1.0]]), torch.tensor([[1.0]]))
    assert loss.item() == pytest.approx(LN2)


def test_absent_landmarks_are_left_out_of_the_mean():
    logits = torch.cat([LOGITS, torch.tensor([[[9.0, 0.0, 0.0]]])], dim=1)  # second landmark: far off, absent
    loss = landmark_loss(logits, MASK3, torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(LN2)
    none = landmark_loss(logits, MASK3, torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2))
    assert none.item() == 0.0


def test_gaussian_target_is_normalised_over_real_slices_and_gives_the_expected_cross_entropy():
    a = math.exp(-0.5)
    q = landmark_target(torch.tensor([[1.0]]), torch.tensor([[True, True, True, False]]), sigma=1.0)
    torch.testing.assert_close(q[0, 0], torch.tensor([a, 1.0, a, 0.0]) / (1 + 2 * a))
    loss = landmark_loss(LOGITS, MASK3, torch.tensor([[1.0]]), torch.tensor([[1.0]]), sigma=1.0)
    q0 = a / (1 + 2 * a)
    expected = -(2 * q0 * math.log(0.25) + (1 - 2 * q0) * math.log(0.5))
    assert loss.item() == pytest.approx(expected)


def test_presence_bce_and_class_ce():
    assert presence_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(LN2)
    assert classification_loss(torch.tensor([[0.0, LN2, 0.0]]), torch.tensor([1])).item() == pytest.approx(LN2)


def test_total_adds_the_weighted_presence_term_and_has_gradients():
    logits = LOGITS.clone().requires_grad_(True)
    pred = {"landmark_logits": logits, "presence_logits": torch.zeros(1, 1)}
    target = {"mask": MASK3, "landmark_slice": torch.tensor([[1.0]]), "landmark_present": torch.tensor([[1.0]])}
    loss = total_loss(pred, target, sigma=0.0, presence_weight=2.0)
    assert loss.item() == pytest.approx(LN2 + 2 * LN2)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert DSTLoss(0.0, 2.0)(pred, target).item() == pytest.approx(loss.item())
    cls = DSTLoss()({"class_logits": torch.tensor([[0.0, LN2, 0.0]])}, {"label": torch.tensor([1])})
    assert cls.item() == pytest.approx(LN2)
