"""The app's three models: where they come from, where the app finds them, and the sha256 check before loading.

Models are TorchScript files made by ``monai.bundle ckpt_export`` from this repository's bundles (``make models``
runs ``scripts/export_models.py``). The app finds them the MONAI Deploy way: ``-m`` / ``HOLOSCAN_MODEL_PATH``
names a folder of named models, ``<folder>/<name>/model.ts``; without it, the repository's ``models/`` folder.
Every file's sha256 must equal the one in ``model_manifest.json`` (shipped with the app, written by the export);
a file that differs is refused before anything reads it. The bundle configs that ``ckpt_export`` embeds in a
model file are never read, let alone evaluated: the app's pre- and post-processing comes from the bundle folders
it ships (see :mod:`deploy_app.inference`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from deploy_app.dicom_output import REPO_ROOT

MANIFEST_PATH = Path(__file__).resolve().parent / "model_manifest.json"
DEFAULT_MODEL_DIR = REPO_ROOT / "models"
MODEL_FILE = "model.ts"


class ModelError(ValueError):
    """A model folder or file the app cannot use; the message says which and why."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # folder name under the model path
    bundle: str  # folder under bundles/
    weights: str  # the bundle's checkpoint, under models/
    metadata: str  # the bundle's metadata file for this network, under configs/
    configs: tuple[str, ...]  # inference config files layered in this order, under configs/
    path: str  # "coronary" or "ica": which app path uses it

    @property
    def bundle_root(self) -> Path:
        return REPO_ROOT / "bundles" / self.bundle

    def config_paths(self) -> list[Path]:
        return [self.bundle_root / "configs" / c for c in self.configs]

    @property
    def version(self) -> str:
        """The ``version`` of the bundle's metadata file for this network: what the SEG and SR name as the
        algorithm's version, and what ``make models`` records in the manifest."""
        return str(json.loads((self.bundle_root / "configs" / self.metadata).read_text())["version"])


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "s2cac_coronary", "s2cac_coronary_calcium", "model.pt", "metadata.json", ("inference.yaml",), "coronary"
        ),
        ModelSpec(
            "s2cac_ica",
            "s2cac_coronary_calcium",
            "model_ica.pt",
            "metadata_ica.json",
            ("inference.yaml", "inference_ica.yaml"),
            "ica",
        ),
        ModelSpec("dst_landmarks", "dst_ica_calcification", "model.pt", "metadata.json", ("inference.yaml",), "ica"),
    )
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, dict]:
    """{model name: {"sha256", "bundle", "bundle_version", ...}} for the models the app was shipped with."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read the model manifest {path}: {e}") from None
    unknown = set(manifest) - set(MODELS)
    if unknown:
        raise ModelError(f"model manifest {path} names unknown models {sorted(unknown)}")
    for name, entry in manifest.items():  # else the reports would name a version the model file is not
        spec = MODELS[name]
        try:
            version = spec.version
        except (OSError, ValueError, KeyError, TypeError) as e:
            where = f"bundles/{spec.bundle}/configs/{spec.metadata}"
            raise ModelError(f"cannot read the version of {name} in {where}: {e}") from None
        if not isinstance(entry, dict) or entry.get("bundle_version") != version:
            found = entry.get("bundle_version") if isinstance(entry, dict) else entry
            raise ModelError(
                f"model manifest {path} has {name} from {spec.bundle} {found}, but "
                f"bundles/{spec.bundle}/configs/{spec.metadata} says {version}: run `make models`"
            )
    return manifest


def model_dir(cli_value: str | os.PathLike | None = None) -> Path:
    """The named-model folder: ``-m``, else ``HOLOSCAN_MODEL_PATH``, else the repository's ``models/``."""
    value = cli_value or os.environ.get("HOLOSCAN_MODEL_PATH")
    return Path(value) if value else DEFAULT_MODEL_DIR


def locate_models(folder: Path, manifest: Mapping[str, Mapping]) -> dict[str, Path]:
    """Check every model of the manifest is in ``folder/<name>/model.ts`` with the manifest's sha256.

    Returns {name: path}. Raises ModelError naming the first problem (missing folder, missing model, a checksum
    that differs: a corrupt copy or a model that is not the one the app was validated with).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist (run `make models`, or pass -m MODELS)")
    if not manifest:
        raise ModelError("the model manifest lists no models (run `make models`)")
    found = {}
    for name, entry in manifest.items():
        path = folder / name / MODEL_FILE
        if not path.is_file():
            raise ModelError(f"model {name!r} not found: expected {path} (run `make models`, or pass -m MODELS)")
        try:
            digest = sha256(path)
        except OSError as e:  # unreadable: permissions, a failing mount
            raise ModelError(f"cannot read model {path}: {e.strerror or e}") from None
        if digest != entry["sha256"]:
            raise ModelError(
                f"model {path} has sha256 {digest[:12]}..., the app's manifest expects {entry['sha256'][:12]}...: "
                "refusing to load a model the app was not shipped with"
            )
        found[name] = path
    return found
