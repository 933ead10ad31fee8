"""Reading DICOM headers (no pixels) and turning them into per-frame records.

A :class:`Frame` is one 2D image: a single-frame file, or one frame of a
multi-frame file. It carries what slice assembly needs (position, orientation,
spacing, rescale, keys for time ordering and for splitting a series) so the
assembly in :mod:`core.dicom_series` never looks at a pydicom Dataset again.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from core.errors import LimitError, UnsupportedFileError
from core.sources import DEFAULT_LIMITS, Limits, Source

# Exceptions pydicom raises on damaged or hostile files (truncated elements, bad
# lengths, nested sequences 100k deep, undecodable strings). They become a Problem
# for that file, with the reason, never a crash of the whole scan.
READ_ERRORS: tuple[type[BaseException], ...] = (
    InvalidDicomError,
    EOFError,
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    NotImplementedError,
    UnicodeError,
    RecursionError,
    struct.error,
)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

# Values of (0008,0008) Image Type that mark a localizer / scout.
LOCALIZER_TYPES = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVEY"}


def has_preamble(data: bytes) -> bool:
    """Part-10 file: 128-byte preamble followed by "DICM"."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_header(source: Source, limits: Limits = DEFAULT_LIMITS) -> Dataset:
    """Parse a file's header without its pixel data.

    Parameters
    ----------
    source : Source
        Part-10 bytes, or a bare dataset without preamble (old ACR-NEMA style files).
    limits : Limits
        A deflated file is inflated (and discarded) under these caps before pydicom
        reads it (see :func:`check_deflated_size`).

    Returns
    -------
    Dataset
        Elements up to (7FE0,0010); values over 64 KB are read on access from the
        in-memory bytes (``defer_size``).

    Raises
    ------
    UnsupportedFileError
        Not DICOM, or damaged.
    LimitError
        A deflated dataset that inflates beyond the caps.
    """
    check_deflated_size(source, limits)
    try:
        return pydicom.dcmread(
            io.BytesIO(source.data),
            stop_before_pixels=True,
            defer_size="64 KB",
            force=not has_preamble(source.data),
        )
    except READ_ERRORS as err:
        raise UnsupportedFileError(
            f"{source.name}: not a readable DICOM file ({type(err).__name__}: {err}). "
            "The file is damaged or not DICOM; export it again from the scanner or PACS.",
            source=source.name,
        ) from err


# VRs whose explicit-VR length field has 4 bytes (PS3.5 Table 7.1-1).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_DEFLATED_DATASET = "1.2.840.10008.1.2.1.99"
_INFLATE_CHUNK = 1024**2


def _meta_transfer_syntax(data: bytes) -> tuple[str, int] | None:
    """The file meta's transfer syntax and where the dataset starts, or None when the meta cannot be walked.

    Walks the group 0002 elements (always explicit VR little endian, PS3.10 7.1)
    without pydicom, so nothing is inflated yet.
    """
    pos, uid = 132, ""
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            return uid, pos
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                return None
            length, head = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, head = struct.unpack_from("<H", data, pos + 6)[0], 8
        if element == 0x0010:
            uid = data[pos + head : pos + head + length].decode("ascii", "replace").strip("\x00 ")
        pos += head + length
    return None


def check_deflated_size(source: Source, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse a Deflated Explicit VR Little Endian file whose dataset inflates beyond the caps.

    pydicom inflates the whole dataset, pixels included, in one ``zlib.decompress``
    call with no limit, even when asked to stop before the pixels: a 64 kB file can
    become gigabytes. The stream is inflated here first, in bounded chunks that are
    counted and dropped, and refused past ``max_compression_ratio`` times the file's
    size (at least 1 MB) or ``max_total_bytes``, like a zip member.

    Raises
    ------
    LimitError
        The dataset inflates beyond the cap (a decompression bomb).
    """
    data = source.data
    if not has_preamble(data):
        return
    found = _meta_transfer_syntax(data)
    if found is None or found[0] != _DEFLATED_DATASET:
        return
    cap = int(min(limits.max_total_bytes, max(len(data) * limits.max_compression_ratio, 1024**2)))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    view = memoryview(data)[found[1] :]
    total = 0
    try:
        for start in range(0, len(view), _INFLATE_CHUNK):
            piece = inflater.decompress(view[start : start + _INFLATE_CHUNK], _INFLATE_CHUNK)
            while True:
                total += len(piece)
                if total > cap:
                    raise LimitError(
                        f"{source.name}: the deflated DICOM dataset inflates to more than {cap:,} bytes, over "
                        f"{limits.max_compression_ratio:.0f} times the file's {len(data):,} bytes (a decompression "
                        "bomb?). Save the file with an uncompressed transfer syntax and upload it again.",
                        source=source.name,
                    )
                if not inflater.unconsumed_tail:
                    break
                piece = inflater.decompress(inflater.unconsumed_tail, _INFLATE_CHUNK)
            if inflater.eof:
                break
    except zlib.error:
        return  # damaged stream: pydicom's own reading reports it


def transfer_syntax(ds: Dataset) -> UID:
    """The transfer syntax, inferred from the encoding when the file has no meta header."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return UID(str(uid))
    if ds.is_little_endian is False:
        return ExplicitVRBigEndian
    if ds.is_implicit_VR:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian


def has_pixel_data(data: bytes) -> bool:
    """Whether a (7FE0,0010/0008/0009) pixel data tag occurs in the bytes.

    The header is read with ``stop_before_pixels``, so the parsed dataset cannot
    tell. A stray match inside another value only delays the error to loading.
    """
    return any(
        tag in data
        for tag in (
            b"\xe0\x7f\x10\x00",  # (7FE0,0010) little endian
            b"\x7f\xe0\x00\x10",  # big endian
            b"\xe0\x7f\x08\x00",  # Float Pixel Data
            b"\xe0\x7f\x09\x00",  # Double Float Pixel Data
        )
    )


def skip_reason(ds: Dataset, data: bytes) -> str:
    """Why a file holds no image volume ("" when it does).

    DICOMDIR, structured reports, presentation states, RT structure sets, key
    objects and raw data have no (0028,0010) Rows / pixel data; localizers are
    images but not part of any volume a user wants (dcm2niix ``-i y``).
    """
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    sop_name = UID(sop_class).name if sop_class else "unknown SOP class"
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return "DICOMDIR (a directory of the media, no image)"
    # Deflated files compress the pixel data tag too, so the byte search cannot see it.
    uid = transfer_syntax(ds)
    pixels_hidden = uid.is_transfer_syntax and uid.is_deflated
    if "Rows" not in ds or "Columns" not in ds or not (pixels_hidden or has_pixel_data(data)):
        return f"not an image: {sop_name} ({sop_class or 'no (0008,0016)'}) has no pixel data"
    if image_type_tokens(ds) & LOCALIZER_TYPES:
        return "localizer / scout image ((0008,0008) Image Type " + "\\".join(image_type(ds)) + ")"
    description = f"{ds.get('SeriesDescription', '')} {ds.get('ProtocolName', '')}".lower()
    if "localizer" in description or "scout" in description:
        return "localizer / scout image (series description says so)"
    return ""


def image_type(ds: Dataset) -> tuple[str, ...]:
    value = ds.get("ImageType", None)
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v.strip().upper() for v in value.split("\\"))
    return tuple(str(v).strip().upper() for v in value)


def image_type_tokens(ds: Dataset) -> set[str]:
    return set(image_type(ds))


def floats(ds: Dataset, keyword: str, count: int | None = None) -> list[float] | None:
    """A numeric (multi-)value as floats; None when absent or empty.

    Raises
    ------
    UnsupportedFileError
        The value is present but not numbers, or has the wrong multiplicity.
    """
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None or value == "" or (hasattr(value, "__len__") and not isinstance(value, str) and len(value) == 0):
        return None
    items = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError) as err:
        # The text itself is not repeated: it may be patient data or markup.
        raise UnsupportedFileError(
            f"({ds[keyword].tag.group:04X},{ds[keyword].tag.element:04X}) {ds[keyword].name} holds "
            f"{len(items)} value(s) that are not numbers; the header is damaged."
        ) from err
    if count is not None and len(numbers) != count:
        raise UnsupportedFileError(f"{ds[keyword].name} has {len(numbers)} values, expected {count}: {numbers}")
    if not all(math.isfinite(v) for v in numbers):
        raise UnsupportedFileError(f"{ds[keyword].name} has non-finite values: {numbers}")
    return numbers


def first_float(ds: Dataset, keyword: str) -> float | None:
    values = floats(ds, keyword)
    return values[0] if values else None


def integer(ds: Dataset, keyword: str) -> int | None:
    value = first_float(ds, keyword)
    return int(value) if value is not None else None


def dicom_time_seconds(value: Any) -> float | None:
    """TM "HHMMSS.ffffff" (or DT "YYYYMMDDHHMMSS.ffffff") to seconds, for ordering only."""
    text = str(value or "").strip()
    if not text:
        return None
    try:
        if len(text.split(".")[0]) > 6:  # DT: keep the date so midnight does not reorder
            main, _, frac = text.partition(".")
            main = main[:14].ljust(14, "0")
            stamp = datetime.strptime(main, "%Y%m%d%H%M%S").timestamp()
            return stamp + (float("0." + frac[:6]) if frac[:6].isdigit() else 0.0)
        main, _, frac = text.partition(".")
        main = main.replace(":", "").ljust(6, "0")
        seconds = int(main[0:2]) * 3600 + int(main[2:4]) * 60 + int(main[4:6])
        return seconds + (float("0." + frac) if frac.isdigit() else 0.0)
    except ValueError:
        return None


@dataclass
class Frame:
    """One 2D image of the upload and everything assembly needs to place it.

    Attributes
    ----------
    file : int
        Index of the file in the scan's list.
    index : int or None
        0-based frame number inside a multi-frame file; None for a single-frame file.
    position : (3,) ndarray or None
        Image Position (Patient), LPS mm.
    orientation : (6,) ndarray or None
        Image Orientation (Patient).
    pixel_spacing : (row spacing, column spacing) in mm, or None.
    thickness : float or None
        Slice Thickness, mm.
    slope, intercept : float
        Modality rescale of this frame.
    temporal : dict
        Candidate keys for ordering images at one position in time.
    split : tuple
        Attributes that must be equal inside one volume (echo, frame type, stack).
    """

    file: int
    index: int | None
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    slope: float
    intercept: float
    temporal: dict[str, Any] = field(default_factory=dict)
    split: tuple[Any, ...] = ()
    instance_number: int | None = None
    sop_uid: str = ""
    slice_spacing: float | None = None

    @property
    def has_geometry(self) -> bool:
        return self.position is not None and self.orientation is not None


def number_of_frames(ds: Dataset) -> int:
    value = integer(ds, "NumberOfFrames")
    return value if value and value > 0 else 1


def is_enhanced(ds: Dataset) -> bool:
    """Multi-frame with functional groups (enhanced CT/MR/PET/XA, legacy-converted, ...)."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _group_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """Functional group macro ``sequence`` for one frame: per-frame first, then shared."""
    for container in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(container)
        if not groups:
            continue
        if container == "PerFrameFunctionalGroupsSequence":
            if frame >= len(groups):
                continue
            item = groups[frame]
        else:
            item = groups[0]
        inner = item.get(sequence)
        if inner:
            return inner[0]
    return None


def rescale_of(ds: Dataset) -> tuple[float, float]:
    """(0028,1053) Rescale Slope and (0028,1052) Rescale Intercept, 1 and 0 when absent."""
    slope = first_float(ds, "RescaleSlope")
    intercept = first_float(ds, "RescaleIntercept")
    # A zero slope would erase the image; writers that put 0 mean "no rescale".
    return (slope if slope else 1.0), (intercept if intercept is not None else 0.0)


def _spacing(item: Dataset | None) -> tuple[float, float] | None:
    if item is None:
        return None
    values = floats(item, "PixelSpacing", 2)
    return (values[0], values[1]) if values else None


def _geometry(item_ds: Dataset | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    if item_ds is None:
        return None, None
    ipp = floats(item_ds, "ImagePositionPatient", 3)
    iop = floats(item_ds, "ImageOrientationPatient", 6)
    return (np.array(ipp) if ipp else None), (np.array(iop) if iop else None)


def classic_temporal(ds: Dataset) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for name, keyword in (
        ("temporal_position", "TemporalPositionIdentifier"),
        ("acquisition_number", "AcquisitionNumber"),
        ("trigger_time", "TriggerTime"),
    ):
        try:
            value = first_float(ds, keyword)
        except UnsupportedFileError:
            value = None
        if value is not None:
            keys[name] = value
    for name, keyword in (("acquisition_time", "AcquisitionTime"), ("content_time", "ContentTime")):
        seconds = dicom_time_seconds(ds.get(keyword, ""))
        if seconds is not None:
            keys[name] = seconds
    instance = integer(ds, "InstanceNumber")
    if instance is not None:
        keys["instance_number"] = instance
    return keys


def classic_frames(ds: Dataset, file: int) -> list[Frame]:
    """Frames of a file without functional groups (one per frame, sharing the top-level geometry)."""
    position, orientation = _geometry(ds)
    slope, intercept = rescale_of(ds)
    dose_scaling = first_float(ds, "DoseGridScaling")
    if dose_scaling and "RescaleSlope" not in ds:
        # RT Dose: stored integers times (3004,000E) Dose Grid Scaling give the dose.
        slope = dose_scaling
    count = number_of_frames(ds)
    instance = integer(ds, "InstanceNumber")
    base_temporal = classic_temporal(ds)
    split = (first_float(ds, "EchoNumbers"), image_type(ds))
    frames = []
    for index in range(count):
        temporal = dict(base_temporal)
        if count > 1:
            temporal["frame"] = (instance or 0, index)
        frames.append(
            Frame(
                file=file,
                index=index if count > 1 else None,
                # The top-level position belongs to the first frame only; where the
                # others are (RT Dose offsets, an assumed step) is decided with the file.
                position=position if count == 1 else None,
                orientation=orientation,
                pixel_spacing=_spacing(ds),
                thickness=first_float(ds, "SliceThickness"),
                slope=slope,
                intercept=intercept,
                temporal=temporal,
                split=split,
                instance_number=instance,
                sop_uid=str(ds.get("SOPInstanceUID", "")),
                slice_spacing=first_float(ds, "SpacingBetweenSlices"),
            )
        )
    return frames


def enhanced_frames(ds: Dataset, file: int) -> list[Frame]:
    """Frames of an enhanced multi-frame file, geometry from the functional groups.

    Per-frame groups override shared ones (PS3.3 C.7.6.16). Frames whose plane
    position or orientation is missing get ``position=None``.
    """
    count = number_of_frames(ds)
    top_slope, top_intercept = rescale_of(ds)
    instance = integer(ds, "InstanceNumber")
    frames = []
    for index in range(count):
        position_item = _group_item(ds, index, "PlanePositionSequence")
        orientation_item = _group_item(ds, index, "PlaneOrientationSequence")
        measures = _group_item(ds, index, "PixelMeasuresSequence")
        transform = _group_item(ds, index, "PixelValueTransformationSequence")
        content = _group_item(ds, index, "FrameContentSequence")
        position = _geometry(position_item)[0]
        orientation = _geometry(orientation_item)[1]
        if position is None:
            position = _geometry(ds)[0] if count == 1 else None
        if orientation is None:
            orientation = _geometry(ds)[1]
        slope, intercept = rescale_of(transform) if transform is not None else (top_slope, top_intercept)
        temporal: dict[str, Any] = {"frame": (instance or 0, index)}
        stack = ""
        if content is not None:
            value = first_float(content, "TemporalPositionIndex")
            if value is not None:
                temporal["temporal_position"] = value
            stamp = dicom_time_seconds(content.get("FrameAcquisitionDateTime", ""))
            if stamp is not None:
                temporal["acquisition_time"] = stamp
            stack = str(content.get("StackID", ""))
        echo_item = _group_item(ds, index, "MREchoSequence")
        echo = first_float(echo_item, "EffectiveEchoTime") if echo_item is not None else None
        frame_type: tuple[str, ...] = ()
        for sequence in (
            "MRImageFrameTypeSequence",
            "CTImageFrameTypeSequence",
            "PETFrameTypeSequence",
            "FrameTypeSequence",
        ):
            item = _group_item(ds, index, sequence)
            if item is not None and "FrameType" in item:
                frame_type = tuple(str(v).upper() for v in item.FrameType)
                break
        frames.append(
            Frame(
                file=file,
                index=index,
                position=position,
                orientation=orientation,
                pixel_spacing=_spacing(measures) or _spacing(ds),
                thickness=(first_float(measures, "SliceThickness") if measures is not None else None)
                or first_float(ds, "SliceThickness"),
                slope=slope,
                intercept=intercept,
                temporal=temporal,
                split=(echo, frame_type, stack),
                instance_number=instance,
                sop_uid=str(ds.get("SOPInstanceUID", "")),
                slice_spacing=(first_float(measures, "SpacingBetweenSlices") if measures is not None else None)
                or first_float(ds, "SpacingBetweenSlices"),
            )
        )
    return frames


def frame_voi(ds: Dataset) -> Dataset:
    """The dataset holding the window of the first frame (enhanced: Frame VOI LUT macro)."""
    if is_enhanced(ds):
        item = _group_item(ds, 0, "FrameVOILUTSequence")
        if item is not None:
            return item
    return ds


def series_label(ds: Dataset) -> str:
    """How messages name a series: number and description, never patient data."""
    number = ds.get("SeriesNumber", None)
    description = str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or "").strip()
    text = f"Series {number}" if number not in (None, "") else "Series (no number)"
    return f"{text} '{description}'" if description else text


def multi_strings(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def as_float_list(value: Any) -> Sequence[float]:
    return [float(v) for v in multi_strings(value)]
