"""scripts/package_map.sh: the MAP that holoscan-cli 4.2.0 renders for deploy_app, checked without Docker.

The packager renders app.json, pkg.json and the Dockerfile (and copies the build context) before it needs Docker,
so the script is run for real with the offline manifest, three tiny stand-in models and a `docker` on PATH that
always fails (a stub put first on PATH, so the test does the same on machines where Docker works). Then the
rendered files and the build context are checked, and the app is started from the MAP's layout the way the image
starts it (`python3 /opt/holoscan/app`, PYTHONPATH as the Dockerfile sets it).
"""

from __future__ import annotations

import ast
import filecmp
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SHARED

SCRIPT = ROOT / "scripts" / "package_map.sh"
MANIFEST = SHARED / "data" / "holoscan" / "artifacts-4.2.0.json"
APP_YAML = ROOT / "app.yaml"
APP_REQUIREMENTS = ROOT / "deploy_app" / "requirements.txt"
MODEL_NAMES = ("s2cac_coronary", "s2cac_ica", "dst_landmarks")
# What holoscan-cli 4.2.0 puts where (common/constants.py DefaultValues).
IMAGE_APP, IMAGE_LIB, IMAGE_MODELS = "/opt/holoscan/app", "/opt/holoscan/lib", "/opt/holoscan/models"
DEV_TOOLS = {"pytest", "hypothesis", "ruff", "dcmqi", "mlflow", "tensorboard", "fire", "jsonschema"}


def _make_models(root: Path) -> Path:
    """One folder per model with a small, distinct model.ts: the packager only copies them."""
    for name in MODEL_NAMES:
        (root / name).mkdir(parents=True)
        (root / name / "model.ts").write_bytes(f"stand-in for {name}\n".encode())
    return root


def _env_without_docker(stub_dir: Path) -> dict[str, str]:
    stub_dir.mkdir(parents=True, exist_ok=True)
    stub = stub_dir / "docker"
    stub.write_text('#!/bin/sh\necho "docker (test stub): Cannot connect to the Docker daemon" >&2\nexit 1\n')
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{stub_dir}{os.pathsep}{os.environ['PATH']}"}


def _run_script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]*)==([A-Za-z0-9_.+-]+)", line)
            assert match, f"{path.name}: '{line}' is not pinned as name==version"
            pins[_normalise(match[1])] = match[2]
    return pins


def _read(path: Path) -> str:
    """A rendered file, or "" when the packager did not write it (each test then fails on its own check)."""
    return path.read_text() if path.is_file() else ""


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> dict:
    if not MANIFEST.is_file():
        pytest.fail(
            f"the holoscan-cli 4.2.0 manifest is expected at {MANIFEST} (the shared/ folder beside the checkout)"
        )
    tmp = tmp_path_factory.mktemp("map")
    output = tmp / "out"
    env = _env_without_docker(tmp / "stub_bin")
    models = _make_models(tmp / "models")
    result = _run_script("--models", str(models), "--source", str(MANIFEST), "--output", str(output), env=env)
    build = output / "build"
    if not (build / "map" / "app.json").is_file():
        pytest.fail(f"package_map.sh rendered nothing (exit {result.returncode}): {result.stderr.strip()}")
    return {
        "result": result,
        "build": build,
        "models": models,
        "app_json": json.loads((build / "map" / "app.json").read_text())
        if (build / "map" / "app.json").is_file()
        else None,
        "pkg_json": json.loads((build / "map" / "pkg.json").read_text())
        if (build / "map" / "pkg.json").is_file()
        else None,
        "dockerfile": (build / "Dockerfile").read_text() if (build / "Dockerfile").is_file() else "",
        "config": yaml.safe_load(APP_YAML.read_text()),
    }


def _dockerfile_env(dockerfile: str) -> dict[str, str]:
    return dict(re.findall(r"^ENV (\w+)=(\S*)$", dockerfile, flags=re.MULTILINE))


def test_without_docker_the_script_says_so_in_one_line_after_rendering(packaged):
    result = packaged["result"]
    assert result.returncode == 8, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "package_map: error: Docker (with buildx) is needed to build the image (the Docker daemon is not reachable); "
        f"the rendered app.json, pkg.json and Dockerfile are in {packaged['build']}"
    ]


def test_app_json_starts_the_app_folder_with_python3_in_the_map_layout(packaged):
    app = packaged["app_json"]
    assert app["command"] == '["python3", "/opt/holoscan/app"]'
    assert app["workingDirectory"] == "/var/holoscan"
    assert app["environment"] == {
        "HOLOSCAN_APPLICATION": IMAGE_APP,
        "HOLOSCAN_INPUT_PATH": "input/",
        "HOLOSCAN_OUTPUT_PATH": "output/",
        "HOLOSCAN_WORKDIR": "/var/holoscan",
        "HOLOSCAN_MODEL_PATH": IMAGE_MODELS,
        "HOLOSCAN_CONFIG_PATH": "/var/holoscan/app.yaml",
        "HOLOSCAN_APP_MANIFEST_PATH": "/etc/holoscan/app.json",
        "HOLOSCAN_PKG_MANIFEST_PATH": "/etc/holoscan/pkg.json",
        "HOLOSCAN_DOCS_PATH": "/opt/holoscan/docs",
        "HOLOSCAN_LOGS_PATH": "/var/holoscan/logs",
    }
    assert (app["sdk"], app["sdkVersion"]) == ("monai-deploy", "4.0.0")
    assert app["version"] == str(packaged["config"]["application"]["version"])
    assert app["input"]["formats"] == app["output"]["formats"] == ["file"]


def test_pkg_json_carries_app_yaml_resources_and_the_three_models(packaged):
    pkg = packaged["pkg_json"]
    assert pkg["resources"] == packaged["config"]["resources"]
    assert pkg["resources"]["gpu"] == 0
    assert pkg["applicationRoot"] == IMAGE_APP
    assert pkg["models"] == {name: f"{IMAGE_MODELS}/{name}" for name in MODEL_NAMES}


def test_dockerfile_copies_app_models_bundles_and_installs_the_app_requirements(packaged):
    dockerfile = packaged["dockerfile"]
    for source, target in [
        ("app", IMAGE_APP),
        ("models", IMAGE_MODELS),
        ("lib", IMAGE_LIB),
        ("pip/requirements.txt", "/tmp/requirements.txt"),
        ("app.config", "/var/holoscan/app.yaml"),
    ]:
        assert re.search(rf"^COPY\s+\./{re.escape(source)}\s+{re.escape(target)}$", dockerfile, re.MULTILINE), source
    assert "RUN pip install --no-cache-dir --user -r /tmp/requirements.txt" in dockerfile
    assert "RUN pip install monai-deploy-app-sdk==4.0.0" in dockerfile
    assert "FROM nvcr.io/nvidia/cuda:13.0.0-runtime-ubuntu24.04 AS base" in dockerfile
    env = _dockerfile_env(dockerfile)
    assert {key: env[key] for key in ("HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_MODEL_PATH")} == {
        "HOLOSCAN_INPUT_PATH": "/var/holoscan/input",
        "HOLOSCAN_OUTPUT_PATH": "/var/holoscan/output",
        "HOLOSCAN_MODEL_PATH": IMAGE_MODELS,
    }
    assert env["PYTHONPATH"].split(":")[-1] == IMAGE_LIB


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_build_context_holds_the_app_the_models_the_bundle_code_and_no_weights(packaged):
    build = packaged["build"]
    assert (build / "pip" / "requirements.txt").read_text().strip() == APP_REQUIREMENTS.read_text().strip()
    assert (build / "app.config").read_bytes() == APP_YAML.read_bytes()
    for name in MODEL_NAMES:
        assert (build / "models" / name / "model.ts").read_bytes() == (
            packaged["models"] / name / "model.ts"
        ).read_bytes()
    # The app folder as /opt/holoscan/app, and again as the importable package /opt/holoscan/lib/deploy_app.
    sources = _files(ROOT / "deploy_app")
    assert Path("__main__.py") in sources and Path("requirements.txt") in sources
    for copy in (build / "app", build / "lib" / "deploy_app"):
        assert _files(copy) == sources
        assert all(filecmp.cmp(ROOT / "deploy_app" / rel, copy / rel, shallow=False) for rel in sources)
    settings = filecmp.dircmp(ROOT / "configs", build / "lib" / "configs")
    assert not (settings.left_only or settings.right_only or settings.diff_files)
    bundles = sorted(p.name for p in (ROOT / "bundles").iterdir() if (p / "scripts").is_dir())
    assert bundles == ["dst_ica_calcification", "s2cac_coronary_calcium"]
    for name in bundles:
        shipped = build / "lib" / "bundles" / name
        for part in ("scripts", "configs"):
            mismatch = filecmp.dircmp(ROOT / "bundles" / name / part, shipped / part, ignore=["__pycache__"])
            assert not (mismatch.left_only or mismatch.right_only or mismatch.diff_files), (name, part)
        assert (shipped / "LICENSE").is_file()
        assert not (shipped / "models").exists() and not (shipped / "runs").exists()
    assert not list((build / "lib").rglob("*.pt")) and not list((build / "lib").rglob("__pycache__"))


def _map_layout_env(packaged) -> dict[str, str]:
    """PYTHONPATH exactly as the Dockerfile sets it (unset before: leading empty entry), /opt/holoscan -> build."""
    pythonpath = _dockerfile_env(packaged["dockerfile"])["PYTHONPATH"].replace("$PYTHONPATH", "")
    pythonpath = pythonpath.replace(IMAGE_LIB, str(packaged["build"] / "lib"))
    return {**os.environ, "PYTHONPATH": pythonpath}


def test_in_the_map_layout_deploy_app_and_both_bundles_import_from_the_added_lib(packaged, tmp_path):
    """deploy_app finds bundles/ and configs/ beside itself (its parents[1]): in the image that must be the lib."""
    build = packaged["build"]
    probe = (
        "import sys, pathlib; sys.path[0] = sys.argv[1]\n"
        "import deploy_app, bundles.s2cac_coronary_calcium.scripts.scoring as a, "
        "bundles.dst_ica_calcification.scripts.segments as b\n"
        "print(deploy_app.__file__); print(a.__file__); print(b.__file__)\n"
        "root = pathlib.Path(deploy_app.__file__).resolve().parents[1]\n"
        "print(sorted(p.name for p in (root / 'configs').iterdir()))\n"
        "print(sorted(p.name for p in (root / 'bundles').iterdir() if (p / 'configs').is_dir()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(build / "app")],
        cwd=tmp_path,
        env=_map_layout_env(packaged),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lib = build / "lib"
    assert result.stdout.splitlines() == [
        str(lib / "deploy_app" / "__init__.py"),
        str(lib / "bundles" / "s2cac_coronary_calcium" / "scripts" / "scoring.py"),
        str(lib / "bundles" / "dst_ica_calcification" / "scripts" / "segments.py"),
        str(sorted(p.name for p in (ROOT / "configs").iterdir())),
        str(["dst_ica_calcification", "s2cac_coronary_calcium"]),
    ]


def test_the_added_lib_on_pythonpath_shadows_no_stdlib_or_installed_module(packaged):
    """The packager puts every folder under /opt/holoscan/lib on PYTHONPATH, ahead of the standard library."""
    installed = set(importlib.metadata.packages_distributions())
    protected = set(sys.stdlib_module_names) | installed
    for entry in _map_layout_env(packaged)["PYTHONPATH"].split(":"):
        if not entry:
            continue
        names = {p.stem for p in Path(entry).glob("*.py")} | {p.name for p in Path(entry).iterdir() if p.is_dir()}
        assert not names & protected, (entry, sorted(names & protected))


def test_the_map_entry_python3_app_folder_runs_as_a_plain_script(packaged, tmp_path):
    """What the image runs: `python3 /opt/holoscan/app`, __main__.py as a script and not as part of a package."""
    result = subprocess.run(
        [sys.executable, str(packaged["build"] / "app"), "--help"],
        cwd=tmp_path,
        env=_map_layout_env(packaged),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()


def test_the_script_requires_exactly_the_models_the_app_loads():
    from deploy_app.models import MODELS

    declared = re.search(r"^MODEL_NAMES=\((.*)\)$", SCRIPT.read_text(), re.MULTILINE)
    assert declared and declared[1].split() == list(MODEL_NAMES)
    assert set(MODEL_NAMES) == set(MODELS)


def test_app_requirements_are_the_repository_pins_without_dev_tools():
    pins = _pins(APP_REQUIREMENTS)
    repo = _pins(ROOT / "requirements.txt")
    for name, version in pins.items():
        expected = repo[name] if name in repo else importlib.metadata.version(name)
        assert version.split("+")[0] == expected.split("+")[0], name
    # DESIGN.md: SDK 4.0 leaves holoscan unpinned, and 4.3+ CLIs lost `monai-deploy package`.
    assert {k: pins.get(k) for k in ("monai-deploy-app-sdk", "holoscan-cu13", "holoscan-cli")} == {
        "monai-deploy-app-sdk": "4.0.0",
        "holoscan-cu13": "4.2.0",
        "holoscan-cli": "4.2.0",
    }
    assert not DEV_TOOLS & set(pins)


def _third_party_imports(paths: list[Path]) -> dict[str, Path]:
    found = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                # `scripts`: a bundle's own package, imported with that bundle's root on sys.path.
                if top not in sys.stdlib_module_names and top not in {"__future__", "deploy_app", "bundles", "scripts"}:
                    found.setdefault(top, path)
    return found


def test_app_requirements_cover_every_import_of_the_shipped_code():
    """Every third-party module imported by deploy_app/ or the bundles' code that the MAP ships is installed."""
    shipped = [*(ROOT / "deploy_app").rglob("*.py"), *(ROOT / "bundles").glob("*/scripts/*.py")]
    pinned = set(_pins(APP_REQUIREMENTS))
    distributions = importlib.metadata.packages_distributions()
    missing = {
        module: str(path.relative_to(ROOT))
        for module, path in _third_party_imports(shipped).items()
        if not {_normalise(d) for d in distributions.get(module, [module])} & pinned
    }
    assert not missing


@pytest.mark.parametrize(
    ("breakage", "code", "message"),
    [
        (
            "missing_model",
            4,
            "package_map: error: model {models}/s2cac_ica/model.ts not found (make models exports it)",
        ),
        (
            "stray_file",
            4,
            "package_map: error: models folder {models} must hold only one folder per model, found file README.md",
        ),
        (
            "missing_source",
            6,
            "package_map: error: manifest source {source} not found (a local copy of holoscan-cli 4.2.0's "
            "artifacts.json)",
        ),
    ],
)
def test_bad_inputs_end_in_one_line_and_their_own_exit_code_before_anything_is_written(
    tmp_path, breakage, code, message
):
    models = _make_models(tmp_path / "models")
    source = MANIFEST
    if breakage == "missing_model":
        (models / "s2cac_ica" / "model.ts").unlink()
    elif breakage == "stray_file":
        (models / "README.md").write_text("not a model\n")
    else:
        source = tmp_path / "absent.json"
    output = tmp_path / "out"
    env = _env_without_docker(tmp_path / "stub_bin")
    result = _run_script("--models", str(models), "--source", str(source), "--output", str(output), env=env)
    assert result.returncode == code
    assert result.stderr.splitlines() == [message.format(models=models, source=source)]
    assert not output.exists()
