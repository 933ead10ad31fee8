"""NRRD reader (``.nrrd`` with attached data, ``.nhdr`` with detached data files).

Parsed here rather than with SimpleITK or pynrrd: the header is a short
``field: value`` text, and reading it ourselves means (1) a detached ``data
file`` is looked up among the uploaded files only, never opened on the server's
disk (SimpleITK happily reads ``data file: /etc/passwd``), (2) the declared size
is checked against the caps and the bytes present before anything is
allocated, and (3) no temporary files are needed.

Format reference: http://teem.sourceforge.net/nrrd/format.html (NRRD0001-0005).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import UnsupportedFileError
from core.format_common import (
    bunzip2_capped,
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

MAGIC = re.compile(rb"^NRRD000[1-9]\r?\n")
MAX_HEADER_BYTES = 1024**2
MAX_DATA_FILES = 100_000

_TYPES: dict[str, str] = {}
for _names, _dtype in (
    (("signed char", "int8", "int8_t"), "i1"),
    (("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    (("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    (("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    (("int", "signed int", "int32", "int32_t"), "i4"),
    (("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    (
        ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
        "i8",
    ),
    (("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    (("float",), "f4"),
    (("double",), "f8"),
):
    for _name in _names:
        _TYPES[_name] = _dtype

# Sign flips from each named space to RAS.
_SPACES = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}
_VECTOR_KINDS = {
    "vector", "covariant-vector", "normal", "gradient", "3-vector", "3-gradient", "3-normal",
    "point", "2-vector", "4-vector",
}  # fmt: skip
_RGB_KINDS = {"rgb-color", "3-color"}
_RGBA_KINDS = {"rgba-color", "4-color"}
_FIELD_ALIASES = {"datafile": "data file", "lineskip": "line skip", "byteskip": "byte skip", "centerings": "centers"}


def is_nrrd(data: bytes) -> bool:
    return bool(MAGIC.match(bytes(data[:16])))


@dataclass(frozen=True)
class NrrdHeader:
    """The parsed header: fields (lower-case names), key/value pairs, where attached data starts."""

    magic: str
    fields: dict[str, str]
    key_values: dict[str, str]
    data_files: tuple[str, ...]  # empty: data attached
    subdim: int | None
    data_start: int  # -1 when the header has no blank line (detached header without data)

    def as_dict(self) -> dict[str, str]:
        out = {"format": self.magic, **self.fields}
        out.update({f"{key} (key/value)": value for key, value in self.key_values.items()})
        return out


def parse_header(data: bytes, name: str) -> NrrdHeader:
    """Parse the text header of a NRRD file.

    Raises
    ------
    UnsupportedFileError
        Not NRRD, a header over 1 MB, or a malformed line.
    """
    view = bytes(data[: MAX_HEADER_BYTES + 2])
    match = re.search(rb"\r?\n\r?\n", view)
    if match:
        text_bytes, data_start = view[: match.start()], match.end()
    elif len(data) <= MAX_HEADER_BYTES:
        text_bytes, data_start = view, -1
    else:
        raise UnsupportedFileError(
            f"{name}: no end of the NRRD header within the first {MAX_HEADER_BYTES // 1024**2} MB.", source=name
        )
    try:
        text = text_bytes.decode("latin-1")
    except UnicodeDecodeError as err:  # pragma: no cover - latin-1 decodes every byte
        raise UnsupportedFileError(f"{name}: the NRRD header is not text.", source=name) from err
    lines = text.splitlines()
    magic = lines[0].strip()
    fields: dict[str, str] = {}
    key_values: dict[str, str] = {}
    files: list[str] = []
    subdim: int | None = None
    listing = False
    for line in lines[1:]:
        if listing:
            if line.strip():
                files.append(line.strip())
            continue
        if not line.strip() or line.startswith("#"):
            continue
        if ":=" in line:
            key, _, value = line.partition(":=")
            key_values[key] = value
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            raise UnsupportedFileError(
                f"{name}: NRRD header line '{line[:80]}' is neither 'field: value' nor 'key:=value'.", source=name
            )
        key = key.strip().lower()
        key = _FIELD_ALIASES.get(key, key)
        fields[key] = value.strip()
        if key == "data file":
            tokens = value.split()
            if tokens and tokens[0] == "LIST":
                listing = True
                subdim = int(tokens[1]) if len(tokens) > 1 else None
            elif len(tokens) >= 4 and "%" in tokens[0]:
                files.extend(_expand_pattern(tokens, name))
                subdim = int(tokens[4]) if len(tokens) > 4 else None
            else:
                files.append(value.strip())
    return NrrdHeader(magic, fields, key_values, tuple(files), subdim, data_start)


def _expand_pattern(tokens: Sequence[str], name: str) -> list[str]:
    """``data file: <format> <min> <max> <step>`` -> the file names."""
    fmt = tokens[0]
    if len(re.findall(r"%", fmt.replace("%%", ""))) != 1 or not re.search(r"%0?\d*d", fmt):
        raise UnsupportedFileError(f"{name}: data file pattern '{fmt}' must hold exactly one %d.", source=name)
    try:
        first, last, step = int(tokens[1]), int(tokens[2]), int(tokens[3])
    except ValueError as err:
        raise UnsupportedFileError(
            f"{name}: data file pattern numbers {tokens[1:4]} are not integers.", source=name
        ) from err
    if step == 0 or (last - first) / step < 0 or abs((last - first) // step) + 1 > MAX_DATA_FILES:
        raise UnsupportedFileError(
            f"{name}: data file pattern range {first}..{last} step {step} is invalid.", source=name
        )
    return [fmt % i for i in range(first, last + (1 if step > 0 else -1), step)]


def _numbers(text: str, name: str, field: str) -> list[float]:
    try:
        return [float(v) for v in re.split(r"[\s,]+", text.strip()) if v]
    except ValueError as err:
        raise UnsupportedFileError(
            f"{name}: NRRD field '{field}: {text}' is not a list of numbers.", source=name
        ) from err


def _vectors(text: str, name: str, field: str) -> list[list[float] | None]:
    out: list[list[float] | None] = []
    for token in re.findall(r"\([^)]*\)|none", text):
        out.append(None if token == "none" else _numbers(token[1:-1], name, field))
    return out


@dataclass(frozen=True)
class _Plan:
    sizes: tuple[int, ...]
    raw_dtype: np.dtype
    order: tuple[int, ...]  # axes of the stored array (fastest first) in the loader's order
    stored_shape: tuple[int, ...]  # (I, J, K[, T or components]) before dropping an alpha channel
    shape: tuple[int, ...]  # loader's output shape
    rgba: bool


def _geometry(hdr: NrrdHeader, sizes: tuple[int, ...], name: str) -> tuple[list[int], np.ndarray, list[str]]:
    """Spatial axes (in stored order), 4x4 affine for them (RAS) and warnings."""
    f = hdr.fields
    warnings: list[str] = []
    ndim = len(sizes)
    kinds = f.get("kinds", "").split() if "kinds" in f else []
    space = f.get("space", "").strip().lower()
    if space.endswith("-time"):
        space = space[: -len("-time")]
    if space in ("rast", "last", "lpst"):
        space = space[:3]
    signs = _SPACES.get(space)
    if "space directions" in f:
        vectors = _vectors(f["space directions"], name, "space directions")
        if len(vectors) != ndim:
            raise UnsupportedFileError(
                f"{name}: 'space directions' has {len(vectors)} entries for {ndim} axes.", source=name
            )
        spatial = [a for a, v in enumerate(vectors) if v is not None and any(c != 0 for c in v[:3])]
        columns = [np.array((vectors[a] or []) + [0.0] * 3)[:3] for a in spatial]
        if signs is None:
            warnings.append(
                f"NRRD space '{f.get('space', f.get('space dimension', ''))}' has no anatomical meaning; "
                "treated as LPS like ITK; check the orientation"
            )
            signs = _SPACES["lps"]
        origin_list = _numbers(f["space origin"].strip()[1:-1], name, "space origin") if "space origin" in f else []
        if "space origin" not in f:
            warnings.append("no 'space origin' in the header: origin set to 0")
        origin = np.array((origin_list + [0.0] * 3)[:3])
    else:
        if kinds:
            spatial = [a for a, k in enumerate(kinds) if k.lower() in ("domain", "space")]
        else:
            spatial = list(range(min(ndim, 3)))
        spacings = _numbers(f["spacings"], name, "spacings") if "spacings" in f else [math.nan] * ndim
        columns = []
        for a in spatial:
            step = spacings[a] if a < len(spacings) and math.isfinite(spacings[a]) and spacings[a] != 0 else 1.0
            column = np.zeros(3)
            column[len(columns)] = step
            columns.append(column)
        warnings.append("the NRRD header has no 'space directions': orientation unknown, treated as LPS like ITK")
        signs = _SPACES["lps"]
        origin = np.zeros(3)
    if len(spatial) not in (2, 3):
        raise UnsupportedFileError(
            f"{name}: {len(spatial)} spatial axes (sizes {list(sizes)}); only 2D and 3D images (+ time or colour) "
            "are supported.",
            source=name,
        )
    linear = np.zeros((3, 3))
    for col, column in enumerate(columns):
        linear[:, col] = column
    flip = np.array(signs)
    spatial_shape = [sizes[a] for a in spatial] + [1] * (3 - len(spatial))
    affine = complete_affine(flip[:, None] * linear, flip * origin, spatial_shape, name=name)
    return spatial, affine, warnings


def _plan(hdr: NrrdHeader, name: str, limits: Limits) -> tuple[_Plan, np.ndarray, list[str], bool]:
    f = hdr.fields
    for required in ("type", "dimension", "sizes", "encoding"):
        if required not in f:
            raise UnsupportedFileError(f"{name}: the NRRD header lacks the required field '{required}'.", source=name)
    type_name = " ".join(f["type"].lower().split())
    if type_name not in _TYPES:
        raise UnsupportedFileError(f"{name}: NRRD type '{f['type']}' is not supported.", source=name)
    raw_dtype = np.dtype(_TYPES[type_name])
    if raw_dtype.itemsize > 1:
        endian = f.get("endian", "").lower()
        if endian not in ("little", "big"):
            raise UnsupportedFileError(
                f"{name}: the NRRD header needs 'endian: little' or 'endian: big' for {f['type']} data.", source=name
            )
        raw_dtype = raw_dtype.newbyteorder("<" if endian == "little" else ">")
    try:
        ndim = int(f["dimension"])
        sizes = tuple(int(v) for v in f["sizes"].split())
    except ValueError as err:
        raise UnsupportedFileError(f"{name}: NRRD dimension/sizes are not integers.", source=name) from err
    if len(sizes) != ndim:
        raise UnsupportedFileError(f"{name}: 'sizes' lists {len(sizes)} values for dimension {ndim}.", source=name)
    check_declared_size(name, sizes, raw_dtype.itemsize, limits)
    spatial, affine, warnings = _geometry(hdr, sizes, name)
    kinds = [k.lower() for k in f.get("kinds", "").split()] or ["domain"] * ndim
    others = [a for a in range(ndim) if a not in spatial and sizes[a] > 1]
    ones = [a for a in range(ndim) if a not in spatial and sizes[a] == 1]
    if len(others) > 1:
        raise UnsupportedFileError(
            f"{name}: {len(others)} non-spatial axes of sizes {[sizes[a] for a in others]}; only one (time or "
            "colour) is supported.",
            source=name,
        )
    spatial_shape = tuple(sizes[a] for a in spatial) + (1,) * (3 - len(spatial))
    is_rgb = rgba = False
    extra: tuple[int, ...] = ()
    if others:
        axis = others[0]
        kind = kinds[axis] if axis < len(kinds) else ""
        n = sizes[axis]
        if n == 3 and raw_dtype == np.uint8 and kind not in ("time", "domain", "space"):
            is_rgb = True
        elif n == 4 and raw_dtype == np.uint8 and kind in _RGBA_KINDS:
            is_rgb = rgba = True
            warnings.append("RGBA colours: the alpha channel is dropped")
        elif kind in _VECTOR_KINDS or kind in _RGB_KINDS or kind in _RGBA_KINDS:
            raise UnsupportedFileError(
                f"{name}: a {n}-component {kind} image of {raw_dtype.name} (e.g. a displacement field) cannot be "
                "shown; only uint8 RGB colour and scalar images are supported. Save one component as a scalar image.",
                source=name,
            )
        else:
            extra = (n,)
    order = tuple(spatial + others + ones)
    shape = spatial_shape + extra + ((3,) if is_rgb else ())
    stored_shape = spatial_shape + ((sizes[others[0]],) if others else ())
    if raw_dtype.kind == "f" and raw_dtype.itemsize > 4:
        warnings.append(f"values stored as {raw_dtype.name} are loaded as float32")
    return _Plan(sizes, raw_dtype, order, stored_shape, shape, rgba), affine, warnings, is_rgb


def _skip_lines(data: bytes | memoryview, count: int, name: str) -> memoryview:
    view = memoryview(data)
    pos = 0
    for _ in range(count):
        nl = bytes(view[pos : pos + MAX_HEADER_BYTES]).find(b"\n")
        if nl < 0:
            raise UnsupportedFileError(f"{name}: 'line skip: {count}' skips past the end of the data.", source=name)
        pos += nl + 1
    return view[pos:]


def _decode_piece(
    data: bytes | memoryview, expected: int, hdr: NrrdHeader, raw_dtype: np.dtype, name: str
) -> bytes | bytearray | memoryview | np.ndarray:
    """One data file (or the attached data) decoded to ``expected`` bytes of raw values."""
    f = hdr.fields
    encoding = f["encoding"].lower()
    line_skip = int(f.get("line skip", "0"))
    byte_skip = int(f.get("byte skip", "0"))
    view = _skip_lines(data, line_skip, name) if line_skip > 0 else memoryview(data)
    if encoding == "raw":
        if byte_skip == -1:
            require_bytes(name, len(view), expected, what="the raw data")
            return view[len(view) - expected :]
        require_bytes(name, len(view) - max(byte_skip, 0), expected, what="the raw data")
        return view[max(byte_skip, 0) : max(byte_skip, 0) + expected]
    if byte_skip < 0:
        raise UnsupportedFileError(f"{name}: 'byte skip: -1' is only allowed with raw encoding.", source=name)
    if encoding in ("gzip", "gz"):
        out = inflate_capped(view, expected + byte_skip, name=name, what="gzip data")
        return memoryview(out)[byte_skip:]
    if encoding in ("bzip2", "bz2"):
        out = bunzip2_capped(view, expected + byte_skip, name=name, what="bzip2 data")
        return memoryview(out)[byte_skip:]
    if encoding in ("ascii", "text", "txt"):
        return text_values(view, expected // raw_dtype.itemsize, raw_dtype, name)
    if encoding == "hex":
        try:
            raw = bytes.fromhex(re.sub(rb"\s+", b"", bytes(view)).decode("ascii"))
        except ValueError as err:
            raise UnsupportedFileError(f"{name}: the hex data is damaged.", source=name) from err
        require_bytes(name, len(raw), expected, what="the hex data")
        return raw[:expected]
    raise UnsupportedFileError(
        f"{name}: NRRD encoding '{f['encoding']}' is not supported (raw, gzip, bzip2, ascii, hex are).", source=name
    )


def read_nrrd(source: Source, upload: Sequence[Source], limits: Limits) -> tuple[Series, list[Source]]:
    """A Series for a NRRD file, with the uploaded data files it uses.

    Parameters
    ----------
    source : Source
        The ``.nrrd`` or ``.nhdr``.
    upload : sequence of Source
        Every file of the upload; detached data files are looked up only here.

    Returns
    -------
    series : Series
        Pixels are decoded on load.
    data_sources : list of Source
        The detached data files (empty for attached data).

    Raises
    ------
    UnsupportedFileError, LimitError, SeriesGeometryError
        Damaged header, a data file outside the upload, over a cap, broken geometry.
    """
    name = source.name
    hdr = parse_header(source.as_bytes(), name)
    plan, affine, warnings, is_rgb = _plan(hdr, name, limits)
    nbytes = math.prod(plan.sizes) * plan.raw_dtype.itemsize
    if hdr.data_files:
        pieces = [resolve_data_file(ref, source, upload, field="data file") for ref in hdr.data_files]
        if nbytes % len(pieces):
            raise UnsupportedFileError(
                f"{name}: {len(pieces)} data files cannot evenly hold {nbytes:,} bytes.", source=name
            )
    else:
        if hdr.data_start < 0:
            raise UnsupportedFileError(
                f"{name}: a NRRD header without data and without a 'data file' field. Upload the .nrrd with its "
                "data, or the .nhdr together with its data file.",
                source=name,
            )
        pieces = []
    encoding = hdr.fields["encoding"].lower()
    per_piece = nbytes // max(len(pieces), 1)
    if encoding == "raw":  # the only encoding whose size is known without decoding
        skip = max(int(hdr.fields.get("byte skip", "0")), 0)
        for piece in pieces or [source]:
            available = len(piece.as_bytes()) - (hdr.data_start if piece is source else 0) - skip
            require_bytes(piece.name, available, per_piece, what="the raw data")
    data_start = max(hdr.data_start, 0)

    def decode() -> np.ndarray:
        if pieces:
            decoded = [_decode_piece(p.as_bytes(), per_piece, hdr, plan.raw_dtype, p.name) for p in pieces]
        else:
            decoded = [_decode_piece(memoryview(source.as_bytes())[data_start:], nbytes, hdr, plan.raw_dtype, name)]
        if len(decoded) == 1 and isinstance(decoded[0], np.ndarray):
            flat = decoded[0]
        elif any(isinstance(d, np.ndarray) for d in decoded):
            flat = np.concatenate([np.asarray(d).reshape(-1) for d in decoded])
        else:
            buffer = decoded[0] if len(decoded) == 1 else b"".join(bytes(d) for d in decoded)
            flat = np.frombuffer(buffer, dtype=plan.raw_dtype, count=math.prod(plan.sizes))
        stored = flat.reshape(plan.sizes[::-1]).transpose()  # NRRD lists the fastest axis first
        array = stored.transpose(plan.order).reshape(plan.stored_shape)
        if plan.rgba:
            array = array[..., :3]
        return to_value_dtype(array)

    series = make_series(
        source=source,
        kind="nrrd",
        shape=plan.shape,
        affine=affine,
        dtype=np.uint8 if is_rgb else value_dtype(plan.raw_dtype),
        decode=decode,
        headers=(hdr.as_dict(),),
        sources=pieces,
        warnings=warnings,
        is_rgb=is_rgb,
    )
    return series, pieces
