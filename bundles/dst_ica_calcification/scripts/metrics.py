"""Validation metrics for the evaluator (model selection and early stopping on the validation fold).

They gather per-landmark (or per-case) results from all processes before computing, so that every DDP rank
sees the same score and early stopping stops all ranks together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from ignite.metrics import Metric
from monai.utils import evenly_divisible_all_gather

from .evaluation import localization_point_stats

LOCALIZATION_STATS = ("mae_slices", "top1", "within1", "presence_accuracy")


def _pred_and_target(output: dict) -> tuple[dict, dict]:
    return output["pred"], output["label"]


def _gather(t: torch.Tensor) -> torch.Tensor:
    """All processes' rows (CPU tensor); nccl only moves CUDA tensors."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        return evenly_divisible_all_gather(t.to(device), concat=True).cpu()
    return t.cpu()


class LandmarkMetric(Metric):
    """One localization statistic over the validation fold: ``mae_slices`` (lower is better), ``top1``,
    ``within1`` or ``presence_accuracy``; errors count over landmarks present in the truth."""

    def __init__(self, stat: str = "mae_slices", output_transform=_pred_and_target, device="cpu"):
        if stat not in LOCALIZATION_STATS:
            raise ValueError(f"stat must be one of {LOCALIZATION_STATS}, not {stat!r}")
        self.stat = stat
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._rows: list[torch.Tensor] = []

    def update(self, output: tuple[dict, dict]) -> None:
        pred, target = output
        logits = pred["landmark_logits"].detach()
        best = logits.argmax(dim=-1).float()  # padded slices are -inf, never chosen
        true = torch.floor(target["landmark_slice"] + 0.5)
        present = target["landmark_present"] > 0.5
        pred_present = pred["presence_logits"].detach() > 0
        err = (best - true).abs()
        self._rows.append(torch.stack([err, present.float(), (pred_present == present).float()], -1).reshape(-1, 3))

    def compute(self) -> float:
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, 3)
        rows = _gather(rows)
        if self.stat == "presence_accuracy":
            return float(rows[:, 2].mean()) if len(rows) else float("nan")
        err = rows[rows[:, 1] > 0, 0]
        if len(err) == 0:
            return float("inf") if self.stat == "mae_slices" else 0.0
        return localization_point_stats(err.tolist(), err.tolist())[self.stat]


class ClassAccuracy(Metric):
    """Share of validation cases whose argmax class is the label."""

    def __init__(self, output_transform=_pred_and_target, device="cpu"):
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._hits: list[torch.Tensor] = []

    def update(self, output: tuple[dict, dict]) -> None:
        pred, target = output
        self._hits.append((pred["class_logits"].detach().argmax(dim=-1) == target["label"].view(-1)).float())

    def compute(self) -> float:
        hits = torch.cat(self._hits) if self._hits else torch.zeros(0)
        hits = _gather(hits)
        return float(hits.mean()) if len(hits) else 0.0


def validation_metrics(task: str) -> dict[str, Metric]:
    """Key metric first: ``val_mae_slices`` (localization, lower is better) or ``val_accuracy``."""
    if task == "classification":
        return {"val_accuracy": ClassAccuracy()}
    return {"val_mae_slices": LandmarkMetric("mae_slices")}


def additional_metrics(task: str) -> dict[str, Metric]:
    if task == "classification":
        return {}
    return {f"val_{s}": LandmarkMetric(s) for s in ("top1", "within1", "presence_accuracy")}


def key_metric_name(task: str) -> str:
    return next(iter(validation_metrics(task)))


def higher_is_better(task: str) -> bool:
    return task == "classification"


def stopping_score(task: str):
    """Score for EarlyStopHandler (higher is better): accuracy, or minus the MAE in slices."""
    name, sign = key_metric_name(task), 1.0 if higher_is_better(task) else -1.0
    return lambda engine: sign * engine.state.metrics[name]


def metric_comparison(task: str):
    """``metric_cmp_fn`` for the evaluator: is the current key metric better than the best so far?"""
    if higher_is_better(task):
        return lambda current, best: current > best
    return lambda current, best: current < best
