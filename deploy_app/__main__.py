"""Entry point for ``python -m deploy_app`` and for ``python deploy_app`` (how a MAP starts the app folder).

Run as a plain script, this file's folder is ``sys.path[0]`` instead of the repository root: the package and the
bundles it imports are not found, and its modules (``models``, ``study``, ...) would shadow top-level modules of
the same name. Replace that entry with the folder above the app (the repository root, or the MAP's app root).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    here = Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

from deploy_app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
