"""The S2CAC bundle's README commands, run as a user types them, on a few small phantoms."""

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
import yaml

from bundles.s2cac_coronary_calcium.scripts.losses import consistency_weight, negative_boost
from conftest import ROOT, SHARED

BUNDLE = ROOT / "bundles" / "s2cac_coronary_calcium"
CONFIGS = BUNDLE / "configs"
# A smoke run: tiny patches, one epoch, one validation. Validation reads whole volumes: with the 8x48x48 training
# tile at the published overlap of 0.5 that is over a thousand tiles a case, so it tiles 16x96x96 at 0.25 overlap.
FAST_SLIDING_WINDOW = ["--validate#inferer#roi_size", "[16, 96, 96]", "--validate#inferer#overlap", "0.25"]
SMOKE = [
    "--max_epochs", "1", "--val_interval", "1", "--patch_size", "[8, 48, 48]", "--batch_size", "1",
    "--num_samples", "1", "--unlabeled_batch", "1", "--cache_rate", "0", *FAST_SLIDING_WINDOW,
]  # fmt: skip


def bundle_cmd(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=ROOT, capture_output=True, text=True, env=env,
        timeout=timeout, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def tiny_chest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_chest")
    cmd = [sys.executable, str(ROOT / "scripts" / "make_phantoms.py"), "chest", "--num", "10", "--out", str(out)]
    cmd += ["--seed", "5", "--thickness", "3.0", "--unlabeled-fraction", "0.4"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def trained(tiny_chest, tmp_path_factory) -> Path:
    """One short semi-supervised epoch with MLflow tracking; returns the run folder."""
    run = tmp_path_factory.mktemp("s2cac_run")
    r = bundle_cmd(
        "run", "training", "--config_file", str(CONFIGS / "train.yaml"), "--dataset_dir", str(tiny_chest),
        "--output_dir", str(run), "--ckpt_dir", str(run / "models"), "--tracking", "mlflow", *SMOKE,
    )  # fmt: skip
    (run / "train.log").write_text(r.stdout + r.stderr)
    return run


def test_training_smoke_run_writes_checkpoint_logs_and_schedules(trained):
    assert (trained / "models" / "model.pt").is_file()
    assert list(trained.glob("events.out.tfevents.*")), "TensorBoard events"
    log = (trained / "train.log").read_text()
    assert "consistency_weight" in log and "negative_boost" in log
    assert "val_mean_dice" in log
    assert (trained / "mlruns.db").is_file() or list(trained.glob("mlruns*")), "MLflow tracking store"


def first_progress_reaching(fn, fraction: float) -> float:
    """The first fraction of training at which ``fn`` reaches ``fraction`` of its final value."""
    progress = np.linspace(0, 1, 1001)
    values = np.array([fn(p) for p in progress])
    return float(progress[np.argmax(values >= fraction * values[-1])])


def test_shipped_schedules_reach_90_percent_within_training():
    cfg = yaml.safe_load((CONFIGS / "train.yaml").read_text())
    boost = lambda p: negative_boost(p, cfg["boost_alpha"], cfg["boost_beta"], cfg["boost_tau"])  # noqa: E731
    cons = lambda p: consistency_weight(p, cfg["consistency_max"], cfg["consistency_rampup"])  # noqa: E731
    assert boost(1.0) > 0.99
    assert cons(1.0) == pytest.approx(cfg["consistency_max"])
    assert first_progress_reaching(boost, 0.9) < 0.8
    assert first_progress_reaching(cons, 0.9) < 0.25


def test_inference_writes_label_maps_on_the_input_grid(trained, tiny_chest, tmp_path):
    out = tmp_path / "pred"
    bundle_cmd(
        "run", "--config_file", str(CONFIGS / "inference.yaml"), "--input_dir", str(tiny_chest),
        "--input_glob", "chest_0005_0000[01]/image.nii.gz", "--output_dir", str(out),
        "--model_file", str(trained / "models" / "model.pt"),
        "--patch_size", "[16, 96, 96]", "--inferer#overlap", "0.25",
    )  # fmt: skip
    for case in ("chest_0005_00000", "chest_0005_00001"):
        image = nib.load(tiny_chest / case / "image.nii.gz")
        pred = nib.load(out / case / "image_seg.nii.gz")
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-3)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3, 4}


def test_inference_with_no_inputs_fails_clearly(trained, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.yaml"),
         "--input_dir", str(tmp_path), "--model_file", str(trained / "models" / "model.pt")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert r.returncode != 0
    assert "no *.nii.gz files under" in r.stdout + r.stderr


def test_ckpt_export_gives_torchscript_that_runs_without_bundle_code(trained, tmp_path):
    ts = tmp_path / "model.ts"
    bundle_cmd(
        "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(trained / "models" / "model.pt"),
        "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.yaml"),
        env={"PYTHONPATH": str(BUNDLE)},
    )  # fmt: skip
    probe = (
        "import sys, torch; sys.path = [p for p in sys.path if 'bundles' not in p and p not in ('', '.')];"
        f"m = torch.jit.load({str(ts)!r}); x = torch.rand(1, 1, 8, 48, 48);"
        "y = m(x); l, s = m.forward_with_score(x); print(tuple(y.shape), tuple(s.shape))"
    )
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "(1, 5, 8, 48, 48) (1,)" in r.stdout


@pytest.mark.parametrize("meta", ["metadata.json", "metadata_ica.json"])
def test_metadata_verifies_offline_against_the_schema(tmp_path, meta):
    schema = SHARED / "data" / "monai" / "meta_schema_20240725.json"
    local = tmp_path / schema.name
    shutil.copy(schema, local)
    r = bundle_cmd("verify_metadata", "--meta_file", str(CONFIGS / meta), "--filepath", str(local))
    assert "metadata is verified with no error" in r.stdout + r.stderr


def test_ica_layers_describe_a_binary_network_with_its_own_weights():
    from monai.bundle import ConfigParser

    train = ConfigParser()
    train.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "train_ica.yaml")])
    infer = ConfigParser()
    infer.read_config([str(CONFIGS / "inference.yaml"), str(CONFIGS / "inference_ica.yaml")])
    meta = json.loads((CONFIGS / "metadata_ica.json").read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["num_channels"]
    assert train["num_classes"] == infer["num_classes"] == channels == 2
    assert train["pixdim"] == infer["pixdim"] and train["patch_size"] == infer["patch_size"]
    assert train["ckpt_name"] == "model_ica.pt"
    assert infer.get_parsed_content("model_file").endswith("/models/model_ica.pt")
    coronary = ConfigParser()
    coronary.read_config([str(CONFIGS / "train.yaml")])
    assert coronary["ckpt_name"] == "model.pt" and coronary["num_classes"] == 5


def test_two_cpu_processes_fine_tune_with_ddp_on_gloo(trained, tiny_chest, tmp_path):
    configs = f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'multi_gpu_train.yaml'}']"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file", configs, "--dataset_dir", str(tiny_chest),
        "--output_dir", str(tmp_path), "--ckpt_dir", str(tmp_path / "models"), *SMOKE,
        "--fold", "3",  # every split needs at least one case per process: fold 3 validates on 2
        "--pretrained", str(trained / "models" / "model.pt"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    log = r.stdout + r.stderr
    assert "process 0 of 2, backend gloo" in log and "process 1 of 2, backend gloo" in log


def test_evaluating_writes_a_report_with_intervals_and_targets(trained, tiny_chest):
    out = trained / "eval_run"
    configs = f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'evaluate.yaml'}']"
    r = bundle_cmd(
        "run", "evaluating", "--config_file", configs, "--eval_dataset_dir", str(tiny_chest),
        "--model_file", str(trained / "models" / "model.pt"), "--output_dir", str(out), "--n_boot", "50",
        *FAST_SLIDING_WINDOW,
    )  # fmt: skip
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    summary = report["summary"]
    labeled = json.loads((tiny_chest / "datalist.json").read_text())["training"]
    assert summary["n_cases"] == len(labeled) == len(report["cases"])
    icc = summary["overall"]["agatston_icc"]
    assert set(icc) >= {"estimate", "low", "high", "n"}
    assert set(summary["targets_met"]) == {"agatston_icc", "risk_weighted_kappa", "vessel_assignment"}
    assert "Release targets" in (out / "evaluation" / "evaluation.md").read_text()
    assert "Agatston ICC" in r.stdout + r.stderr
    for case in labeled:
        pred = nib.load(out / "evaluation" / case["case_id"] / "image_seg.nii.gz")
        assert pred.shape == nib.load(tiny_chest / case["image"]).shape


@pytest.mark.xfail(
    strict=True,
    reason="issue 3 open: the shipped S2CAC weights are CPU demo weights far from the release targets (they label "
    "bright bone as calcium; docs/README.md#performance); remove this marker when weights meet the targets",
)
def test_shipped_weights_find_no_coronary_calcium_on_the_real_abdominal_ct(real_ct_dir, tmp_path):
    """The real series is contrast-enhanced abdomen with bone: far above 130 HU, but no coronary calcium."""
    from bundles.s2cac_coronary_calcium.scripts.scoring import score_nifti
    from phantoms.dicom_series import read_ct_series

    volume, grid, _ = read_ct_series(real_ct_dir)
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0).astype(np.int16), grid.affine_ras()), inputs / "real.nii.gz")
    assert (volume > 300).sum() > 10000, "bone and contrast well above the calcium threshold"
    bundle_cmd("run", "--config_file", str(CONFIGS / "inference.yaml"), "--input_dir", str(inputs),
               "--output_dir", str(tmp_path / "out"))  # fmt: skip
    score = score_nifti(inputs / "real.nii.gz", tmp_path / "out" / "real_seg.nii.gz")
    assert score.total.agatston == 0.0
    assert score.risk_category == "0"


def test_supervised_only_run_for_the_semi_supervised_gain_comparison(tmp_path):
    """--unlabeled_batch 0 trains on labeled cases only, also when the datalist has no unlabeled cases."""
    data = tmp_path / "data"
    cmd = [sys.executable, str(ROOT / "scripts" / "make_phantoms.py"), "chest", "--num", "4", "--out", str(data)]
    subprocess.run([*cmd, "--seed", "8", "--thickness", "3.0", "--folds", "2"], check=True, capture_output=True)
    r = bundle_cmd(
        "run", "training", "--config_file", str(CONFIGS / "train.yaml"), "--dataset_dir", str(data),
        "--output_dir", str(tmp_path / "run"), "--ckpt_dir", str(tmp_path / "models"), *SMOKE,
        "--unlabeled_batch", "0",
    )  # fmt: skip
    assert (tmp_path / "models" / "model.pt").is_file()
    log = r.stdout + r.stderr
    assert "consistency_weight: 0.0000" in log and "loss_mask_consistency" not in log
