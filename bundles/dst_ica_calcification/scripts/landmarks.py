"""The six landmarks: the three ICA segment boundaries on each side, in the order of the network's outputs."""

from __future__ import annotations

SIDES = ("right", "left")
BOUNDARIES = ("cervical_petrous", "petrous_cavernous", "cavernous_supraclinoid")
LANDMARKS: tuple[dict, ...] = tuple(
    {"name": f"{side}_{b}", "side": side, "boundary": i + 1} for side in SIDES for i, b in enumerate(BOUNDARIES)
)
LANDMARK_NAMES: tuple[str, ...] = tuple(lm["name"] for lm in LANDMARKS)
