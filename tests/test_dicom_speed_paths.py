"""The fast paths of the DICOM reader give exactly what the careful pydicom path gives.

Three shortcuts make a series load fast (issue 8): plain image headers are read
without pydicom (:mod:`core.dicom_fastread`), uncompressed frames are copied from
the file bytes with their unused high bits cleared while they are stored
(:func:`core.dicom_pixels.store_native_frame`, in threads for large series), and
``read_paths`` reads files in threads. Each is checked against the path it
replaces, on the real corpus, on pydicom's own test files (every odd layout it
ships) and on synthetic series with unusual but valid values: the same files
skipped and refused with the same words, the same series, the same arrays and the
same header datasets.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from core.dicom_fastread import quick_image
from core.dicom_headers import (
    classic_frames,
    is_enhanced,
    is_segmentation,
    number_of_frames,
    read_header,
    skip_reason,
    transfer_syntax,
)
from core.dicom_mosaic import is_mosaic
from core.dicom_pixels import pixel_format
from core.dicom_series import _instance_key, _series_key, scan_dicom
from core.errors import CoreError, UnsupportedFileError
from core.series import ScanResult, Series
from core.sources import Source, read_paths
from tests.conftest import DATA, data_path
from tests.dicom_factory import lps_affine, make_series, part10_big_endian, to_bytes

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_DATA_STORE = Path(pydicom.__file__).parents[1] / "data_store" / "data"
CORPUS_DICOM = [
    "ct_siemens_20sl_uncompressed_derived",
    "ct_siemens_j2k_20sl",
    "mr_siemens_gre_fieldmap_5sl",
    "mr_philips_epi_4d",
    "mr_philips_enhanced_multiframe",
    "transfer_syntaxes_siemens_mosaic",
    "single_files_pydicom",
]
# Series larger than this are compared by their info and headers only (their pixels by smaller cases).
LOAD_COMPARE_BYTES = 24 * 1024**2


# --- helpers -------------------------------------------------------------------------


def _dicom_sources(folder: Path) -> list[Source]:
    """Every file of a folder that is not a reference NIfTI/JSON, named relative to it."""
    skip = {".nii", ".json", ".gz", ".md", ".txt"}
    return [
        Source(name=path.relative_to(folder).as_posix(), data=path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.suffix.lower() not in skip and not path.name.startswith(("LICENSE", "COPYING"))
    ]


def _pydicom_sources() -> list[Source]:
    sources = []
    for folder in (PYDICOM_FILES, PYDICOM_DATA_STORE):
        if folder.is_dir():
            sources.extend(
                Source(name=f"{folder.name}/{path.name}", data=path.read_bytes())
                for path in sorted(folder.glob("*.dcm"))
            )
    if not sources:
        pytest.skip("pydicom's test files are not installed")
    return sources


def _assert_same_frame(fast, careful) -> None:
    for name in (
        "file",
        "index",
        "pixel_spacing",
        "thickness",
        "slope",
        "intercept",
        "temporal",
        "split",
        "instance_number",
        "sop_uid",
        "slice_spacing",
        "segment",
        "value_per_display",
    ):
        a, b = getattr(fast, name), getattr(careful, name)
        assert a == b and type(a) is type(b), (name, a, b)
    for name in ("position", "orientation"):
        a, b = getattr(fast, name), getattr(careful, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and np.array_equal(a, b), (name, a, b)


def _compare_quick_with_pydicom(source: Source) -> bool:
    """Check the fast reading of one file against pydicom's; returns whether the fast path took the file."""
    quick = quick_image(source.data, 7, 10**9)
    if quick is None:
        return False
    ds = read_header(source)
    assert skip_reason(ds, source.data) == "", source.name
    assert not (is_enhanced(ds) or is_segmentation(ds) or is_mosaic(ds)) and number_of_frames(ds) == 1
    assert quick.transfer_syntax == transfer_syntax(ds)
    assert quick.fmt == pixel_format(ds)
    assert (quick.rows, quick.columns) == (int(ds.Rows), int(ds.Columns))
    frames = classic_frames(ds, 7)
    assert len(frames) == 1
    _assert_same_frame(quick.frame, frames[0])
    assert quick.instance_key == _instance_key(ds)
    assert quick.series_key == _series_key(ds)
    return True


def _load(series: Series) -> tuple[str, object]:
    try:
        volume = series.load()
    except CoreError as err:
        return "error", (type(err).__name__, err.message)
    return "volume", volume


def _assert_same_scans(fast: ScanResult, careful: ScanResult, *, load: bool = True) -> None:
    """The two scans list the same series, problems and skipped files, load the same arrays, keep the same headers."""
    assert [(p.source, p.message) for p in fast.errors] == [(p.source, p.message) for p in careful.errors]
    assert [(s.source, s.reason) for s in fast.skipped] == [(s.source, s.reason) for s in careful.skipped]
    assert len(fast.series) == len(careful.series)
    for a, b in zip(fast.series, careful.series, strict=True):
        for name in ("id", "kind", "description", "modality", "shape", "dtype", "warnings", "sources", "windows"):
            assert getattr(a.info, name) == getattr(b.info, name), (a.info.id, name)
        assert a.info.is_rgb == b.info.is_rgb
        assert np.array_equal(a.info.affine, b.info.affine)
        assert [s.name for s in a.files] == [s.name for s in b.files]
        assert len(a.headers) == len(b.headers)
        for x, y in zip(a.headers, b.headers, strict=True):
            assert isinstance(x, Dataset) and x == y and x.file_meta == y.file_meta
        if not load or a.info.nbytes > LOAD_COMPARE_BYTES:
            continue
        kind_a, loaded_a = _load(a)
        kind_b, loaded_b = _load(b)
        assert kind_a == kind_b, (a.info.id, loaded_a, loaded_b)
        if kind_a == "error":
            assert loaded_a == loaded_b
            continue
        assert loaded_a.array.dtype == loaded_b.array.dtype  # type: ignore[attr-defined]
        assert np.array_equal(loaded_a.array, loaded_b.array)  # type: ignore[attr-defined]
        assert np.array_equal(loaded_a.affine, loaded_b.affine)  # type: ignore[attr-defined]


def _scan_both(sources: list[Source]) -> tuple[ScanResult, ScanResult]:
    return scan_dicom(sources), scan_dicom(sources, fast_path=False)


# --- header reading -------------------------------------------------------------------


def test_every_file_the_fast_path_takes_reads_as_pydicom_reads_it() -> None:
    sources = _pydicom_sources()
    for folder in CORPUS_DICOM:
        if (DATA / folder).is_dir():
            sources.extend(_dicom_sources(DATA / folder))
    taken = [source.name for source in sources if _compare_quick_with_pydicom(source)]
    # Plain files of many kinds go the fast way: implicit and explicit VR, JPEG, JPEG-LS, RLE, J2K.
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG-LL.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        assert any(taken_name.endswith(f"/{name}") for taken_name in taken), name
    assert len(taken) >= 40


@pytest.mark.parametrize(
    "folder", ["ct_siemens_20sl_uncompressed_derived", "ct_siemens_j2k_20sl", "mr_siemens_gre_fieldmap_5sl"]
)
def test_real_plain_series_take_the_fast_path(folder: str) -> None:
    sources = _dicom_sources(data_path(folder, "dicom"))
    assert all(quick_image(source.data, 0, 10**9) is not None for source in sources)


def test_files_that_need_pydicom_are_left_to_it() -> None:
    """Philips private scaling, enhanced files, big endian, deflated and bare datasets are never read the fast way."""
    for folder, pattern in (("mr_philips_epi_4d", "*.dcm"), ("mr_philips_enhanced_multiframe", "*")):
        for path in sorted(data_path(folder).rglob(pattern)):
            if path.is_file() and path.suffix.lower() in ("", ".dcm"):
                assert quick_image(path.read_bytes(), 0, 10**9) is None, path.name
    for name in ("MR_small_bigendian.dcm", "image_dfl.dcm", "no_meta.dcm"):
        path = PYDICOM_FILES / name
        if path.exists():
            assert quick_image(path.read_bytes(), 0, 10**9) is None, name


# --- whole scans ----------------------------------------------------------------------


@pytest.mark.parametrize("folder", CORPUS_DICOM)
def test_corpus_scans_load_and_headers_are_the_same_with_and_without_the_fast_path(folder: str) -> None:
    sources = _dicom_sources(data_path(folder))
    fast, careful = _scan_both(sources)
    assert fast.series or fast.errors  # the mosaic folder holds one acquisition in 9 encodings: refused together
    _assert_same_scans(fast, careful)


@pytest.mark.parametrize("folder", ["transfer_syntaxes_siemens_mosaic", "single_files_pydicom"])
def test_corpus_files_alone_scan_the_same_with_and_without_the_fast_path(folder: str) -> None:
    for source in _dicom_sources(data_path(folder)):
        fast, careful = _scan_both([source])
        assert fast.series or fast.errors or fast.skipped
        _assert_same_scans(fast, careful)


def test_pydicom_test_files_as_one_upload_scan_the_same_with_and_without_the_fast_path() -> None:
    """About 150 odd files together: repeated SOP Instance UIDs across files, every encoding, broken files."""
    sources = _pydicom_sources()
    fast, careful = _scan_both(sources)
    assert fast.series and fast.errors and fast.skipped
    _assert_same_scans(fast, careful)


def _unusual_values_series() -> list[Source]:
    """Valid values written the way some scanners write them, in one series of five slices."""
    pixels = np.arange(5 * 6 * 4, dtype=np.uint16).reshape(5, 6, 4) * 7
    sources = make_series(
        pixels,
        affine=lps_affine(pixel_spacing=(0.75, 0.5), origin=(-10.0, 4.0, 2.5), slice_step=1.25),
        rescale=(1.0, -1024.0),
        image_type=("ORIGINAL", " PRIMARY", "axial "),
        extra={"TriggerTime": "", "AcquisitionTime": "101010.5 ", "ContentTime": "1010", "SeriesNumber": None},
        per_slice={
            # leading spaces and signs, a blank value, integers written as " 7"
            "SliceThickness": ["+1.25", " 1.25", "1.250", "", "125E-2"],
            "EchoNumbers": [" 1", "+1", "1", "01", "1 "],
            "TemporalPositionIdentifier": ["", " ", "1", "1", "1"],
        },
    )
    out = []
    for n, source in enumerate(sources):
        ds = pydicom.dcmread(io.BytesIO(source.data))
        # A sequence of undefined length with an item of undefined length, before the attributes read.
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = generate_uid()
        ds.ReferencedImageSequence = DicomSequence([item])
        ds["ReferencedImageSequence"].is_undefined_length = True
        item.is_undefined_length_sequence_item = True
        # No Series Instance UID (stripped exports): grouped by study, series number and description.
        del ds.SeriesInstanceUID
        if n % 2:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        out.append(Source(source.name, to_bytes(ds)))
    return out


def test_unusual_but_valid_values_read_the_same_both_ways() -> None:
    sources = _unusual_values_series()
    assert sum(_compare_quick_with_pydicom(source) for source in sources) == len(sources)
    fast, careful = _scan_both(sources)
    assert len(fast.series) == 1
    _assert_same_scans(fast, careful)


def test_a_series_mixing_both_paths_with_repeated_files_scans_the_same() -> None:
    """Repeated copies are recognised across the two paths (the same identity key from both)."""
    pixels = np.arange(6 * 8 * 8, dtype=np.int16).reshape(6, 8, 8)
    sources = make_series(pixels, rescale=(1.0, 0.0), shuffle_seed=3)
    pydicom_only = []
    for source in sources[:3]:
        ds = pydicom.dcmread(io.BytesIO(source.data))
        ds.ProtocolName = "Thorax \u00e9t\u00e9"  # not ASCII: the fast path leaves the file to pydicom
        pydicom_only.append(Source(f"copy_of_{source.name}", to_bytes(ds)))
    upload = [*sources, *pydicom_only, Source(f"again_{sources[4].name}", sources[4].data)]
    assert [quick_image(s.data, 0, 10**9) is None for s in pydicom_only] == [True] * 3
    fast, careful = _scan_both(upload)
    assert len(fast.series) == 1 and len(fast.skipped) == 4
    _assert_same_scans(fast, careful)


def test_headers_of_a_fast_scan_are_the_datasets_pydicom_reads_and_recover_the_files() -> None:
    sources = make_series(np.zeros((4, 6, 6), dtype=np.uint16), shuffle_seed=1)
    series = scan_dicom(sources).series[0]
    by_name = {source.name: source for source in sources}
    assert len(series.headers) == 4
    for name, ds in zip(series.info.sources, series.headers, strict=True):
        assert ds == read_header(by_name[name])
    assert series.headers[1:3] == [series.headers[1], series.headers[2]]
    recovered = list(series.files)
    assert [s.data for s in recovered] == [by_name[name].data for name in series.info.sources]


# --- pixels ---------------------------------------------------------------------------


def _noisy_high_bits(shape: tuple[int, ...], bits_stored: int, signed: bool, seed: int) -> np.ndarray:
    """Stored values with random junk above BitsStored (allowed by the standard, ignored by readers)."""
    rng = np.random.default_rng(seed)
    dtype = np.int16 if signed else np.uint16
    low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1)) if signed else (0, 2**bits_stored)
    values = rng.integers(low, high, size=shape).astype(np.int32)
    junk = rng.integers(0, 2 ** (16 - bits_stored), size=shape).astype(np.int32) << bits_stored
    return ((values & ((1 << bits_stored) - 1)) | junk).astype(np.uint16).view(dtype)


@pytest.mark.parametrize(
    ("signed", "rescale", "dtype"),
    [
        (False, (1.0, -1024.0), "int16"),  # CT: 12 bits stored, intercept
        (True, (1.0, 0.0), "int16"),  # sign extension of 12 bits
        (True, (1.0, 100.0), "int16"),
        (False, (2.0, -5.0), "float32"),  # float output keeps the masked values too
    ],
)
def test_uncompressed_frames_are_masked_as_pydicom_decodes_them(signed: bool, rescale, dtype: str) -> None:
    """The one-pass store equals pydicom's decoding (big endian files are decoded by pydicom)."""
    stored = _noisy_high_bits((6, 16, 12), 12, signed, seed=4)
    sources = make_series(stored, rescale=rescale, bits_stored=12)
    native = scan_dicom(sources).series[0].load()
    decoded = scan_dicom([part10_big_endian(s) for s in sources]).series[0].load()
    assert str(native.array.dtype) == dtype
    assert np.array_equal(native.array, decoded.array)
    significant = (stored.astype(np.int32) << 20 >> 20) if signed else (stored.astype(np.int32) & 0xFFF)
    assert native.array.min() == significant.min() * rescale[0] + rescale[1]


def test_large_series_loads_in_threads_like_pydicom_decodes_it() -> None:
    """24 MB of pixels: stored by several threads, each filling a run of slices."""
    stored = _noisy_high_bits((48, 512, 512), 12, False, seed=5)
    sources = make_series(stored, rescale=(1.0, -1024.0), bits_stored=12, shuffle_seed=2)
    native = scan_dicom(sources).series[0].load()
    decoded = scan_dicom([part10_big_endian(s) for s in sources]).series[0].load()
    assert native.nbytes > 16 * 1024**2
    assert np.array_equal(native.array, decoded.array)


def test_threaded_load_reports_the_first_failing_slice() -> None:
    """Two slices overflow the checked int16 output: the error names the first one in slice order."""
    stored = np.zeros((48, 512, 512), dtype=np.uint16)
    stored[5, 3, 3] = stored[40, 1, 1] = 60000  # 60000 - 1024 does not fit int16
    sources = make_series(stored, rescale=(1.0, -1024.0), bits_stored=16, shuffle_seed=7)
    series = scan_dicom(sources).series[0]
    assert series.info.dtype == "int16"
    with pytest.raises(UnsupportedFileError, match=r"IM0005\.dcm: rescaled values -1024\.\.58976 do not fit int16"):
        series.load()


# --- reading files ----------------------------------------------------------------------


def test_read_paths_keeps_the_order_and_reports_a_missing_path_after_the_files_before_it(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    (folder / "b").mkdir(parents=True)
    contents = {f"{folder.name}/a{n:02d}": bytes([n]) * (n + 1) for n in range(30)}
    contents[f"{folder.name}/b/z"] = b"last"
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    single = tmp_path / "single.bin"
    single.write_bytes(b"single")
    read = read_paths([folder, single])
    assert [(s.name, s.data) for s in read] == [*sorted(contents.items()), ("single.bin", b"single")]
    with pytest.raises(UnsupportedFileError, match="missing: no such file or folder"):
        read_paths([folder, tmp_path / "missing", single])
