"""The DST bundle's README commands, run as a user types them, on a few tiny phantoms.

Each `python -m monai.bundle` process spends ~7 s importing on this machine, so independent commands run side by
side: both trainings first, then inference, evaluation, export and the DDP fine-tune together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import verify_metadata

from bundles.dst_ica_calcification.scripts.data import find_images
from bundles.dst_ica_calcification.scripts.landmarks import LANDMARK_NAMES
from conftest import ROOT, SHARED

BUNDLE = ROOT / "bundles" / "dst_ica_calcification"
CONFIGS = BUNDLE / "configs"
TRAIN = str(CONFIGS / "train.yaml")
# A smoke run: tiny slices, one epoch, one validation.
SMOKE = [
    "--max_epochs", "1", "--spatial_size", "[32, 32]", "--batch_size", "2", "--val_batch_size", "2",
    "--cache_rate", "0", "--warmup_epochs", "0",
]  # fmt: skip
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class Command:
    """A command started in the background; ``wait()`` asserts success and returns its output."""

    def __init__(self, args: list[str], log: Path, cwd: Path = ROOT, env: dict | None = None):
        self.log = log
        self.handle = log.open("w")
        self.proc = subprocess.Popen(args, cwd=cwd, stdout=self.handle, stderr=subprocess.STDOUT, env=env or ENV)

    def wait(self, timeout: int = 600) -> str:
        rc = self.proc.wait(timeout=timeout)
        self.handle.close()
        text = self.log.read_text()
        assert rc == 0, text[-4000:]
        return text


def bundle(*args: str, log: Path, env: dict | None = None) -> Command:
    return Command([sys.executable, "-m", "monai.bundle", *args], log, env=env)


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_head")
    cmd = [sys.executable, str(ROOT / "scripts" / "make_phantoms.py"), "head", "--num", "6", "--out", str(out)]
    subprocess.run([*cmd, "--seed", "5", "--folds", "3"], check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def tiny_lung(tmp_path_factory) -> Path:
    """Lung phantoms in the Clean-CC-CCII layout, prepared into volumes + datalist as the README says."""
    raw, out = tmp_path_factory.mktemp("tiny_lung_raw"), tmp_path_factory.mktemp("tiny_lung")
    make = [sys.executable, str(ROOT / "scripts" / "make_phantoms.py"), "lung", "--num", "6", "--out", str(raw)]
    subprocess.run([*make, "--seed", "11"], check=True, capture_output=True, timeout=300)
    prepare = [sys.executable, str(ROOT / "scripts" / "prepare_clean_cc_ccii.py"), "--raw-root", str(raw)]
    subprocess.run([*prepare, "--out", str(out), "--folds", "3"], check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def trained(tiny_head, tiny_lung, tmp_path_factory) -> dict[str, Path]:
    """One short epoch per task, side by side; localization with MLflow tracking. Returns the run folders."""
    runs = {"localization": tmp_path_factory.mktemp("dst_loc"), "classification": tmp_path_factory.mktemp("dst_cls")}
    data = {"localization": tiny_head, "classification": tiny_lung}
    cmds = {}
    for task, run in runs.items():
        extra = ["--tracking", "mlflow"] if task == "localization" else []
        cmds[task] = bundle(
            "run", "training", "--config_file", TRAIN, "--task", task, "--dataset_dir", str(data[task]),
            "--output_dir", str(run), "--ckpt_dir", str(run / "models"), *SMOKE, *extra, log=run / "train.log",
        )  # fmt: skip
    for cmd in cmds.values():
        cmd.wait()
    return runs


@pytest.fixture(scope="module")
def after_training(trained, tiny_head, tiny_lung, tmp_path_factory) -> dict[str, Command]:
    """Everything that needs a checkpoint, started together."""
    out = tmp_path_factory.mktemp("dst_after")
    loc_ckpt = str(trained["localization"] / "models" / "model.pt")
    cls_ckpt = str(trained["classification"] / "models" / "model_classification.pt")
    evaluate = f"['{TRAIN}','{CONFIGS / 'evaluate.yaml'}']"
    multi = f"['{TRAIN}','{CONFIGS / 'multi_gpu_train.yaml'}']"
    cmds = {
        "infer_loc": bundle(
            "run", "--config_file", str(CONFIGS / "inference.yaml"), "--input_dir", str(tiny_head),
            "--input_glob", "head_0005_0000[01]/image.nii.gz", "--output_dir", str(out / "infer_loc"),
            "--model_file", loc_ckpt, "--spatial_size", "[32, 32]", log=out / "infer_loc.log",
        ),
        "infer_cls": bundle(
            "run", "--config_file", str(CONFIGS / "inference_classification.yaml"), "--input_dir", str(tiny_lung),
            "--output_dir", str(out / "infer_cls"), "--model_file", cls_ckpt, "--spatial_size", "[32, 32]",
            log=out / "infer_cls.log",
        ),
        "eval_loc": bundle(
            "run", "evaluating", "--config_file", evaluate, "--eval_dataset_dir", str(tiny_head),
            "--model_file", loc_ckpt, "--output_dir", str(out / "eval_loc"), "--n_boot", "50",
            "--spatial_size", "[32, 32]", log=out / "eval_loc.log",
        ),
        "eval_cls": bundle(
            "run", "evaluating", "--config_file", evaluate, "--task", "classification",
            "--eval_dataset_dir", str(tiny_lung), "--model_file", cls_ckpt, "--output_dir", str(out / "eval_cls"),
            "--n_boot", "50", "--spatial_size", "[32, 32]", log=out / "eval_cls.log",
        ),
        "export": bundle(
            "ckpt_export", "network_def", "--filepath", str(out / "model.ts"), "--ckpt_file", loc_ckpt,
            "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.yaml"),
            log=out / "export.log", env={**ENV, "PYTHONPATH": str(BUNDLE)},
        ),
        "ddp": Command(
            [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
                "-m", "monai.bundle", "run", "training", "--config_file", multi, "--dataset_dir", str(tiny_head),
                "--output_dir", str(out / "ddp"), "--ckpt_dir", str(out / "ddp" / "models"), *SMOKE,
                "--pretrained", loc_ckpt,
            ],
            out / "ddp.log",
        ),
    }  # fmt: skip
    cmds["out"] = out  # type: ignore[assignment]
    return cmds


def test_training_writes_best_checkpoints_logs_and_mlflow_runs(trained):
    loc, cls = trained["localization"], trained["classification"]
    assert (loc / "models" / "model.pt").is_file()
    assert (cls / "models" / "model_classification.pt").is_file()
    assert list(loc.glob("events.out.tfevents.*")), "TensorBoard events"
    log = (loc / "train.log").read_text()
    for metric in ("val_mae_slices", "val_top1", "val_within1", "val_presence_accuracy", "loss"):
        assert metric in log
    assert "val_accuracy" in (cls / "train.log").read_text()
    assert (loc / "mlruns.db").is_file(), "MLflow tracking store"


def test_localization_inference_writes_one_json_per_case_with_all_landmarks(after_training, tiny_head):
    after_training["infer_loc"].wait()
    out = after_training["out"] / "infer_loc"
    files = sorted(out.rglob("*.json"))
    assert [f.relative_to(out).as_posix() for f in files] == [
        "head_0005_00000/image.json", "head_0005_00001/image.json"
    ]  # fmt: skip
    for f in files:
        pred = json.loads(f.read_text())
        image = nib.load(tiny_head / f.parent.name / "image.nii.gz")
        assert pred["num_slices"] == image.shape[2]
        assert [lm["name"] for lm in pred["landmarks"]] == list(LANDMARK_NAMES)
        for lm in pred["landmarks"]:
            assert 0 <= lm["slice_index"] < image.shape[2]
            assert 0 <= lm["expected_slice"] <= image.shape[2] - 1
            centre = [(image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2, lm["slice_index"], 1]
            z = (image.affine @ centre)[2]  # at the slice's centre: with gantry tilt z varies across a slice
            assert lm["z_mm"] == pytest.approx(z, abs=1e-2)
            assert 0 <= lm["probability"] <= 1 and 0 <= lm["presence_probability"] <= 1
            assert lm["present"] == (lm["presence_probability"] >= 0.5)
            assert lm["side"] in ("right", "left") and lm["boundary"] in (1, 2, 3)


def test_classification_inference_gives_a_class_and_probabilities_per_scan(after_training, tiny_lung):
    after_training["infer_cls"].wait()
    out = after_training["out"] / "infer_cls"
    files = sorted(out.rglob("*.json"))
    assert len(files) == len(list(tiny_lung.rglob("*.nii.gz"))) > 0
    for f in files:
        pred = json.loads(f.read_text())
        assert pred["class"] in ("NCP", "CP", "Normal")
        assert sum(pred["probabilities"]) == pytest.approx(1.0, abs=1e-3)
        assert pred["class"] == ("NCP", "CP", "Normal")[int(np.argmax(pred["probabilities"]))]


def test_evaluating_localization_writes_report_with_intervals_and_targets(after_training, tiny_head):
    log = after_training["eval_loc"].wait()
    report = json.loads((after_training["out"] / "eval_loc" / "evaluation" / "evaluation.json").read_text())
    summary = report["summary"]
    assert summary["n_cases"] == 6
    assert set(summary["per_landmark"]) == set(LANDMARK_NAMES)
    mae = summary["by_thickness"]["all"]["mae_slices"]
    assert set(mae) == {"estimate", "low", "high", "n"} and mae["low"] <= mae["estimate"] <= mae["high"]
    assert set(summary["targets_met"]) == {"thick_mae_slices", "thick_top1", "thick_within1", "thin_mae_mm"}
    assert "Release targets" in log and "presence accuracy" in log


def test_evaluating_classification_reports_accuracy_f1_and_auc(after_training):
    after_training["eval_cls"].wait()
    summary = json.loads((after_training["out"] / "eval_cls" / "evaluation" / "evaluation.json").read_text())["summary"]
    assert {"accuracy", "macro_f1", "auc_ovr", "confusion"} <= set(summary)
    assert sum(map(sum, summary["confusion"])) == summary["n_cases"]


def test_ckpt_export_gives_torchscript_that_runs_without_bundle_code(after_training):
    after_training["export"].wait()
    ts = after_training["out"] / "model.ts"
    probe = (
        "import sys, torch; sys.path = [p for p in sys.path if 'bundles' not in p and p not in ('', '.')];"
        f"m = torch.jit.load({str(ts)!r}); x = torch.rand(1, 1, 9, 32, 32);"
        "mask = torch.tensor([[True] * 7 + [False] * 2]); o = m(x, mask); p = o['landmark_logits'].softmax(-1);"
        "print(tuple(p.shape), round(float(p[0, :, :7].sum(-1).mean()), 4), float(p[0, :, 7:].sum()))"
    )
    r = subprocess.run([sys.executable, "-c", probe], cwd=ts.parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "(1, 6, 9) 1.0 0.0" in r.stdout


def test_two_cpu_processes_fine_tune_with_ddp_on_gloo(after_training):
    log = after_training["ddp"].wait()
    assert (after_training["out"] / "ddp" / "models" / "model.pt").is_file()
    assert "process 0 of 2, backend gloo" in log and "process 1 of 2, backend gloo" in log


@pytest.mark.parametrize("name", ["metadata.json", "metadata_classification.json"])
def test_metadata_verifies_offline_against_the_schema(name, tmp_path):
    schema = SHARED / "data" / "monai" / "meta_schema_20240725.json"
    shutil.copy(schema, tmp_path / schema.name)
    verify_metadata(meta_file=str(CONFIGS / name), filepath=str(tmp_path / schema.name))  # raises when invalid
    meta = json.loads((CONFIGS / name).read_text())
    assert meta["version"] in meta["changelog"]


def test_inference_with_no_inputs_fails_clearly(tmp_path):
    """In-process: one more `monai.bundle` process would cost ~7 s of imports for a one-line message."""
    with pytest.raises(FileNotFoundError, match=r"no \*\.nii\.gz files under"):
        find_images(str(tmp_path))


def test_shipped_localization_weights_find_the_landmarks_on_unseen_heads(tiny_head, tmp_path):
    """models/model.pt as a user runs it (inference.yaml defaults) on phantoms of a seed no run has seen."""
    out = tmp_path / "pred"
    bundle(
        "run", "--config_file", str(CONFIGS / "inference.yaml"), "--input_dir", str(tiny_head),
        "--input_glob", "*/image.nii.gz", "--output_dir", str(out), log=tmp_path / "infer.log",
    ).wait()  # fmt: skip
    errors, presence = [], []
    for case in sorted(p for p in tiny_head.iterdir() if p.is_dir()):
        truth = {lm["name"]: lm for lm in json.loads((case / "truth.json").read_text())["landmarks"]}
        for lm in json.loads((out / case.name / "image.json").read_text())["landmarks"]:
            true = truth[lm["name"]]
            presence.append(lm["present"] == true["in_scan"])
            if true["in_scan"]:
                errors.append(abs(lm["expected_slice"] - true["slice_index"]))
    assert len(errors) >= 24
    # Measured on 150 held-out heads: MAE 0.46 slices; a random guess over ~40 slices is off by ~13.
    assert np.mean(errors) < 1.5, errors
    assert np.mean(presence) >= 0.9
