"""The models at work on a volume, with the bundles' own pre- and post-processing.

Parity with the bundles comes by construction: the transforms are built from the bundle's inference config files
in the folder the app ships (``bundles/<bundle>/configs``), minus their file loading and saving, and the network
is the TorchScript file whose checksum :mod:`deploy_app.models` checked. Configs embedded in a model file are
never read.

Both bundles keep their Python in a package named ``scripts`` (Model-Zoo layout), which their configs import as
``scripts.…`` with the bundle root on ``sys.path``; one process holds both, so each bundle's configs are
instantiated with only its own ``scripts`` importable (:func:`bundle_objects`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploy_app.models import ModelSpec
from deploy_app.volume import LPS_TO_RAS

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


# Tiles per forward pass of the calcium model's sliding window on a CPU. The bundle's 4 suits a GPU; on this
# project's 2-core CPU one tile at a time through the frozen network was fastest (docs/benchmarks.md).
CPU_SW_BATCH_SIZE = 1
# Sliding-window overlap of the calcium model on a CPU. The bundle's published 0.5 covers every voxel ~8 times;
# 0.25 reads a third of the tiles of the full chest study (16 instead of 45) with the same held-out accuracy
# (docs/benchmarks.md). A GPU keeps the bundle's value; ``--sw-overlap`` chooses either anywhere.
CPU_SW_OVERLAP = 0.25


def load_network(model_file: Path, device: torch.device, optimize: bool = False) -> torch.jit.ScriptModule:
    """The TorchScript network in eval mode; with ``optimize`` on a CPU also frozen and optimised for inference.

    ``torch.jit.freeze`` + ``optimize_for_inference`` fold batch norm into the convolutions and run them in oneDNN
    layouts: on a 2-core CPU the calcium model took 23 s instead of 38 s on the full head study with the same
    labels (docs/benchmarks.md). The DST network (under 1 s a study) is left as it is: optimised, its presence
    probabilities moved in the 4th decimal. A GPU gets the plain module until this has been measured there.
    """
    network = torch.jit.load(str(model_file), map_location=device).eval()
    if optimize and device.type == "cpu":
        network = torch.jit.optimize_for_inference(torch.jit.freeze(network))
    return network


@contextlib.contextmanager
def _only_bundle_scripts(bundle_root: Path) -> Iterator[None]:
    """Make ``scripts`` mean ``bundle_root/scripts`` for the duration, then restore whatever it meant before."""

    def take() -> dict[str, Any]:
        return {k: sys.modules.pop(k) for k in list(sys.modules) if k == "scripts" or k.startswith("scripts.")}

    saved = take()
    sys.path.insert(0, str(bundle_root))
    try:
        yield
    finally:
        sys.path.remove(str(bundle_root))
        take()
        sys.modules.update(saved)


def bundle_objects(config_files: Sequence[Path], bundle_root: Path, ids: Sequence[str], **overrides: Any) -> list:
    """Instantiate the config items ``ids`` of a bundle's layered config files (with ``overrides``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(p) for p in config_files])
    parser.update({"bundle_root": str(bundle_root), **overrides})
    with _only_bundle_scripts(bundle_root):
        return [parser.get_parsed_content(i) for i in ids]


def _without(compose, *names: str):
    """The Compose minus transforms whose class name contains one of ``names`` (file loading and saving)."""
    from monai.transforms import Compose

    kept = [t for t in compose.transforms if not any(n in type(t).__name__ for n in names)]
    return Compose(kept)


def as_meta_tensor(hu_kji: np.ndarray, affine_lps: np.ndarray, name: str = "volume"):
    """A volume [k, j, i] as MONAI gets it from LoadImage of the same data written as NIfTI: (i, j, k), RAS."""
    from monai.data import MetaTensor

    meta = {"original_channel_dim": "no_channel", "space": "RAS", "filename_or_obj": name}
    array = torch.from_numpy(np.ascontiguousarray(hu_kji.transpose(2, 1, 0), dtype=np.float32))
    affine = torch.as_tensor(LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64))
    return MetaTensor(array, affine=affine, meta=meta)


class CalciumSegmenter:
    """S2CAC: HU volume -> calcium label map on the volume's own grid (the bundle's inference.yaml chain).

    ``overlap``: the sliding window's overlap; None takes :data:`CPU_SW_OVERLAP` on a CPU, the bundle's on a GPU.
    """

    def __init__(
        self, spec: ModelSpec, model_file: Path, device: torch.device | None = None, overlap: float | None = None
    ):
        self.spec = spec
        self.device = device or default_device()
        self.network = load_network(model_file, self.device, optimize=True)
        overrides: dict[str, Any] = {"sw_batch_size": CPU_SW_BATCH_SIZE} if self.device.type == "cpu" else {}
        if overlap is None and self.device.type == "cpu":
            overlap = CPU_SW_OVERLAP
        if overlap is not None:
            overrides["inferer#overlap"] = overlap
        pre, self.inferer, post = bundle_objects(
            spec.config_paths(),
            spec.bundle_root,
            ["preprocessing", "inferer", "postprocessing"],
            device=self.device,
            **overrides,
        )
        self.pre = _without(pre, "LoadImage")
        self.post = _without(post, "SaveImage")
        # Invertd inverts through the preprocessing it was configured with: give it the one we run.
        for t in self.post.transforms:
            if type(t).__name__ == "Invertd":
                t.transform = self.pre

    @property
    def sliding_window(self) -> dict[str, Any]:
        """The tile (z, y, x voxels of the working grid) and overlap it reads a volume with, for the provenance."""
        return {"roi_size": [int(v) for v in self.inferer.roi_size], "overlap": float(self.inferer.overlap)}

    @torch.no_grad()
    def __call__(self, hu_kji: np.ndarray, affine_lps: np.ndarray) -> np.ndarray:
        data = self.pre({"image": as_meta_tensor(hu_kji, affine_lps)})
        data["pred"] = self.inferer(data["image"][None].to(self.device), self.network)[0]
        out = self.post(data)
        labels = np.asarray(out["pred"].detach().cpu())[0]  # (i, j, k)
        return np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8)


class LandmarkLocator:
    """DST: HU volume -> the six ICA boundary landmarks (the bundle's inference.yaml chain and prediction JSON)."""

    def __init__(self, spec: ModelSpec, model_file: Path, device: torch.device | None = None):
        self.spec = spec
        self.device = device or default_device()
        self.network = load_network(model_file, self.device)
        pre, self.presence_threshold = bundle_objects(
            spec.config_paths(), spec.bundle_root, ["preprocessing", "presence_threshold"]
        )
        self.pre = _without(pre, "LoadImage")
        with _only_bundle_scripts(spec.bundle_root):
            from scripts.predictions import localization_prediction  # the bundle's own JSON

        self._prediction = localization_prediction

    @torch.no_grad()
    def __call__(self, hu_kji: np.ndarray, affine_lps: np.ndarray) -> dict:
        data = self.pre({"image": as_meta_tensor(hu_kji, affine_lps)})
        image = torch.as_tensor(data["image"]).float()[None].to(self.device)
        out = self.network(image)
        geometry = data["geometry"]
        return self._prediction(out["landmark_logits"][0], out["presence_logits"][0], geometry, self.presence_threshold)
