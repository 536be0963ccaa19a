"""Laterality and vessel identity survive the app's path from calcium mask to SEG and SR.

A study with RCA calcium only and right-ICA calcium only goes through the app's stages (volume, quality, the DST
landmarks, the segment mapping, the scorer, the writers) with the calcium model's output replaced by the phantom's
true calcium: what is checked is everything downstream of that one model, whose accuracy the bundles measure.
The SEG must hold calcium only in the RCA / right ICA segments, at the patient coordinates of the true lesions,
and the SR must report it there with the right finding site and laterality.
"""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from make_study import make_study

from deploy_app import pipeline
from deploy_app.models import load_manifest, locate_models, model_dir
from deploy_app.outputs import write_outputs
from deploy_app.quality import load_limits
from deploy_app.report import build_report
from deploy_app.segment_sets import get_segment_set
from deploy_app.study import read_study

RIGHT = "24028007"  # SCT Right
LEFT = "7771000"  # SCT Left
RCA = "13647002"
FINDING_SITE = "363698007"  # SCT
LATERALITY = "272741003"  # SCT, a finding-site modifier


class TruthAnswer:
    """A calcium model that answers a fixed label map and reads no tiles."""

    sliding_window = None

    def __init__(self, labels: np.ndarray):
        self.labels = labels

    def __call__(self, hu: np.ndarray, affine: np.ndarray) -> np.ndarray:
        return self.labels


class TruthCalcium(pipeline.Models):
    """The app's models, with the calcium model answering the phantom's truth (see the module docstring)."""

    def __init__(self, files, truth: dict[str, np.ndarray]):
        super().__init__(files, roi=False)
        self.truth = truth

    def get(self, name: str):
        if name in self.truth:
            return TruthAnswer(self.truth[name])
        return super().get(name)


@pytest.fixture(scope="module")
def scored_study(tmp_path_factory):
    """(study, path results, report, true lesions) of the study, scored on the true calcium."""
    study_dir = tmp_path_factory.mktemp("lat")
    made = make_study(study_dir, chest=(0, 0), head=(0, 6), head_kwargs={"calcium": "right", "tilt_deg": 0.0})
    truth_dirs = {k: study_dir / "truth" / v.name.split("_", 1)[1] for k, v in made.items()}
    import nibabel as nib

    def kji(path):
        return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0).astype(np.uint8)

    truth = {
        "s2cac_coronary": kji(truth_dirs["chest"] / "label.nii.gz"),
        "s2cac_ica": (kji(truth_dirs["head"] / "label.nii.gz") > 0).astype(np.uint8),
    }
    assert set(np.unique(truth["s2cac_coronary"])) == {0, 4}  # RCA only
    manifest = load_manifest()
    models = TruthCalcium(locate_models(model_dir(), manifest), truth)
    study = read_study(study_dir / "dicom")
    choices = pipeline.select(study)
    limits = load_limits()
    results = {p: pipeline.run_path(p, choices[p], models, limits) for p in pipeline.PATHS}
    report = build_report(study, results, manifest, {})
    lesions = {k: json.loads((d / "truth.json").read_text())["lesions"] for k, d in truth_dirs.items()}
    return study, results, report, lesions


@pytest.fixture(scope="module")
def outputs(scored_study, tmp_path_factory):
    study, results, report, lesions = scored_study
    out = tmp_path_factory.mktemp("lat_out")
    write_outputs(out, study, results, report, secondary_capture=True)
    return out, results, lesions


def _seg_points(seg: pydicom.Dataset) -> dict[int, np.ndarray]:
    """LPS mm of every voxel of each segment, from the SEG's own frame positions and pixel spacing."""
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    row_mm, col_mm = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    points: dict[int, list] = {}
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        origin = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        for j, i in np.argwhere(frame):
            points.setdefault(number, []).append(origin + i * col_mm * iop[:3] + j * row_mm * iop[3:])
    return {n: np.array(p) for n, p in points.items()}


def _groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    report = sr.ContentSequence
    imaging = next(i for i in report if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return list(imaging.ContentSequence)


def test_rca_only_calcium_is_in_the_rca_segment_at_the_lesion_positions(outputs):
    out, results, lesions = outputs
    assert results["coronary"].scored
    per = results["coronary"].score.per_label
    assert per["RCA"].agatston > 0 and all(per[v].volume_mm3 == 0 for v in ("LM", "LAD", "LCX"))
    points = _seg_points(pydicom.dcmread(out / "coronary_seg.dcm"))
    assert set(points) == {4}  # only the RCA segment has calcium frames
    centres = np.array([les["centre_mm"] for les in lesions["chest"] if les.get("labelled_voxels", 1) > 0])
    nearest = np.min(np.linalg.norm(points[4][:, None] - centres[None], axis=2), axis=1)
    assert nearest.max() < 5.0  # every SEG voxel lies on a true RCA lesion (radius a few mm)


def test_rca_only_sr_reports_the_rca_finding_site(outputs):
    out, _, _ = outputs
    sr = pydicom.dcmread(out / "coronary_sr.dcm")
    with_calcium = [g for g in _groups(sr)[:-1] if _volume(g) > 0]  # the last group is the total
    assert len(with_calcium) == 1 and RCA in _codes_deep(with_calcium[0], FINDING_SITE)


def test_right_ica_only_calcium_is_on_the_right(outputs):
    out, results, lesions = outputs
    assert results["ica"].scored, results["ica"].not_scored_reason
    per = results["ica"].score.per_label
    assert sum(v.volume_mm3 for k, v in per.items() if k.startswith("right")) > 0
    assert all(v.volume_mm3 == 0 for k, v in per.items() if k.startswith("left"))
    points = _seg_points(pydicom.dcmread(out / "ica_seg.dcm"))
    assert points and set(points) <= {1, 2, 3, 4}  # right-side segment numbers
    centres = np.array([les["centre_mm"] for les in lesions["head"]])
    assert (centres[:, 0] < 0).all()  # LPS: the patient's right is -x
    for p in points.values():
        assert (p[:, 0] < 0).all()
        assert np.min(np.linalg.norm(p[:, None] - centres[None], axis=2), axis=1).max() < 5.0


def test_right_ica_sr_groups_with_calcium_carry_right_laterality(outputs):
    out, _, _ = outputs
    sr = pydicom.dcmread(out / "ica_sr.dcm")
    with_calcium = [g for g in _groups(sr)[:-1] if _volume(g) > 0]
    assert with_calcium
    for group in with_calcium:
        assert _codes_deep(group, LATERALITY) == [RIGHT]


def test_secondary_capture_shows_rca_and_right_ica_calcium_in_their_colours_only(outputs):
    """Each SC image: the scored voxels of its source slice in their segment's colour at the same pixel (so on the
    patient's side where the SEG puts them), and no pixel anywhere in the colour of a vessel or side without calcium."""
    out, results, _ = outputs
    right_ica = {s.name for s in get_segment_set("ica").segments if s.name.startswith("right")}
    for path, allowed in (("coronary", {"RCA"}), ("ica", right_ica)):
        r = results[path]
        seg_set = get_segment_set(path)
        scored = np.where(r.volume.hu >= 130, r.labels, 0)
        assert {s.name for s in seg_set.segments if (scored == s.number).any()} <= allowed and scored.any()
        index = {ds.SOPInstanceUID: k for k, ds in enumerate(r.volume.datasets)}
        files = sorted(out.glob(f"{path}_sc_*.dcm"))
        assert len(files) == np.ptp(np.flatnonzero(scored.any(axis=(1, 2)))) + 1
        for f in files:
            ds = pydicom.dcmread(f)
            rgb = ds.pixel_array.astype(int)
            k = index[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
            zoom = rgb.shape[0] // scored.shape[1]
            for spec in seg_set.segments:
                jj, ii = np.nonzero(scored[k] == spec.number)
                assert (np.abs(rgb[jj * zoom, ii * zoom] - np.asarray(spec.rgb)) <= 40).all(), (f.name, spec.name)
                if spec.name not in allowed:
                    assert not (np.abs(rgb - np.asarray(spec.rgb)) <= 40).all(axis=2).any(), (f.name, spec.name)


def test_outputs_without_secondary_capture_remove_an_earlier_runs_series(scored_study, outputs, tmp_path):
    study, results, report, _ = scored_study
    out, _, _ = outputs
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    assert list(tmp_path.glob("*_sc_*.dcm"))
    written = write_outputs(tmp_path, study, results, report)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    assert not list(tmp_path.glob("*_sc_*.dcm")) and (tmp_path / "ica_seg.dcm").exists()


def test_the_report_has_the_uid_the_pacs_bridge_looks_up_before_it_runs_the_app(outputs):
    """The bridge's 'already done' check (pacs.common.report_uid) knows only the study and the app."""
    from deploy_app.pacs.common import report_uid

    out, _, _ = outputs
    report = pydicom.dcmread(out / "report_pdf.dcm", stop_before_pixels=True)
    assert report.SOPInstanceUID == report_uid(report.StudyInstanceUID)


def test_outputs_remove_the_staging_folder_of_a_killed_run_but_not_of_a_live_one(scored_study, tmp_path):
    """A run killed mid-write (SIGKILL, out of memory) never reaches its cleanup; the next run in the folder does it."""
    import subprocess
    import sys

    from deploy_app.outputs import STAGING_PREFIX

    study, results, report, _ = scored_study
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f"{STAGING_PREFIX}{int(dead.stdout)}-abcd1234"
    killed.mkdir()
    (killed / "coronary_seg.dcm").write_bytes(b"half a file")
    live = tmp_path / f"{STAGING_PREFIX}1-efgh5678"  # pid 1 runs as long as the machine
    live.mkdir()
    written = write_outputs(tmp_path, study, results, report)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, *(p.name for p in written)])


def _codes_deep(item: pydicom.Dataset, concept: str) -> list[str]:
    found = []
    for child in getattr(item, "ContentSequence", []):
        name = child.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in child else None
        if name == concept and "ConceptCodeSequence" in child:
            found.append(child.ConceptCodeSequence[0].CodeValue)
        found += _codes_deep(child, concept)
    return found


def _volume(group: pydicom.Dataset) -> float:
    for item in group.ContentSequence:
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "122660":  # DCM calcium volume
            return float(item.MeasuredValueSequence[0].NumericValue)
    raise AssertionError("no calcium volume in the group")
