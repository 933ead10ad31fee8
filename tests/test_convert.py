"""Conversion: NIfTI against dcm2niix and dicom2nifti, DICOM round trips, _Tilt/_Eq resampling, NRRD/MHA, batch.

Oracles: the reference NIfTI files of the corpus, dcm2niix (run here on the same
files), SimpleITK (NRRD/MHA readers), and analytic phantoms whose voxel values are
a linear function of the world position, so any misplaced voxel shows.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from core.convert import (
    ConvertOptions,
    convert_batch,
    convert_series,
    mha_bytes,
    nrrd_bytes,
    output_stem,
    regularize,
    sanitize_name,
)
from core.dicom_export import encode_pixels, export_dicom_series, plan_slices
from core.errors import SeriesGeometryError
from core.io import scan
from core.qa import slice_stack, stack_from_affine
from core.series import Series
from core.sources import Source, read_paths
from core.volume import LPS_TO_RAS, Volume, reorient_to_ras
from tests.conftest import REPO, data_path, expected_entries
from tests.dicom_factory import lps_affine, make_series, write_sources

DCM2NIIX = REPO / ".venv" / "bin" / "dcm2niix"
GEOMETRY_TOLERANCE_MM = 1e-3


# --------------------------------------------------------------------------- helpers


def world_corners(shape, affine) -> np.ndarray:
    """World positions of the 8 corner voxels, sorted, so axis order and flips do not matter."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1).T
    world = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return world[np.lexsort(np.round(world, 2).T[::-1])]


def as_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return reorient_to_ras(np.asarray(array), np.asarray(affine, dtype=np.float64))


def nifti_of(data: bytes) -> nib.Nifti1Image:
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return nib.Nifti1Image.from_bytes(raw)


def scaled(image: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(image.dataobj).astype(np.float64)


def only_series(sources) -> Series:
    result = scan(sources)
    assert len(result.series) == 1, ([s.info.id for s in result.series], [e.message for e in result.errors])
    return result.series[0]


def run_dcm2niix(folder: Path, out: Path) -> list[Path]:
    if not DCM2NIIX.exists():
        pytest.skip(f"dcm2niix not installed at {DCM2NIIX}")
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [str(DCM2NIIX), "-z", "n", "-b", "n", "-f", "%s_%d", "-o", str(out), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return sorted(out.glob("*.nii"))


def assert_same_world(
    ours: nib.Nifti1Image, theirs: nib.Nifti1Image, *, values: str = "exact", tol: float = 0.0
) -> None:
    """Same grid in world space (within 1e-3 mm) and the same value at every world point."""
    a, a_affine = as_ras(scaled(ours), ours.affine)
    b, b_affine = as_ras(scaled(theirs), theirs.affine)
    if b.ndim == 4 and b.shape[3] == 1 and a.ndim == 3:
        b = b[..., 0]
    assert a.shape == b.shape
    np.testing.assert_allclose(a_affine, b_affine, atol=GEOMETRY_TOLERANCE_MM / max(a.shape[:3]))
    np.testing.assert_allclose(
        world_corners(a.shape, a_affine), world_corners(b.shape, b_affine), atol=GEOMETRY_TOLERANCE_MM
    )
    if values == "exact":
        np.testing.assert_array_equal(a, b)
    elif values == "within":
        np.testing.assert_allclose(a, b, atol=tol, rtol=0)
    elif values == "proportional":
        # Vendor scalings differ between converters (Philips display vs floating-point
        # values); the voxels must still be the same ones, up to one positive factor.
        factor = float(np.sum(a * b) / np.sum(b * b))
        assert factor > 0
        np.testing.assert_allclose(a, factor * b, rtol=1e-4, atol=1e-3 * np.abs(a).max())


def linear_phantom(affine_lps: np.ndarray, count: int, rows: int, columns: int) -> np.ndarray:
    """Stored pixels (K, rows, columns) equal to f(world) = 3x + 2y + 5z + 400 (LPS mm), rounded."""
    c, r, k = np.meshgrid(np.arange(columns), np.arange(rows), np.arange(count), indexing="xy")
    index = np.stack([c, r, k, np.ones_like(c)], axis=-1).astype(np.float64)
    world = index @ affine_lps.T
    return np.round(phantom_value(world[..., :3])).astype(np.int16).transpose(2, 0, 1)


def phantom_value(lps: np.ndarray) -> np.ndarray:
    return 3 * lps[..., 0] + 2 * lps[..., 1] + 5 * lps[..., 2] + 400


def voxel_world_lps(shape, affine_ras: np.ndarray) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape[:3]], indexing="ij"), axis=-1).reshape(-1, 3)
    world = np.c_[index, np.ones(len(index))] @ affine_ras.T
    return world[:, :3] * np.array([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- real data vs references

REFERENCE_CASES = [
    (
        "mr_siemens_gre_fieldmap_5sl/dicom",
        "mr_siemens_gre_fieldmap_5sl/ref_dcm2niix/2_gre_field_mapping_PMUlog.nii",
        "exact",
    ),
    ("mr_philips_epi_4d/dicom", "mr_philips_epi_4d/ref_dcm2niix/EPI_asc_CLEAR_201.nii", "proportional"),
    ("transfer_syntaxes_siemens_mosaic/dicom/1.dcm", "transfer_syntaxes_siemens_mosaic/ref_dcm2niix/1.nii", "exact"),
    ("transfer_syntaxes_siemens_mosaic/dicom/9.dcm", "transfer_syntaxes_siemens_mosaic/ref_dcm2niix/9.nii", "exact"),
    (
        "mr_philips_enhanced_multiframe/dicom",
        "mr_philips_enhanced_multiframe/ref_dicom2nifti/001_ground_truth.nii.gz",
        "proportional",
    ),
]


@pytest.mark.parametrize(
    ("source", "reference", "values"), REFERENCE_CASES, ids=[c[0].split("/")[0] for c in REFERENCE_CASES]
)
def test_nifti_matches_the_reference_converters(source: str, reference: str, values: str) -> None:
    series = only_series(read_paths([data_path(*source.split("/"))]))
    conversion = convert_series(series, ConvertOptions())
    ours = nifti_of(conversion.outputs[0][1])
    assert_same_world(ours, nib.load(data_path(*reference.split("/"))), values=values)
    assert ours.header["sform_code"] == ours.header["qform_code"] == 1


def _dicom_units() -> list[tuple[str, str, dict]]:
    units = []
    for entry in expected_entries():
        if not entry["kind"].startswith("dicom"):
            continue
        for unit in entry["units"]:
            outputs = (unit.get("dcm2niix") or {}).get("outputs") or []
            if len(outputs) == 1 and outputs[0]["shape"] != [1, 1, 1]:
                units.append((entry["name"], unit["unit"], outputs[0]))
    return units


@pytest.mark.parametrize(("entry", "unit", "expected"), _dicom_units(), ids=lambda v: v if isinstance(v, str) else "")
def test_nifti_world_geometry_equals_dcm2niix_for_every_dicom_entry(entry: str, unit: str, expected: dict) -> None:
    path = data_path(entry, *unit.strip("/").split("/"))
    result = scan(read_paths([path]))
    candidates = [s for s in result.series if sorted(s.info.shape[:3]) == sorted(expected["shape"][:3])]
    assert candidates, f"no series with dcm2niix's shape {expected['shape']}: {[s.info.shape for s in result.series]}"
    conversion = convert_series(candidates[0], ConvertOptions())
    ours = nifti_of(conversion.outputs[0][1])
    np.testing.assert_allclose(
        world_corners(ours.shape, ours.affine),
        world_corners(expected["shape"], expected["affine"]),
        atol=GEOMETRY_TOLERANCE_MM,
    )


def test_ct_nifti_equals_dcm2niix_run_here_voxel_for_voxel(tmp_path: Path) -> None:
    folder = data_path("ct_siemens_20sl_uncompressed_derived", "dicom")
    conversion = convert_series(only_series(read_paths([folder])), ConvertOptions())
    ours = nifti_of(conversion.outputs[0][1])
    assert ours.get_data_dtype() == np.int16  # HU kept as integers, not float
    produced = run_dcm2niix(folder, tmp_path / "out")
    assert len(produced) == 1
    assert_same_world(ours, nib.load(produced[0]), values="exact")


# --------------------------------------------------------------------------- NIfTI header


def test_nifti_header_has_codes_units_and_nothing_identifying() -> None:
    sources = make_series(linear_phantom(lps_affine(), 4, 5, 6), modality="CT", description="head")
    image = nifti_of(convert_series(only_series(sources), ConvertOptions()).outputs[0][1])
    header = image.header
    assert header["descrip"].item() == b"TomoForge"
    assert header["aux_file"].item() == b"" and header["intent_name"].item() == b""
    assert header["db_name"].item() == b""
    assert (int(header["sform_code"]), int(header["qform_code"])) == (1, 1)
    assert header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(image.get_qform(), image.get_sform(), atol=1e-5)  # orthogonal: qform exact too
    assert image.get_data_dtype() == np.int16
    raw = gzip.decompress(convert_series(only_series(sources), ConvertOptions()).outputs[0][1])[:352]
    assert b"Phantom" not in raw and b"SYN0001" not in raw


def test_rescaled_integers_are_stored_as_16_bit_with_scl_slope_and_inter() -> None:
    stored = (np.arange(4 * 5 * 6).reshape(4, 5, 6) * 7).astype(np.uint16)
    series = only_series(make_series(stored, modality="MR", rescale=(0.5, -10.0)))
    image = nifti_of(convert_series(series, ConvertOptions(compress=False)).outputs[0][1])
    assert image.get_data_dtype() in (np.uint16, np.int16)
    # nibabel moves scl_slope/scl_inter from the header to the array proxy on load
    assert (image.dataobj.slope, image.dataobj.inter) == (0.5, -10.0)
    expected, _ = as_ras(series.load().array, series.info.affine)
    ours, _ = as_ras(scaled(image), image.affine)
    np.testing.assert_array_equal(ours, expected.astype(np.float64))


def test_4d_nifti_has_the_repetition_time_in_pixdim4() -> None:
    positions = [(0, 0, z) for z in (0.0, 2.0, 4.0)] * 3
    sources = make_series(
        (np.arange(9 * 4 * 5) % 300).astype(np.int16).reshape(9, 4, 5),
        positions=positions,
        modality="MR",
        per_slice={"TemporalPositionIdentifier": [1, 1, 1, 2, 2, 2, 3, 3, 3]},
        extra={"RepetitionTime": "2500"},
    )
    image = nifti_of(convert_series(only_series(sources), ConvertOptions()).outputs[0][1])
    assert image.shape == (5, 4, 3, 3)
    assert image.header.get_zooms()[3] == pytest.approx(2.5)


def test_bids_sidecar_has_acquisition_parameters_in_seconds_and_no_patient_data() -> None:
    sources = make_series(
        np.zeros((3, 4, 5), dtype=np.int16),
        modality="MR",
        extra={"RepetitionTime": "2000", "EchoTime": "30", "FlipAngle": "90", "MagneticFieldStrength": "3"},
    )
    conversion = convert_series(only_series(sources), ConvertOptions(sidecar=True))
    names = [name for name, _ in conversion.outputs]
    assert names == ["1_synthetic.nii.gz", "1_synthetic.json"]
    text = conversion.outputs[1][1].decode()
    sidecar = json.loads(text)
    assert sidecar["RepetitionTime"] == pytest.approx(2.0)
    assert sidecar["EchoTime"] == pytest.approx(0.03)
    assert sidecar["FlipAngle"] == pytest.approx(90)
    assert sidecar["MagneticFieldStrength"] == pytest.approx(3)
    for identifying in ("Phantom", "SYN0001", "20240101", "120000", "PatientName", "StudyDate"):
        assert identifying not in text


# --------------------------------------------------------------------------- DICOM export

ROUND_TRIP_AFFINES = {
    # voxel -> RAS mm
    "axial": np.array([[0.8, 0, 0, -20], [0, 0.8, 0, 10], [0, 0, 2.5, 30], [0, 0, 0, 1.0]]),
    "sagittal": np.array([[0, 0, 4.0, -12], [-0.9, 0, 0, 40], [0, -0.9, 0, 55], [0, 0, 0, 1.0]]),
    "coronal": np.array([[-0.7, 0, 0, 15], [0, 0, 3.0, -30], [0, -0.7, 0, 20], [0, 0, 0, 1.0]]),
    "oblique": None,  # built below: rotated 20 deg about x and 10 deg about z
    "anisotropic": np.array([[0.45, 0, 0, 1], [0, 1.3, 0, 2], [0, 0, 5.5, 3], [0, 0, 0, 1.0]]),
    "mirrored": np.array([[-1.1, 0, 0, 30], [0, 0.9, 0, -8], [0, 0, 2.0, 4], [0, 0, 0, 1.0]]),
}


def _rotation(x_deg: float, z_deg: float) -> np.ndarray:
    a, b = np.radians(x_deg), np.radians(z_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


_oblique = np.eye(4)
_oblique[:3, :3] = _rotation(20, 10) @ np.diag([0.9, 0.9, 2.2])
_oblique[:3, 3] = [-33.3, 12.1, 7.7]
ROUND_TRIP_AFFINES["oblique"] = _oblique
SHAPE = (13, 11, 7)


def _values(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if dtype == "int16":
        return rng.integers(-1024, 3000, SHAPE).astype(np.int16)
    if dtype == "uint8":
        return rng.integers(0, 256, SHAPE).astype(np.uint8)
    return (rng.random(SHAPE) * 1234.5 - 300.25).astype(np.float32)


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32"])
@pytest.mark.parametrize("orientation", list(ROUND_TRIP_AFFINES))
def test_nifti_to_dicom_to_nifti_round_trip(orientation: str, dtype: str, tmp_path: Path) -> None:
    affine = ROUND_TRIP_AFFINES[orientation]
    values = _values(dtype)
    # Start from a NIfTI file written by nibabel, loaded through the app's reader.
    original = nib.Nifti1Image(values, affine)
    original.set_qform(affine, 1)
    source = Source(name="input.nii", data=original.to_bytes())
    volume = only_series([source]).load()
    modality = "MR" if dtype == "float32" else "CT"
    export = export_dicom_series(volume, modality=modality)  # verified against core.io.scan inside
    slope = float(pydicom.dcmread(io.BytesIO(export.files[0][1])).RescaleSlope)
    # slope/2, plus float32 rounding of values up to ~1000 (dcm2niix keeps scl_slope in float32)
    tolerance = 0.0 if export.exact else slope / 2 * (1 + 1e-6) + 1e-3
    assert export.exact == (dtype != "float32")

    # Our loader reads it back as one series: NIfTI of it equals the original.
    back = nifti_of(
        convert_series(only_series([Source(n, d) for n, d in export.files]), ConvertOptions()).outputs[0][1]
    )
    assert_same_world(back, original, values="exact" if export.exact else "within", tol=tolerance)

    # dcm2niix reads it as exactly one series, with the same geometry.
    folder = tmp_path / "dicom"
    folder.mkdir()
    for name, data in export.files:
        (folder / name).write_bytes(data)
    produced = run_dcm2niix(folder, tmp_path / "out")
    assert len(produced) == 1, [p.name for p in produced]
    assert_same_world(nib.load(produced[0]), original, values="exact" if export.exact else "within", tol=tolerance)


def test_mirrored_volume_exports_without_reorientation(tmp_path: Path) -> None:
    # A Volume in LAS voxel order (det < 0), given directly to the exporter.
    affine = ROUND_TRIP_AFFINES["mirrored"]
    values = _values("int16")
    volume = Volume(values, affine, modality="CT")
    export = export_dicom_series(volume)
    folder = write_sources([Source(n, d) for n, d in export.files], tmp_path / "dicom")
    produced = run_dcm2niix(folder, tmp_path / "out")
    assert len(produced) == 1
    assert_same_world(nib.load(produced[0]), nib.Nifti1Image(values, affine), values="exact")


@pytest.mark.parametrize("kind", ["4d", "rgb"])
def test_4d_and_rgb_exports_read_back_as_one_series(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    affine = ROUND_TRIP_AFFINES["oblique"]
    if kind == "4d":
        values = rng.integers(0, 1000, (6, 5, 4, 3)).astype(np.int16)
        volume = Volume(values, affine, modality="MR")
    else:
        values = rng.integers(0, 256, (6, 5, 4, 3)).astype(np.uint8)
        volume = Volume(values, affine, is_rgb=True)
    export = export_dicom_series(volume)  # read back by core.io.scan and compared inside
    assert len(export.files) == (12 if kind == "4d" else 4)
    produced = run_dcm2niix(
        write_sources([Source(n, d) for n, d in export.files], tmp_path / "dicom"), tmp_path / "out"
    )
    assert len(produced) == 1
    theirs = nib.load(produced[0])
    data = np.asarray(theirs.dataobj)
    if kind == "rgb":
        data = np.stack([data["R"], data["G"], data["B"]], axis=-1) if data.dtype.names else data
    assert data.shape == values.shape
    spatial_theirs, affine_theirs = as_ras(data, theirs.affine)
    spatial_ours, affine_ours = as_ras(values, affine)
    np.testing.assert_allclose(affine_theirs, affine_ours, atol=1e-4)
    np.testing.assert_array_equal(spatial_theirs, spatial_ours)


def test_dicom_export_geometry_is_the_affine_in_lps() -> None:
    affine = np.array([[0.5, 0, 0, 10], [0, 0.6, 0, 20], [0, 0, 2.0, 30], [0, 0, 0, 1.0]])
    volume = Volume(np.zeros((4, 5, 3), dtype=np.int16), affine, modality="CT")
    export = export_dicom_series(volume)
    files = [pydicom.dcmread(io.BytesIO(data)) for _, data in export.files]
    assert len(files) == 3
    # Radiological layout: rows run to the patient's left (+x LPS), columns to posterior (+y).
    assert [float(v) for v in files[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in files[0].PixelSpacing] == [0.6, 0.5]
    assert (files[0].Rows, files[0].Columns) == (5, 4)
    # Pixel (0, 0) is the voxel with the largest i and j: RAS (11.5, 22.4, 30) -> LPS (-11.5, -22.4, 30).
    for k, ds in enumerate(files):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], [-11.5, -22.4, 30 + 2 * k], atol=1e-9)
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 2.0


def test_dicom_export_files_share_every_study_and_series_attribute() -> None:
    values = _values("float32")
    export = export_dicom_series(Volume(values, ROUND_TRIP_AFFINES["oblique"], modality="MR"))
    files = [pydicom.dcmread(io.BytesIO(data)) for _, data in export.files]
    shared = (
        "StudyInstanceUID SeriesInstanceUID FrameOfReferenceUID StudyDate StudyTime SeriesDate SeriesTime "
        "SeriesNumber Modality SOPClassUID ImageOrientationPatient PixelSpacing SliceThickness "
        "SpacingBetweenSlices RescaleSlope RescaleIntercept Rows Columns PatientName PatientID StudyID"
    ).split()
    for keyword in shared:
        assert len({str(ds[keyword].value) for ds in files}) == 1, keyword
    assert len({ds.SOPInstanceUID for ds in files}) == len(files)
    assert files[0].SOPClassUID == pydicom.uid.MRImageStorage
    assert float(files[0].RescaleSlope) != 1.0  # floats need a rescale
    for (_, data), ds in zip(export.files, files, strict=True):
        assert data[128:132] == b"DICM"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_dicom_export_copies_patient_and_study_from_a_reference_only() -> None:
    sources = make_series(np.zeros((3, 4, 5), dtype=np.int16), description="source")
    reference = pydicom.dcmread(io.BytesIO(sources[0].data), stop_before_pixels=True)
    volume = Volume(np.arange(60, dtype=np.int16).reshape(5, 4, 3), np.diag([1.0, 1.0, 2.0, 1.0]), modality="CT")
    copied = pydicom.dcmread(io.BytesIO(export_dicom_series(volume, reference=reference).files[0][1]))
    assert str(copied.PatientName) == "Phantom^Synthetic" and copied.PatientID == "SYN0001"
    assert copied.StudyInstanceUID == reference.StudyInstanceUID
    assert copied.SeriesInstanceUID != reference.SeriesInstanceUID
    assert copied.FrameOfReferenceUID != reference.FrameOfReferenceUID
    plain = pydicom.dcmread(io.BytesIO(export_dicom_series(volume).files[0][1]))
    assert str(plain.PatientName) == "" and plain.PatientID == ""
    assert plain.StudyInstanceUID != reference.StudyInstanceUID


def test_sop_class_follows_modality() -> None:
    volume = Volume(np.zeros((3, 3, 2), dtype=np.int16), np.eye(4))
    for modality, sop in (
        ("CT", pydicom.uid.CTImageStorage),
        ("MR", pydicom.uid.MRImageStorage),
        ("PT", pydicom.uid.SecondaryCaptureImageStorage),
    ):
        ds = pydicom.dcmread(io.BytesIO(export_dicom_series(volume, modality=modality).files[0][1]))
        assert ds.SOPClassUID == sop


def test_lossy_encoding_error_is_within_half_a_slope() -> None:
    values = np.linspace(-1.0e3, 2.5e4, 4000, dtype=np.float64).reshape(10, 20, 20) + 0.123456789
    encoding = encode_pixels(values)
    rebuilt = encoding.stored.astype(np.float64) * float(encoding.slope) + float(encoding.intercept)
    assert not encoding.exact
    assert np.max(np.abs(rebuilt - values)) <= float(encoding.slope) / 2 * (1 + 1e-9)
    assert len(encoding.slope) <= 16 and len(encoding.intercept) <= 16  # valid DS strings


def test_wide_integers_use_an_exact_intercept() -> None:
    values = np.arange(40000, 40000 + 60000, 100, dtype=np.int32).reshape(10, 10, 6)
    encoding = encode_pixels(values)
    assert encoding.exact and encoding.stored.dtype == np.uint16
    np.testing.assert_array_equal(encoding.stored.astype(np.int64) + int(encoding.intercept), values)


def test_slice_plan_prefers_thick_slices_and_refuses_sheared_planes() -> None:
    assert plan_slices(np.diag([4.0, 1.0, 1.0, 1.0]), (10, 50, 50)).slice_axis == 0
    assert plan_slices(np.diag([1.0, 1.0, 1.0, 1.0]), (50, 50, 20)).slice_axis == 2
    sheared = np.array([[1.0, 0.3, 0, 0], [0, 1.0, 0.3, 0], [0.3, 0, 1.0, 0], [0, 0, 0, 1.0]])
    with pytest.raises(SeriesGeometryError, match="orthogonal"):
        plan_slices(sheared, (5, 5, 5))


# --------------------------------------------------------------------------- _Tilt and _Eq


def _assert_phantom(image: nib.Nifti1Image, inside: np.ndarray | None = None, tolerance: float = 1.0) -> None:
    """Every voxel (or those in ``inside``) holds f(its world position) within rounding."""
    world = voxel_world_lps(image.shape, image.affine)
    values = scaled(image).reshape(-1)
    mask = np.ones(len(values), dtype=bool) if inside is None else inside
    assert mask.sum() > 0.5 * len(values)
    np.testing.assert_allclose(values[mask], phantom_value(world[mask]), atol=tolerance, rtol=0)


@pytest.mark.parametrize("angle", [12.0, -7.5])
def test_gantry_tilt_is_resampled_to_an_orthogonal_grid(angle: float) -> None:
    count, rows, columns, dz = 9, 20, 24, 2.0
    drift = dz * np.tan(np.radians(angle))
    affine = lps_affine(pixel_spacing=(0.8, 0.7), origin=(-5, -7, 10), slice_step=(0.0, drift, dz))
    series = only_series(make_series(linear_phantom(affine, count, rows, columns), affine=affine, gantry_tilt=angle))
    conversion = convert_series(series, ConvertOptions())
    assert conversion.primary == "1_synthetic_Tilt.nii.gz"
    assert any(f"{abs(angle):.2f} degrees" in w and "_Tilt" in w for w in conversion.warnings)
    assert sum("tilt" in w for w in conversion.warnings) == 1  # the reader's "kept as shear" note is superseded
    image = nifti_of(conversion.outputs[0][1])
    columns_ras = image.affine[:3, :3]
    gram = columns_ras.T @ columns_ras
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-9)  # orthogonal voxels
    assert sorted(np.sqrt(np.diag(gram))) == pytest.approx(sorted([0.7, 0.8, dz]))
    assert image.shape[2] == count
    # Inside the acquired slices, every voxel holds the value of its world position.
    world = voxel_world_lps(image.shape, image.affine)
    k = np.round((world[:, 2] - 10) / dz)
    u = (world[:, 0] + 5) / 0.7
    v = (world[:, 1] + 7 - k * drift) / 0.8
    inside = (u >= 0) & (u <= columns - 1) & (v >= 0) & (v <= rows - 1)
    _assert_phantom(image, inside)
    assert image.shape[1] == rows + int(np.ceil(abs(drift) * (count - 1) / 0.8 - 1e-9))  # grown to hold every slice


def test_missing_slice_is_resampled_to_equal_spacing_like_dcm2niix(tmp_path: Path) -> None:
    count, rows, columns = 9, 10, 12
    affine = lps_affine(pixel_spacing=(1.0, 1.0), origin=(3, -4, -20), slice_step=2.0)
    sources = make_series(linear_phantom(affine, count, rows, columns), affine=affine, drop=[4], series_number=5)
    conversion = convert_series(only_series(sources), ConvertOptions())
    assert conversion.primary == "5_synthetic_Eq.nii.gz"
    assert any("missing" in w and "_Eq" in w for w in conversion.warnings)
    image = nifti_of(conversion.outputs[0][1])
    assert image.header.get_zooms()[:3] == pytest.approx((1.0, 1.0, 2.0))
    _assert_phantom(image)  # the missing slice is interpolated from its neighbours: linear, so exact
    produced = [
        p for p in run_dcm2niix(write_sources(sources, tmp_path / "dicom"), tmp_path / "out") if "_Eq" in p.name
    ]
    assert len(produced) == 1
    assert_same_world(image, nib.load(produced[0]), values="within", tol=1.0)


def test_uneven_spacing_is_resampled_on_dcm2niix_grid(tmp_path: Path) -> None:
    rows, columns = 8, 9
    distances = [0.0, 2.0, 5.0, 7.0, 9.0]
    base = lps_affine(origin=(0, 0, 0), slice_step=1.0)
    pixels = np.stack([linear_phantom(base, 10, rows, columns)[int(d)] for d in distances])
    sources = make_series(pixels, positions=[(0, 0, d) for d in distances])
    image = nifti_of(convert_series(only_series(sources), ConvertOptions()).outputs[0][1])
    assert image.shape[2] == 6 and image.header.get_zooms()[2] == pytest.approx(1.8)  # smallest step, ends on the last
    _assert_phantom(image)
    produced = [
        p for p in run_dcm2niix(write_sources(sources, tmp_path / "dicom"), tmp_path / "out") if "_Eq" in p.name
    ]
    assert len(produced) == 1
    assert_same_world(image, nib.load(produced[0]), values="within", tol=1.0)


def test_strict_refuses_uneven_spacing_but_still_resamples_tilt() -> None:
    gapped = only_series(make_series(np.zeros((6, 4, 4), dtype=np.int16), drop=[2]))
    with pytest.raises(SeriesGeometryError, match="spacing varies .* missing slices.*strict"):
        convert_series(gapped, ConvertOptions(strict=True))
    tilted = only_series(make_series(np.zeros((6, 4, 4), dtype=np.int16), affine=lps_affine(slice_step=(0, 0.5, 1.0))))
    assert convert_series(tilted, ConvertOptions(strict=True)).resampled == "Tilt"


def test_regular_series_are_not_resampled() -> None:
    affine = lps_affine(pixel_spacing=(0.5, 0.5), slice_step=1.25)
    series = only_series(make_series(linear_phantom(affine, 6, 7, 8), affine=affine))
    volume = series.load()
    regular = regularize(volume, slice_stack(series))
    assert regular.volume is volume and regular.suffix == "" and regular.warnings == ()


def test_sheared_nifti_affine_is_resampled_too() -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[1, 2] = 2.0 * np.tan(np.radians(8))
    volume = Volume(np.ones((6, 7, 5), dtype=np.int16), affine)
    regular = regularize(volume, stack_from_affine(affine, volume.shape))
    assert regular.suffix == "_Tilt"
    columns = regular.volume.affine[:3, :3]
    np.testing.assert_allclose(columns.T @ columns, np.diag([1.0, 1.0, 4.0]), atol=1e-12)


# --------------------------------------------------------------------------- NRRD and MetaImage


def _sitk_ras(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> (array indexed i, j, k[, t][, component], RAS affine)."""
    size = image.GetDimension()
    direction = np.array(image.GetDirection()).reshape(size, size)[:3, :3]
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing()[:3])
    lps[:3, 3] = image.GetOrigin()[:3]
    array = sitk.GetArrayFromImage(image)  # (t, k, j, i[, component])
    spatial = size
    order = tuple(range(spatial - 1, -1, -1)) + tuple(range(spatial, array.ndim))
    return np.transpose(array, order), LPS_TO_RAS @ lps


RASTER_CASES = {
    "int16-oblique": (lambda: _values("int16"), ROUND_TRIP_AFFINES["oblique"], False),
    "float32-mirrored": (lambda: _values("float32"), ROUND_TRIP_AFFINES["mirrored"], False),
    "uint8-4d": (
        lambda: np.arange(13 * 11 * 7 * 3, dtype=np.uint8).reshape(13, 11, 7, 3),
        ROUND_TRIP_AFFINES["axial"],
        False,
    ),
    "rgb": (
        lambda: np.arange(13 * 11 * 7 * 3, dtype=np.uint8).reshape(13, 11, 7, 3),
        ROUND_TRIP_AFFINES["coronal"],
        True,
    ),
}


@pytest.mark.parametrize("writer", ["nrrd", "mha"])
@pytest.mark.parametrize("case", list(RASTER_CASES))
def test_nrrd_and_mha_read_back_by_simpleitk_and_our_loader(writer: str, case: str, tmp_path: Path) -> None:
    make, affine, is_rgb = RASTER_CASES[case]
    values = make()
    volume = Volume(values, affine, is_rgb=is_rgb)
    data = (nrrd_bytes if writer == "nrrd" else mha_bytes)(volume)
    path = tmp_path / f"x.{writer}"
    path.write_bytes(data)
    if not (writer == "mha" and volume.n_frames > 1):  # SimpleITK reads 4D MHA as a vector image: skip it
        array, ras = _sitk_ras(sitk.ReadImage(str(path)))
        np.testing.assert_allclose(world_corners(values.shape, ras), world_corners(values.shape, affine), atol=1e-6)
        np.testing.assert_array_equal(array.reshape(values.shape), values)
    loaded = only_series([Source(name=path.name, data=data)]).load()
    a, a_affine = as_ras(loaded.array, loaded.affine)
    b, b_affine = as_ras(values, affine)
    np.testing.assert_allclose(a_affine, b_affine, atol=1e-6)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("target", ["nifti", "nrrd", "mha"])
def test_no_patient_data_in_exported_headers(target: str) -> None:
    sources = make_series(np.ones((3, 4, 5), dtype=np.int16), extra={"InstitutionName": "St Elsewhere"})
    data = convert_series(only_series(sources), ConvertOptions(to=target)).outputs[0][1]
    if target == "nifti":
        header = gzip.decompress(data)[:352]
    elif target == "nrrd":
        header = data.split(b"\n\n", 1)[0]
    else:
        header = data.split(b"ElementDataFile = LOCAL\n", 1)[0]
    for identifying in (b"Phantom", b"SYN0001", b"Elsewhere", b"20240101"):
        assert identifying not in header


# --------------------------------------------------------------------------- names and batch


def test_names_are_sanitised_like_dcm2niix() -> None:
    assert sanitize_name("T1 MPRAGE (sag)/3D") == "T1_MPRAGE_sag_3D"
    assert sanitize_name("../../etc/passwd") == "etc_passwd"
    series = only_series(make_series(np.zeros((2, 3, 3), dtype=np.int16), series_number=12, description="Ax T2*FLAIR"))
    assert output_stem(series) == "12_Ax_T2_FLAIR"


def test_batch_converts_every_series_into_one_zip() -> None:
    first = make_series(np.zeros((3, 4, 5), dtype=np.int16), series_number=3, description="T1", name_prefix="A")
    second = make_series(np.ones((4, 4, 5), dtype=np.int16), series_number=5, description="T2/FLAIR", name_prefix="B")
    third = make_series(np.ones((4, 4, 5), dtype=np.int16), series_number=5, description="T2/FLAIR", name_prefix="C")
    result = scan(first + second + third)
    assert len(result.series) == 3
    batch = convert_batch(result.series, ConvertOptions())
    assert not batch.problems
    names = sorted(zipfile.ZipFile(io.BytesIO(batch.data)).namelist())
    assert names == sorted(
        [
            "3_T1.nii.gz",
            "5_T2_FLAIR.nii.gz",
            "5_T2_FLAIR_2.nii.gz",
            "qa/3_T1_qa.json",
            "qa/5_T2_FLAIR_qa.json",
            "qa/5_T2_FLAIR_2_qa.json",
        ]
    )
    assert not any("Phantom" in name for name in names)


def test_batch_dicom_export_and_failures_are_listed() -> None:
    good = make_series(np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5), series_number=2, description="axial")
    gapped = make_series(
        np.zeros((5, 4, 4), dtype=np.int16), drop=[2], series_number=9, description="gap", name_prefix="G"
    )
    result = scan(good + gapped)
    batch = convert_batch(result.series, ConvertOptions(to="dicom", strict=True))
    assert [p.message for p in batch.problems if "spacing" in p.message]
    names = zipfile.ZipFile(io.BytesIO(batch.data)).namelist()
    assert sorted(n for n in names if n.endswith(".dcm")) == [
        "2_axial/IM0001.dcm",
        "2_axial/IM0002.dcm",
        "2_axial/IM0003.dcm",
    ]


def test_output_names_keep_technical_words_only() -> None:
    sources = make_series(np.zeros((4, 4, 3), dtype=np.int16), series_number=7, description="Smith^John T1 axial 3mm")
    (series,) = scan(sources).series
    stem = output_stem(series)
    assert stem == "7_T1_axial_3mm"
    nifti = Source("mrn123456_jane_doe_brain.nii.gz", convert_series(series, ConvertOptions(to="nifti")).outputs[0][1])
    (other,) = scan([nifti]).series
    assert output_stem(other) == "brain"


@pytest.mark.parametrize("to", ["dicom", "nifti", "nrrd", "mha"])
def test_an_identifying_upload_name_reaches_no_exported_byte(to: str) -> None:
    from core.qa import qa_report

    image = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.diag([1.0, 1.0, 2.0, 1.0]))
    (series,) = scan([Source("DOE_JOHN_MRN12345.nii", image.to_bytes())]).series
    conversion = convert_series(series, ConvertOptions(to=to))
    blobs = [name.encode() + data for name, data in conversion.outputs]
    blobs.append(json.dumps(qa_report(series).to_json()).encode())
    for blob in blobs:
        for marker in (b"DOE", b"JOHN", b"MRN12345"):
            assert marker not in blob.upper()
