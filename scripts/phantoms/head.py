"""Non-contrast head CT down to the skull base, with both internal carotid arteries and their calcium.

Label map: 0 background, 1 ICA calcium (binary). A second map, ``segments``, gives the ICA
segment of each lumen voxel: 1 + side * 4 + segment (side 0 right, 1 left; segments 0 cervical,
1 petrous, 2 cavernous, 3 supraclinoid), following the centreline, so the siphon's segments
overlap in z as they do in real anatomy. The three boundaries per side (carotid canal entry,
petrolingual ligament / foramen lacerum, distal dural ring) are landmarks in the truth.

Anatomy is built in a head-local frame (LPS mm, origin between the two carotid canal entries),
scaled, yawed and rolled about the head centre, and painted slice by slice on the output grid.
"""

from __future__ import annotations

import numpy as np

from . import physics
from .case import Case, Sampler, finish_case, lesion_on_tube
from .geometry import Grid
from .physics import TISSUE_HU, Lesion, Scanner
from .shapes import Tube, distance_to_walls, ellipse_cylinder, ellipsoid, paint_tube, ramp

SIDES = ("right", "left")
SEGMENTS = ("cervical", "petrous", "cavernous", "supraclinoid")
BOUNDARIES = ("cervical_petrous", "petrous_cavernous", "cavernous_supraclinoid")
SEGMENT_NAMES = {str(1 + s * 4 + g): f"{side} {seg}" for s, side in enumerate(SIDES) for g, seg in enumerate(SEGMENTS)}
# matrix, pixel range (mm); medium is a skull-base field of view (128-154 mm) around both ICAs
SIZES = {"small": (128, (1.6, 1.8)), "medium": (256, (0.5, 0.6)), "full": (512, (0.4, 0.5))}
THICKNESSES = {
    "small": ([1.25, 2.0, 2.5, 3.0, 5.0], [0.15, 0.15, 0.2, 0.2, 0.3]),
    "medium": ([0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0], [0.1, 0.15, 0.15, 0.15, 0.15, 0.1, 0.2]),
    "full": ([0.5, 0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0], [0.05, 0.1, 0.15, 0.15, 0.1, 0.15, 0.1, 0.2]),
}
MAX_SLICES = {"small": 96, "medium": 160, "full": 200}
CALCIUM_MODES = (None, "none", "right", "left", "both")
# Segment of a plaque: mostly cavernous and supraclinoid (65 %), some petrous and cervical.
SEGMENT_P = (0.12, 0.23, 0.40, 0.25)

# Right ICA control points (head-local mm; x is mirrored for the left). Boundaries are marked.
ICA_RIGHT = [
    ((-27.0, 6.0, -75.0), None),
    ((-28.0, 5.0, -45.0), None),
    ((-27.5, 3.0, -20.0), None),
    ((-27.0, 2.0, -8.0), None),
    ((-27.0, 1.5, 0.0), 0),  # carotid canal entry: cervical | petrous
    ((-27.0, 0.0, 6.0), None),
    ((-25.5, -3.5, 10.0), None),  # petrous genu
    ((-21.5, -10.0, 11.0), None),
    ((-18.0, -15.5, 12.0), 1),  # foramen lacerum / petrolingual ligament: petrous | cavernous
    ((-16.5, -17.5, 17.0), None),
    ((-15.5, -21.0, 21.0), None),  # posterior genu
    ((-14.5, -28.0, 22.0), None),
    ((-13.5, -34.0, 23.5), None),
    ((-13.0, -37.5, 27.0), None),  # anterior genu
    ((-13.0, -36.0, 31.0), 2),  # distal dural ring: cavernous | supraclinoid
    ((-13.0, -31.0, 35.0), None),
    ((-13.5, -25.0, 39.0), None),
    ((-14.0, -21.0, 41.0), None),  # terminal bifurcation
]
GENU_INDEX = 6


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def rotation(yaw_deg: float, roll_deg: float) -> np.ndarray:
    """Yaw about the superior (z) axis, then roll about the antero-posterior (y) axis."""
    a, b = np.deg2rad(yaw_deg), np.deg2rad(roll_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[np.cos(b), 0.0, np.sin(b)], [0.0, 1.0, 0.0], [-np.sin(b), 0.0, np.cos(b)]])
    return rz @ ry


def sample_protocol(rng: np.random.Generator, size: str, thickness: float | None, wed_mm: float):
    """Scanner, pixel size and increment: 120 kVp mostly, soft brain kernel, head-sized noise."""
    options, p = THICKNESSES[size]
    thickness = float(thickness) if thickness else float(rng.choice(options, p=p))
    increment = thickness * float(rng.choice([0.5, 0.8])) if rng.random() < 0.15 else thickness
    kvp = float(rng.choice([120.0, 100.0, 140.0], p=[0.85, 0.1, 0.05]))
    # Noise at 5 mm in a head of this size is 3-5.5 HU; express it at the reference size and 3 mm.
    at_5mm = rng.uniform(3.0, 5.5)
    size_factor = np.exp(physics.MU_WATER_PER_MM * (wed_mm - physics.REFERENCE_WED_MM) / 2)
    scanner = Scanner(
        kvp=kvp,
        kernel=str(rng.choice(["H30s", "J30s", "FC21", "UB"])),
        psf_fwhm_mm=float(rng.uniform(0.9, 1.2)),
        thickness_mm=thickness,
        noise_sd_hu=float(at_5mm / (size_factor * np.sqrt(3.0 / 5.0))),
        mas=float(rng.uniform(200, 350)),
    )
    lo, hi = SIZES[size][1]
    return scanner, float(rng.uniform(lo, hi)), increment


def floor_z(qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """Height of the cranial floor (local mm): anterior, middle and posterior fossae.

    The middle fossa reaches further forward laterally (temporal poles behind the sphenoid wings).
    """
    forward = 25.0 * np.clip((np.abs(qx) - 15.0) / 30.0, 0.0, 1.0)
    return np.interp(qy + forward, [-120.0, -40.0, -30.0, 5.0, 18.0, 120.0], [24.0, 24.0, 2.0, 0.0, -22.0, -22.0])


class HeadAnatomy:
    """Scalp, skull, brain, ventricles, skull base, face and neck of one simulated head."""

    def __init__(self, rng: np.random.Generator):
        self.scale = float(rng.uniform(0.9, 1.1))
        self.yaw = float(rng.uniform(-10, 10))
        self.roll = float(rng.uniform(-10, 10))
        self.R = rotation(self.yaw, self.roll)
        self.centre_q = np.array([0.0, -8.0, 30.0])  # head centre in the local frame
        self.centre_p = np.array([rng.uniform(-4, 4), rng.uniform(-6, 6), 0.0])  # ... and in the patient
        self.scalp_r = np.array([76.0, 97.0, 90.0]) * rng.uniform(0.97, 1.03, 3)
        self.skull_out = self.scalp_r - rng.uniform(4.0, 6.0)
        self.skull_in = self.skull_out - rng.uniform(5.0, 8.0)
        self.csf_mm = rng.uniform(1.0, 3.0)
        self.vent = rng.uniform(0.8, 1.3)  # ventricle size
        self.shift = rng.uniform(-1.5, 1.5)  # slight midline asymmetry of the deep structures
        self.ica_ctrl = {}
        self.boundary_ctrl = {}
        for s, side in enumerate(SIDES):
            mirror = np.array([1.0 if s == 0 else -1.0, 1.0, 1.0])
            offset = np.array([rng.uniform(-1.5, 1.5), rng.uniform(-2, 2), rng.uniform(-1.5, 1.5)])
            pts = np.array([p for p, _ in ICA_RIGHT]) * mirror + offset
            pts += rng.normal(0.0, 0.6, pts.shape)
            self.ica_ctrl[side] = pts
            self.boundary_ctrl[side] = [i for i, (_, b) in enumerate(ICA_RIGHT) if b is not None]
        self.petrous = {side: self._petrous(side) for side in SIDES}

    # -- frames -------------------------------------------------------------------------------
    def to_patient(self, q: np.ndarray) -> np.ndarray:
        return self.centre_p + (np.asarray(q, dtype=float) - self.centre_q) @ (self.scale * self.R.T)

    def to_local(self, p: np.ndarray) -> np.ndarray:
        return self.centre_q + (np.asarray(p, dtype=float) - self.centre_p) @ self.R / self.scale

    def _petrous(self, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The petrous pyramid as an ellipsoid along the horizontal carotid canal: centre, radii, axes."""
        pts = self.ica_ctrl[side]
        genu, b2 = pts[GENU_INDEX], pts[self.boundary_ctrl[side][1]]
        u = unit(b2 - genu)
        tip, base = b2 + 2.0 * u, genu - 32.0 * u
        centre = (tip + base) / 2
        centre[2] = genu[2] - 1.0
        w0 = np.array([0.0, 0.0, 1.0])
        v = unit(np.cross(w0, u))
        w = np.cross(u, v)
        radii = np.array([np.linalg.norm(tip - base) / 2, 11.0, 9.0])
        return centre, radii, np.stack([u, v, w], axis=1)

    def petrous_inside_point(self, side: str) -> np.ndarray:
        """A local point deep in the petrous bone, away from the carotid canal (for checks)."""
        c, _, ax = self.petrous[side]
        return c - 12.0 * ax[:, 0] + 2.0 * ax[:, 2]

    def petrous_occupancy(self, q: np.ndarray, width_mm: float) -> np.ndarray:
        occ = np.zeros(len(q))
        for c, r, ax in self.petrous.values():
            occ = np.maximum(occ, ramp(ellipsoid(q[:, 0], q[:, 1], q[:, 2], c, r, ax) * self.scale, width_mm))
        return occ

    def ica_tubes(self, rng: np.random.Generator) -> dict[str, tuple[Tube, np.ndarray, list[int]]]:
        """Per side: the tube (patient mm), the segment of every centreline sample, the boundary sample indices."""
        out = {}
        for side in SIDES:
            ctrl = self.to_patient(self.ica_ctrl[side])
            r0, r1 = rng.uniform(2.2, 2.5), rng.uniform(1.7, 1.9)
            tube = Tube.through(ctrl, r0 * self.scale, r1 * self.scale, f"{side}_ica")
            idx = [int(np.argmin(np.linalg.norm(tube.points - ctrl[c], axis=1))) for c in self.boundary_ctrl[side]]
            seg = np.searchsorted(np.array(idx), np.arange(len(tube.points)), side="right").astype(np.uint8)
            out[side] = (tube, seg, idx)
        return out

    def wed_mm(self) -> float:
        return float(np.clip(2.0 * np.sqrt(self.scalp_r[0] * self.scalp_r[1]) * self.scale * 0.98, 150.0, 200.0))

    # -- painting -----------------------------------------------------------------------------
    def primitives(self, bone_c: float, bone_t: float, bone_p: float) -> list:
        """(bounding centre, bounding radius, function(qx, qy, qz) -> (occupancy-signed distance, value)) in order."""
        prims = []

        def add(centre, radius, fn):
            prims.append((np.asarray(centre, dtype=float), float(radius), fn))

        T = TISSUE_HU
        c = self.centre_q
        sr, so, si = self.scalp_r, self.skull_out, self.skull_in
        sh = self.shift
        # Scalp / soft tissue of the head and the neck below it.
        add(c, sr.max(), lambda x, y, z: [(ellipsoid(x, y, z, c, sr), T["soft_tissue"])])
        add(
            [0, 12, -60],
            85,
            lambda x, y, z: [(np.maximum(ellipse_cylinder(x, y, 0, 12, 55, 60), z - 5.0), T["soft_tissue"])],
        )
        # Face: orbits and eyes, nasal cavity, maxillary sinuses (below the anterior fossa).
        for sx in (-1, 1):
            add(
                [sx * 32, -65, 10],
                22,
                lambda x, y, z, sx=sx: [
                    (ellipsoid(x, y, z, [sx * 32, -65, 10], [17, 20, 14]), T["fat"]),
                    (ellipsoid(x, y, z, [sx * 32, -72, 10], [12, 12, 12]), 10.0),
                ],
            )
            add(
                [sx * 27, -55, -8],
                20,
                lambda x, y, z, sx=sx: [
                    (ellipsoid(x, y, z, [sx * 27, -55, -8], [14, 18, 16]), bone_c),
                    (ellipsoid(x, y, z, [sx * 27, -55, -8], [12.5, 16.5, 14.5]), T["air"]),
                ],
            )
        add([0, -62, 0], 27, lambda x, y, z: [(ellipsoid(x, y, z, [0, -62, 0], [9, 24, 18]), T["air"])])
        # Skull: cortical shell down to just below the cranial floor, then the cranial contents.
        add(c, so.max(), lambda x, y, z: [(np.maximum(ellipsoid(x, y, z, c, so), floor_z(x, y) - 5.0 - z), bone_c)])

        def cranium(x, y, z):
            above = floor_z(x, y) - z
            inner = np.maximum(ellipsoid(x, y, z, c, si), above)
            brain = np.maximum(ellipsoid(x, y, z, c, si - self.csf_mm), above)
            wm = np.maximum(ellipsoid(x, y, z, [sh, -5, 52], [52, 72, 40]), brain + 4.0)
            v = self.vent
            return [
                (inner, T["csf"]),
                (brain, T["grey_matter"]),
                (wm, T["white_matter"]),
                (ellipsoid(x, y, z, [sh - 11, -2, 50], [6 * v, 27 * v, 7 * v]), T["csf"]),
                (ellipsoid(x, y, z, [sh + 11, -2, 50], [6 * v, 27 * v, 7 * v]), T["csf"]),
                (ellipsoid(x, y, z, [sh, -4, 32], [2.0 * v, 11, 8]), T["csf"]),
                (ellipsoid(x, y, z, [sh, 30, -6], [6, 4, 6]), T["csf"]),
            ]

        add(c, si.max(), cranium)
        # Foramen magnum: the medulla passes through the posterior fossa floor.
        add(
            [0, 30, -27],
            25,
            lambda x, y, z: [
                (np.maximum(ellipse_cylinder(x, y, 0, 30, 15, 18), np.abs(z - (floor_z(x, y) - 4)) - 6), 35.0),
            ],
        )
        # Sphenoid body with its air sinus, and the clivus sloping down to the foramen magnum.
        add(
            [0, -30, 6],
            16,
            lambda x, y, z: [
                (ellipsoid(x, y, z, [0, -30, 6], [12, 14, 10]), bone_c),
                (ellipsoid(x, y, z, [0, -30, 5], [9.5, 11.5, 7.5]), T["air"]),
            ],
        )
        cl_u = unit([0, 28, -42])
        cl_axes = np.stack([cl_u, [1.0, 0, 0], np.cross(cl_u, [1.0, 0, 0])], axis=1)
        add(
            [0, -2, 3],
            27,
            lambda x, y, z: [
                (ellipsoid(x, y, z, [0, -2, 3], [25, 11, 6], cl_axes), bone_c),
                (ellipsoid(x, y, z, [0, -2, 3], [23, 9, 4], cl_axes), bone_t),
            ],
        )
        # Petrous bones.
        for cp, rp, ap in self.petrous.values():
            add(cp, rp.max(), lambda x, y, z, cp=cp, rp=rp, ap=ap: [(ellipsoid(x, y, z, cp, rp, ap), bone_p)])
        # Neck: pharynx, cervical spine (C1-C2), spinal canal and cord.
        add([0, -18, -8], 14, lambda x, y, z: [(ellipsoid(x, y, z, [0, -18, -8], [12, 9, 9]), T["air"])])
        add(
            [0, 12, -60],
            90,
            lambda x, y, z: [
                (np.maximum(ellipse_cylinder(x, y, 0, -9, 13, 6), z + 14), T["air"]),
                (np.maximum(ellipse_cylinder(x, y, 0, 12, 13, 11), z + 26), bone_c),
                (np.maximum(ellipse_cylinder(x, y, 0, 12, 11, 9), z + 26), bone_t),
                (
                    np.maximum(np.maximum(np.abs(ellipse_cylinder(x, y, 0, 32, 13, 12)) - 2.5, 36 - y), z + 28),
                    bone_c * 0.8,
                ),
                (np.maximum(ellipse_cylinder(x, y, 0, 32, 9.5, 9), z - floor_z(x, y) + 8), T["csf"]),
                (np.maximum(ellipse_cylinder(x, y, 0, 32, 5.5, 5), z - floor_z(x, y) + 8), 35.0),
            ],
        )
        return prims

    def paint(self, grid: Grid, scanner: Scanner) -> np.ndarray:
        """Noise-free HU on the output grid, before the vessels and the blur."""
        vol = np.empty(grid.shape, dtype=np.float32)
        prims = self.primitives(
            physics.bone_hu("cortical", scanner.kvp),
            physics.bone_hu("trabecular", scanner.kvp),
            physics.bone_hu("petrous", scanner.kvp),
        )
        edge = grid.pixel_mm
        m = grid.matrix
        row, col = np.asarray(grid.row_cosine), np.asarray(grid.col_cosine)
        normal = np.cross(row, col)
        centres_p = self.to_patient(np.array([p[0] for p in prims]))
        reach = np.array([p[1] for p in prims]) * self.scale + 2 * edge
        rows, cols = grid.shape[1], grid.shape[2]
        for k in range(grid.shape[0]):
            x, y, z = grid.slice_coordinates(k)
            q = self.to_local(np.stack([x, y, z], axis=-1))
            qx, qy, qz = q[..., 0], q[..., 1], q[..., 2]
            hu = np.full(x.shape, TISSUE_HU["air"], dtype=np.float64)
            d = centres_p - (np.asarray(grid.origin) + m[:, 2] * k)
            for (_, _, fn), dv, r in zip(prims, d, reach, strict=True):
                if abs(dv @ normal) > r:
                    continue
                ic, jc, half = dv @ row / grid.pixel_mm, dv @ col / grid.pixel_mm, r / grid.pixel_mm
                i0, i1 = max(int(ic - half), 0), min(int(np.ceil(ic + half)) + 1, cols)
                j0, j1 = max(int(jc - half), 0), min(int(np.ceil(jc + half)) + 1, rows)
                if i1 <= i0 or j1 <= j0:
                    continue
                win = (slice(j0, j1), slice(i0, i1))
                h = hu[win]
                for signed, value in fn(qx[win], qy[win], qz[win]):
                    occ = ramp(signed * self.scale, edge)
                    h += occ * (value - h)
            vol[k] = hu
        return vol


def head_lesions(
    rng: np.random.Generator, tubes: dict, grid: Grid, mode: str | None
) -> tuple[list[Lesion], list[dict]]:
    """ICA plaques: ~25 % calcium-free, ~15 % one side only, most in the cavernous and supraclinoid ICA."""
    if mode not in CALCIUM_MODES:
        raise ValueError(f"calcium must be one of {CALCIUM_MODES}, not {mode!r}")
    if mode is None:
        r = rng.random()
        mode = "none" if r < 0.25 else str(rng.choice(["right", "left"])) if r < 0.40 else "both"
    if mode == "none":
        return [], []
    sides = list(SIDES) if mode == "both" else [mode]
    count = int(rng.integers(1, 4)) if len(sides) == 1 else int(rng.integers(2, 7))
    k_max = grid.shape[0] - 1
    lesions, facts = [], []
    for n in range(count):
        side = sides[n] if n < len(sides) else str(rng.choice(sides))
        tube, seg, bidx = tubes[side]
        k = grid.patient_to_index(tube.points)[:, 2]
        ok = (k >= 1.0) & (k <= k_max - 1.0)
        # Cervical plaques within 25 mm of the canal entry; all plaques within the scanned slab.
        ok &= ~((seg == 0) & (tube.arc_mm < tube.arc_mm[bidx[0]] - 25.0))
        avail = np.array([np.any(ok & (seg == g)) for g in range(4)])
        if not avail.any():
            continue
        p = np.array(SEGMENT_P) * avail
        g = int(rng.choice(4, p=p / p.sum()))
        cand = np.flatnonzero(ok & (seg == g))
        a, b = int(cand.min()), int(cand.max()) + 1
        if b - a < 2:
            a, b = max(a - 1, 0), min(b + 1, len(tube.points))
        sub = Tube(tube.points[a:b], tube.radii[a:b], tube.name)
        diameter = float(np.exp(rng.uniform(np.log(0.5), np.log(6.0))))
        density = float(rng.uniform(100, 800) if rng.random() > 0.25 else rng.uniform(100, 250))
        lesion, where = lesion_on_tube(rng, sub, diameter, density, 1, proximal_bias=0.0)
        i = a + where["centreline_index"]
        lesions.append(lesion)
        facts.append(
            {"side": side, "segment": SEGMENTS[g], "arc_mm": round(float(tube.arc_mm[i]), 2), "centreline_index": i}
        )
    return lesions, facts


def make_head_case(
    seed: int,
    index: int,
    size: str = "small",
    thickness: float | None = None,
    tilt_deg: float | None = None,
    calcium: str | None = None,
) -> Case:
    """One head CT case. ``calcium`` forces the calcium pattern: "none", "right", "left" or "both"."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, not {size!r}")
    if calcium not in CALCIUM_MODES:
        raise ValueError(f"calcium must be one of {CALCIUM_MODES}, not {calcium!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 2]))
    anatomy = HeadAnatomy(rng)
    scanner, pixel, increment = sample_protocol(rng, size, thickness, anatomy.wed_mm())
    tubes = anatomy.ica_tubes(rng)
    if tilt_deg is None:
        tilt_deg = 0.0 if rng.random() < 0.7 else float(rng.uniform(0.0, 30.0))

    # z coverage: from around the carotid canal entry to above the supraclinoid ICA (to the vertex when it fits).
    b1_z = float(np.mean([tubes[s][0].points[tubes[s][2][0], 2] for s in SIDES]))
    vertex_z = float(anatomy.to_patient(anatomy.centre_q + [0, 0, anatomy.scalp_r[2]])[2]) + 5.0
    z_lo = b1_z + rng.uniform(-40.0, 10.0)
    z_hi = b1_z + rng.uniform(60.0, 90.0)
    cap = MAX_SLICES[size]
    if size == "full" and (vertex_z - z_lo) / increment + 1 <= cap:
        z_hi = vertex_z
    n_slices = int(np.ceil((z_hi - z_lo) / increment)) + 1
    if n_slices > cap:
        n_slices = cap
        z_lo = z_hi - (cap - 1) * increment
    matrix = SIZES[size][0]
    centre = np.array(
        [
            anatomy.centre_p[0] + rng.uniform(-3, 3),
            anatomy.centre_p[1] + rng.uniform(-3, 3),
            z_lo + (n_slices - 1) * increment / 2,
        ]
    )
    grid = Grid.tilted((n_slices, matrix, matrix), pixel, increment, centre, tilt_deg)
    sampler = Sampler(grid=grid, scanner=scanner, wed_mm=anatomy.wed_mm())

    hu = anatomy.paint(grid, scanner)
    edge = grid.pixel_mm
    segments = np.zeros(grid.shape, dtype=np.uint8)
    for s, side in enumerate(SIDES):
        tube, seg, _ = tubes[side]
        occ = np.zeros(grid.shape, dtype=np.float32)
        idx = np.zeros(grid.shape, dtype=np.int32)
        paint_tube(grid, tube, edge, occ, out_index=idx)
        hu += occ * (TISSUE_HU["blood"] - hu)  # the lumen, also inside the petrous carotid canal
        inside = (occ >= 0.5) & (idx > 0)
        segments[inside] = 1 + s * 4 + seg[idx[inside] - 1]

    bone_p = physics.bone_hu("petrous", scanner.kvp)

    def underlying(xyz: np.ndarray) -> np.ndarray:
        best = distance_to_walls(xyz, [tube for tube, _, _ in tubes.values()])
        pet = anatomy.petrous_occupancy(anatomy.to_local(xyz), 0.2)
        base = TISSUE_HU["soft_tissue"] + (bone_p - TISSUE_HU["soft_tissue"]) * pet
        return base + (TISSUE_HU["blood"] - base) * ramp(best, 0.2)

    lesions, facts = head_lesions(rng, tubes, grid, calcium)

    landmarks = []
    for side in SIDES:
        tube, _, bidx = tubes[side]
        for b, i in enumerate(bidx):
            pos = tube.points[i]
            ijk = grid.patient_to_index(pos[None])[0]
            inside = bool(np.all(ijk >= -0.5) and np.all(ijk <= np.array(grid.shape[::-1]) - 0.5))
            landmarks.append(
                {
                    "name": f"{side}_{BOUNDARIES[b]}",
                    "side": side,
                    "boundary": b + 1,
                    "position_mm": pos.round(3).tolist(),
                    "arc_mm": round(float(tube.arc_mm[i]), 2),
                    "slice_index": round(float(ijk[2]), 3),
                    "slice": int(round(float(ijk[2]))),
                    "in_scan": inside,
                }
            )
        zs = [tube.points[i, 2] for i in bidx]
        assert zs[0] < zs[1] < zs[2], f"{side} ICA boundaries are not ascending: {zs}"

    return finish_case(
        kind="head",
        seed=seed,
        index=index,
        rng=rng,
        sampler=sampler,
        anatomy_hu=hu,
        lesions=lesions,
        lesion_facts=facts,
        distractors=[],
        distractor_facts=[],
        underlying_hu=underlying,
        extra_truth={
            "labels": {"1": "ICA calcium"},
            "segments": SEGMENT_NAMES,
            "landmarks": landmarks,
            "centrelines_mm": {f"{side}_ica": tubes[side][0].points[::4].round(2).tolist() for side in SIDES},
            "head": {
                "yaw_deg": round(anatomy.yaw, 3),
                "roll_deg": round(anatomy.roll, 3),
                "scale": round(anatomy.scale, 4),
                "centre_mm": anatomy.centre_p.round(3).tolist(),
                "centre_local_mm": anatomy.centre_q.tolist(),
                "rotation": anatomy.R.round(8).tolist(),
                "petrous_bone_mm": {
                    s: anatomy.to_patient(anatomy.petrous_inside_point(s)).round(3).tolist() for s in SIDES
                },
            },
            "patient": {"water_equivalent_diameter_mm": round(anatomy.wed_mm(), 1)},
        },
        body_part="HEAD",
        extra_arrays={"segments": segments},
    )
