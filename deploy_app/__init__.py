"""CalciMap MONAI Deploy application: DICOM in, DICOM SEG + TID 1500 SR + PDF report out."""

__version__ = "0.1.0"  # keep equal to pyproject.toml's version
