#!/usr/bin/env python
"""`make models`: export the bundles' weights as TorchScript for the deploy app and write its sha256 manifest.

For each model of ``deploy_app.models.MODELS`` whose bundle checkpoint exists, runs ``monai.bundle ckpt_export``
(the bundle's own network definition, metadata and inference config) into ``OUT/<name>/model.ts``, and writes
``deploy_app/model_manifest.json`` with each file's sha256 and the bundle version. A model whose checkpoint is
missing is left out with a warning (the app then refuses to run that path); ``--require-all`` makes it an error.
A model whose checkpoint and exported file still match the manifest is kept as it is: TorchScript archives carry
a random serialization id, so re-exporting unchanged weights would change the file and its checksum for nothing.
The exported files and the manifest are committed, so the app runs on a fresh clone without this step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy_app.models import DEFAULT_MODEL_DIR, MANIFEST_PATH, MODEL_FILE, MODELS, sha256  # noqa: E402

logger = logging.getLogger("export_models")


def export(spec, out: Path) -> Path:
    target = out / spec.name / MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{MODEL_FILE}.partial")
    configs = [str(p) for p in spec.config_paths()]
    cmd = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(tmp),
        "--ckpt_file", str(spec.bundle_root / "models" / spec.weights),
        "--meta_file", str(spec.bundle_root / "configs" / spec.metadata),
        "--config_file", configs[0] if len(configs) == 1 else repr(configs),
        "--device", "$torch.device('cpu')",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(spec.bundle_root)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"ckpt_export of {spec.name} failed: {tail[0]}")
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="named-model folder (default: models/)")
    p.add_argument("--manifest", type=Path, default=MANIFEST_PATH, help="manifest to write")
    p.add_argument("--require-all", action="store_true", help="fail when a bundle checkpoint is missing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    old = json.loads(args.manifest.read_text()) if args.manifest.is_file() else {}
    manifest = {}
    for spec in MODELS.values():
        ckpt = spec.bundle_root / "models" / spec.weights
        if not ckpt.is_file():
            if args.require_all:
                print(f"export_models: error: {ckpt} does not exist", file=sys.stderr)
                return 2
            logger.warning("skipping %s: %s does not exist (its app path cannot run)", spec.name, ckpt)
            continue
        current = args.out / spec.name / MODEL_FILE
        kept = old.get(spec.name, {})
        version = spec.version
        if current.is_file() and kept.get("weights_sha256") == sha256(ckpt) and kept.get("sha256") == sha256(current):
            logger.info("%s is up to date", current)
            manifest[spec.name] = {**kept, "bundle_version": version}
            continue
        try:
            path = export(spec, args.out)
        except RuntimeError as e:
            print(f"export_models: error: {e}", file=sys.stderr)
            return 1
        manifest[spec.name] = {
            "sha256": sha256(path),
            "bundle": spec.bundle,
            "bundle_version": version,
            "weights": f"bundles/{spec.bundle}/models/{spec.weights}",
            "weights_sha256": sha256(ckpt),
        }
        logger.info("%s -> %s (%.1f MB)", ckpt.relative_to(ROOT), path, path.stat().st_size / 1e6)
    args.manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    logger.info("wrote %s (%d models)", args.manifest, len(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
