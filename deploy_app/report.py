"""The study's result as one JSON-able dict: ``results.json`` for machines and the PDF's input for readers.

Numbers are the scorer's, unrounded. Provenance: app and bundle versions, each model's sha256, the input
series UIDs, every quality decision and the stage timings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deploy_app import __version__
from deploy_app.pipeline import NO_SERIES, PATHS, PathResult
from deploy_app.segment_sets import get_segment_set
from deploy_app.selection import acquisition_facts
from deploy_app.study import Study


def series_facts(result: PathResult) -> dict[str, Any]:
    first = result.choice.datasets[0]
    facts = acquisition_facts(first)
    vol = result.volume
    return {
        "series_uid": result.choice.series_uid,
        "series_number": int(first.get("SeriesNumber") or 0),
        "series_description": str(first.get("SeriesDescription", "") or ""),
        "thickness_mm": facts["thickness_mm"],
        "increment_mm": vol.increment_mm if vol is not None else None,
        "pixel_spacing_mm": list(vol.pixel_spacing_mm) if vol is not None else None,
        "kvp": facts["kvp"],
        "kernel": facts["kernel"],
        "tilt_deg": vol.tilt_deg if vol is not None else None,
        "slices": int(vol.hu.shape[0]) if vol is not None else len(result.choice.datasets),
        "manufacturer": str(first.get("Manufacturer", "") or ""),
    }


def _scores(result: PathResult) -> dict[str, Any] | None:
    """The scorer's numbers; its risk category only where one is defined (the coronary total), as in SR and PDF."""
    if not result.scored:
        return None
    scores = result.score.as_dict()
    if not get_segment_set(result.path).has_risk_category:
        scores["risk_category"] = None
    return scores


def path_report(result: PathResult, models: list[dict[str, Any]]) -> dict[str, Any]:
    choice = result.choice
    out: dict[str, Any] = {
        "series": series_facts(result),
        "selection": {
            "standard": choice.standard,
            "reasons": list(choice.reasons),
            "candidates": [dict(c) for c in choice.candidates],
        },
        "quality": [f.as_dict() for f in result.findings],
        "scored": result.scored,
        "not_scored_reason": result.not_scored_reason,
        "scores": _scores(result),
        "segment_set": result.path,  # the paths are named after their segment sets
        "models": models,
        "model_region_kji": result.roi,
        "sliding_window": result.sliding_window,
        "timings_s": dict(result.timings),
    }
    if result.landmarks is not None:
        out["landmarks"] = [
            {
                "name": lm["name"],
                "side": lm["side"],
                "slice": lm["slice_index"],
                "expected_slice": lm["expected_slice"],
                "z_mm": lm["z_mm"],
                "present": lm["present"],
            }
            for lm in result.landmarks["landmarks"]
        ]
    if result.mapping is not None:
        out["segment_mapping"] = {k: result.mapping[k] for k in ("boundaries_slice_index", "plane", "rule", "warnings")}
    return out


def build_report(
    study: Study,
    results: Mapping[str, PathResult | None],
    manifest: Mapping[str, Mapping[str, Any]],
    timings: Mapping[str, float],
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    from deploy_app.models import MODELS

    def models_of(path: str) -> list[dict[str, Any]]:
        return [
            {"name": name, "version": manifest[name]["bundle_version"], "sha256": manifest[name]["sha256"]}
            for name, spec in MODELS.items()
            if spec.path == path and name in manifest
        ]

    paths = {p: (path_report(results[p], models_of(p)) if results.get(p) else None) for p in PATHS}
    return {
        "app": {"name": "CalciMap", "version": __version__},
        "study": study.info(),
        "input_series": sorted(study.series),
        "paths": paths,
        "absent": {p: NO_SERIES[p] for p in PATHS if paths[p] is None},
        "timings_s": dict(timings),
        "warnings": list(warnings or []),
        "disclaimer": "Research software, not for diagnostic use.",
    }
