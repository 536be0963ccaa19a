"""The PACS bridge: brings studies from a PACS to the CalciMap app and its results back into the same study.

Two routes, one CLI (``python -m deploy_app.pacs``):

- DICOMweb (``dicomweb.py``): QIDO-RS finds a study's CT series, WADO-RS retrieves them, the app runs, STOW-RS
  stores SEG, SR and the Encapsulated PDF back; ``watch`` processes each new study once.
- DIMSE (``dimse.py``): a C-STORE SCP (C-ECHO answered) collects pushed studies, calls a study complete after a
  quiet time, runs the app from one worker queue and C-STOREs the results to a destination AE.

The app itself stays a pure folder-in/folder-out job (``python -m deploy_app``); the bridge runs it as a child
process with a per-study timeout. Output UIDs are deterministic, so storing again overwrites instead of
duplicating, and "already done" is a lookup of the report's UID in the study.
"""
