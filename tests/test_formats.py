"""Non-DICOM readers: NIfTI-1/2, Analyze, NRRD, MetaImage, PNG/JPEG/TIFF.

Geometry and values are checked against independent readers (nibabel for
NIfTI/Analyze, SimpleITK for NRRD/MetaImage) in world space: the volumes are
reoriented to RAS+, so axis order may differ; the world positions of the corner
voxel centres must match as sets (1e-3 mm) and the values at the same world
points must be equal. Hostile inputs (data files outside the upload, gzip
bombs, giant dimensions) must be refused with a clear message.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nibabel.testing import data_path as nibabel_data
from PIL import Image

from core.errors import LimitError, UnsupportedFileError
from core.formats import scan_other
from core.series import ScanResult, Series
from core.sources import Limits, Source, read_paths
from core.volume import LPS_TO_RAS, Volume
from tests.conftest import DATA, data_path

NIBABEL_DATA = Path(nibabel_data)


def nibabel_file(name: str) -> Path:
    """A file of nibabel's bundled test data; some wheels ship without part of it."""
    path = NIBABEL_DATA / name
    if not path.exists():
        pytest.skip(f"nibabel's bundled test file {name} is not in this installation")
    return path


# --------------------------------------------------------------------------- helpers


def _scan(*sources: Source, limits: Limits | None = None) -> ScanResult:
    result = scan_other(list(sources), limits) if limits else scan_other(list(sources))
    _assert_accounted(list(sources), result)
    return result


def _assert_accounted(sources: list[Source], result: ScanResult) -> None:
    """Every input appears in a series' sources, an error or the skipped list."""
    seen = {name for s in result.series for name in s.info.sources}
    seen |= {p.source for p in result.errors} | {s.source for s in result.skipped}
    assert {s.name for s in sources} <= seen, {s.name for s in sources} - seen


def _only_series(result: ScanResult) -> Series:
    assert not result.errors, [e.message for e in result.errors]
    assert len(result.series) == 1, [s.info.id for s in result.series]
    return result.series[0]


def _load_checked(series: Series) -> Volume:
    """Load and check what the scan promised against what the loader returns."""
    volume = series.load()
    info = series.info
    assert volume.shape == info.shape
    np.testing.assert_allclose(volume.affine, info.affine, atol=1e-9)
    assert str(volume.array.dtype) == info.dtype
    assert volume.array.dtype != np.float64
    assert volume.axcodes == "RAS"
    assert not volume.array.flags.writeable
    assert volume.is_rgb == info.is_rgb
    return volume


def _file(path: Path, name: str | None = None) -> Source:
    return Source(name=name or path.name, data=path.read_bytes())


def _corners_world(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    ranges = [(0, n - 1) for n in shape[:3]]
    ijk = np.array(np.meshgrid(*ranges, indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).T


def assert_same_image(
    volume: Volume, ref_array: np.ndarray, ref_affine: np.ndarray, *, atol_mm: float = 1e-3, rtol: float = 1e-6
) -> None:
    """Same grid in world space (corners as sets, 1e-3 mm) and same values at the same world points.

    ``ref_array`` is indexed (i, j, k, ...) with ``ref_affine`` mapping (i, j, k) to RAS mm.
    """
    assert sorted(volume.spatial_shape) == sorted(ref_array.shape[:3])
    assert volume.array.shape[3:] == ref_array.shape[3:]
    ours = _corners_world(volume.spatial_shape, volume.affine)
    theirs = _corners_world(ref_array.shape, ref_affine)
    distances = np.linalg.norm(ours[:, None, :] - theirs[None, :, :], axis=2)
    assert distances.min(axis=0).max() < atol_mm, f"corners differ by {distances.min(axis=0).max():.2e} mm"
    assert distances.min(axis=1).max() < atol_mm
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(0, n, 300) for n in ref_array.shape[:3]])
    idx = np.concatenate([idx, np.array([[0, 0, 0], [n - 1 for n in ref_array.shape[:3]]]).T], axis=1)
    world = ref_affine[:3, :3] @ idx + ref_affine[:3, 3:4]
    ours_ijk = np.linalg.solve(volume.affine[:3, :3], world - volume.affine[:3, 3:4])
    rounded = np.round(ours_ijk).astype(int)
    assert np.abs(ours_ijk - rounded).max() < 1e-3, "world points must fall on voxel centres"
    got = volume.array[tuple(rounded)]
    want = ref_array[tuple(idx)]
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=1e-6)


def _sitk_reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Array indexed (i, j, k[, t][, c]) and voxel -> RAS affine of SimpleITK's reading."""
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    dim = image.GetDimension()
    ncomp = image.GetNumberOfComponentsPerPixel()
    spatial_axes = array.ndim - (1 if ncomp > 1 else 0)
    order = list(range(spatial_axes))[::-1] + ([spatial_axes] if ncomp > 1 else [])
    array = array.transpose(order)
    n = min(dim, 3)
    direction = np.array(image.GetDirection()).reshape(dim, dim)[:n, :n]
    spacing = np.array(image.GetSpacing())[:n]
    origin = np.array(image.GetOrigin())[:n]
    linear = np.eye(3)
    linear[:n, :n] = direction * spacing[None, :]
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:n, 3] = origin
    if dim == 2:
        array = array[:, :, None, ...]
    return array, LPS_TO_RAS @ lps


def _nib_reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    array = np.asanyarray(image.dataobj)
    if array.ndim == 2:
        array = array[:, :, None]
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array, image.affine


def _nifti_bytes(image: nib.Nifti1Image | nib.Nifti2Image, *, compress: bool) -> bytes:
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=1) if compress else raw


# --------------------------------------------------------------------------- real data


def _non_dicom_units() -> list[tuple[str, str, dict]]:
    path = DATA / "expected.json"
    if not path.exists():
        return [("absent", "absent", {})]
    units = []
    for entry in json.loads(path.read_text()):
        for unit in entry.get("units", []):
            name = unit["unit"]
            if entry["name"] in ("nifti_oblique_4d", "nifti_ct_with_labelmap", "nrrd_mr_with_label", "metaimage"):
                units.append((entry["name"], name, unit))
            elif name.endswith(".nii.gz"):
                units.append((entry["name"], name, unit))
    return units


@pytest.mark.parametrize(
    ("entry", "unit", "expected"), _non_dicom_units(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_real_files_match_independent_readers(entry: str, unit: str, expected: dict) -> None:
    path = data_path(entry, *unit.split("/"))
    sources = [_file(path)]
    if path.suffix == ".mhd":
        sources.append(_file(path.with_suffix(".raw")))
    volume = _load_checked(_only_series(_scan(*sources)))
    if path.name.endswith((".nii", ".nii.gz")):
        ref_array, ref_affine = _nib_reference(path)
        assert list(ref_array.shape) == expected["nibabel"]["shape"]
    else:
        ref_array, ref_affine = _sitk_reference(path)
        assert sorted(volume.spatial_shape[: len(expected["sitk"]["size"])]) == sorted(
            expected["sitk"]["size"][:3]
        ) or (len(expected["sitk"]["size"]) == 2 and volume.spatial_shape[2] == 1)
    assert_same_image(volume, ref_array, ref_affine, rtol=1e-5)
    # The recorded oracle figures agree too (they were computed when the corpus was built).
    recorded = expected.get("nibabel", {}).get("affine") or expected["sitk"].get("affine_ras")
    if recorded is not None:
        theirs = _corners_world(ref_array.shape, np.array(recorded))
        ours = _corners_world(volume.spatial_shape, volume.affine)
        gap = np.linalg.norm(ours[:, None] - theirs[None], axis=2).min(axis=0).max()
        assert gap < 1e-3, gap


def test_oblique_4d_stays_oblique() -> None:
    path = data_path("nifti_oblique_4d", "example4d.nii.gz")
    series = _only_series(_scan(_file(path)))
    volume = _load_checked(series)
    assert volume.shape[3] == 2
    linear = volume.affine[:3, :3]
    off_diagonal = np.abs(linear - np.diag(np.diag(linear)))
    assert off_diagonal.max() > 0.3, "the tilt must stay in the affine (no resampling, no diagonal)"
    np.testing.assert_allclose(volume.spacing_mm, (2.0, 2.0, 2.2), atol=1e-5)
    assert series.info.kind == "nifti" and series.info.description == "example4d"
    assert series.info.modality == ""


def test_2d_metaimage_is_one_slice_of_1_mm() -> None:
    path = data_path("metaimage", "CT_2D_head_fixed.mha")
    volume = _load_checked(_only_series(_scan(_file(path))))
    assert volume.spatial_shape[2] == 1 and sorted(volume.spatial_shape[:2]) == [256, 256]
    np.testing.assert_allclose(volume.spacing_mm, (1.0, 1.0, 1.0))


def test_mhd_with_raw_in_another_folder_of_the_upload() -> None:
    folder = data_path("metaimage")
    header = _file(folder / "HeadMRVolume.mhd", "upload/headers/HeadMRVolume.mhd")
    raw = _file(folder / "HeadMRVolume.raw", "upload/data/HeadMRVolume.raw")
    series = _only_series(_scan(header, raw))
    assert series.info.sources == (header.name, raw.name)
    ref_array, ref_affine = _sitk_reference(folder / "HeadMRVolume.mhd")
    assert_same_image(_load_checked(series), ref_array, ref_affine)


def test_pooled_folder_accounts_for_every_file() -> None:
    sources = read_paths([data_path("metaimage"), data_path("nrrd_mr_with_label")])
    result = _scan(*sources)
    assert sorted(s.info.id for s in result.series) == [
        "CT_2D_head_fixed", "HeadMRVolume", "brain1_image", "brain1_label", "niivue_mha",
    ]  # fmt: skip
    licence_errors = [e for e in result.errors if "LICENSE" in e.source]
    assert len(licence_errors) == 2 and all("NRRD" in e.message and "NIfTI" in e.message for e in licence_errors)


# --------------------------------------------------------------------------- nibabel's test files


@pytest.mark.parametrize(
    "name",
    ["example_nifti2.nii.gz", "anatomical.nii", "reoriented_anat_moved.nii", "standard.nii.gz", "functional.nii"],
)
def test_nibabel_test_files(name: str) -> None:
    path = nibabel_file(name)
    series = _only_series(_scan(_file(path)))
    ref_array, ref_affine = _nib_reference(path)
    assert_same_image(_load_checked(series), ref_array, ref_affine, rtol=1e-5)


def _pair_image_bytes(header_path: Path) -> tuple[bytes, np.ndarray]:
    """Deterministic pixel bytes for a header that comes without its .img."""
    raw = header_path.read_bytes()
    if 540 in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")):
        klass = nib.Nifti2Header
    elif raw[344:347] == b"ni1":
        klass = nib.Nifti1Header
    else:
        klass = nib.AnalyzeHeader
    hdr = klass.from_fileobj(io.BytesIO(raw), check=False)
    shape = hdr.get_data_shape()
    dtype = hdr.get_data_dtype()
    values = (np.arange(math.prod(shape)) % 251).astype(dtype).reshape(shape, order="F")
    # The pixels of a pair start at vox_offset in the .img too (544 for nifti2.hdr).
    return bytes(int(hdr.get_data_offset())) + values.tobytes(order="F"), values


@pytest.mark.parametrize("name", ["analyze.hdr", "nifti1.hdr", "nifti2.hdr"])
@pytest.mark.parametrize("compress_img", [False, True])
def test_header_image_pairs(name: str, compress_img: bool, tmp_path: Path) -> None:
    header_path = nibabel_file(name)
    img_bytes, _ = _pair_image_bytes(header_path)
    (tmp_path / name).write_bytes(header_path.read_bytes())
    (tmp_path / name.replace(".hdr", ".img")).write_bytes(img_bytes)
    ref_array, ref_affine = _nib_reference(tmp_path / name)
    img_name = name.replace(".hdr", ".img.gz" if compress_img else ".img")
    img_data = gzip.compress(img_bytes, compresslevel=1) if compress_img else img_bytes
    header = _file(header_path, f"pair/{name}")
    image = Source(name=f"pair/{img_name}", data=img_data)
    series = _only_series(_scan(header, image))
    assert series.info.sources == (header.name, image.name)
    assert series.info.kind == ("analyze" if name == "analyze.hdr" else "nifti")
    assert_same_image(_load_checked(series), ref_array, ref_affine)
    if name == "analyze.hdr":
        assert any("Analyze" in w and "orientation" in w for w in series.info.warnings)


def test_pair_without_its_image_is_refused() -> None:
    header = _file(nibabel_file("analyze.hdr"))
    result = _scan(header)
    assert not result.series
    assert "analyze.img" in result.errors[0].message and "not in the upload" in result.errors[0].message


# --------------------------------------------------------------------------- NIfTI values and geometry


def _grid(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is None:
        return rng.normal(size=shape).astype(dtype)
    return rng.integers(max(info.min, -2000), min(info.max, 4000), size=shape).astype(dtype)


def test_scl_slope_and_intercept_are_applied_as_float32() -> None:
    raw = _grid((7, 6, 5), "int16")
    image = nib.Nifti1Image(raw, np.diag([1.5, 1.5, 3.0, 1.0]))
    image.header.set_slope_inter(2.5, -10.25)
    data = _nifti_bytes(image, compress=True)
    volume = _load_checked(_only_series(_scan(Source("scaled.nii.gz", data))))
    assert volume.array.dtype == np.float32
    reloaded = nib.Nifti1Image.from_bytes(image.to_bytes())
    assert_same_image(volume, reloaded.get_fdata(), reloaded.affine, rtol=1e-6)
    np.testing.assert_allclose(volume.array.min(), raw.min() * 2.5 - 10.25, rtol=1e-6)


@pytest.mark.parametrize("raw_dtype", ["uint16", "int16", "uint8"])
def test_integer_intercept_keeps_integers(raw_dtype: str) -> None:
    raw = (_grid((6, 5, 4), "int16") % 3000).astype(raw_dtype) if raw_dtype != "uint8" else _grid((6, 5, 4), "uint8")
    image = nib.Nifti1Image(raw, np.eye(4))
    image.header.set_slope_inter(1.0, -1024.0)
    series = _only_series(_scan(Source("ct.nii", image.to_bytes())))
    volume = _load_checked(series)
    assert volume.array.dtype == np.int16
    assert_same_image(volume, raw.astype(np.int64) - 1024, image.affine)


def test_integer_intercept_widens_instead_of_wrapping() -> None:
    raw = np.full((4, 4, 4), 65535, dtype=np.uint16)
    raw[0, 0, 0] = 0
    image = nib.Nifti1Image(raw, np.eye(4))
    image.header.set_slope_inter(1.0, -1024.0)
    volume = _only_series(_scan(Source("wide.nii", image.to_bytes()))).load()
    assert volume.array.max() == 65535 - 1024 and volume.array.min() == -1024


def test_float64_is_loaded_as_float32() -> None:
    raw = _grid((5, 4, 3), "float64")
    image = nib.Nifti1Image(raw, np.eye(4))
    series = _only_series(_scan(Source("f64.nii", image.to_bytes())))
    assert any("float32" in w for w in series.info.warnings)
    assert_same_image(_load_checked(series), raw, image.affine, rtol=1e-6)


def test_sform_and_qform_disagreement_is_reported_and_sform_wins() -> None:
    raw = _grid((5, 6, 7), "int16")
    qform = np.diag([2.0, 2.0, 2.0, 1.0])
    sform = qform.copy()
    sform[:3, 3] = [5.0, 0.0, 0.0]
    image = nib.Nifti1Image(raw, None)
    image.set_qform(qform, code=1)
    image.set_sform(sform, code=2)
    series = _only_series(_scan(Source("both.nii", image.to_bytes())))
    assert any("disagree" in w and "sform" in w for w in series.info.warnings), series.info.warnings
    assert_same_image(_load_checked(series), raw, sform)


def test_agreeing_forms_give_no_warning_and_qform_alone_is_used() -> None:
    raw = _grid((5, 6, 7), "int16")
    qform = nib.eulerangles.euler2mat(0.2, 0.1, 0.0)
    affine = np.eye(4)
    affine[:3, :3] = qform @ np.diag([1.0, 1.2, 2.5])
    affine[:3, 3] = [-10, 20, 30]
    image = nib.Nifti1Image(raw, None)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=0)
    series = _only_series(_scan(Source("q.nii", image.to_bytes())))
    assert series.info.warnings == ()
    assert_same_image(_load_checked(series), raw, affine)


def test_no_form_uses_voxel_sizes_and_warns() -> None:
    raw = _grid((5, 6, 7), "uint8")
    image = nib.Nifti1Image(raw, None)
    image.header.set_zooms((1.5, 2.0, 3.0))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    data = image.to_bytes()
    series = _only_series(_scan(Source("bare.nii", data)))
    assert any("neither sform nor qform" in w for w in series.info.warnings)
    ref = nib.Nifti1Image.from_bytes(data)
    assert_same_image(_load_checked(series), raw, ref.header.get_best_affine())


def test_rgb_vector_5d_and_rgb24() -> None:
    rgb = _grid((4, 5, 3, 1, 3), "uint8")
    image = nib.Nifti1Image(rgb, np.eye(4))
    image.header.set_intent("vector")
    volume = _load_checked(_only_series(_scan(Source("rgb5d.nii", image.to_bytes()))))
    assert volume.is_rgb and volume.shape == (4, 5, 3, 3)
    assert_same_image(volume, rgb[:, :, :, 0, :], image.affine)

    structured = np.zeros((4, 5, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for c, key in enumerate("RGB"):
        structured[key] = rgb[:, :, :, 0, c]
    image24 = nib.Nifti1Image(structured, np.eye(4))
    volume24 = _load_checked(_only_series(_scan(Source("rgb24.nii.gz", _nifti_bytes(image24, compress=True)))))
    assert volume24.is_rgb
    np.testing.assert_array_equal(volume24.array, volume.array)


def test_vector_field_is_refused_clearly() -> None:
    field = _grid((4, 5, 3, 1, 3), "float32")
    image = nib.Nifti1Image(field, np.eye(4))
    result = _scan(Source("warp.nii", image.to_bytes()))
    assert not result.series
    assert "vector" in result.errors[0].message and "5D" in result.errors[0].message


def test_2d_nifti_gets_one_slice() -> None:
    raw = _grid((6, 7), "int16")
    image = nib.Nifti1Image(raw, np.diag([0.5, 0.5, 1.0, 1.0]))
    volume = _load_checked(_only_series(_scan(Source("slice.nii", image.to_bytes()))))
    assert volume.spatial_shape[2] == 1
    assert_same_image(volume, raw[:, :, None], image.affine)


def test_multi_member_gzip_reads_whole() -> None:
    raw = _grid((9, 8, 7), "int16")
    data = nib.Nifti1Image(raw, np.eye(4)).to_bytes()
    half = len(data) // 2
    two_members = gzip.compress(data[:half]) + gzip.compress(data[half:])
    volume = _load_checked(_only_series(_scan(Source("pigz.nii.gz", two_members))))
    assert_same_image(volume, raw, np.eye(4))


def test_scan_reads_headers_only() -> None:
    """A .nii.gz whose pixel stream is damaged still scans (header only); loading says what is wrong."""
    raw = _grid((40, 40, 40), "int16")
    data = gzip.compress(nib.Nifti1Image(raw, np.eye(4)).to_bytes(), compresslevel=1)
    damaged = data[:2000] + bytes(len(data) - 2000)
    series = _only_series(_scan(Source("damaged.nii.gz", damaged)))
    assert series.info.shape == (40, 40, 40)
    with pytest.raises(UnsupportedFileError, match="damaged|truncated"):
        series.load()


def test_truncated_uncompressed_nifti_is_refused_at_scan() -> None:
    data = nib.Nifti1Image(_grid((20, 20, 20), "int16"), np.eye(4)).to_bytes()
    result = _scan(Source("short.nii", data[:-100]))
    assert not result.series and "truncated" in result.errors[0].message


# --------------------------------------------------------------------------- hostile input


def _nifti_header_only(shape: tuple[int, ...], dtype: str = "int16") -> bytes:
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0\0\0\0"


def test_gzip_bomb_is_refused_before_inflating_it_all() -> None:
    head = _nifti_header_only((16, 16, 16), "uint8")
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [compressor.compress(head)]
    zeros = bytes(1024**2)
    for _ in range(256):  # 256 MB of zeros behind a header that declares 4 kB
        parts.append(compressor.compress(zeros))
    parts.append(compressor.flush())
    bomb = b"".join(parts)
    assert len(bomb) < 2 * 1024**2
    series = _only_series(_scan(Source("bomb.nii.gz", bomb)))
    tracemalloc.start()
    try:
        with pytest.raises(LimitError, match="inflates to more than"):
            series.load()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024**2, f"inflated {peak / 1024**2:.0f} MB of a 256 MB bomb"


def test_giant_declared_dimensions_are_refused_before_allocation() -> None:
    nifti = Source("giant.nii", _nifti_header_only((32767, 32767, 32767)))
    nifti_gz = Source("giant2.nii.gz", gzip.compress(_nifti_header_only((30000, 30000, 2000))))
    nrrd = Source(
        "giant.nrrd",
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 100000 100000 1000\nendian: little\nencoding: gzip\n\n",
    )
    mha = Source(
        "giant.mha",
        b"ObjectType = Image\nNDims = 3\nDimSize = 50000 50000 50000\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n",
    )
    tracemalloc.start()
    try:
        result = _scan(nifti, nifti_gz, nrrd, mha)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not result.series
    assert len(result.errors) == 4
    for problem in result.errors:
        assert "cap" in problem.message, problem.message
    assert peak < 16 * 1024**2


def test_small_limits_are_honoured() -> None:
    data = nib.Nifti1Image(_grid((20, 20, 20), "int16"), np.eye(4)).to_bytes()
    result = _scan(Source("ok.nii", data), limits=Limits(max_voxels=1000))
    assert not result.series and "8,000" in result.errors[0].message


MHD = (
    "ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementSpacing = 1 1 2\nOffset = 1 2 3\n"
    "ElementType = MET_SHORT\nBinaryDataByteOrderMSB = False\nElementDataFile = {ref}\n"
)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("/etc/passwd", "absolute path"),
        ("../data.raw", "outside"),
        ("sub/../../data.raw", "outside"),
        ("C:\\scans\\data.raw", "absolute path"),
        ("file:///etc/passwd", "absolute path"),
        ("LIST\n/etc/passwd\n/etc/hostname", "absolute path"),
        ("../slice%d.raw 1 2 1", "outside"),
        ("missing.raw", "not in the upload"),
    ],
)
def test_metaimage_data_file_outside_the_upload_is_refused(ref: str, message: str) -> None:
    header = Source("scan/x.mhd", MHD.format(ref=ref).encode())
    # A file named like the target is in the upload: still refused when the reference leaves the upload.
    decoy = Source("scan/passwd", bytes(48))
    result = _scan(header, decoy)
    assert not result.series
    problem = next(p for p in result.errors if p.source == header.name)
    assert message in problem.message, problem.message
    assert "upload" in problem.message


def test_metaimage_detached_data_matches_simpleitk(tmp_path: Path) -> None:
    values = np.arange(24, dtype="<i2").reshape(2, 3, 4)  # (z, y, x)
    text = MHD.format(ref="data.raw")
    (tmp_path / "x.mhd").write_text(text)
    (tmp_path / "data.raw").write_bytes(values.tobytes())
    series = _only_series(_scan(Source("x.mhd", text.encode()), Source("data.raw", values.tobytes())))
    ref_array, ref_affine = _sitk_reference(tmp_path / "x.mhd")
    assert_same_image(_load_checked(series), ref_array, ref_affine)
    # A file list and a %d pattern, also inside the upload.
    slices = [Source(f"s{k}.raw", values[k].tobytes()) for k in range(2)]
    listed = Source("l.mhd", MHD.format(ref="LIST\ns0.raw\ns1.raw").encode())
    pattern = Source("p.mhd", MHD.format(ref="s%d.raw 0 1 1").encode())
    for header in (listed, pattern):
        volume = _load_checked(_only_series(_scan(header, *slices)))
        assert_same_image(volume, ref_array, ref_affine)


def _sitk_image(shape_xyz: tuple[int, ...], pixel: int, *, components: int = 1, seed: int = 1) -> sitk.Image:
    rng = np.random.default_rng(seed)
    np_dtype = sitk.GetArrayViewFromImage(sitk.Image([1] * len(shape_xyz), pixel)).dtype
    size = shape_xyz[::-1] + ((components,) if components > 1 else ())
    if np_dtype.kind in "iu":
        array = rng.integers(0, 200, size=size).astype(np_dtype)
    else:
        array = rng.normal(size=size).astype(np_dtype)
    image = sitk.GetImageFromArray(array, isVector=components > 1)
    dim = len(shape_xyz)
    if dim >= 3:
        rotation = nib.eulerangles.euler2mat(0.3, -0.2, 0.5)  # oblique and non-symmetric
        direction = np.eye(dim)
        direction[:3, :3] = rotation
        image.SetDirection(direction.ravel().tolist())
        image.SetSpacing([0.7, 1.3, 2.1, 1.0][:dim])
        image.SetOrigin([10.0, -20.0, 30.0, 0.0][:dim])
    return image


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".mhd", ".nhdr"])
@pytest.mark.parametrize(
    ("shape", "pixel", "components"),
    [
        ((5, 6, 7), sitk.sitkInt16, 1),
        ((5, 6, 7), sitk.sitkFloat64, 1),
        ((5, 6, 7), sitk.sitkUInt8, 3),
        ((6, 7), sitk.sitkUInt16, 1),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_itk_written_files_match_simpleitk(
    suffix: str, shape: tuple[int, ...], pixel: int, components: int, compress: bool, tmp_path: Path
) -> None:
    image = _sitk_image(shape, pixel, components=components)
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(image, str(path), useCompression=compress)
    sources = [Source(f"upload/{p.name}", p.read_bytes()) for p in sorted(tmp_path.iterdir())]
    series = _only_series(_scan(*sources))
    assert len(series.info.sources) == len(sources)
    volume = _load_checked(series)
    ref_array, ref_affine = _sitk_reference(path)
    assert volume.is_rgb == (components == 3)
    assert_same_image(volume, ref_array, ref_affine, rtol=1e-6)


def test_4d_metaimage_matches_simpleitk(tmp_path: Path) -> None:
    array = np.arange(3 * 4 * 5 * 2, dtype=np.int16).reshape(2, 5, 4, 3)  # (t, z, y, x)
    image = sitk.GetImageFromArray(array, isVector=False)
    image.SetSpacing([1.0, 2.0, 3.0, 500.0])
    image.SetOrigin([1.0, 2.0, 3.0, 0.0])
    sitk.WriteImage(image, str(tmp_path / "t.mha"))
    volume = _load_checked(_only_series(_scan(_file(tmp_path / "t.mha"))))
    assert volume.shape[3] == 2
    ref_array, ref_affine = _sitk_reference(tmp_path / "t.mha")
    assert_same_image(volume, ref_array, ref_affine)


NHDR = (
    "NRRD0004\ntype: short\ndimension: 3\nspace: {space}\nsizes: 4 3 2\n"
    "space directions: (0,1.5,0) (-2,0,0) (0,0,3)\nspace origin: (10,20,-30)\nkinds: domain domain domain\n"
    "endian: {endian}\nencoding: {encoding}\ndata file: {ref}\n"
)


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior", "left-anterior-superior"])
def test_nrrd_spaces_match_simpleitk(space: str, tmp_path: Path) -> None:
    values = np.arange(24, dtype="<i2").reshape(2, 3, 4)
    text = NHDR.format(space=space, endian="little", encoding="raw", ref="d.raw")
    (tmp_path / "x.nhdr").write_text(text)
    (tmp_path / "d.raw").write_bytes(values.tobytes())
    series = _only_series(_scan(Source("x.nhdr", text.encode()), Source("d.raw", values.tobytes())))
    ref_array, ref_affine = _sitk_reference(tmp_path / "x.nhdr")
    assert_same_image(_load_checked(series), ref_array, ref_affine)


@pytest.mark.parametrize("encoding", ["gzip", "bzip2", "ascii", "hex"])
def test_nrrd_encodings_and_byte_order(encoding: str) -> None:
    import bz2

    values = (np.arange(24).reshape(2, 3, 4) - 7).astype(">i2")
    raw = values.tobytes()
    payload = {
        "gzip": gzip.compress(raw),
        "bzip2": bz2.compress(raw),
        "ascii": " ".join(str(v) for v in values.ravel()).encode(),
        "hex": raw.hex().encode(),
    }[encoding]
    reference = Source("r.nhdr", NHDR.format(space="lps", endian="big", encoding="raw", ref="r.raw").encode())
    expected = _load_checked(_only_series(_scan(reference, Source("r.raw", raw))))
    header = Source("e.nhdr", NHDR.format(space="lps", endian="big", encoding=encoding, ref="e.dat").encode())
    volume = _load_checked(_only_series(_scan(header, Source("e.dat", payload))))
    np.testing.assert_array_equal(volume.array, expected.array)
    np.testing.assert_array_equal(volume.affine, expected.affine)
    attached = Source(
        "a.nrrd",
        NHDR.format(space="lps", endian="big", encoding=encoding, ref="x").split("data file")[0].encode()
        + b"\n"
        + payload,
    )
    np.testing.assert_array_equal(_load_checked(_only_series(_scan(attached))).array, expected.array)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("/etc/passwd", "absolute path"),
        ("../d.raw", "outside"),
        ("LIST\n/etc/passwd", "absolute path"),
        ("../slice%03d.raw 1 2 1", "outside"),
        ("d.raw", "not in the upload"),
    ],
)
def test_nrrd_data_file_outside_the_upload_is_refused(ref: str, message: str) -> None:
    header = Source("x.nhdr", NHDR.format(space="lps", endian="little", encoding="raw", ref=ref).encode())
    result = _scan(header)
    assert not result.series and message in result.errors[0].message, result.errors


def test_detached_data_shorter_than_declared_is_refused() -> None:
    header = Source("x.nhdr", NHDR.format(space="lps", endian="little", encoding="raw", ref="d.raw").encode())
    result = _scan(header, Source("d.raw", bytes(47)))
    assert not result.series
    assert "truncated" in result.errors[0].message
    # The data file of a refused header is reported too, as a data file without a usable header.
    assert any(p.source == "d.raw" and "header" in p.message for p in result.errors)


# --------------------------------------------------------------------------- pictures


def _png(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _picture_world(col: int, row: int, page: int = 0) -> np.ndarray:
    """ITK's placement of a picture's pixel: identity in LPS, 1 mm."""
    return (LPS_TO_RAS @ np.array([col, row, page, 1.0]))[:3]


def _value_at(volume: Volume, world: np.ndarray) -> np.ndarray:
    ijk = np.linalg.solve(volume.affine[:3, :3], world - volume.affine[:3, 3])
    return volume.array[tuple(np.round(ijk).astype(int))]


def test_png_rgb() -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)  # (rows, cols, rgb)
    series = _only_series(_scan(Source("photo.png", _png(Image.fromarray(pixels, "RGB")))))
    volume = _load_checked(series)
    assert volume.is_rgb and volume.shape == (40, 30, 1, 3) and volume.array.dtype == np.uint8
    np.testing.assert_allclose(volume.spacing_mm, (1, 1, 1))
    for row, col in [(0, 0), (29, 39), (5, 33), (17, 2)]:
        np.testing.assert_array_equal(_value_at(volume, _picture_world(col, row)), pixels[row, col])


def test_png_16_bit_grey_and_tiff_stack() -> None:
    rng = np.random.default_rng(4)
    pages = rng.integers(0, 65536, size=(3, 20, 25), dtype=np.uint16)
    png = _png(Image.fromarray(pages[0]))
    volume = _load_checked(_only_series(_scan(Source("grey16.png", png))))
    assert volume.array.dtype == np.uint16 and volume.shape == (25, 20, 1)
    assert _value_at(volume, _picture_world(24, 19)) == pages[0, 19, 24]
    frames = [Image.fromarray(p) for p in pages]
    tiff = _png(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    stack = _load_checked(_only_series(_scan(Source("stack.tif", tiff))))
    assert stack.shape == (25, 20, 3) and stack.array.dtype == np.uint16
    for page, row, col in [(0, 0, 0), (2, 19, 24), (1, 7, 11)]:
        assert _value_at(stack, _picture_world(col, row, page)) == pages[page, row, col]


def test_jpeg_and_palette_png() -> None:
    grey = Image.fromarray(np.tile(np.arange(0, 250, 10, dtype=np.uint8), (8, 1)))
    jpeg = _load_checked(_only_series(_scan(Source("scan.jpg", _png(grey, "JPEG", quality=95)))))
    assert jpeg.array.dtype == np.uint8 and not jpeg.is_rgb and jpeg.shape == (25, 8, 1)
    palette = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4)).convert("P")
    pal = _load_checked(_only_series(_scan(Source("pal.png", _png(palette)))))
    assert pal.is_rgb and pal.shape == (4, 3, 1, 3)


def test_tiff_pages_of_different_sizes_are_refused() -> None:
    first, second = Image.new("L", (10, 10)), Image.new("L", (12, 10))
    tiff = _png(first, "TIFF", save_all=True, append_images=[second])
    result = _scan(Source("mixed.tiff", tiff))
    assert not result.series and "page 2" in result.errors[0].message


def test_magic_bytes_win_over_the_name() -> None:
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    result = _scan(Source("actually_a_png.jpg", _png(Image.fromarray(pixels))))
    assert _only_series(result).info.kind == "image"
    nii = nib.Nifti1Image(_grid((3, 4, 5), "int16"), np.eye(4)).to_bytes()
    assert _only_series(_scan(Source("no_extension", nii))).info.kind == "nifti"


# --------------------------------------------------------------------------- unrecognised


def test_unrecognised_files_say_what_is_supported() -> None:
    result = _scan(
        Source("notes.txt", b"hello"),
        Source("broken.nii", b"\0" * 400),
        Source("folder/.DS_Store", b"\0\0\0\1Bud1"),
        Source("lonely.raw", bytes(100)),
    )
    assert not result.series
    messages = {p.source: p.message for p in result.errors}
    for message in messages.values():
        assert "NIfTI" in message and "NRRD" in message and "MetaImage" in message and "PNG" in message
    assert "named like NIfTI" in messages["broken.nii"]
    assert "header" in messages["lonely.raw"]
    assert [s.source for s in result.skipped] == ["folder/.DS_Store"]


def test_nrrd_non_spatial_axes() -> None:
    rgb = np.arange(3 * 4 * 5 * 2, dtype=np.uint8).reshape(2, 5, 4, 3)  # (z, y, x, c): colour fastest
    header = (
        "NRRD0005\ntype: uchar\ndimension: 4\nspace: left-posterior-superior\nsizes: 3 4 5 2\n"
        "space directions: none (1,0,0) (0,1,0) (0,0,2)\nkinds: RGB-Color domain domain domain\n"
        "encoding: raw\nspace origin: (0,0,0)\n\n"
    )
    volume = _load_checked(_only_series(_scan(Source("rgb.nrrd", header.encode() + rgb.tobytes()))))
    assert volume.is_rgb and volume.shape == (4, 5, 2, 3)
    # Voxel (x=3, y=0, z=1) in LPS is at (3, 0, 2) mm -> RAS (-3, 0, 2).
    np.testing.assert_array_equal(_value_at(volume, np.array([-3.0, 0.0, 2.0])), rgb[1, 0, 3])

    field = (
        header.replace("uchar", "float").replace("RGB-Color", "vector").replace("encoding", "endian: little\nencoding")
    )
    result = _scan(Source("warp.nrrd", field.encode() + np.zeros(120, "<f4").tobytes()))
    assert not result.series and "displacement" in result.errors[0].message

    frames = (
        header.replace("RGB-Color", "list").replace("uchar", "short").replace("encoding", "endian: little\nencoding")
    )
    series = _only_series(_scan(Source("dwi.nrrd", frames.encode() + np.arange(120, dtype="<i2").tobytes())))
    volume = _load_checked(series)
    assert volume.shape == (4, 5, 2, 3) and not volume.is_rgb
    np.testing.assert_array_equal(
        _value_at(volume, np.array([-3.0, 0.0, 2.0])), np.arange(120).reshape(2, 5, 4, 3)[1, 0, 3]
    )


def test_big_endian_metaimage_and_gzipped_pair_header(tmp_path: Path) -> None:
    values = np.arange(24, dtype=">i2").reshape(2, 3, 4) * 100
    text = MHD.format(ref="LOCAL").replace("BinaryDataByteOrderMSB = False", "BinaryDataByteOrderMSB = True")
    (tmp_path / "b.mha").write_bytes(text.encode() + values.tobytes())
    series = _only_series(_scan(_file(tmp_path / "b.mha")))
    ref_array, ref_affine = _sitk_reference(tmp_path / "b.mha")
    assert_same_image(_load_checked(series), ref_array, ref_affine)

    header_path = nibabel_file("nifti1.hdr")
    img_bytes, _ = _pair_image_bytes(header_path)
    (tmp_path / "nifti1.hdr").write_bytes(header_path.read_bytes())
    (tmp_path / "nifti1.img").write_bytes(img_bytes)
    ref_array, ref_affine = _nib_reference(tmp_path / "nifti1.hdr")
    pair = _scan(
        Source("p/nifti1.hdr.gz", gzip.compress(header_path.read_bytes())),
        Source("p/nifti1.img.gz", gzip.compress(img_bytes)),
    )
    assert_same_image(_load_checked(_only_series(pair)), ref_array, ref_affine)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about every damaged TIFF tag
def test_damaged_headers_only_raise_core_errors(tmp_path: Path) -> None:
    """Mutated headers of every format: scanning and loading fail, if at all, with a CoreError.

    (Pillow and nibabel raise TypeError, KeyError, HeaderDataError... on damaged
    files; those must reach the user as a message, not as a crash.)
    """
    from core.errors import CoreError

    values = np.random.default_rng(5).integers(0, 100, (6, 5, 4)).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    seeds = [
        ("a.nii", nib.Nifti1Image(values, np.eye(4)).to_bytes()),
        ("a.nii.gz", gzip.compress(nib.Nifti2Image(values, np.eye(4)).to_bytes())),
        ("a.png", _png(Image.fromarray(values[0].astype(np.uint8)))),
        ("a.tif", _png(Image.fromarray(values[0].astype(np.uint16)), "TIFF")),
    ]
    for name, compress in (("a.nrrd", False), ("a.mha", False), ("c.mha", True)):
        sitk.WriteImage(image, str(tmp_path / name), useCompression=compress)
        seeds.append((name, (tmp_path / name).read_bytes()))
    rng = np.random.default_rng(11)
    limits = Limits(max_voxels=10**7, max_total_bytes=10**8)
    for attempt in range(700):
        name, original = seeds[attempt % len(seeds)]
        data = bytearray(original)
        for _ in range(int(rng.integers(1, 5))):
            if len(data) < 4:
                break
            pos = int(rng.integers(0, min(len(data) - 1, 700)))
            action = int(rng.integers(0, 3))
            if action == 0:
                data[pos] = int(rng.integers(0, 256))
            elif action == 1:
                del data[pos]
            else:
                del data[max(pos, 2) :]
        result = scan_other([Source(name, bytes(data))], limits)
        for series in result.series:
            try:
                series.load()
            except CoreError:
                pass
