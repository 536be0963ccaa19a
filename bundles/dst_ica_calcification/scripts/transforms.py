"""Dictionary transforms that turn a CT volume into the DST's slice sequence and attach the targets.

Order (see configs/train.yaml): LoadImaged -> EnsureChannelFirstd -> :class:`SliceSequenced` (axis order
(slice, row, column), slices running inferior to superior, no resampling) -> :class:`ResizeInPlaned` ->
ScaleIntensityRanged -> :class:`Targetsd` -> optional depth crops. Every transform that changes which slices
are kept updates ``geometry`` and the landmark targets together, so predicted slice indices map back to the
input file's own slice index.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, RandomizableTransform

from .landmarks import LANDMARK_NAMES

GEOMETRY = "geometry"  # key of the per-case geometry dict
LANDMARK_SLICE, LANDMARK_PRESENT, LABEL = "landmark_slice", "landmark_present", "label"


def slice_sequence_geometry(affine: np.ndarray, shape: Sequence[int]) -> dict:
    """How to reorder a volume with this (RAS) ``affine`` and spatial ``shape`` into (slice, row, column).

    The slice axis is the array axis closest to superior-inferior, ordered to run superior; rows run anterior to
    posterior and columns patient right to left (radiological view). Returns the permutation, flips and the
    slice geometry: LPS z (mm) of each oriented slice at the in-plane centre and the slice spacing.
    """
    affine = np.asarray(affine, dtype=float)
    dirs = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0, keepdims=True)
    slice_axis = int(np.argmax(np.abs(dirs[2])))
    rest = [a for a in range(3) if a != slice_axis]
    row_axis = max(rest, key=lambda a: abs(dirs[1, a]))  # closest to anterior-posterior
    col_axis = next(a for a in rest if a != row_axis)
    flips = {
        slice_axis: bool(dirs[2, slice_axis] < 0),  # RAS z up = superior
        row_axis: bool(dirs[1, row_axis] > 0),  # RAS y up = anterior; rows should run posterior
        col_axis: bool(dirs[0, col_axis] > 0),  # RAS x up = patient right; columns should run to patient left
    }
    n = int(shape[slice_axis])
    centre = np.array([(s - 1) / 2.0 for s in shape], dtype=float)
    z_mm = []
    for k in range(n):
        idx = centre.copy()
        idx[slice_axis] = (n - 1 - k) if flips[slice_axis] else k
        z_mm.append(float((affine[:3, :3] @ idx + affine[:3, 3])[2]))
    spacing = float(np.linalg.norm(affine[:3, slice_axis]))
    return {
        "pixel_mm": [float(np.linalg.norm(affine[:3, row_axis])), float(np.linalg.norm(affine[:3, col_axis]))],
        "permutation": [slice_axis, row_axis, col_axis],
        "flips": [flips[slice_axis], flips[row_axis], flips[col_axis]],
        "slice_axis": slice_axis,
        "slice_flipped": flips[slice_axis],
        "num_slices": n,
        "file_num_slices": n,
        "offset": 0,
        "slice_spacing_mm": spacing,
        "z_mm": z_mm,
    }


def file_slice(geometry: dict, index: float) -> float:
    """Slice index of the input file for an index into the transformed (possibly cropped) sequence."""
    full = index + geometry["offset"]
    return geometry["file_num_slices"] - 1 - full if geometry["slice_flipped"] else full


def oriented_slice(geometry: dict, file_index: float) -> float:
    """Index into the transformed sequence of a slice index of the input file (inverse of :func:`file_slice`)."""
    full = geometry["file_num_slices"] - 1 - file_index if geometry["slice_flipped"] else file_index
    return full - geometry["offset"]


class SliceSequenced(MapTransform):
    """(C, i, j, k) volume with an affine -> plain tensor (C, D, H, W), D = slices; adds ``geometry``.

    Only permutes and flips axes: nothing is resampled, so slice d is one slice of the file.
    """

    def __init__(self, keys: str = "image", geometry_key: str = GEOMETRY):
        super().__init__(keys)
        self.geometry_key = geometry_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        key = self.keys[0]
        img = d[key]
        meta = getattr(img, "meta", {})
        affine = np.asarray(meta.get("affine", np.eye(4)), dtype=float)
        geo = slice_sequence_geometry(affine, img.shape[1:])
        geo["image"] = str(meta.get("filename_or_obj", ""))
        t = (img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(np.asarray(img))).float()
        t = t.permute(0, *[a + 1 for a in geo["permutation"]])
        dims = [i + 1 for i, f in enumerate(geo["flips"]) if f]
        d[key] = torch.flip(t, dims) if dims else t.contiguous()
        d[self.geometry_key] = geo
        return d


class ResizeInPlaned(MapTransform):
    """Resize every slice to ``size`` (H, W) with area averaging; the slice axis is untouched.

    ``field_of_view_mm`` (needs ``geometry`` from :class:`SliceSequenced`): first crop or pad (with the image's
    minimum, i.e. air) each slice about its centre to that width in mm, so that a pixel of the output is always
    ``field_of_view_mm / size`` mm whatever the scan's field of view. Without it the whole slice is resized and
    the anatomy's size on the output follows the field of view (a 140 mm skull-base field shows it 1.6 times larger
    than a 220 mm whole-head field).
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        size: Sequence[int],
        field_of_view_mm: float | None = None,
        geometry_key: str = GEOMETRY,
    ):
        super().__init__(keys)
        self.size = tuple(int(s) for s in size)
        self.field_of_view_mm = field_of_view_mm
        self.geometry_key = geometry_key

    def _to_field_of_view(self, x: torch.Tensor, pixel_mm: Sequence[float]) -> torch.Tensor:
        pads = []
        for axis, mm in ((-1, pixel_mm[1]), (-2, pixel_mm[0])):  # F.pad lists the last axis first
            n, want = x.shape[axis], max(int(round(self.field_of_view_mm / mm)), 1)
            if want < n:
                start = (n - want) // 2
                x = x.narrow(axis, start, want)
                pads += [0, 0]
            else:
                pads += [(want - n) // 2, want - n - (want - n) // 2]
        if any(pads):
            x = F.pad(x, pads, value=float(x.min()))
        return x

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key]).float()
            if self.field_of_view_mm:
                x = self._to_field_of_view(x, d[self.geometry_key]["pixel_mm"])
            if tuple(x.shape[-2:]) != self.size:
                mode = "area" if x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1] else "bilinear"
                kwargs = {} if mode == "area" else {"align_corners": False}
                x = F.interpolate(x, size=self.size, mode=mode, **kwargs)  # (C, D, H, W): D acts as channels
            d[key] = x
        return d


class Targetsd(MapTransform):
    """Targets of the task. Localization: ``landmark_slice`` (N,) float and ``landmark_present`` (N,) from the
    case's truth JSON (``landmarks``: name, slice_index = index along the file's slice axis, in_scan), in the
    transformed sequence's frame. Classification: ``label`` as an int tensor (an index or a class name).

    A datalist entry without truth (inference) gets no targets. Also adds ``thickness_mm`` (truth scanner
    thickness, else the slice spacing) for stratified evaluation.
    """

    def __init__(
        self,
        task: str,
        truth_key: str = "truth",
        class_names: Sequence[str] = (),
        landmark_names: Sequence[str] = LANDMARK_NAMES,
        geometry_key: str = GEOMETRY,
    ):
        super().__init__(truth_key, allow_missing_keys=True)
        self.task = task
        self.truth_key = truth_key
        self.class_names = list(class_names)
        self.landmark_names = list(landmark_names)
        self.geometry_key = geometry_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        geo = d[self.geometry_key]
        d["thickness_mm"] = float(geo["slice_spacing_mm"])
        if self.task == "classification":
            if LABEL in d:
                label = d[LABEL]
                if isinstance(label, str) and not label.isdigit():
                    if label not in self.class_names:
                        raise ValueError(f"class {label!r} is not one of {self.class_names}")
                    label = self.class_names.index(label)
                d[LABEL] = torch.tensor(int(label), dtype=torch.long)
            return d
        if self.truth_key not in d:
            return d
        with open(d[self.truth_key]) as f:
            truth = json.load(f)
        thickness = truth.get("scanner", {}).get("thickness_mm")
        if thickness:
            d["thickness_mm"] = float(thickness)
        by_name = {lm["name"]: lm for lm in truth.get("landmarks", [])}
        slices, present = [], []
        for name in self.landmark_names:
            lm = by_name.get(name)
            if lm is None or lm.get("slice_index") is None:
                slices.append(0.0)
                present.append(False)
                continue
            s = oriented_slice(geo, float(lm["slice_index"]))
            slices.append(s)
            present.append(bool(lm.get("in_scan", True)) and -0.5 <= s <= geo["num_slices"] - 0.5)
        d[LANDMARK_SLICE] = torch.tensor(slices, dtype=torch.float32)
        d[LANDMARK_PRESENT] = torch.tensor(present, dtype=torch.float32)
        return d


def crop_depth(d: dict, start: int, stop: int, image_key: str = "image", geometry_key: str = GEOMETRY) -> dict:
    """Keep slices [start, stop) of the sequence; shift the landmark targets and re-check their presence."""
    d = dict(d)
    d[image_key] = d[image_key][:, start:stop]
    geo = dict(d[geometry_key])
    geo["z_mm"] = list(geo["z_mm"][start:stop])
    geo["offset"] = geo["offset"] + start
    geo["num_slices"] = stop - start
    d[geometry_key] = geo
    if LANDMARK_SLICE in d:
        s = d[LANDMARK_SLICE] - start
        inside = (s >= -0.5) & (s <= stop - start - 0.5)
        d[LANDMARK_SLICE] = s
        d[LANDMARK_PRESENT] = d[LANDMARK_PRESENT] * inside.float()
    return d


class CropDepthd(MapTransform):
    """Keep at most ``max_depth`` slices (0: all), centred; bounds memory for long volumes (classification)."""

    def __init__(self, keys: str = "image", max_depth: int = 0):
        super().__init__(keys)
        self.max_depth = int(max_depth)

    def __call__(self, data: dict) -> dict:
        depth = data[self.keys[0]].shape[1]
        if self.max_depth <= 0 or depth <= self.max_depth:
            return dict(data)
        start = (depth - self.max_depth) // 2
        return crop_depth(data, start, start + self.max_depth, self.keys[0])


class RandDepthCropd(RandomizableTransform, MapTransform):
    """With probability ``prob`` keep a random run of slices: between ``min_fraction`` of the volume and all of it,
    at most ``max_depth`` (0: no limit). Landmarks that fall outside become absent: this teaches presence.
    """

    def __init__(self, keys: str = "image", prob: float = 0.5, min_fraction: float = 0.6, max_depth: int = 0):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.min_fraction = min_fraction
        self.max_depth = int(max_depth)
        self._start = self._stop = 0

    def randomize(self, depth: int) -> None:
        super().randomize(None)
        cap = depth if self.max_depth <= 0 else min(depth, self.max_depth)
        if not self._do_transform:
            length = cap
        else:
            length = int(self.R.randint(min(cap, max(1, int(np.ceil(self.min_fraction * depth)))), cap + 1))
        self._start = int(self.R.randint(0, depth - length + 1))
        self._stop = self._start + length

    def __call__(self, data: dict) -> dict:
        depth = data[self.keys[0]].shape[1]
        self.randomize(depth)
        if self._start == 0 and self._stop == depth:
            return dict(data)
        return crop_depth(data, self._start, self._stop, self.keys[0])
