"""A synthetic CT study seeded with protected health information (PHI) in every place we can reach.

Every attribute of DICOM PS3.15 Table E.1-1 that fits a CT image gets a value
carrying a marker in a VR-appropriate form: text and names hold
``PHIMARKER``, dates ``19010203``, date-times ``19010203040506``, decimal and
integer strings ``7317319``, binary values the bytes ``PHIMARKER``, UIDs
fresh original UIDs (all recorded). Sequences get items that carry PHI again,
nested two levels deep, plus private tags inside items. Private blocks at the
top level, file meta fields, the 128-byte preamble and the file names carry
the marker too. A test then searches the exported bytes for every marker.

The pixel data is a small int16 phantom whose values stay below 4096, so no
two consecutive pixel bytes are ASCII digits or letters: a marker found in an
export cannot come from the pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from core.deidentify import BASIC_PROFILE
from core.sources import Source

MARKER = "PHIMARKER"
MARKER_DATE = "19010203"
MARKER_TIME = "040506"
MARKER_DATETIME = MARKER_DATE + MARKER_TIME
MARKER_NUMBER = "7317319"
# Byte strings no export may contain (times are kept under the date-shift option, so they are not here).
MARKERS: tuple[bytes, ...] = (MARKER.encode(), MARKER_DATE.encode(), MARKER_NUMBER.encode())

# Attributes the factory sets itself: the identity of each instance and its geometry.
_SET_BY_FACTORY = {0x00080018, 0x0020000E, 0x0020000D, 0x00200052}
# Groups that do not belong in a stored instance: command (0000), file meta (0002), DICOMDIR (0004).
_SKIPPED_GROUPS = {0x0000, 0x0002, 0x0004}

ROWS, COLUMNS = 12, 10
PIXEL_SPACING = (0.7, 0.8)  # row spacing, column spacing (mm)
SLICE_STEP = 2.5  # mm
ORIGIN = (-40.0, -30.0, 100.0)  # LPS mm of the first voxel of the first slice


@dataclass
class PhiStudy:
    """Files of the study and every original UID they contain (tests look for none of them)."""

    sources: list[Source]
    original_uids: set[str] = field(default_factory=set)
    sop_uids_by_series: dict[str, list[str]] = field(default_factory=dict)


class _Uids:
    def __init__(self) -> None:
        self.seen: set[str] = set()

    def new(self) -> str:
        uid = generate_uid()
        self.seen.add(uid)
        return uid


def _base_vr(vr: str) -> str:
    return {"OB or OW": "OB", "US or SS": "US", "US or OW": "US", "US or SS or OW": "US"}.get(vr, vr)


def phi_value(vr: str, keyword: str, uids: _Uids, depth: int = 0) -> object:
    """A value for an attribute of this VR that carries the marker (None when the VR cannot)."""
    vr = _base_vr(vr)
    if vr == "PN":
        return f"{MARKER}^{keyword[:20]}"
    if vr in ("SH", "CS", "AE"):
        return MARKER
    if vr == "LO":
        return f"{MARKER} {keyword}"[:64]
    if vr in ("ST", "LT", "UT", "UC"):
        return f"{MARKER} free text of {keyword}"
    if vr == "UR":
        return f"http://example.invalid/{MARKER}"
    if vr == "DA":
        return MARKER_DATE
    if vr == "DT":
        return MARKER_DATETIME
    if vr == "TM":
        return MARKER_TIME
    if vr == "AS":
        return "077Y"
    if vr in ("DS", "IS"):
        return MARKER_NUMBER
    if vr in ("US", "SS", "UL", "SL", "UV", "SV"):
        return 7317
    if vr in ("FL", "FD"):
        return 7317.5
    if vr in ("OB", "OW", "UN", "OD", "OF", "OL", "OV"):
        return MARKER.encode() + b"\x00" * 7  # 16 bytes: valid length for every binary VR
    if vr == "UI":
        return uids.new()
    if vr == "SQ":
        return DicomSequence([phi_item(uids, depth + 1)])
    return None


def _add_private_block(ds: Dataset, group: int, *, nested: bool, uids: _Uids, depth: int) -> None:
    block = ds.private_block(group, f"{MARKER} CREATOR", create=True)
    block.add_new(0x01, "LO", f"{MARKER} private text")
    block.add_new(0x02, "OB", MARKER.encode() + b"\x00" * 7)
    block.add_new(0x03, "UI", uids.new())
    if nested:
        item = Dataset()
        item.PatientName = f"{MARKER}^InPrivateSequence"
        block.add_new(0x04, "SQ", DicomSequence([item]))


def phi_item(uids: _Uids, depth: int) -> Dataset:
    """A sequence item full of PHI: table attributes, a UID, a private block and (shallow) a nested sequence."""
    item = Dataset()
    item.PatientName = f"{MARKER}^Item{depth}"
    item.InstitutionName = f"{MARKER} hospital in item"
    item.StudyDate = MARKER_DATE
    item.ReferencedSOPInstanceUID = uids.new()
    item.ReferencedSOPClassUID = CTImageStorage
    _add_private_block(item, 0x0011, nested=False, uids=uids, depth=depth)
    if depth < 2:
        inner = Dataset()
        inner.PatientID = f"{MARKER}-ID-depth{depth + 1}"
        inner.OperatorsName = f"{MARKER}^Operator"
        inner.ReferencedSOPInstanceUID = uids.new()
        item.OtherPatientIDsSequence = DicomSequence([inner])
        item.ReferencedImageSequence = DicomSequence([phi_item(uids, depth + 1)]) if depth < 1 else DicomSequence([])
    return item


def fill_table_attributes(ds: Dataset, uids: _Uids) -> list[int]:
    """Give every Table E.1-1 attribute that fits a stored instance a PHI value; returns the tags filled."""
    filled = []
    for tag in sorted(BASIC_PROFILE):
        if tag >> 16 in _SKIPPED_GROUPS or tag in _SET_BY_FACTORY:
            continue
        vr = dictionary_VR(tag)
        value = phi_value(vr, keyword_for_tag(tag) or f"{tag:08X}", uids)
        if value is None:
            continue
        ds.add_new(tag, _base_vr(vr), value)
        filled.append(tag)
    # The repeating groups of the table: curve data (50xx) and overlays (60xx).
    ds.add_new(0x50003000, "OB", MARKER.encode() + b"\x00" * 7)
    ds.add_new(0x60000010, "US", ROWS)
    ds.add_new(0x60000011, "US", COLUMNS)
    ds.add_new(0x60003000, "OW", MARKER.encode() + b"\x00" * 7)
    ds.add_new(0x60004000, "LT", f"{MARKER} overlay comment")
    ds.add_new(0x60001500, "LO", f"{MARKER} overlay label")
    return filled


def _phantom(slice_index: int) -> np.ndarray:
    """(ROWS, COLUMNS) int16: a gradient plus an asymmetric bright corner block, values 0..1500."""
    i, j = np.mgrid[0:ROWS, 0:COLUMNS]
    image = (10 * i + 3 * j + 50 * slice_index).astype(np.int16)
    image[:3, :2] = 1500
    return image


def phi_instance(
    *,
    uids: _Uids,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    sop_uid: str,
    series_number: int,
    slice_index: int,
    referenced_sop_uid: str,
    modality: str = "CT",
    burned_in: str | None = "NO",
) -> Dataset:
    """One CT slice carrying PHI everywhere; geometry axial with a known origin and spacing."""
    ds = Dataset()
    fill_table_attributes(ds, uids)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "TomoForge test factory"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = slice_index + 1
    ds.AcquisitionComments = f"{MARKER} comment differing per slice {slice_index}"
    ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + SLICE_STEP * slice_index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = list(PIXEL_SPACING)
    ds.SliceThickness = SLICE_STEP
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    # A kept (non-table) sequence whose items carry PHI and references to other
    # instances of this export: remapping must keep them linked.
    ref = Dataset()
    ref.SeriesInstanceUID = series_uid
    ref.PatientName = f"{MARKER}^InReferencedSeries"
    image_ref = Dataset()
    image_ref.ReferencedSOPClassUID = CTImageStorage
    image_ref.ReferencedSOPInstanceUID = referenced_sop_uid
    image_ref.OperatorsName = f"{MARKER}^NestedOperator"
    _add_private_block(image_ref, 0x0013, nested=True, uids=uids, depth=2)
    ref.ReferencedImageSequence = DicomSequence([image_ref])
    _add_private_block(ref, 0x0015, nested=True, uids=uids, depth=1)
    ds.ReferencedSeriesSequence = DicomSequence([ref])
    # The table's Referenced Image Sequence also points at another slice of this series.
    link = Dataset()
    link.ReferencedSOPClassUID = CTImageStorage
    link.ReferencedSOPInstanceUID = referenced_sop_uid
    link.PatientName = f"{MARKER}^InReferencedImage"
    ds.ReferencedImageSequence = DicomSequence([link])
    _add_private_block(ds, 0x0009, nested=True, uids=uids, depth=0)
    _add_private_block(ds, 0x0029, nested=False, uids=uids, depth=0)
    ds.PixelData = _phantom(slice_index).tobytes()
    return ds


def to_file_bytes(ds: Dataset, uids: _Uids) -> bytes:
    """Part 10 bytes with the marker in the preamble and in file meta fields."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(uids.new())
    meta.ImplementationVersionName = MARKER
    meta.SourceApplicationEntityTitle = MARKER
    meta.PrivateInformationCreatorUID = UID(uids.new())
    meta.PrivateInformation = MARKER.encode() + b"\x00" * 7
    ds.file_meta = meta
    ds.preamble = (MARKER.encode() * 20)[:128]
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def make_phi_study(
    n_series: int = 2,
    n_slices: int = 4,
    *,
    modality: str = "CT",
    burned_in: str | None = "NO",
) -> PhiStudy:
    """``n_series`` series of ``n_slices`` PHI-laden slices in one study and one frame of reference.

    File names carry the marker too ("PHIMARKER_s1_003.dcm").
    """
    uids = _Uids()
    study_uid, frame_uid = uids.new(), uids.new()
    study = PhiStudy(sources=[])
    for s in range(1, n_series + 1):
        series_uid = uids.new()
        sop_uids = [uids.new() for _ in range(n_slices)]
        study.sop_uids_by_series[series_uid] = sop_uids
        for k in range(n_slices):
            ds = phi_instance(
                uids=uids,
                study_uid=study_uid,
                series_uid=series_uid,
                frame_uid=frame_uid,
                sop_uid=sop_uids[k],
                series_number=s,
                slice_index=k,
                referenced_sop_uid=sop_uids[(k + 1) % n_slices],
                modality=modality,
                burned_in=burned_in,
            )
            data = to_file_bytes(ds, uids)
            study.sources.append(Source(name=f"{MARKER}_s{s}_{k:03d}.dcm", data=data))
    study.original_uids = set(uids.seen)
    return study


def find_markers(data: bytes, extra: tuple[bytes, ...] = ()) -> list[bytes]:
    """The markers (and ``extra`` byte strings) that occur in ``data``."""
    return [m for m in (*MARKERS, *extra) if m in data]
