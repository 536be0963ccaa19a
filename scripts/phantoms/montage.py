"""PNG montages of phantom cases: an axial slice, a coronal reformat and the vessel course."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from .geometry import Grid  # noqa: E402

COLOURS = ["tab:red", "tab:orange", "tab:green", "tab:cyan", "tab:purple", "tab:pink"]
WINDOWS = {"chest": (-300.0, 700.0), "head": (-100.0, 1500.0)}


def load_case_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, dict, Grid]:
    """image and label [k, j, i], the truth and the grid of a case folder written by make_phantoms."""
    truth = json.loads((folder / "truth.json").read_text())
    image = np.asarray(nib.load(folder / "image.nii.gz").dataobj).transpose(2, 1, 0)
    label = np.asarray(nib.load(folder / "label.nii.gz").dataobj).transpose(2, 1, 0)
    a = np.asarray(truth["affine_lps"])
    grid = Grid(
        tuple(truth["shape_kji"]),
        truth["spacing_mm"]["pixel"],
        truth["spacing_mm"]["increment"],
        tuple(a[:3, 3]),
        tuple(a[:3, 0] / truth["spacing_mm"]["pixel"]),
        tuple(a[:3, 1] / truth["spacing_mm"]["pixel"]),
        tuple(a[:3, 2] / truth["spacing_mm"]["increment"]),
    )
    return image, label, truth, grid


def draw_case(axes, image: np.ndarray, label: np.ndarray, truth: dict, grid: Grid) -> None:
    lo, hi = WINDOWS.get(truth["kind"], (-300.0, 700.0))
    aspect = grid.increment_mm / grid.pixel_mm
    k = int(np.argmax((label > 0).sum(axis=(1, 2)))) if label.any() else image.shape[0] // 2
    ax = axes[0]
    ax.imshow(image[k], cmap="gray", vmin=lo, vmax=hi)
    if label[k].any():
        ax.contour(label[k] > 0, levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(f"axial, slice {k} ({grid.pixel_mm:.2f} mm pixels)")
    centrelines = truth.get("centrelines_mm", {})
    rows = [grid.patient_to_index(np.asarray(p)) for p in centrelines.values()]
    j = int(np.median(np.concatenate(rows)[:, 1])) if rows else image.shape[1] // 2
    ax = axes[1]
    ax.imshow(image[:, j, :], cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin="lower")
    ax.set_title(f"coronal reformat, row {j} ({truth['scanner']['thickness_mm']} mm slices)")
    for lm in truth.get("landmarks", []):
        i, _, kk = grid.patient_to_index(np.asarray(lm["position_mm"])[None])[0]
        ax.plot(i, kk, "+", color="yellow" if lm["side"] == "right" else "cyan", ms=8)
    ax = axes[2]
    # A coronal slab MIP around the vessels: thick enough to hold their course, thin enough to skip ribs.
    j_all = np.concatenate(rows)[:, 1] if rows else np.array([image.shape[1] / 2])
    half = int(round(12.0 / grid.pixel_mm))
    j0, j1 = max(int(j_all.min()) - half, 0), min(int(j_all.max()) + half + 1, image.shape[1])
    ax.imshow(image[:, j0:j1, :].max(axis=1), cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin="lower")
    for colour, (name, ijk) in zip(COLOURS, zip(centrelines, rows, strict=True), strict=False):
        ax.plot(ijk[:, 0], ijk[:, 2], color=colour, lw=1.2, label=name)
    if centrelines:
        ax.legend(loc="upper right", fontsize=7)
    ax.set_xlim(-0.5, image.shape[2] - 0.5)  # centrelines may leave the scanned range
    ax.set_ylim(-0.5, image.shape[0] - 0.5)
    ax.set_title("coronal slab MIP with vessel centrelines")
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])


def write_montage(folders: list[Path], out_png: Path) -> Path:
    """One row per case folder; returns the PNG path."""
    fig, axes = plt.subplots(len(folders), 3, figsize=(15, 5 * len(folders)), squeeze=False)
    for row, folder in zip(axes, folders, strict=True):
        image, label, truth, grid = load_case_folder(folder)
        draw_case(row, image, label, truth, grid)
        n = sum(1 for les in truth["lesions"] if les.get("labelled_voxels"))
        row[0].set_ylabel(f"{truth['kind']} {folder.name}\n{n} labelled lesions", fontsize=10)
    fig.suptitle("CalciMap synthetic phantoms (not patient data)", fontsize=12)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
