"""``python -m core mesh``: files read back by independent readers, JSON fields, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from core.cli import main
from core.io import scan
from core.mesh import MeshRequest, build_meshes
from core.sources import read_paths
from tests.conftest import REPO, data_path

REQUIRED = {"triangles", "volume_ml", "area_cm2", "bounds_mm", "watertight"}


def run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    """Run the CLI in-process; returns (exit code, the JSON object or None, stderr)."""
    try:
        code = main(["mesh", *argv])
    except SystemExit as stop:  # argparse usage errors
        code = int(stop.code)
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) <= 1, out  # one JSON object, nothing else on stdout
    return code, (json.loads(lines[0]) if lines else None), err


@pytest.fixture(scope="module")
def ct_dir():
    return data_path("ct_siemens_20sl_uncompressed_derived", "dicom")


@pytest.fixture(scope="module")
def seg_file():
    return data_path("nifti_ct_with_labelmap", "example_seg.nii.gz")


def test_bone_stl_lps_and_ras(ct_dir, tmp_path, capsys) -> None:
    from stl import mesh as stl_mesh

    lps_path, ras_path = tmp_path / "bone.stl", tmp_path / "bone-ras.stl"
    code, report, err = run(capsys, str(ct_dir), "-o", str(lps_path), "--lower", "300")
    assert code == 0, err
    assert REQUIRED <= set(report)
    assert report["space"] == "LPS" and report["watertight"] is True and report["format"] == "binary STL"
    lps = stl_mesh.Mesh.from_file(str(lps_path))
    assert len(lps.vectors) == report["triangles"] > 10_000
    points = lps.vectors.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(report["bounds_mm"], [points.min(axis=0), points.max(axis=0)], atol=1e-3)
    assert lps.get_mass_properties()[0] / 1000 == pytest.approx(report["volume_ml"], rel=1e-4)

    code, ras_report, _ = run(capsys, str(ct_dir), "-o", str(ras_path), "--lower", "300", "--ras")
    assert code == 0 and ras_report["space"] == "RAS"
    ras = stl_mesh.Mesh.from_file(str(ras_path))
    np.testing.assert_array_equal(ras.vectors, lps.vectors * np.float32([-1, -1, 1]))
    # The CT's slices span z = -804.5 .. -766.5 mm; caps sit half a 2 mm slice beyond.
    assert report["bounds_mm"][0][2] == pytest.approx(-805.5, abs=1e-3)
    assert report["bounds_mm"][1][2] == pytest.approx(-765.5, abs=1e-3)


def test_raw_surface_by_default_and_options_change_it(ct_dir, tmp_path, capsys) -> None:
    volume = scan(read_paths([ct_dir])).series[0].load()
    raw = build_meshes(volume, MeshRequest(lower=300.0)).meshes[0]
    code, plain, _ = run(capsys, str(ct_dir), "-o", str(tmp_path / "raw.stl"), "--lower", "300")
    assert code == 0 and plain["triangles"] == raw.n_triangles and plain["vertices"] == raw.n_vertices
    code, smooth, _ = run(capsys, str(ct_dir), "-o", str(tmp_path / "s.stl"), "--lower", "300", "--smooth", "10")
    assert code == 0 and smooth["triangles"] == plain["triangles"] and smooth["area_cm2"] < plain["area_cm2"]
    code, reduced, _ = run(capsys, str(ct_dir), "-o", str(tmp_path / "r.stl"), "--lower", "300", "--reduce", "0.25")
    assert code == 0 and abs(reduced["triangles"] - plain["triangles"] / 4) < 0.02 * plain["triangles"]
    assert reduced["watertight"] is True
    code, largest, _ = run(
        capsys, str(ct_dir), "-o", str(tmp_path / "l.stl"), "--lower", "300", "--largest", "--fill-holes"
    )
    assert code == 0 and largest["components"] == 1 < plain["components"]


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_label_to_obj_and_ply(seg_file, tmp_path, capsys, suffix: str) -> None:
    import trimesh

    path = tmp_path / f"liver{suffix}"
    code, report, err = run(capsys, str(seg_file), "-o", str(path), "--label", "5")
    assert code == 0, err
    assert report["label"] == 5 and report["name"] == "5 liver" and report["watertight"] is True
    read = trimesh.load(str(path), process=False)
    assert len(read.faces) == report["triangles"]
    assert read.is_watertight and read.volume / 1000 == pytest.approx(report["volume_ml"], rel=1e-4)


def test_ascii_stl_and_scale(seg_file, tmp_path, capsys) -> None:
    from stl import mesh as stl_mesh

    code, report, _ = run(
        capsys, str(seg_file), "-o", str(tmp_path / "a.stl"), "--label", "5", "--ascii", "--scale", "0.5"
    )
    assert code == 0 and report["format"] == "ASCII STL" and report["scale"] == 0.5
    assert (tmp_path / "a.stl").read_bytes().startswith(b"solid ")
    read = stl_mesh.Mesh.from_file(str(tmp_path / "a.stl"))
    # Figures stay in mm; the file is scaled.
    assert read.get_mass_properties()[0] / 1000 == pytest.approx(report["volume_ml"] * 0.125, rel=1e-4)


def test_otsu_threshold(tmp_path, capsys) -> None:
    ct = data_path("nifti_ct_with_labelmap", "example_ct_sm.nii.gz")
    code, report, err = run(
        capsys, str(ct), "-o", str(tmp_path / "skin.stl"), "--lower", "otsu", "--largest", "--fill-holes"
    )
    assert code == 0 and "Otsu threshold" in err
    assert -900 < report["lower"] < 0 and report["components"] == 1 and report["watertight"] is True


def test_nothing_to_mesh_exits_3(ct_dir, seg_file, tmp_path, capsys) -> None:
    code, report, err = run(capsys, str(ct_dir), "-o", str(tmp_path / "x.stl"), "--lower", "5000")
    assert code == 3 and report is None and "selects no voxels" in err
    assert not (tmp_path / "x.stl").exists()
    code, _, err = run(capsys, str(seg_file), "-o", str(tmp_path / "x.stl"), "--label", "12")
    assert code == 3 and "label 12 does not occur" in err and "5, 6, 7" in err
    code, _, err = run(capsys, str(ct_dir), "-o", str(tmp_path / "x.stl"), "--label", "1")
    assert code == 3 and "not a label map" in err
    code, _, err = run(capsys, str(tmp_path / "missing"), "-o", str(tmp_path / "x.stl"), "--lower", "1")
    assert code == 3 and "no series" in err
    code, _, err = run(capsys, str(ct_dir), "-o", str(tmp_path / "x.stl"), "--lower", "300", "--series", "nope")
    assert code == 3 and "no series 'nope'" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["-o", "x.vtk", "--lower", "300"],  # unknown format
        ["-o", "x.stl"],  # neither --lower nor --label
        ["-o", "x.stl", "--lower", "300", "--label", "2"],  # both
        ["-o", "x.stl", "--lower", "300", "--upper", "100"],  # empty range
        ["-o", "x.stl", "--label", "2", "--upper", "100"],
        ["-o", "x.stl", "--lower", "300", "--reduce", "0"],
        ["-o", "x.stl", "--lower", "abc"],
    ],
)
def test_usage_errors_exit_2(ct_dir, tmp_path, capsys, argv: list[str]) -> None:
    argv = [str(tmp_path / a) if a.startswith("x.") else a for a in argv]
    code, report, err = run(capsys, str(ct_dir), *argv)
    assert code == 2 and report is None and "usage:" in err


def test_entry_point_runs_in_a_fresh_process(seg_file, tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "core", "mesh", str(seg_file), "-o", str(tmp_path / "l.stl"), "--label", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert REQUIRED <= set(json.loads(out.stdout))
