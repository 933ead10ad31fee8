"""``python -m core info``: the public JSON fields and exit codes scripts depend on."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, data_path, expected_entries


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def _dcm2niix_affine(entry_name: str) -> np.ndarray:
    for entry in expected_entries():
        if entry["name"] == entry_name:
            return np.array(entry["units"][0]["dcm2niix"]["outputs"][0]["affine"])
    pytest.skip(f"{entry_name} not in expected.json")


def _corners(shape, affine) -> np.ndarray:
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1).T
    world = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return world[np.lexsort(world.T[::-1])]


def test_info_json_on_the_j2k_ct_matches_dcm2niix() -> None:
    folder = data_path("ct_siemens_j2k_20sl", "dicom")
    out = run_cli("info", str(folder), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)  # exactly one JSON object
    assert set(report) >= {"series", "errors"}
    assert len(report["series"]) == 1
    series = report["series"][0]
    assert set(series) >= {"id", "description", "modality", "shape", "spacing", "affine", "dtype", "warnings"}
    assert sorted(series["shape"]) == [20, 512, 512]
    assert series["modality"] == "CT"
    assert series["spacing"] == pytest.approx([0.9765625, 0.9765625, 2.0])
    reference = _dcm2niix_affine("ct_siemens_j2k_20sl")
    np.testing.assert_allclose(
        _corners(series["shape"], series["affine"]), _corners([512, 512, 20], reference), atol=1e-3
    )


def test_info_text_output_and_errors_for_junk(tmp_path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a scan")
    ct = data_path("single_files_pydicom", "dicom", "CT_small.dcm")
    out = run_cli("info", str(ct), str(junk))
    assert out.returncode == 0
    assert "CT" in out.stdout
    assert "notes.txt" in out.stderr and "Traceback" not in out.stderr


def test_info_exit_3_when_nothing_loads(tmp_path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    out = run_cli("info", str(junk), "--json")
    assert out.returncode == 3
    report = json.loads(out.stdout)
    assert report["series"] == [] and report["errors"][0]["source"].endswith("junk.bin")
    assert report["errors"][0]["message"]
    assert "Traceback" not in out.stderr and out.stderr.strip()


def test_info_missing_path_is_reported_not_a_crash(tmp_path) -> None:
    out = run_cli("info", str(tmp_path / "nope"))
    assert out.returncode == 3
    assert "no such file" in out.stderr and "Traceback" not in out.stderr


def test_usage_errors_exit_2() -> None:
    assert run_cli().returncode == 2
    assert run_cli("info").returncode == 2
    assert run_cli("frobnicate").returncode == 2


def test_help_lists_every_subcommand() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("info", "convert", "mesh", "deidentify"):
        assert command in out.stdout


def test_mesh_bad_frame_and_downsample_give_exit_codes_not_tracebacks(tmp_path) -> None:
    ct = data_path("nifti_ct_with_labelmap", "example_ct_sm.nii.gz")
    out = run_cli("mesh", str(ct), "-o", str(tmp_path / "x.stl"), "--lower", "300", "--frame", "2")
    assert out.returncode == 3 and "time point 2" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("mesh", str(ct), "-o", str(tmp_path / "x.stl"), "--lower", "300", "--downsample", "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_convert_names_each_failing_file_once(tmp_path) -> None:
    out = run_cli("convert", str(tmp_path / "missing.dcm"), "--to", "nifti", "-o", str(tmp_path / "out"))
    assert out.returncode == 3
    assert out.stderr.count("missing.dcm") == 1, out.stderr
