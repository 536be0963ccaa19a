"""Model loading is safe (issue 7): only checksummed TorchScript, embedded configs never evaluated.

``monai.bundle ckpt_export`` stores the bundle's configs inside the TorchScript file (``extra/*.json``). MONAI
config strings that start with ``$`` are Python expressions, evaluated by ``ConfigParser``; a model file from
elsewhere could carry code there. The app reads its configs from the bundle folders it ships and never asks
``torch.jit.load`` for the extra files, so a planted expression must not run, even in a model whose sha256 the
manifest accepts (the worst case: a manifest entry made for a tampered file). The control at the end shows the
planted expression is live: parsed the way MONAI parses a config, it does run.

The other two rules: every ``torch.load`` in the app passes ``weights_only=True`` (there is none today) and every
``torch.jit.load`` runs only on a file ``locate_models`` has checked; a file whose sha256 differs from the
manifest is refused before anything reads it.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from deploy_app import models as model_files
from deploy_app import pipeline
from deploy_app.models import MODEL_FILE, ModelError, locate_models, sha256

MODEL = "s2cac_coronary"
SHIPPED = ROOT / "models" / MODEL / MODEL_FILE


def _plant(marker: Path, folder: Path) -> Path:
    """A copy of the shipped model whose embedded configs carry ``$`` expressions that would create ``marker``."""
    if not SHIPPED.is_file():
        pytest.fail(f"{SHIPPED} is missing: run `make models`")
    extra = {"inference.json": "", "metadata.json": ""}
    network = torch.jit.load(str(SHIPPED), map_location="cpu", _extra_files=extra)
    assert all(extra.values()), "ckpt_export embeds inference.json and metadata.json"
    expression = f"$__import__('pathlib').Path({str(marker)!r}).write_text('ran')"
    planted = {}
    for name, text in extra.items():
        config = json.loads(text)
        config["imports"] = [*config.get("imports", []), expression]
        config["planted"] = expression
        planted[name] = json.dumps(config)
    out = folder / MODEL / MODEL_FILE
    out.parent.mkdir(parents=True)
    torch.jit.save(network, str(out), _extra_files=planted)
    return out


@pytest.mark.slow
def test_expression_planted_in_an_embedded_config_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    planted = _plant(marker, tmp_path / "models")
    # a manifest that accepts the tampered file
    manifest = {MODEL: {"sha256": sha256(planted), "bundle_version": model_files.MODELS[MODEL].version}}
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps(manifest))
    monkeypatch.setattr(model_files, "MANIFEST_PATH", manifest_path)
    files = locate_models(tmp_path / "models", model_files.load_manifest(manifest_path))
    assert files == {MODEL: planted}

    models = pipeline.Models(files, torch.device("cpu"), roi=False)
    k, j, i = np.indices((24, 48, 48))
    hu = np.where((i - 24) ** 2 + (j - 24) ** 2 < 200, 40.0, -1000.0).astype(np.float32)
    hu[12, 24, 20:23] = 600.0  # a bright speck
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    labels = models.get(MODEL)(hu, affine)
    assert labels.shape == hu.shape and labels.dtype == np.uint8
    assert not marker.exists(), "an expression in a model's embedded config ran"

    # control: the planted expression is live when the embedded config is parsed the way MONAI parses configs
    from monai.bundle import ConfigParser

    extra = {"inference.json": ""}
    torch.jit.load(str(planted), map_location="cpu", _extra_files=extra)
    parser = ConfigParser(json.loads(extra["inference.json"]))
    parser.get_parsed_content("planted")
    assert marker.read_text() == "ran"


def test_a_model_that_differs_from_the_manifest_is_refused_before_it_is_read(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    (folder / MODEL).mkdir(parents=True)
    data = bytearray(SHIPPED.read_bytes())
    data[-100] ^= 0xFF
    (folder / MODEL / MODEL_FILE).write_bytes(bytes(data))
    reads = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: reads.append(a))
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a))
    manifest = {MODEL: model_files.load_manifest()[MODEL]}
    with pytest.raises(ModelError, match="refusing to load a model the app was not shipped with"):
        locate_models(folder, manifest)
    assert reads == []


def test_a_manifest_from_another_bundle_version_is_refused(tmp_path):
    """A bundle whose version moved on without `make models`: the SEG and SR would name the bundle's version,
    results.json the manifest's, and neither need be the model that ran."""
    manifest = model_files.load_manifest()
    manifest[MODEL]["bundle_version"] = "0.0.1"
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    version = model_files.MODELS[MODEL].version
    with pytest.raises(
        ModelError, match=rf"{MODEL} from s2cac_coronary_calcium 0\.0\.1, but .* says {version}: run `make models`"
    ):
        model_files.load_manifest(path)


def test_an_unreadable_bundle_version_or_manifest_entry_is_a_model_error(tmp_path, monkeypatch):
    manifest = model_files.load_manifest()
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({**manifest, MODEL: "0.3.1"}))
    with pytest.raises(ModelError, match=f"{MODEL} from .* 0.3.1, but"):
        model_files.load_manifest(path)
    spec = dataclasses.replace(model_files.MODELS[MODEL], metadata="missing.json")
    monkeypatch.setitem(model_files.MODELS, MODEL, spec)
    with pytest.raises(ModelError, match=f"cannot read the version of {MODEL} in .*missing.json"):
        model_files.load_manifest()


def test_a_model_file_that_cannot_be_read_is_a_model_error(tmp_path):
    """An I/O error while hashing (a failing mount; root ignores permissions, so /proc/self/mem stands in: a
    regular file whose first read fails) is the one-line model error, not a traceback."""
    folder = tmp_path / "models"
    (folder / MODEL).mkdir(parents=True)
    (folder / MODEL / MODEL_FILE).symlink_to("/proc/self/mem")
    manifest = {MODEL: model_files.load_manifest()[MODEL]}
    with pytest.raises(ModelError, match=r"cannot read model .*model\.ts: Input/output error"):
        locate_models(folder, manifest)


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    def name(node: ast.AST) -> str:
        if isinstance(node, ast.Attribute):
            return f"{name(node.value)}.{node.attr}"
        return node.id if isinstance(node, ast.Name) else ""

    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and name(n.func) == dotted]


def test_the_app_loads_weights_only_as_checked_torchscript_or_weights_only():
    """Static: in the app's code, ``torch.load`` always with ``weights_only=True``; ``torch.jit.load`` only in
    the model wrappers, which ``pipeline.Models`` builds from the files ``locate_models`` checked; no pickle."""
    jit_sites = []
    for path in sorted((ROOT / "deploy_app").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch.load"):
            weights_only = [k for k in call.keywords if k.arg == "weights_only"]
            assert weights_only and getattr(weights_only[0].value, "value", None) is True, f"{path}:{call.lineno}"
        assert not _calls(tree, "pickle.load") and not _calls(tree, "pickle.loads"), path
        for call in _calls(tree, "torch.jit.load"):
            assert not any(k.arg == "_extra_files" for k in call.keywords), f"{path}:{call.lineno} reads extra files"
            jit_sites.append(path.name)
    assert jit_sites == ["inference.py"]  # inference.load_network, which both model wrappers call
    # the wrappers are built only by pipeline.Models.get, from the paths it was given (cli: locate_models' result)
    cli = ast.parse((ROOT / "deploy_app" / "cli.py").read_text())
    models_calls = _calls(cli, "Models")
    assert len(models_calls) == 1 and ast.unparse(models_calls[0].args[0]) == "files"
    assert "files = model_files.locate_models(" in (ROOT / "deploy_app" / "cli.py").read_text()
