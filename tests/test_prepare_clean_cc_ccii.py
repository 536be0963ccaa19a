"""Tests for scripts/prepare_clean_cc_ccii.py on the lung phantoms' Clean-CC-CCII layout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from phantoms.lung import write_lung_patient

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "scripts" / "prepare_clean_cc_ccii.py"
sys.path.insert(0, str(ROOT / "scripts"))
import prepare_clean_cc_ccii as prep  # noqa: E402

N_PATIENTS = 15  # 5 per class


@pytest.fixture(scope="module")
def clean_raw(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("lung_raw")
    summaries = [write_lung_patient(root, 5, i, "small") for i in range(N_PATIENTS)]
    return root, summaries


@pytest.fixture
def raw(clean_raw, tmp_path) -> tuple[Path, list[dict]]:
    root = tmp_path / "raw"
    shutil.copytree(clean_raw[0], root)
    return root, clean_raw[1]


def scan_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*/*") if p.is_dir())


def prepare(raw_root: Path, out: Path, *extra: str, capsys=None) -> tuple[int, str]:
    code = prep.main(["--raw-root", str(raw_root), "--out", str(out), *extra])
    return code, capsys.readouterr().out if capsys else ""


def test_volumes_datalist_and_report(raw, tmp_path, capsys):
    root, summaries = raw
    code, out = prepare(root, tmp_path / "out", "--folds", "5", capsys=capsys)
    assert code == 0
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    entries = datalist["training"]
    n_scans = sum(len(s["scans"]) for s in summaries)
    assert len(entries) == n_scans and datalist["labels"] == {"0": "NCP", "1": "CP", "2": "Normal"}
    for e in entries:
        assert prep.CLASSES[e["label"]] == e["class"] and set(e) >= {"image", "label", "fold", "patient", "scan"}
        assert e["case_id"] == f"{e['class']}_{e['patient']}_{e['scan']}"
    assert len({e["case_id"] for e in entries}) == len(entries)
    # Report: one line per class with the counts of patients, scans and slices.
    for klass in prep.CLASSES:
        mine = [s for s in summaries if s["class"] == klass]
        scans = sum(len(s["scans"]) for s in mine)
        slices = sum(v["slices"] for s in mine for v in s["scans"].values())
        line = next(x for x in out.splitlines() if x.startswith(klass + " "))
        assert line.split()[1:7] == ["patients", str(len(mine)), "scans", str(scans), "slices", str(slices)]
    # A volume equals its PNG slices stacked in order, stored (i, j, k) with the identity affine.
    e = entries[0]
    vol = nib.load(str(tmp_path / "out" / e["image"]))
    folder = root / e["class"] / e["patient"] / e["scan"]
    pngs = np.stack([np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))])
    assert vol.get_data_dtype() == np.uint8 and np.allclose(vol.affine, np.eye(4))
    assert np.array_equal(np.asarray(vol.dataobj).transpose(2, 1, 0), pngs) and e["slices"] == len(pngs)


def test_folds_are_patient_level_stratified_and_seeded(raw, tmp_path, capsys):
    root, _ = raw
    prepare(root, tmp_path / "a", "--folds", "5", "--seed", "3", capsys=capsys)
    prepare(root, tmp_path / "b", "--folds", "5", "--seed", "3", capsys=capsys)
    prepare(root, tmp_path / "c", "--folds", "5", "--seed", "4", capsys=capsys)
    a, b, c = (json.loads((tmp_path / x / "datalist.json").read_text())["training"] for x in "abc")
    assert a == b  # deterministic given the seed
    assert [e["fold"] for e in a] != [e["fold"] for e in c]
    folds_of = defaultdict(set)
    for e in a:
        folds_of[e["patient"]].add(e["fold"])
    assert all(len(f) == 1 for f in folds_of.values())  # no patient in two folds
    # 5 patients per class over 5 folds: every fold holds exactly one patient of each class.
    per = defaultdict(set)
    for e in a:
        per[(e["fold"], e["class"])].add(e["patient"])
    assert sorted(per) == [(f, k) for f in range(5) for k in sorted(prep.CLASSES)]
    assert all(len(p) == 1 for p in per.values())


def test_unreadable_and_inconsistent_scans_are_skipped_and_listed(raw, tmp_path, capsys):
    root, _ = raw
    folders = scan_folders(root)
    corrupt, mismatched = folders[0], folders[3]
    (corrupt / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    first = np.asarray(Image.open(mismatched / "0000.png"))
    Image.fromarray(first[:-8]).save(mismatched / "0001.png")
    code, out = prepare(root, tmp_path / "out", "--folds", "3", capsys=capsys)
    assert code == 0
    skipped = [x for x in out.splitlines() if x.startswith("skipped ")]
    rel = lambda p: "/".join(p.parts[-3:])  # noqa: E731
    assert len(skipped) == 2
    assert any(rel(corrupt) in x and "cannot read 0002.png" in x for x in skipped)
    assert any(rel(mismatched) in x and "0001.png is 64x56" in x for x in skipped)
    entries = json.loads((tmp_path / "out" / "datalist.json").read_text())["training"]
    assert len(entries) == len(folders) - 2
    assert not (tmp_path / "out" / "volumes" / f"{rel(corrupt)}.nii.gz").exists()


def test_slices_sort_numerically_and_resize(tmp_path, capsys):
    root = tmp_path / "raw"
    for p in range(3):
        folder = root / "CP" / f"p{p}" / "s1"
        folder.mkdir(parents=True)
        for n in (1, 2, 10):  # lexical order would put 10 before 2
            Image.fromarray(np.full((20, 30), n * 10 + p, dtype=np.uint8)).save(folder / f"{n}.png")
    code, _ = prepare(root, tmp_path / "out", "--folds", "3", "--size", "16", capsys=capsys)
    assert code == 0
    vol = np.asarray(nib.load(str(tmp_path / "out" / "volumes" / "CP" / "p0" / "s1.nii.gz")).dataobj)
    assert vol.shape == (16, 16, 3)
    assert vol[8, 8].tolist() == [10, 20, 100]


def test_nothing_usable_exits_2(tmp_path, capsys):
    folder = tmp_path / "raw" / "NCP" / "1" / "11"
    folder.mkdir(parents=True)
    (folder / "0000.png").write_bytes(b"garbage")
    assert prep.main(["--raw-root", str(tmp_path / "raw"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare_clean_cc_ccii: error: no usable scan") and err.count("\n") == 1
    assert not (tmp_path / "out" / "datalist.json").exists()


def test_cli_missing_raw_root_exits_2_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(CLI), "--raw-root", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("prepare_clean_cc_ccii: error: --raw-root: no such folder")
