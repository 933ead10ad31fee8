"""Property-based tests (hypothesis) of the readers and the DICOM series assembler.

Random headers and damaged bytes must only ever produce a clean answer (a refused
file with a message, a CoreError on load, or a valid volume); random but consistent
geometry must put every DICOM pixel where its header says it is. Example counts are
bounded so the suite stays fast in CI.
"""

from __future__ import annotations

import functools
import io
import math
import os

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from core.errors import CoreError
from core.io import scan
from core.series import ScanResult
from core.sources import Source
from core.volume import LPS_TO_RAS
from tests.dicom_factory import lps_affine, make_series, to_bytes

# CI runs the same 50 examples per property every time; TOMOFORGE_FUZZ_EXAMPLES=5000 explores new ones.
_EXAMPLES = int(os.environ.get("TOMOFORGE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_EXAMPLES or 50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=not _EXAMPLES,
    database=None,
)
# Pixel data of these transfer syntaxes goes to C codecs that may abort the process: never decoded here.
COMPRESSED_SYNTAXES = (b"1.2.840.10008.1.2.4", b"1.2.840.10008.1.2.5")


def assert_clean(result: ScanResult, sources: list[Source]) -> None:
    """Every file is accounted for, messages are plain, every series loads or says why."""
    texts = [p.message for p in result.errors] + [s.reason for s in result.skipped]
    for text in texts:
        assert text.strip() and "Traceback" not in text
    names = {p.source for p in result.errors} | {s.source for s in result.skipped}
    names |= {n for s in result.series for n in s.info.sources}
    for source in sources:
        assert any(n == source.name or n.startswith(source.basename + "/") for n in names), source.name
    if any(marker in s.data for s in sources for marker in COMPRESSED_SYNTAXES):
        return
    for series in result.series:
        try:
            volume = series.load()
        except CoreError as err:
            assert err.message.strip() and "Traceback" not in err.message
            continue
        assert volume.shape == series.info.shape
        assert np.all(np.isfinite(volume.affine))
        assert not volume.array.flags.writeable


# --------------------------------------------------------------------------- text headers

_NUMBER = st.one_of(
    st.integers(-3, 70_000).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.sampled_from(["", "x", "1e400", "-0", "nan", "0x10", "1,2"]),
)


def _numbers(count: int) -> st.SearchStrategy[str]:
    return st.lists(_NUMBER, min_size=0, max_size=count + 1).map(" ".join)


@st.composite
def nrrd_files(draw: st.DrawFn) -> list[Source]:
    dims = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(-2, 12), min_size=dims, max_size=dims))
    fields = {
        "type": draw(st.sampled_from(["short", "uchar", "float", "double", "int64", "complex", "ushort"])),
        "dimension": draw(st.sampled_from([str(dims), str(dims + 1), "x"])),
        "sizes": " ".join(map(str, sizes)),
        "endian": draw(st.sampled_from(["little", "big", ""])),
        "encoding": draw(st.sampled_from(["raw", "gzip", "bzip2", "ascii", "hex", "zip"])),
    }
    optional = {
        "space": st.sampled_from(["left-posterior-superior", "RAS", "3D-right-handed", "scanner-xyz", "lps-time"]),
        "space directions": st.lists(
            st.one_of(st.just("none"), st.tuples(_NUMBER, _NUMBER, _NUMBER).map(lambda t: "(" + ",".join(t) + ")")),
            min_size=dims - 1, max_size=dims + 1,
        ).map(" ".join),
        "space origin": st.tuples(_NUMBER, _NUMBER, _NUMBER).map(lambda t: "(" + ",".join(t) + ")"),
        "spacings": _numbers(dims),
        "kinds": st.lists(st.sampled_from(["domain", "space", "time", "RGB-color", "vector", "list"]),
                          min_size=dims, max_size=dims).map(" ".join),
        "byte skip": st.sampled_from(["0", "-1", "5", "x"]),
        "line skip": st.sampled_from(["0", "1", "3"]),
        "data file": st.sampled_from(["data.raw", "/etc/passwd", "../x.raw", "LIST", "img%03d.raw 1 3 1"]),
    }  # fmt: skip
    for key, strategy in optional.items():
        if draw(st.booleans()):
            fields[key] = draw(strategy)
    header = "NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in fields.items())
    payload = draw(st.binary(max_size=4096))
    files = [Source("fuzz.nrrd", header.encode() + b"\n" + payload)]
    if draw(st.booleans()):
        files.append(Source("data.raw", draw(st.binary(max_size=4096))))
    return files


@FUZZ
@given(nrrd_files())
def test_random_nrrd_headers_get_a_clean_answer(files: list[Source]) -> None:
    assert_clean(scan(files), files)


@st.composite
def metaimage_files(draw: st.DrawFn) -> list[Source]:
    ndims = draw(st.integers(1, 5))
    fields = {
        "ObjectType": draw(st.sampled_from(["Image", "Mesh"])),
        "NDims": draw(st.sampled_from([str(ndims), "x", "2.5"])),
        "DimSize": " ".join(str(draw(st.integers(-2, 12))) for _ in range(ndims)),
        "ElementType": draw(st.sampled_from(["MET_SHORT", "MET_UCHAR", "MET_FLOAT", "MET_DOUBLE_ARRAY", "MET_FOO"])),
    }
    optional = {
        "ElementSpacing": _numbers(ndims),
        "Offset": _numbers(ndims),
        "TransformMatrix": _numbers(ndims * ndims),
        "ElementNumberOfChannels": st.sampled_from(["1", "3", "4", "0", "-1"]),
        "BinaryDataByteOrderMSB": st.sampled_from(["True", "False"]),
        "CompressedData": st.sampled_from(["True", "False"]),
        "BinaryData": st.sampled_from(["True", "False"]),
        "HeaderSize": st.sampled_from(["0", "-1", "16", "99999"]),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            fields[key] = draw(strategy)
    fields["ElementDataFile"] = draw(st.sampled_from(["LOCAL", "data.raw", "/etc/passwd", "../x.raw", "LIST"]))
    header = "".join(f"{k} = {v}\n" for k, v in fields.items())
    files = [Source("fuzz.mha", header.encode() + draw(st.binary(max_size=4096)))]
    if draw(st.booleans()):
        files.append(Source("data.raw", draw(st.binary(max_size=4096))))
    return files


@FUZZ
@given(metaimage_files())
def test_random_metaimage_headers_get_a_clean_answer(files: list[Source]) -> None:
    assert_clean(scan(files), files)


@st.composite
def nifti_files(draw: st.DrawFn) -> list[Source]:
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=2, max_size=4)))
    dtype = draw(st.sampled_from(["uint8", "int16", "float32", "float64", "int64"]))
    image = nib.Nifti1Image(np.zeros(shape, dtype=dtype), np.eye(4), dtype=dtype)
    raw = bytearray(image.to_bytes())
    # Overwrite header fields with random values: dim, datatype, pixdim, vox_offset, slope, codes, forms.
    fields = {
        40: "<8h", 70: "<h", 76: "<8f", 108: "<f", 112: "<2f", 252: "<2h", 256: "<6f", 280: "<12f",
    }  # fmt: skip
    import struct

    for offset, fmt in fields.items():
        if draw(st.booleans()):
            count = struct.calcsize(fmt) // struct.calcsize(fmt[-1])
            if fmt[-1] == "h":
                values = draw(st.lists(st.integers(-40000, 40000).map(lambda v: max(-32768, min(32767, v))),
                                       min_size=count, max_size=count))  # fmt: skip
            else:
                values = draw(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True),
                                       min_size=count, max_size=count))  # fmt: skip
            struct.pack_into(fmt, raw, offset, *values)
    data = bytes(raw) + draw(st.binary(max_size=512))
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut]
    name = draw(st.sampled_from(["fuzz.nii", "fuzz.nii.gz"]))
    if name.endswith(".gz"):
        import gzip

        data = gzip.compress(data, compresslevel=1)
    return [Source(name, data)]


@FUZZ
@given(nifti_files())
def test_random_nifti_headers_get_a_clean_answer(files: list[Source]) -> None:
    assert_clean(scan(files), files)


# --------------------------------------------------------------------------- DICOM


@st.composite
def dicom_files(draw: st.DrawFn) -> list[Source]:
    """One slice whose group 0028 and geometry attributes are random (pixel data of any length)."""
    import pydicom

    base = make_series(np.zeros((1, 4, 4), dtype=np.uint16))[0]
    ds = pydicom.dcmread(io.BytesIO(base.data))
    ds.Rows = draw(st.integers(0, 64))
    ds.Columns = draw(st.integers(0, 64))
    ds.BitsAllocated = draw(st.sampled_from([1, 8, 12, 16, 32, 64]))
    ds.BitsStored = draw(st.integers(0, 40))
    ds.HighBit = draw(st.integers(0, 40))
    ds.PixelRepresentation = draw(st.integers(0, 2))
    ds.SamplesPerPixel = draw(st.sampled_from([1, 2, 3, 4]))
    ds.PhotometricInterpretation = draw(
        st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR", "XYZ"])
    )
    if draw(st.booleans()):
        ds.NumberOfFrames = draw(st.integers(0, 5))
    if draw(st.booleans()):
        ds.PlanarConfiguration = draw(st.integers(0, 2))
    for keyword, count in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3), ("PixelSpacing", 2)):
        if draw(st.booleans()):
            values = draw(
                st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=count - 1, max_size=count + 1)
            )
            setattr(ds, keyword, [f"{v:.6g}" for v in values])
    if draw(st.booleans()):
        ds.RescaleSlope = f"{draw(st.floats(-1e6, 1e6, allow_nan=False, width=32)):.6g}"
    ds.PixelData = draw(st.binary(max_size=4096).map(lambda b: b + b"\x00" * (len(b) % 2)))
    ds["PixelData"].VR = "OB" if ds.BitsAllocated <= 8 else "OW"
    return [Source("fuzz.dcm", to_bytes(ds))]


@FUZZ
@given(dicom_files())
def test_random_dicom_pixel_headers_get_a_clean_answer(files: list[Source]) -> None:
    assert_clean(scan(files), files)


@functools.cache
def _valid_file(kind: str) -> bytes:
    """A small valid file of each format, made once (random UIDs would make the examples irreproducible)."""
    values = np.arange(48, dtype=np.int16).reshape(4, 4, 3)
    if kind == "dicom":
        return make_series(values.transpose(2, 1, 0).astype(np.int16))[0].data
    if kind == "nifti":
        return nib.Nifti1Image(values, np.eye(4)).to_bytes()
    if kind == "nrrd":
        return b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 3\nendian: little\nencoding: raw\n\n" + values.tobytes(
            "F"
        )
    if kind == "mha":
        return b"NDims = 3\nDimSize = 4 4 3\nElementType = MET_SHORT\nElementDataFile = LOCAL\n" + values.tobytes("F")
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(values[..., 0].astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


_SUFFIX = {"dicom": "dcm", "mha": "mha", "nrrd": "nrrd", "nifti": "nii", "png": "png"}


@st.composite
def damaged_files(draw: st.DrawFn) -> list[Source]:
    """A valid small file of some format with random bytes overwritten or cut."""
    kind = draw(st.sampled_from(sorted(_SUFFIX)))
    damaged = bytearray(_valid_file(kind))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(damaged) - 1))
        damaged[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        damaged = damaged[: draw(st.integers(0, len(damaged)))]
    return [Source(f"damaged.{_SUFFIX[kind]}", bytes(damaged))]


@FUZZ
@given(damaged_files())
def test_damaged_files_get_a_clean_answer(files: list[Source]) -> None:
    assert_clean(scan(files), files)


# --------------------------------------------------------------------------- DICOM geometry


@st.composite
def regular_stacks(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """A regular stack with random orientation, pixel size, slice step, origin and file order."""
    angles = draw(st.tuples(*[st.floats(-math.pi, math.pi, allow_nan=False)] * 3))
    rotation = Rotation.from_euler("xyz", angles).as_matrix()
    spacing = draw(st.tuples(st.floats(0.2, 3.0), st.floats(0.2, 3.0)))
    step = draw(st.floats(0.3, 6.0)) * draw(st.sampled_from([1.0, -1.0]))
    origin = draw(st.tuples(*[st.floats(-500, 500, allow_nan=False)] * 3))
    orientation = [*rotation[:, 0], *rotation[:, 1]]
    affine = lps_affine(orientation, spacing, origin, step)
    slices = draw(st.integers(1, 6))
    rows, columns = draw(st.integers(2, 7)), draw(st.integers(2, 7))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 4000, size=(slices, rows, columns)).astype(np.uint16)
    return pixels, affine, seed


@FUZZ
@given(regular_stacks())
def test_every_dicom_pixel_lands_where_its_header_puts_it(stack: tuple[np.ndarray, np.ndarray, int]) -> None:
    pixels, affine, seed = stack
    files = make_series(pixels, affine=affine, rescale=(1.0, -1024.0), shuffle_seed=seed)
    result = scan(files)
    assert [p.message for p in result.errors] == [] and len(result.series) == 1
    volume = result.series[0].load()
    assert volume.array.size == pixels.size
    inverse = np.linalg.inv(volume.affine)
    slices, rows, columns = pixels.shape
    for k in range(slices):
        for r, c in ((0, 0), (rows - 1, 0), (0, columns - 1), (rows - 1, columns - 1), (rows // 2, columns // 2)):
            world_ras = LPS_TO_RAS @ affine @ np.array([c, r, k, 1.0])
            i, j, kk = (inverse @ world_ras)[:3]
            index = np.round([i, j, kk]).astype(int)
            np.testing.assert_allclose([i, j, kk], index, atol=1e-3)  # on a voxel centre
            assert volume.array[tuple(index)] == int(pixels[k, r, c]) - 1024


@st.composite
def irregular_stacks(draw: st.DrawFn) -> list[Source]:
    """Stacks broken like real uploads: missing, repeated or shifted slices, mixed orientations."""
    slices = draw(st.integers(2, 7))
    pixels = np.ones((slices, 4, 5), dtype=np.int16)
    positions = [
        [0.0, 0.0, float(z)]
        for z in draw(st.lists(st.floats(-20, 20, allow_nan=False), min_size=slices, max_size=slices))
    ]
    overrides = {}
    if draw(st.booleans()):
        overrides[draw(st.integers(0, slices - 1))] = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    if draw(st.booleans()):
        positions[draw(st.integers(0, slices - 1))][0] += draw(st.floats(-50, 50, allow_nan=False))
    files = make_series(
        pixels, positions=positions, orientation_overrides=overrides or None,
        drop=draw(st.sets(st.integers(0, slices - 1), max_size=slices - 1)),
        shuffle_seed=draw(st.integers(0, 100)),
    )  # fmt: skip
    if draw(st.booleans()) and files:
        files.append(Source("copy_" + files[0].name, files[0].data))
    return files


@FUZZ
@given(irregular_stacks())
def test_broken_stacks_are_loaded_with_warnings_or_refused_clearly(files: list[Source]) -> None:
    assume(files)
    assert_clean(scan(files), files)
