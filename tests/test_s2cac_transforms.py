"""Post-processing transforms of the S2CAC bundle."""

import torch

from bundles.s2cac_coronary_calcium.scripts.transforms import CalciumGated


def test_calcium_gate_keeps_prediction_only_at_or_above_the_threshold():
    image = torch.tensor([[[[0.2, 0.5, 0.9]]]])  # (1, 1, 1, 3): below, at, above 130 HU in network scale
    labels = torch.tensor([[[[2, 2, 3]]]])
    onehot = torch.nn.functional.one_hot(labels[0], 5).movedim(-1, 0).float()
    out = CalciumGated(keys=["pred", "onehot"], threshold=0.5)({"image": image, "pred": labels, "onehot": onehot})
    assert out["pred"].tolist() == [[[[0, 2, 3]]]]
    assert out["onehot"][:, 0, 0, 0].sum() == 0 and out["onehot"][2, 0, 0, 1] == 1 and out["onehot"][3, 0, 0, 2] == 1
