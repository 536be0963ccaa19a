"""The reader's PDF report (deploy_app/pdf_report.py) and its DICOM Encapsulated PDF (deploy_app/pdf_writer.py).

Built from small phantoms scored by the project's one scorer: a chest (coronary, standard acquisition), a head
(ICA, thin slices: Agatston-equivalent) and a not-scored variant. pypdf reads the text back; dciodvfy
(dicom3tools) checks the DICOM object.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pypdf import PdfReader
from scipy import ndimage

from bundles.dst_ica_calcification.scripts.segments import LABEL_NAMES as ICA_LABEL_NAMES
from bundles.s2cac_coronary_calcium.scripts.scoring import DEFAULT_LABEL_NAMES, acquisition_note, score_calcium
from conftest import need_tool
from deploy_app.dicom_output import Algorithm
from deploy_app.pdf_report import (
    KeyImages,
    KeySlice,
    fmt_number,
    orientation_label,
    render_report_pdf,
    select_key_slices,
)
from deploy_app.pdf_writer import build_pdf_dataset, pdf_uids, write_pdf
from deploy_app.segment_sets import ICA
from phantoms.dicom_series import read_ct_series
from phantoms.head import make_head_case
from phantoms.writers import write_case

ALGORITHM = Algorithm("CalciMap", "0.1.0")
MODELS = {
    "coronary": [{"name": "S2CAC coronary", "version": "0.3.0", "sha256": "ab12cd34ef56" + "0" * 52}],
    "ica": [
        {"name": "S2CAC ICA", "version": "0.3.0", "sha256": "9f8e7d6c5b4a" + "1" * 52},
        {"name": "DST landmarks", "version": "0.2.0", "sha256": "0123456789ab" + "2" * 52},
    ],
}


def ica_labels(case) -> np.ndarray:
    """ICA calcium labelled 1 + side * 4 + segment (the ICA segment set) by the nearest lumen voxel's segment."""
    segments = case.arrays["segments"]
    _, nearest = ndimage.distance_transform_edt(segments == 0, return_indices=True)
    return np.where(case.arrays["label"] > 0, segments[tuple(nearest)], 0).astype(np.uint8)


def series_facts(case, number: int, description: str) -> dict[str, Any]:
    grid, tags = case.grid, case.tags
    return {
        "series_uid": f"1.2.826.0.1.3680043.8.498.{number}",
        "series_number": number,
        "series_description": description,
        "thickness_mm": float(tags["SliceThickness"]),
        "increment_mm": float(grid.increment_mm),
        "pixel_spacing_mm": [grid.pixel_mm, grid.pixel_mm],
        "kvp": float(tags["KVP"]),
        "kernel": tags["ConvolutionKernel"],
        "tilt_deg": grid.tilt_deg,
        "slices": grid.shape[0],
        "manufacturer": tags["Manufacturer"],
    }


def scored_path(case, labels: np.ndarray, segment_set: str, number: int, description: str) -> tuple[dict, KeyImages]:
    """A scored path dict (as the app's report holds it) and its key images."""
    series = series_facts(case, number, description)
    names = DEFAULT_LABEL_NAMES if segment_set == "coronary" else ICA_LABEL_NAMES
    scores = score_calcium(
        case.arrays["image"],
        labels,
        (case.grid.pixel_mm, case.grid.pixel_mm, case.grid.increment_mm),
        label_names=names,
        thickness_mm=series["thickness_mm"],
        kvp=series["kvp"],
        kernel=series["kernel"],
    ).as_dict()
    note = acquisition_note(series["thickness_mm"], series["kvp"], series["kernel"])
    path = {
        "series": series,
        "selection": {
            "standard": note is None,
            # as the app's selection gives them: the region, the standard check, the ranking preferences
            "reasons": [
                "BodyPartExamined shows the region",
                "standard acquisition" if note is None else f"non-standard acquisition: {note}",
                f"tube voltage {series['kvp']:g} kVp (target 120 kVp)",
            ],
            "candidates": [
                {
                    # the keys of deploy_app.selection's candidates (results.json)
                    **{k: series[k] for k in ("series_uid", "series_number")},
                    "description": series["series_description"],
                    "matched": True,
                    "rank": 1,
                    "reasons": ["non-contrast, soft kernel"],
                },
                {
                    "series_uid": "1.2.3.99",
                    "series_number": 99,
                    "description": "Lung 1.0 B70f",
                    "matched": False,
                    "rank": 2,
                    "reasons": ["sharp kernel 'B70f'"],
                },
            ],
        },
        "quality": [
            {
                "check": "slice spacing",
                "passed": True,
                "blocking": True,
                "detail": "uniform 2.5 mm steps",
                "value": 2.5,
            },
            {
                "check": "noise",
                "passed": False,
                "blocking": False,
                "detail": "noise 31 HU in the aorta (limit 25 HU)",
                "value": 31.0,
            },
        ],
        "scored": True,
        "not_scored_reason": None,
        "scores": scores,
        "segment_set": segment_set,
        "models": MODELS[segment_set],
    }
    if segment_set == "ica":
        path["landmarks"] = [
            {"name": "right_cervical_petrous", "side": "right", "slice": 3, "z_mm": -12.5, "present": True},
            {"name": "left_cervical_petrous", "side": "left", "slice": None, "z_mm": None, "present": False},
        ]
    spacing = (case.grid.pixel_mm, case.grid.pixel_mm)
    return path, KeyImages(case.arrays["image"].astype(np.float32), labels, spacing, case.grid.increment_mm)


@pytest.fixture(scope="module")
def chest_series(chest_case, tmp_path_factory):
    """(datasets, labels) of the session's small chest phantom written as DICOM and read back."""
    folder = write_case(chest_case, tmp_path_factory.mktemp("chest"), dicom=True)
    _, _, datasets = read_ct_series(folder / "dicom")
    return datasets, chest_case.arrays["label"].astype(np.uint8)


@pytest.fixture(scope="module")
def report_and_images(chest_case, chest_series) -> tuple[dict, dict[str, KeyImages]]:
    datasets, labels = chest_series
    source = datasets[0]
    coronary, coronary_images = scored_path(chest_case, labels, "coronary", 3, "CaSc 2.5 Qr36")
    head = make_head_case(8, 0, "small", calcium="both", tilt_deg=0.0)  # 1.25 mm slices: Agatston-equivalent
    ica, ica_images = scored_path(head, ica_labels(head), "ica", 5, "Head 1.25 H30s")
    study = {
        "study_uid": source.StudyInstanceUID,
        "patient_name": str(source.PatientName),
        "patient_id": source.PatientID,
        "patient_sex": source.get("PatientSex", ""),
        "patient_birth_date": source.get("PatientBirthDate", ""),
        "study_date": source.StudyDate,
        "study_time": source.get("StudyTime", ""),
        "accession_number": source.get("AccessionNumber", ""),
        "study_description": source.get("StudyDescription", ""),
        "institution_name": "",
    }
    report = {
        "app": {"name": "CalciMap", "version": "0.1.0"},
        "study": study,
        "paths": {"coronary": coronary, "ica": ica},
        "warnings": ["the head series has 1.25 mm slices: ICA scores are Agatston-equivalent"],
    }
    return report, {"coronary": coronary_images, "ica": ica_images}


@pytest.fixture(scope="module")
def pdf(report_and_images) -> bytes:
    return render_report_pdf(*report_and_images)


def pdf_text(data: bytes) -> list[str]:
    return [page.extract_text() for page in PdfReader(io.BytesIO(data)).pages]


def table_line(text: str, row_name: str) -> str:
    lines = [line for line in text.splitlines() if re.match(rf"{re.escape(row_name)} \d", line)]
    assert len(lines) == 1, f"expected one table row {row_name!r} in:\n{text}"
    return lines[0]


def test_pdf_text_holds_each_vessel_score_as_printed_and_the_total(pdf, report_and_images):
    report, _ = report_and_images
    text = "\n".join(pdf_text(pdf))
    titles = {
        "LM": "Left main (LM)",
        "LAD": "Left anterior descending (LAD)",
        "LCX": "Left circumflex (LCX)",
        "RCA": "Right coronary artery (RCA)",
    }
    scores = report["paths"]["coronary"]["scores"]
    for name, title in titles.items():
        s = scores["per_label"][name]
        expected = [fmt_number(s["agatston"]), fmt_number(s["volume_mm3"]), fmt_number(s["mass_mg"])]
        assert table_line(text, title).split()[-4:-1] == expected
    assert scores["total"]["agatston"] > 0, "the chest phantom changed: it should hold calcium"
    totals = [line for line in text.splitlines() if line.startswith("Total ")]
    assert totals[0].split()[1:4] == [fmt_number(scores["total"][k]) for k in ("agatston", "volume_mm3", "mass_mg")]
    ica_scores = report["paths"]["ica"]["scores"]
    for spec in ICA.segments:
        line = table_line(text, spec.label.removesuffix(" calcium"))
        assert line.split()[-4] == fmt_number(ica_scores["per_label"][spec.name]["agatston"])
    assert totals[1].split()[1] == fmt_number(ica_scores["total"]["agatston"])


def test_pdf_text_holds_risk_category_patient_quality_and_disclaimer(pdf, report_and_images):
    report, _ = report_and_images
    pages = pdf_text(pdf)
    text = "\n".join(pages)
    category = report["paths"]["coronary"]["scores"]["risk_category"]
    assert category == "I", "the chest phantom changed: expected a total Agatston of 0-10"
    assert f"Risk category {category}" in text and "0 < S ≤ 10" in text
    assert report["study"]["patient_id"] in pages[0]
    assert "noise 31 HU in the aorta (limit 25 HU)" in text and "failed (advisory)" in text
    assert all("not for diagnostic use" in page for page in pages)
    assert all(re.search(rf"page {n}/{len(pages)}", page) for n, page in enumerate(pages, start=1))
    assert "models: S2CAC coronary 0.3.0 (sha256 ab12cd34ef56)" in pages[0].replace("\n", " ")


def test_agatston_equivalent_is_printed_with_its_reason_only_when_flagged(pdf, report_and_images):
    report, _ = report_and_images
    assert report["paths"]["ica"]["scores"]["agatston_equivalent"] is True
    assert report["paths"]["coronary"]["scores"]["agatston_equivalent"] is False
    text = " ".join(pdf_text(pdf)).replace("\n", " ")
    assert text.count("Agatston-equivalent: this acquisition is not the standard one") == 1
    why = text.split("Agatston-equivalent: this acquisition is not the standard one")[1].split("Compare these")[0]
    assert why.count("slice thickness 1.25 mm (standard 2.5-3 mm)") == 1
    assert "target" not in why and "BodyPartExamined" not in why  # the reasons, not the selection's other facts
    coronary_part = text.split("Intracranial internal carotid artery")[0]
    assert "Agatston-equivalent" not in coronary_part


def test_other_series_considered_are_named_with_their_description_and_reason(pdf):
    text = " ".join(pdf_text(pdf)).replace("\n", " ")
    assert "series 99 \u201cLung 1.0 B70f\u201d (sharp kernel 'B70f')" in text


def test_landmarks_read_as_boundaries_on_slices_counted_from_one(pdf):
    text = " ".join(pdf_text(pdf)).replace("\n", " ")
    assert "right cervical\u2013petrous boundary at slice 4 (z -12.5 mm)" in text  # slice index 3
    assert "left cervical\u2013petrous boundary not in the scan" in text


def test_page_count_is_text_pages_plus_one_key_image_page_per_scored_path(pdf, report_and_images):
    pages = pdf_text(pdf)
    assert len(pages) == 4
    key_pages = [n for n, page in enumerate(pages) if "Key images — " in page]
    assert key_pages == [2, 3]
    assert "Key images — Coronary artery calcium" in pages[2]
    assert "Key images — Intracranial internal carotid artery (ICA) calcium" in pages[3]


def test_same_input_gives_the_same_pdf_bytes(pdf, report_and_images):
    again = render_report_pdf(*report_and_images)
    assert again == pdf
    assert b"/CreationDate" not in pdf


def test_not_scored_and_missing_paths_print_one_line_instead_of_a_table(report_and_images):
    report, _ = report_and_images
    coronary = {
        **report["paths"]["coronary"],
        "scored": False,
        "scores": None,
        "not_scored_reason": "slice increment 5 mm is above the 3 mm limit",
    }
    data = render_report_pdf({**report, "paths": {"coronary": coronary, "ica": None}}, {})
    pages = pdf_text(data)
    assert len(pages) == 1, "no key-image page without a scored path"
    text = pages[0]
    assert "Not scored: slice increment 5 mm is above the 3 mm limit" in text
    assert "No head CT series in this study" in text
    assert "Risk category" not in text and "Total " not in text


def test_select_key_slices_takes_each_segments_fullest_slice_and_the_middle_without_calcium():
    hu = np.zeros((10, 8, 8), dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    hu[2, 1, 1:3] = hu[5, 1, 1:5] = hu[7, 6, 6] = 400.0
    labels[2, 1, 1:3] = labels[5, 1, 1:5] = 2
    labels[7, 6, 6] = 4
    labels[8, 0, 0] = 3  # below 130 HU: not scored, so not a key slice
    images = KeyImages(hu, labels, (0.5, 0.5), 3.0)
    assert select_key_slices(images) == [KeySlice(5, (2,)), KeySlice(7, (4,))]
    assert select_key_slices(images, max_slices=1) == [KeySlice(5, (2,))]
    empty = KeyImages(hu, np.zeros_like(labels), (0.5, 0.5), 3.0)
    assert select_key_slices(empty) == [KeySlice(5, ())]


def test_orientation_label_names_the_patient_direction_an_edge_faces():
    assert [orientation_label(v) for v in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))] == [
        "L", "R", "P", "A", "H", "F",
    ]  # fmt: skip
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    assert orientation_label((c, -s, 0)) == "LA"  # a 20 degree oblique row: strongest first
    assert orientation_label((0.1, 0.99, 0.0)) == "P"  # components under 0.25 are left out


def _letters_at(data: bytes, page: int) -> dict[str, list[tuple[float, float]]]:
    """Where single capital letters are drawn on a PDF page (x right, y up, points)."""
    found: dict[str, list[tuple[float, float]]] = {}

    def visit(text, cm, tm, font, size):
        if len(text.strip()) in (1, 2) and text.strip().isupper():
            found.setdefault(text.strip(), []).append((cm[4] + tm[4], cm[5] + tm[5]))

    PdfReader(io.BytesIO(data)).pages[page].extract_text(visitor_text=visit)
    return found


@pytest.mark.parametrize("flip_columns", [False, True])
def test_key_images_carry_orientation_letters_on_the_right_edges(report_and_images, flip_columns):
    report, images = report_and_images
    along_i = (-1.0, 0.0, 0.0) if flip_columns else (1.0, 0.0, 0.0)  # flipped: the image's right is the patient's
    coronary = dataclasses.replace(images["coronary"], in_plane_directions_lps=(along_i, (0.0, 1.0, 0.0)))
    data = render_report_pdf({**report, "paths": {"coronary": report["paths"]["coronary"]}}, {"coronary": coronary})
    letters = _letters_at(data, len(PdfReader(io.BytesIO(data)).pages) - 1)  # the key-image page is last
    assert {"R", "L", "A", "P"} <= letters.keys(), letters
    n = len(letters["R"])
    assert n >= 2 and all(len(letters[c]) == n for c in "LAP")  # every image, whole slice and enlarged, has all four
    for (rx, _), (lx, _), (_, ay), (_, py) in zip(letters["R"], letters["L"], letters["A"], letters["P"], strict=True):
        assert (rx > lx) if flip_columns else (rx < lx)  # right: on the viewer's left unless the columns run R
        assert ay > py  # anterior at the top
    plain = render_report_pdf({**report, "paths": {"coronary": report["paths"]["coronary"]}}, images)
    assert "R" not in _letters_at(plain, len(PdfReader(io.BytesIO(plain)).pages) - 1)  # no directions, no letters


def test_bad_input_raises_a_clear_value_error(report_and_images, chest_series):
    report, images = report_and_images
    with pytest.raises(ValueError, match="no key images"):
        render_report_pdf(report, {"ica": images["ica"]})
    with pytest.raises(ValueError, match="unknown report paths"):
        render_report_pdf({**report, "paths": {"liver": None}}, images)
    with pytest.raises(ValueError, match="same 3D shape|one 3D shape"):
        KeyImages(np.zeros((2, 3, 3)), np.zeros((2, 3, 4), dtype=np.uint8), (1.0, 1.0), 1.0)
    with pytest.raises(ValueError, match="two LPS unit vectors"):
        dataclasses.replace(images["coronary"], in_plane_directions_lps=((2.0, 0.0, 0.0), (0.0, 1.0, 0.0)))
    wrong_labels = KeyImages(images["coronary"].hu, images["coronary"].labels * 9, (1.0, 1.0), 1.0)
    with pytest.raises(ValueError, match="segments 1..4"):
        render_report_pdf(report, {**images, "coronary": wrong_labels})
    with pytest.raises(ValueError, match="not a PDF"):
        build_pdf_dataset(chest_series[0][0], b"hello", title="x", algorithm=ALGORITHM)


@pytest.fixture(scope="module")
def written(pdf, chest_series, tmp_path_factory) -> tuple[Path, list[pydicom.Dataset], bytes]:
    datasets, _ = chest_series
    odd = pdf if len(pdf) % 2 else pdf + b"\n"  # exercise the padding rule (PDF readers ignore trailing bytes)
    path = write_pdf(
        datasets[0],
        odd,
        tmp_path_factory.mktemp("pdf") / "report.dcm",
        title="CalciMap calcium report",
        algorithm=ALGORITHM,
        referenced_series=[(datasets[0].SeriesInstanceUID, datasets)],
    )
    return path, datasets, odd


def test_encapsulated_pdf_has_no_dciodvfy_errors_or_warnings(written):
    path, _, _ = written
    out = subprocess.run([need_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    problems = [line for line in lines if "Error" in line or "Warning" in line]
    assert not problems, "\n".join(lines)


def test_encapsulated_pdf_reads_back_as_the_same_pdf_in_the_source_study(written):
    path, datasets, odd = written
    assert len(odd) % 2 == 1
    ds = pydicom.dcmread(path)
    source = datasets[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and ds.Modality == "DOC"
    assert ds.EncapsulatedDocumentLength == len(odd)
    assert bytes(ds.EncapsulatedDocument) == odd + b"\x00"
    assert bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength] == odd
    assert (ds.StudyInstanceUID, ds.PatientID, ds.PatientName) == (
        source.StudyInstanceUID,
        source.PatientID,
        source.PatientName,
    )
    assert (ds.ContentDate, ds.ContentTime[:6]) == (source.SeriesDate, source.SeriesTime[:6])
    code = ds.ConceptNameCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("18748-4", "LN")
    assert [i.ReferencedSOPInstanceUID for i in ds.SourceInstanceSequence] == [d.SOPInstanceUID for d in datasets]
    assert ds.BurnedInAnnotation == "YES" and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert len(PdfReader(io.BytesIO(bytes(ds.EncapsulatedDocument))).pages) == 4


def test_encapsulated_pdf_uids_are_stable_and_new(written, tmp_path):
    path, datasets, odd = written
    first = pydicom.dcmread(path)
    again = write_pdf(
        datasets[0],
        odd,
        tmp_path / "again.dcm",
        title="CalciMap calcium report",
        algorithm=ALGORITHM,
        referenced_series=[(datasets[0].SeriesInstanceUID, datasets)],
    )
    assert again.read_bytes() == path.read_bytes()
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == pdf_uids(datasets[0].StudyInstanceUID, ALGORITHM)
    source_uids = {datasets[0].SeriesInstanceUID, *(d.SOPInstanceUID for d in datasets)}
    assert first.SeriesInstanceUID not in source_uids and first.SOPInstanceUID not in source_uids
    other = pdf_uids(datasets[0].StudyInstanceUID, Algorithm("CalciMap", "0.2.0"))
    assert other[0] != first.SeriesInstanceUID


def test_referenced_series_must_match_its_images(chest_series, pdf):
    datasets, _ = chest_series
    with pytest.raises(ValueError, match="was listed under"):
        build_pdf_dataset(datasets[0], pdf, title="r", algorithm=ALGORITHM, referenced_series=[("1.2.3", datasets)])
