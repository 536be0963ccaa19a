"""One generated case: the image, its label maps and its truth, assembled from anatomy and lesions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import physics
from .geometry import Grid
from .physics import Lesion, Scanner
from .shapes import Tube

HU_RANGE = (-1024, 3071)  # what a 12-bit CT with RescaleIntercept -1024 can store


@dataclass
class Sampler:
    grid: Grid
    scanner: Scanner
    wed_mm: float


@dataclass
class Case:
    kind: str
    case_id: str
    grid: Grid
    arrays: dict[str, np.ndarray]  # "image" (int16 HU), "label" (uint8), "occupancy" (float32), ...
    truth: dict
    tags: dict = field(default_factory=dict)  # DICOM attributes for the series


def size_category(wed_mm: float) -> str:
    return "small" if wed_mm < 250 else "large" if wed_mm > 320 else "medium"


def lesion_on_tube(
    rng: np.random.Generator, tube: Tube, diameter: float, density: float, label: int, proximal_bias: float
) -> tuple[Lesion, dict]:
    """A plaque on the vessel wall: elongated along the vessel, bulging partly into the lumen.

    ``proximal_bias`` > 0 favours proximal positions, as coronary calcium does.
    """
    u = rng.random() ** (1.0 + proximal_bias)
    i = int(np.clip(u * (len(tube.points) - 1), 0, len(tube.points) - 1))
    tangent = tube.tangents()[i]
    ref = np.array([0.0, 0.0, 1.0]) if abs(tangent[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    n1 = np.cross(tangent, ref)
    n1 /= np.linalg.norm(n1)
    n2 = np.cross(tangent, n1)
    ang = rng.uniform(0, 2 * np.pi)
    radial = np.cos(ang) * n1 + np.sin(ang) * n2
    circumferential = np.cross(tangent, radial)
    thickness = diameter * rng.uniform(0.5, 0.9)
    centre = tube.points[i] + radial * (tube.radii[i] - 0.25 * thickness)
    radii = np.array([diameter / 2, thickness / 2, diameter / 2 * rng.uniform(0.6, 1.0)])
    lesion = Lesion(centre, radii, np.stack([tangent, radial, circumferential], axis=1), density, label)
    where = {"arc_mm": round(float(tube.arc_mm[i]), 2), "centreline_index": i}
    return lesion, where


def finish_case(
    *,
    kind: str,
    seed: int,
    index: int,
    rng: np.random.Generator,
    sampler: Sampler,
    anatomy_hu: np.ndarray,
    lesions: list[Lesion],
    lesion_facts: list[dict],
    distractors: list[Lesion],
    distractor_facts: list[dict],
    underlying_hu: Callable[[np.ndarray], np.ndarray],
    extra_truth: dict,
    body_part: str,
    extra_arrays: dict[str, np.ndarray] | None = None,
) -> Case:
    """Blur the anatomy, add supersampled lesions, label what they fill, add noise, write the truth."""
    grid, scanner = sampler.grid, sampler.scanner
    noiseless = physics.blur_anatomy(anatomy_hu, grid, scanner).astype(np.float32)
    label = np.zeros(grid.shape, dtype=np.uint8)
    best = np.zeros(grid.shape, dtype=np.float32)  # occupancy of the lesion that owns each voxel
    occupancy = np.zeros(grid.shape, dtype=np.float32)
    patches = []
    for lesion in lesions + distractors:
        patch = physics.render_lesion(lesion, grid, scanner, underlying_hu)
        patches.append(patch)
        if patch is None:
            continue
        noiseless[patch.box] += patch.delta_hu.astype(np.float32)
        if lesion.label:
            occupancy[patch.box] += patch.occupancy.astype(np.float32)
            owns = (patch.occupancy >= 0.5) & (patch.occupancy > best[patch.box])
            label[patch.box][owns] = lesion.label
            best[patch.box][owns] = patch.occupancy[owns]
    np.clip(occupancy, 0.0, 1.0, out=occupancy)

    sd = physics.noise_sd_for(scanner, sampler.wed_mm)
    noisy = noiseless + physics.correlated_noise(grid.shape, grid, scanner, sd, rng)
    image = np.clip(np.rint(noisy), *HU_RANGE).astype(np.int16)

    voxel_mm3 = grid.pixel_mm**2 * grid.increment_mm

    def describe(lesion: Lesion, patch, facts: dict) -> dict:
        out = {
            **facts,
            "label": lesion.label,
            "centre_mm": lesion.centre.round(3).tolist(),
            "centre_index_ijk": grid.patient_to_index(lesion.centre[None])[0].round(2).tolist(),
            "radii_mm": lesion.radii.round(3).tolist(),
            "density_mg_ha_cm3": round(lesion.density_mg_cm3, 1),
            "volume_mm3": round(lesion.physical_volume_mm3, 4),
            "mass_mg": round(lesion.mass_mg, 4),
            "hu_at_full_density": round(float(physics.density_to_hu(lesion.density_mg_cm3, scanner.kvp)), 1),
        }
        if patch is None:
            return {**out, "in_field_of_view": False}
        support = patch.occupancy > 0
        region = noiseless[patch.box]
        out.update(
            in_field_of_view=True,
            peak_hu=round(float(region[support].max()), 1) if support.any() else None,
            peak_hu_noisy=round(float(image[patch.box][support].max()), 1) if support.any() else None,
            occupied_volume_mm3=round(float(patch.occupancy.sum() * voxel_mm3), 4),
            labelled_voxels=int((patch.occupancy >= 0.5).sum()),
        )
        return out

    n = len(lesions)
    truth = {
        "kind": kind,
        "seed": seed,
        "index": index,
        "generator": "calcimap make_phantoms 1",
        "shape_kji": list(grid.shape),
        "spacing_mm": {"pixel": grid.pixel_mm, "increment": grid.increment_mm},
        "gantry_tilt_deg": round(grid.tilt_deg, 3),
        "affine_lps": grid.affine_lps().round(6).tolist(),
        "scanner": {**scanner.as_dict(), "noise_sd_hu": round(sd, 3), "reference_noise_sd_hu": scanner.noise_sd_hu},
        "patient_size": size_category(sampler.wed_mm),
        "calcium_free": n == 0,
        "lesions": [describe(les, p, f) for les, p, f in zip(lesions, patches[:n], lesion_facts, strict=True)],
        "distractors": [
            describe(les, p, f) for les, p, f in zip(distractors, patches[n:], distractor_facts, strict=True)
        ],
        "label_rule": "a voxel takes a lesion's label when the lesion fills >= 50 % of it (occupancy stored)",
        **extra_truth,
    }
    case_id = f"{kind}_{seed:04d}_{index:05d}"
    tags = {
        "PatientName": f"PHANTOM^{kind.upper()}{index:05d}",
        "PatientID": f"CM{seed:04d}{index:05d}{kind[0].upper()}",
        "BodyPartExamined": body_part,
        "KVP": scanner.kvp,
        "ConvolutionKernel": scanner.kernel,
        "SliceThickness": scanner.thickness_mm,
        "Manufacturer": scanner.manufacturer,
        "ManufacturerModelName": scanner.model,
        "XRayTubeCurrent": int(round(scanner.mas / 0.33)),
        "Exposure": int(round(scanner.mas)),
    }
    arrays = {"image": image, "label": label, "occupancy": occupancy, **(extra_arrays or {})}
    return Case(kind=kind, case_id=case_id, grid=grid, arrays=arrays, truth=truth, tags=tags)
