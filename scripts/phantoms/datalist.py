"""MONAI datalists with patient-level folds and an optional unlabeled share of the training cases."""

from __future__ import annotations

import numpy as np


def patient_folds(patients: list[str], folds: int, rng: np.random.Generator) -> dict[str, int]:
    """Patient -> fold: the distinct patients dealt into ``folds`` folds in a random order (all of a patient's
    cases share a fold, so no patient is in two folds)."""
    unique = list(dict.fromkeys(patients))
    order = rng.permutation(len(unique))
    return {unique[i]: int(rank % folds) for rank, i in enumerate(order)}


def build_datalist(
    case_ids: list[str], files: dict[str, dict[str, str]], *, folds: int, unlabeled_fraction: float, seed: int
) -> dict:
    """Each phantom case is one patient, so a split by case is a split by patient.

    Cases are dealt into ``folds`` folds in a seeded random order; then a seeded random
    ``unlabeled_fraction`` of all cases lose their label and move to ``unlabeled`` (keeping their fold).
    """
    if not 0.0 <= unlabeled_fraction < 1.0:
        raise ValueError(f"unlabeled fraction must be in [0, 1), got {unlabeled_fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 99]))
    fold_of = patient_folds(case_ids, folds, rng)
    n_unlabeled = int(round(unlabeled_fraction * len(case_ids)))
    chosen = set(rng.choice(sorted(case_ids), size=n_unlabeled, replace=False).tolist()) if n_unlabeled else set()
    labeled, unlabeled = [], []
    for c in case_ids:
        entry = {"case_id": c, "fold": fold_of[c], **files[c]}
        if c in chosen:
            unlabeled.append({k: v for k, v in entry.items() if k in ("case_id", "fold", "image")})
        else:
            labeled.append(entry)
    key = lambda e: e["case_id"]  # noqa: E731
    return {
        "description": "CalciMap synthetic phantoms; fold = patient-level cross-validation fold",
        "num_folds": folds,
        "training": sorted(labeled, key=key),
        "unlabeled": sorted(unlabeled, key=key),
    }
