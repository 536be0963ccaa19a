"""Loss terms and schedules of S2CAC semi-supervised training (mean teacher + scoring-driven consistency).

Re-implemented from the description of the published training code (``shared/research/seeds_methods.md`` 2.4);
no code was copied. Notation: S = student, T = teacher (EMA of S), p = softmax of the logits, w = per-sample weight.

Published total loss per iteration (with ``sw`` = 1e-6 on every score L1 term, scores in voxels)::

    L = weighted_dice_ce(S(labeled), y, w)                              # supervised segmentation
      + sw * score_regression_loss(score_S(labeled), s*, w)             # supervised score head
      + lambda(t) * ( mask_consistency_loss(S(u), T(u + noise), score_S(u), score_T(u + noise))
                    + score_consistency_loss(S(u), score_T(u + noise), S(labeled), s*, w) )

Differences from the published code, all deliberate:

- Scores are voxel counts divided by a constant ``score_scale`` (``true_score``, ``soft_score``) so that they are
  O(1) on small patches; the published code uses raw counts and multiplies the L1 terms by ``sw`` = 1e-6.
  Raw-count behaviour: ``score_scale=1`` and ``score_weight=1e-6``.
- ``weighted_dice_ce`` returns ``(1 - Dice) + CE`` (published: ``-Dice + CE``; same gradients).
- Schedules take the fraction of training done, ``progress`` in [0, 1], instead of epochs / iterations; the
  defaults reproduce the published curves for 500 epochs (``negative_boost``) and 150,000 iterations
  (``consistency_weight``).
- The labels may have several foreground classes (ours: LM, LAD, LCX, RCA); Dice is averaged over them and the
  score counts all of them (foreground = not background).
- Optionally (``candidates``, on in the shipped configs) every term counts only the voxels that can be calcium,
  those >= 130 HU: the output is gated at 130 HU (DESIGN.md), so what the network says elsewhere never reaches a
  score. Without the gate ~99.9 % of the loss is spent on voxels that the threshold already decides, and what
  remains to learn (bone, valves, the aortic wall and the halo around a lesion against the coronary calcium
  itself) gets little of the gradient.
- Optionally (``on_probabilities``, on in the shipped configs) the mask consistency compares softmax
  probabilities, as the original mean teacher does, instead of the published logits (see
  ``mask_consistency_loss``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "consistency_weight",
    "ema_update",
    "mask_consistency_loss",
    "negative_boost",
    "sample_weights",
    "score_consistency_loss",
    "score_regression_loss",
    "soft_score",
    "teacher_noise",
    "true_score",
    "weighted_cross_entropy",
    "weighted_dice_ce",
    "weighted_mean",
    "weighted_soft_dice_loss",
]


# --------------------------------------------------------------------------------------------- weights, schedules


def sample_weights(has_calcium: Tensor, boost: float) -> Tensor:
    """Per-sample loss weights (B,): 1 for patches with calcium, ``boost`` for calcium-free patches.

    "Negative-sample boosting": ``boost`` follows ``negative_boost(progress)``, so calcium-free patches are almost
    ignored early (0.001) and count fully late in training.
    """
    has_calcium = has_calcium.to(torch.bool).reshape(-1)
    return torch.where(has_calcium, 1.0, float(boost)).to(torch.float32)


def negative_boost(progress: float, alpha: float = 0.999, beta: float = 15.0, tau: float = 0.6) -> float:
    """Weight of calcium-free samples, g(p) = 1 - alpha * (1 - sigmoid(beta * (p - tau))).

    ``progress`` p is the fraction of training done (published: epoch / 500; beta = 0.03 * 500 and
    tau = 300 / 500 give the published curve: g(0) = 0.0011, g(0.4) = 0.048, g(0.6) = 0.5005, g(0.8) = 0.953,
    g(1) = 0.9975). Increasing in p.
    """
    z = beta * (float(progress) - tau)
    sig = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return 1.0 - alpha * (1.0 - sig)


def consistency_weight(progress: float, max_weight: float = 0.1, rampup: float = 0.2) -> float:
    """Weight lambda of the consistency terms: max_weight * exp(-5 * (1 - min(p / rampup, 1))^2).

    The published sigmoid ramp-up (0.1 * exp(-5 (1 - t/200)^2) with t = iteration // 150, full weight after
    30,000 of 150,000 iterations, i.e. ``rampup`` = 0.2 of training). Non-decreasing; ``rampup`` <= 0 means no
    ramp-up. At p = 0 the weight is max_weight * exp(-5) = 0.00067.
    """
    if rampup <= 0:
        return float(max_weight)
    ratio = min(max(float(progress), 0.0) / rampup, 1.0)
    return float(max_weight) * math.exp(-5.0 * (1.0 - ratio) ** 2)


# --------------------------------------------------------------------------------------------- segmentation losses


def weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """sum_i w_i * v_i / sum_i w_i over the batch (plain mean without weights; 0 if all weights are 0)."""
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype).reshape(values.shape)
    return (weights * values).sum() / weights.sum().clamp_min(torch.finfo(values.dtype).tiny)


def _onehot_target(logits: Tensor, target: Tensor) -> Tensor:
    """One-hot float target (B, C, ...) from a one-hot/soft target of the logits' shape or a class-index map.

    Index maps may be (B, 1, ...) or (B, ...) of an integer dtype.
    """
    if target.shape == logits.shape and target.is_floating_point():
        return target.to(logits.dtype)
    index = target.long()
    if index.dim() == logits.dim():
        if index.shape[1] != 1:
            raise ValueError(f"index target needs 1 channel, got shape {tuple(target.shape)}")
        index = index[:, 0]
    if index.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)}")
    return F.one_hot(index, logits.shape[1]).movedim(-1, 1).to(logits.dtype)


def _candidate_mask(candidates: Tensor | None, logits: Tensor) -> Tensor | None:
    """Float mask (B, 1, ...) of the voxels that can be calcium, or None (every voxel counts)."""
    if candidates is None:
        return None
    mask = candidates.to(logits.dtype)
    if mask.dim() == logits.dim() - 1:
        mask = mask.unsqueeze(1)
    if mask.shape[0] != logits.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != logits.shape[2:]:
        raise ValueError(f"candidate mask {tuple(candidates.shape)} does not fit logits {tuple(logits.shape)}")
    return mask


def weighted_soft_dice_loss(
    logits: Tensor,
    target: Tensor,
    weights: Tensor | None = None,
    smooth: float = 1e-5,
    candidates: Tensor | None = None,
) -> Tensor:
    """1 - weighted mean over samples of the soft Dice.

    Per sample i and foreground channel c (softmax probabilities p, one-hot y, sums over voxels):
    Dice_ic = (2 sum p y + smooth) / (sum p + sum y + smooth). A sample's Dice is the mean over the vessel
    channels present in its target; a calcium-free sample (the published binary case) uses all foreground
    merged, so any false-positive probability mass lowers it. Averaging absent channels instead would
    give every positive sample a loss near 1 from the vessels it does not contain, whatever it predicts.
    ``candidates`` (B, 1, ...) restricts both sums to the voxels that can be calcium (see the module docstring).
    """
    onehot = _onehot_target(logits, target)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = onehot[:, 1:]
    mask = _candidate_mask(candidates, logits)
    if mask is not None:
        probs, onehot = probs * mask, onehot * mask
    dims = tuple(range(2, logits.dim()))

    def dice(p: Tensor, y: Tensor) -> Tensor:
        return (2.0 * (p * y).sum(dims) + smooth) / (p.sum(dims) + y.sum(dims) + smooth).clamp_min(1e-8)

    per_channel = dice(probs, onehot)  # (B, C-1)
    present = (onehot.sum(dims) > 0).to(per_channel.dtype)
    n_present = present.sum(dim=1)
    positive = (per_channel * present).sum(dim=1) / n_present.clamp_min(1.0)
    merged = dice(probs.sum(dim=1, keepdim=True), onehot.sum(dim=1, keepdim=True))[:, 0]
    return 1.0 - weighted_mean(torch.where(n_present > 0, positive, merged), weights)


def weighted_cross_entropy(
    logits: Tensor,
    target: Tensor,
    weights: Tensor | None = None,
    balanced: bool = False,
    candidates: Tensor | None = None,
) -> Tensor:
    """Weighted mean over samples of each sample's voxel-mean cross-entropy.

    ``balanced``: a sample's CE is the mean over its background voxels plus the mean over its calcium
    voxels (background only when it has none). Calcium fills ~1e-4 of a patch: with a plain mean the
    network learns "all background" first and its softmax saturates there, where neither Dice nor CE
    has gradient left to pull it out.
    ``candidates`` (B, 1, ...): the means run over the voxels that can be calcium only (a sample without any
    contributes 0).
    """
    onehot = _onehot_target(logits, target)
    voxel_ce = -(onehot * torch.log_softmax(logits, dim=1)).sum(dim=1).flatten(1)
    mask = _candidate_mask(candidates, logits)
    counted = torch.ones_like(voxel_ce) if mask is None else mask.flatten(1)
    if not balanced:
        return weighted_mean((voxel_ce * counted).sum(dim=1) / counted.sum(dim=1).clamp_min(1.0), weights)
    fg = (1.0 - onehot[:, 0]).flatten(1) * counted
    n_fg = fg.sum(dim=1)
    bg = counted - fg
    bg_ce = (voxel_ce * bg).sum(dim=1) / bg.sum(dim=1).clamp_min(1.0)
    fg_ce = (voxel_ce * fg).sum(dim=1) / n_fg.clamp_min(1.0)
    return weighted_mean(bg_ce + torch.where(n_fg > 0, fg_ce, torch.zeros_like(fg_ce)), weights)


def weighted_dice_ce(
    logits: Tensor,
    target: Tensor,
    weights: Tensor | None = None,
    smooth: float = 1e-5,
    balanced: bool = False,
    candidates: Tensor | None = None,
) -> Tensor:
    """Supervised segmentation loss: ``weighted_soft_dice_loss`` + ``weighted_cross_entropy``.

    ``logits`` (B, C, Z, Y, X); ``target`` a class-index map (B, 1, Z, Y, X) / (B, Z, Y, X) or a one-hot (B, C, ...);
    ``weights`` (B,) from ``sample_weights`` (None: all 1). A sample with weight 0 does not affect the loss.
    ``balanced`` selects the class-balanced cross-entropy; ``candidates`` (B, 1, ...) the voxels that count.
    """
    dice = weighted_soft_dice_loss(logits, target, weights, smooth, candidates)
    return dice + weighted_cross_entropy(logits, target, weights, balanced, candidates)


# --------------------------------------------------------------------------------------------- scores


def true_score(label_index: Tensor, score_scale: float = 1.0, candidates: Tensor | None = None) -> Tensor:
    """Target score (B,): number of calcium (non-background) voxels in the label patch / ``score_scale``.

    Published: "score_volume", the voxel count (score_scale 1). ``candidates``: count only those voxels.
    """
    calcium = label_index > 0
    if candidates is not None:
        calcium = calcium & candidates.reshape(calcium.shape).to(torch.bool)
    return calcium.flatten(1).sum(dim=1).to(torch.float32) / score_scale


def soft_score(logits: Tensor, score_scale: float = 1.0, candidates: Tensor | None = None) -> Tensor:
    """Differentiable score (B,): sum over voxels of the foreground probability 1 - p_background, / ``score_scale``.

    Computed as the sum of the foreground-class probabilities (equal to 1 - p_bg, without its float32 rounding
    when p_bg ~ 1), so a confident all-background prediction scores ~0. ``candidates``: sum over those voxels only.
    """
    fg = torch.softmax(logits, dim=1)[:, 1:].sum(dim=1, keepdim=True)
    mask = _candidate_mask(candidates, logits)
    if mask is not None:
        fg = fg * mask
    return fg.flatten(1).sum(dim=1) / score_scale


def score_regression_loss(pred_score: Tensor, true_score: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted L1 between predicted and target scores (B,): sum_i w_i |pred_i - true_i| / sum_i w_i."""
    return weighted_mean((pred_score.reshape(-1) - true_score.reshape(-1).to(pred_score.dtype)).abs(), weights)


def score_consistency_loss(
    student_logits_unlabeled: Tensor,
    teacher_score_unlabeled: Tensor,
    student_logits_labeled: Tensor,
    true_score_labeled: Tensor,
    weights_labeled: Tensor | None = None,
    score_scale: float = 1.0,
    score_weight: float = 1.0,
    candidates_unlabeled: Tensor | None = None,
    candidates_labeled: Tensor | None = None,
) -> Tensor:
    """Scoring-driven consistency L_C^s: the student's differentiable score must match the volume-level scores.

    = score_weight * [ L1(soft_score(S(u)), teacher score of u)  +  weighted L1(soft_score(S(l)), true score of l) ].
    The teacher score (its score head on the noisy unlabeled patch) is detached. Published ``score_weight``: 1e-6
    with ``score_scale`` 1. The candidate masks restrict each soft score to the voxels that can be calcium.
    """
    unlabeled = F.l1_loss(
        soft_score(student_logits_unlabeled, score_scale, candidates_unlabeled),
        teacher_score_unlabeled.detach().reshape(-1).to(student_logits_unlabeled.dtype),
    )
    labeled = score_regression_loss(
        soft_score(student_logits_labeled, score_scale, candidates_labeled), true_score_labeled, weights_labeled
    )
    return score_weight * (unlabeled + labeled)


def mask_consistency_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_score: Tensor,
    teacher_score: Tensor,
    score_weight: float = 1.0,
    candidates: Tensor | None = None,
    on_probabilities: bool = False,
) -> Tensor:
    """Mask consistency L_C^m: MSE(student logits, teacher logits) + score_weight * L1(student score, teacher score).

    Both on the unlabeled patch (the teacher sees it with ``teacher_noise``); teacher tensors are detached. The
    scores are the score-head outputs. Published ``score_weight``: 1e-6 on voxel-count scores. ``candidates``
    (B, 1, ...): the MSE is the mean over those voxels (and channels) only; where no supervised term reaches,
    the logits are free and their differences would swamp every other term. ``on_probabilities``: the MSE of the
    softmax probabilities (the original mean teacher's), bounded by 1, instead of the published logits: early in
    training the teacher's BatchNorm running statistics lag the student's batch statistics and the logits differ
    by tens to hundreds, so the logit MSE (measured: 10^2-10^4) outweighs the supervised loss.
    """
    mask = _candidate_mask(candidates, student_logits)
    if on_probabilities:
        student_logits, teacher_logits = torch.softmax(student_logits, 1), torch.softmax(teacher_logits, 1)
    squared = (student_logits - teacher_logits.detach()) ** 2
    if mask is None:
        mse = squared.mean()
    else:
        mse = (squared * mask).sum() / (mask.sum() * student_logits.shape[1]).clamp_min(1.0)
    l1 = F.l1_loss(student_score.reshape(-1), teacher_score.detach().reshape(-1).to(student_score.dtype))
    return mse + score_weight * l1


# --------------------------------------------------------------------------------------------- mean teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, decay: float = 0.99) -> float:
    """Teacher <- a * teacher + (1 - a) * student with a = min(1 - 1 / (step + 1), decay); returns a.

    ``step`` counts updates from 0, so step 0 copies the student (a = 0) and a reaches ``decay`` at step 99.
    Parameters and floating-point buffers (BatchNorm running mean / variance) are averaged alike; integer buffers
    (``num_batches_tracked``) are copied from the student. Keep the teacher in eval mode so its own forward passes
    do not change its running statistics.
    """
    a = min(1.0 - 1.0 / (step + 1), decay)
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    t_buffers = dict(teacher.named_buffers())
    s_buffers = dict(student.named_buffers())
    if t_params.keys() != s_params.keys() or t_buffers.keys() != s_buffers.keys():
        raise ValueError("teacher and student have different parameters or buffers")
    for name, t in [*t_params.items(), *t_buffers.items()]:
        s = s_params[name] if name in s_params else s_buffers[name]
        if t.is_floating_point():
            t.mul_(a).add_(s.detach().to(t.dtype), alpha=1.0 - a)
        else:
            t.copy_(s)
    return a


def teacher_noise(x: Tensor, std: float = 0.1, clip: float = 0.2, generator: torch.Generator | None = None) -> Tensor:
    """Perturbed teacher input: x + clamp(N(0, std^2), -clip, clip) (in the units of the network input)."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * std
    return x + noise.clamp(-clip, clip)
