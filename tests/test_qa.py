"""Geometry QA: every check is triggered by a case built for it, and passes on a clean series.

The synthetic cases are written as real DICOM files (tests/dicom_factory.py) and
read through the app's scanner, or, for combinations the scanner would split into
several series (mixed orientations or sizes), assembled as one Series by hand so
the check itself is what is tested.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest

from core.io import scan
from core.qa import qa_report, report_from_stack, stack_from_affine
from core.series import Series, SeriesInfo
from tests.conftest import data_path
from tests.dicom_factory import AXIAL, SAGITTAL, lps_affine, make_series

CHECKS = {
    "orientation_consistent",
    "spacing_uniform",
    "no_missing_slice",
    "no_tilt",
    "distinct_positions",
    "single_image_size",
}


def _pixels(count: int, rows: int = 6, columns: int = 7) -> np.ndarray:
    return (np.arange(count * rows * columns, dtype=np.int16) % 1000).reshape(count, rows, columns)


def _scanned(sources) -> Series:
    result = scan(sources)
    assert len(result.series) == 1, [s.info.id for s in result.series]
    return result.series[0]


def _by_hand(sources, shape: tuple[int, ...]) -> Series:
    """One Series holding every file's header, whatever the scanner would make of them."""
    headers = tuple(pydicom.dcmread(io.BytesIO(s.data), stop_before_pixels=True) for s in sources)
    info = SeriesInfo(
        id="hand",
        kind="dicom",
        description="hand-made",
        modality="CT",
        shape=shape,
        affine=np.eye(4),
        dtype="int16",
    )
    return Series(info=info, loader=lambda: None, headers=headers)  # type: ignore[arg-type,return-value]


def failed(report) -> set[str]:
    return {check.name for check in report.checks if not check.passed}


def test_a_clean_series_passes_every_check_with_its_geometry() -> None:
    affine = lps_affine(AXIAL, pixel_spacing=(0.8, 0.6), origin=(-10, 5, 40), slice_step=2.5)
    report = qa_report(_scanned(make_series(_pixels(9), affine=affine)))
    assert {check.name for check in report.checks} == CHECKS
    assert failed(report) == set()
    assert report.passed
    assert report.n_slices == report.n_images == 9
    # Slice normal of an axial stack is +z (LPS and RAS agree on z); positions 40, 42.5, ...
    np.testing.assert_allclose(report.positions_mm, 40 + 2.5 * np.arange(9), atol=1e-9)
    assert report.spacing_min_mm == pytest.approx(2.5)
    assert report.spacing_max_mm == pytest.approx(2.5)
    assert report.spacing_variation == pytest.approx(0.0, abs=1e-12)
    assert report.tilt_deg == pytest.approx(0.0, abs=1e-6)
    assert report.geometry_source == "headers"


def test_uneven_spacing_fails_spacing_uniform_only() -> None:
    positions = [(0, 0, z) for z in (0.0, 2.0, 5.0, 7.0, 9.0, 11.0)]
    report = qa_report(_scanned(make_series(_pixels(6), positions=positions)))
    assert failed(report) == {"spacing_uniform"}
    assert report.spacing_min_mm == pytest.approx(2.0)
    assert report.spacing_max_mm == pytest.approx(3.0)
    assert report.spacing_median_mm == pytest.approx(2.0)
    assert report.spacing_variation == pytest.approx(0.5)
    assert "2-3 mm" in report.check("spacing_uniform").detail


def test_a_missing_slice_fails_no_missing_slice() -> None:
    report = qa_report(_scanned(make_series(_pixels(10), affine=lps_affine(slice_step=1.5), drop=[4])))
    assert "no_missing_slice" in failed(report)
    assert report.n_slices == 9
    assert report.spacing_max_mm == pytest.approx(3.0)
    assert "about 1 slice(s) missing" in report.check("no_missing_slice").detail


def test_an_incomplete_time_point_fails_no_missing_slice() -> None:
    # 3 positions x 2 time points, one image of the second time point missing.
    positions = [(0, 0, z) for z in (0.0, 1.0, 2.0)] * 2
    sources = make_series(
        _pixels(6), positions=positions, per_slice={"TemporalPositionIdentifier": [1, 1, 1, 2, 2, 2]}, drop=[5]
    )
    report = qa_report(_by_hand(sources, (7, 6, 3, 2)))
    assert "no_missing_slice" in failed(report)
    assert "1 to 2 images" in report.check("no_missing_slice").detail


def test_gantry_tilt_fails_no_tilt_and_reports_the_angle() -> None:
    angle = 15.0
    step = (0.0, 3.0 * np.tan(np.radians(angle)), 3.0)  # sheared along y, as a tilted CT gantry does
    sources = make_series(_pixels(8), affine=lps_affine(slice_step=step), gantry_tilt=angle)
    report = qa_report(_scanned(sources))
    assert failed(report) == {"no_tilt"}
    assert report.tilt_deg == pytest.approx(angle, abs=1e-6)
    assert report.gantry_tilt_deg == pytest.approx(angle)
    assert report.shear_mm == pytest.approx(7 * 3.0 * np.tan(np.radians(angle)), rel=1e-9)
    assert "15" in report.check("no_tilt").detail


def test_identical_positions_fail_distinct_positions() -> None:
    sources = make_series(_pixels(4), positions=[(0, 0, 0)] * 4, per_slice={"TemporalPositionIdentifier": [1, 2, 3, 4]})
    report = qa_report(_by_hand(sources, (7, 6, 1, 4)))
    assert "distinct_positions" in failed(report)
    assert report.n_slices == 1 and report.n_images == 4


def test_mixed_orientation_fails_orientation_consistent() -> None:
    sources = make_series(_pixels(5), orientation_overrides={2: SAGITTAL})
    report = qa_report(_by_hand(sources, (7, 6, 5)))
    assert "orientation_consistent" in failed(report)
    assert "differs by up to 1" in report.check("orientation_consistent").detail


def test_two_image_sizes_fail_single_image_size() -> None:
    small = make_series(_pixels(3, rows=6, columns=7))
    large = make_series(_pixels(3, rows=8, columns=7), positions=[(0, 0, z) for z in (3.0, 4.0, 5.0)])
    report = qa_report(_by_hand(small + large, (7, 6, 6)))
    assert failed(report) == {"single_image_size"}
    assert "6x7" in report.check("single_image_size").detail and "8x7" in report.check("single_image_size").detail


def test_a_sheared_affine_counts_as_tilt_and_a_regular_one_passes() -> None:
    regular = stack_from_affine(np.diag([0.5, 0.5, 2.0, 1.0]), (10, 12, 6))
    assert failed(report_from_stack(regular)) == set()
    sheared = np.diag([0.5, 0.5, 2.0, 1.0])
    sheared[1, 2] = 2.0 * np.tan(np.radians(10))
    report = report_from_stack(stack_from_affine(sheared, (10, 12, 6)))
    assert failed(report) == {"no_tilt"}
    assert report.tilt_deg == pytest.approx(10.0, abs=1e-9)
    assert report.geometry_source == "affine"


def test_headers_that_do_not_describe_the_volume_fall_back_to_its_affine() -> None:
    # e.g. a vendor mosaic the headers describe as one big image per file
    report = qa_report(_by_hand(make_series(_pixels(5)), (8, 8, 20)))
    assert report.geometry_source == "affine"
    assert "not the volume's 8x8x20 voxels" in report.note


def test_report_json_is_serialisable_and_has_every_check() -> None:
    sources = make_series(_pixels(5), drop=[2])
    document = json.loads(json.dumps(qa_report(_scanned(sources)).to_json()))
    assert {c["name"] for c in document["checks"]} == CHECKS
    assert document["n_slices"] == 4
    assert document["passed"] is False
    assert set(document["spacing_mm"]) == {"min", "median", "max", "relative_variation"}
    assert len(document["positions_along_normal_mm"]) == 4
    text = json.dumps(document)
    assert "Phantom" not in text and "SYN0001" not in text  # no patient data in the report


def test_real_ct_series_passes_with_two_mm_steps() -> None:
    report = qa_report(_scanned_path("ct_siemens_20sl_uncompressed_derived", "dicom"))
    assert report.passed, [c.detail for c in report.checks if not c.passed]
    assert report.n_slices == 20
    np.testing.assert_allclose(np.diff(report.positions_mm), 2.0, atol=1e-6)


def test_real_4d_series_counts_images_per_position() -> None:
    report = qa_report(_scanned_path("mr_philips_epi_4d", "dicom"))
    assert (report.n_slices, report.n_images) == (9, 27)
    assert report.spacing_median_mm == pytest.approx(8.0, abs=1e-3)
    assert report.passed


def test_real_enhanced_file_uses_per_frame_positions() -> None:
    report = qa_report(_scanned_path("mr_philips_enhanced_multiframe", "dicom"))
    assert report.geometry_source == "frames"
    assert report.n_slices == 8
    assert report.spacing_median_mm == pytest.approx(1.2, abs=1e-3)


def _scanned_path(*parts: str) -> Series:
    from core.sources import read_paths

    return _scanned(read_paths([data_path(*parts)]))
