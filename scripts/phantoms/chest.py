"""Non-contrast chest / cardiac CT with a coronary tree, coronary calcium and its look-alikes.

Labels: 0 background, 1 LM, 2 LAD, 3 LCX, 4 RCA. Distractors above 130 HU that are not coronary
calcium (bone, aortic wall calcification, aortic valve and mitral annulus calcification) are
rendered like lesions but keep label 0; `truth.json` lists them.
"""

from __future__ import annotations

import numpy as np

from . import physics
from .case import Case, Sampler, finish_case, lesion_on_tube
from .geometry import Grid
from .physics import TISSUE_HU, Lesion, Scanner
from .shapes import Tube, distance_to_walls, ellipse_cylinder, ellipsoid, paint_tube, ramp

VESSELS = {1: "LM", 2: "LAD", 3: "LCX", 4: "RCA"}
# matrix, pixel range (mm); medium is a cardiac field of view (141-179 mm), for GPU training and evaluation
SIZES = {"small": (128, (1.1, 1.3)), "medium": (256, (0.55, 0.7)), "full": (512, (0.3, 0.8))}


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def sample_protocol(rng: np.random.Generator, size: str, thickness: float | None) -> tuple[Scanner, float, float]:
    """Scanner, pixel size and slice increment: mostly 3 mm, soft kernel, 120 kVp, as CAC protocols are."""
    thickness = thickness or float(rng.choice([3.0, 2.5, 1.5], p=[0.7, 0.2, 0.1]))
    increment = thickness * (2.0 / 3.0) if rng.random() < 0.15 else thickness  # overlapping reconstructions
    kvp = float(rng.choice([120.0, 100.0, 140.0], p=[0.85, 0.1, 0.05]))
    sharp = rng.random() < 0.05
    scanner = Scanner(
        kvp=kvp,
        kernel="B46f" if sharp else str(rng.choice(["B30f", "B35f", "Qr36"])),
        psf_fwhm_mm=float(rng.uniform(0.6, 0.75) if sharp else rng.uniform(1.0, 1.3)),
        thickness_mm=thickness,
        noise_sd_hu=float(rng.uniform(14.0, 24.0) * (1.6 if sharp else 1.0)),
        mas=float(rng.uniform(40, 120)),
    )
    lo, hi = SIZES[size][1]
    return scanner, float(rng.uniform(lo, hi)), increment


class ChestAnatomy:
    """Body, lungs, mediastinum, heart, aorta, spine, ribs and sternum of one simulated patient (LPS mm)."""

    def __init__(self, rng: np.random.Generator, patient_size: str | None):
        scale = {"small": 0.85, "medium": 1.0, "large": 1.22}[patient_size] if patient_size else rng.uniform(0.85, 1.2)
        self.half_width = 165.0 * scale * rng.uniform(0.95, 1.05)  # lateral semi-axis of the body
        self.half_depth = self.half_width * rng.uniform(0.62, 0.74)  # antero-posterior semi-axis
        self.fat_mm = 8.0 + 22.0 * max(scale - 0.8, 0.0) * rng.uniform(0.7, 1.3)
        self.muscle_mm = rng.uniform(8.0, 14.0)
        # Heart: long axis from base towards the apex, pointing left, anterior and inferior.
        self.heart_centre = np.array([rng.uniform(15, 30), rng.uniform(-25, -10), 0.0])
        self.u = unit([0.55 + rng.uniform(-0.1, 0.1), -0.5 + rng.uniform(-0.1, 0.1), -0.62])
        v = np.array([0.0, -1.0, 0.0]) - self.u * (-self.u[1])
        self.v = unit(v)  # anterior, perpendicular to the long axis
        w = np.cross(self.u, self.v)
        self.w = w if w[0] > 0 else -w  # towards the patient's left
        self.long_r = rng.uniform(60, 70) * scale**0.3
        self.short_r = rng.uniform(46, 54) * scale**0.3
        self.epi_fat_mm = rng.uniform(5.0, 9.0)
        self.spine_y = self.half_depth - self.muscle_mm - self.fat_mm - 28.0
        self.aorta_r = rng.uniform(13.0, 17.0)
        self.root = self.heart_point(-0.95, np.deg2rad(-10), 0.35) + np.array([0, 5.0, 8.0])
        desc_x, desc_y = 22.0 + rng.uniform(-3, 3), self.spine_y - 12.0
        top = self.heart_centre[2] + 95.0
        self.aorta = Tube.through(
            np.array(
                [
                    self.root,
                    self.root + [-4.0, 0.0, 35.0],
                    [self.root[0] - 2.0, (self.root[1] + desc_y) / 2, top],
                    [desc_x, desc_y, top - 25.0],
                    [desc_x, desc_y, top - 90.0],
                    [desc_x + 2.0, desc_y, self.heart_centre[2] - 140.0],
                ]
            ),
            self.aorta_r,
            self.aorta_r * 0.85,
            "aorta",
        )
        self.rib_phase = rng.uniform(0, 25.0)

    def heart_point(self, t: float, phi: float, lift_mm: float = 0.0) -> np.ndarray:
        """A point on the (epicardial-fat) surface: t in [-1, 1] base->apex, phi around the long axis."""
        ring = np.sqrt(max(1.0 - t * t, 0.0))
        radial = np.cos(phi) * self.v + np.sin(phi) * self.w
        return self.heart_centre + t * (self.long_r + lift_mm) * self.u + ring * (self.short_r + lift_mm) * radial

    def coronary_tree(self, rng: np.random.Generator) -> dict[int, Tube]:
        t_av = rng.uniform(-0.55, -0.45)
        lift = self.epi_fat_mm * 0.5
        ring = lambda t, deg: self.heart_point(t, np.deg2rad(deg), lift)  # noqa: E731
        lm_ost = self.root + self.aorta_r * 0.9 * unit(self.w + 0.3 * self.v)
        rca_ost = self.root + self.aorta_r * 0.9 * unit(-self.w + 0.8 * self.v)
        bif = ring(t_av, 60 + rng.uniform(-8, 8))
        jitter = lambda: rng.uniform(-6, 6)  # noqa: E731
        lm = Tube.through(np.array([lm_ost, (lm_ost + bif) / 2, bif]), 2.2, 2.0, "LM")
        lad = Tube.through(
            np.array([bif] + [ring(t, 40 - 25 * (t - t_av) + jitter()) for t in np.linspace(t_av + 0.25, 0.95, 5)]),
            1.9,
            0.8,
            "LAD",
        )
        lcx = Tube.through(
            np.array([bif] + [ring(t_av + 0.15 * f, 60 + 110 * f + jitter()) for f in np.linspace(0.2, 1.0, 5)]),
            1.7,
            0.9,
            "LCX",
        )
        rca_path = [ring(t_av, -40 - 130 * f + jitter()) for f in np.linspace(0.0, 1.0, 6)]
        rca_path += [ring(t_av + 0.3 + 0.5 * f, -175 + jitter()) for f in (0.3, 1.0)]
        rca = Tube.through(np.array([rca_ost] + rca_path), 2.0, 0.9, "RCA")
        return {1: lm, 2: lad, 3: lcx, 4: rca}

    def paint(self, grid: Grid, scanner: Scanner, tubes: dict[int, Tube]) -> np.ndarray:
        """Noise-free HU on the output grid, before blur."""
        vol = np.empty(grid.shape, dtype=np.float32)
        cortical = physics.bone_hu("cortical", scanner.kvp)
        trabecular = physics.bone_hu("trabecular", scanner.kvp)
        edge = grid.pixel_mm
        for k in range(grid.shape[0]):
            x, y, z = grid.slice_coordinates(k)
            hu = np.full(x.shape, TISSUE_HU["air"], dtype=np.float64)

            def put(occ, value):
                nonlocal hu
                hu = hu + occ * (value - hu)

            a, b = self.half_width, self.half_depth
            put(ramp(ellipse_cylinder(x, y, 0, 0, a, b), edge), TISSUE_HU["fat"])
            put(ramp(ellipse_cylinder(x, y, 0, 0, a - self.fat_mm, b - self.fat_mm), edge), TISSUE_HU["muscle"])
            ca, cb = a - self.fat_mm - self.muscle_mm, b - self.fat_mm - self.muscle_mm
            put(ramp(ellipse_cylinder(x, y, 0, 0, ca, cb), edge), TISSUE_HU["lung"])
            # Mediastinum: soft tissue and fat between the lungs, widening over the heart.
            put(ramp(ellipse_cylinder(x, y, 5.0, -5.0, 45.0, cb), edge), TISSUE_HU["fat"])
            # Sternum (anterior midline) and ribs along the chest wall, sloping down anteriorly.
            st = ramp(ellipse_cylinder(x, y, 0, -(b - self.fat_mm - 6.0), 16.0, 6.0), edge)
            put(st, trabecular)
            put(st * ramp(-ellipse_cylinder(x, y, 0, -(b - self.fat_mm - 6.0), 13.5, 3.5), edge), trabecular)
            put(st * ramp(np.abs(ellipse_cylinder(x, y, 0, -(b - self.fat_mm - 6.0), 16, 6.0)) - 1.2, edge), cortical)
            theta = np.arctan2(y / b, x / a)
            rib_z = z + 22.0 * (1 - np.sin(theta)) + self.rib_phase  # anterior ribs lie lower
            dz = (rib_z % 25.0) - 12.5
            dr = np.hypot(x / ca, y / cb) * min(ca, cb) - (min(ca, cb) + 4.0)
            rib = ramp(np.hypot(dz / 5.0, dr / 3.5) * 3.5 - 3.5, edge) * (np.abs(np.sin(theta) + 0.9) > 0.25)
            put(rib, trabecular)
            put(rib * ramp(np.abs(np.hypot(dz / 5.0, dr / 3.5) * 3.5 - 3.5) - 0.9, edge), cortical)
            # Heart with epicardial fat, myocardium and blood pool; the atria sit behind the base.
            heart_fat = ellipsoid(
                x,
                y,
                z,
                self.heart_centre,
                [self.long_r + self.epi_fat_mm, *(2 * [self.short_r + self.epi_fat_mm])],
                self._axes(),
            )
            put(ramp(heart_fat, edge), TISSUE_HU["fat"])
            atria = self.heart_centre - 0.75 * self.long_r * self.u + np.array([0, 18.0, 8.0])
            put(ramp(ellipsoid(x, y, z, atria, [38.0, 30.0, 32.0]), edge), TISSUE_HU["blood"])
            put(
                ramp(
                    ellipsoid(x, y, z, self.heart_centre, [self.long_r, self.short_r, self.short_r], self._axes()), edge
                ),
                TISSUE_HU["myocardium"],
            )
            put(
                ramp(
                    ellipsoid(
                        x,
                        y,
                        z,
                        self.heart_centre - 3 * self.u,
                        [self.long_r - 12, self.short_r - 11, self.short_r - 11],
                        self._axes(),
                    ),
                    edge,
                ),
                TISSUE_HU["blood"],
            )
            # Spine: vertebral body with cortical rim (discs every 28 mm), canal behind it.
            sx, sy = 0.0, self.spine_y
            body = ramp(ellipse_cylinder(x, y, sx, sy, 19.0, 16.0), edge)
            disc = np.abs(((z + 7.0) % 28.0) - 14.0) < 3.5
            put(body, np.where(disc, TISSUE_HU["soft_tissue"] + 40, trabecular))
            put(body * ramp(np.abs(ellipse_cylinder(x, y, sx, sy, 19.0, 16.0)) - 1.5, edge) * ~disc, cortical)
            put(ramp(ellipse_cylinder(x, y, sx, sy + 27.0, 9.0, 8.0), edge), TISSUE_HU["csf"])
            post = ramp(np.abs(ellipse_cylinder(x, y, sx, sy + 27.0, 13.0, 12.0)) - 2.5, edge) * (y > sy + 20)
            put(post, cortical * 0.8)
            vol[k] = hu
        # Vessels: aorta and coronaries (blood in fat), painted with their own soft edges.
        occ = np.zeros(grid.shape, dtype=np.float32)
        paint_tube(grid, self.aorta, edge, occ)
        vol += occ * (TISSUE_HU["blood"] - vol)
        occ[:] = 0
        for tube in tubes.values():
            paint_tube(grid, tube, edge, occ)
        vol += occ * (TISSUE_HU["blood"] - vol)
        return vol

    def _axes(self) -> np.ndarray:
        return np.stack([self.u, self.v, self.w], axis=1)

    def wed_mm(self) -> float:
        """Water-equivalent diameter: the body's mean diameter, lungs counted at their lower density."""
        return float(2.0 * np.sqrt(self.half_width * self.half_depth) * 0.82)


def coronary_lesions(rng: np.random.Generator, tubes: dict[int, Tube]) -> tuple[list[Lesion], list[dict]]:
    """About 30 % calcium-free; some one-vessel cases (RCA only, LAD only...) so side mix-ups show."""
    if rng.random() < 0.3:
        return [], []
    pattern = rng.random()
    if pattern < 0.25:
        vessels = [int(rng.choice([2, 3, 4], p=[0.4, 0.2, 0.4]))]
    else:
        vessels = list(range(1, 5))
    count = int(rng.integers(1, 4 if len(vessels) == 1 else 10))
    lesions, facts = [], []
    for _ in range(count):
        label = int(rng.choice(vessels))
        tube = tubes[label]
        diameter = float(np.exp(rng.uniform(np.log(0.5), np.log(6.0))))
        density = float(rng.uniform(100, 800) if rng.random() > 0.25 else rng.uniform(100, 250))
        lesion, where = lesion_on_tube(rng, tube, diameter, density, label, proximal_bias=2.0)
        lesions.append(lesion)
        facts.append({"vessel": VESSELS[label], **where})
    return lesions, facts


def distractor_lesions(rng: np.random.Generator, anatomy: ChestAnatomy) -> tuple[list[Lesion], list[dict]]:
    """Calcium that is not coronary: aortic wall, aortic valve, mitral annulus."""
    lesions, facts = [], []
    for _ in range(int(rng.integers(0, 6))):
        d = float(rng.uniform(2.0, 8.0))
        lesion, where = lesion_on_tube(rng, anatomy.aorta, d, float(rng.uniform(200, 1000)), 0, proximal_bias=0.0)
        lesions.append(lesion)
        facts.append({"kind": "aortic_wall", **where})
    if rng.random() < 0.25:  # aortic valve: nodules on the annulus at the root
        for _ in range(int(rng.integers(1, 4))):
            ang = rng.uniform(0, 2 * np.pi)
            c = (
                anatomy.root
                - 6.0 * anatomy.u
                + 0.7 * anatomy.aorta_r * (np.cos(ang) * anatomy.v + np.sin(ang) * anatomy.w)
            )
            r = rng.uniform(1.0, 3.0)
            lesions.append(Lesion(c, np.array([r, r, r * 0.7]), np.eye(3), float(rng.uniform(300, 900)), 0))
            facts.append({"kind": "aortic_valve", "centre_mm": c.round(2).tolist()})
    if rng.random() < 0.15:  # mitral annulus: an arc on the posterior left AV ring, near the LCX
        for deg in np.linspace(100, 170, int(rng.integers(2, 5))):
            c = anatomy.heart_point(-0.5, np.deg2rad(deg), -8.0)
            r = rng.uniform(1.5, 3.0)
            lesions.append(Lesion(c, np.array([r, r, r]), np.eye(3), float(rng.uniform(300, 800)), 0))
            facts.append({"kind": "mitral_annulus", "centre_mm": c.round(2).tolist()})
    return lesions, facts


def make_chest_case(
    seed: int, index: int, size: str = "small", thickness: float | None = None, patient_size: str | None = None
) -> Case:
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 1]))
    scanner, pixel, increment = sample_protocol(rng, size, thickness)
    anatomy = ChestAnatomy(rng, patient_size)
    tubes = anatomy.coronary_tree(rng)
    matrix = SIZES[size][0]
    fov = matrix * pixel
    body_centre = np.array([0.0, 0.0])
    centre_xy = body_centre if fov > 2 * anatomy.half_width + 20 else anatomy.heart_centre[:2] + [5.0, 0.0]
    z_lo = anatomy.heart_centre[2] - anatomy.long_r - 20.0
    z_hi = anatomy.heart_centre[2] + anatomy.long_r * 0.6 + 25.0
    n_slices = int(np.ceil((z_hi - z_lo) / increment))
    grid = Grid.tilted((n_slices, matrix, matrix), pixel, increment, (centre_xy[0], centre_xy[1], (z_lo + z_hi) / 2))
    sampler = Sampler(grid=grid, scanner=scanner, wed_mm=anatomy.wed_mm())
    hu = anatomy.paint(grid, scanner, tubes)

    def underlying(xyz: np.ndarray) -> np.ndarray:
        best = distance_to_walls(xyz, (*tubes.values(), anatomy.aorta))
        return TISSUE_HU["fat"] + (TISSUE_HU["blood"] - TISSUE_HU["fat"]) * ramp(best, 0.2)

    lesions, facts = coronary_lesions(rng, tubes)
    distractors, distractor_facts = distractor_lesions(rng, anatomy)
    return finish_case(
        kind="chest",
        seed=seed,
        index=index,
        rng=rng,
        sampler=sampler,
        anatomy_hu=hu,
        lesions=lesions,
        lesion_facts=facts,
        distractors=distractors,
        distractor_facts=distractor_facts,
        underlying_hu=underlying,
        extra_truth={
            "labels": {str(k): v for k, v in VESSELS.items()},
            "patient": {"water_equivalent_diameter_mm": round(anatomy.wed_mm(), 1)},
            "centrelines_mm": {t.name: t.points[::4].round(2).tolist() for t in tubes.values()},
        },
        body_part="HEART",
    )
