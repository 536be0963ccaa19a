"""The deploy app end to end, the way users and a MAP start it: `python -m deploy_app` and `python deploy_app`.

One synthetic study (a cardiac and a head CT series of one patient) goes through the real command line; its
outputs are read back by the real tools (dciodvfy, dcentvfy, dcmqi, pixelmed) and compared with the scorer.
Bad input ends in one line and its own exit code, with nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from make_study import make_study
from test_app_dicom_writers import dciodvfy, pixelmed_validate, read_back_with_dcmqi, tool
from test_app_pdf import pdf_text

from bundles.dst_ica_calcification.scripts.segments import LABEL_NAMES as ICA_LABEL_NAMES
from bundles.s2cac_coronary_calcium.scripts import scoring
from conftest import ROOT, need_tool
from deploy_app.cli import EXIT_CODES
from deploy_app.dicom_codes import QUALITY_FINDINGS
from deploy_app.inference import CPU_SW_OVERLAP, default_device
from deploy_app.volume import build_volume

QUALITY_MEANINGS = {check: code.meaning for check, code in QUALITY_FINDINGS.items()}
OUTPUTS = ["coronary_seg.dcm", "coronary_sr.dcm", "ica_seg.dcm", "ica_sr.dcm", "report.pdf", "report_pdf.dcm"]


def run_app(*args: str, as_script: bool = False, env: dict | None = None, timeout: int = 600):
    entry = [str(ROOT / "deploy_app")] if as_script else ["-m", "deploy_app"]
    return subprocess.run(
        [sys.executable, *entry, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study")
    make_study(out, size="small", chest=(0, 1), head=(0, 1), head_kwargs={"tilt_deg": 0.0})
    return out


@pytest.fixture(scope="module")
def app_run(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("app_out")
    r = run_app("-i", str(study / "dicom"), "-o", str(out), "-l", "WARNING")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_module_run_writes_every_object_and_prints_the_scores(app_run):
    out, r = app_run
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, "results.json"])
    report = results(out)
    for path in ("coronary", "ica"):
        assert report["paths"][path]["scored"], report["paths"][path]["not_scored_reason"]
        assert f"{path}: Agatston {report['paths'][path]['scores']['total']['agatston']:.1f}" in r.stdout
    assert report["study"]["patient_id"] == "CMDEMO0001"
    assert set(report["input_series"]) == {
        report["paths"]["coronary"]["series"]["series_uid"],
        report["paths"]["ica"]["series"]["series_uid"],
    }
    assert {m["name"] for m in report["paths"]["ica"]["models"]} == {"s2cac_ica", "dst_landmarks"}
    assert report["paths"]["coronary"]["scores"]["risk_category"] in ("0", "I", "II", "III", "IV")
    assert report["paths"]["ica"]["scores"]["risk_category"] is None  # defined for the coronary total only
    overlap = CPU_SW_OVERLAP if default_device().type == "cpu" else 0.5  # the bundles' own on a GPU
    assert report["paths"]["coronary"]["sliding_window"] == {"roi_size": [16, 160, 160], "overlap": overlap}
    assert report["paths"]["ica"]["sliding_window"] == {"roi_size": [16, 128, 128], "overlap": overlap}


@pytest.fixture(scope="module")
def script_run(study, app_run):
    """`python deploy_app` (how a MAP starts it) with HOLOSCAN_* paths and the Secondary Capture series switched
    on by its environment variable, into the first run's folder; returns the folder and its files before."""
    out, _ = app_run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = {
        "HOLOSCAN_INPUT_PATH": str(study / "dicom"),
        "HOLOSCAN_OUTPUT_PATH": str(out),
        "CALCIMAP_SECONDARY_CAPTURE": "1",
    }
    r = run_app("-l", "WARNING", as_script=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, before, r


def sc_files(out: Path) -> list[Path]:
    return sorted(out.glob("*_sc_*.dcm"))


def test_script_run_with_holoscan_variables_replaces_the_outputs_with_the_same_bytes(script_run):
    out, before, r = script_run
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    added = sorted(set(after) - set(before))
    assert set(before) <= set(after) and added == [p.name for p in sc_files(out)]  # no copy, no staging folder
    for name in OUTPUTS:
        assert after[name] == before[name], name
    report = results(out)
    for path in ("coronary", "ica"):
        n = report["paths"][path]["secondary_capture"]["images"]
        assert n > 0 and len([a for a in added if a.startswith(f"{path}_sc_")]) == n
        first = f"{out}/{path}_sc_0001.dcm"  # one image (a calcium-free series) prints as a plain path
        line = f"{first} .. {out}/{path}_sc_{n:04d}.dcm ({n} Secondary Capture images)" if n > 1 else first
        assert line in r.stdout


def test_every_output_passes_dciodvfy_and_dcentvfy_with_the_source(study, script_run):
    out, _, _ = script_run
    for name in OUTPUTS:
        if name.endswith(".dcm"):
            dciodvfy(out / name)
    for path in sc_files(out):
        dciodvfy(path)
    files = (
        [str(p) for p in sorted((study / "dicom").rglob("*.dcm"))]
        + [str(out / n) for n in OUTPUTS if n.endswith(".dcm")]
        + [str(p) for p in sc_files(out)]
    )
    r = subprocess.run([need_tool("dcentvfy"), *files], capture_output=True, text=True, timeout=300)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors[:20])


def _source_volume(study: Path, kind: str):
    folder = next((study / "dicom").glob(f"{kind}_*"))
    return build_volume([pydicom.dcmread(p) for p in sorted(folder.iterdir())])


@pytest.mark.parametrize(("path", "kind"), [("coronary", "chest"), ("ica", "head")])
def test_sr_numbers_are_the_scorer_on_the_seg_that_dcmqi_reads_back(study, app_run, tmp_path, path, kind):
    out, _ = app_run
    vol = _source_volume(study, kind)
    images = read_back_with_dcmqi(out / f"{path}_seg.dcm", tmp_path / "dcmqi")
    labels = np.zeros(vol.hu.shape, dtype=np.uint8)
    to_source = np.linalg.inv(vol.affine_ras())
    for number, image in images.items():
        mask = np.asarray(image.dataobj).transpose(2, 1, 0) > 0
        i0, j0, k0 = np.rint((to_source @ image.affine)[:3, 3]).astype(int)  # dcmqi writes the SEG's slab only
        assert (i0, j0) == (0, 0)
        labels[k0 : k0 + mask.shape[0]][mask] = number
    names = scoring.DEFAULT_LABEL_NAMES if path == "coronary" else ICA_LABEL_NAMES
    expected = scoring.score_calcium(vol.hu, labels, vol.scoring_spacing, label_names=names).as_dict()
    got = results(out)["paths"][path]["scores"]
    for name, value in expected["per_label"].items():
        assert got["per_label"][name]["agatston"] == pytest.approx(value["agatston"], rel=1e-9, abs=1e-9), name
        assert got["per_label"][name]["volume_mm3"] == pytest.approx(value["volume_mm3"], rel=1e-9, abs=1e-9)
    r = subprocess.run(
        [
            tool("tid1500reader"),
            "--inputDICOM",
            str(out / f"{path}_sr.dcm"),
            "--outputMetadata",
            str(tmp_path / "sr.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    groups = json.loads((tmp_path / "sr.json").read_text())["Measurements"]
    assert len(groups) == len(names) + 1  # one per segment and the total


@pytest.mark.parametrize("path", ["coronary", "ica"])
def test_sr_with_quality_findings_passes_pixelmed(app_run, path):
    out, _ = app_run
    names = scoring.DEFAULT_LABEL_NAMES if path == "coronary" else ICA_LABEL_NAMES
    pixelmed_validate(out / f"{path}_sr.dcm", len(names) + 1)
    sr = pydicom.dcmread(out / f"{path}_sr.dcm")
    quality = {f["check"]: f["passed"] for f in results(out)["paths"][path]["quality"]}
    meanings = [item.ConceptNameCodeSequence[0].CodeMeaning for item in _items(sr)]
    for check in quality:
        assert any(m.startswith(QUALITY_MEANINGS[check]) for m in meanings), check


def _items(ds):
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _items(item)


def test_pdf_and_results_json_carry_the_same_total(app_run):
    from pypdf import PdfReader

    out, _ = app_run
    text = "\n".join(page.extract_text() for page in PdfReader(out / "report.pdf").pages)
    report = results(out)
    for path in ("coronary", "ica"):
        total = report["paths"][path]["scores"]["total"]["agatston"]
        assert f"{total:.1f}" in text
    assert "not for diagnostic use" in text.lower()


# -- bad input: one line, its own exit code, nothing written ------------------------------------------------------


def assert_one_line_error(r, code: str, fragment: str, out: Path | None = None) -> None:
    assert r.returncode == EXIT_CODES[code], (r.returncode, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("calcimap: error:")]
    assert len(errors) == 1 and fragment in errors[0], r.stderr[-2000:]
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_missing_empty_and_non_dicom_inputs_fail_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run_app("-i", str(tmp_path / "nope"), "-o", str(out)), "input", "does not exist", out)
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_app("-i", str(tmp_path / "empty"), "-o", str(out)), "input", "is empty", out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an image")
    assert_one_line_error(run_app("-i", str(bad), "-o", str(out)), "input", "no DICOM files in", out)
    r = run_app("-i", str(bad), "-o", str(out), env={"CALCIMAP_SECONDARY_CAPTURE": "maybe"})
    assert_one_line_error(r, "input", "CALCIMAP_SECONDARY_CAPTURE='maybe' is neither on", out)
    r = run_app("-i", str(bad), "-o", str(out), "--sw-overlap", "1")
    assert_one_line_error(r, "input", "'1' is not an overlap from 0 up to (not including) 1", out)


def test_truncated_dicom_file_is_named_in_the_error(study, tmp_path):
    folder = tmp_path / "study"
    shutil.copytree(study / "dicom", folder)
    victim = sorted(folder.rglob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:300])
    out = tmp_path / "out"
    assert_one_line_error(run_app("-i", str(folder), "-o", str(out)), "input", victim.name, out)


def test_study_without_chest_or_head_ct_has_nothing_to_score(study, tmp_path):
    folder = tmp_path / "mr"
    folder.mkdir()
    for p in sorted(next((study / "dicom").glob("chest_*")).iterdir()):
        ds = pydicom.dcmread(p)
        ds.Modality = "MR"
        ds.save_as(folder / p.name)
    out = tmp_path / "out"
    assert_one_line_error(run_app("-i", str(folder), "-o", str(out)), "nothing_to_score", "no chest or head CT", out)


def test_missing_or_altered_models_are_refused(study, tmp_path):
    out = tmp_path / "out"
    r = run_app("-i", str(study / "dicom"), "-o", str(out), "-m", str(tmp_path / "none"))
    assert_one_line_error(r, "model", "does not exist", out)
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models", models)
    with open(models / "s2cac_ica" / "model.ts", "ab") as f:
        f.write(b"\0")
    r = run_app("-i", str(study / "dicom"), "-o", str(out), "-m", str(models))
    assert_one_line_error(r, "model", "refusing to load", out)
    shutil.rmtree(models / "dst_landmarks")
    r = run_app("-i", str(study / "dicom"), "-o", str(out), env={"HOLOSCAN_MODEL_PATH": str(models)})
    assert_one_line_error(r, "model", "dst_landmarks", out)


def test_cuda_asked_for_without_a_gpu_is_refused_before_the_output_folder_is_made(study, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: --device cuda is valid here")
    out = tmp_path / "out"
    r = run_app("-i", str(study / "dicom"), "-o", str(out), "--device", "cuda")
    assert_one_line_error(r, "input", "no CUDA GPU is available")
    assert not out.exists()


def test_unwritable_output_folder_is_reported(study, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_app("-i", str(study / "dicom"), "-o", str(blocker / "out"))
    assert_one_line_error(r, "output", "cannot create the output folder")


def test_missing_slice_is_not_scored_and_the_reports_say_why(study, tmp_path):
    folder = tmp_path / "study"
    shutil.copytree(study / "dicom", folder)
    chest = sorted(next(folder.glob("chest_*")).iterdir())
    chest[len(chest) // 2].unlink()
    shutil.rmtree(next(folder.glob("head_*")))
    out = tmp_path / "out"
    r = run_app("-i", str(folder), "-o", str(out), "-l", "WARNING")
    assert_one_line_error(r, "not_scored", "no series could be scored")
    report = results(out)
    coronary = report["paths"]["coronary"]
    assert not coronary["scored"] and "missing slice" in coronary["not_scored_reason"]
    assert sorted(p.name for p in out.iterdir()) == ["report.pdf", "report_pdf.dcm", "results.json"]


def write_multi_frame(series: list[pydicom.Dataset], path: Path, part: str = "1") -> None:
    """``series`` as one Legacy Converted Enhanced CT object (its own series UID, frames in the converter's order)."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    from deploy_app.dicom_output import derive_uid

    uid = series[0].SeriesInstanceUID
    mf = LegacyConvertedEnhancedCTImage(
        series,
        series_instance_uid=derive_uid(uid, "multi-frame"),
        series_number=int(series[0].SeriesNumber),
        sop_instance_uid=derive_uid(uid, "multi-frame", part),
        instance_number=int(part),
    )
    mf.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def multi_frame_run(study, tmp_path_factory):
    """The study with each series as one multi-frame object, through the app with the Secondary Capture series."""
    folder = tmp_path_factory.mktemp("multi_frame_study")
    for series in sorted((study / "dicom").iterdir()):
        write_multi_frame([pydicom.dcmread(p) for p in sorted(series.iterdir())], folder / f"{series.name}.dcm")
    out = tmp_path_factory.mktemp("multi_frame_out")
    r = run_app("-i", str(folder), "-o", str(out), "-l", "WARNING", env={"CALCIMAP_SECONDARY_CAPTURE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return folder, out


def _referenced_position(item: pydicom.Dataset, sources: dict[str, pydicom.Dataset]) -> tuple[float, ...]:
    """ImagePositionPatient of the source image (or frame) a Source Image Sequence item references."""
    ds = sources[item.ReferencedSOPInstanceUID]
    if "ReferencedFrameNumber" in item:
        frame = ds.PerFrameFunctionalGroupsSequence[int(item.ReferencedFrameNumber) - 1]
        return tuple(np.round(np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float), 3))
    return tuple(np.round(np.asarray(ds.ImagePositionPatient, float), 3))


@pytest.mark.parametrize(("path", "kind"), [("coronary", "chest"), ("ica", "head")])
def test_a_multi_frame_series_is_scored_and_written_as_its_single_frame_series(
    study, script_run, multi_frame_run, tmp_path, path, kind
):
    """Enhanced / Legacy Converted CT: the same scores, SEG masks at the same place, frames referenced by number."""
    single_out, _, _ = script_run  # the single-frame series' outputs, Secondary Capture included
    folder, out = multi_frame_run
    got, want = results(out)["paths"][path], results(single_out)["paths"][path]
    assert got["scored"], got["not_scored_reason"]
    assert (
        got["scores"]["per_label"] == want["scores"]["per_label"] and got["scores"]["total"] == want["scores"]["total"]
    )
    from_frames = read_back_with_dcmqi(out / f"{path}_seg.dcm", tmp_path / "frames")
    from_slices = read_back_with_dcmqi(single_out / f"{path}_seg.dcm", tmp_path / "slices")
    assert from_frames.keys() == from_slices.keys()
    for number, image in from_frames.items():
        np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(from_slices[number].dataobj))
        np.testing.assert_allclose(image.affine, from_slices[number].affine, atol=1e-3)

    sources = {
        ds.SOPInstanceUID: ds
        for ds in map(pydicom.dcmread, [*folder.iterdir(), *next((study / "dicom").glob(f"{kind}_*")).iterdir()])
    }
    seg = pydicom.dcmread(out / f"{path}_seg.dcm")
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        position = tuple(np.round(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float), 3))
        assert "ReferencedFrameNumber" in ref and _referenced_position(ref, sources) == position
    for mine, theirs in zip(
        sorted(out.glob(f"{path}_sc_*.dcm")), sorted(single_out.glob(f"{path}_sc_*.dcm")), strict=True
    ):
        a, b = (pydicom.dcmread(p).SourceImageSequence[0] for p in (mine, theirs))
        assert "ReferencedFrameNumber" in a and _referenced_position(a, sources) == _referenced_position(b, sources)
        dciodvfy(mine)
    for name in (f"{path}_seg.dcm", f"{path}_sr.dcm"):
        dciodvfy(out / name)
    names = scoring.DEFAULT_LABEL_NAMES if path == "coronary" else ICA_LABEL_NAMES
    pixelmed_validate(out / f"{path}_sr.dcm", len(names) + 1)
    files = [str(p) for p in [*folder.iterdir(), *out.glob("*.dcm")]]
    r = subprocess.run([need_tool("dcentvfy"), *files], capture_output=True, text=True, timeout=300)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors[:20])


def test_a_series_of_several_multi_frame_objects_is_not_scored_and_the_reports_say_why(study, tmp_path):
    chest = [pydicom.dcmread(p) for p in sorted(next((study / "dicom").glob("chest_*")).iterdir())]
    folder = tmp_path / "study"
    folder.mkdir()
    half = len(chest) // 2
    write_multi_frame(chest[:half], folder / "part1.dcm", "1")
    write_multi_frame(chest[half:], folder / "part2.dcm", "2")
    out = tmp_path / "out"
    r = run_app("-i", str(folder), "-o", str(out), "-l", "WARNING")
    assert_one_line_error(r, "not_scored", "no series could be scored")
    coronary = results(out)["paths"]["coronary"]
    assert coronary["series"]["slices"] == len(chest)  # read as one volume and checked
    assert all(f["passed"] for f in coronary["quality"]), coronary["quality"]
    assert not coronary["scored"] and "is 2 object(s), 2 of them multi-frame" in coronary["not_scored_reason"]
    assert sorted(p.name for p in out.iterdir()) == ["report.pdf", "report_pdf.dcm", "results.json"]
    text = " ".join(" ".join(pdf_text((out / "report.pdf").read_bytes())).split())
    assert text.count("Not scored:") == 1 and "The reports cannot reference this series" in text


def test_tilted_head_is_resampled_scored_and_its_seg_lies_on_the_source_slices(tmp_path):
    study = tmp_path / "study"
    make_study(study, size="small", chest=None, head=(0, 1), head_kwargs={"tilt_deg": 20.0})
    out = tmp_path / "out"
    r = run_app("-i", str(study / "dicom"), "-o", str(out), "-l", "WARNING")
    assert r.returncode == 0, r.stderr[-3000:]
    ica = results(out)["paths"]["ica"]
    assert ica["scored"] and ica["series"]["tilt_deg"] == pytest.approx(20.0, abs=0.01)
    tilt = next(f for f in ica["quality"] if f["check"] == "tilt")
    assert tilt["passed"] and "resampled" in tilt["detail"]
    dciodvfy(out / "ica_seg.dcm")
    seg = pydicom.dcmread(out / "ica_seg.dcm")
    source = {
        tuple(np.round(np.asarray(pydicom.dcmread(p).ImagePositionPatient, float), 3))
        for p in next((study / "dicom").glob("head_*")).iterdir()
    }
    for item in seg.PerFrameFunctionalGroupsSequence:
        position = tuple(np.round(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float), 3))
        assert position in source
