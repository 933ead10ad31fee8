"""The scan's fast path: the header attributes of a plain image file, read without pydicom.

Reading a 300-slice CT series with ``pydicom.dcmread(stop_before_pixels=True)`` and
then asking the Dataset for the ~30 attributes a scan needs costs about 0.7 ms per
file, most of it in pydicom converting raw elements on every access. Almost every
file of a real series is plain: a Part-10 file in (explicit or implicit VR) little
endian, one frame, no functional groups, values that are ordinary ASCII numbers and
UIDs. For such a file :func:`quick_image` walks the elements with
:func:`struct.unpack_from`, keeps the raw bytes of the attributes it needs and
converts them with pydicom's rules (PS3.5 6.2: trailing spaces and NULs dropped,
backslash separates values, DS/IS are decimal strings), in about a tenth of the time.

Everything that is not plain makes it return None, and the caller reads that file
with pydicom exactly as before, so results never depend on which path read a file
(``tests/test_dicom_speed_paths.py`` compares the two): a structure pydicom would
have to guess at (a truncated element, an unknown or unexpected VR, tags out of
order, a sequence that does not close), a value that is not a clean number or
single ASCII string, a file the scan would skip or refuse (no pixels, localizer,
DICOMDIR, too many voxels), and every file that needs more than the top-level
attributes (enhanced multi-frame, classic multi-frame, mosaics, SEG, RT Dose,
Philips and UIH private tags, deflated or big-endian encodings).
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from core.dicom_headers import (
    _EXPLICIT_VRS,
    _LONG_VRS,
    DICOMDIR_SOP_CLASS,
    LOCALIZER_TYPES,
    SEGMENTATION_SOP_CLASS,
    Frame,
    dicom_time_seconds,
    has_pixel_data,
    has_preamble,
)
from core.dicom_pixels import PixelFormat
from core.sources import SourceData

__all__ = ["QuickImage", "quick_image", "quick_path_allowed"]


@dataclass(frozen=True)
class QuickImage:
    """What the scan needs of one plain single-frame image file.

    Each field equals what the pydicom path computes from the file's Dataset:
    ``transfer_syntax`` (:func:`core.dicom_headers.transfer_syntax`), ``fmt``
    (:func:`core.dicom_pixels.pixel_format`), ``frame`` (the one
    :func:`core.dicom_headers.classic_frames` record), ``instance_key`` and
    ``series_key`` (the identity and grouping keys of :mod:`core.dicom_series`).
    """

    transfer_syntax: UID
    fmt: PixelFormat
    rows: int
    columns: int
    frame: Frame
    instance_key: tuple[Any, ...]
    series_key: tuple[Any, ...]


class _Unusual(Exception):
    """The file is not plain: the pydicom path reads it."""


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


# The attributes the scan reads, with the VR pydicom would convert them with
# (an explicit VR in the file must be this one, or the file is not plain).
_KEYWORDS = (
    "ImageType", "SOPClassUID", "SOPInstanceUID", "AcquisitionTime", "ContentTime", "Manufacturer",
    "SeriesDescription", "ProtocolName", "SliceThickness", "EchoNumbers", "SpacingBetweenSlices", "TriggerTime",
    "SeriesInstanceUID", "StudyInstanceUID", "SeriesNumber", "AcquisitionNumber", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "TemporalPositionIdentifier", "SamplesPerPixel",
    "PhotometricInterpretation", "NumberOfFrames", "Rows", "Columns", "PixelSpacing", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "RescaleIntercept", "RescaleSlope",
)  # fmt: skip
_T = {keyword: _tag(keyword) for keyword in _KEYWORDS}
_WANTED: dict[int, bytes] = {tag: str(dictionary_VR(tag)).encode() for tag in _T.values()}
# Attributes whose mere presence means the file needs the pydicom path (functional
# groups, DICOMDIR records, SEG segments, RT Dose scaling).
_NOT_PLAIN = frozenset(
    _tag(keyword)
    for keyword in (
        "DirectoryRecordSequence",
        "PerFrameFunctionalGroupsSequence",
        "SharedFunctionalGroupsSequence",
        "SegmentSequence",
        "DoseGridScaling",
    )
)
# pydicom's stop_before_pixels stops at the first of these.
_PIXEL_TAGS = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009))
_SHORT_VRS = frozenset(_EXPLICIT_VRS - _LONG_VRS)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD
_MAX_DEPTH = 16

_EXPLICIT_HEADER = struct.Struct("<HH2sH").unpack_from
_IMPLICIT_HEADER = struct.Struct("<HHI").unpack_from
_U32 = struct.Struct("<I").unpack_from
_U16 = struct.Struct("<H").unpack_from

_PRINTABLE = re.compile(rb"[\x20-\x7e]*\Z").match
# Decimal and integer strings (PS3.5 Table 6.2-1), one or several separated by backslashes.
_DS = rb" *[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)? *"
_IS = rb" *[+-]?\d+ *"
_DS_VALUES = re.compile(_DS + rb"(?:\\" + _DS + rb")*\Z").match
_IS_VALUES = re.compile(_IS + rb"(?:\\" + _IS + rb")*\Z").match
_IS_ITEM = re.compile(_IS.decode() + r"\Z").match


def quick_path_allowed() -> bool:
    """Whether pydicom's settings are the defaults the fast path reproduces.

    Options that change how values convert (numpy or Decimal numbers, datetime
    objects, None for empty text, raising on invalid values) or replaced reading
    hooks send every file through pydicom.
    """
    from pydicom import config, hooks

    return not (
        config.use_DS_numpy
        or config.use_IS_numpy
        or config.use_DS_decimal
        or config.datetime_conversion
        or config.use_none_as_empty_text_VR_value
        or config.settings.reading_validation_mode == config.RAISE
        or hooks.hooks.raw_element_vr is not hooks.raw_element_vr
        or hooks.hooks.raw_element_value is not hooks.raw_element_value
    )


def quick_image(data: SourceData, file: int, max_voxels: int) -> QuickImage | None:
    """Read a plain single-frame image file without pydicom.

    Parameters
    ----------
    data : bytes
        The whole file.
    file : int
        Index of the file in the scan (stored in the frame record).
    max_voxels : int
        Files that declare more values than this go to the pydicom path (which refuses them).

    Returns
    -------
    QuickImage or None
        None when the file is not plain (see the module notes): read it with pydicom.
    """
    try:
        return _quick_image(data, file, max_voxels)
    except (_Unusual, struct.error, IndexError, ValueError, OverflowError):
        # Not an error of the file: the careful pydicom path reads it and reports what is wrong.
        return None


# --- walking the elements -----------------------------------------------------


@functools.lru_cache(maxsize=64)
def _transfer_syntax(raw: bytes) -> tuple[UID, bool] | None:
    """(UID, implicit VR) for the encodings the fast path walks, or None.

    Encapsulated (compressed) transfer syntaxes encode the dataset in explicit VR
    little endian (PS3.5 A.4); deflated and big endian ones are left to pydicom.
    """
    text = raw.rstrip(b" \x00")
    found: tuple[UID, bool] | None = None
    if _PRINTABLE(text) and b"\\" not in text:
        uid = UID(text.decode("ascii"))
        if uid == ImplicitVRLittleEndian:
            found = (uid, True)
        elif uid == ExplicitVRLittleEndian or (
            uid.is_transfer_syntax and uid.is_compressed and uid.is_little_endian and not uid.is_deflated
        ):
            found = (uid, False)
    return found


def _meta(data: SourceData) -> tuple[int, bytes, bytes]:
    """Walk the file meta group: (dataset start, transfer syntax bytes, media storage SOP class bytes)."""
    pos, n = 132, len(data)
    syntax, media_class = b"", b""
    while True:
        if pos + 8 > n:
            raise _Unusual
        group, element, vr, length = _EXPLICIT_HEADER(data, pos)
        if group != 0x0002:
            break
        if vr in _SHORT_VRS:
            start = pos + 8
        elif vr in _LONG_VRS:
            length, start = _U32(data, pos + 8)[0], pos + 12
        else:
            raise _Unusual
        end = start + length
        if length == _UNDEFINED or end > n:
            raise _Unusual
        if element == 0x0010:
            syntax = data[start:end]
        elif element == 0x0002:
            media_class = data[start:end]
        pos = end
    if group == 0x0000 or not syntax:
        raise _Unusual  # a command group, or no transfer syntax: pydicom guesses
    return pos, syntax, media_class


def _is_sequence(tag: int, vr: bytes | None, data: SourceData, start: int) -> bool:
    """Whether an element of undefined length is a sequence, as pydicom decides it."""
    if vr is not None:
        return vr == b"SQ"
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        # Unknown (private) tag: pydicom reads a sequence when an item follows.
        return data[start : start + 4] == b"\xfe\xff\x00\xe0"


def _walk_sequence(data: SourceData, pos: int, explicit: bool, depth: int) -> int:
    """Walk a sequence of undefined length from its first item; returns the position after its delimiter."""
    if depth > _MAX_DEPTH:
        raise _Unusual
    n = len(data)
    while True:
        if pos + 8 > n:
            raise _Unusual
        group, element, length = _IMPLICIT_HEADER(data, pos)
        pos += 8
        if group != 0xFFFE:
            raise _Unusual
        if element == _SEQUENCE_END:
            if length:
                raise _Unusual
            return pos
        if element != _ITEM:
            raise _Unusual
        if length == _UNDEFINED:
            pos = _walk_item(data, pos, None, explicit, depth)
        else:
            end = pos + length
            if end > n or _walk_item(data, pos, end, explicit, depth) != end:
                raise _Unusual
            pos = end


def _walk_item(data: SourceData, pos: int, end: int | None, explicit: bool, depth: int) -> int:
    """Walk the elements of one sequence item (pydicom parses these while reading the file)."""
    limit = len(data) if end is None else end
    while True:
        if end is not None and pos == end:
            return pos
        if pos + 8 > limit:
            raise _Unusual
        if explicit:
            group, element, vr, length = _EXPLICIT_HEADER(data, pos)
        else:
            group, element, length = _IMPLICIT_HEADER(data, pos)
            vr = None
        if group == 0xFFFE:
            if end is None and element == _ITEM_END:
                return pos + 8
            raise _Unusual
        if vr is None:
            start = pos + 8
        elif vr in _SHORT_VRS:
            start = pos + 8
        elif vr in _LONG_VRS:
            length, start = _U32(data, pos + 8)[0], pos + 12
        else:
            raise _Unusual  # not a VR (pydicom would switch this item to implicit VR)
        if length == _UNDEFINED:
            if not _is_sequence((group << 16) | element, vr, data, start):
                raise _Unusual
            pos = _walk_sequence(data, start, explicit, depth + 1)
        else:
            pos = start + length
            if pos > limit:
                raise _Unusual


def _top_level(data: SourceData, pos: int, implicit: bool) -> tuple[dict[int, bytes], bool]:
    """The raw values of the wanted top-level attributes, up to the pixel data.

    Returns
    -------
    values : dict
        Tag -> value bytes.
    at_pixels : bool
        The walk stopped at a (7FE0,0010/0008/0009) pixel data element.
    """
    n = len(data)
    values: dict[int, bytes] = {}
    wanted = _WANTED
    previous = -1
    if implicit and pos + 6 <= n and 0x40 < data[pos + 4] < 0x5B and 0x40 < data[pos + 5] < 0x5B:
        raise _Unusual  # looks explicit: pydicom would switch encodings
    while True:
        if pos + 8 > n:
            if pos == n:
                return values, False
            raise _Unusual
        if implicit:
            group, element, length = _IMPLICIT_HEADER(data, pos)
            vr = None
            start = pos + 8
        else:
            group, element, vr, length = _EXPLICIT_HEADER(data, pos)
            start = pos + 8
        tag = (group << 16) | element
        if tag in _PIXEL_TAGS:
            return values, True
        if tag <= previous or group == 0xFFFE or tag in _NOT_PLAIN:
            raise _Unusual
        if vr is not None and vr not in _SHORT_VRS:
            if vr not in _LONG_VRS:
                raise _Unusual
            length, start = _U32(data, pos + 8)[0], pos + 12
        if length == _UNDEFINED:
            if tag in wanted or not _is_sequence(tag, vr, data, start):
                raise _Unusual
            pos = _walk_sequence(data, start, not implicit, 1)
        else:
            pos = start + length
            if pos > n:
                raise _Unusual
            if tag in wanted:
                if vr is not None and vr != wanted[tag]:
                    raise _Unusual
                values[tag] = data[start:pos]
        previous = tag


# --- values as pydicom converts them ---------------------------------------------


def _text(raw: bytes | None) -> str | None:
    """A single-valued CS/LO/SH/TM/UI value; None when absent. pydicom drops trailing spaces and NULs."""
    if raw is None:
        return None
    value = raw.rstrip(b" \x00")
    if b"\\" in value or not _PRINTABLE(value):
        raise _Unusual
    return value.decode("ascii")


def _uid(raw: bytes | None) -> str:
    """A UI value as ``str(ds.get(keyword, ""))`` gives it (pydicom's UID strips spaces)."""
    text = _text(raw)
    return "" if text is None else text.strip()


def _numbers(raw: bytes | None, integers: bool = False) -> list[float] | None:
    """A DS/IS value as :func:`core.dicom_headers.floats` returns it: None when absent or empty."""
    if raw is None:
        return None
    text = raw.rstrip(b" \x00")
    if (_IS_VALUES if integers else _DS_VALUES)(text) is None:
        if text.strip(b" "):
            raise _Unusual  # not numbers: pydicom's path words the error (or ignores the value)
        return None
    numbers = [float(text)] if b"\\" not in text else [float(item) for item in text.split(b"\\")]
    for value in numbers:
        if value - value != 0:  # inf (a huge exponent) or nan
            raise _Unusual
    return numbers


def _first(raw: bytes | None, integers: bool = False) -> float | None:
    numbers = _numbers(raw, integers)
    return numbers[0] if numbers else None


def _exactly(raw: bytes | None, count: int) -> list[float] | None:
    numbers = _numbers(raw)
    if numbers is not None and len(numbers) != count:
        raise _Unusual
    return numbers


def _integer_text(raw: bytes | None) -> str:
    """An IS value as ``str(ds.get(keyword, ""))`` gives it: the number as written, without spaces."""
    if raw is None:
        return ""
    if not raw:
        return "None"  # pydicom's value of an empty IS is None
    text = _text(raw) or ""
    if not text.strip(" "):
        return ""
    if not _IS_ITEM(text):
        raise _Unusual
    return text.strip(" ")


def _us(raw: bytes | None) -> int | None:
    """A single US value; None when absent or empty."""
    if raw is None or not raw:
        return None
    if len(raw) != 2:
        raise _Unusual
    return int(_U16(raw)[0])


# --- the record -------------------------------------------------------------------


def _quick_image(data: SourceData, file: int, max_voxels: int) -> QuickImage | None:
    if not has_preamble(data):
        return None
    start, syntax_raw, media_class_raw = _meta(data)
    syntax = _transfer_syntax(syntax_raw)
    if syntax is None:
        return None
    uid, implicit = syntax
    values, at_pixels = _top_level(data, start, implicit)
    get = values.get
    t = _T

    # skip_reason(): every reason to skip sends the file to the pydicom path, which words it.
    sop_class = _uid(get(t["SOPClassUID"])) or _uid(media_class_raw)
    if sop_class in (DICOMDIR_SOP_CLASS, SEGMENTATION_SOP_CLASS):
        return None
    if t["Rows"] not in values or t["Columns"] not in values or not (at_pixels or has_pixel_data(data)):
        return None
    image_type_raw = get(t["ImageType"])
    image_type: tuple[str, ...] = ()
    if image_type_raw is not None:
        text = image_type_raw.rstrip(b" \x00")
        if not _PRINTABLE(text):
            raise _Unusual
        if text:
            image_type = tuple(v.strip().upper() for v in text.decode("ascii").split("\\"))
    if set(image_type) & LOCALIZER_TYPES or "MOSAIC" in image_type:
        return None
    description = f"{_text(get(t['SeriesDescription'])) or ''} {_text(get(t['ProtocolName'])) or ''}".lower()
    if "localizer" in description or "scout" in description:
        return None
    manufacturer = (_text(get(t["Manufacturer"])) or "").upper()
    if "PHILIPS" in manufacturer or manufacturer.strip().startswith("UIH") or "UNITED IMAGING" in manufacturer:
        return None  # private scale slope / UIH grids: read with pydicom

    # pixel_format()
    samples = _us(get(t["SamplesPerPixel"])) or 1
    bits_allocated = _us(get(t["BitsAllocated"]))
    photometric = _text(get(t["PhotometricInterpretation"]))
    fmt = PixelFormat(
        samples=samples,
        bits_allocated=bits_allocated or 16,
        bits_stored=_us(get(t["BitsStored"])) or bits_allocated or 16,
        signed=(_us(get(t["PixelRepresentation"])) or 0) == 1,
        photometric=(photometric or "MONOCHROME2").strip().upper(),
        float_data=False,  # stop_before_pixels never reads (7FE0,0008/0009)
    )

    # _describe_frames(): one frame, within the limits.
    rows, columns = _us(get(t["Rows"])), _us(get(t["Columns"]))
    if not rows or not columns:
        return None
    declared_frames = _first(get(t["NumberOfFrames"]), integers=True)
    count = int(declared_frames) if declared_frames is not None else None
    if (count if count and count > 0 else 1) != 1 or rows * columns * samples > max_voxels:
        return None

    # classic_frames() of a single-frame file
    position = _exactly(get(t["ImagePositionPatient"]), 3)
    orientation = _exactly(get(t["ImageOrientationPatient"]), 6)
    slope = _first(get(t["RescaleSlope"]))
    intercept = _first(get(t["RescaleIntercept"]))
    instance_value = _first(get(t["InstanceNumber"]), integers=True)
    instance = int(instance_value) if instance_value is not None else None
    temporal: dict[str, Any] = {}
    for name, keyword, integers in (
        ("temporal_position", "TemporalPositionIdentifier", True),
        ("acquisition_number", "AcquisitionNumber", True),
        ("trigger_time", "TriggerTime", False),
    ):
        value = _first(get(t[keyword]), integers)
        if value is not None:
            temporal[name] = value
    for name, keyword in (("acquisition_time", "AcquisitionTime"), ("content_time", "ContentTime")):
        seconds = dicom_time_seconds(_text(get(t[keyword])) or "")
        if seconds is not None:
            temporal[name] = seconds
    if instance is not None:
        temporal["instance_number"] = instance
    spacing = _exactly(get(t["PixelSpacing"]), 2)
    sop_uid = _uid(get(t["SOPInstanceUID"]))
    frame = Frame(
        file=file,
        index=None,
        position=np.array(position) if position else None,
        orientation=np.array(orientation) if orientation else None,
        pixel_spacing=None if not spacing or spacing[0] <= 0 or spacing[1] <= 0 else (spacing[0], spacing[1]),
        thickness=_first(get(t["SliceThickness"])),
        slope=slope if slope else 1.0,
        intercept=intercept if intercept is not None else 0.0,
        temporal=temporal,
        split=(_first(get(t["EchoNumbers"]), integers=True), image_type),
        instance_number=instance,
        sop_uid=sop_uid,
        slice_spacing=_first(get(t["SpacingBetweenSlices"])),
        value_per_display=1.0,
    )

    # _instance_key() and _series_key()
    instance_key: tuple[Any, ...] = ()
    if sop_uid:
        located = tuple(round(v, 2) for v in position) if position else ()
        instance_key = (sop_uid, located, _integer_text(get(t["InstanceNumber"])))
    series_uid = _uid(get(t["SeriesInstanceUID"]))
    if series_uid:
        series_key: tuple[Any, ...] = (series_uid,)
    else:
        # No UID (stripped exports): what names a series in a study, as _series_key() builds it.
        series_key = (
            "",
            _uid(get(t["StudyInstanceUID"])),
            _integer_text(get(t["SeriesNumber"])),
            _text(get(t["SeriesDescription"])) or "",
        )
    return QuickImage(
        transfer_syntax=uid,
        fmt=fmt,
        rows=rows,
        columns=columns,
        frame=frame,
        instance_key=instance_key,
        series_key=series_key,
    )
