"""DICOM layouts scanners write beyond one file per slice (issue 7), against dcm2niix and analytic phantoms.

Each layout is checked with real files where the corpus or pydicom has them and
with synthetic files built from the standard or the vendor's description, whose
answer is known by construction. dcm2niix is the geometry oracle where it reads
the layout; where it does not (SEG, RT Dose) or where the issue asks for more
than it does (several enhanced files of one series joined into 4D), the answer
comes from the construction.
"""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, convert_color_space
from pydicom.uid import ImplicitVRLittleEndian, RLELossless, generate_uid

from core.dicom_series import is_dicom, scan_dicom
from core.series import ScanResult
from core.sources import Source, read_paths
from core.volume import LPS_TO_RAS, Volume
from tests.conftest import DATA, data_path
from tests.dicom_factory import (
    AXIAL,
    CORONAL,
    SAGITTAL,
    add_private,
    bare_dataset,
    lps_affine,
    make_dicomdir,
    make_enhanced_file,
    make_palette_image,
    make_rtdose,
    make_segmentation,
    make_series,
    make_uih_grid,
    part10_big_endian,
    to_bytes,
    write_sources,
)
from tests.test_dicom_series import (
    assert_same_world,
    check_synthetic,
    expected_grid,
    marker_phantom,
    only_series,
    resample_like,
    run_dcm2niix,
)

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# pydicom-data's files (enhanced, SEG, palette, radiographs) install as a top-level "data_store" package.
PYDICOM_DATA_STORE = Path(pydicom.__file__).parents[1] / "data_store" / "data"


def _pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None and (PYDICOM_DATA_STORE / name).exists():
        path = str(PYDICOM_DATA_STORE / name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed (pip package pydicom / pydicom-data)")
    return Path(path)


def _source(path: Path, name: str | None = None) -> Source:
    return Source(name or path.name, path.read_bytes())


def _world_of_voxels(volume: Volume) -> np.ndarray:
    """(I*J*K, 3) RAS positions of every voxel centre, in array order."""
    index = np.indices(volume.spatial_shape).reshape(3, -1)
    return (volume.affine[:3, :3] @ index).T + volume.affine[:3, 3]


def _dcm2niix_values(image: nib.Nifti1Image) -> np.ndarray:
    """dcm2niix's voxel values with its scl_slope/scl_inter applied."""
    return np.asarray(image.dataobj, dtype=np.float64)


def _copy_with(path: Path, name: str, **attributes: object) -> Source:
    """A copy of a file as another instance (new SOP Instance UID) with some attributes changed."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return Source(name, to_bytes(ds))


# --- 1. several enhanced files of one series --------------------------------------------------------------


def _enhanced_volumes(count: int = 3, orientation=SAGITTAL, step: float = 1.5):
    affine = lps_affine(orientation, (0.8, 0.9), (10.0, -5.0, 20.0), step)
    volumes = [marker_phantom((4, 5, 6)) + 700 * t for t in range(count)]
    positions = [(affine @ [0, 0, k, 1])[:3] for k in range(4)]
    return affine, volumes, positions


def test_enhanced_files_of_one_series_join_into_4d_in_acquisition_order(tmp_path: Path) -> None:
    affine, volumes, positions = _enhanced_volumes()
    series, study, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    sources = []
    for t in (2, 0, 1):  # upload order means nothing
        sources.append(
            make_enhanced_file(
                volumes[t],
                positions,
                orientation=SAGITTAL,
                pixel_spacing=(0.8, 0.9),
                series_uid=series,
                study_uid=study,
                frame_uid=frame_of_reference,
                instance_number=10 - t,  # instance numbers run against time: acquisition number decides
                acquisition_number=t + 1,
                acquisition_datetime=f"2024010112{t:02d}00",
                name=f"vol{t}.dcm",
            )
        )
    result = scan_dicom(sources)
    loaded = only_series(result)
    volume = loaded.load()
    assert sorted(volume.spatial_shape) == [4, 5, 6] and volume.n_frames == 3
    assert sorted(loaded.info.sources) == ["vol0.dcm", "vol1.dcm", "vol2.dcm"]
    assert any("ordered by acquisition number" in w for w in loaded.info.warnings)
    for t in range(3):
        check_synthetic(Volume(volume.array[..., t], volume.affine), volumes[t], affine)
    # dcm2niix writes one 3D file per enhanced file (it does not join them): each is our volume t in world space
    images = run_dcm2niix(write_sources(sources, tmp_path / "dicom"), tmp_path / "nifti")
    assert len(images) == 3
    for image in images:
        assert_same_world(volume.shape, volume.affine, image.shape, image.affine)
        values = _dcm2niix_values(image)
        matches = [np.array_equal(volume.array[..., t], resample_like(volume, values, image.affine)) for t in range(3)]
        assert sum(matches) == 1


def test_enhanced_files_ordered_by_frame_time_when_acquisition_numbers_repeat() -> None:
    affine, volumes, positions = _enhanced_volumes(count=2, orientation=AXIAL, step=2.0)
    series = generate_uid()
    sources = [
        make_enhanced_file(
            volumes[t],
            positions,
            pixel_spacing=(0.8, 0.9),
            series_uid=series,
            acquisition_number=1,
            instance_number=1,
            frame_datetimes=[f"20240101120{t}00.{k:03d}" for k in range(4)],
            name=f"t{t}.dcm",
        )  # fmt: skip
        for t in (1, 0)
    ]
    volume = only_series(scan_dicom(sources)).load()
    assert volume.n_frames == 2
    for t in range(2):
        check_synthetic(Volume(volume.array[..., t], volume.affine), volumes[t], affine)


def test_enhanced_magnitude_and_phase_files_of_one_series_stay_apart() -> None:
    affine, volumes, positions = _enhanced_volumes(count=2, orientation=CORONAL)
    series = generate_uid()
    sources = [
        make_enhanced_file(
            volumes[t],
            positions,
            orientation=CORONAL,
            pixel_spacing=(0.8, 0.9),
            series_uid=series,
            instance_number=t + 1,
            acquisition_number=1,
            frame_types=[("ORIGINAL", "PRIMARY", kind, "NONE")] * 4,
            name=f"{kind}.dcm",
        )  # fmt: skip
        for t, kind in enumerate(("M", "P"))
    ]
    result = scan_dicom(sources)
    assert not result.errors and len(result.series) == 2
    by_source = {s.info.sources: s for s in result.series}
    check_synthetic(by_source[("M.dcm",)].load(), volumes[0], affine)
    check_synthetic(by_source[("P.dcm",)].load(), volumes[1], affine)
    assert all("holds 2 volumes" in s.info.warnings[0] for s in result.series)


def test_one_volume_split_over_two_enhanced_files_is_one_3d_volume() -> None:
    affine = lps_affine(AXIAL, (1.0, 1.0), (0.0, 0.0, 0.0), 2.5)
    pixels = marker_phantom((6, 4, 5))
    positions = [(affine @ [0, 0, k, 1])[:3] for k in range(6)]
    series = generate_uid()
    first = make_enhanced_file(pixels[:3], positions[:3], series_uid=series, instance_number=1, name="a.dcm")
    second = make_enhanced_file(pixels[3:], positions[3:], series_uid=series, instance_number=2, name="b.dcm")
    volume = only_series(scan_dicom([second, first])).load()
    check_synthetic(volume, pixels, affine)


def test_real_enhanced_file_repeated_as_a_second_acquisition_gives_4d() -> None:
    path = data_path("mr_philips_enhanced_multiframe", "dicom", "IM-0001-0170-0001.dcm")
    single = only_series(scan_dicom([_source(path)])).load()
    sources = [_copy_with(path, f"acq{n}.dcm", AcquisitionNumber=n, InstanceNumber=n) for n in (2, 1)]
    joined = only_series(scan_dicom(sources)).load()
    assert joined.shape == (*single.shape, 2)
    assert np.array_equal(joined.affine, single.affine)
    assert np.array_equal(joined.array[..., 0], single.array) and np.array_equal(joined.array[..., 1], single.array)


# --- 2. Philips precise values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "folder"),
    [("mr_philips_epi_4d", "dicom"), ("mr_philips_enhanced_multiframe", "dicom")],
)
def test_philips_values_are_dcm2niix_default_precise_values(entry: str, folder: str, tmp_path: Path) -> None:
    source_folder = data_path(entry, folder)
    series = only_series(scan_dicom(read_paths([source_folder])))
    volume = series.load()
    images = run_dcm2niix(source_folder, tmp_path / "nifti")  # default options: -p y
    assert len(images) == 1
    reference = images[0]
    assert_same_world(volume.shape, volume.affine, reference.shape, reference.affine)
    expected = resample_like(volume, _dcm2niix_values(reference).reshape(reference.shape[:3] + volume.shape[3:]),
                             reference.affine)  # fmt: skip
    np.testing.assert_allclose(volume.array, expected, rtol=2e-6, atol=1e-3)
    assert any("Philips precise values" in w for w in series.info.warnings)


def test_philips_precise_formula_and_window_on_a_synthetic_series() -> None:
    stored = marker_phantom((3, 4, 5))
    rs, ri, ss = 1.5, 10.0, 0.004
    plain = make_series(stored, rescale=(rs, ri), modality="MR", window=(300.0, 600.0),
                        extra={"Manufacturer": "Philips Medical Systems"})  # fmt: skip
    philips = [add_private(s, 0x2005, "Philips MR Imaging DD 001", {0x0E: ("FL", ss)}) for s in plain]
    series = only_series(scan_dicom(philips))
    volume = series.load()
    # FP = (PV * RS + RI) / (RS * SS)
    check_synthetic(volume, stored, lps_affine(), scale=(1.0 / ss, ri / (rs * ss)))
    window = series.info.windows[0]
    assert window.center == pytest.approx(300.0 / (rs * ss)) and window.width == pytest.approx(600.0 / (rs * ss))
    # the same private tag on another vendor's file means nothing: displayed values
    other = [
        add_private(s, 0x2005, "Philips MR Imaging DD 001", {0x0E: ("FL", ss)})
        for s in make_series(stored, rescale=(rs, ri), modality="MR", extra={"Manufacturer": "SIEMENS"})
    ]
    check_synthetic(only_series(scan_dicom(other)).load(), stored, lps_affine(), scale=(rs, ri))
    # without the private scale slope Philips files keep the displayed values
    check_synthetic(only_series(scan_dicom(plain)).load(), stored, lps_affine(), scale=(rs, ri))


def test_philips_precise_scaling_survives_implicit_vr() -> None:
    stored = marker_phantom((2, 3, 4))
    sources = make_series(stored, rescale=(2.0, 0.0), modality="MR", extra={"Manufacturer": "Philips"})
    sources = [add_private(s, 0x2005, "Philips MR Imaging DD 001", {0x0E: ("FL", 0.25)}) for s in sources]
    implicit = []
    for source in sources:
        ds = pydicom.dcmread(io.BytesIO(source.data))
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        implicit.append(Source(source.name, to_bytes(ds)))
    check_synthetic(only_series(scan_dicom(implicit)).load(), stored, lps_affine(), scale=(4.0, 0.0))


# --- 3. files without the Part-10 header ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("little_endian", "implicit"),
    [(True, False), (True, True), (False, False), (False, True)],
    ids=["explicit-LE", "implicit-LE", "explicit-BE", "implicit-BE"],
)
def test_bare_datasets_in_every_encoding_load_like_the_part10_file(little_endian: bool, implicit: bool) -> None:
    stored = (marker_phantom((3, 4, 5)).astype(np.int32) - 2000).astype(np.int16)
    affine = lps_affine(CORONAL, (0.7, 0.6), (5.0, 6.0, 7.0), 2.0)
    sources = make_series(stored, affine=affine, rescale=(1.0, -24.0), shuffle_seed=4)
    bare = [bare_dataset(s, little_endian=little_endian, implicit=implicit) for s in sources]
    assert all(not s.data.startswith(b"\x00" * 128) and b"DICM" not in s.data[:200] for s in bare)
    assert all(is_dicom(s.data) for s in bare)
    volume = only_series(scan_dicom(bare)).load()
    check_synthetic(volume, stored, affine, scale=(1.0, -24.0))


def test_real_bare_files_are_recognised() -> None:
    palette = _pydicom_file("OT-PAL-8-face.dcm")  # implicit VR little endian, starts with (0008,0000)
    assert palette.read_bytes()[128:132] != b"DICM" and is_dicom(palette.read_bytes())
    volume = only_series(scan_dicom([_source(palette)])).load()
    ds = pydicom.dcmread(palette, force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # what the bytes are; pydicom needs to be told
    expected = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)
    assert volume.is_rgb
    np.testing.assert_array_equal(volume.array[::-1, ::-1, 0, :], expected.transpose(1, 0, 2))
    for name in ("ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm"):  # RT plans: DICOM, but no image
        source = _source(_pydicom_file(name))
        assert is_dicom(source.data)
        result = scan_dicom([source])
        assert not result.series and not result.errors and "not an image" in result.skipped[0].reason


def test_is_dicom_does_not_accept_junk() -> None:
    rng = np.random.default_rng(20240101)
    accepted = [n for n in range(3000) if is_dicom(rng.integers(0, 256, int(rng.integers(0, 400)), np.uint8).tobytes())]
    assert accepted == []
    # junk that starts like a group 0008 element
    for prefix in (b"\x08\x00\x05\x00", b"\x00\x08\x00\x05", b"\x08\x00\x08\x00CS"):
        noisy = [prefix + rng.integers(0, 256, 200, np.uint8).tobytes() for _ in range(500)]
        assert not any(is_dicom(data) for data in noisy), prefix
    part10 = make_series(marker_phantom((1, 4, 4)))[0]
    bare = bare_dataset(part10, little_endian=True, implicit=True).data
    assert is_dicom(bare)
    assert not is_dicom(bare[:10])  # one element cut in its value: not clearly DICOM
    other_formats = [b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, b"PK\x03\x04" + b"\x00" * 100, b"NRRD0004\n" * 10,
                     b"\\\x01\x00\x00" + b"\x00" * 344, b"ObjectType = Image\n" * 5, b"II*\x00" + b"\x00" * 100]  # fmt: skip
    assert not any(is_dicom(data) for data in other_formats)
    for path in sorted(DATA.glob("*/*.nii*")) + sorted(DATA.glob("*/*.nrrd")) + sorted(DATA.glob("*/*.mh?")):
        assert not is_dicom(path.read_bytes()), path.name


# --- 4. DICOMDIR trees ----------------------------------------------------------------------------------------------


def test_dicomdir_tree_reads_the_uploaded_files_and_skips_the_index() -> None:
    tree = _pydicom_file("CT_small.dcm").parent / "dicomdirtests"
    if not (tree / "DICOMDIR").exists():
        pytest.skip("pydicom's dicomdirtests tree is not installed")
    sources = read_paths([tree])
    result = scan_dicom(sources)
    reasons = {s.source: s.reason for s in result.skipped}
    assert "DICOMDIR" in reasons["dicomdirtests/DICOMDIR"] and "never followed" in reasons["dicomdirtests/DICOMDIR"]
    used = {name for s in result.series for name in s.info.sources}
    everything = used | set(reasons) | {p.source for p in result.errors}
    assert everything == {s.name for s in sources}
    ct2 = [s for s in result.series if any("/CT2/" in name for name in s.info.sources)]
    assert ct2 and ct2[0].load().shape[2] == 4


def test_dicomdir_pointing_outside_the_upload_is_never_followed() -> None:
    images = make_series(marker_phantom((3, 4, 4)), name_prefix="IMG")
    # its records name files that are not in the upload (and one outside any upload)
    index = make_dicomdir([["..", "..", "etc", "passwd"], ["IMAGES", "IM0001"], ["", "etc", "shadow"]])
    result = scan_dicom([index, *images])
    assert [s.source for s in result.skipped] == ["DICOMDIR"] and not result.errors
    assert "never followed" in result.skipped[0].reason
    check_synthetic(only_series(ScanResult(series=result.series)).load(), marker_phantom((3, 4, 4)), lps_affine())


# --- 5. UIH grids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "orientation", "step"),
    [(7, AXIAL, 3.0), (6, SAGITTAL, -2.5), (12, "oblique", 4.0)],
    ids=["7-axial", "6-sagittal-descending", "12-oblique"],
)
def test_uih_grid_is_demosaiced_like_dcm2niix(count: int, orientation, step: float, tmp_path: Path) -> None:
    iop = _oblique() if orientation == "oblique" else orientation
    affine = lps_affine(iop, (2.0, 2.2), (-10.0, -20.0, 5.0), step)
    volume_krc = (marker_phantom((count, 8, 6)) + 3).astype(np.uint16)
    source = make_uih_grid(volume_krc, affine)
    grid = pydicom.dcmread(io.BytesIO(source.data))
    columns = int(np.ceil(np.sqrt(count)))
    assert (grid.Rows, grid.Columns) == (8 * int(np.ceil(count / columns)), 6 * columns)
    series = only_series(scan_dicom([source]))
    volume = series.load()
    check_synthetic(volume, volume_krc, affine)
    images = run_dcm2niix(write_sources([source], tmp_path / "dicom"), tmp_path / "nifti")
    assert len(images) == 1
    assert_same_world(volume.shape, volume.affine, images[0].shape, images[0].affine)
    np.testing.assert_array_equal(volume.array, resample_like(volume, _dcm2niix_values(images[0]), images[0].affine))


def _oblique() -> tuple[float, ...]:
    row = np.array([np.cos(0.3), np.sin(0.3) * np.cos(0.2), np.sin(0.3) * np.sin(0.2)])
    column = np.cross(np.cross(row, [0.0, 0.0, 1.0]), row)
    column = -column / np.linalg.norm(column)
    return (*row, *column)


def test_uih_grid_without_frame_positions_uses_the_slice_normal_and_without_both_is_refused() -> None:
    affine = lps_affine(AXIAL, (2.0, 2.0), (-10.0, -20.0, 5.0), -3.0)
    volume_krc = marker_phantom((5, 6, 6))
    fallback = only_series(scan_dicom([make_uih_grid(volume_krc, affine, with_frame_positions=False)])).load()
    check_synthetic(fallback, volume_krc, affine)
    stripped = make_uih_grid(volume_krc, affine, with_frame_positions=False, with_slice_normal=False)
    result = scan_dicom([stripped])
    assert not result.series and len(result.errors) == 1
    message = result.errors[0].message
    assert "UIH grid" in message and "(0065,1051)" in message and "(0065,1014)" in message


def test_uih_grid_in_implicit_vr_and_several_grids_as_a_time_series() -> None:
    affine = lps_affine(CORONAL, (1.5, 1.5), (0.0, 30.0, 0.0), 2.0)
    volumes = [marker_phantom((5, 4, 6)) + 50 * t for t in range(3)]
    series = generate_uid()
    sources = []
    for t in (1, 2, 0):
        source = make_uih_grid(volumes[t], affine, series_uid=series, acquisition_number=t + 1, name=f"g{t}.dcm")
        ds = pydicom.dcmread(io.BytesIO(source.data))
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # private tags become UN: parsed by hand
        sources.append(Source(source.name, to_bytes(ds)))
    volume = only_series(scan_dicom(sources)).load()
    assert sorted(volume.spatial_shape) == [4, 5, 6] and volume.n_frames == 3
    for t in range(3):
        check_synthetic(Volume(volume.array[..., t], volume.affine), volumes[t], affine)


def test_uih_grid_that_cannot_hold_its_tiles_is_refused() -> None:
    source = make_uih_grid(marker_phantom((4, 6, 7)), lps_affine(), with_frame_positions=False)
    ds = pydicom.dcmread(io.BytesIO(source.data))
    ds.private_block(0x0065, "Image Private Header")[0x50].value = "5"  # 5 slices need 3 tile columns: 14 px
    result = scan_dicom([Source("liar.dcm", to_bytes(ds))])
    assert not result.series and "cannot hold (0065,1050) 5 slices" in result.errors[0].message


# --- 6. DICOM SEG and RT Dose -----------------------------------------------------------------------------------


def _labels() -> np.ndarray:
    labels = np.zeros((7, 6, 9), dtype=np.uint8)
    labels[1, 1:4, 2:6] = 1
    labels[2, 2:5, 3:7] = 1
    labels[4, 0:2, 0:3] = 2
    labels[4, 4:6, 5:9] = 1
    labels[5, 3, 3] = 3
    return labels


@pytest.mark.parametrize("fractional", [False, True], ids=["binary", "fractional"])
def test_segmentation_becomes_a_label_volume_on_the_planes_of_its_frames(fractional: bool) -> None:
    labels = _labels()
    affine = lps_affine(_oblique(), (0.6, 0.8), (12.0, -7.0, 30.0), 2.5)
    source = make_segmentation(labels, affine, segment_labels=["Liver", "Spleen", "Lesion"], fractional=fractional,
                               frame_order_seed=5)  # fmt: skip
    series = only_series(scan_dicom([source]))
    assert "1 Liver, 2 Spleen, 3 Lesion" in series.info.description
    volume = series.load()
    assert volume.array.dtype == np.uint8 and volume.modality == "SEG" and series.info.dtype == "uint8"
    # frames exist for slices 1..5 only: the label volume spans those planes, gaps (slice 3) filled with 0
    shifted = affine.copy()
    shifted[:3, 3] = (affine @ [0, 0, 1, 1])[:3]
    check_synthetic(volume, labels[1:6], shifted)


def test_segmentation_takes_the_grid_of_its_image_series_when_uploaded() -> None:
    labels = _labels()
    affine = lps_affine(AXIAL, (0.6, 0.8), (12.0, -7.0, 30.0), 2.5)
    images = make_series(marker_phantom((7, 6, 9)), affine=affine, modality="CT")
    image_series = pydicom.dcmread(io.BytesIO(images[0].data)).SeriesInstanceUID
    seg = pydicom.dcmread(io.BytesIO(make_segmentation(labels, affine, segment_labels=["A", "B", "C"]).data))
    reference = pydicom.Dataset()
    reference.SeriesInstanceUID = image_series
    seg.ReferencedSeriesSequence = [reference]
    result = scan_dicom([*images, Source("seg.dcm", to_bytes(seg))])
    assert not result.errors and len(result.series) == 2
    by_modality = {s.info.modality: s for s in result.series}
    image, labelled = by_modality["CT"], by_modality["SEG"]
    assert labelled.info.shape == image.info.shape and np.array_equal(labelled.info.affine, image.info.affine)
    assert any("grid of the referenced series" in w for w in labelled.info.warnings)
    check_synthetic(labelled.load(), labels, affine)


def test_overlapping_segments_keep_the_higher_number_and_say_so() -> None:
    labels = np.zeros((2, 4, 4), dtype=np.uint8)
    labels[0, 1:3, 1:3] = 1
    seg = make_segmentation(labels, lps_affine(), segment_labels=["outer", "inner"])
    ds = pydicom.dcmread(io.BytesIO(seg.data))
    # add a frame of segment 2 covering one pixel of segment 1 on the same plane
    extra = pydicom.Dataset()
    extra.PlanePositionSequence = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence
    ident = pydicom.Dataset()
    ident.ReferencedSegmentNumber = 2
    extra.SegmentIdentificationSequence = [ident]
    ds.PerFrameFunctionalGroupsSequence.append(extra)
    ds.NumberOfFrames = 2
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[0] = labels[0]
    masks[1, 2, 2] = 1
    ds.PixelData = pydicom.pixels.pack_bits(masks.ravel())
    series = only_series(scan_dicom([Source("overlap.dcm", to_bytes(ds))]))
    assert any("overlap" in w and "higher segment number" in w for w in series.info.warnings)
    expected = labels[:1].copy()
    expected[0, 2, 2] = 2
    check_synthetic(series.load(), expected, lps_affine())


def test_segmentation_that_cannot_be_placed_is_refused() -> None:
    labels = np.zeros((3, 4, 4), dtype=np.uint8)
    labels[:, 1, 1] = 1
    seg = pydicom.dcmread(io.BytesIO(make_segmentation(labels, lps_affine(), segment_labels=["x"]).data))
    uneven = [0.0, 1.0, 2.37]
    for item, z in zip(seg.PerFrameFunctionalGroupsSequence, uneven, strict=True):
        item.PlanePositionSequence[0].ImagePositionPatient = [0, 0, z]
    result = scan_dicom([Source("uneven.dcm", to_bytes(seg))])
    assert not result.series and "not multiples of one slice step" in result.errors[0].message
    del seg.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    result = scan_dicom([Source("unplaced.dcm", to_bytes(seg))])
    assert not result.series and "(0020,9113) Plane Position" in result.errors[0].message


def test_real_segmentation_from_pydicom_data() -> None:
    path = _pydicom_file("liver.dcm")
    series = only_series(scan_dicom([_source(path)]))
    volume = series.load()
    ds = pydicom.dcmread(path)
    masks = ds.pixel_array  # (3, 512, 512): segment 1 on three consecutive planes
    assert volume.shape == (512, 512, 3) and set(np.unique(volume.array)) == {0, 1}
    assert int(volume.array.sum()) == int(masks.sum())
    assert "1 Liver" in series.info.description
    # world position of every labelled voxel = where the frame's geometry puts it
    frames = ds.PerFrameFunctionalGroupsSequence
    spacing = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    for n, frame in enumerate(frames):
        row, column = np.argwhere(masks[n])[0]
        ipp = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        lps = ipp + np.array([1.0, 0, 0]) * column * spacing[1] + np.array([0, 1.0, 0]) * row * spacing[0]
        ras = LPS_TO_RAS[:3, :3] @ lps
        ijk = np.linalg.solve(volume.affine[:3, :3], ras - volume.affine[:3, 3])
        assert np.allclose(ijk, np.round(ijk), atol=1e-4)
        assert volume.array[tuple(np.round(ijk).astype(int))] == 1


@pytest.mark.parametrize("absolute", [False, True], ids=["relative-offsets", "z-offsets"])
def test_rt_dose_grid_is_placed_by_its_frame_offsets_in_gray(absolute: bool) -> None:
    rng = np.random.default_rng(3)
    dose = rng.uniform(0.0, 70.0, (6, 5, 4))
    affine = lps_affine(AXIAL, (2.5, 3.0), (-20.0, -30.0, -40.0), 3.0)
    series = only_series(scan_dicom([make_rtdose(dose, affine, scaling=1e-4, absolute_offsets=absolute)]))
    volume = series.load()
    assert volume.unit == "Gy" and volume.modality == "RTDOSE" and volume.array.dtype == np.float32
    ours = resample_like(volume, expected_grid(dose), LPS_TO_RAS @ affine)
    np.testing.assert_allclose(volume.array, ours, atol=0.5e-4 + 1e-5)  # stored to the nearest scaling step


def test_rt_dose_with_ambiguous_offsets_is_refused() -> None:
    source = make_rtdose(np.ones((3, 2, 2)), lps_affine(CORONAL, (2.0, 2.0), (0.0, 0.0, 0.0), 2.0))
    ds = pydicom.dcmread(io.BytesIO(source.data))
    ds.GridFrameOffsetVector = [5, 7, 9]  # non-zero start on a coronal grid: not the absolute form
    result = scan_dicom([Source("dose.dcm", to_bytes(ds))])
    assert not result.series and "(3004,000C) Grid Frame Offset Vector starts at 5 mm" in result.errors[0].message


def test_real_rt_dose_files() -> None:
    for name in ("rtdose.dcm", "rtdose_expb.dcm", "rtdose_rle.dcm"):
        path = _pydicom_file(name)
        volume = only_series(scan_dicom([_source(path)])).load()
        ds = pydicom.dcmread(path)
        assert volume.unit == "relative"  # (3004,0002) RELATIVE
        assert volume.spacing_mm == pytest.approx((10.0, 10.0, 5.0))  # k step from (3004,000C), not 1 mm
        expected = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)  # (15, 10, 10)
        np.testing.assert_allclose(volume.array[::-1, ::-1, :].transpose(2, 1, 0), expected, rtol=1e-6)


# --- 7. values: 12-bit signed, palette, YBR ---------------------------------------------------------------------


def _twelve_bit_signed() -> tuple[np.ndarray, np.ndarray]:
    """Values over the whole 12-bit signed range, and the same stored with garbage in the 4 unused high bits."""
    rng = np.random.default_rng(12)
    values = rng.integers(-2048, 2048, size=(3, 5, 6)).astype(np.int16)
    values[0, 0, :4] = [-2048, -1, 0, 2047]
    garbage = rng.integers(0, 16, size=values.shape).astype(np.uint16) << 12
    raw = ((values.view(np.uint16) & 0x0FFF) | garbage).view(np.int16)
    return values, raw


@pytest.mark.parametrize("encoding", ["explicit-LE", "implicit-LE", "explicit-BE", "RLE"])
def test_twelve_bit_signed_values_are_sign_extended_and_kept_negative(encoding: str) -> None:
    values, raw = _twelve_bit_signed()
    sources = make_series(raw if encoding != "RLE" else values, bits_stored=12, rescale=(1.0, -1000.0))
    converted = []
    for source in sources:
        ds = pydicom.dcmread(io.BytesIO(source.data))
        if encoding == "implicit-LE":
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif encoding == "RLE":
            ds.compress(RLELossless)
        converted.append(part10_big_endian(source) if encoding == "explicit-BE" else Source(source.name, to_bytes(ds)))
    series = only_series(scan_dicom(converted))
    assert series.info.dtype == "int16"
    volume = series.load()
    assert int(volume.array.min()) == -2048 - 1000
    check_synthetic(volume, values, lps_affine(), scale=(1.0, -1000.0))


def test_twelve_bit_signed_agrees_with_dcm2niix(tmp_path: Path) -> None:
    values, raw = _twelve_bit_signed()
    sources = make_series(raw, bits_stored=12, modality="MR")
    images = run_dcm2niix(write_sources(sources, tmp_path / "dicom"), tmp_path / "nifti")
    volume = only_series(scan_dicom(sources)).load()
    np.testing.assert_array_equal(volume.array, resample_like(volume, _dcm2niix_values(images[0]), images[0].affine))
    check_synthetic(volume, values, lps_affine())


@pytest.mark.parametrize("entry_bits", [16, 8])
def test_palette_colour_becomes_rgb(entry_bits: int) -> None:
    rng = np.random.default_rng(8)
    indices = rng.integers(0, 256, size=(5, 7)).astype(np.uint8)
    tables = [rng.integers(0, 2**entry_bits, size=256) for _ in range(3)]
    volume = only_series(scan_dicom([make_palette_image(indices, *tables, entry_bits=entry_bits)])).load()
    expected = np.stack([table[indices] for table in tables], axis=-1)
    if entry_bits == 16:
        expected = expected >> 8  # 16-bit entries shown on 8 bits
    assert volume.is_rgb and volume.array.dtype == np.uint8
    np.testing.assert_array_equal(volume.array[::-1, ::-1, 0, :], expected.transpose(1, 0, 2))


def test_real_palette_file() -> None:
    path = _pydicom_file("examples_palette.dcm")
    volume = only_series(scan_dicom([_source(path)])).load()
    ds = pydicom.dcmread(path)
    expected = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)
    np.testing.assert_array_equal(volume.array[::-1, ::-1, 0, :], expected.transpose(1, 0, 2))


@pytest.mark.parametrize("name", ["SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_ybr_files_become_the_rgb_image(name: str) -> None:
    rgb = pydicom.dcmread(_pydicom_file("SC_rgb.dcm")).pixel_array
    volume = only_series(scan_dicom([_source(_pydicom_file(name))])).load()
    ours = volume.array[::-1, ::-1, 0, :].transpose(1, 0, 2).astype(int)
    assert np.abs(ours - rgb).max() <= 6  # two colour conversions, each rounding to 8 bits


def test_synthetic_ybr_full_becomes_rgb() -> None:
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(1, 6, 8, 3)).astype(np.uint8)
    source = make_series(rgb, modality="OT")[0]
    ds = pydicom.dcmread(io.BytesIO(source.data))
    ds.PixelData = convert_color_space(rgb[0], "RGB", "YBR_FULL").tobytes()
    ds.PhotometricInterpretation = "YBR_FULL"
    volume = only_series(scan_dicom([Source("ybr.dcm", to_bytes(ds))])).load()
    ours = volume.array[::-1, ::-1, 0, :].transpose(1, 0, 2).astype(int)
    assert np.abs(ours - rgb[0]).max() <= 2


# --- 8. series oddities ------------------------------------------------------------------------------------------------


def test_all_images_at_one_position_are_frames_like_dcm2niix(tmp_path: Path) -> None:
    pixels = marker_phantom((5, 4, 6))
    sources = make_series(pixels, positions=[(1.0, 2.0, 3.0)] * 5, modality="MR", instance_numbers=[3, 1, 2, 5, 4])
    series = only_series(scan_dicom(sources))
    volume = series.load()
    assert volume.shape == (6, 4, 1, 5)
    assert any("one position" in w and "5 frames" in w and "instance number" in w for w in series.info.warnings)
    images = run_dcm2niix(write_sources(sources, tmp_path / "dicom"), tmp_path / "nifti")
    assert images[0].shape == (6, 4, 1, 5)
    assert_same_world(volume.shape, volume.affine, images[0].shape, images[0].affine)
    np.testing.assert_array_equal(volume.array, resample_like(volume, _dcm2niix_values(images[0]), images[0].affine))
    # frame t is the file with instance number t + 1 (files k = 0..4 carry 3, 1, 2, 5, 4)
    for t, k in enumerate([1, 2, 0, 4, 3]):
        check_synthetic(Volume(volume.array[..., t], volume.affine), pixels[k : k + 1], lps_affine(origin=(1, 2, 3)))


def test_copies_at_one_position_are_refused() -> None:
    pixels = marker_phantom((3, 4, 4))
    sources = make_series(pixels, positions=[(0.0, 0.0, 0.0)] * 3, instance_numbers=[1, 1, 1])
    result = scan_dicom(sources)
    assert not result.series and len(result.errors) == 3
    assert "copies of one image" in result.errors[0].message


@pytest.mark.parametrize(
    "orientation",
    [(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0), (0.0, -1.0, 0.0, 0.0, 0.0, 1.0), (0.0, 1.0, 0.0, -1.0, 0.0, 0.0),
     (1.0, 0.0, 0.0, 0.0, 0.0, 1.0)],
    ids=["axial-flipped", "sagittal-flipped", "axial-rotated", "coronal-flipped"],
)  # fmt: skip
@pytest.mark.parametrize("count", [1, 2, 5])
def test_flipped_orientations_and_short_series_match_dcm2niix(orientation, count: int, tmp_path: Path) -> None:
    affine = lps_affine(orientation, (0.9, 1.1), (-30.0, 40.0, 55.0), 2.5)
    pixels = marker_phantom((count, 6, 7))
    sources = make_series(pixels, affine=affine, modality="MR", shuffle_seed=1)
    volume = only_series(scan_dicom(sources)).load()
    check_synthetic(volume, pixels, affine)
    images = run_dcm2niix(write_sources(sources, tmp_path / "dicom"), tmp_path / "nifti")
    assert len(images) == 1
    assert_same_world(volume.shape, volume.affine, images[0].shape, images[0].affine)
    np.testing.assert_array_equal(volume.array, resample_like(volume, _dcm2niix_values(images[0]), images[0].affine))


# --- 9. nothing lost ------------------------------------------------------------------------------------------------


def _corpus_sources() -> list[Source]:
    sources: list[Source] = []
    if DATA.exists():
        for entry in sorted(p for p in DATA.iterdir() if p.is_dir()):
            sources += read_paths([entry])
    for folder, prefix in ((PYDICOM_FILES, "pydicom"), (PYDICOM_DATA_STORE, "pydicom-data")):
        if folder.exists():
            sources += [Source(f"{prefix}/{s.name}", s.data) for s in read_paths([folder])]
    if not sources:
        pytest.skip("neither the corpus nor pydicom's test files are available")
    return sources


def test_every_file_of_the_whole_corpus_is_accounted_for_exactly_once() -> None:
    sources = _corpus_sources()
    names = [s.name for s in sources]
    assert len(set(names)) == len(names)
    result = scan_dicom(sources)
    in_series = {name for s in result.series for name in s.info.sources}
    skipped = [s.source for s in result.skipped]
    errors = [p.source for p in result.errors]
    assert all(s.reason for s in result.skipped) and all(p.message for p in result.errors)
    assert len(set(skipped)) == len(skipped) and len(set(errors)) == len(errors)
    # each file in exactly one of: a series, skipped, errors
    assert not (in_series & set(skipped)) and not (in_series & set(errors)) and not (set(skipped) & set(errors))
    assert in_series | set(skipped) | set(errors) == set(names)
    for series in result.series:
        assert len(set(series.info.sources)) == len(series.info.sources)
    # a file may feed two volumes only when it holds several frames (e.g. two echoes of one enhanced file)
    counts: dict[str, int] = {}
    for series in result.series:
        for name in series.info.sources:
            counts[name] = counts.get(name, 0) + 1
    by_name = {s.name: s for s in sources}
    for name, count in counts.items():
        if count > 1:
            assert (
                int(pydicom.dcmread(io.BytesIO(by_name[name].data), stop_before_pixels=True).get("NumberOfFrames", 1))
                > 1
            )
    # the pooled upload still finds the corpus's volumes (the two CT copies, one without SOP Instance UIDs,
    # are refused together as duplicates at every position: the MANIFEST says never to pool them)
    if DATA.exists():
        assert any(s.info.shape == (64, 64, 9, 3) for s in result.series)  # Philips EPI 4D
        assert any(sorted(s.info.shape) == [8, 256, 256] for s in result.series)  # Philips enhanced


def test_enhanced_copies_that_nothing_orders_in_time_stay_separate_volumes() -> None:
    affine, volumes, positions = _enhanced_volumes(count=1, orientation=AXIAL, step=2.0)
    series = generate_uid()
    copies = [
        make_enhanced_file(
            volumes[0],
            positions,
            pixel_spacing=(0.8, 0.9),
            series_uid=series,
            acquisition_number=1,
            instance_number=n,
            name=f"copy{n}.dcm",
        )  # fmt: skip
        for n in (1, 2)
    ]
    result = scan_dicom(copies)
    assert not result.errors and len(result.series) == 2
    for series_ in result.series:
        assert any("do not join into one volume" in w for w in series_.info.warnings)
        check_synthetic(series_.load(), volumes[0], affine)
