"""deploy_app/selection.py + configs/series_selection.json: which series feeds the coronary and the ICA path.

Studies are small phantom series written with different tags (thickness, kVp, kernel, contrast, body part,
descriptions), a real phantom chest + head study, and the real scanner series. The SDK-format conditions are
run through the SDK's own matcher (DICOMSeriesSelectorOperator) on the same files.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage

from deploy_app.selection import (
    DEFAULT_RULES,
    SeriesChoice,
    acquisition_facts,
    check_conditions,
    explain_selection,
    group_by_series,
    load_rules,
    select_series,
)
from phantoms.dicom_series import derive_uid, write_ct_series
from phantoms.geometry import Grid
from phantoms.head import make_head_case
from phantoms.writers import write_case

STUDY_UID = derive_uid("test-app-selection")
CHEST = {
    "BodyPartExamined": "CHEST",
    "StudyDescription": "CT Heart Calcium Score",
    "SeriesDescription": "Cardiac Ca Score 3.0 non-contrast",
    "SliceThickness": 3.0,
    "KVP": 120,
    "ConvolutionKernel": "B35f",
}
HEAD = {
    "BodyPartExamined": "HEAD",
    "StudyDescription": "CT Head without contrast",
    "SeriesDescription": "Head non-contrast",
    "SliceThickness": 3.0,
    "KVP": 120,
    "ConvolutionKernel": "H30s",
}


@pytest.fixture(scope="module")
def rules() -> dict:
    return load_rules()


class Study:
    """Writes small phantom series into one study folder and keeps their datasets by SeriesInstanceUID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.series: dict[str, list[pydicom.Dataset]] = {}
        self.uid_of: dict[str, str] = {}

    def add(self, name: str, number: int, tags: dict, coronal: bool = False) -> str:
        increment = float(tags.get("SliceThickness") or 3.0)
        grid = Grid((4, 16, 16), 0.7, increment, (-5.6, -5.6, 10.0 * number))
        if coronal:  # rows run from head to feet, slices step from front to back
            grid = Grid(grid.shape, 0.7, increment, grid.origin, col_cosine=(0, 0, -1), slice_step_dir=(0, 1, 0))
        volume = np.full(grid.shape, 40, dtype=np.int16)
        uid = derive_uid(STUDY_UID, name)
        out = self.root / name
        files = write_ct_series(volume, grid, out, study_uid=STUDY_UID, series_uid=uid, series_number=number, tags=tags)
        self.series[uid] = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        self.uid_of[name] = uid
        return uid


@pytest.fixture
def study(tmp_path) -> Study:
    return Study(tmp_path / "study")


def candidate(choice_or_list, uid: str) -> dict:
    candidates = choice_or_list.candidates if isinstance(choice_or_list, SeriesChoice) else choice_or_list
    (found,) = [c for c in candidates if c["series_uid"] == uid]
    return found


def test_default_rules_have_the_coronary_and_ica_selections(rules):
    assert DEFAULT_RULES.name == "series_selection.json" and DEFAULT_RULES.parent.name == "configs"
    assert [sel["name"] for sel in rules["selections"]] == ["coronary", "ica"]


def test_study_with_thick_thin_contrast_and_head_series(study, rules, caplog):
    thin = study.add("chest1", 2, {**CHEST, "SliceThickness": 1.0, "SeriesDescription": "Chest 1.0 B35f"})
    contrast = study.add(
        "contrast", 3, {**CHEST, "ContrastBolusAgent": "Iohexol 350", "SeriesDescription": "Chest 3.0 arterial"}
    )
    head = study.add("head", 4, HEAD)
    thick = study.add("chest3", 5, CHEST)
    with caplog.at_level(logging.INFO, logger="deploy_app.selection"):
        chosen = select_series(study.series, rules)

    coronary, ica = chosen["coronary"], chosen["ica"]
    assert coronary.series_uid == thick and coronary.standard and coronary.selection == "coronary"
    assert coronary.datasets == tuple(study.series[thick])
    assert "slice thickness 3 mm (target 3 mm)" in coronary.reasons
    assert "kernel B35f is soft" in coronary.reasons
    assert "not contrast-enhanced" in coronary.reasons
    assert len(coronary.candidates) == 4
    assert candidate(coronary, thick)["rank"] == 1
    assert candidate(coronary, thin)["matched"] and candidate(coronary, thin)["rank"] == 2
    assert candidate(coronary, thin)["standard"] is False
    rejected = candidate(coronary, contrast)
    assert not rejected["matched"] and rejected["rank"] is None
    assert any("contrast-enhanced (ContrastBolusAgent 'Iohexol 350'" in r for r in rejected["reasons"])
    assert "BodyPartExamined 'HEAD' does not show the chest or heart" in candidate(coronary, head)["reasons"]

    assert ica.series_uid == head and ica.standard
    assert [c["series_uid"] for c in ica.candidates if c["matched"]] == [head]
    assert "BodyPartExamined 'CHEST' does not show the head" in candidate(ica, thick)["reasons"]

    logged = caplog.text
    assert f"coronary: chose series 5 'Cardiac Ca Score 3.0 non-contrast' ({thick}) (standard)" in logged
    assert "ica: chose series 4" in logged
    assert "coronary: not series 3 'Chest 3.0 arterial'" in logged


def test_only_a_thin_chest_series_is_a_fallback_naming_its_thickness(study, rules):
    thin = study.add("chest1", 2, {**CHEST, "SliceThickness": 1.0})
    chosen = select_series(study.series, rules)
    assert chosen["coronary"].series_uid == thin
    assert chosen["coronary"].standard is False
    assert "non-standard acquisition: slice thickness 1 mm (standard 2.5-3 mm)" in chosen["coronary"].reasons
    assert chosen["ica"] is None


@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [
        ({"SliceThickness": 1.5}, {"SliceThickness": 2.5}, "second"),  # 2.5 is standard, 1.5 a fallback
        ({"SliceThickness": 2.5}, {"SliceThickness": 3.0}, "second"),  # both standard: closest to 3 mm first
        ({"ConvolutionKernel": "B46f"}, {"ConvolutionKernel": "B35f"}, "second"),  # sharp loses to soft
        ({"KVP": 100}, {"KVP": 120}, "second"),  # 100 kVp is not standard
        ({"SliceThickness": 1.0, "KVP": 100}, {"SliceThickness": 1.0, "KVP": 120}, "second"),  # fallbacks: 120 kVp
        ({"SliceThickness": 0.6, "ConvolutionKernel": "B46f"}, {"SliceThickness": 0.6}, "second"),  # fallbacks: soft
        ({}, {}, "first"),  # all equal: the lower series number
    ],
)
def test_preferences_rank_matching_chest_series(study, rules, first, second, winner):
    uids = {
        "first": study.add("first", 1, {**CHEST, **first}),
        "second": study.add("second", 2, {**CHEST, **second}),
    }
    chosen = select_series(study.series, rules)["coronary"]
    assert chosen.series_uid == uids[winner]
    loser = candidate(chosen, uids["first" if winner == "second" else "second"])
    assert loser["matched"] and loser["rank"] == 2 and "ranked 2 of 2" in loser["reasons"]


def test_sharp_kernel_loser_says_why(study, rules):
    study.add("sharp", 1, {**CHEST, "ConvolutionKernel": "B46f"})
    soft = study.add("soft", 2, CHEST)
    chosen = select_series(study.series, rules)["coronary"]
    assert chosen.series_uid == soft and chosen.standard
    sharp = candidate(chosen, study.uid_of["sharp"])
    assert "non-standard acquisition: sharp kernel 'B46f'" in sharp["reasons"]
    assert "kernel B46f is sharp" in sharp["reasons"]


def test_neither_path_for_lung_abdomen_and_mr_series_with_reasons(study, rules, caplog):
    lung = study.add(
        "lung", 1, {**CHEST, "SeriesDescription": "Lung 1.0 B70f", "ConvolutionKernel": "B70f", "SliceThickness": 1.0}
    )
    abdomen = study.add(
        "abdomen", 2, {"BodyPartExamined": "ABDOMEN", "SeriesDescription": "Abdomen 3.0", "SliceThickness": 3.0}
    )
    mr = study.add("mr", 3, {**HEAD, "SeriesDescription": "T1 axial"})
    for ds in study.series[mr]:
        ds.Modality = "MR"
    with caplog.at_level(logging.INFO, logger="deploy_app.selection"):
        assert select_series(study.series, rules) == {"coronary": None, "ica": None}
    explained = explain_selection(study.series, rules)
    assert all(not c["matched"] and c["rank"] is None for cs in explained.values() for c in cs)
    lung_reasons = candidate(explained["coronary"], lung)["reasons"]
    assert lung_reasons == ["a lung reconstruction (SeriesDescription 'Lung 1.0 B70f', ConvolutionKernel 'B70f')"]
    assert candidate(explained["coronary"], abdomen)["reasons"] == [
        "BodyPartExamined 'ABDOMEN' does not show the chest or heart"
    ]
    assert "Modality 'MR' does not match '(?i)^CT$'" in candidate(explained["ica"], mr)["reasons"]
    text = caplog.text
    assert f"coronary: not series 1 'Lung 1.0 B70f' ({lung}): a lung reconstruction (SeriesDescription" in text
    assert f"coronary: not series 2 'Abdomen 3.0' ({abdomen}): BodyPartExamined 'ABDOMEN' does not show" in text
    assert f"ica: not series 3 'T1 axial' ({mr}): Modality 'MR' does not match '(?i)^CT$'" in text
    assert "coronary: no series matches, so this path is skipped (3 series considered)" in text
    assert "ica: no series matches, so this path is skipped (3 series considered)" in text


def test_real_ct_is_neither_chest_nor_head(real_ct_dir, rules, caplog):
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(real_ct_dir.iterdir())]
    with caplog.at_level(logging.INFO, logger="deploy_app.selection"):
        assert select_series({"real": datasets}, rules) == {"coronary": None, "ica": None}
    assert "BodyPartExamined 'PARTIALBODY' does not show the chest or heart" in caplog.text
    assert "contrast-enhanced (ContrastBolusAgent 'APPLIED')" in caplog.text
    assert acquisition_facts(datasets[0]) == {"thickness_mm": 3.0, "kvp": 120.0, "kernel": "Br38f"}


def test_phantom_chest_and_head_cases_select_themselves(chest_case, tmp_path, rules):
    head_case = make_head_case(0, 1, "small", tilt_deg=20, calcium="both")
    series = {}
    for number, case in enumerate((chest_case, head_case), start=1):
        folder = write_case(case, tmp_path, dicom=True, study_key="one study", series_number=number) / "dicom"
        datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
        series[datasets[0].SeriesInstanceUID] = datasets
    chosen = select_series(series, rules)
    assert chosen["coronary"].datasets[0].BodyPartExamined == "HEART"
    assert chosen["ica"].datasets[0].BodyPartExamined == "HEAD"  # tilted 20 deg: still an axial series
    # The phantoms' own protocol decides standard vs fallback exactly as the scorer would.
    from bundles.s2cac_coronary_calcium.scripts import scoring

    for choice in chosen.values():
        facts = acquisition_facts(choice.datasets[0])
        assert choice.standard == (scoring.acquisition_note(**facts) is None)


def test_a_zero_thickness_or_kvp_is_not_recorded_and_the_series_still_goes_through_the_checks(study, rules):
    """Some exports write 0 for an unknown SliceThickness or KVP: no measurement, so a fallback the checks can judge
    (before, 0 reached the acquisition check, which raised, and the run ended with no reports)."""
    from deploy_app import quality

    uid = study.add("chest3", 5, {**CHEST, "SliceThickness": 0, "KVP": 0})
    (ds, *_) = study.series[uid]
    assert float(ds.SliceThickness) == 0 and float(ds.KVP) == 0
    facts = acquisition_facts(ds)
    assert facts == {"thickness_mm": None, "kvp": None, "kernel": "B35f"}
    chosen = select_series(study.series, rules)["coronary"]
    assert chosen.series_uid == uid and not chosen.standard
    findings = quality.check_acquisition("coronary", facts["thickness_mm"], 3.0, facts["kvp"], facts["kernel"],
                                         quality.load_limits())  # fmt: skip
    assert [(f.passed, f.blocking) for f in findings] == [(True, True)]
    assert "slice thickness not recorded" in findings[0].detail and "kVp not recorded" in findings[0].detail


def test_multiframe_ct_headers_are_read_from_functional_groups(study, rules, tmp_path):
    uid = study.add("chest3", 5, CHEST)
    full = [pydicom.dcmread(p) for p in sorted((study.root / "chest3").iterdir())]
    mf = LegacyConvertedEnhancedCTImage(
        full,
        series_instance_uid=derive_uid(uid, "mf"),
        series_number=6,
        sop_instance_uid=derive_uid(uid, "mf", "1"),
        instance_number=1,
    )
    assert "SliceThickness" not in mf and "KVP" not in mf and "ImageOrientationPatient" not in mf
    assert acquisition_facts(mf) == {"thickness_mm": 3.0, "kvp": 120.0, "kernel": "B35f"}
    chosen = select_series({mf.SeriesInstanceUID: [mf]}, rules)["coronary"]
    assert chosen is not None and chosen.standard and chosen.datasets == (mf,)


def test_choice_does_not_depend_on_the_order_of_series(study, rules):
    for number, thickness in enumerate((1.0, 3.0, 2.5, 5.0), start=1):
        study.add(f"chest{number}", number, {**CHEST, "SliceThickness": thickness})
    forward = select_series(study.series, rules)["coronary"].series_uid
    backward = select_series(dict(reversed(list(study.series.items()))), rules)["coronary"].series_uid
    assert forward == backward == study.uid_of["chest2"]


def test_group_by_series(study):
    a = study.add("a", 1, CHEST)
    b = study.add("b", 2, HEAD)
    mixed = study.series[b][::-1] + study.series[a]
    grouped = group_by_series(mixed)
    assert list(grouped) == [b, a] and len(grouped[a]) == 4
    broken = copy.deepcopy(study.series[a][0])
    broken.SeriesInstanceUID = ""
    with pytest.raises(ValueError, match="has no SeriesInstanceUID"):
        group_by_series([broken])


# ------------------------------------------------------------------------------------------------------------------
# The SDK-format conditions behave like the SDK's own matcher
# ------------------------------------------------------------------------------------------------------------------

SDK_CONDITIONS = [
    {"Modality": "(?i)CT"},
    {"Modality": "CT", "BodyPartExamined": "(?i)^head$"},
    {"BodyPartExamined": "chest"},  # equality ignoring case
    {"SeriesDescription": "(?i)non-contrast"},
    {"SeriesDescription": "^Chest"},
    {"ImageType": ["PRIMARY", "ORIGINAL", "AXIAL"]},
    {"ImageType": ["PRIMARY", "!SECONDARY"]},
    {"ImageType": ["ORIGINAL", "!AXIAL"]},
    {"ImageType": "!LOCALIZER"},
    {"SliceThickness": [2, ">"]},
    {"SliceThickness": [3, ">="]},
    {"SliceThickness": [3, "<"]},
    {"SliceThickness": [1, "!="]},
    {"SliceThickness": [2.5, 3]},
    {"SliceThickness": 3},
    {"SliceThickness": "3(\\.0+)?"},
    {"KVP": 120},
    {"KVP": [100, "<="]},
    {"ConvolutionKernel": "(?i)^B3"},
    {"ContrastBolusAgent": "(?i)iohexol"},
    {"ImageOrientationPatient": "Axial"},
    {"ImageOrientationPatient": "Coronal"},
    {"Modality": "(?i)CT", "SliceThickness": [2, ">"], "KVP": [110, 130], "ImageType": ["PRIMARY", "!DERIVED"]},
]


def test_conditions_match_the_sdk_matcher_on_the_same_series(study):
    study.add("chest3", 1, CHEST)
    study.add("chest1", 2, {**CHEST, "SliceThickness": 1.0, "SeriesDescription": "Chest 1.0", "KVP": 100})
    study.add("contrast", 3, {**CHEST, "ContrastBolusAgent": "Iohexol", "ConvolutionKernel": "I40f"})
    study.add("head", 4, {**HEAD, "ImageType": ["ORIGINAL", "SECONDARY", "REFORMATTED"], "SliceThickness": 5.0})
    study.add("coronal", 5, {**CHEST, "SeriesDescription": "Chest coronal", "SliceThickness": 2.5}, coronal=True)

    from monai.deploy.core import Fragment
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

    fragment = Fragment()
    (sdk_study,) = DICOMDataLoaderOperator(fragment, name="loader").load_data_to_studies(study.root)
    selector = DICOMSeriesSelectorOperator(fragment, name="selector")
    ours_by_condition, sdk_by_condition = [], []
    for conditions in SDK_CONDITIONS:
        sdk = selector._select_series(conditions, sdk_study, all_matched=True)
        sdk_by_condition.append(sorted(str(s.SeriesInstanceUID) for s in sdk))
        ours = [uid for uid, datasets in study.series.items() if not check_conditions(datasets[0], conditions)]
        ours_by_condition.append(sorted(ours))
    assert ours_by_condition == sdk_by_condition
    assert sum(0 < len(o) < len(study.series) for o in ours_by_condition) >= 15  # the conditions discriminate


@pytest.mark.parametrize("path", ["coronary", "ica"])
def test_contrast_agent_entries_that_say_none_do_not_exclude_a_series(rules, path):
    """ContrastBolusAgent as scanners and technologists fill it: the ones that say no agent was given pass."""
    (selection,) = [sel for sel in rules["selections"] if sel["name"] == path]
    (item,) = [item for item in selection["exclude"] if item["label"] == "contrast-enhanced"]
    (agent,) = [cond for cond in item["any"] if "ContrastBolusAgent" in cond]
    for none in ("NONE", "None given", "no", "NO CONTRAST", "No contrast agent", "N/A", "nil", "-", "0", "Nativ",
                 "non-contrast", "Without contrast", "unenhanced"):  # fmt: skip
        ds = pydicom.Dataset()
        ds.ContrastBolusAgent = none
        assert check_conditions(ds, agent) != [], f"{none!r} read as an agent"
    for given in ("Iohexol 350", "APPLIED", "Omnipaque", "YES", "IV contrast", "Contrast 80 ml", "oral"):
        ds = pydicom.Dataset()
        ds.ContrastBolusAgent = given
        assert check_conditions(ds, agent) == [], f"{given!r} not read as an agent"


def test_documented_differences_from_the_sdk_matcher(study):
    uid = study.add("chest3", 1, CHEST)
    ds = study.series[uid][0]
    # The SDK treats an attribute value 0 as missing; GantryDetectorTilt 0 matches "< 5" here.
    assert float(ds.GantryDetectorTilt) == 0.0 and check_conditions(ds, {"GantryDetectorTilt": [5, "<"]}) == []
    # Whole values, not substrings of the printed list: "PRIM" is not a value of ImageType.
    assert check_conditions(ds, {"ImageType": ["PRIM"]}) == [
        "ImageType 'ORIGINAL\\\\PRIMARY\\\\AXIAL' does not match ['PRIM']"
    ]
    # A list condition on a single-valued attribute is a list of one (the SDK raises AttributeError).
    assert check_conditions(ds, {"BodyPartExamined": ["CHEST", "!HEAD"]}) == []
    assert check_conditions(ds, {"ContrastBolusAgent": "(?i)."}) == ["ContrastBolusAgent is not recorded"]


# ------------------------------------------------------------------------------------------------------------------
# Bad rules files
# ------------------------------------------------------------------------------------------------------------------


def _edit(rules: dict, path: list, value) -> dict:
    out = copy.deepcopy(rules)
    target = out
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["selections"], [], 'non-empty "selections" list'),
        (["selections"], _DELETE, 'non-empty "selections" list'),
        (["colour"], "blue", "unknown top-level keys ['colour']"),
        (["selections", 0, "name"], "", "selection 1 has no name"),
        (["selections", 1, "name"], "coronary", "selection names must be unique"),
        (["selections", 0, "conditions"], {}, "conditions must be a non-empty object"),
        (["selections", 0, "conditions", "Modality"], "(?i)(CT", "not a valid regular expression"),
        (["selections", 0, "conditions", "Modality"], "", "is empty (the SDK would silently ignore it"),
        (["selections", 0, "conditions", "SliceThickness"], ["3", ">"], "use [number, one of"),
        (["selections", 0, "conditions", "SliceThickness"], [3, "=="], "use [number, one of"),
        (["selections", 0, "conditions", "ImageOrientationPatient"], "Oblique", "must be one of"),
        (["selections", 0, "conditions", "Slice Thickness"], 3, "is not a DICOM keyword"),
        (["selections", 0, "speed"], 1, "unknown keys ['speed']"),
        (["selections", 0, "region", "first_present"], [], "first_present must be a non-empty list"),
        (["selections", 0, "exclude", 0, "any"], "x", "exclude items must be objects"),
        (["selections", 0, "standard", "kvp"], 130.0, "the scorer uses 120.0"),
        (["selections", 0, "standard", "slice_thickness_mm"], [2.0, 3.0], "defined once, in bundles/"),
        (["selections", 0, "prefer", 0, "closest_to"], ["three"], "closest_to must be a list of numbers"),
        (["selections", 0, "prefer", 0], {"attribute": "KVP"}, "give closest_to, matches or soft_kernel"),
        # keys inside items, which were accepted and ignored
        (["selections", 0, "region", "fallback"], "chest", "region has unknown keys ['fallback']"),
        (["selections", 0, "exclude", 0, "all"], [{"Modality": "CT"}], "unknown keys ['all']"),
        (["selections", 0, "prefer", 0, "unit_"], "mm", "unknown keys ['unit_']"),
        (["selections", 0, "prefer", 0, "matches"], "(?i)x", "one of ['closest_to', 'soft_kernel', 'matches']"),
    ],
)
def test_bad_rules_raise_value_error(rules, tmp_path, path, value, message):
    bad = tmp_path / "rules.json"
    bad.write_text(json.dumps(_edit(rules, path, value)))
    with pytest.raises(ValueError) as info:
        load_rules(bad)
    assert message in str(info.value) and str(bad) in str(info.value)


def test_unreadable_rules_files_raise_value_error(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"selections": [')
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_rules(broken)
    with pytest.raises(ValueError, match="cannot be read"):
        load_rules(tmp_path / "missing.json")
