"""Losses of the DST: landmark cross-entropy over slice index, presence BCE, class cross-entropy, and their total.

Landmark targets are slice positions in the (oriented) volume, fractional where the truth is: the hard target
puts all mass on the nearest slice; with ``sigma`` > 0 (in slices) the target is a Gaussian around the true
position, renormalised over the volume's real slices. Only landmarks inside the scan contribute; a landmark
outside it (the cervical boundary often is) is learnt by the presence term alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def landmark_target(target_slice: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Target distributions over depth (B, N, D) for slice positions (B, N) and the real-slice mask (B, D)."""
    depth = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32)
    real = mask[:, None, :].float()
    if sigma <= 0:
        nearest = target_slice.round().clamp(min=0)[..., None]
        q = (depth[None, None, :] == nearest).float() * real
    else:
        q = torch.exp(-0.5 * ((depth[None, None, :] - target_slice[..., None].float()) / sigma) ** 2) * real
    return q / q.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def landmark_loss(
    logits: torch.Tensor, mask: torch.Tensor, target_slice: torch.Tensor, present: torch.Tensor, sigma: float = 0.0
) -> torch.Tensor:
    """Mean over present landmarks of the cross-entropy between the target and softmax(logits) over depth.

    ``logits`` (B, N, D) may be -inf on padded slices; ``present`` (B, N) selects the landmarks that count.
    Zero (with a gradient path) when no landmark of the batch is present.
    """
    logp = F.log_softmax(logits.float().masked_fill(~mask[:, None, :], float("-inf")), dim=-1)
    logp = logp.masked_fill(~mask[:, None, :], 0.0)  # 0 * -inf would be nan
    ce = -(landmark_target(target_slice, mask, sigma) * logp).sum(dim=-1)  # (B, N)
    weight = present.float()
    return (ce * weight).sum() / weight.sum().clamp(min=1.0)


def presence_loss(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the presence logits (B, N) against 0/1 presence, mean over all landmarks."""
    return F.binary_cross_entropy_with_logits(logits.float(), present.float())


def classification_loss(logits: torch.Tensor, label: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), label.long().view(-1), label_smoothing=label_smoothing)


def total_loss(
    pred: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    sigma: float = 0.0,
    presence_weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Localization: landmark CE + ``presence_weight`` x presence BCE. Classification: class CE."""
    if "class_logits" in pred:
        return classification_loss(pred["class_logits"], target["label"], label_smoothing)
    present = target["landmark_present"]
    loc = landmark_loss(pred["landmark_logits"], target["mask"], target["landmark_slice"], present, sigma)
    return loc + presence_weight * presence_loss(pred["presence_logits"], present)


class DSTLoss(nn.Module):
    """:func:`total_loss` as the trainer's ``loss_function(pred, target)``, with the weights from the config."""

    def __init__(self, sigma: float = 0.0, presence_weight: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.sigma = sigma
        self.presence_weight = presence_weight
        self.label_smoothing = label_smoothing

    def forward(self, pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
        return total_loss(pred, target, self.sigma, self.presence_weight, self.label_smoothing)
