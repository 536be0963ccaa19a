"""S2CAC coronary artery calcium segmentation bundle."""
