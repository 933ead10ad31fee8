"""MetaImage reader (``.mha`` with attached data, ``.mhd`` with a detached data file).

Parsed here rather than with SimpleITK: the header is a short ``Key = Value``
text, and reading it ourselves means a detached ``ElementDataFile`` is looked up
among the uploaded files only, never opened on the server's disk (SimpleITK
reads ``ElementDataFile = /etc/passwd`` as an image), the declared size is
checked against the caps and the bytes present before allocating, and no
temporary files are needed.

Geometry as ITK's MetaImageIO reads it: row ``i`` of ``TransformMatrix`` is the
direction of axis ``i`` in LPS, ``Offset`` is the LPS position of voxel 0;
``AnatomicalOrientation`` is informative only (ITK ignores it too).
Format reference: https://itk.org/Wiki/ITK/MetaIO/Documentation
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from core.errors import UnsupportedFileError
from core.format_common import (
    check_declared_size,
    complete_affine,
    inflate_capped,
    make_series,
    require_bytes,
    resolve_data_file,
    text_values,
    to_value_dtype,
    value_dtype,
)
from core.series import Series
from core.sources import Limits, Source
from core.volume import LPS_TO_RAS

MAX_HEADER_BYTES = 1024**2
MAX_DATA_FILES = 100_000

_TYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",  # MetaIO's MET_LONG is 4 bytes on every platform
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}
_MODALITIES = {"MET_MOD_CT": "CT", "MET_MOD_MR": "MR", "MET_MOD_NM": "NM", "MET_MOD_US": "US"}
_FIRST_LINE = re.compile(rb"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=")


def looks_like_metaimage(data: bytes) -> bool:
    """``Key = Value`` text that names NDims and ElementDataFile within its first 64 kB."""
    head = bytes(data[:65536])
    return bool(_FIRST_LINE.match(head)) and b"NDims" in head and b"ElementDataFile" in head


def parse_header(data: bytes, name: str) -> tuple[dict[str, str], list[str], int]:
    """Fields (in file order), the lines after a LIST ``ElementDataFile``, and where attached data starts.

    Raises
    ------
    UnsupportedFileError
        No ``ElementDataFile`` line within the first MB, or a malformed line.
    """
    view = bytes(data[:MAX_HEADER_BYTES])
    fields: dict[str, str] = {}
    pos = 0
    while True:
        end = view.find(b"\n", pos)
        if end < 0:
            if pos < len(view) and len(data) <= MAX_HEADER_BYTES:
                end = len(view)
            else:
                raise UnsupportedFileError(
                    f"{name}: no ElementDataFile line within the first {MAX_HEADER_BYTES // 1024**2} MB; "
                    "not a MetaImage header.",
                    source=name,
                )
        line = view[pos:end].decode("latin-1").strip()
        pos = end + 1
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UnsupportedFileError(f"{name}: MetaImage line '{line[:80]}' is not 'Key = Value'.", source=name)
        key = key.strip()
        fields[key] = value.strip()
        if key.lower() == "elementdatafile":
            break
    listing: list[str] = []
    if fields[_key(fields, "ElementDataFile")].split()[:1] == ["LIST"]:
        listing = [ln.strip() for ln in view[pos:].decode("latin-1").splitlines() if ln.strip()]
    return fields, listing, pos


def _key(fields: dict[str, str], wanted: str) -> str:
    # MetaIO is case-sensitive, but other writers are not careful; match case-insensitively.
    for key in fields:
        if key.lower() == wanted.lower():
            return key
    return wanted


def _get(fields: dict[str, str], *names: str) -> str | None:
    for wanted in names:
        key = _key(fields, wanted)
        if key in fields:
            return fields[key]
    return None


def _numbers(fields: dict[str, str], name: str, *keys: str) -> list[float] | None:
    text = _get(fields, *keys)
    if text is None:
        return None
    try:
        return [float(v) for v in text.split()]
    except ValueError as err:
        raise UnsupportedFileError(
            f"{name}: MetaImage {keys[0]} = '{text}' is not a list of numbers.", source=name
        ) from err


def _integer(fields: dict[str, str], name: str, key: str, default: int) -> int:
    text = _get(fields, key)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError as err:
        raise UnsupportedFileError(f"{name}: MetaImage {key} = '{text}' is not a number.", source=name) from err
    if not value.is_integer():
        raise UnsupportedFileError(f"{name}: MetaImage {key} = '{text}' is not an integer.", source=name)
    return int(value)


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes")


def _data_files(spec: str, listing: list[str], name: str) -> list[str]:
    tokens = spec.split()
    if tokens[:1] == ["LIST"]:
        if not listing:
            raise UnsupportedFileError(f"{name}: ElementDataFile = LIST but no file names follow.", source=name)
        return listing
    if len(tokens) >= 4 and "%" in tokens[0]:
        fmt = tokens[0]
        if not re.fullmatch(r"[^%]*%0?\d*d[^%]*", fmt):
            raise UnsupportedFileError(
                f"{name}: ElementDataFile pattern '{fmt}' must hold exactly one %d.", source=name
            )
        try:
            first, last, step = int(tokens[1]), int(tokens[2]), int(tokens[3])
        except ValueError as err:
            raise UnsupportedFileError(
                f"{name}: ElementDataFile pattern numbers are not integers.", source=name
            ) from err
        if step == 0 or (last - first) / step < 0 or abs((last - first) // step) + 1 > MAX_DATA_FILES:
            raise UnsupportedFileError(f"{name}: ElementDataFile pattern range is invalid.", source=name)
        return [fmt % i for i in range(first, last + (1 if step > 0 else -1), step)]
    return [spec]


def read_metaimage(source: Source, upload: Sequence[Source], limits: Limits) -> tuple[Series, list[Source]]:
    """A Series for a MetaImage header, with the uploaded data files it uses.

    Parameters
    ----------
    source : Source
        The ``.mha`` or ``.mhd``.
    upload : sequence of Source
        Every file of the upload; a detached data file is looked up only here.

    Returns
    -------
    series : Series
        Pixels are decoded on load.
    data_sources : list of Source
        Detached data files (empty for ``ElementDataFile = LOCAL``).

    Raises
    ------
    UnsupportedFileError, LimitError, SeriesGeometryError
        Damaged header, a data file outside the upload, over a cap, broken geometry.
    """
    name = source.name
    fields, listing, data_start = parse_header(source.as_bytes(), name)
    warnings: list[str] = []
    object_type = _get(fields, "ObjectType")
    if object_type is not None and object_type.lower() != "image":
        raise UnsupportedFileError(
            f"{name}: MetaImage ObjectType = {object_type}; only Image is supported.", source=name
        )
    ndims_text = _get(fields, "NDims")
    dims_list = _numbers(fields, name, "DimSize")
    type_name = (_get(fields, "ElementType") or "").upper()
    if ndims_text is None or dims_list is None or not type_name:
        raise UnsupportedFileError(f"{name}: a MetaImage header needs NDims, DimSize and ElementType.", source=name)
    ndims = _integer(fields, name, "NDims", 0)
    if not all(float(v).is_integer() for v in dims_list):
        raise UnsupportedFileError(f"{name}: DimSize {dims_list} are not integers.", source=name)
    dims = [int(v) for v in dims_list]
    if ndims not in (2, 3, 4) or len(dims) != ndims:
        raise UnsupportedFileError(
            f"{name}: NDims = {ndims} with DimSize {dims}; only 2D, 3D and 4D MetaImages are supported.", source=name
        )
    channels = _integer(fields, name, "ElementNumberOfChannels", 1)
    base_type = type_name[: -len("_ARRAY")] if type_name.endswith("_ARRAY") else type_name
    if base_type not in _TYPES:
        raise UnsupportedFileError(f"{name}: ElementType = {type_name} is not supported.", source=name)
    msb = _true(_get(fields, "BinaryDataByteOrderMSB", "ElementByteOrderMSB"))
    raw_dtype = np.dtype(_TYPES[base_type]).newbyteorder(">" if msb else "<")
    check_declared_size(name, [*dims, channels], raw_dtype.itemsize, limits)
    nbytes = math.prod(dims) * channels * raw_dtype.itemsize

    is_rgb = False
    if channels == 3 and raw_dtype == np.uint8:
        is_rgb = True
    elif channels == 4 and raw_dtype == np.uint8:
        is_rgb = True
        warnings.append("RGBA colours: the alpha channel is dropped")
    elif channels != 1:
        raise UnsupportedFileError(
            f"{name}: {channels} components per voxel of {raw_dtype.name} (e.g. a vector field) cannot be shown; "
            "only scalar and uint8 RGB images are supported.",
            source=name,
        )

    # Geometry: ITK reads row i of TransformMatrix as the LPS direction of axis i.
    spatial_n = min(ndims, 3)
    spacing = _numbers(fields, name, "ElementSpacing", "ElementSize")
    if spacing is None:
        spacing = [1.0] * ndims
        warnings.append("no ElementSpacing: 1 mm voxels assumed")
    origin = _numbers(fields, name, "Offset", "Position", "Origin") or [0.0] * ndims
    matrix = _numbers(fields, name, "TransformMatrix", "Rotation", "Orientation")
    if matrix is None:
        directions = np.eye(ndims)
    elif len(matrix) != ndims * ndims:
        raise UnsupportedFileError(
            f"{name}: TransformMatrix has {len(matrix)} values; NDims = {ndims} needs {ndims * ndims}.", source=name
        )
    else:
        directions = np.array(matrix).reshape(ndims, ndims).T
    if len(spacing) < spatial_n or len(origin) < spatial_n:
        raise UnsupportedFileError(f"{name}: ElementSpacing/Offset have fewer than {spatial_n} values.", source=name)
    linear = np.zeros((3, 3))
    linear[:spatial_n, :spatial_n] = directions[:spatial_n, :spatial_n] * np.array(spacing[:spatial_n])[None, :]
    lps_origin = np.zeros(3)
    lps_origin[:spatial_n] = origin[:spatial_n]
    flip = np.diag(LPS_TO_RAS)[:3]
    spatial_shape = (dims + [1, 1])[:3]
    affine = complete_affine(flip[:, None] * linear, flip * lps_origin, spatial_shape, name=name)
    extra = (dims[3],) if ndims == 4 else ()
    shape = tuple(spatial_shape) + extra + ((3,) if is_rgb else ())
    stored_shape = tuple(spatial_shape) + extra + (channels,)

    # Data.
    spec = _get(fields, "ElementDataFile") or ""
    compressed = _true(_get(fields, "CompressedData"))
    binary = _get(fields, "BinaryData") is None or _true(_get(fields, "BinaryData"))
    if spec.strip().upper() == "LOCAL":
        pieces: list[Source] = []
    else:
        pieces = [
            resolve_data_file(ref, source, upload, field="ElementDataFile") for ref in _data_files(spec, listing, name)
        ]
        if nbytes % len(pieces):
            raise UnsupportedFileError(
                f"{name}: {len(pieces)} data files cannot evenly hold {nbytes:,} bytes.", source=name
            )
    per_piece = nbytes // max(len(pieces), 1)
    header_size = _integer(fields, name, "HeaderSize", 0)
    compressed_size = _integer(fields, name, "CompressedDataSize", 0) if not pieces else 0

    def piece_bytes(piece: Source | None) -> memoryview:
        if piece is None:
            view = memoryview(source.as_bytes())[data_start:]
        else:
            view = memoryview(piece.as_bytes())
            if header_size > 0:
                view = view[header_size:]
            elif header_size == -1 and binary and not compressed:
                view = view[len(view) - per_piece :] if len(view) >= per_piece else view
        if compressed and 0 < compressed_size <= len(view):
            view = view[:compressed_size]
        return view

    targets: list[Source | None] = list(pieces) or [None]  # None: the data attached to the header
    if binary and not compressed:
        for piece in targets:
            require_bytes(piece.name if piece else name, len(piece_bytes(piece)), per_piece, what="the pixel data")

    def decode() -> np.ndarray:
        decoded: list[bytes | bytearray | memoryview | np.ndarray] = []
        for piece in targets:
            label = piece.name if piece else name
            view = piece_bytes(piece)
            if not binary:
                decoded.append(text_values(view, per_piece // raw_dtype.itemsize, raw_dtype, label))
            elif compressed:
                decoded.append(inflate_capped(view, per_piece, name=label, what="compressed pixel data"))
            else:
                decoded.append(view[:per_piece])
        if len(decoded) == 1 and isinstance(decoded[0], np.ndarray):
            flat = decoded[0]
        elif any(isinstance(d, np.ndarray) for d in decoded):
            flat = np.concatenate([np.asarray(d).reshape(-1) for d in decoded])
        else:
            buffer = decoded[0] if len(decoded) == 1 else b"".join(bytes(d) for d in decoded)
            flat = np.frombuffer(buffer, dtype=raw_dtype, count=math.prod(dims) * channels)
        # Channels vary fastest, then x, y, z, t.
        stored = flat.reshape([*dims[::-1], channels])
        stored = stored.transpose([*range(ndims - 1, -1, -1), ndims])
        array = stored.reshape(stored_shape)
        if is_rgb:
            array = array[..., :3]
        else:
            array = array[..., 0]
        return to_value_dtype(array)

    modality = _MODALITIES.get((_get(fields, "Modality") or "").upper(), "")
    if raw_dtype.kind == "f" and raw_dtype.itemsize > 4:
        warnings.append(f"values stored as {raw_dtype.name} are loaded as float32")
    series = make_series(
        source=source,
        kind="metaimage",
        shape=shape,
        affine=affine,
        dtype=np.uint8 if is_rgb else value_dtype(raw_dtype),
        decode=decode,
        headers=(dict(fields),),
        sources=pieces,
        warnings=warnings,
        is_rgb=is_rgb,
        modality=modality,
        unit="HU" if modality == "CT" else "",
    )
    return series, pieces
