"""NIfTI-1, NIfTI-2 and Analyze 7.5 readers (single ``.nii[.gz]`` files and ``.hdr`` + ``.img`` pairs).

nibabel parses the header (its header classes are the reference for these
formats, and the header page shows them); the pixels are read here with
``numpy.frombuffer`` from the uploaded bytes, so nothing touches the disk and a
``.nii.gz`` is inflated with a cap taken from the header.

Geometry follows nibabel's ``get_best_affine``: the sform when its code is
above 0, else the qform when its code is above 0, else the voxel sizes only
(x flipped, LAS, as nibabel does). Analyze has no orientation; nibabel's SPM2
reading (voxel sizes, SPM origin) is used, which is what ``nibabel.load``
returns.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel.nifti1 import Nifti1Header, Nifti1PairHeader
from nibabel.nifti2 import Nifti2Header, Nifti2PairHeader
from nibabel.spatialimages import HeaderDataError
from nibabel.spm2analyze import Spm2AnalyzeHeader

from core.errors import SeriesGeometryError, UnsupportedFileError
from core.format_common import (
    check_declared_size,
    complete_affine,
    inflate_capped,
    inflate_prefix,
    is_gzip,
    make_series,
    require_bytes,
    value_dtype,
)
from core.series import Series
from core.sources import Limits, Source

# Extensions between the header and the pixels are small (a few kB of JSON or DICOM);
# a header pointing its pixels further than this is damaged or hostile.
MAX_VOX_OFFSET = 16 * 1024**2
# World distance (mm) above which sform and qform are said to disagree.
FORM_TOLERANCE_MM = 1e-3

NIFTI1_SIZE = 348
NIFTI2_SIZE = 540


@dataclass(frozen=True)
class HeaderKind:
    """What the first bytes of a file say it is."""

    family: str  # "nifti1", "nifti2" or "analyze"
    single: bool  # pixels in the same file (n+1 / n+2) rather than in an .img


def sniff_header(head: bytes) -> HeaderKind | None:
    """Recognise a NIfTI-1/NIfTI-2/Analyze header by ``sizeof_hdr`` (either byte order) and magic.

    Parameters
    ----------
    head : bytes
        At least the first 348 (NIfTI-1/Analyze) or 540 (NIfTI-2) bytes.
    """
    if len(head) < NIFTI1_SIZE:
        return None
    size_le = int.from_bytes(head[:4], "little")
    size_be = int.from_bytes(head[:4], "big")
    if NIFTI2_SIZE in (size_le, size_be) and len(head) >= NIFTI2_SIZE:
        magic = head[4:12]
        if magic == b"n+2\0\r\n\x1a\n":
            return HeaderKind("nifti2", True)
        if magic == b"ni2\0\r\n\x1a\n":
            return HeaderKind("nifti2", False)
        return None
    if NIFTI1_SIZE in (size_le, size_be):
        magic = head[344:348]
        if magic == b"n+1\0":
            return HeaderKind("nifti1", True)
        if magic == b"ni1\0":
            return HeaderKind("nifti1", False)
        return HeaderKind("analyze", False)
    return None


def _header_class(kind: HeaderKind) -> Any:
    if kind.family == "nifti2":
        return Nifti2Header if kind.single else Nifti2PairHeader
    if kind.family == "nifti1":
        return Nifti1Header if kind.single else Nifti1PairHeader
    # nibabel.load reads a plain Analyze .hdr as SPM2 Analyze (voxel sizes + SPM origin + scale).
    return Spm2AnalyzeHeader


def _parse(head: bytes, kind: HeaderKind, name: str):  # type: ignore[no-untyped-def]
    """A nibabel header from the header bytes (plus extensions when present)."""
    try:
        return _header_class(kind).from_fileobj(io.BytesIO(head), check=False)
    except (HeaderDataError, ValueError, KeyError, EOFError) as err:
        raise UnsupportedFileError(
            f"{name}: the {kind.family.upper()} header cannot be parsed ({err}). The file is damaged.",
            source=name,
        ) from err


# --------------------------------------------------------------------------- layout and values


@dataclass(frozen=True)
class _Layout:
    """How the stored array maps onto a Volume array."""

    file_shape: tuple[int, ...]  # as stored (Fortran order)
    shape: tuple[int, ...]  # (I, J, K[, T][, 3]) as the loader returns it
    raw_dtype: np.dtype
    out_dtype: np.dtype
    is_rgb: bool
    rgb_struct: bool  # NIfTI RGB24/RGBA32 (structured dtype) rather than a 5th dimension
    slope: float
    inter: float


def _layout(hdr, name: str) -> tuple[_Layout, list[str]]:  # type: ignore[no-untyped-def]
    warnings: list[str] = []
    ndim = int(hdr["dim"][0])
    if not 1 <= ndim <= 7:
        raise UnsupportedFileError(
            f"{name}: header dim[0] = {ndim}; it must be 1-7. The header is damaged "
            "(or written with the wrong byte order).",
            source=name,
        )
    try:
        raw_dtype = np.dtype(hdr.get_data_dtype())
    except (HeaderDataError, KeyError, TypeError) as err:
        raise UnsupportedFileError(
            f"{name}: datatype code {int(hdr['datatype'])} is not a NIfTI/Analyze data type TomoForge reads. "
            "Convert the image to an integer or float type.",
            source=name,
        ) from err
    if raw_dtype.itemsize == 0 or (raw_dtype.kind == "V" and raw_dtype.names is None):
        # datatype 0 (DT_UNKNOWN) and other codes nibabel maps to an empty "void" type (found by fuzzing).
        raise UnsupportedFileError(
            f"{name}: datatype code {int(hdr['datatype'])} names no pixel type (unknown or 0 bytes per value). "
            "The header is damaged.",
            source=name,
        )
    file_shape = tuple(int(n) for n in hdr.get_data_shape())[:ndim]
    if len(file_shape) < 2:
        raise UnsupportedFileError(
            f"{name}: a 1D image ({file_shape}) is not a volume. Upload a 2D, 3D or 4D image.", source=name
        )
    rgb_struct = raw_dtype.names is not None
    if rgb_struct and raw_dtype.names not in (("R", "G", "B"), ("R", "G", "B", "A")):
        raise UnsupportedFileError(f"{name}: structured data type {raw_dtype} is not supported.", source=name)
    if raw_dtype.kind == "c":
        raise UnsupportedFileError(
            f"{name}: complex values ({raw_dtype}) are not supported. Save the magnitude as a real image.",
            source=name,
        )
    spatial = (file_shape + (1,))[:3]
    extra = file_shape[3:]
    while extra and extra[-1] == 1:
        extra = extra[:-1]
    is_rgb = rgb_struct
    if rgb_struct and raw_dtype.names == ("R", "G", "B", "A"):
        warnings.append("RGBA colours: the alpha channel is dropped")
    if not extra:
        shape: tuple[int, ...] = spatial
    elif len(extra) == 1:
        shape = spatial + extra
    elif len(extra) == 2 and extra[0] == 1 and extra[1] == 3 and raw_dtype == np.uint8 and not rgb_struct:
        # NIfTI keeps vector components in the 5th dimension (intent RGB_VECTOR).
        shape = spatial
        is_rgb = True
    else:
        raise UnsupportedFileError(
            f"{name}: a {len(file_shape)}D image of shape {file_shape} ({raw_dtype}) cannot be shown: only "
            "3D, 4D (time) and 5D uint8 RGB images (a vector dimension of 3) are supported; vector fields and "
            "other multi-component images are not. Save one component as a 3D image.",
            source=name,
        )
    if is_rgb:
        shape = shape + (3,)
        return _Layout(file_shape, shape, raw_dtype, np.dtype(np.uint8), True, rgb_struct, 1.0, 0.0), warnings
    slope, inter = _scaling(hdr, name)
    out_dtype = scaled_dtype(raw_dtype, slope, inter)
    if raw_dtype.kind == "f" and raw_dtype.itemsize > 4:
        warnings.append(f"values stored as {raw_dtype.name} are loaded as float32")
    return _Layout(file_shape, shape, raw_dtype, out_dtype, False, False, slope, inter), warnings


def _scaling(hdr, name: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(slope, intercept); (1, 0) when the header sets no usable scaling (nibabel's rule)."""
    if isinstance(hdr, Spm2AnalyzeHeader):
        try:
            slope, inter = hdr.get_slope_inter()
        except HeaderDataError as err:
            raise UnsupportedFileError(f"{name}: unusable scale factors ({err}).", source=name) from err
    else:
        slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if slope is None or not math.isfinite(slope) or slope == 0:
        return 1.0, 0.0
    if inter is None or not math.isfinite(inter):
        inter = 0.0
    return float(slope), float(inter)


def scaled_dtype(raw: np.dtype, slope: float, inter: float) -> np.dtype:
    """dtype of ``raw * slope + inter`` as the loader returns it.

    Integers stay integers when the slope is 1 and the intercept integral
    (dcm2niix writes CT as raw values + scl_inter = -1024): the values get the
    signed type of the same width (at least 16 bits), which holds every real
    scan. Anything else becomes float32, never float64.

    Notes
    -----
    In the rare case where the shifted values do not fit that type (e.g. uint16
    values above 32767 - intercept), :func:`apply_scaling` widens to the next
    signed type rather than wrap around; the volume's dtype then differs from
    the scan-time :class:`~core.series.SeriesInfo`.
    """
    raw = np.dtype(raw)
    if slope == 1.0 and inter == 0.0:
        return value_dtype(raw)
    if raw.kind in "iu" and slope == 1.0 and float(inter).is_integer():
        return np.dtype(f"int{max(16, raw.itemsize * 8)}")
    return np.dtype(np.float32)


def apply_scaling(raw: np.ndarray, slope: float, inter: float, out_dtype: np.dtype) -> np.ndarray:
    """Physical values ``raw * slope + inter`` in ``out_dtype`` (see :func:`scaled_dtype`).

    Parameters
    ----------
    raw : ndarray
        Stored values (any byte order).
    """
    if slope == 1.0 and inter == 0.0:
        return raw if raw.dtype == out_dtype else raw.astype(out_dtype)
    if out_dtype.kind == "i":
        shift = int(inter)
        low = int(raw.min()) + shift if raw.size else 0
        high = int(raw.max()) + shift if raw.size else 0
        target = np.dtype(out_dtype)
        for candidate in (target, np.dtype(np.int32), np.dtype(np.int64)):
            if (
                candidate.itemsize >= target.itemsize
                and np.iinfo(candidate).min <= low
                and high <= np.iinfo(candidate).max
            ):
                target = candidate
                break
        out = raw.astype(target)
        out += target.type(shift)
        return out
    out = raw.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if inter != 0.0:
        out += np.float32(inter)
    return out


def _decode(buffer: bytes | bytearray | memoryview, offset: int, layout: _Layout) -> np.ndarray:
    """The stored pixels as an array of ``layout.shape`` (file axis order)."""
    count = math.prod(layout.file_shape)
    raw = np.frombuffer(buffer, dtype=layout.raw_dtype, count=count, offset=offset)
    raw = raw.reshape(layout.file_shape, order="F")
    if layout.rgb_struct:
        rgb = np.stack([raw["R"], raw["G"], raw["B"]], axis=-1).astype(np.uint8, copy=False)
        return rgb.reshape(layout.shape)
    if layout.is_rgb:  # 5D (I, J, K, 1, 3) uint8
        return raw.reshape(layout.shape, order="F")
    return apply_scaling(raw.reshape(layout.shape, order="F"), layout.slope, layout.inter, layout.out_dtype)


# --------------------------------------------------------------------------- geometry


def form_gap_mm(first: np.ndarray, second: np.ndarray, spatial: Sequence[int]) -> float:
    """Largest distance (mm) between where two voxel -> world affines put the corner voxels of a grid."""
    ranges = [(0, max(int(n) - 1, 0)) for n in spatial[:3]]
    points = np.array(np.meshgrid(*ranges, indexing="ij"), dtype=float).reshape(3, -1)
    corners = np.vstack([points, np.ones((1, points.shape[1]))])
    return float(np.max(np.linalg.norm((np.asarray(first) @ corners - np.asarray(second) @ corners)[:3], axis=0)))


def _usable(matrix: np.ndarray | None, spatial: Sequence[int], name: str) -> np.ndarray | None:
    if matrix is None:
        return None
    try:
        return complete_affine(matrix[:3, :3], matrix[:3, 3], spatial, name=name)
    except SeriesGeometryError:
        return None


def _form(getter: Callable[[], Any], name: str, what: str) -> Any:
    """Call a nibabel geometry getter, turning its complaints into a message for the user."""
    try:
        return getter()
    except (ValueError, HeaderDataError) as err:
        raise SeriesGeometryError(f"{name}: the header's {what} cannot be used ({err}).", source=name) from err


def nifti_affine(hdr, spatial: Sequence[int], name: str) -> tuple[np.ndarray, list[str]]:  # type: ignore[no-untyped-def]
    """Voxel -> RAS affine of a NIfTI/Analyze header, and warnings about how it was chosen.

    sform (code > 0), else qform (code > 0), else the voxel sizes only, as
    nibabel's ``get_best_affine``; a form whose matrix is broken (NaN, singular)
    is passed over with a warning.
    """
    warnings: list[str] = []
    if isinstance(hdr, Spm2AnalyzeHeader):
        best = _form(hdr.get_best_affine, name, "voxel sizes and origin")
        affine = complete_affine(best[:3, :3], best[:3, 3], spatial, name=name)
        warnings.append(
            "Analyze 7.5 stores no orientation: assumed LAS (radiological) from the voxel sizes and the SPM "
            "origin, as nibabel does; check left and right against a known landmark"
        )
        return affine, warnings
    sform, scode = _form(lambda: hdr.get_sform(coded=True), name, "sform")
    try:
        qform, qcode = hdr.get_qform(coded=True)
    except (ValueError, HeaderDataError) as err:  # nibabel refuses non-unit quaternions, bad qfac
        warnings.append(f"the qform quaternion is invalid ({err}) and was ignored")
        qform, qcode = None, 0
    scode, qcode = int(scode), int(qcode)
    s_ok = _usable(sform, spatial, name) if scode > 0 else None
    q_ok = _usable(qform, spatial, name) if qcode > 0 else None
    if scode > 0 and s_ok is None:
        warnings.append(f"the sform (code {scode}) is unusable (NaN or singular) and was ignored")
    if qcode > 0 and q_ok is None:
        warnings.append(f"the qform (code {qcode}) is unusable (NaN or singular) and was ignored")
    if s_ok is not None and q_ok is not None:
        gap = form_gap_mm(s_ok, q_ok, spatial)
        if gap > FORM_TOLERANCE_MM:
            warnings.append(
                f"sform and qform disagree by up to {gap:.3g} mm; the sform (code {scode}) is used, as in "
                "nibabel; tools that prefer the qform (e.g. ITK, SimpleITK) place this image differently"
            )
    if s_ok is not None:
        return s_ok, warnings
    if q_ok is not None:
        return q_ok, warnings
    base = _form(hdr.get_base_affine, name, "voxel sizes")
    warnings.append(
        "neither sform nor qform is set: the orientation is unknown; the voxel sizes are used with x "
        "flipped (LAS), as nibabel does; check left and right against a known landmark"
    )
    return complete_affine(base[:3, :3], base[:3, 3], spatial, name=name), warnings


# --------------------------------------------------------------------------- readers


def _header_bytes_single(source: Source, kind_size: int) -> tuple[bytes, int]:
    """Header + extensions of a single-file NIfTI (inflating only that much), and vox_offset."""
    data = source.as_bytes()
    gz = is_gzip(data)
    head = inflate_prefix(data, kind_size, name=source.name) if gz else bytes(data[:kind_size])
    kind = sniff_header(head)
    assert kind is not None  # the caller sniffed it
    hdr = _parse(head[: NIFTI2_SIZE if kind.family == "nifti2" else NIFTI1_SIZE], kind, source.name)
    offset = hdr.get_data_offset()
    minimum = (NIFTI2_SIZE if kind.family == "nifti2" else NIFTI1_SIZE) + 4
    if not math.isfinite(offset) or offset > MAX_VOX_OFFSET:
        raise UnsupportedFileError(
            f"{source.name}: vox_offset = {offset} puts the pixels beyond {MAX_VOX_OFFSET // 1024**2} MB of "
            "header extensions. The header is damaged.",
            source=source.name,
        )
    offset = max(int(offset), minimum)
    if gz:
        head = inflate_prefix(data, offset, name=source.name)
    else:
        head = bytes(data[:offset])
    return head, offset


def read_nifti_single(source: Source, limits: Limits) -> Series:
    """A Series for a single-file NIfTI-1/NIfTI-2 (``.nii`` or ``.nii.gz``); pixels are read on load.

    Raises
    ------
    UnsupportedFileError, LimitError, SeriesGeometryError
        Damaged header, over a cap, broken geometry.
    """
    data = source.as_bytes()
    gz = is_gzip(data)
    sniff = inflate_prefix(data, NIFTI2_SIZE, name=source.name) if gz else bytes(data[:NIFTI2_SIZE])
    kind = sniff_header(sniff)
    if kind is None or not kind.single:
        raise UnsupportedFileError(
            f"{source.name}: not a single-file NIfTI (no n+1/n+2 magic). A NIfTI or Analyze pair needs "
            "its .hdr and .img uploaded together.",
            source=source.name,
        )
    head, offset = _header_bytes_single(source, NIFTI2_SIZE if kind.family == "nifti2" else NIFTI1_SIZE)
    hdr = _parse(head, kind, source.name)
    layout, warnings = _layout(hdr, source.name)
    nbytes = check_declared_size(source.name, layout.file_shape, layout.raw_dtype.itemsize, limits)
    if not gz:
        require_bytes(source.name, len(data), offset + nbytes, what="the file")
    affine, geo_warnings = nifti_affine(hdr, layout.shape[:3], source.name)

    def decode() -> np.ndarray:
        if gz:
            buffer: bytes | bytearray = inflate_capped(data, offset + nbytes, name=source.name, what="gzip stream")
        else:
            buffer = data
        return _decode(buffer, offset, layout)

    return make_series(
        source=source,
        kind="nifti",
        shape=layout.shape,
        affine=affine,
        dtype=layout.out_dtype,
        decode=decode,
        headers=(hdr,),
        warnings=[*geo_warnings, *warnings],
        is_rgb=layout.is_rgb,
    )


def pair_header_kind(source: Source) -> HeaderKind | None:
    """The kind of a (possibly gzipped) ``.hdr`` of a pair, or None when it is not one."""
    data = source.as_bytes()
    head = inflate_prefix(data, NIFTI2_SIZE, name=source.name) if is_gzip(data) else bytes(data[:NIFTI2_SIZE])
    kind = sniff_header(head)
    return kind if kind is not None and not kind.single else None


def find_pair_image(header: Source, upload: Sequence[Source]) -> Source:
    """The ``.img`` (or ``.img.gz``) of the same stem as ``header``, among the uploaded files.

    Same folder first, else the only file of that name anywhere in the upload.

    Raises
    ------
    UnsupportedFileError
        No such file, or several candidates.
    """
    base = header.basename
    lower = base.lower()
    stem = base[: -len(".hdr.gz")] if lower.endswith(".hdr.gz") else base.rsplit(".", 1)[0]
    wanted = {f"{stem}.img".lower(), f"{stem}.img.gz".lower()}
    candidates = [s for s in upload if s.basename.lower() in wanted and s is not header]
    if not candidates:
        raise UnsupportedFileError(
            f"{header.name}: the image file '{stem}.img' of this header is not in the upload. Upload "
            f"'{base}' and '{stem}.img' together.",
            source=header.name,
        )
    if len(candidates) == 1:
        return candidates[0]
    folder = header.name.replace("\\", "/").rpartition("/")[0]
    same = [s for s in candidates if s.name.replace("\\", "/").rpartition("/")[0] == folder]
    if len(same) == 1:
        return same[0]
    raise UnsupportedFileError(
        f"{header.name}: {len(candidates)} uploaded files could be its image ({', '.join(s.name for s in candidates[:5])}). "
        "Upload one pair at a time.",
        source=header.name,
    )


def read_pair(header: Source, image: Source, limits: Limits) -> Series:
    """A Series for an Analyze 7.5 or NIfTI pair: ``header`` (.hdr[.gz]) and ``image`` (.img[.gz]).

    Raises
    ------
    UnsupportedFileError, LimitError, SeriesGeometryError
        Damaged header, over a cap, broken geometry, image file too short.
    """
    hdr_data = header.as_bytes()
    head = inflate_prefix(hdr_data, 1024**2, name=header.name) if is_gzip(hdr_data) else bytes(hdr_data)
    kind = sniff_header(head)
    if kind is None or kind.single:
        raise UnsupportedFileError(f"{header.name}: not an Analyze/NIfTI pair header.", source=header.name)
    hdr = _parse(head, kind, header.name)
    layout, warnings = _layout(hdr, header.name)
    nbytes = check_declared_size(header.name, layout.file_shape, layout.raw_dtype.itemsize, limits)
    offset = int(hdr.get_data_offset())
    if offset < 0 or offset > MAX_VOX_OFFSET:
        raise UnsupportedFileError(f"{header.name}: vox_offset = {offset} is out of range.", source=header.name)
    img_data = image.as_bytes()
    img_gz = is_gzip(img_data)
    if not img_gz:
        require_bytes(image.name, len(img_data), offset + nbytes, what="the image file")
    affine, geo_warnings = nifti_affine(hdr, layout.shape[:3], header.name)

    def decode() -> np.ndarray:
        if img_gz:
            buffer: bytes | bytearray = inflate_capped(img_data, offset + nbytes, name=image.name, what="gzip stream")
        else:
            buffer = img_data
        return _decode(buffer, offset, layout)

    return make_series(
        source=header,
        kind="analyze" if kind.family == "analyze" else "nifti",
        shape=layout.shape,
        affine=affine,
        dtype=layout.out_dtype,
        decode=decode,
        headers=(hdr,),
        sources=(image,),
        warnings=[*geo_warnings, *warnings],
        is_rgb=layout.is_rgb,
    )
