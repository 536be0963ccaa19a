"""Datalists: which cases train, validate or go unlabeled for one cross-validation fold."""

from __future__ import annotations

import glob
import json
import os

PATH_KEYS = {"image", "label", "truth", "dicom", "segments"}  # datalist keys that hold paths


def load_split(dataset_dir: str, part: str, fold: int, datalist: str = "datalist.json") -> list[dict]:
    """Entries of ``datalist`` (MONAI datalist with a ``fold`` per case) with absolute paths.

    ``part``: "train" (labeled cases outside ``fold``), "validate" (labeled cases in ``fold``),
    "unlabeled" (unlabeled cases outside ``fold``; never the validation fold), or "all" (every
    labeled case, for evaluation on a held-out set). Relative paths resolve against ``dataset_dir``.
    """
    path = datalist if os.path.isabs(datalist) else os.path.join(dataset_dir, datalist)
    with open(path) as f:
        data = json.load(f)
    if part == "unlabeled":
        entries = [e for e in data.get("unlabeled", []) if e.get("fold") != fold]
    elif part in ("train", "validate", "all"):
        labeled = data.get("training", [])
        if part == "all":
            entries = labeled
        else:
            entries = [e for e in labeled if (e.get("fold") == fold) == (part == "validate")]
    else:
        raise ValueError(f"unknown part {part!r}: use train, validate, unlabeled or all")
    required = ("image", "label") if part != "unlabeled" else ("image",)
    out = []
    for e in entries:
        item = dict(e)
        for k in required:
            if k not in item:
                raise ValueError(f"{path}: case {e.get('case_id', '?')} has no {k!r}")
        for k in PATH_KEYS & item.keys():
            item[k] = item[k] if os.path.isabs(item[k]) else os.path.join(dataset_dir, item[k])
        out.append(item)
    if not out and part in ("train", "all"):
        raise ValueError(f"{path}: no labeled cases for part {part!r} with fold {fold}")
    return out


def find_images(input_dir: str, pattern: str = "*.nii.gz") -> list[dict]:
    """Inference datalist: files matching ``pattern`` anywhere under ``input_dir``; none is an error."""
    files = sorted(glob.glob(os.path.join(input_dir, "**", pattern), recursive=True))
    if not files:
        raise FileNotFoundError(f"no {pattern} files under {input_dir}")
    return [{"image": f} for f in files]
