"""S2CAC loss terms and schedules, checked against hand-computed values."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from bundles.s2cac_coronary_calcium.scripts import losses as L


def two_voxel_logits() -> torch.Tensor:
    """(1, 2, 1, 1, 2) logits with foreground probabilities 0.75 and 0.5."""
    logits = torch.zeros(1, 2, 1, 1, 2)
    logits[0, 1, 0, 0, 0] = math.log(3.0)
    return logits


# ------------------------------------------------------------------------------------------ weights and schedules


def test_sample_weights():
    w = L.sample_weights(torch.tensor([True, False, True]), 0.25)
    assert w.dtype == torch.float32
    assert w.tolist() == [1.0, 0.25, 1.0]


@pytest.mark.parametrize(
    ("progress", "expected"), [(0.0, 0.0011233), (0.4, 0.048378), (0.6, 0.5005), (0.8, 0.952622), (1.0, 0.997530)]
)
def test_negative_boost_published_values(progress, expected):
    assert L.negative_boost(progress) == pytest.approx(expected, abs=2e-6)


def test_negative_boost_equals_published_epoch_formula():
    """g(e / 500) with our defaults = 1 - 0.999 (1 - sigmoid(0.03 (e - 300))), the published per-epoch curve."""
    for epoch in (0, 57, 200, 300, 421, 500):
        published = 1 - 0.999 * (1 - 1 / (1 + math.exp(-0.03 * (epoch - 300))))
        assert L.negative_boost(epoch / 500) == pytest.approx(published, rel=1e-12)


def test_consistency_weight_published_values():
    assert L.consistency_weight(0.0) == pytest.approx(0.1 * math.exp(-5))
    assert L.consistency_weight(0.1) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert L.consistency_weight(0.2) == pytest.approx(0.1)
    assert L.consistency_weight(0.7) == pytest.approx(0.1)
    # published: t = iteration // 150, 0.1 exp(-5 (1 - t / 200)^2), 150,000 iterations in all
    for iteration in (0, 4_500, 15_000, 29_999, 30_000, 90_000):
        t = min(iteration // 150, 200)
        assert L.consistency_weight(iteration // 150 * 150 / 150_000) == pytest.approx(
            0.1 * math.exp(-5 * (1 - t / 200) ** 2)
        )
    assert L.consistency_weight(0.05, max_weight=1.0, rampup=0.0) == 1.0


def test_schedules_monotone():
    grid = np.linspace(0, 1, 201)
    boost = [L.negative_boost(p) for p in grid]
    ramp = [L.consistency_weight(p) for p in grid]
    assert all(b2 > b1 for b1, b2 in zip(boost, boost[1:], strict=False))
    assert all(r2 >= r1 for r1, r2 in zip(ramp, ramp[1:], strict=False))


def test_schedules_reach_90_percent_before_the_end():
    grid = np.linspace(0, 1, 1001)
    for fn, low, high in ((L.negative_boost, 0.74, 0.75), (L.consistency_weight, 0.16, 0.18)):
        final = fn(1.0)
        first = next(p for p in grid if fn(p) >= 0.9 * final)
        assert low < first < high < 1.0
        assert fn(0.95) >= 0.9 * final


# ------------------------------------------------------------------------------------------ segmentation loss


def test_dice_and_ce_by_hand():
    logits = two_voxel_logits()
    target = torch.tensor([1, 0]).reshape(1, 1, 1, 1, 2)
    dice = (2 * 0.75 + 1e-5) / (1.25 + 1.0 + 1e-5)
    ce = (-math.log(0.75) - math.log(0.5)) / 2
    assert float(L.weighted_soft_dice_loss(logits, target)) == pytest.approx(1 - dice, rel=1e-5)
    assert float(L.weighted_cross_entropy(logits, target)) == pytest.approx(ce, rel=1e-5)
    assert float(L.weighted_dice_ce(logits, target, torch.ones(1))) == pytest.approx(1 - dice + ce, rel=1e-5)
    # index maps without a channel axis and one-hot targets give the same loss
    onehot = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).reshape(1, 2, 1, 1, 2)
    assert float(L.weighted_dice_ce(logits, target[:, 0])) == pytest.approx(1 - dice + ce, rel=1e-5)
    assert float(L.weighted_dice_ce(logits, onehot)) == pytest.approx(1 - dice + ce, rel=1e-5)


def test_dice_averages_the_vessels_present_and_merges_foreground_on_negatives():
    # 3 classes, 2 voxels; perfect confident prediction of class 1 at voxel 0, class 0 at voxel 1, class 2 absent
    logits = torch.full((1, 3, 1, 1, 2), -30.0)
    logits[0, 1, 0, 0, 0] = 30.0
    logits[0, 0, 0, 0, 1] = 30.0
    target = torch.tensor([1, 0]).reshape(1, 1, 1, 1, 2)
    # only class 1 is present: its Dice is 1
    assert float(L.weighted_soft_dice_loss(logits, target)) == pytest.approx(0.0, abs=1e-5)
    assert float(L.weighted_cross_entropy(logits, target)) == pytest.approx(0.0, abs=1e-6)
    # a wrong-vessel prediction scores 0 although class 2 (absent) was predicted nowhere
    swapped = torch.tensor([2, 0]).reshape(1, 1, 1, 1, 2)
    assert float(L.weighted_soft_dice_loss(logits, swapped)) == pytest.approx(1.0, abs=1e-4)
    # a calcium-free sample: merged foreground Dice = smooth / (1 + smooth) with one false-positive voxel
    empty = torch.zeros_like(target)
    assert float(L.weighted_soft_dice_loss(logits, empty)) == pytest.approx(1.0, abs=1e-4)
    # ... and 1 (loss 0) when nothing is predicted
    background = torch.full((1, 3, 1, 1, 2), -30.0)
    background[0, 0] = 30.0
    assert float(L.weighted_soft_dice_loss(background, empty)) == pytest.approx(0.0, abs=1e-5)


def test_dice_ignores_absent_vessels_in_positive_samples():
    # 2 vessels present out of 4; the absent ones carry some probability but do not enter the Dice
    torch.manual_seed(1)
    target = torch.zeros(1, 1, 1, 4, 4, dtype=torch.long)
    target[0, 0, 0, 0, :2] = 1
    target[0, 0, 0, 1, :2] = 3
    logits = torch.full((1, 5, 1, 4, 4), -5.0)
    logits[:, 0] = 5.0
    logits[0, 1, 0, 0, :2] = 10.0
    logits[0, 3, 0, 1, :2] = 10.0
    logits[0, 4, 0, 3, 3] = 4.0  # some mass in an absent vessel channel
    loss = float(L.weighted_soft_dice_loss(logits, target))
    p = torch.softmax(logits, 1)[0, :, 0]
    dice = lambda c: float(2 * (p[c] * (target[0, 0, 0] == c)).sum() / (p[c].sum() + (target[0, 0, 0] == c).sum()))  # noqa: E731
    assert loss == pytest.approx(1 - (dice(1) + dice(3)) / 2, abs=1e-4)


def test_sample_weights_act_per_sample():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 4, 4)
    target = torch.randint(0, 3, (2, 1, 2, 4, 4))
    alone = L.weighted_dice_ce(logits[:1], target[:1])
    w = torch.tensor([1.0, 0.0])
    assert float(L.weighted_dice_ce(logits, target, w)) == pytest.approx(float(alone), rel=1e-6)
    changed = logits.clone()
    changed[1] = torch.randn(3, 2, 4, 4) * 5
    assert float(L.weighted_dice_ce(changed, target, w)) == pytest.approx(float(alone), rel=1e-6)
    # weights 1 and 3: weighted mean of the per-sample losses
    second = L.weighted_dice_ce(logits[1:], target[1:])
    mixed = L.weighted_dice_ce(logits, target, torch.tensor([1.0, 3.0]))
    assert float(mixed) == pytest.approx((float(alone) + 3 * float(second)) / 4, rel=1e-6)
    # no gradient reaches a zero-weight sample
    logits.requires_grad_(True)
    L.weighted_dice_ce(logits, target, w).backward()
    assert float(logits.grad[1].abs().sum()) == 0.0
    assert float(logits.grad[0].abs().sum()) > 0.0


def test_bad_target_shape_raises():
    with pytest.raises(ValueError):
        L.weighted_dice_ce(torch.zeros(1, 2, 1, 2, 2), torch.zeros(1, 2, 1, 2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------ scores


def test_true_score_counts_calcium_voxels():
    label = torch.zeros(2, 1, 2, 3, 3, dtype=torch.uint8)
    label[0, 0, 0, 0, :2] = 1
    label[0, 0, 1, 2, 2] = 4
    assert L.true_score(label, 2.0).tolist() == [1.5, 0.0]


def test_soft_score():
    confident_bg = torch.full((2, 5, 3, 8, 8), -20.0)
    confident_bg[:, 0] = 20.0
    assert L.soft_score(confident_bg).abs().max() < 1e-12
    uniform = torch.zeros(1, 2, 2, 2, 2, requires_grad=True)  # p_fg = 0.5 on 8 voxels
    score = L.soft_score(uniform, score_scale=4.0)
    assert score.shape == (1,)
    assert float(score.detach()) == pytest.approx(1.0)
    score.sum().backward()
    assert float(uniform.grad.abs().sum()) > 0


def test_score_regression_loss():
    pred = torch.tensor([1.0, 2.0, 4.0])
    true = torch.tensor([1.5, 2.0, 0.0])
    assert float(L.score_regression_loss(pred, true)) == pytest.approx((0.5 + 0 + 4) / 3)
    assert float(L.score_regression_loss(pred, true, torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(0.25)


def test_score_consistency_loss():
    student_u = torch.zeros(1, 2, 1, 2, 2, requires_grad=True)  # soft score 2 voxels -> 0.5 at scale 4
    student_l = torch.zeros(2, 2, 1, 2, 2)  # 0.5 each
    teacher_score = torch.tensor([1.5], requires_grad=True)
    true = torch.tensor([0.0, 2.5])
    loss = L.score_consistency_loss(student_u, teacher_score, student_l, true, torch.tensor([1.0, 0.0]), 4.0)
    assert float(loss.detach()) == pytest.approx(1.0 + 0.5)
    loss_w = L.score_consistency_loss(student_u, teacher_score, student_l, true, None, 4.0, score_weight=1e-6)
    assert float(loss_w.detach()) == pytest.approx(1e-6 * (1.0 + (0.5 + 2.0) / 2))
    loss.backward()
    assert teacher_score.grad is None  # the teacher is a target
    assert float(student_u.grad.abs().sum()) > 0


def test_mask_consistency_loss():
    student = torch.zeros(1, 2, 1, 1, 2, requires_grad=True)
    teacher = torch.tensor([1.0, 3.0, 0.0, 0.0]).reshape(1, 2, 1, 1, 2).requires_grad_(True)
    s_score = torch.tensor([2.0, 1.0], requires_grad=True)
    t_score = torch.tensor([1.0, 1.0], requires_grad=True)
    loss = L.mask_consistency_loss(student, teacher, s_score, t_score)
    assert float(loss.detach()) == pytest.approx((1 + 9) / 4 + 0.5)
    assert float(L.mask_consistency_loss(student, teacher, s_score, t_score, 0.1).detach()) == pytest.approx(2.55)
    loss.backward()
    assert teacher.grad is None and t_score.grad is None
    assert s_score.grad is not None and student.grad is not None


# ------------------------------------------------------------------------------------------ mean teacher


def tiny_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))


def test_ema_update_math():
    torch.manual_seed(0)
    student = tiny_net()
    student.train()(torch.randn(4, 2))  # move BN running stats away from their defaults
    teacher = tiny_net()
    assert L.ema_update(teacher, student, step=0) == 0.0  # step 0 copies the student
    for name, value in student.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[name], value, rtol=0, atol=0)

    before = copy.deepcopy(teacher.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student(torch.randn(4, 2))
    a = L.ema_update(teacher, student, step=5)
    assert a == pytest.approx(1 - 1 / 6)
    a = L.ema_update(teacher, student, step=1000)
    assert a == 0.99
    # two updates: t2 = 0.99 (5/6 t0 + 1/6 s) + 0.01 s
    for name, s in student.state_dict().items():
        t = teacher.state_dict()[name]
        if s.is_floating_point():
            expected = 0.99 * (5 / 6 * before[name] + 1 / 6 * s) + 0.01 * s
            torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-6)
        else:
            assert t.item() == s.item() == 2  # num_batches_tracked is copied
    assert L.ema_update(teacher, student, step=50, decay=0.9) == 0.9


def test_ema_update_rejects_different_modules():
    with pytest.raises(ValueError):
        L.ema_update(torch.nn.Linear(2, 2), tiny_net(), step=0)


def test_teacher_noise_bounds():
    x = torch.full((20_000,), 3.0)
    noisy = L.teacher_noise(x, generator=torch.Generator().manual_seed(0))
    delta = noisy - x
    assert float(delta.abs().max()) <= 0.2 + 1e-6
    assert float(delta.abs().max()) > 0.19  # the clip is reached (2 sigma)
    assert 0.08 < float(delta.std()) < 0.1  # clipping at 2 sigma shrinks the std below 0.1
    assert abs(float(delta.mean())) < 0.005
    again = L.teacher_noise(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy, again, rtol=0, atol=0)
    wide = L.teacher_noise(x, std=0.1, clip=10.0, generator=torch.Generator().manual_seed(1)) - x
    assert float(wide.std()) == pytest.approx(0.1, rel=0.03)


def test_balanced_cross_entropy_weighs_calcium_like_background():
    # 1 calcium voxel among 100: a confident all-background prediction costs ~0 in plain CE, ~log(1/p) balanced
    logits = torch.zeros(1, 2, 1, 10, 10)
    logits[:, 0] = 8.0
    target = torch.zeros(1, 1, 1, 10, 10, dtype=torch.long)
    target[0, 0, 0, 0, 0] = 1
    voxel_ce_fg = float(-torch.log_softmax(logits, 1)[0, 1, 0, 0, 0])
    voxel_ce_bg = float(-torch.log_softmax(logits, 1)[0, 0, 0, 0, 1])
    plain = float(L.weighted_cross_entropy(logits, target))
    balanced = float(L.weighted_cross_entropy(logits, target, balanced=True))
    assert plain == pytest.approx((voxel_ce_fg + 99 * voxel_ce_bg) / 100, rel=1e-5)
    assert balanced == pytest.approx(voxel_ce_fg + voxel_ce_bg, rel=1e-5)
    # a calcium-free sample: balanced equals the plain mean
    empty = torch.zeros_like(target)
    assert float(L.weighted_cross_entropy(logits, empty, balanced=True)) == pytest.approx(voxel_ce_bg, rel=1e-5)


# ------------------------------------------------------------------------------ candidate voxels (>= 130 HU)


def test_candidate_mask_limits_dice_and_ce_to_the_voxels_that_can_be_calcium():
    # 4 voxels: calcium (candidate), bone (candidate, background), two soft-tissue voxels (not candidates)
    logits = torch.zeros(1, 2, 1, 1, 4)
    logits[0, 1, 0, 0] = torch.tensor([math.log(3.0), 0.0, 5.0, -5.0])  # p_fg 0.75, 0.5, ~0.99, ~0.01
    target = torch.tensor([1, 0, 0, 0]).reshape(1, 1, 1, 1, 4)
    candidates = torch.tensor([True, True, False, False]).reshape(1, 1, 1, 1, 4)
    ce = (-math.log(0.75) - math.log(0.5)) / 2  # the two soft-tissue voxels do not count, however wrong
    dice = (2 * 0.75 + 1e-5) / (0.75 + 0.5 + 1.0 + 1e-5)
    assert float(L.weighted_cross_entropy(logits, target, candidates=candidates)) == pytest.approx(ce, rel=1e-5)
    assert float(L.weighted_soft_dice_loss(logits, target, candidates=candidates)) == pytest.approx(1 - dice, rel=1e-5)
    assert float(L.weighted_dice_ce(logits, target, candidates=candidates[:, 0])) == pytest.approx(
        1 - dice + ce, rel=1e-5
    )
    # balanced: mean over calcium candidates + mean over background candidates
    balanced = float(L.weighted_cross_entropy(logits, target, balanced=True, candidates=candidates))
    assert balanced == pytest.approx(-math.log(0.75) - math.log(0.5), rel=1e-5)
    # no gradient reaches a voxel outside the candidates
    logits.requires_grad_(True)
    L.weighted_dice_ce(logits, target, candidates=candidates).backward()
    assert float(logits.grad[..., 2:].abs().sum()) == 0.0
    assert float(logits.grad[..., :2].abs().sum()) > 0.0


def test_candidate_mask_without_candidates_contributes_nothing_and_wrong_shapes_fail():
    logits = torch.randn(2, 3, 1, 2, 2)
    target = torch.zeros(2, 1, 1, 2, 2, dtype=torch.long)
    none = torch.zeros(2, 1, 1, 2, 2, dtype=torch.bool)
    assert float(L.weighted_cross_entropy(logits, target, candidates=none)) == 0.0
    assert float(L.weighted_soft_dice_loss(logits, target, candidates=none)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="candidate mask"):
        L.weighted_cross_entropy(logits, target, candidates=torch.ones(2, 1, 1, 2, 3, dtype=torch.bool))


def test_scores_count_candidate_voxels_only():
    label = torch.zeros(1, 1, 1, 2, 2, dtype=torch.long)
    label[0, 0, 0, 0] = 2  # two calcium voxels, one of them below 130 HU
    candidates = torch.tensor([[True, False], [True, True]]).reshape(1, 1, 1, 2, 2)
    assert L.true_score(label, 1.0, candidates).tolist() == [1.0]
    uniform = torch.zeros(1, 2, 1, 2, 2)  # p_fg 0.5 everywhere: 3 candidates -> 1.5
    assert float(L.soft_score(uniform, 1.0, candidates)) == pytest.approx(1.5)
    loss = L.score_consistency_loss(
        uniform, torch.tensor([1.5]), uniform, torch.tensor([1.0]), None, 1.0, 1.0, candidates, candidates
    )
    assert float(loss) == pytest.approx(0.0 + 0.5)


def test_mask_consistency_with_candidates_ignores_the_free_logits_elsewhere():
    student = torch.zeros(1, 2, 1, 1, 3)
    teacher = torch.tensor([1.0, 2.0, 500.0, 0.0, 0.0, -500.0]).reshape(1, 2, 1, 1, 3)
    candidates = torch.tensor([True, True, False]).reshape(1, 1, 1, 1, 3)
    score = torch.zeros(1)
    loss = L.mask_consistency_loss(student, teacher, score, score, candidates=candidates)
    assert float(loss) == pytest.approx((1 + 4 + 0 + 0) / 4)  # mean over 2 candidate voxels x 2 channels
    assert float(L.mask_consistency_loss(student, teacher, score, score)) > 1e4  # every voxel: swamped


def test_mask_consistency_on_probabilities_is_bounded():
    student = torch.zeros(1, 2, 1, 1, 2)  # p = 0.5 / 0.5
    teacher = torch.tensor([300.0, 0.0, 0.0, 0.0]).reshape(1, 2, 1, 1, 2)  # p_bg 1 at voxel 0, 0.5 at voxel 1
    score = torch.zeros(1)
    loss = L.mask_consistency_loss(student, teacher, score, score, on_probabilities=True)
    assert float(loss) == pytest.approx((0.25 + 0.25 + 0 + 0) / 4)
    assert float(L.mask_consistency_loss(student, teacher, score, score)) == pytest.approx(300.0**2 / 4)
