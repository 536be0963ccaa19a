"""Datalists by fold, inference file lists, and batching of volumes of different depth.

Datalist (MONAI format, ``datalist.json`` in the dataset folder): ``"training": [{"case_id", "fold", "image",
...}]`` with, per task, ``"truth"`` (localization: a JSON with ``landmarks``, as the head phantoms write) or
``"label"`` (classification: class index or name). Relative paths resolve against the dataset folder.
"""

from __future__ import annotations

import glob
import json
import os

import torch

PATH_KEYS = {"image", "label", "truth", "dicom", "segments"}
REQUIRED = {"localization": ("image", "truth"), "classification": ("image", "label")}


def load_split(
    dataset_dir: str, part: str, fold: int, task: str = "localization", datalist: str = "datalist.json"
) -> list[dict]:
    """Cases of one part of the patient-level split: "train" (folds other than ``fold``), "validate" (``fold``)
    or "all" (every labeled case, for a held-out evaluation set)."""
    path = datalist if os.path.isabs(datalist) else os.path.join(dataset_dir, datalist)
    with open(path) as f:
        data = json.load(f)
    entries = data.get("training", [])
    if part in ("train", "validate"):
        entries = [e for e in entries if (e.get("fold") == fold) == (part == "validate")]
    elif part != "all":
        raise ValueError(f"unknown part {part!r}: use train, validate or all")
    out = []
    for e in entries:
        item = dict(e)
        for k in REQUIRED[task]:
            if k not in item:
                raise ValueError(f"{path}: case {e.get('case_id', '?')} has no {k!r} (needed for {task})")
        for k in PATH_KEYS & item.keys():
            if isinstance(item[k], str) and (k != "label" or task != "classification"):
                item[k] = item[k] if os.path.isabs(item[k]) else os.path.join(dataset_dir, item[k])
        item.setdefault("case_id", os.path.basename(os.path.dirname(item["image"])))
        out.append(item)
    if not out:
        raise ValueError(f"{path}: no cases for part {part!r} with fold {fold}")
    return out


def find_images(input_dir: str, pattern: str = "*.nii.gz") -> list[dict]:
    """Inference datalist: files matching ``pattern`` under ``input_dir``; ``case_id`` = relative path without
    the extension (so outputs keep the input's sub-folders). None found is an error."""
    files = sorted(glob.glob(os.path.join(input_dir, "**", pattern), recursive=True))
    if not files:
        raise FileNotFoundError(f"no {pattern} files under {input_dir}")
    out = []
    for f in files:
        rel = os.path.relpath(f, input_dir)
        for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
            if rel.endswith(ext):
                rel = rel[: -len(ext)]
                break
        out.append({"image": f, "case_id": rel})
    return out


def pad_collate(items: list[dict]) -> dict:
    """Batch volumes (C, D, H, W) of different depth: pad D at the end with zeros and add ``mask`` (B, D), True on
    real slices. Other tensors are stacked; everything else (paths, geometry) becomes a list."""
    depths = [int(it["image"].shape[1]) for it in items]
    dmax = max(depths)
    images, masks = [], []
    for it, d in zip(items, depths, strict=True):
        img = torch.as_tensor(it["image"]).float()
        images.append(torch.nn.functional.pad(img, (0, 0, 0, 0, 0, dmax - d)))
        masks.append(torch.arange(dmax) < d)
    batch: dict = {"image": torch.stack(images), "mask": torch.stack(masks)}
    for key in items[0]:
        if key in batch:
            continue
        values = [it.get(key) for it in items]
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


class PrepareBatch:
    """``prepare_batch`` for MONAI engines: (image, targets, (), {"mask": mask}); targets hold the mask too."""

    def __init__(self, task: str = "localization"):
        self.task = task

    def __call__(self, batch: dict, device=None, non_blocking: bool = False, **kwargs):
        image = batch["image"].to(device=device, non_blocking=non_blocking)
        mask = batch["mask"].to(device=device, non_blocking=non_blocking)
        keys = ("label",) if self.task == "classification" else ("landmark_slice", "landmark_present")
        targets = {"mask": mask}
        for k in keys:
            if k in batch:
                targets[k] = batch[k].to(device=device, non_blocking=non_blocking)
        return image, targets, (), {"mask": mask}
