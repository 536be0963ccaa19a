"""CalciMap MONAI Deploy application: DICOM in, DICOM SEG + TID 1500 SR + PDF report out."""
