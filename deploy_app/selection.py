"""Which series of a study feeds which path: non-contrast chest/cardiac CT -> coronary, non-contrast head CT -> ICA.

The rules live in ``configs/series_selection.json``, in the MONAI Deploy App SDK's selection format
(``{"selections": [{"name": ..., "conditions": {...}}]}``, ``DICOMSeriesSelectorOperator``) extended where it
falls short. Per selection:

- ``conditions`` (SDK format, all must hold): a string is matched case-insensitively, first for equality, then as
  a regular expression searched anywhere in the value; a list matches a multi-valued attribute (each term must be
  present, a ``!term`` must be absent); a number matches numerically, ``[value, op]`` with op one of
  ``> >= < <= !=``, ``[min, max]`` an inclusive range, a string a regular expression over the whole number;
  ``"ImageOrientationPatient": "Axial" | "Coronal" | "Sagittal"`` matches the main axis of the slice normal.
  A missing or empty attribute does not match.
- ``region`` (extension): ``{"label": ..., "first_present": [{keyword: condition}, ...]}``: the first of these
  attributes that the series has decides whether it shows the region (series-level tags first, so that a head
  series in a study described as "CT Heart" is not taken for a chest series).
- ``exclude`` (extension): ``[{"label": ..., "any": [{keyword: condition}, ...]}]``: a series matching any
  condition of an item is rejected, e.g. a contrast agent recorded or a lung-kernel reconstruction.
- ``standard`` (extension): what a standard Agatston acquisition is. The definition is the scorer's
  (``scoring.acquisition_note``: slice thickness 2.5-3.0 mm, 120 kVp, a kernel that is not sharp), so that the
  selection and the SR never disagree; the block states those values and :func:`load_rules` checks that they
  equal the scorer's. A series whose thickness, kVp or kernel is not recorded is not standard.
- ``prefer`` (extension): ranking of the matching series, criteria in order after "standard first":
  ``{"attribute": K, "closest_to": [t1, t2, ...]}`` (nearest target, ties to the earlier target; optional
  ``label`` and ``unit`` for the reason), ``{"attribute": "ConvolutionKernel", "soft_kernel": true}`` (not sharp
  by the scorer's ``is_sharp_kernel`` first) and ``{"attribute": K, "label": ..., "matches": condition}``
  (matching first). Then more images, then the lower series number, then the UID (a deterministic choice).

Differences from the SDK's matcher (``_select_series``), on purpose: it searches the printed list
(``"['ORIGINAL', 'PRIMARY']"``) for substrings, so the term ``PRIMARY`` would also match ``NONPRIMARY``; we compare
whole values, case-insensitively, for a list condition and a ``!term``, and apply the string rule to each value
for a single string condition (so a regular expression works on a multi-valued ConvolutionKernel such as
``Br38f\\3``). It treats an attribute value 0 (e.g. GantryDetectorTilt 0) as missing; we do not. It fails with
AttributeError when a list condition meets a single-valued attribute; we treat the value as a list of one. It
ignores empty conditions; :func:`load_rules` rejects them. Its orientation check needs PatientPosition; ours does
not. Both read the first instance of a series; it never looks into the functional groups of a multi-frame object,
we do (shared, then the first frame's) when an attribute is not at the top level. Otherwise the semantics are the
SDK's; ``tests/test_app_selection.py`` runs both on the same series.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from bundles.s2cac_coronary_calcium.scripts import scoring

logger = logging.getLogger(__name__)

DEFAULT_RULES = Path(__file__).resolve().parents[1] / "configs" / "series_selection.json"
SELECTION_NAMES = ("coronary", "ica")
RELATIONS = (">", ">=", "<", "<=", "!=")
ORIENTATIONS = ("Sagittal", "Coronal", "Axial")  # main axis of the slice normal: x, y, z
_SELECTION_KEYS = {"name", "description", "conditions", "region", "exclude", "standard", "prefer"}
_REGION_KEYS, _EXCLUDE_KEYS = {"label", "first_present"}, {"label", "any"}
_PREFER_KINDS = ("closest_to", "soft_kernel", "matches")  # one per criterion
_PREFER_KEYS = {"attribute", "label", "unit", *_PREFER_KINDS}


def _check_keys(item: dict, allowed: set[str], where: str) -> None:
    """Unknown keys would be ignored in silence (a typo, or a key that belongs to another kind of item)."""
    unknown = set(item) - allowed
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")


@dataclass(frozen=True)
class SeriesChoice:
    """The series chosen for one selection, whether it is a standard acquisition, and why."""

    selection: str  # "coronary" | "ica"
    series_uid: str
    datasets: tuple[Dataset, ...]  # what the caller passed for the chosen series
    standard: bool  # False: a fallback, scored and labelled "Agatston-equivalent"
    reasons: tuple[str, ...]  # human-readable: why it matched and how it ranked
    candidates: tuple[dict, ...]  # every series considered: series_uid, series_number, description, matched,
    # standard, rank (1 = chosen, None when not matched), reasons


# ---------------------------------------------------------------------------------------------------------------
# Rules file
# ---------------------------------------------------------------------------------------------------------------


def _fail(path: Path | str, what: str) -> ValueError:
    return ValueError(f"series selection rules {path}: {what}")


def _check_condition_value(keyword: str, value: Any, where: str) -> None:
    if value is None or value == "" or value == []:
        raise ValueError(f"{where}: condition {keyword!r} is empty (the SDK would silently ignore it; remove it)")
    if isinstance(value, bool) or not isinstance(value, str | int | float | list):
        raise ValueError(f"{where}: condition {keyword!r} must be a string, a number or a list, not {value!r}")
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{where}: condition {keyword!r} is not a valid regular expression: {exc}") from exc
    if isinstance(value, list):
        if not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{where}: condition {keyword!r} must list strings or numbers, not {value!r}")
        if len(value) == 2 and isinstance(value[1], str) and value[1] in RELATIONS + ("=", "==", "<>"):
            if value[1] not in RELATIONS or isinstance(value[0], str):
                raise ValueError(f"{where}: condition {keyword!r} {value!r}: use [number, one of {list(RELATIONS)}]")
    if (
        keyword == "ImageOrientationPatient"
        and isinstance(value, str)
        and value.strip().capitalize() not in ORIENTATIONS
    ):
        raise ValueError(f"{where}: ImageOrientationPatient must be one of {list(ORIENTATIONS)}, not {value!r}")


def _check_conditions(conditions: Any, where: str) -> None:
    if not isinstance(conditions, dict) or not conditions:
        raise ValueError(f"{where} must be a non-empty object of DICOM keyword -> condition")
    for keyword, value in conditions.items():
        if not isinstance(keyword, str) or not keyword.isidentifier():
            raise ValueError(f"{where}: {keyword!r} is not a DICOM keyword")
        _check_condition_value(keyword, value, where)


def _check_selection(sel: Any, index: int) -> None:
    where = f"selection {index + 1}"
    if not isinstance(sel, dict):
        raise ValueError(f"{where} must be an object")
    unknown = set(sel) - _SELECTION_KEYS
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)} (allowed: {sorted(_SELECTION_KEYS)})")
    if not isinstance(sel.get("name"), str) or not sel["name"].strip():
        raise ValueError(f"{where} has no name")
    where = f"selection {sel['name']!r}"
    _check_conditions(sel.get("conditions"), f"{where} conditions")
    region = sel.get("region")
    if region is not None:
        if not isinstance(region, dict) or not isinstance(region.get("label"), str):
            raise ValueError(f"{where} region must be an object with a label and first_present")
        _check_keys(region, _REGION_KEYS, f"{where} region")
        items = region.get("first_present")
        if not isinstance(items, list) or not items:
            raise ValueError(f"{where} region.first_present must be a non-empty list of conditions")
        for item in items:
            _check_conditions(item, f"{where} region")
            if len(item) != 1:
                raise ValueError(f"{where} region: each first_present entry names one attribute, not {item!r}")
    exclude = sel.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"{where} exclude must be a list")
    for item in exclude:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("label"), str)
            or not isinstance(item.get("any"), list)
        ):
            raise ValueError(f"{where} exclude items must be objects with a label and an 'any' list of conditions")
        _check_keys(item, _EXCLUDE_KEYS, f"{where} exclude {item['label']!r}")
        for cond in item["any"]:
            _check_conditions(cond, f"{where} exclude {item['label']!r}")
    _check_standard(sel.get("standard"), where)
    prefer = sel.get("prefer", [])
    if not isinstance(prefer, list):
        raise ValueError(f"{where} prefer must be a list")
    for item in prefer:
        if not isinstance(item, dict) or not isinstance(item.get("attribute"), str):
            raise ValueError(f"{where} prefer items must be objects with an attribute, not {item!r}")
        _check_keys(item, _PREFER_KEYS, f"{where} prefer {item['attribute']}")
        kinds = [kind for kind in _PREFER_KINDS if kind in item]
        if len(kinds) > 1:
            raise ValueError(f"{where} prefer {item['attribute']}: one of {list(_PREFER_KINDS)} per item, not {kinds}")
        if "closest_to" in item:
            targets = item["closest_to"]
            if not isinstance(targets, list) or not targets or not all(_is_number(t) for t in targets):
                raise ValueError(f"{where} prefer {item['attribute']}: closest_to must be a list of numbers")
        elif item.get("soft_kernel") is True:
            pass
        elif "matches" in item:
            if not isinstance(item.get("label"), str):
                raise ValueError(f"{where} prefer {item['attribute']}: a 'matches' criterion needs a label")
            _check_condition_value(item["attribute"], item["matches"], f"{where} prefer")
        else:
            raise ValueError(f"{where} prefer {item['attribute']}: give closest_to, matches or soft_kernel: true")


def _check_standard(standard: Any, where: str) -> None:
    """The block must state the scorer's definition, so that selection and SR agree (see the module docstring)."""
    if standard is None:
        return
    expected = {
        "definition": "scoring.acquisition_note",
        "slice_thickness_mm": list(scoring.STANDARD_THICKNESS_RANGE_MM),
        "kvp": scoring.STANDARD_KVP,
        "sharp_kernel_words": list(scoring.SHARP_KERNEL_WORDS),
        "sharp_kernel_min_number": scoring.SHARP_KERNEL_MIN_NUMBER,
    }
    if not isinstance(standard, dict) or set(standard) - {"description"} != set(expected):
        raise ValueError(f"{where} standard must have exactly the keys {sorted(expected)} (and a description)")
    for key, value in expected.items():
        if standard[key] != value:
            raise ValueError(
                f"{where} standard {key} is {standard[key]!r} but the scorer uses {value!r}: the standard "
                "acquisition is defined once, in bundles/s2cac_coronary_calcium/scripts/scoring.py"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_rules(path: Path | None = None) -> dict:
    """The selection rules (default ``configs/series_selection.json``), validated; ValueError on a bad file."""
    path = Path(path) if path is not None else DEFAULT_RULES
    try:
        rules = json.loads(path.read_text())
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise _fail(path, f"is not valid JSON ({exc})") from exc
    try:
        validate_rules(rules)
    except ValueError as exc:
        raise _fail(path, str(exc)) from exc
    return rules


def validate_rules(rules: Any) -> None:
    """Raise ValueError unless ``rules`` is a valid selection rule set (see the module docstring)."""
    if not isinstance(rules, dict) or not isinstance(rules.get("selections"), list) or not rules["selections"]:
        raise ValueError('expected an object with a non-empty "selections" list')
    unknown = set(rules) - {"selections", "description"}
    if unknown:
        raise ValueError(f"unknown top-level keys {sorted(unknown)} (allowed: description, selections)")
    for index, sel in enumerate(rules["selections"]):
        _check_selection(sel, index)
    names = [sel["name"] for sel in rules["selections"]]
    if len(set(names)) != len(names):
        raise ValueError(f"selection names must be unique, got {names}")


# ---------------------------------------------------------------------------------------------------------------
# Attribute values and the SDK-style condition matcher
# ---------------------------------------------------------------------------------------------------------------


def _element_value(ds: Dataset, keyword: str) -> Any:
    if keyword in ds:
        value = ds[keyword].value
        if not isinstance(value, DicomSequence) and value not in (None, "") and not _empty_multi(value):
            return value
    return None


def _empty_multi(value: Any) -> bool:
    return isinstance(value, MultiValue | list) and len(value) == 0


def attribute(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword`` in ``ds``, None when absent or empty.

    For a multi-frame object the functional groups are searched when the top level lacks it: the shared
    groups first, then the first frame's (e.g. SliceThickness in PixelMeasuresSequence, KVP in
    CTXRayDetailsSequence or a Legacy Converted object's UnassignedSharedConvertedAttributesSequence).
    """
    value = _element_value(ds, keyword)
    if value is not None:
        return value
    for groups_keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(groups_keyword) or []
        if not len(groups):
            continue
        for element in groups[0]:
            if element.VR == "SQ" and len(element.value):
                value = _element_value(element.value[0], keyword)
                if value is not None:
                    return value
    return None


def _show(value: Any) -> str:
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _orientation(value: Any) -> str | None:
    """Main axis of the slice normal; None when the value is not six finite direction cosines with a normal."""
    try:
        cosines = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    if cosines.shape != (6,) or not np.all(np.isfinite(cosines)):
        return None
    normal = np.cross(cosines[:3], cosines[3:])
    if not np.any(normal):
        return None
    return ORIENTATIONS[int(np.argmax(np.abs(normal)))]


def _match_numeric(keyword: str, expected: Any, value: float) -> bool:
    if isinstance(expected, list):
        if len(expected) == 2 and isinstance(expected[1], str):
            bound, op = float(expected[0]), expected[1]
            return {
                ">": value > bound,
                ">=": value >= bound,
                "<": value < bound,
                "<=": value <= bound,
                "!=": value != bound,
            }[op]
        if len(expected) == 2 and all(_is_number(v) for v in expected):
            return expected[0] <= value <= expected[1]
        raise ValueError(f"condition {keyword!r} {expected!r} is not a numeric condition for the value {value!r}")
    if isinstance(expected, str):
        return re.fullmatch(expected, str(value)) is not None
    return expected == value


def _match_terms(expected: Any, values: Sequence[Any]) -> bool:
    """A multi-valued attribute: every listed term present (``!term`` absent), whole values, case-insensitive.

    A single string condition that is not a ``!term`` also matches when it matches any one value by the string
    rule (equal, or the regular expression found in it), so ``"(?i)^B[6-9]"`` works on a kernel ``B70f\\3``.
    """
    have = [str(v).strip() for v in values]
    folded = {v.casefold() for v in have}
    if isinstance(expected, str) and not expected.startswith("!"):
        return any(_match_text(expected, v) for v in have)
    terms = expected if isinstance(expected, list) else [expected]
    for term in (str(t).strip().casefold() for t in terms):
        if term.startswith("!"):
            if term[1:] in folded:
                return False
        elif term not in folded:
            return False
    return True


def _match_text(expected: str, text: str) -> bool:
    """The SDK's string rule: equal ignoring case, else the regular expression found anywhere (ignoring case)."""
    return text.casefold() == expected.casefold() or re.search(expected, text, re.IGNORECASE) is not None


def match_condition(keyword: str, expected: Any, value: Any) -> bool:
    """Whether an attribute ``value`` (None when absent) satisfies an SDK-format condition ``expected``."""
    if value is None:
        return False
    if keyword == "ImageOrientationPatient" and isinstance(expected, str):
        return _orientation(value) == expected.strip().capitalize()
    if isinstance(value, MultiValue | list | tuple):
        return _match_terms(expected, list(value))
    if _is_number(value):
        return _match_numeric(keyword, expected, value)
    text = str(value)
    if isinstance(expected, list):
        return _match_terms(expected, [text])
    return _match_text(str(expected), text)


def check_conditions(ds: Dataset, conditions: Mapping[str, Any]) -> list[str]:
    """Reasons why ``ds`` fails ``conditions`` (SDK semantics); an empty list when it matches them all."""
    failures = []
    for keyword, expected in conditions.items():
        value = attribute(ds, keyword)
        if value is None:
            failures.append(f"{keyword} is not recorded")
        elif not match_condition(keyword, expected, value):
            failures.append(f"{keyword} {_show(value)!r} does not match {expected!r}")
    return failures


# ---------------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------------


def _float(value: Any) -> float | None:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def acquisition_facts(ds: Dataset) -> dict[str, Any]:
    """Slice thickness (mm), kVp and kernel of a series as ``scoring.score_calcium`` takes them (None: unknown).

    A multi-valued ConvolutionKernel (Siemens writes e.g. ``Br38f\\3``) is judged by its first value, the name.
    A thickness or kVp of 0 or below is no measurement (some exports write 0 for "unknown"): None, as if absent.
    """
    kernel = attribute(ds, "ConvolutionKernel")
    if isinstance(kernel, MultiValue | list | tuple):
        kernel = kernel[0] if len(kernel) else None
    thickness, kvp = _float(attribute(ds, "SliceThickness")), _float(attribute(ds, "KVP"))
    return {
        "thickness_mm": thickness if thickness is not None and thickness > 0 else None,
        "kvp": kvp if kvp is not None and kvp > 0 else None,
        "kernel": str(kernel).strip() if kernel not in (None, "") else None,
    }


def _standard(ds: Dataset) -> tuple[bool, list[str]]:
    """Standard Agatston acquisition per the scorer, plus the facts as reasons."""
    facts = acquisition_facts(ds)
    missing = [name for name, value in facts.items() if value is None]
    note = scoring.acquisition_note(facts["thickness_mm"], facts["kvp"], facts["kernel"])
    reasons = []
    if note is None and not missing:
        lo, hi = scoring.STANDARD_THICKNESS_RANGE_MM
        reasons.append(f"standard acquisition ({lo:g}-{hi:g} mm, {scoring.STANDARD_KVP:g} kVp, kernel not sharp)")
    if note:
        reasons.append(f"non-standard acquisition: {note}")
    if missing:
        reasons.append(f"non-standard acquisition: {', '.join(missing)} not recorded")
    return note is None and not missing, reasons


def _region(ds: Dataset, region: Mapping[str, Any] | None) -> tuple[bool, str | None]:
    if region is None:
        return True, None
    for item in region["first_present"]:
        ((keyword, expected),) = item.items()
        value = attribute(ds, keyword)
        if value is None:
            continue
        if match_condition(keyword, expected, value):
            return True, f"{keyword} {_show(value)!r} shows {region['label']}"
        return False, f"{keyword} {_show(value)!r} does not show {region['label']}"
    keywords = ", ".join(next(iter(item)) for item in region["first_present"])
    return False, f"none of {keywords} is recorded, so {region['label']} cannot be recognised"


def _excluded(ds: Dataset, exclude: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(rejections, passes): an exclude item matched names the attribute; one not matched says 'not <label>'."""
    rejections, passes = [], []
    for item in exclude:
        hits = [
            f"{keyword} {_show(attribute(ds, keyword))!r}"
            for cond in item["any"]
            if not check_conditions(ds, cond)
            for keyword in cond
        ]
        if hits:
            rejections.append(f"{item['label']} ({', '.join(hits)})")
        else:
            passes.append(f"not {item['label']}")
    return rejections, passes


def _preference(ds: Dataset, item: Mapping[str, Any]) -> tuple[tuple[float, ...], str]:
    """Sort key (smaller is better) and reason of one ``prefer`` criterion."""
    keyword = item["attribute"]
    value = attribute(ds, keyword)
    if "closest_to" in item:
        targets = [float(t) for t in item["closest_to"]]
        number = _float(value)
        if number is None:
            return (math.inf, math.inf), f"{keyword} not recorded (targets {targets})"
        distances = [abs(number - t) for t in targets]
        best = min(range(len(targets)), key=lambda i: (round(distances[i], 6), i))
        label, unit = item.get("label", keyword), item.get("unit", "")
        return (round(distances[best], 6), best), f"{label} {number:g}{unit} (target {targets[best]:g}{unit})"
    if item.get("soft_kernel"):
        kernel = acquisition_facts(ds)["kernel"] if keyword == "ConvolutionKernel" else _show(value)
        if kernel is None:
            return (1.0,), f"{keyword} not recorded (soft kernel preferred)"
        sharp = scoring.is_sharp_kernel(kernel)
        return (1.0 if sharp else 0.0,), f"kernel {kernel} is {'sharp' if sharp else 'soft'}"
    matched = value is not None and match_condition(keyword, item["matches"], value)
    shown = _show(value) if value is not None else "not recorded"
    return (0.0 if matched else 1.0,), f"{keyword} {shown}: {'' if matched else 'not '}{item['label']}"


def _frame_count(datasets: Sequence[Dataset]) -> int:
    """Images in a series (for ranking only: an unreadable NumberOfFrames counts as 1; the volume builder judges)."""
    return sum(max(1, int(_float(attribute(ds, "NumberOfFrames")) or 1)) for ds in datasets)


def _series_number(ds: Dataset) -> int | None:
    try:
        return int(ds.get("SeriesNumber"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _evaluate(series_uid: str, datasets: Sequence[Dataset], selection: Mapping[str, Any]) -> dict:
    """One candidate: matched or not, standard, sort key and reasons."""
    ds = datasets[0]
    reasons = check_conditions(ds, selection["conditions"])
    in_region, region_reason = _region(ds, selection.get("region"))
    rejections, passes = _excluded(ds, selection.get("exclude", []))
    matched = not reasons and in_region and not rejections
    if not in_region and region_reason:
        reasons.append(region_reason)
    reasons.extend(rejections)
    candidate = {
        "series_uid": series_uid,
        "series_number": _series_number(ds),
        "description": str(ds.get("SeriesDescription", "") or ""),
        "matched": matched,
        "standard": None,
        "rank": None,
        "reasons": reasons,
        "_key": None,
    }
    if not matched:
        return candidate
    standard, standard_reasons = _standard(ds)
    prefs = [_preference(ds, item) for item in selection.get("prefer", [])]
    number = candidate["series_number"]
    key: tuple = (
        0 if standard else 1,
        *(k for pref in prefs for k in pref[0]),
        -_frame_count(datasets),
        number if number is not None else math.inf,
        series_uid,
    )
    matched_reasons = [region_reason] if region_reason else []
    candidate.update(
        standard=standard,
        reasons=[*matched_reasons, *standard_reasons, *(reason for _, reason in prefs), *passes],
        _key=key,
    )
    return candidate


def _label(candidate: Mapping[str, Any]) -> str:
    number = candidate["series_number"]
    name = f"series {number}" if number is not None else "series"
    description = f" {candidate['description']!r}" if candidate["description"] else ""
    return f"{name}{description} ({candidate['series_uid']})"


def _rank(series: Mapping[str, Sequence[Dataset]], selection: Mapping[str, Any]) -> tuple[dict, ...]:
    """Every series evaluated against one selection, the matching ones ranked (1 = best)."""
    evaluated = [_evaluate(uid, datasets, selection) for uid, datasets in series.items()]
    matched = sorted((c for c in evaluated if c["matched"]), key=lambda c: c["_key"])
    for rank, candidate in enumerate(matched, start=1):
        candidate["rank"] = rank
        if rank > 1:
            candidate["reasons"].append(f"ranked {rank} of {len(matched)}")
    return tuple({k: v for k, v in c.items() if k != "_key"} for c in evaluated)


def _select_one(series: Mapping[str, Sequence[Dataset]], selection: Mapping[str, Any]) -> SeriesChoice | None:
    name = selection["name"]
    candidates = _rank(series, selection)
    matched = sorted((c for c in candidates if c["matched"]), key=lambda c: c["rank"])
    for c in candidates:
        if not c["matched"]:
            logger.info("%s: not %s: %s", name, _label(c), "; ".join(c["reasons"]))
    if not matched:
        logger.info("%s: no series matches, so this path is skipped (%d series considered)", name, len(candidates))
        return None
    best = matched[0]
    kind = "standard" if best["standard"] else "fallback, scored as Agatston-equivalent"
    logger.info("%s: chose %s (%s): %s", name, _label(best), kind, "; ".join(best["reasons"]))
    return SeriesChoice(
        selection=name,
        series_uid=best["series_uid"],
        datasets=tuple(series[best["series_uid"]]),
        standard=bool(best["standard"]),
        reasons=tuple(best["reasons"]),
        candidates=candidates,
    )


def select_series(series: Mapping[str, Sequence[Dataset]], rules: dict) -> dict[str, SeriesChoice | None]:
    """For each selection in ``rules``, the best series of ``series`` (SeriesInstanceUID -> its datasets;
    headers suffice) or None when none matches. The decision and its reasons are logged at INFO."""
    validate_rules(rules)
    for uid, datasets in series.items():
        if not datasets:
            raise ValueError(f"series {uid} has no datasets")
    return {sel["name"]: _select_one(series, sel) for sel in rules["selections"]}


def explain_selection(series: Mapping[str, Sequence[Dataset]], rules: dict) -> dict[str, tuple[dict, ...]]:
    """For each selection, every series considered and why it matched, ranked lower or was rejected (the
    ``candidates`` of :class:`SeriesChoice`, also when no series matches and :func:`select_series` gives None)."""
    validate_rules(rules)
    return {sel["name"]: _rank(series, sel) for sel in rules["selections"]}


def group_by_series(datasets: Sequence[Dataset]) -> dict[str, list[Dataset]]:
    """Datasets of a study grouped by SeriesInstanceUID (the input :func:`select_series` takes)."""
    groups: dict[str, list[Dataset]] = {}
    for ds in datasets:
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            raise ValueError(f"instance {ds.get('SOPInstanceUID', '(no SOPInstanceUID)')} has no SeriesInstanceUID")
        groups.setdefault(uid, []).append(ds)
    return groups
