"""Decoding DICOM pixel data and applying the Modality LUT, one frame at a time.

Decoding goes through pydicom's pixel API (``pydicom.pixels``), so every
installed back end (pylibjpeg, pillow, gdcm, pyjpegls) is used; YBR colour is
converted to RGB there. Values are written straight into a preallocated output
array: no float64 temporaries, no list of frames to stack.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom.pixels as dicom_pixels
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from core.dicom_headers import READ_ERRORS, read_dataset_bytes, transfer_syntax
from core.errors import MissingCodecError, UnsupportedFileError
from core.sources import SourceData


def _without_gdcm() -> None:
    """Decode with pylibjpeg/pillow only, never GDCM.

    GDCM is not in requirements.txt but arrives with other tools (dicom2nifti);
    pydicom tries it first when present, and it aborts the whole process on a
    scrambled JPEG 2000 frame instead of raising. Dropping it keeps decoding the
    same in every installation and a corrupt upload from killing the server.
    """
    from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS, get_decoder

    for uid in list(_PIXEL_DATA_DECODERS):
        decoder = get_decoder(uid)
        if "gdcm" in decoder.available_plugins:
            decoder.remove_plugin("gdcm")


_without_gdcm()

# Which pip package decodes which transfer syntax (pydicom's "pixel data handlers" table).
_LIBJPEG = "pylibjpeg and pylibjpeg-libjpeg (pip install pylibjpeg pylibjpeg-libjpeg)"
_OPENJPEG = "pylibjpeg and pylibjpeg-openjpeg (pip install pylibjpeg pylibjpeg-openjpeg)"
CODEC_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pillow or " + _LIBJPEG,
    "1.2.840.10008.1.2.4.51": _LIBJPEG,
    "1.2.840.10008.1.2.4.57": _LIBJPEG,
    "1.2.840.10008.1.2.4.70": _LIBJPEG,
    "1.2.840.10008.1.2.4.80": _LIBJPEG + " or pyjpegls",
    "1.2.840.10008.1.2.4.81": _LIBJPEG + " or pyjpegls",
    "1.2.840.10008.1.2.4.90": _OPENJPEG,
    "1.2.840.10008.1.2.4.91": _OPENJPEG,
    "1.2.840.10008.1.2.4.201": _OPENJPEG,
    "1.2.840.10008.1.2.4.202": _OPENJPEG,
    "1.2.840.10008.1.2.4.203": _OPENJPEG,
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (pip install pylibjpeg pylibjpeg-rle)",
}
_NO_PYTHON_DECODER = (
    "python-gdcm (pip install python-gdcm) may decode it; otherwise convert the files to an "
    "uncompressed transfer syntax first (gdcmconv --raw, or dcmdjpeg/dcmdjpls/dcmdrle from DCMTK)"
)


def codec_problem(uid: UID) -> str:
    """Why pixels in this transfer syntax cannot be decoded here ("" when they can)."""
    if not uid.is_transfer_syntax:
        return f"unknown transfer syntax {uid}: no decoder is known. {_NO_PYTHON_DECODER}."
    if not uid.is_compressed:
        return ""
    try:
        decoder = dicom_pixels.get_decoder(uid)
    except NotImplementedError:
        return f"no pixel decoder exists for transfer syntax '{uid.name}' ({uid}). {_NO_PYTHON_DECODER}."
    if decoder.is_available:
        return ""
    package = CODEC_PACKAGES.get(str(uid), _NO_PYTHON_DECODER)
    return f"no installed decoder for transfer syntax '{uid.name}' ({uid}); install {package}."


def ensure_decoder(uid: UID, label: str) -> None:
    """Raise :class:`MissingCodecError` when no installed plug-in decodes ``uid``."""
    problem = codec_problem(uid)
    if problem:
        raise MissingCodecError(f"{label}: {problem}", source=label)


@dataclass(frozen=True)
class PixelFormat:
    """How a file stores its pixels (group 0028), enough to choose the output dtype."""

    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    float_data: bool = False

    @property
    def is_rgb(self) -> bool:
        return self.samples == 3 or self.photometric == "PALETTE COLOR"

    @property
    def stored_range(self) -> tuple[int, int]:
        """Smallest and largest stored value that ``bits_stored`` allows."""
        bits = max(1, min(self.bits_stored or self.bits_allocated, self.bits_allocated or 64))
        if self.signed:
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return 0, 2**bits - 1

    @property
    def stored_dtype(self) -> np.dtype:
        """The integer dtype pydicom returns for these pixels."""
        if self.float_data:
            return np.dtype(np.float32)
        size = {1: 1, 8: 1, 16: 2, 32: 4}.get(self.bits_allocated, 8)
        return np.dtype(f"{'i' if self.signed else 'u'}{size}")


def pixel_format(ds: Dataset) -> PixelFormat:
    """Read group 0028 of a header."""
    return PixelFormat(
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        bits_allocated=int(ds.get("BitsAllocated", 16) or 16),
        bits_stored=int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 16) or 16),
        signed=int(ds.get("PixelRepresentation", 0) or 0) == 1,
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper(),
        float_data="FloatPixelData" in ds or "DoubleFloatPixelData" in ds,
    )


@dataclass(frozen=True)
class OutputType:
    """The dtype of a loaded volume and whether values must be range-checked while loading.

    ``checked`` is set when the rescaled range that BitsStored allows does not fit
    ``dtype`` but real images do (e.g. signed 16-bit CT with intercept -1024:
    -33792..31743 in theory, -3024..3071 in practice). Keeping int16 halves the
    memory of int32; every frame is checked and an overflow raises instead of wrapping.
    """

    dtype: np.dtype
    checked: bool = False


def output_type(
    formats: Sequence[PixelFormat], rescales: Sequence[tuple[float, float]], *, has_lut: bool = False
) -> OutputType:
    """The dtype of the loaded volume, known from the headers alone.

    Integers stay integers when every slope is 1 and every intercept an integer
    and the rescaled range fits (CT: uint16 stored 0..4095 with intercept -1024
    gives int16); otherwise float32. RGB is uint8.

    Parameters
    ----------
    formats : sequence of PixelFormat
        One per file of the series.
    rescales : sequence of (slope, intercept)
        One per frame.
    has_lut : bool
        A (0028,3000) Modality LUT replaces the rescale: float32.
    """
    if any(f.is_rgb for f in formats):
        return OutputType(np.dtype(np.uint8))
    if has_lut or any(f.float_data for f in formats):
        return OutputType(np.dtype(np.float32))
    if not all(slope == 1.0 and float(intercept).is_integer() for slope, intercept in rescales):
        return OutputType(np.dtype(np.float32))
    low = min(f.stored_range[0] for f in formats)
    high = max(f.stored_range[1] for f in formats)
    intercepts = [int(intercept) for _, intercept in rescales] or [0]
    if min(intercepts) == 0 and max(intercepts) == 0:
        dtypes = {f.stored_dtype for f in formats}
        if len(dtypes) == 1:
            return OutputType(dtypes.pop())
    low += min(intercepts)
    high += max(intercepts)
    for candidate in (np.dtype(np.int16), np.dtype(np.uint16)):
        info = np.iinfo(candidate)
        if info.min <= low and high <= info.max:
            return OutputType(candidate)
    if all(f.bits_allocated <= 16 for f in formats):
        return OutputType(np.dtype(np.int16) if low < 0 else np.dtype(np.uint16), checked=True)
    info32 = np.iinfo(np.int32)
    if info32.min <= low and high <= info32.max:
        return OutputType(np.dtype(np.int32))
    return OutputType(np.dtype(np.float32))


def output_dtype(
    formats: Sequence[PixelFormat], rescales: Sequence[tuple[float, float]], *, has_lut: bool = False
) -> np.dtype:
    """Shortcut for ``output_type(...).dtype``."""
    return output_type(formats, rescales, has_lut=has_lut).dtype


def _full_dataset(data: SourceData, name: str) -> Dataset:
    try:
        ds = read_dataset_bytes(data, stop_before_pixels=False)
    except READ_ERRORS as err:
        raise UnsupportedFileError(f"{name}: cannot read the file again to decode it ({err}).", source=name) from err
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # Files without a meta header: pydicom needs the transfer syntax to decode.
        uid = transfer_syntax(ds)
        if not hasattr(ds, "file_meta") or ds.file_meta is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = uid
    return ds


_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def native_frame(data: SourceData, uid: UID, rows: int, columns: int, fmt: PixelFormat) -> np.ndarray | None:
    """A single grey frame read straight from the end of an uncompressed little-endian file.

    Parsing the whole dataset again to reach pixels costs more than copying them
    (REFERENCE.md section 7: 440 ms naive vs 170 ms for 300 CT slices). The pixel
    data element is almost always the last one; its header is checked (tag, VR,
    length) before the bytes are trusted. Returns None whenever the layout is not
    exactly that, and the caller decodes with pydicom instead.

    Returns
    -------
    (rows, columns) ndarray or None
        Stored values with unused high bits masked (unsigned) or sign-extended
        (signed), as pydicom does.
    """
    pixels = native_stored(data, uid, rows, columns, fmt)
    return None if pixels is None else significant_bits(pixels, fmt)


def native_stored(data: SourceData, uid: UID, rows: int, columns: int, fmt: PixelFormat) -> np.ndarray | None:
    """The bytes of :func:`native_frame` as stored, unused high bits untouched (a read-only view of ``data``).

    :func:`store_native_frame` clears or sign-extends those bits while it writes
    the frame into the volume, in one pass instead of through a temporary.
    """
    if str(uid) not in _NATIVE_LITTLE_ENDIAN or fmt.samples != 1 or fmt.float_data:
        return None
    if fmt.bits_allocated not in (8, 16, 32) or fmt.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    length = rows * columns * fmt.bits_allocated // 8
    padded = length + (length % 2)
    if padded + 12 > len(data):
        return None
    start = len(data) - padded
    explicit = data[start - 12 : start]
    implicit = data[start - 8 : start]
    size = padded.to_bytes(4, "little")
    if not (
        (explicit[:4] == b"\xe0\x7f\x10\x00" and explicit[4:6] in (b"OW", b"OB") and explicit[8:12] == size)
        or (implicit[:4] == b"\xe0\x7f\x10\x00" and implicit[4:8] == size)
    ):
        return None
    dtype = fmt.stored_dtype.newbyteorder("<")
    return np.frombuffer(data, dtype=dtype, count=rows * columns, offset=start).reshape(rows, columns)


def _unused_bits(fmt: PixelFormat) -> int:
    return max(0, fmt.bits_allocated - fmt.bits_stored) if fmt.bits_stored else 0


def significant_bits(pixels: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """Stored values with the bits above BitsStored cleared (unsigned) or sign-extended (signed), as pydicom does."""
    unused = _unused_bits(fmt)
    if unused <= 0:
        return pixels
    if fmt.signed:
        return (pixels << unused) >> unused
    return pixels & np.asarray((1 << fmt.bits_stored) - 1, dtype=pixels.dtype)


def store_native_frame(
    dst: np.ndarray,
    stored: np.ndarray,
    fmt: PixelFormat,
    slope: float,
    intercept: float,
    name: str,
    *,
    checked: bool = False,
) -> None:
    """``store_frame(dst, native_frame(...), ...)`` without the temporary frame in between.

    The high bits are cleared (or sign-extended) while the stored values are
    written into ``dst``, then the intercept is added in place, while the frame
    is still in the cache. Integer arithmetic in ``dst``'s type is modular, so the
    result is bit for bit that of :func:`store_frame` on the masked frame whenever
    the true value fits, which :func:`output_type` checked from the headers.
    Other cases (float output, checked ranges, a mismatched shape) take that path.

    Parameters
    ----------
    dst : (rows, columns) ndarray
        A view into the preallocated output.
    stored : (rows, columns) ndarray
        From :func:`native_stored`.
    fmt : PixelFormat
        The file's pixel format (BitsStored, signedness).
    slope, intercept : float
        Modality rescale.
    name : str
        For messages.
    checked : bool
        See :func:`store_frame`.
    """
    unused = _unused_bits(fmt)
    integer_out = dst.dtype.kind in "iu" and slope == 1.0 and float(intercept).is_integer()
    if unused <= 0 or checked or not integer_out or stored.shape != dst.shape:
        store_frame(dst, significant_bits(stored, fmt), slope, intercept, name, checked=checked)
        return
    if fmt.signed:
        if dst.dtype != stored.dtype:
            store_frame(dst, significant_bits(stored, fmt), slope, intercept, name, checked=checked)
            return
        np.left_shift(stored, unused, out=dst)
        np.right_shift(dst, unused, out=dst)
    else:
        mask = np.asarray((1 << fmt.bits_stored) - 1, dtype=stored.dtype)
        np.bitwise_and(stored, mask, out=dst, casting="unsafe")
    if intercept:
        np.add(dst, np.asarray(int(intercept)).astype(dst.dtype), out=dst, casting="unsafe")


# pydicom reports a failure of every plug-in as RuntimeError.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (*READ_ERRORS, RuntimeError)


def iter_frames(
    data: SourceData, name: str, indices: Sequence[int] | None
) -> Iterator[tuple[int, np.ndarray, Dataset]]:
    """Decode frames of one file.

    Parameters
    ----------
    data : bytes
        The whole file.
    name : str
        For messages.
    indices : sequence of int or None
        0-based frames to decode (None: the single frame of a single-frame file).

    Yields
    ------
    index : int
        Frame number (0 for a single-frame file).
    pixels : (rows, columns) or (rows, columns, 3) ndarray
        Stored values (RGB for colour).
    ds : Dataset
        The full dataset (needed for palette and Modality LUT tables).

    Raises
    ------
    MissingCodecError
        No installed decoder for the transfer syntax.
    UnsupportedFileError
        The decoder failed on the data (damaged or truncated).
    """
    ds = _full_dataset(data, name)
    uid = transfer_syntax(ds)
    ensure_decoder(uid, name)
    try:
        if indices is None:
            yield 0, dicom_pixels.pixel_array(ds), ds
            return
        wanted = sorted(set(indices))
        if int(ds.get("BitsAllocated", 8) or 8) == 1 and not uid.is_compressed:
            # Bit-packed frames (DICOM SEG) need not start on a byte; pydicom 3.0's
            # iter_pixels mis-slices them then ("cannot reshape"), its pixel_array
            # does not. Packed data is small (1 bit per pixel) even when unpacked whole.
            every = dicom_pixels.pixel_array(ds)
            every = every.reshape(-1, *every.shape[-2:])
            for index in wanted:
                yield index, every[index], ds
            return
        for index, frame in zip(wanted, dicom_pixels.iter_pixels(ds, indices=wanted), strict=True):
            yield index, frame, ds
    except MissingCodecError:
        raise
    except _DECODE_ERRORS as err:
        raise UnsupportedFileError(
            f"{name}: pixel data in '{uid.name}' cannot be decoded ({type(err).__name__}: {err}). "
            "The file may be truncated or damaged.",
            source=name,
        ) from err


# Above this size a volume is allocated in ordinary 4 kB pages (see volume_buffer).
HUGE_PAGE_MAX_BYTES = 256 * 1024**2


def volume_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array for a loaded volume.

    numpy asks the kernel for transparent huge pages for every array over 4 MB.
    For a volume of a few hundred MB that makes the first touch of its pages about
    twice as fast as 4 kB pages, but a huge page must be a free 2 MB block, often
    memory the machine has not touched yet; under a hypervisor that backs guest
    memory lazily, filling a 1 GB volume then took 0.2-3.1 s on the benchmark's
    2-core VM, against 0.5-1.7 s in 4 kB pages (which are recycled first). Large
    volumes are therefore allocated in 4 kB pages (an anonymous mapping numpy does
    not advise).

    Parameters
    ----------
    shape : tuple of int
    dtype : numpy dtype

    Returns
    -------
    ndarray
        Writeable, C-ordered; its memory is released with the last view of it.
    """
    count = int(np.prod(shape))
    size = count * np.dtype(dtype).itemsize
    if size <= HUGE_PAGE_MAX_BYTES:
        return np.empty(shape, dtype=dtype)
    memory = mmap.mmap(-1, size)
    return np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)


def store_frame(
    dst: np.ndarray, pixels: np.ndarray, slope: float, intercept: float, name: str, *, checked: bool = False
) -> None:
    """Write one decoded frame into the output, applying the rescale.

    Parameters
    ----------
    dst : (rows, columns) or (rows, columns, 3) ndarray
        A view into the preallocated output (int or float32).
    pixels : ndarray
        Stored values as decoded, same shape as ``dst``.
    slope, intercept : float
        Modality rescale: ``value = slope * stored + intercept`` (PS3.3 C.11.1.1.2).
    checked : bool
        Verify that the rescaled values fit ``dst.dtype`` (see :class:`OutputType`).

    Raises
    ------
    UnsupportedFileError
        ``checked`` and a value does not fit.
    """
    if pixels.shape != dst.shape:
        raise UnsupportedFileError(
            f"{name}: decoded frame has shape {pixels.shape}, the header declares {dst.shape}. "
            "The file is inconsistent.",
            source=name,
        )
    if dst.dtype == np.float32:
        # float32 arithmetic only: uint16/int16 are exact in float32.
        np.multiply(pixels, np.float32(slope), out=dst, dtype=np.float32, casting="unsafe")
        if intercept:
            dst += np.float32(intercept)
        return
    if checked and pixels.size:
        info = np.iinfo(dst.dtype)
        low, high = int(pixels.min()) + int(intercept), int(pixels.max()) + int(intercept)
        if low < info.min or high > info.max:
            raise UnsupportedFileError(
                f"{name}: rescaled values {low}..{high} do not fit {dst.dtype}, the type chosen from the other "
                "images' headers. The series mixes very different value ranges; load this file alone.",
                source=name,
            )
    if intercept:
        # Modular integer arithmetic is exact whenever the true result fits dst,
        # which output_dtype checked from the stored range.
        np.add(pixels, np.asarray(int(intercept)).astype(dst.dtype), out=dst, dtype=dst.dtype, casting="unsafe")
    else:
        np.copyto(dst, pixels, casting="unsafe")


def to_rgb8(pixels: np.ndarray, ds: Dataset, fmt: PixelFormat, *, name: str = "") -> np.ndarray:
    """Colour pixels as uint8 RGB: palette lookup, and 16-bit colour scaled to 8 bits.

    Raises
    ------
    UnsupportedFileError
        The palette tables do not match their descriptors.
    """
    if fmt.photometric == "PALETTE COLOR":
        try:
            pixels = dicom_pixels.apply_color_lut(pixels, ds)
        except _DECODE_ERRORS as err:
            # e.g. a descriptor of 256 entries over 3 entries of data (pydicom then asks numpy for "uint0").
            raise UnsupportedFileError(
                f"{name or 'file'}: the (0028,1101)-(0028,1203) Palette Color Lookup Tables do not match their "
                f"descriptors ({type(err).__name__}). The file is damaged; export it again.",
                source=name,
            ) from err
    if pixels.dtype == np.uint8:
        return pixels
    # Palette tables hold 16-bit entries; direct colour keeps BitsStored significant bits.
    shift = 8 if fmt.photometric == "PALETTE COLOR" else max(0, fmt.bits_stored - 8)
    return (pixels >> shift).astype(np.uint8) if shift else pixels.astype(np.uint8)
