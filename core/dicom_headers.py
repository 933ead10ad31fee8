"""Reading DICOM headers (no pixels) and turning them into per-frame records.

A :class:`Frame` is one 2D image: a single-frame file, or one frame of a
multi-frame file. It carries what slice assembly needs (position, orientation,
spacing, rescale, keys for time ordering and for splitting a series) so the
assembly in :mod:`core.dicom_series` never looks at a pydicom Dataset again.
"""

from __future__ import annotations

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
from core.sources import DEFAULT_LIMITS, Limits, Source, SourceData, open_data

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


def has_preamble(data: SourceData) -> bool:
    """Part-10 file: 128-byte preamble followed by "DICM"."""
    return len(data) >= 132 and data[128:132] == b"DICM"


# Explicit VRs (PS3.5 Table 6.2-1).
_EXPLICIT_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
    b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
    b"UR", b"US", b"UT", b"UV",
}  # fmt: skip
# Value lengths of fixed-size VRs must be a multiple of these.
_VR_SIZES = {b"US": 2, b"SS": 2, b"UL": 4, b"SL": 4, b"FL": 4, b"FD": 8, b"AT": 4, b"SV": 8, b"UV": 8}
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Elements checked before a file without preamble is called DICOM.
_SNIFF_ELEMENTS = 3


def sniff_bare_dataset(data: SourceData) -> tuple[bool, bool] | None:
    """Encoding of a dataset that starts at byte 0 (no preamble), when the bytes are clearly DICOM.

    Old ACR-NEMA files and some PACS exports have no 128-byte preamble and no
    "DICM" marker, and often no file meta group either. Such a file is accepted
    when its first elements parse consistently in one of the four encodings
    (little/big endian, explicit/implicit VR): the first is a group 0x0002 or
    0x0008 element, tags ascend, each tag is a public dictionary tag (or a group
    length) whose explicit VR matches the dictionary, lengths are even, fit the
    data and suit fixed-size VRs. Three elements are checked (two when the data
    ends or a sequence of undefined length starts); junk practically never
    passes, and the check reads a few dozen bytes.

    Returns
    -------
    (little_endian, implicit_vr) or None
        None when the bytes are not clearly a DICOM dataset.
    """
    if len(data) < 8:
        return None
    for little, implicit in ((True, False), (True, True), (False, False), (False, True)):
        if _walks_as_dicom(data, little, implicit):
            return little, implicit
    return None


def _walks_as_dicom(data: SourceData, little: bool, implicit: bool) -> bool:
    from pydicom.datadict import DicomDictionary

    order = "<" if little else ">"
    pos, previous, count = 0, -1, 0
    while count < _SNIFF_ELEMENTS:
        if pos == len(data):
            return count >= 2
        if pos + 8 > len(data):
            return False
        group, element = struct.unpack_from(order + "HH", data, pos)
        tag = (group << 16) | element
        if tag <= previous or (count == 0 and group not in (0x0002, 0x0008)):
            return False
        # The file meta group is always explicit VR little endian (PS3.10 7.1).
        if group == 0x0002 and (implicit or not little):
            return False
        entry = DicomDictionary.get(tag)
        if element != 0 and entry is None:
            return False
        expected = "UL" if element == 0 else str(entry[0]) if entry else ""
        if implicit:
            vr = expected.encode()[:2]
            length = struct.unpack_from(order + "I", data, pos + 4)[0]
            header = 8
        else:
            vr = data[pos + 4 : pos + 6]
            if vr not in _EXPLICIT_VRS or (vr != b"UN" and vr.decode() not in expected):
                return False
            if vr in _LONG_VRS:
                if pos + 12 > len(data) or data[pos + 6 : pos + 8] != b"\x00\x00":
                    return False
                length, header = struct.unpack_from(order + "I", data, pos + 8)[0], 12
            else:
                length, header = struct.unpack_from(order + "H", data, pos + 6)[0], 8
        if length == _UNDEFINED_LENGTH:
            # A sequence (or encapsulated data) follows: walking on means parsing it.
            return count >= 1 and (implicit or vr in (b"SQ", b"UN", b"OB", b"OW"))
        if length % 2 or length % _VR_SIZES.get(vr, 1) or pos + header + length > len(data):
            return False
        pos += header + length
        previous = tag
        count += 1
    return True


def _at_pixel_data(tag: Any, vr: str | None, length: int) -> bool:
    return int(tag) in (0x7FE00010, 0x7FE00008, 0x7FE00009)


def read_dataset_bytes(data: SourceData, *, stop_before_pixels: bool, defer_size: str | None = None) -> Dataset:
    """Parse a whole file's bytes: Part 10, or a bare dataset in any of the four encodings.

    pydicom guesses the encoding of a file without meta header from its first
    element, which fails for implicit VR big endian (ACR-NEMA 2.0); a bare dataset
    whose encoding :func:`sniff_bare_dataset` recognises is read with that encoding
    and given a file meta with the matching transfer syntax, so decoding knows the
    byte order. Implicit VR big endian is labelled Explicit VR Big Endian: the two
    store pixel bytes identically; only element headers differ, and those are parsed.

    Raises
    ------
    pydicom's exceptions (see :data:`READ_ERRORS`) on damaged data.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset

    encoding = None if has_preamble(data) else sniff_bare_dataset(data)
    # A meta group without preamble names its transfer syntax: pydicom reads that case itself.
    if encoding is None or data[:2] == b"\x02\x00":
        return pydicom.dcmread(
            open_data(data), stop_before_pixels=stop_before_pixels, defer_size=defer_size, force=not has_preamble(data)
        )
    little, implicit = encoding
    ds = read_dataset(open_data(data), implicit, little, stop_when=_at_pixel_data if stop_before_pixels else None)
    ds.file_meta = FileMetaDataset()
    if not little:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    else:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


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
        return read_dataset_bytes(source.data, stop_before_pixels=True, defer_size="64 KB")
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


def _meta_transfer_syntax(data: SourceData) -> tuple[str, int] | None:
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


def has_pixel_data(data: SourceData) -> bool:
    """Whether a (7FE0,0010/0008/0009) pixel data tag occurs in the bytes.

    The header is read with ``stop_before_pixels``, so the parsed dataset cannot
    tell. A stray match inside another value only delays the error to loading.
    """
    return any(
        data.find(tag) >= 0  # not `tag in data`: on a memory map `in` looks for one byte
        for tag in (
            b"\xe0\x7f\x10\x00",  # (7FE0,0010) little endian
            b"\x7f\xe0\x00\x10",  # big endian
            b"\xe0\x7f\x08\x00",  # Float Pixel Data
            b"\xe0\x7f\x09\x00",  # Double Float Pixel Data
        )
    )


def skip_reason(ds: Dataset, data: SourceData) -> str:
    """Why a file holds no image volume ("" when it does).

    DICOMDIR, structured reports, presentation states, RT structure sets, key
    objects and raw data have no (0028,0010) Rows / pixel data; localizers are
    images but not part of any volume a user wants (dcm2niix ``-i y``).
    """
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    sop_name = UID(sop_class).name if sop_class else "unknown SOP class"
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        # Its records name files by path on the original media; those paths are never
        # opened (they may point anywhere). The images it lists are read when they are
        # part of the upload, like any other file.
        return (
            "DICOMDIR (the index of a CD/DVD, no image): the image files next to it in the upload are read "
            "directly; the paths it lists are never followed"
        )
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
    segment : int or None
        DICOM SEG: the (0062,000B) Referenced Segment Number this frame is a mask of.
    value_per_display : float
        Loaded value per displayed value: 1, except for Philips precise values (see
        :func:`philips_precise_rescale`), where a stored (0028,1050) window must be
        multiplied by it to stay in the units of the volume.
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
    segment: int | None = None
    value_per_display: float = 1.0

    @property
    def has_geometry(self) -> bool:
        return self.position is not None and self.orientation is not None


def number_of_frames(ds: Dataset) -> int:
    value = integer(ds, "NumberOfFrames")
    return value if value and value > 0 else 1


SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def is_segmentation(ds: Dataset) -> bool:
    """DICOM SEG (PS3.3 A.51): frames are masks of the segments in (0062,0002) Segment Sequence."""
    return str(ds.get("SOPClassUID", "")) == SEGMENTATION_SOP_CLASS or (
        str(ds.get("Modality", "")) == "SEG" and "SegmentSequence" in ds
    )


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
    """(0028,0030) as (row, column) spacing; None when absent or not two positive numbers.

    Some writers put 0\\0 (radiographs whose spacing lives in (0018,1164)); a zero
    size would make a singular affine, so it counts as unknown (1 mm is assumed and
    said so).
    """
    if item is None:
        return None
    values = floats(item, "PixelSpacing", 2)
    if not values or values[0] <= 0 or values[1] <= 0:
        return None
    return (values[0], values[1])


def _geometry(item_ds: Dataset | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    if item_ds is None:
        return None, None
    ipp = floats(item_ds, "ImagePositionPatient", 3)
    iop = floats(item_ds, "ImageOrientationPatient", 6)
    return (np.array(ipp) if ipp else None), (np.array(iop) if iop else None)


PHILIPS_SCALE_CREATOR = "Philips MR Imaging DD 001"
PHILIPS_PER_FRAME_CREATOR = "Philips MR Imaging DD 005"


def is_philips(ds: Dataset) -> bool:
    return "PHILIPS" in str(ds.get("Manufacturer", "") or "").upper()


def _private_element(item: Dataset, group: int, creator: str, offset: int, usual_block: int = 0x10) -> Any:
    """The private element ``(group, xx offset)`` of ``creator``'s block, or None.

    Blocks are found through their private creator, as the standard requires;
    when the creator element was stripped but the element sits in the block the
    vendor always uses, that one is used (dcm2niix reads these tags at fixed positions).
    """
    try:
        tag: int = item.private_block(group, creator).get_tag(offset)
    except KeyError:
        if (group << 16) | usual_block in item:
            return None  # the usual block belongs to another creator
        tag = (group << 16) | (usual_block << 8) | offset
    return item[tag] if tag in item else None


def _private_float(element: Any, little_endian: bool = True) -> float | None:
    """FL/DS value of a private element, also when its VR is unknown (UN: raw bytes)."""
    if element is None:
        return None
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        if len(value) == 4:
            value = struct.unpack("<f" if little_endian else ">f", value)[0]
        else:
            text = bytes(value).decode("ascii", "replace").strip("\x00 ").split("\\")[0]
            try:
                value = float(text)
            except ValueError:
                return None
    elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def philips_scale_slope(ds: Dataset, frame: int | None = None) -> float | None:
    """Philips private (2005,100E) Scale Slope "SS" of a frame (or of a classic file); None when absent or 0.

    Enhanced files keep it per frame in the private (2005,140F) sequence of the
    per-frame functional groups; classic files at the top level.
    """
    little = getattr(ds, "is_little_endian", True) is not False
    holders: list[Dataset] = []
    if frame is not None:
        groups = ds.get("PerFrameFunctionalGroupsSequence")
        if groups and frame < len(groups):
            private = _private_element(groups[frame], 0x2005, PHILIPS_PER_FRAME_CREATOR, 0x0F, usual_block=0x14)
            if private is not None and private.VR == "SQ" and private.value:
                holders.append(private.value[0])
    holders.append(ds)
    for holder in holders:
        value = _private_float(_private_element(holder, 0x2005, PHILIPS_SCALE_CREATOR, 0x0E), little)
        if value:
            return value
    return None


def philips_precise_rescale(slope: float, intercept: float, scale_slope: float | None) -> tuple[float, float, float]:
    """Philips "floating point" values from the rescale and the private scale slope.

    Philips stores pixel values PV, a rescale RS/RI to the displayed value
    DV = PV * RS + RI, and (2005,100E) SS with the precise value FP = DV / (RS * SS)
    (Chenevert et al., PMC3998685). dcm2niix writes FP by default (its ``-p y``,
    "Philips precise float (not display) scaling", default yes; function
    ``PhilipsPrecise``), because FP is proportional to the measured signal and
    comparable between scans, while DV depends on the scanner's display scaling.
    We load what dcm2niix loads.

    Returns
    -------
    slope, intercept : float
        ``FP = slope * PV + intercept``.
    value_per_display : float
        ``1 / (RS * SS)``: multiply a displayed value (a stored window) by it.
    """
    if not scale_slope or not slope:
        return slope, intercept, 1.0
    factor = 1.0 / (slope * scale_slope)
    return slope * factor, intercept * factor, factor


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
    value_per_display = 1.0
    if is_philips(ds):
        slope, intercept, value_per_display = philips_precise_rescale(slope, intercept, philips_scale_slope(ds))
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
                value_per_display=value_per_display,
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
    philips = is_philips(ds)
    # File-level keys tell apart the files of a series stored one volume per enhanced file.
    file_temporal: dict[str, Any] = {}
    try:
        acquisition_number = first_float(ds, "AcquisitionNumber")
    except UnsupportedFileError:
        acquisition_number = None
    if acquisition_number is not None:
        file_temporal["acquisition_number"] = acquisition_number
    for name, keyword in (("content_time", "AcquisitionDateTime"), ("content_time", "ContentTime")):
        seconds = dicom_time_seconds(ds.get(keyword, ""))
        if seconds is not None and name not in file_temporal:
            file_temporal[name] = seconds
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
        value_per_display = 1.0
        if philips:
            slope, intercept, value_per_display = philips_precise_rescale(
                slope, intercept, philips_scale_slope(ds, index)
            )
        temporal: dict[str, Any] = {**file_temporal, "frame": (instance or 0, index)}
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
        segment_item = _group_item(ds, index, "SegmentIdentificationSequence")
        segment = integer(segment_item, "ReferencedSegmentNumber") if segment_item is not None else None
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
                segment=segment,
                value_per_display=value_per_display,
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
