"""DST bundle: depth-sequence landmark localization for segment-level ICA calcium mapping, and 3D classification."""
