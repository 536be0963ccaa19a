"""Post-processing that encodes the scoring definition: calcium is a voxel >= 130 HU."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.transforms import MapTransform


class CalciumGated(MapTransform):
    """Keep predicted calcium only where the (preprocessed) image reaches the calcium threshold.

    ``threshold`` is 130 HU in the network's intensity scale. The prediction may be a label map
    (1, ...) or one-hot (C, ...): below the threshold every channel is set to 0 (label map:
    background; one-hot: no class, so Dice metrics see neither a hit nor a miss there only if
    the reference is also below threshold). Agatston, volume and mass only count such voxels, so
    this changes no score; it removes the sub-threshold halo that the label maps would show.
    """

    def __init__(self, keys, image_key: str = "image", threshold: float = 0.5, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        bright = torch.as_tensor(d[self.image_key] >= self.threshold)
        for key in self.key_iterator(d):
            d[key] = d[key] * bright.to(device=d[key].device, dtype=d[key].dtype)
        return d
