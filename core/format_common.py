"""Pieces shared by the non-DICOM readers: caps, inflation, data-file lookup, geometry.

Every reader follows the same steps: parse the header at scan time (never the
pixels), check the declared size against :class:`~core.sources.Limits` and the
bytes actually present, work out the RAS+ geometry of the volume it will
return, and hand back a :class:`~core.series.Series` whose loader decodes the
pixels on demand.
"""

from __future__ import annotations

import bz2
import math
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from core.errors import LimitError, SeriesGeometryError, UnsupportedFileError
from core.series import Series, SeriesInfo
from core.sources import Limits, Source
from core.volume import Volume, reorient_to_ras

_zlib: ModuleType
try:  # python-isal inflates about twice as fast as zlib with the same API.
    from isal import isal_zlib

    _zlib = isal_zlib
    _INFLATE_ERRORS: tuple[type[BaseException], ...] = (zlib.error, isal_zlib.error)  # type: ignore[assignment]
except ImportError:  # pragma: no cover - isal is in requirements.txt
    _zlib = zlib
    _INFLATE_ERRORS = (zlib.error,)

SUPPORTED = (
    "TomoForge reads DICOM, NIfTI-1/NIfTI-2 (.nii, .nii.gz), Analyze 7.5 or NIfTI pairs (.hdr + .img), "
    "NRRD (.nrrd, .nhdr + data file), MetaImage (.mha, .mhd + data file), PNG, JPEG and TIFF"
)

# Decompressed bytes allowed beyond what a header declares before a stream counts as a bomb.
# Writers pad a little (gzip of an extension block, alignment); nothing legitimate adds megabytes.
INFLATE_SLACK_BYTES = 1024**2

_DOUBLE_SUFFIXES = (".nii.gz", ".nrrd.gz", ".hdr.gz", ".img.gz", ".raw.gz")
_CHUNK = 4 * 1024**2


def file_stem(name: str) -> str:
    """File name without folders and without its (double) suffix: ``a/b/x.nii.gz`` -> ``x``."""
    base = PurePosixPath(name.replace("\\", "/")).name
    lower = base.lower()
    for double in _DOUBLE_SUFFIXES:
        if lower.endswith(double) and len(base) > len(double):
            return base[: -len(double)]
    stem = PurePosixPath(base).stem
    return stem or base


def is_gzip(data: bytes | bytearray | memoryview) -> bool:
    return bytes(data[:2]) == b"\x1f\x8b"


# --------------------------------------------------------------------------- caps


def check_declared_size(name: str, shape: Sequence[int], itemsize: int, limits: Limits, *, what: str = "image") -> int:
    """Refuse a header whose declared size exceeds the caps, before anything is allocated.

    Parameters
    ----------
    name : str
        File name for messages.
    shape : sequence of int
        Every axis of the data (spatial, time, components).
    itemsize : int
        Bytes per value.
    limits : Limits
        ``max_voxels`` caps the number of values, ``max_total_bytes`` the bytes.

    Returns
    -------
    int
        The number of bytes the data occupies.

    Raises
    ------
    UnsupportedFileError
        A dimension is zero or negative.
    LimitError
        More voxels or bytes than allowed.
    """
    dims = [int(n) for n in shape]
    if not dims or any(n <= 0 for n in dims):
        raise UnsupportedFileError(
            f"{name}: header declares {what} dimensions {dims}; every dimension must be at least 1. "
            "The header is damaged.",
            source=name,
        )
    voxels = math.prod(dims)  # Python ints: no overflow for 32767^7
    if voxels > limits.max_voxels:
        raise LimitError(
            f"{name}: header declares {'x'.join(map(str, dims))} = {voxels:,} values, more than the cap of "
            f"{limits.max_voxels:,}. Crop or downsample the image before uploading it.",
            source=name,
        )
    nbytes = voxels * int(itemsize)
    if nbytes > limits.max_total_bytes:
        raise LimitError(
            f"{name}: header declares {nbytes / 1024**3:.2f} GB of pixel data, more than the cap of "
            f"{limits.max_total_bytes / 1024**3:.1f} GB. Crop or downsample the image before uploading it.",
            source=name,
        )
    return nbytes


def require_bytes(name: str, available: int, needed: int, *, what: str) -> None:
    """Refuse data that is shorter than its header declares (before reading it)."""
    if available < needed:
        raise UnsupportedFileError(
            f"{name}: {what} holds {available:,} bytes but the header declares {needed:,}. "
            "The file is truncated; upload the complete file.",
            source=name,
        )


# --------------------------------------------------------------------------- decompression


def _zlib_wbits(data: bytes | bytearray | memoryview) -> int:
    # 31: gzip wrapper, 15: zlib wrapper. Detecting it ourselves works with zlib and isal alike.
    return 31 if is_gzip(data) else 15


def _inflate_into(out: bytearray, data: memoryview, cap: int, *, name: str, what: str) -> bool:
    """Append the inflated stream(s) of ``data`` to ``out``, stopping once ``len(out) > cap``.

    Input is fed in chunks and output is requested with a size limit, so a bomb
    never inflates more than ``cap + 1`` bytes. isal may buffer output
    internally (its ``unconsumed_tail`` can be empty while output is pending),
    hence the drain loop that asks again until nothing comes back.

    Returns
    -------
    bool
        The last stream ended properly (zlib then has checked its CRC); False when
        the input ran out first (truncated or damaged) or the cap was reached.
    """
    view = data
    pos = 0
    inflater = _zlib.decompressobj(_zlib_wbits(view))
    try:
        while len(out) <= cap:
            if pos >= len(view):
                out += inflater.flush()
                return bool(inflater.eof)
            piece = inflater.decompress(view[pos : pos + _CHUNK], cap + 1 - len(out))
            pos += _CHUNK
            while True:
                out += piece
                if len(out) > cap or inflater.eof:
                    break
                tail = inflater.unconsumed_tail
                piece = inflater.decompress(tail, cap + 1 - len(out))
                if not piece and not tail:
                    break
            if inflater.eof:
                rest = bytes(inflater.unused_data) + bytes(view[pos:])
                # gzip allows several members one after the other (pigz -i, cat a.gz b.gz).
                if len(out) <= cap and is_gzip(rest):
                    view = memoryview(rest)
                    pos = 0
                    inflater = _zlib.decompressobj(31)
                    continue
                return True
        return False
    except _INFLATE_ERRORS as err:
        raise UnsupportedFileError(
            f"{name}: the {what} is damaged ({err}). Re-create the file and upload it again.",
            source=name,
        ) from err


def inflate_prefix(data: bytes | bytearray | memoryview, n_bytes: int, *, name: str) -> bytes:
    """Decompress only the first ``n_bytes`` of a gzip or zlib stream (header sniffing).

    Returns fewer bytes when the stream is shorter.

    Raises
    ------
    UnsupportedFileError
        The stream is damaged.
    """
    out = bytearray()
    _inflate_into(out, memoryview(data), n_bytes - 1, name=name, what="compressed stream")
    return bytes(out[:n_bytes])


def inflate_capped(
    data: bytes | bytearray | memoryview,
    expected: int,
    *,
    name: str,
    what: str = "compressed data",
) -> bytearray:
    """Decompress a gzip (possibly multi-member) or zlib stream, never beyond what is declared.

    Parameters
    ----------
    data : bytes-like
        The compressed stream.
    expected : int
        Bytes the header declares; at most ``expected + INFLATE_SLACK_BYTES + 1`` are inflated.
    name, what : str
        For messages.

    Returns
    -------
    bytearray
        The first ``expected`` decompressed bytes (a bytearray, so numpy can wrap it
        without another copy).

    Raises
    ------
    LimitError
        The stream inflates to more than the header declares (a decompression bomb),
        detected after inflating the declared size plus the slack, never all of it.
    UnsupportedFileError
        The stream is damaged or ends early.
    """
    cap = expected + INFLATE_SLACK_BYTES
    out = bytearray()
    complete = _inflate_into(out, memoryview(data), cap, name=name, what=what)
    if len(out) > cap:
        raise LimitError(
            f"{name}: the {what} inflates to more than the {expected:,} bytes its header declares "
            "(a decompression bomb?); refused after inflating the declared size. Re-create the file.",
            source=name,
        )
    require_bytes(name, len(out), expected, what=f"the decompressed {what}")
    if not complete:
        # Without the end of the stream zlib has not checked the CRC: the bytes may be garbage.
        raise UnsupportedFileError(
            f"{name}: the {what} stops before its end marker; the file is truncated or damaged. "
            "Upload the complete file.",
            source=name,
        )
    del out[expected:]
    return out


def bunzip2_capped(data: bytes | bytearray | memoryview, expected: int, *, name: str, what: str) -> bytearray:
    """Decompress a (possibly multi-stream) bzip2 stream, never beyond the declared size.

    Raises
    ------
    LimitError
        More data than declared (a bomb), found after at most ``expected`` + slack bytes.
    UnsupportedFileError
        Damaged or truncated stream.
    """
    cap = expected + INFLATE_SLACK_BYTES
    rest = bytes(data)
    out = bytearray()
    try:
        while rest and len(out) <= cap:
            inflater = bz2.BZ2Decompressor()
            out += inflater.decompress(rest, cap + 1 - len(out))
            while not inflater.eof and not inflater.needs_input and len(out) <= cap:
                out += inflater.decompress(b"", cap + 1 - len(out))
            if not inflater.eof:
                break
            rest = inflater.unused_data
    except (OSError, ValueError, EOFError) as err:
        raise UnsupportedFileError(
            f"{name}: the {what} (bzip2) is damaged ({err}). Re-create the file and upload it again.",
            source=name,
        ) from err
    if len(out) > cap:
        raise LimitError(
            f"{name}: the {what} inflates to more than the {expected:,} bytes its header declares "
            "(a decompression bomb?). Re-create the file.",
            source=name,
        )
    require_bytes(name, len(out), expected, what=f"the decompressed {what}")
    del out[expected:]
    return out


# --------------------------------------------------------------------------- data files


_WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:")


def resolve_data_file(reference: str, header: Source, upload: Sequence[Source], *, field: str) -> Source:
    """Find the data file a header names, among the files of the same upload only.

    A header may only name a file that was uploaded with it: the reference is
    matched by base name (any folder inside the upload, preferring the header's
    own folder). Nothing is ever read from the server's disk.

    Parameters
    ----------
    reference : str
        The value of the header field (``ElementDataFile``, ``data file``, the ``.img``).
    header : Source
        The header file (for messages and its folder).
    upload : sequence of Source
        Every file of the upload.
    field : str
        Name of the header field, for messages.

    Raises
    ------
    UnsupportedFileError
        The reference is absolute, climbs out of the folder, is ambiguous or is
        not part of the upload.
    """
    ref = reference.strip().strip('"').replace("\\", "/")
    if not ref:
        raise UnsupportedFileError(
            f"{header.name}: {field} is empty; the header names no data file.", source=header.name
        )
    if ref.startswith(("/", "~")) or _WINDOWS_ABSOLUTE.match(ref) or "://" in ref:
        raise UnsupportedFileError(
            f"{header.name}: {field} = '{reference.strip()}' is an absolute path. For safety TomoForge only "
            "reads data files uploaded together with their header: put the data file beside the header, "
            f"set {field} to its bare file name, and upload both.",
            source=header.name,
        )
    parts = PurePosixPath(ref).parts
    if ".." in parts:
        raise UnsupportedFileError(
            f"{header.name}: {field} = '{reference.strip()}' points outside the header's folder ('..'). For "
            f"safety TomoForge only reads data files uploaded together with their header: set {field} to "
            "the data file's bare name and upload both files.",
            source=header.name,
        )
    base = parts[-1] if parts else ""
    header_dir = PurePosixPath(header.name.replace("\\", "/")).parent
    wanted = (header_dir / ref).as_posix() if str(header_dir) != "." else ref
    by_base = [s for s in upload if s.basename == base and s is not header]
    exact = [s for s in by_base if s.name.replace("\\", "/") == wanted]
    if exact:
        return exact[0]
    if len(by_base) == 1:
        return by_base[0]
    if not by_base:
        raise UnsupportedFileError(
            f"{header.name}: its data file '{base}' ({field}) is not in the upload. Upload '{header.basename}' "
            f"and '{base}' together (select both files, or a zip or folder holding both).",
            source=header.name,
        )
    same_folder = [s for s in by_base if PurePosixPath(s.name.replace("\\", "/")).parent == header_dir]
    if len(same_folder) == 1:
        return same_folder[0]
    raise UnsupportedFileError(
        f"{header.name}: {len(by_base)} uploaded files are named '{base}' ({', '.join(s.name for s in by_base[:5])}); "
        "cannot tell which one is the data file. Upload one series at a time.",
        source=header.name,
    )


# --------------------------------------------------------------------------- values


def value_dtype(raw: np.dtype) -> np.dtype:
    """The dtype a reader returns for stored values of dtype ``raw`` (without scaling).

    Native byte order; float64 becomes float32, because no scanner measures
    more than 7 significant digits and float64 doubles the memory of big data.
    """
    raw = np.dtype(raw)
    if raw.kind == "f":
        return np.dtype(np.float32)
    if raw.kind in "iub":
        return raw.newbyteorder("=")
    raise UnsupportedFileError(f"values of type {raw} (complex or structured) are not supported")


def to_value_dtype(array: np.ndarray) -> np.ndarray:
    """Convert stored values to :func:`value_dtype` (a no-copy view when nothing changes)."""
    target = value_dtype(array.dtype)
    if array.dtype == target:
        return array
    return array.astype(target)


# --------------------------------------------------------------------------- geometry


def complete_affine(
    linear: npt.ArrayLike, origin: npt.ArrayLike, spatial_shape: Sequence[int], *, name: str
) -> np.ndarray:
    """Build a 4x4 voxel -> RAS affine and repair a missing step along a single-voxel axis.

    A 2D image embedded in 3D has no step along its third axis (zero column or
    zero spacing); it gets a unit vector normal to the other two (1 mm), so the
    volume has K == 1 and a 1 mm slice thickness.

    Parameters
    ----------
    linear : (3, 3) ndarray
        Columns are the RAS steps (mm) of i, j, k.
    origin : (3,) sequence of float
        RAS position (mm) of voxel (0, 0, 0).
    spatial_shape : (3,) sequence of int
        Voxels along i, j, k.

    Raises
    ------
    SeriesGeometryError
        Non-finite values, or a zero step along an axis longer than one voxel.
    """
    m = np.array(linear, dtype=np.float64).reshape(3, 3)
    t = np.array(origin, dtype=np.float64).reshape(3)
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(t))):
        raise SeriesGeometryError(
            f"{name}: the header's geometry has NaN or infinite values ({m.tolist()}, origin {t.tolist()}). "
            "The file is damaged; re-export it.",
            source=name,
        )
    norms = np.linalg.norm(m, axis=0)
    for axis in range(3):
        if norms[axis] > 1e-9:
            continue
        if int(spatial_shape[axis]) != 1:
            raise SeriesGeometryError(
                f"{name}: the voxel size along axis {'ijk'[axis]} is 0 but that axis has "
                f"{spatial_shape[axis]} voxels. The header is damaged; re-export the image.",
                source=name,
            )
        a, b = [m[:, other] for other in range(3) if other != axis]
        normal = np.cross(a, b) if axis != 1 else np.cross(b, a)
        length = float(np.linalg.norm(normal))
        if length < 1e-12:
            normal = np.eye(3)[axis]
            length = 1.0
        m[:, axis] = normal / length
    if abs(np.linalg.det(m)) < 1e-12 * max(1.0, float(np.prod(np.linalg.norm(m, axis=0)))):
        raise SeriesGeometryError(
            f"{name}: the voxel axes are parallel (direction matrix {np.round(m, 4).tolist()} is singular). "
            "The header is damaged; re-export the image.",
            source=name,
        )
    affine = np.eye(4)
    affine[:3, :3] = m
    affine[:3, 3] = t
    return affine


def ras_geometry(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of the volume after :func:`~core.volume.reorient_to_ras`, without pixels.

    Runs the very function the loader runs, on a zero-strided dummy array, so
    the scan-time info cannot drift from the loaded volume.
    """
    dummy = np.broadcast_to(np.zeros((), dtype=np.uint8), tuple(int(n) for n in shape))
    array, new_affine = reorient_to_ras(dummy, affine)
    return tuple(int(n) for n in array.shape), np.array(new_affine, dtype=np.float64)


def finish_volume(
    array: np.ndarray,
    affine: np.ndarray,
    info: SeriesInfo,
    *,
    unit: str = "",
) -> Volume:
    """Reorient to RAS+ and wrap in a Volume, checking it matches what the scan promised.

    Raises
    ------
    SeriesGeometryError
        The decoded pixels do not have the shape or dtype the header promised.
    """
    new_array, new_affine = reorient_to_ras(array, affine)
    if tuple(new_array.shape) != tuple(info.shape):
        raise SeriesGeometryError(
            f"{info.description}: decoded pixels have shape {tuple(new_array.shape)} but the header "
            f"promised {tuple(info.shape)}. The file is inconsistent; re-export it.",
            source=info.description,
        )
    return Volume(
        array=new_array,
        affine=new_affine,
        modality=info.modality,
        unit=unit,
        is_rgb=info.is_rgb,
        description=info.description,
    )


def make_series(
    *,
    source: Source,
    kind: str,
    shape: Sequence[int],
    affine: np.ndarray,
    dtype: npt.DTypeLike,
    decode: Callable[[], np.ndarray],
    headers: Sequence[Any],
    sources: Sequence[Source] = (),
    warnings: Sequence[str] = (),
    is_rgb: bool = False,
    modality: str = "",
    unit: str = "",
) -> Series:
    """Assemble a lazily loaded Series from a parsed header.

    Parameters
    ----------
    source : Source
        The header (or single) file; names the series.
    shape : sequence of int
        Shape of the decoded array in file order: ``(I, J, K[, T][, 3])``.
    affine : (4, 4) ndarray
        Voxel (file order) -> RAS mm.
    dtype : dtype
        dtype of the decoded array.
    decode : callable
        Returns the decoded array of ``shape`` and ``dtype`` in file order; called on load.
    """
    ras_shape, ras_affine = ras_geometry(shape, affine)
    stem = file_stem(source.name)
    info = SeriesInfo(
        id=stem,
        kind=kind,
        description=stem,
        modality=modality,
        shape=ras_shape,
        affine=ras_affine,
        dtype=str(np.dtype(dtype)),
        warnings=tuple(warnings),
        sources=tuple([source.name, *[s.name for s in sources]]),
        is_rgb=is_rgb,
    )
    file_affine = np.array(affine, dtype=np.float64)

    def load() -> Volume:
        array = decode()
        return finish_volume(array, file_affine, info, unit=unit)

    return Series(info=info, loader=load, headers=tuple(headers))


def text_values(view: memoryview, count: int, dtype: np.dtype, label: str) -> np.ndarray:
    """The first ``count`` numbers of text pixel data (NRRD ``encoding: ascii``, MetaImage ``BinaryData = False``)."""
    try:
        values = np.array(bytes(view).split(), dtype=np.float64)
    except ValueError as err:
        raise UnsupportedFileError(
            f"{label}: the text data holds something that is not a number.", source=label
        ) from err
    if values.size < count:
        raise UnsupportedFileError(
            f"{label}: the text data holds {values.size:,} numbers but the header declares {count:,}.", source=label
        )
    return values[:count].astype(dtype.newbyteorder("="))
