"""Per-case prediction JSONs from the network's outputs, and the ignite handler that writes them.

Localization JSON: ``case_id``, ``image``, ``num_slices``, ``slice_axis``, ``slice_spacing_mm`` and
``landmarks``: per landmark ``name``, ``side``, ``boundary``, ``slice_index`` (argmax, index along the input
file's slice axis), ``expected_slice`` (mean of the distribution, same axis), ``z_mm`` (patient LPS z of that
slice at the in-plane centre), ``probability`` (of the argmax slice), ``presence_probability`` and ``present``.
Classification JSON: ``case_id``, ``image``, ``class``, ``class_index``, ``probabilities`` (in class order).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events

from .landmarks import LANDMARKS
from .transforms import file_slice

logger = logging.getLogger(__name__)


def localization_prediction(
    logits: torch.Tensor, presence_logits: torch.Tensor, geometry: dict, presence_threshold: float = 0.5
) -> dict:
    """JSON-able prediction of one case from its landmark logits (N, D) over its real slices and presence (N,)."""
    prob = torch.softmax(logits.float(), dim=-1)
    depth = torch.arange(prob.shape[-1], dtype=torch.float32, device=prob.device)
    best = prob.argmax(dim=-1)
    expected = (prob * depth).sum(dim=-1)
    presence = torch.sigmoid(presence_logits.float())
    landmarks = []
    for i, lm in enumerate(LANDMARKS[: prob.shape[0]]):
        k = int(best[i])
        landmarks.append(
            {
                **lm,
                "slice_index": int(round(file_slice(geometry, k))),
                "expected_slice": round(float(file_slice(geometry, float(expected[i]))), 3),
                "z_mm": round(float(geometry["z_mm"][k]), 3),
                "probability": round(float(prob[i, k]), 4),
                "presence_probability": round(float(presence[i]), 4),
                "present": bool(presence[i] >= presence_threshold),
            }
        )
    return {
        "image": geometry.get("image", ""),
        "num_slices": geometry["file_num_slices"],
        "slice_axis": geometry["slice_axis"],
        "slice_spacing_mm": round(float(geometry["slice_spacing_mm"]), 4),
        "landmarks": landmarks,
    }


def classification_prediction(logits: torch.Tensor, class_names: Sequence[str], geometry: dict) -> dict:
    prob = torch.softmax(logits.float(), dim=-1)
    k = int(prob.argmax())
    return {
        "image": geometry.get("image", ""),
        "class": class_names[k],
        "class_index": k,
        "probabilities": [round(float(p), 5) for p in prob],
    }


class PredictionWriter:
    """Ignite handler: after each evaluator iteration, writes ``output_dir/<case_id>.json`` for every case."""

    def __init__(
        self, output_dir: str, class_names: Sequence[str] = (), presence_threshold: float = 0.5, pred_key: str = "pred"
    ):
        self.output_dir = output_dir
        self.class_names = list(class_names)
        self.presence_threshold = presence_threshold
        self.pred_key = pred_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        batch, pred = engine.state.batch, engine.state.output[self.pred_key]
        mask = batch["mask"]
        for b, geometry in enumerate(batch["geometry"]):
            depth = int(mask[b].sum())
            if "class_logits" in pred:
                out = classification_prediction(pred["class_logits"][b], self.class_names, geometry)
            else:
                logits = pred["landmark_logits"][b, :, :depth]
                out = localization_prediction(logits, pred["presence_logits"][b], geometry, self.presence_threshold)
            case_id = batch["case_id"][b]
            path = os.path.join(self.output_dir, f"{case_id}.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump({"case_id": case_id, **out}, f, indent=1)
            logger.debug("wrote %s", path)
