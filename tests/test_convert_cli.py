"""``python -m core convert``: one output per series, paths on stdout, warnings on stderr, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.conftest import REPO, data_path, expected_entries
from tests.dicom_factory import make_series, write_sources


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def printed_paths(out: subprocess.CompletedProcess[str]) -> list[Path]:
    return [Path(line) for line in out.stdout.splitlines()]


def _sorted_corners(shape, affine) -> np.ndarray:
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1).T
    world = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return world[np.lexsort(np.round(world, 2).T[::-1])]


def test_ct_folder_to_nifti_prints_one_path_with_dcm2niix_geometry(tmp_path: Path) -> None:
    folder = data_path("ct_siemens_j2k_20sl", "dicom")
    out = run_cli("convert", str(folder), "--to", "nifti", "-o", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    paths = printed_paths(out)
    assert len(paths) == 1 and paths[0].name.endswith(".nii.gz") and paths[0].is_file()
    image = nib.load(paths[0])
    reference = next(e for e in expected_entries() if e["name"] == "ct_siemens_j2k_20sl")["units"][0]["dcm2niix"]
    np.testing.assert_allclose(
        _sorted_corners(image.shape, image.affine),
        _sorted_corners(reference["outputs"][0]["shape"], reference["outputs"][0]["affine"]),
        atol=1e-3,
    )
    assert "Traceback" not in out.stderr


def test_every_series_gets_one_output_in_each_format(tmp_path: Path) -> None:
    ct = data_path("ct_siemens_20sl_uncompressed_derived", "dicom")
    mr = data_path("mr_siemens_gre_fieldmap_5sl", "dicom")
    for target, check in (
        ("nifti", lambda p: p.name.endswith(".nii.gz") and p.is_file()),
        ("nrrd", lambda p: p.suffix == ".nrrd" and p.read_bytes().startswith(b"NRRD0004")),
        ("mha", lambda p: p.suffix == ".mha" and p.read_bytes().startswith(b"ObjectType = Image")),
        ("dicom", lambda p: p.is_dir() and len(list(p.glob("*.dcm"))) in (5, 20)),
    ):
        out = run_cli("convert", str(ct), str(mr), "--to", target, "-o", str(tmp_path / target))
        assert out.returncode == 0, out.stderr
        paths = printed_paths(out)
        assert len(paths) == 2, out.stdout
        assert all(check(p) for p in paths), paths
    series_numbers = {
        int(pydicom.dcmread(next(p.glob("*.dcm")), stop_before_pixels=True).SeriesNumber)
        for p in printed_paths(run_cli("convert", str(mr), "--to", "dicom", "-o", str(tmp_path / "again")))
    }
    assert series_numbers == {2}


def test_uncompressed_sidecar_and_qa_options(tmp_path: Path) -> None:
    mr = data_path("mr_siemens_gre_fieldmap_5sl", "dicom")
    out = run_cli("convert", str(mr), "--uncompressed", "--sidecar", "--qa", "-o", str(tmp_path))
    assert out.returncode == 0, out.stderr
    (path,) = printed_paths(out)
    assert path.suffix == ".nii"
    stem = path.name[: -len(".nii")]
    assert (tmp_path / f"{stem}.json").is_file()
    assert (tmp_path / f"{stem}_qa.json").is_file()


def test_geometry_warnings_go_to_stderr_and_only_paths_to_stdout(tmp_path: Path) -> None:
    sources = make_series(np.zeros((8, 6, 6), dtype=np.int16), drop=[3], series_number=4, description="axial")
    folder = write_sources(sources, tmp_path / "gapped")
    out = run_cli("convert", str(folder), "-o", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert [p.name for p in printed_paths(out)] == ["4_axial_Eq.nii.gz"]
    assert "warning:" in out.stderr and "_Eq" in out.stderr
    assert not any(line.startswith("warning") for line in out.stdout.splitlines())


def test_strict_refusal_of_the_only_series_exits_3(tmp_path: Path) -> None:
    sources = make_series(np.zeros((8, 6, 6), dtype=np.int16), drop=[3])
    folder = write_sources(sources, tmp_path / "gapped")
    out = run_cli("convert", str(folder), "--strict", "-o", str(tmp_path / "out"))
    assert out.returncode == 3
    assert out.stdout == ""
    assert "spacing varies" in out.stderr and "nothing could be converted" in out.stderr
    assert "Traceback" not in out.stderr


def test_nothing_convertible_exits_3_with_a_message(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a scan")
    out = run_cli("convert", str(junk), "-o", str(tmp_path / "out"))
    assert out.returncode == 3
    assert out.stdout == ""
    assert "nothing could be converted" in out.stderr and "notes.txt" in out.stderr
    missing = run_cli("convert", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"))
    assert missing.returncode == 3 and "nowhere" in missing.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_cli("convert", str(tmp_path)).returncode == 2  # no -o
    assert run_cli("convert", str(tmp_path), "--to", "png", "-o", str(tmp_path)).returncode == 2
    assert "convert every series to NIfTI" in run_cli("--help").stdout  # listed as a subcommand


def test_reference_copies_patient_and_study(tmp_path: Path) -> None:
    source = make_series(np.ones((3, 4, 4), dtype=np.int16), description="target")
    folder = write_sources(source, tmp_path / "in")
    reference = make_series(np.zeros((1, 2, 2), dtype=np.int16), description="ref", name_prefix="REF")
    reference_file = write_sources(reference, tmp_path / "ref") / "REF0000.dcm"
    out = run_cli(
        "convert", str(folder), "--to", "dicom", "--reference", str(reference_file), "-o", str(tmp_path / "out")
    )
    assert out.returncode == 0, out.stderr
    (path,) = printed_paths(out)
    written = pydicom.dcmread(sorted(path.glob("*.dcm"))[0], stop_before_pixels=True)
    expected = pydicom.dcmread(reference_file, stop_before_pixels=True)
    assert written.StudyInstanceUID == expected.StudyInstanceUID
    assert str(written.PatientName) == str(expected.PatientName)


@pytest.mark.parametrize("target", ["nrrd", "mha"])
def test_written_raster_files_open_in_our_loader(target: str, tmp_path: Path) -> None:
    mr = data_path("mr_siemens_gre_fieldmap_5sl", "dicom")
    (path,) = printed_paths(run_cli("convert", str(mr), "--to", target, "-o", str(tmp_path)))
    info = run_cli("info", str(path), "--json")
    assert info.returncode == 0, info.stderr
    assert '"shape": [5, 42, 64]' in info.stdout


def test_unwritable_output_folder_exits_3(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    mr = data_path("mr_siemens_gre_fieldmap_5sl", "dicom")
    out = run_cli("convert", str(mr), "-o", str(blocker))
    assert out.returncode == 3
    assert out.stdout == "" and "cannot write" in out.stderr and "Traceback" not in out.stderr
