"""Shared fixtures. `scripts/` is on sys.path (pyproject's pytest pythonpath), so `phantoms` imports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REAL_CT = SHARED / "data" / "real_ct" / "totalsegmentator_example_ct_dicom"


DEBIAN_PACKAGE = {"dciodvfy": "dicom3tools", "dcentvfy": "dicom3tools", "java": "default-jre-headless"}


def need_tool(name: str) -> str:
    """Path of a command-line tool; in CI a missing tool fails the test, locally it skips with a reason."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed; .ci/run installs it")
        hint = f"apt-get install {DEBIAN_PACKAGE[name]}" if name in DEBIAN_PACKAGE else "see .ci/run"
        pytest.skip(f"{name} is not installed ({hint})")
    return path


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    if not REAL_CT.is_dir():
        pytest.fail(f"the real CT series is expected at {REAL_CT} (the shared/ folder beside the checkout)")
    return REAL_CT


@pytest.fixture(scope="session")
def chest_case():
    """A small chest case with calcium in several vessels (seed 0, index 1)."""
    from phantoms.chest import make_chest_case

    return make_chest_case(0, 1, "small")
