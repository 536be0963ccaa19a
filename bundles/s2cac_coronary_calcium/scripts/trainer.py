"""Mean-teacher training with scoring-driven consistency and negative-sample boosting (S2CAC).

One iteration takes a labeled batch from the trainer's loader and an unlabeled batch from its own
cycling loader. The student learns from the labels (weighted Dice + CE, and the score head
against the calcium voxel count) and from the teacher on unlabeled patches (mask consistency and
score consistency), the latter weighted by a ramp-up; calcium-free labeled patches are weighted
by the negative-sample boost, which rises late in training. Both schedules run on the fraction
of training done, so a short run is as semi-supervised as the published 500 epochs. With
``candidate_threshold`` every loss term counts only voxels at or above it (130 HU
in the network's scale), the only voxels the gated output can call calcium.
The teacher is the EMA of the student; it is what validation scores and what is saved.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from .losses import (
    consistency_weight,
    ema_update,
    mask_consistency_loss,
    negative_boost,
    sample_weights,
    score_consistency_loss,
    score_regression_loss,
    teacher_noise,
    true_score,
    weighted_dice_ce,
)

logger = logging.getLogger(__name__)


class MeanTeacherTrainer(SupervisedTrainer):
    """SupervisedTrainer whose iteration is the S2CAC semi-supervised step.

    ``network`` is a :class:`WithScore` (optionally inside DistributedDataParallel) around the student.
    Extra arguments: ``teacher`` (a copy of the student network, updated by EMA), ``unlabeled_loader``
    (None trains supervised-only, for the semi-supervised-gain comparison), ``score_scale``
    (calcium voxels per score unit), the loss weights and the two schedules' parameters, and
    ``candidate_threshold`` (None: every voxel counts; else the input value of 130 HU) and
    ``consistency_on_probabilities`` (the mask consistency on softmax probabilities, not logits).
    """

    def __init__(
        self,
        *args,
        teacher: torch.nn.Module,
        unlabeled_loader: Iterable | None,
        score_scale: float = 100.0,
        score_weight: float = 0.1,
        consistency_max: float = 0.1,
        consistency_rampup: float = 0.2,
        boost_alpha: float = 0.999,
        boost_beta: float = 15.0,
        boost_tau: float = 0.6,
        ema_decay: float = 0.99,
        noise_std: float = 0.03,
        grad_clip: float = 12.0,
        balanced_ce: bool = True,
        candidate_threshold: float | None = None,
        consistency_on_probabilities: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.unlabeled_loader = unlabeled_loader
        self._unlabeled = None
        self.score_scale = score_scale
        self.score_weight = score_weight
        self.consistency_max = consistency_max
        self.consistency_rampup = consistency_rampup
        self.boost = (boost_alpha, boost_beta, boost_tau)
        self.ema_decay = ema_decay
        self.noise_std = noise_std
        self.grad_clip = grad_clip
        self.balanced_ce = balanced_ce
        self.candidate_threshold = candidate_threshold
        self.consistency_on_probabilities = consistency_on_probabilities
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def _next_unlabeled(self, device: torch.device) -> torch.Tensor | None:
        if self.unlabeled_loader is None:
            return None
        if self._unlabeled is None:
            if len(self.unlabeled_loader) == 0:
                raise ValueError("no unlabeled cases: set unlabeled_batch 0 to train supervised-only")
            self._unlabeled = iter(itertools.cycle(self.unlabeled_loader))
        batch = next(self._unlabeled)
        return batch[CommonKeys.IMAGE].to(device)

    def _autocast(self, device: torch.device):
        """bfloat16 forward passes when ``amp`` is set (no loss scaling needed); losses stay float32."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(self.amp))

    def candidates(self, image: torch.Tensor | None) -> torch.Tensor | None:
        """Voxels that can be calcium (input >= ``candidate_threshold``), or None when every voxel counts."""
        if image is None or self.candidate_threshold is None:
            return None
        return image >= self.candidate_threshold

    def progress(self, engine) -> float:
        total = max(engine.state.epoch_length * engine.state.max_epochs, 1)
        return min((engine.state.iteration - 1) / total, 1.0)

    def _iteration(self, engine, batchdata: dict) -> dict:
        device = engine.state.device
        image = batchdata[CommonKeys.IMAGE].to(device)
        label = batchdata[CommonKeys.LABEL].to(device).long()
        unlabeled = self._next_unlabeled(device)
        p = self.progress(engine)
        boost = negative_boost(p, *self.boost)
        lam = consistency_weight(p, self.consistency_max, self.consistency_rampup) if unlabeled is not None else 0.0
        cand, cand_u = self.candidates(image), self.candidates(unlabeled)
        target = true_score(label, self.score_scale, cand)
        weights = sample_weights(target > 0, boost)

        self.network.train()
        self.teacher.eval()  # the EMA of the student, incl. its BN statistics; no dropout
        self.optimizer.zero_grad(set_to_none=True)
        # One forward over labeled and unlabeled patches together: DDP allows one forward per backward.
        n = image.shape[0]
        with self._autocast(device):
            logits_all, score_all = self.network(image if unlabeled is None else torch.cat([image, unlabeled]))
        logits_all, score_all = logits_all.float(), score_all.float()
        logits, score = logits_all[:n], score_all[:n]
        loss_seg = weighted_dice_ce(logits, label, weights, balanced=self.balanced_ce, candidates=cand)
        loss_score = self.score_weight * score_regression_loss(score, target, weights)
        loss = loss_seg + loss_score
        out = {"loss_seg": loss_seg.item(), "loss_score": loss_score.item()}
        if unlabeled is not None:
            logits_u, score_u = logits_all[n:], score_all[n:]
            with torch.no_grad(), self._autocast(device):
                noisy = teacher_noise(unlabeled, self.noise_std, 2 * self.noise_std)
                t_logits_u, t_score_u = self.teacher.forward_with_score(noisy)
            t_logits_u, t_score_u = t_logits_u.float(), t_score_u.float()
            loss_mask_c = mask_consistency_loss(
                logits_u, t_logits_u, score_u, t_score_u, self.score_weight, cand_u, self.consistency_on_probabilities
            )
            loss_score_c = score_consistency_loss(
                logits_u, t_score_u, logits, target, weights, self.score_scale, self.score_weight, cand_u, cand
            )
            loss = loss + lam * (loss_mask_c + loss_score_c)
            out.update(loss_mask_consistency=loss_mask_c.item(), loss_score_consistency=loss_score_c.item())
        engine.state.output = {CommonKeys.IMAGE: image, CommonKeys.LABEL: label, CommonKeys.PRED: logits}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        self.optimizer.step()
        ema_update(self.teacher, _unwrap(self.network).net, engine.state.iteration - 1, self.ema_decay)
        engine.state.output = {
            CommonKeys.IMAGE: image,
            CommonKeys.LABEL: label,
            CommonKeys.PRED: logits.detach(),
            CommonKeys.LOSS: loss.item(),
            "consistency_weight": lam,
            "negative_boost": boost,
            **out,
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # runs the postprocessing on the final output
        return engine.state.output


class WithScore(torch.nn.Module):
    """Training view of an S2CAC network: forward returns (logits, score), so DDP can wrap it."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_with_score(x)


class TimeBudget:
    """Fit the number of epochs to a wall-clock budget (seconds), e.g. a GPU lease of fixed length.

    After each of the first epochs, the epoch count is set to what the budget allows at the mean
    epoch time so far (validations included); once 10 % of the run is done it is frozen, so the
    schedules, which run on the fraction of training done, keep a fixed length from then on. The
    polynomial learning-rate schedule is stretched to the same length, never beyond the configured
    ``max_epochs``. The count is a multiple of ``multiple_of`` (the validation interval), so that the
    last epoch is validated and can be checkpointed. Under DDP rank 0's count is broadcast, so every
    process stops at the same epoch. ``budget_s`` None does nothing.
    """

    def __init__(self, budget_s: float | None, lr_scheduler=None, multiple_of: int = 1, freeze_at: float = 0.1):
        self.budget_s = budget_s
        self.multiple_of = max(int(multiple_of), 1)
        self.lr_scheduler = lr_scheduler
        self.freeze_at = freeze_at
        self.frozen = False
        self.start = 0.0
        self.max_epochs = 0

    def attach(self, engine: Engine) -> None:
        if self.budget_s:
            engine.add_event_handler(Events.STARTED, self._started)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._fit)

    def _started(self, engine: Engine) -> None:
        self.start = time.monotonic()
        self.max_epochs = engine.state.max_epochs

    def _fit(self, engine: Engine) -> None:
        if self.frozen:
            return
        epoch = engine.state.epoch
        per_epoch = (time.monotonic() - self.start) / epoch
        m = self.multiple_of
        fit = max(-(-(epoch + 1) // m), int(self.budget_s / per_epoch) // m) * m
        fit = torch.tensor([min(self.max_epochs, fit)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            fit = fit.to(engine.state.device)
            torch.distributed.broadcast(fit, src=0)
        engine.state.max_epochs = int(fit.item())
        if self.lr_scheduler is not None and hasattr(self.lr_scheduler, "total_iters"):
            self.lr_scheduler.total_iters = engine.state.max_epochs
        self.frozen = epoch >= self.freeze_at * engine.state.max_epochs
        logger.info(
            "time budget %.0f s: %.1f s per epoch, %d epochs%s",
            self.budget_s,
            per_epoch,
            engine.state.max_epochs,
            " (fixed)" if self.frozen else "",
        )


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel, or the network itself."""
    return getattr(network, "module", network)


def scalar_logs(output: dict) -> dict[str, float]:
    """What StatsHandler / TensorBoard / MLflow log each iteration: the loss terms and both schedules."""
    if isinstance(output, list):  # after postprocessing the output is decollated; scalars repeat per item
        output = output[0]
    keys = ("loss", "loss_seg", "loss_score", "loss_mask_consistency", "loss_score_consistency")
    logs = {k: float(output[k]) for k in keys if k in output}
    logs.update(consistency_weight=float(output["consistency_weight"]), negative_boost=float(output["negative_boost"]))
    return logs
