"""Pieces the configs plug into MONAI's SupervisedTrainer: gradient clipping, the LR schedule, what gets logged."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents


class GradientClipper:
    """Clips the gradient norm after backward and before the optimizer step (unscaling first under AMP)."""

    def __init__(self, max_norm: float = 5.0):
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.max_norm <= 0:
            return
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, max_epochs: int, warmup_epochs: int = 5, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: linear warm-up from 1 % over ``warmup_epochs``, then cosine down to
    ``min_lr_ratio`` x the initial rate at ``max_epochs`` (published: warm-up, then cosine to lr / 10)."""
    warmup = max(0, min(int(warmup_epochs), int(max_epochs) - 1))
    base = optimizer.param_groups[0]["lr"]
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, int(max_epochs) - warmup), eta_min=base * min_lr_ratio
    )
    if warmup == 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def loss_logs(output: dict | list) -> dict[str, float]:
    """What StatsHandler / TensorBoard / MLflow log per iteration."""
    if isinstance(output, list):
        output = output[0]
    return {"loss": float(output["loss"])}
