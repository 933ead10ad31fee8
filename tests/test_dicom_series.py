"""The DICOM reader against real files (dcm2niix as the geometry oracle) and synthetic series.

Geometry is compared in world space: two volumes agree when the world positions of
their voxel centres agree, whatever axis order and flips each tool chose.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from core.dicom_series import is_dicom, scan_dicom
from core.errors import MissingCodecError, UnsupportedFileError
from core.series import ScanResult, Series
from core.sources import Limits, Source, read_paths
from core.volume import LPS_TO_RAS, Volume
from tests.conftest import DATA, data_path, expected_entries
from tests.dicom_factory import (
    AXIAL,
    CORONAL,
    SAGITTAL,
    lps_affine,
    make_enhanced,
    make_series,
    to_bytes,
    with_transfer_syntax,
    write_sources,
)

# --- helpers -------------------------------------------------------------------


def corners(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World coordinates of the 8 corner voxel centres, sorted so two grids compare as sets."""
    grid = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1).T
    world = grid @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return world[np.lexsort(np.round(world, 3).T[::-1])]


def assert_same_world(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-3) -> None:
    assert sorted(shape_a[:3]) == sorted(shape_b[:3]), (shape_a, shape_b)
    np.testing.assert_allclose(corners(shape_a, affine_a), corners(shape_b, affine_b), atol=atol)


def resample_like(volume: Volume, reference: np.ndarray, reference_affine: np.ndarray) -> np.ndarray:
    """The reference's voxels at our voxel positions, when both grids are permutations of each other."""
    mapping = np.linalg.inv(reference_affine) @ volume.affine
    permutation = np.round(mapping[:3, :3])
    np.testing.assert_allclose(mapping[:3, :3], permutation, atol=1e-4)
    offset = np.round(mapping[:3, 3])
    np.testing.assert_allclose(mapping[:3, 3], offset, atol=1e-3)
    spatial = volume.array.shape[:3]
    index = np.indices(spatial).reshape(3, -1)
    source = (permutation.astype(int) @ index) + offset.astype(int)[:, None]
    return reference[tuple(source)].reshape(spatial + reference.shape[3:])


def only_series(result: ScanResult) -> Series:
    assert not result.errors, result.errors
    assert len(result.series) == 1, [s.info for s in result.series]
    return result.series[0]


def load_folder(path: Path) -> ScanResult:
    return scan_dicom(read_paths([path]))


def dcm2niix_binary() -> str:
    candidate = Path(sys.executable).parent / "dcm2niix"
    found = str(candidate) if candidate.exists() else shutil.which("dcm2niix")
    if not found:
        pytest.skip("dcm2niix (pip package dcm2niix) is not installed")
    return found


def run_dcm2niix(folder: Path, out: Path) -> list[nib.Nifti1Image]:
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [dcm2niix_binary(), "-z", "n", "-b", "n", "-f", "%s_%j", "-o", str(out), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    images = [nib.load(p) for p in sorted(out.glob("*.nii")) if "_Eq" not in p.name and "_Tilt" not in p.name]
    assert images, done.stdout
    return images


def marker_phantom(shape_krc: tuple[int, int, int], dtype=np.uint16) -> np.ndarray:
    """Every voxel distinct: a flipped or swapped axis changes the values."""
    k, r, c = shape_krc
    values = np.arange(k * r * c).reshape(k, r, c) % 4000
    return values.astype(dtype)


def expected_grid(pixels_krc: np.ndarray) -> np.ndarray:
    """The factory's pixels[k, row, column] as our (column, row, k) grid."""
    return np.moveaxis(pixels_krc, (0, 1, 2), (2, 1, 0))


def check_synthetic(volume: Volume, pixels_krc: np.ndarray, affine_lps: np.ndarray, scale=(1.0, 0.0)) -> None:
    """Values and world positions both match the analytic description."""
    expected = expected_grid(pixels_krc).astype(np.float64) * scale[0] + scale[1]
    ours = resample_like(volume, expected, LPS_TO_RAS @ affine_lps)
    np.testing.assert_allclose(volume.array, ours, rtol=1e-6, atol=1e-3)


# --- real data against dcm2niix ------------------------------------------------------

# Units where dcm2niix has no usable output: compare with SimpleITK's size instead.
NO_DCM2NIIX = {
    ("single_files_pydicom", "dicom/JPGExtended.dcm"): "dcm2niix cannot decode 12-bit JPEG extended",
    ("single_files_pydicom", "dicom/image_dfl.dcm"): "dcm2niix does not support deflate and writes a 1x1x1 stub",
}


def _dicom_units() -> list[tuple[str, str]]:
    units = []
    for entry in expected_entries():
        if entry["kind"].startswith("dicom"):
            for unit in entry["units"]:
                if "dcm2niix" in unit:
                    units.append((entry["name"], unit["unit"]))
    return units or [("missing", "missing")]


def _unit_record(name: str, unit: str) -> dict:
    for entry in expected_entries():
        if entry["name"] == name:
            for record in entry["units"]:
                if record["unit"] == unit:
                    return record
    pytest.skip(f"expected.json not found beside the repository ({DATA})")


@pytest.mark.parametrize(("entry", "unit"), _dicom_units(), ids=lambda v: str(v))
def test_real_data_matches_dcm2niix_in_world_space(entry: str, unit: str) -> None:
    record = _unit_record(entry, unit)
    path = data_path(entry, *unit.rstrip("/").split("/"))
    result = scan_dicom(read_paths([path]))
    series = only_series(result)
    volume = series.load()
    assert volume.shape == series.info.shape
    assert np.array_equal(volume.affine, series.info.affine)
    if (entry, unit) in NO_DCM2NIIX:
        size = record["sitk"]["size"] if isinstance(record["sitk"], dict) else record["sitk"][0]["size"]
        assert sorted(volume.spatial_shape) == sorted([*size, 1][:3])
        return
    outputs = record["dcm2niix"]["outputs"]
    assert len(outputs) == 1
    reference = outputs[0]
    assert sorted(volume.spatial_shape) == sorted(reference["shape"][:3])
    assert volume.shape[3:4] == tuple(reference["shape"][3:4]) or volume.is_rgb
    assert_same_world(volume.shape, volume.affine, reference["shape"], np.array(reference["affine"]))


def test_j2k_and_uncompressed_ct_are_voxel_identical_in_hounsfield_units() -> None:
    j2k = only_series(load_folder(data_path("ct_siemens_j2k_20sl", "dicom")))
    raw = only_series(load_folder(data_path("ct_siemens_20sl_uncompressed_derived", "dicom")))
    a, b = j2k.load(), raw.load()
    assert a.array.dtype == np.int16 and j2k.info.dtype == "int16"
    assert np.array_equal(a.array, b.array)
    assert np.array_equal(a.affine, b.affine)
    assert (int(a.array.min()), int(a.array.max())) == (-1024, 1839)
    assert a.unit == "HU" and a.modality == "CT"
    assert a.spacing_mm == pytest.approx((0.9765625, 0.9765625, 2.0))  # from positions, not SliceThickness 3
    assert [(w.center, w.width, w.name) for w in j2k.info.windows] == [(40, 300, "WINDOW1"), (300, 1500, "WINDOW2")]
    assert len(j2k.headers) == 20 and all("PixelData" not in ds for ds in j2k.headers)
    assert j2k.info.id == "0-1" and j2k.info.description == "CT Body 3.0"
    # headers are in slice order: positions along the normal increase monotonically
    z = [float(ds.ImagePositionPatient[2]) for ds in j2k.headers]
    assert z == sorted(z)


def test_mosaic_transfer_syntaxes_decode_to_identical_pixels_matching_dcm2niix() -> None:
    folder = data_path("transfer_syntaxes_siemens_mosaic", "dicom")
    volumes = []
    for n in range(1, 10):
        series = only_series(scan_dicom(read_paths([folder / f"{n}.dcm"])))
        volumes.append(series.load())
    for volume in volumes[1:]:
        assert np.array_equal(volume.array, volumes[0].array)
        assert np.array_equal(volume.affine, volumes[0].affine)
    assert volumes[0].shape == (64, 64, 35)
    assert volumes[0].spacing_mm == pytest.approx((3.25, 3.25, 3.6), abs=1e-6)
    reference = nib.load(data_path("transfer_syntaxes_siemens_mosaic", "ref_dcm2niix", "1.nii"))
    ours_in_ref = resample_like(volumes[0], np.asarray(reference.dataobj), reference.affine)
    assert np.array_equal(volumes[0].array, ours_in_ref)


def test_mosaic_without_csa_header_is_refused_with_a_precise_message() -> None:
    path = data_path("transfer_syntaxes_siemens_mosaic", "dicom", "1.dcm")
    ds = pydicom.dcmread(path)
    del ds[0x00291010]
    result = scan_dicom([Source("stripped.dcm", to_bytes(ds))])
    assert not result.series
    assert len(result.errors) == 1 and result.errors[0].source == "stripped.dcm"
    assert "Siemens mosaic" in result.errors[0].message and "CSA" in result.errors[0].message


def test_philips_classic_epi_becomes_4d_in_dcm2niix_volume_order() -> None:
    series = only_series(load_folder(data_path("mr_philips_epi_4d", "dicom")))
    volume = series.load()
    assert volume.shape == (64, 64, 9, 3)
    assert volume.spacing_mm == pytest.approx((3.75, 3.75, 8.0), abs=1e-4)
    assert volume.n_frames == 3 and len(series.info.sources) == 27
    assert any("time series" in w and "temporal position" in w for w in series.info.warnings)
    reference = nib.load(data_path("mr_philips_epi_4d", "ref_dcm2niix", "EPI_asc_CLEAR_201.nii"))
    stored = np.asarray(reference.dataobj.get_unscaled()).astype(np.float64)
    # dcm2niix's default (-p y) gives Philips "precise" values: (PV * RS + RI) / (RS * SS).
    ds = series.headers[0]
    rs, ri = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    ss = float(ds[0x2005100E].value)
    expected = (resample_like(volume, stored, reference.affine) * rs + ri) / (rs * ss)
    np.testing.assert_allclose(volume.array, expected, rtol=1e-6)


def test_enhanced_multiframe_matches_dicom2nifti_ground_truth() -> None:
    series = only_series(load_folder(data_path("mr_philips_enhanced_multiframe", "dicom")))
    volume = series.load()
    assert sorted(volume.shape) == [8, 256, 256]
    assert sorted(volume.spacing_mm) == pytest.approx([1.0, 1.0, 1.2], abs=1e-4)
    truth = nib.load(data_path("mr_philips_enhanced_multiframe", "ref_dicom2nifti", "001_ground_truth.nii.gz"))
    values = np.asarray(truth.dataobj)[..., 0]  # dicom2nifti: displayed values (PV * RS + RI)
    # We follow dcm2niix's default Philips "precise" scaling: displayed / (RS * SS).
    frame = series.headers[0].PerFrameFunctionalGroupsSequence[0]
    rs = float(frame.PixelValueTransformationSequence[0].RescaleSlope)
    ss = float(frame[0x2005140F][0][0x2005100E].value)
    np.testing.assert_allclose(volume.array, resample_like(volume, values, truth.affine) / (rs * ss), rtol=1e-5)
    assert series.info.windows[0].center == pytest.approx(326 / (rs * ss))


def test_monochrome1_is_flagged_and_values_stay_physical() -> None:
    series = only_series(
        scan_dicom(read_paths([data_path("single_files_pydicom", "dicom", "CR_MONOCHROME1_6154.dcm")]))
    )
    volume = series.load()
    assert volume.display_inverted
    ds = pydicom.dcmread(data_path("single_files_pydicom", "dicom", "CR_MONOCHROME1_6154.dcm"))
    expected = ds.pixel_array.T.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert volume.array.dtype == np.float32  # slope 0.684
    np.testing.assert_allclose(volume.array[::-1, ::-1, 0], expected, rtol=1e-6)


def test_colour_files_load_as_rgb_uint8() -> None:
    folder = data_path("single_files_pydicom", "dicom")
    for name, frames in (("SC_rgb_jpeg_dcmtk.dcm", 1), ("examples_ybr_color.dcm", 30)):
        series = only_series(scan_dicom(read_paths([folder / name])))
        volume = series.load()
        assert series.info.is_rgb and volume.is_rgb and volume.array.dtype == np.uint8
        assert volume.shape[2:] == (frames, 3)
        ds = pydicom.dcmread(folder / name)
        first = ds.pixel_array if frames == 1 else ds.pixel_array[0]
        np.testing.assert_array_equal(volume.array[::-1, ::-1, 0, :], first.transpose(1, 0, 2))


def test_a_whole_folder_of_unrelated_files_accounts_for_every_file() -> None:
    folder = data_path("single_files_pydicom", "dicom")
    sources = read_paths([folder])
    result = scan_dicom(sources)
    used = [name for s in result.series for name in s.info.sources]
    skipped = [s.source for s in result.skipped]
    errors = [p.source for p in result.errors]
    assert sorted(used + skipped + errors) == sorted(s.name for s in sources)
    assert len(set(used)) == len(used)
    ids = [s.info.id for s in result.series]
    assert len(set(ids)) == len(ids)
    # the four re-encodings of MR_small share its SOP Instance UID: used once
    assert sum("MR_small" in name for name in skipped) == 4


# --- pydicom's bundled files ------------------------------------------------------------


def _bundled(name: str) -> Source:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Source(name=name, data=Path(path).read_bytes())


def test_bundled_ct_small_in_hounsfield_units_matches_dcm2niix_figures() -> None:
    series = only_series(scan_dicom([_bundled("CT_small.dcm")]))
    volume = series.load()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert volume.unit == "HU" and volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array[::-1, ::-1, 0], ds.pixel_array.T.astype(np.int32) - 1024)
    # dcm2niix: slice thickness of a single slice from SliceThickness (5 mm)
    reference = np.array(
        [[-0.661468, 0, 0, 158.135803], [0, 0.661468, 0, 95.029297], [0, 0, 5.0, -75.699997], [0, 0, 0, 1]]
    )
    assert_same_world(volume.shape, volume.affine, (128, 128, 1), reference)


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_bundled_mr_small_variants_decode_like_the_uncompressed_file(name: str) -> None:
    plain = only_series(scan_dicom([_bundled("MR_small.dcm")])).load()
    other = only_series(scan_dicom([_bundled(name)])).load()
    assert np.array_equal(plain.array, other.array)
    assert np.array_equal(plain.affine, other.affine)
    # single slice: third voxel size from SliceThickness 0.8 mm, as dcm2niix does
    assert plain.spacing_mm == pytest.approx((0.3125, 0.3125, 0.8))


def test_bundled_missing_slice_series_warns_with_the_values() -> None:
    folder = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "77654033" / "CT2"
    if not folder.exists():
        pytest.skip("pydicom's dicomdirtests not installed")
    series = only_series(scan_dicom(read_paths([folder])))
    text = " ".join(series.info.warnings)
    assert "202.5 mm" in text and "1.25 mm" in text and "missing" in text
    assert "mean step 68.33 mm" in text
    assert "18-182" in text and "4 images" in text
    volume = series.load()
    # first and last slices are where the files say
    first_last = volume.affine @ np.array([[0, 0, 0, 1], [0, 0, volume.shape[2] - 1, 1]]).T
    assert sorted(first_last[2]) == pytest.approx([-99.480003, 105.519997])


def test_dicomdir_and_reports_are_skipped_with_a_reason() -> None:
    sources = [_bundled("reportsi.dcm"), _bundled("rtstruct.dcm")]
    dicomdir = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "DICOMDIR"
    if dicomdir.exists():
        sources.append(Source("DICOMDIR", dicomdir.read_bytes()))
    result = scan_dicom(sources)
    assert not result.series and not result.errors
    reasons = {s.source: s.reason for s in result.skipped}
    assert "not an image" in reasons["reportsi.dcm"] and "SR" in reasons["reportsi.dcm"]
    assert "RT Structure Set" in reasons["rtstruct.dcm"]
    if dicomdir.exists():
        assert "DICOMDIR" in reasons["DICOMDIR"]


# --- is_dicom -----------------------------------------------------------------------------


def test_is_dicom_recognises_part10_and_bare_datasets_but_not_junk() -> None:
    part10 = make_series(marker_phantom((1, 4, 4)))[0].data
    assert is_dicom(part10)
    ds = pydicom.dcmread(io.BytesIO(part10))
    expected = ds.pixel_array
    for implicit in (False, True):
        # A bare dataset: no preamble, no meta group, starts with (0008,0005).
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
        write_dataset(buffer, ds)
        bare = buffer.getvalue()
        assert bare[:2] == b"\x08\x00"
        assert is_dicom(bare), implicit
        volume = only_series(scan_dicom([Source("bare.dcm", bare)])).load()
        np.testing.assert_array_equal(volume.array[::-1, ::-1, 0], expected.T)
    assert not is_dicom(b"DICM" * 3)
    assert not is_dicom(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    assert not is_dicom(b"hello, not a scan" * 20)
    assert not is_dicom(b"")


# --- synthetic series: geometry --------------------------------------------------------------


def _oblique_iop() -> tuple[float, ...]:
    row = np.array([np.cos(0.3), np.sin(0.3) * np.cos(0.2), np.sin(0.3) * np.sin(0.2)])
    col = np.cross(row, [0.0, 0.0, 1.0])
    col = np.cross(col, row)
    col = -col / np.linalg.norm(col)
    return (*row, *col)


@pytest.mark.parametrize(
    "orientation",
    [AXIAL, CORONAL, SAGITTAL, (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0), (0.0, -1.0, 0.0, 1.0, 0.0, 0.0), "oblique"],
    ids=["axial", "coronal", "sagittal", "flipped-axial", "rotated-axial", "oblique"],
)
@pytest.mark.parametrize("step", [2.5, -2.5], ids=["step+", "step-"])
def test_synthetic_orientations_give_the_analytic_affine(orientation, step: float) -> None:
    iop = _oblique_iop() if orientation == "oblique" else orientation
    affine = lps_affine(iop, (0.7, 0.9), (-12.5, 30.25, 41.0), step)
    pixels = marker_phantom((5, 6, 7))
    series = only_series(scan_dicom(make_series(pixels, affine=affine, shuffle_seed=3)))
    volume = series.load()
    assert volume.axcodes == "RAS"
    check_synthetic(volume, pixels, affine)
    assert not series.info.warnings


def test_shuffled_files_with_lying_instance_numbers_are_sorted_by_position() -> None:
    pixels = marker_phantom((9, 4, 5))
    affine = lps_affine(AXIAL, (1.0, 1.0), (0, 0, 0), 3.0)
    # instance numbers run against the positions, and file order is random
    sources = make_series(pixels, affine=affine, instance_numbers=list(range(9, 0, -1)), shuffle_seed=7)
    volume = only_series(scan_dicom(sources)).load()
    check_synthetic(volume, pixels, affine)


def test_rescale_slope_and_intercept_are_applied_in_order() -> None:
    pixels = marker_phantom((3, 4, 5))
    affine = lps_affine()
    integral = only_series(scan_dicom(make_series(pixels, affine=affine, rescale=(1.0, -1024.0), bits_stored=12)))
    assert integral.info.dtype == "int16"
    check_synthetic(integral.load(), pixels, affine, scale=(1.0, -1024.0))
    scaled = only_series(scan_dicom(make_series(pixels, affine=affine, rescale=(0.25, 10.0), modality="MR")))
    assert scaled.info.dtype == "float32"
    volume = scaled.load()
    assert volume.array.dtype == np.float32
    check_synthetic(volume, pixels, affine, scale=(0.25, 10.0))
    # slope 2 is an integer but leaves the stored scale: still float32 (no silent int overflow)
    doubled = only_series(scan_dicom(make_series(pixels, affine=affine, rescale=(2.0, 0.0), modality="MR")))
    check_synthetic(doubled.load(), pixels, affine, scale=(2.0, 0.0))


def test_signed_ct_with_intercept_stays_int16_and_overflow_is_refused_not_wrapped() -> None:
    pixels = (marker_phantom((2, 3, 4)).astype(np.int16) - 2000).astype(np.int16)
    series = only_series(scan_dicom(make_series(pixels, rescale=(1.0, -1024.0))))
    assert series.info.dtype == "int16"
    check_synthetic(series.load(), pixels, lps_affine(), scale=(1.0, -1024.0))
    extreme = pixels.copy()
    extreme[0, 0, 0] = -32000  # -33024 HU does not fit int16
    broken = only_series(scan_dicom(make_series(extreme, rescale=(1.0, -1024.0))))
    with pytest.raises(UnsupportedFileError, match="do not fit int16"):
        broken.load()


def test_monochrome1_synthetic_sets_display_inverted() -> None:
    pixels = marker_phantom((2, 3, 3))
    series = only_series(scan_dicom(make_series(pixels, photometric="MONOCHROME1", modality="OT")))
    volume = series.load()
    assert volume.display_inverted
    check_synthetic(volume, pixels, lps_affine())


def test_gantry_tilt_is_reported_with_its_angle_and_kept_as_shear() -> None:
    angle = 15.0
    spacing = 2.0
    # CT tilt: each slice is shifted along the column (y) direction by spacing * tan(angle)
    step = np.array([0.0, spacing * np.tan(np.radians(angle)), spacing])
    affine = lps_affine(AXIAL, (0.5, 0.5), (-10, -20, -30), step)
    pixels = marker_phantom((6, 5, 4))
    series = only_series(scan_dicom(make_series(pixels, affine=affine, gantry_tilt=angle)))
    text = " ".join(series.info.warnings)
    assert "gantry tilt of 15.00 degrees" in text and "(0018,1120)" in text
    volume = series.load()
    check_synthetic(volume, pixels, affine)  # world positions right, shear included


def test_tiny_rounding_of_oblique_positions_gives_no_warning() -> None:
    affine = lps_affine(_oblique_iop(), (1.0, 1.0), (5.0, 6.0, 7.0), 1.5)
    exact = [(affine @ [0, 0, k, 1])[:3] for k in range(12)]
    noisy = [p + np.random.default_rng(k).uniform(-0.01, 0.01, 3) for k, p in enumerate(exact)]
    series = only_series(scan_dicom(make_series(marker_phantom((12, 3, 3)), affine=affine, positions=noisy)))
    assert series.info.warnings == ()
    np.testing.assert_allclose(sorted(series.info.spacing_mm), (1.0, 1.0, 1.5), atol=0.01)


def test_uneven_spacing_is_reported_never_silent() -> None:
    z = [0.0, 2.0, 4.0, 6.5, 8.5, 10.5]
    positions = [(0.0, 0.0, v) for v in z]
    series = only_series(scan_dicom(make_series(marker_phantom((6, 3, 3)), positions=positions)))
    text = " ".join(series.info.warnings)
    assert "2-2.5 mm" in text and "median 2 mm" in text and "mean step 2.1 mm" in text
    assert series.load().spacing_mm[2] == pytest.approx(2.1)


def test_missing_slice_is_reported_with_the_gap() -> None:
    affine = lps_affine(AXIAL, (1, 1), (0, 0, 0), 1.25)
    series = only_series(scan_dicom(make_series(marker_phantom((10, 3, 3)), affine=affine, drop=[4, 5])))
    text = " ".join(series.info.warnings)
    assert "3.75 mm after slice 4" in text and "missing" in text
    assert "Instance Number runs 1-10 (10 numbers) but 8 images" in text


def test_two_series_with_identical_geometry_are_never_merged() -> None:
    pixels = marker_phantom((4, 3, 3))
    study = pydicom.uid.generate_uid()
    a = make_series(pixels, study_uid=study, series_number=2, name_prefix="A")
    b = make_series(pixels + 1, study_uid=study, series_number=3, name_prefix="B")
    result = scan_dicom(a + b)
    assert not result.errors
    assert sorted(s.info.shape for s in result.series) == [(3, 3, 4), (3, 3, 4)]
    assert sorted(s.info.id for s in result.series) == ["2-1", "3-1"]
    assert sorted(len(s.info.sources) for s in result.series) == [4, 4]


def test_mixed_orientation_in_one_series_is_split_into_volumes_with_a_warning() -> None:
    pixels = marker_phantom((6, 4, 4))
    # four axial slices along z, two coronal ones along y: a localizer-like mix in one series
    positions = [(0.0, 0.0, float(k)) for k in range(4)] + [(0.0, 10.0, 0.0), (0.0, 12.0, 0.0)]
    sources = make_series(pixels, positions=positions, orientation_overrides={4: CORONAL, 5: CORONAL})
    result = scan_dicom(sources)
    assert not result.errors
    assert sorted(len(s.info.sources) for s in result.series) == [2, 4]
    for series in result.series:
        assert any("2 different orientations" in w for w in series.info.warnings)
    assert len({s.info.id for s in result.series}) == 2


def test_duplicate_positions_without_a_time_attribute_are_refused() -> None:
    pixels = marker_phantom((3, 3, 3))
    uid = pydicom.uid.generate_uid()
    sources = make_series(pixels, series_uid=uid, name_prefix="A") + make_series(
        pixels, series_uid=uid, name_prefix="B"
    )
    result = scan_dicom(sources)
    assert not result.series
    assert sorted(p.source for p in result.errors) == sorted(s.name for s in sources)
    assert "not a time series" in result.errors[0].message


def test_classic_time_series_is_4d_in_acquisition_order() -> None:
    uid = pydicom.uid.generate_uid()
    volumes = [marker_phantom((4, 3, 5)) + 1000 * t for t in range(3)]
    sources: list[Source] = []
    for t in (2, 0, 1):  # written out of order
        sources += make_series(
            volumes[t].astype(np.uint16),
            series_uid=uid,
            per_slice={"TemporalPositionIdentifier": [t + 1] * 4},
            instance_numbers=[t * 4 + k + 1 for k in range(4)],
            name_prefix=f"T{t}_",
        )
    series = only_series(scan_dicom(sources))
    volume = series.load()
    assert volume.shape == (5, 3, 4, 3)
    for t in range(3):
        check_synthetic(Volume(volume.array[..., t], volume.affine), volumes[t], lps_affine())
    assert series.headers[0].TemporalPositionIdentifier == 1


def test_enhanced_multiframe_with_time_dimension_and_shuffled_frames() -> None:
    affine = lps_affine(SAGITTAL, (0.8, 0.8), (10, -5, 20), 1.5)
    volumes = [marker_phantom((4, 5, 6)) + 500 * t for t in range(2)]
    frames, positions, times = [], [], []
    order = [(t, k) for k in (3, 1, 0, 2) for t in (1, 0)]
    for t, k in order:
        frames.append(volumes[t][k])
        positions.append((affine @ [0, 0, k, 1])[:3])
        times.append(t + 1)
    source = make_enhanced(np.array(frames, dtype=np.uint16), positions, orientation=SAGITTAL,
                           pixel_spacing=(0.8, 0.8), temporal_indices=times)  # fmt: skip
    series = only_series(scan_dicom([source]))
    volume = series.load()
    assert volume.n_frames == 2
    for t in range(2):
        check_synthetic(Volume(volume.array[..., t], volume.affine), volumes[t], affine)


def test_single_derived_image_is_skipped_only_beside_its_study() -> None:
    study = pydicom.uid.generate_uid()
    volume = make_series(marker_phantom((4, 3, 3)), study_uid=study, name_prefix="CT")
    capture = make_series(
        marker_phantom((1, 3, 3)), study_uid=study, series_number=99, image_type=("DERIVED", "SECONDARY"),
        name_prefix="SC", modality="OT",
    )  # fmt: skip
    result = scan_dicom(volume + capture)
    assert len(result.series) == 1 and result.skipped[0].source == "SC0000.dcm"
    assert "DERIVED" in result.skipped[0].reason
    alone = scan_dicom(capture)
    assert len(alone.series) == 1


def test_localizer_is_skipped() -> None:
    scout = make_series(marker_phantom((1, 3, 3)), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    result = scan_dicom(scout)
    assert not result.series and "localizer" in result.skipped[0].reason


def test_missing_codec_names_the_transfer_syntax_and_what_to_do() -> None:
    source = make_series(marker_phantom((1, 4, 4)))[0]
    exotic = with_transfer_syntax(source, "1.2.840.10008.1.2.4.93")  # JPEG 2000 Part 2: no Python decoder
    series = only_series(scan_dicom([exotic]))
    assert any("JPEG 2000 Part 2" in w for w in series.info.warnings)
    with pytest.raises(MissingCodecError, match=r"JPEG 2000 Part 2 Multi-component.*1\.2\.840\.10008\.1\.2\.4\.93"):
        series.load()


def test_voxel_cap_is_checked_before_loading() -> None:
    result = scan_dicom(make_series(marker_phantom((4, 8, 8))), Limits(max_voxels=100))
    assert not result.series and len(result.errors) == 4
    assert "256 voxels" in result.errors[0].message


def test_unreadable_and_non_dicom_files_are_errors_not_crashes() -> None:
    good = make_series(marker_phantom((2, 3, 3)))
    junk = Source("notes.txt", b"hello" * 100)
    header_only = Source("cut-in-header.dcm", good[0].data[:300])
    result = scan_dicom([*good, junk, header_only])
    assert [p.source for p in result.errors] == ["notes.txt"]
    assert [s.source for s in result.skipped] == ["cut-in-header.dcm"]  # no Rows: not an image
    assert len(result.series) == 1
    cut_pixels = Source("cut-in-pixels.dcm", make_series(marker_phantom((1, 8, 8)))[0].data[:-40])
    series = only_series(scan_dicom([cut_pixels]))
    with pytest.raises(UnsupportedFileError, match="cut-in-pixels.dcm"):
        series.load()


# --- dcm2niix as oracle on synthetic files -------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["oblique", "sagittal", "coronal-flipped", "rescaled-descending"],
)
def test_synthetic_affines_agree_with_dcm2niix(case: str, tmp_path: Path) -> None:
    rescale = None
    if case == "oblique":
        affine = lps_affine(_oblique_iop(), (0.9, 0.7), (-40.5, 12.25, 60.0), 3.0)
    elif case == "sagittal":
        affine = lps_affine(SAGITTAL, (1.1, 1.3), (22.0, -80.0, 95.0), 4.0)
    elif case == "coronal-flipped":
        affine = lps_affine((-1.0, 0.0, 0.0, 0.0, 0.0, -1.0), (0.6, 0.6), (50.0, 10.0, 70.0), 2.0)
    else:
        affine = lps_affine(AXIAL, (0.5, 0.5), (-64.0, -64.0, 100.0), -1.25)
        rescale = (1.0, -1024.0)
    pixels = marker_phantom((7, 10, 12))
    sources = make_series(pixels, affine=affine, rescale=rescale, shuffle_seed=11)
    folder = write_sources(sources, tmp_path / "dicom")
    images = run_dcm2niix(folder, tmp_path / "nifti")
    assert len(images) == 1
    reference = images[0]
    volume = only_series(scan_dicom(sources)).load()
    assert_same_world(volume.shape, volume.affine, reference.shape, reference.affine, atol=1e-3)
    values = np.asarray(reference.dataobj.get_unscaled()).astype(np.float64)
    values = values * float(reference.dataobj.slope) + float(reference.dataobj.inter)
    np.testing.assert_allclose(volume.array, resample_like(volume, values, reference.affine), atol=1e-3)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_uncompressed_fast_path_equals_pydicom_including_unused_high_bits(signed: bool, implicit: bool) -> None:
    rng = np.random.default_rng(5)
    dtype = np.int16 if signed else np.uint16
    # 12 bits stored; the 4 high bits hold garbage (old overlay planes) that must be ignored
    raw = rng.integers(0, 2**16, size=(2, 6, 7), dtype=np.uint16).view(dtype)
    sources = make_series(raw, bits_stored=12, modality="MR")
    if implicit:
        converted = []
        for source in sources:
            ds = pydicom.dcmread(io.BytesIO(source.data))
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
            converted.append(Source(source.name, to_bytes(ds)))
        sources = converted
    volume = only_series(scan_dicom(sources)).load()
    expected = np.stack([pydicom.dcmread(io.BytesIO(s.data)).pixel_array for s in sources])
    assert np.abs(expected).max() < 2**12
    check_synthetic(volume, expected, lps_affine())


def test_several_mosaics_of_one_series_form_a_time_series() -> None:
    path = data_path("transfer_syntaxes_siemens_mosaic", "dicom", "1.dcm")
    sources = []
    for t in (3, 1, 2):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.AcquisitionNumber = t
        ds.InstanceNumber = t
        sources.append(Source(f"vol{t}.dcm", to_bytes(ds)))
    series = only_series(scan_dicom(sources))
    volume = series.load()
    assert volume.shape == (64, 64, 35, 3)
    assert [ds.AcquisitionNumber for ds in series.headers] == [1, 2, 3]
    single = only_series(scan_dicom([Source("one.dcm", path.read_bytes())])).load()
    assert np.array_equal(volume.affine, single.affine)
    assert np.array_equal(volume.array[..., 1], single.array)


def test_two_echoes_in_one_series_become_two_volumes_and_say_so() -> None:
    uid = pydicom.uid.generate_uid()
    first = marker_phantom((3, 4, 4))
    sources = make_series(first, series_uid=uid, extra={"EchoNumbers": 1}, name_prefix="E1_")
    sources += make_series(first + 7, series_uid=uid, extra={"EchoNumbers": 2}, name_prefix="E2_")
    result = scan_dicom(sources)
    assert not result.errors and len(result.series) == 2
    assert sorted(s.info.id for s in result.series) == ["1-1", "1-2"]
    for series in result.series:
        assert series.info.shape == (4, 4, 3)
        assert "holds 2 volumes" in series.info.warnings[0]
    volumes = sorted((s.load() for s in result.series), key=lambda v: int(v.array.min()))
    check_synthetic(volumes[0], first, lps_affine())
    check_synthetic(volumes[1], first + 7, lps_affine())


def test_header_claiming_a_billion_frames_is_refused_before_allocation() -> None:
    ds = pydicom.dcmread(io.BytesIO(make_series(marker_phantom((1, 4, 4)))[0].data))
    ds.NumberOfFrames = 10**9
    result = scan_dicom([Source("liar.dcm", to_bytes(ds))])
    assert not result.series
    assert "declares 1000000000 frames" in result.errors[0].message
