"""The benchmark still runs: ``python -m bench.run --size tiny`` writes its table with every row.

No time is asserted (a test must not time things); only that each measured
operation ran, produced the phantom's values where they are checked, and that the
Markdown file holds every row and the targets. Rows whose tool is legitimately
absent (no Chromium for the browser row) may read "n/a (reason)"; our own rows
never may.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.phantom import phantom_volume, series_volume, slice_order, write_ct_series
from core.io import scan
from core.sources import read_paths

REPO = Path(__file__).resolve().parents[1]

OUR_ROWS = [
    ("Series load (folder)", "TomoForge: read + scan + load"),
    ("Series load (zip in memory)", "TomoForge: scan + load"),
    ("DICOM -> .nii.gz", "TomoForge: read + scan + convert + write"),
    (".nii.gz load (dcm2niix's file)", "TomoForge: read + scan + load"),
    ("Bone >= 300 HU -> binary STL", "TomoForge: threshold_surface + write_mesh"),
]
REFERENCE_ROWS = [
    ("Series load (folder)", "pydicom naive dcmread + stack"),
    ("Series load (folder)", "SimpleITK ImageSeriesReader"),
    ("Series load (folder)", "dcm2niix -z n (writes .nii)"),
    ("Series load (folder)", "lower bound: read files + copy pixels"),
    ("Series load (zip in memory)", "pydicom naive from zip"),
    ("Series load (zip in memory)", "lower bound: our inflating only (expand_sources)"),
    ("Series load (zip in memory)", "zipfile (stdlib): inflate members only"),
    ("DICOM -> .nii.gz", "dcm2niix -z y"),
    ("DICOM -> .nii.gz", "dicom2nifti"),
    ("DICOM -> .nii.gz", "SimpleITK read + WriteImage"),
    (".nii.gz load (dcm2niix's file)", "nibabel load + dataobj"),
    (".nii.gz load (dcm2niix's file)", "SimpleITK ReadImage"),
    ("Bone >= 300 HU -> binary STL", "VTK vtkFlyingEdges3D + numpy-stl (wheel default, 1 thread)"),
    ("Bone >= 300 HU -> binary STL", "VTK vtkFlyingEdges3D + numpy-stl (STDThread, 2 threads)"),
    ("Bone >= 300 HU -> binary STL", "scikit-image marching_cubes + numpy-stl"),
    ("View render", "axial: render_view + PNG level 1 + hover values (what the viewer sends)"),
    ("Slider -> painted image", "headless Chromium"),
    ("Slider -> painted image", "the same over 10 Mbit/s"),
]
TARGETS = [
    "Series load <= 1.0x dcm2niix -z n",
    "Series load >= 3x faster than SimpleITK",
    "DICOM -> .nii.gz >= 2x faster than dcm2niix -z y",
    "DICOM -> .nii.gz >= 10x faster than dicom2nifti",
    "Bone -> STL <= 1.0x VTK flying edges + numpy-stl",
    "View render <= 5 ms",
    "Slider -> paint <= 150 ms",
    "Peak memory while loading <= 2x volume above baseline",
    "series loads, displays and converts",
]


def _rows(markdown: str) -> list[list[str]]:
    rows = []
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def _find(rows: list[list[str]], operation: str, tool: str) -> list[str]:
    matches = [row for row in rows if row[0] == operation and row[1].startswith(tool)]
    assert len(matches) == 1, f"expected one row '{operation}' / '{tool}', found {len(matches)}"
    return matches[0]


def test_phantom_series_loads_back_to_the_phantom(tmp_path: Path) -> None:
    """The written series is what the benchmark claims: our reader gives back the phantom exactly."""
    phantom = phantom_volume((24, 20, 6))
    write_ct_series(phantom, tmp_path / "series", n_slices=9)
    result = scan(read_paths([tmp_path / "series"]))
    assert not result.errors
    assert len(result.series) == 1
    volume = result.series[0].load()
    assert volume.shape == (24, 20, 9)
    np.testing.assert_array_equal(volume.array, series_volume(phantom, 9))
    np.testing.assert_allclose(volume.affine[:3, :3], phantom.affine[:3, :3], atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 3], phantom.affine[:3, 3], atol=1e-4)
    assert slice_order(6, 9).tolist() == [0, 1, 2, 3, 4, 5, 5, 4, 3]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench-out")
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--size", "tiny", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert markdown.strip() in completed.stdout  # the table is printed too
    return markdown, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_tiny_benchmark_writes_every_row(tiny_run: tuple[str, dict]) -> None:
    markdown, _ = tiny_run
    rows = _rows(markdown)
    assert "cores" in markdown and "memory" in markdown
    for operation, tool in OUR_ROWS:
        row = _find(rows, operation, tool)
        assert not row[2].startswith("n/a"), f"our row failed: {row}"
        assert "WRONG RESULT" not in row[-1], row
    for operation, tool in REFERENCE_ROWS:
        row = _find(rows, operation, tool)
        assert "WRONG RESULT" not in row[-1], row
    for name in TARGETS:
        matches = [row for row in rows if name in row[0]]
        assert len(matches) == 1, f"target '{name}' missing"
        assert matches[0][-1] in ("PASS", "FAIL", "n/a")
    scale = [row for row in rows if "series loads, displays and converts" in row[0]][0]
    assert scale[-1] == "PASS", scale


def test_tiny_benchmark_results_hold_the_phantom(tiny_run: tuple[str, dict]) -> None:
    """Our load rows were checked voxel for voxel against the phantom and every run was recorded."""
    _, summary = tiny_run
    load = summary["groups"]["load_folder"]["ours"]
    assert load["error"] == "" and load["problem"] == ""
    assert len(load["seconds"]) >= 1 and all(s > 0 for s in load["seconds"])
    assert "sha1" in load["check"]
    for group in ("load_zip", "nifti", "niiload", "stl"):
        ours = summary["groups"][group]["ours"]
        assert ours["error"] == "" and ours["problem"] == "", (group, ours)
    assert summary["groups"]["stl"]["ours"]["check"]["triangles"] > 0
