"""Synthetic DICOM series for tests: Part-10 bytes in memory, geometry known exactly.

A series is described like our reader describes it: a pixel array indexed
``pixels[k, row, column]`` and an LPS affine that maps ``(column, row, k, 1)`` to
millimetres. Each slice k is written with

* (0020,0037) Image Orientation (Patient) = the unit columns 0 and 1 of the affine,
* (0028,0030) Pixel Spacing = [norm of column 1 (row spacing), norm of column 0],
* (0020,0032) Image Position (Patient) = affine @ (0, 0, k, 1),

so the expected RAS affine of the loaded volume is ``LPS_TO_RAS @ affine`` (before
reorientation). Options break the series the way real uploads are broken: missing
slices, explicit uneven positions, gantry tilt (a sheared third column), shuffled
file order, a slice with another orientation.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from core.sources import Source

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_SOP_CLASS = {"CT": CT_IMAGE, "MR": MR_IMAGE, "OT": SECONDARY_CAPTURE}

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def lps_affine(
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    slice_step: float | Sequence[float] = 1.0,
) -> np.ndarray:
    """The LPS affine of ``(column, row, k)`` for a regular stack.

    Parameters
    ----------
    orientation : (6,) sequence
        IOP: row direction (along which the column index grows), column direction.
    pixel_spacing : (2,) sequence
        DICOM order: [row spacing, column spacing] in mm.
    origin : (3,) sequence
        IPP of slice 0, LPS mm.
    slice_step : float or (3,) sequence
        A distance along ``row x column``, or a full step vector (e.g. sheared by a tilt).
    """
    iop = np.asarray(orientation, dtype=np.float64)
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    if np.ndim(slice_step) == 0:
        step = np.cross(row_dir, col_dir) * float(slice_step)  # type: ignore[arg-type]
    else:
        step = np.asarray(slice_step, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * float(pixel_spacing[1])
    affine[:3, 1] = col_dir * float(pixel_spacing[0])
    affine[:3, 2] = step
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine


def _base_dataset(
    sop_class: str, modality: str, study_uid: str, series_uid: str, frame_uid: str, series_number: int, description: str
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = "20240101"
    ds.SeriesDate = "20240101"
    ds.StudyTime = "120000"
    ds.SeriesTime = "120000"
    ds.Modality = modality
    ds.Manufacturer = "TomoForge test factory"
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "SYN0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.PositionReferenceIndicator = ""
    return ds


def _set_pixels(ds: Dataset, image: np.ndarray, photometric: str | None, bits_stored: int | None) -> None:
    rgb = image.ndim == 3
    ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if rgb else "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = image.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if image.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(image).tobytes()


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_series(
    pixels: np.ndarray,
    *,
    affine: np.ndarray | None = None,
    positions: Sequence[Sequence[float]] | None = None,
    rescale: tuple[float, float] | None = None,
    modality: str = "CT",
    photometric: str | None = None,
    bits_stored: int | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    series_number: int = 1,
    description: str = "synthetic",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    instance_numbers: Sequence[int] | None = None,
    drop: Iterable[int] = (),
    shuffle_seed: int | None = None,
    orientation_overrides: Mapping[int, Sequence[float]] | None = None,
    gantry_tilt: float | None = None,
    slice_thickness: float | None = None,
    window: tuple[float, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    per_slice: Mapping[str, Sequence[Any]] | None = None,
    name_prefix: str = "IM",
) -> list[Source]:
    """One file per slice, as bytes.

    Parameters
    ----------
    pixels : (K, rows, columns) or (K, rows, columns, 3) ndarray
        Stored values (uint16/int16/uint8); RGB when the last axis is 3 and uint8.
    affine : (4, 4) ndarray, optional
        LPS affine of ``(column, row, k)`` (see :func:`lps_affine`); axial 1 mm by default.
    positions : (K, 3) sequence, optional
        Explicit IPP per slice, overriding the affine's third column (uneven spacing).
    rescale : (slope, intercept), optional
        Written as (0028,1053)/(0028,1052).
    drop : iterable of int
        Slices not written (missing slices).
    shuffle_seed : int, optional
        Shuffle the returned list (file order means nothing).
    orientation_overrides : {k: IOP}
        Slices written with another orientation (mixed series).
    per_slice : {keyword: values}
        Per-slice attribute values (e.g. TemporalPositionIdentifier).

    Returns
    -------
    list of Source
        Named ``{name_prefix}{k:04d}.dcm``.
    """
    pixels = np.asarray(pixels)
    count = pixels.shape[0]
    affine = lps_affine() if affine is None else np.asarray(affine, dtype=np.float64)
    col_spacing = float(np.linalg.norm(affine[:3, 0]))
    row_spacing = float(np.linalg.norm(affine[:3, 1]))
    orientation = [*(affine[:3, 0] / col_spacing), *(affine[:3, 1] / row_spacing)]
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    sop_class = _SOP_CLASS.get(modality, SECONDARY_CAPTURE)
    dropped = set(drop)
    sources: list[Source] = []
    for k in range(count):
        if k in dropped:
            continue
        ds = _base_dataset(sop_class, modality, study_uid, series_uid, frame_uid, series_number, description)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.ImageType = list(image_type)
        ds.InstanceNumber = int(instance_numbers[k]) if instance_numbers is not None else k + 1
        ds.AcquisitionNumber = 1
        iop = orientation_overrides.get(k, orientation) if orientation_overrides else orientation
        ds.ImageOrientationPatient = [_ds(v) for v in iop]
        position = positions[k] if positions is not None else (affine @ [0.0, 0.0, float(k), 1.0])[:3]
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
        thickness = slice_thickness if slice_thickness is not None else float(np.linalg.norm(affine[:3, 2]))
        ds.SliceThickness = _ds(thickness)
        if gantry_tilt is not None:
            ds.GantryDetectorTilt = _ds(gantry_tilt)
        if rescale is not None:
            ds.RescaleSlope = _ds(rescale[0])
            ds.RescaleIntercept = _ds(rescale[1])
            ds.RescaleType = "HU" if modality == "CT" else "US"
        if window is not None:
            ds.WindowCenter = _ds(window[0])
            ds.WindowWidth = _ds(window[1])
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        for keyword, values in (per_slice or {}).items():
            setattr(ds, keyword, values[k])
        _set_pixels(ds, pixels[k], photometric, bits_stored)
        sources.append(Source(name=f"{name_prefix}{k:04d}.dcm", data=to_bytes(ds)))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(sources))
        sources = [sources[n] for n in order]
    return sources


def _ds(value: float) -> str:
    """A DS string of at most 16 characters keeping as many digits as fit."""
    value = float(value)
    if value == 0:
        return "0"
    for digits in range(14, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(value)


def make_enhanced(
    pixels: np.ndarray,
    positions: Sequence[Sequence[float]],
    *,
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    temporal_indices: Sequence[int] | None = None,
    rescale: tuple[float, float] = (1.0, 0.0),
    description: str = "enhanced synthetic",
    series_number: int = 7,
    name: str = "enhanced.dcm",
) -> Source:
    """One enhanced MR file, geometry in per-frame functional groups.

    Parameters
    ----------
    pixels : (N, rows, columns) uint16 ndarray
        Frames in file order.
    positions : (N, 3) sequence
        IPP of each frame (LPS mm), in file order.
    temporal_indices : (N,) sequence of int, optional
        (0020,9128) Temporal Position Index of each frame (time series).
    """
    pixels = np.asarray(pixels)
    ds = _base_dataset(
        ENHANCED_MR_IMAGE, "MR", generate_uid(), generate_uid(), generate_uid(), series_number, description
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = int(pixels.shape[0])
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [_ds(v) for v in orientation]
    measures = Dataset()
    measures.PixelSpacing = [_ds(v) for v in pixel_spacing]
    measures.SliceThickness = "1"
    transform = Dataset()
    transform.RescaleSlope = _ds(rescale[0])
    transform.RescaleIntercept = _ds(rescale[1])
    transform.RescaleType = "US"
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for n, position in enumerate(positions):
        item = Dataset()
        plane = Dataset()
        plane.ImagePositionPatient = [_ds(v) for v in position]
        item.PlanePositionSequence = DicomSequence([plane])
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = n + 1
        if temporal_indices is not None:
            content.TemporalPositionIndex = int(temporal_indices[n])
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _set_pixels(ds, pixels[0], None, None)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return Source(name=name, data=to_bytes(ds))


def with_transfer_syntax(source: Source, uid: str, fragments: Sequence[bytes] | None = None) -> Source:
    """The same file claiming another transfer syntax, pixel data encapsulated as ``fragments``.

    Used to build files that no installed decoder can read (e.g. JPEG 2000 Part 2).
    """
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(source.data))
    ds.file_meta.TransferSyntaxUID = UID(uid)
    ds.PixelData = encapsulate(list(fragments or [b"\xff\x4f\xff\x51" + b"\x00" * 60]))
    ds["PixelData"].VR = "OB"
    return Source(name=source.name, data=to_bytes(ds))


def write_sources(sources: Iterable[Source], folder: Path) -> Path:
    """Write files to ``folder`` (for dcm2niix); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        (folder / Path(source.name).name).write_bytes(source.data)
    return folder


# --- fidelity cases (issue 7): enhanced series, bare datasets, SEG, RT Dose, UIH grids, colour ----------------------

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"


def make_enhanced_file(
    pixels: np.ndarray,
    positions: Sequence[Sequence[float] | np.ndarray],
    *,
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    series_number: int = 7,
    instance_number: int = 1,
    acquisition_number: int | None = None,
    acquisition_datetime: str | None = None,
    frame_datetimes: Sequence[str] | None = None,
    temporal_indices: Sequence[int] | None = None,
    frame_types: Sequence[Sequence[str]] | None = None,
    rescale: tuple[float, float] = (1.0, 0.0),
    manufacturer: str = "TomoForge test factory",
    description: str = "enhanced synthetic",
    name: str = "enhanced.dcm",
) -> Source:
    """One enhanced MR file with per-frame geometry, for series spread over several such files.

    Parameters
    ----------
    pixels : (N, rows, columns) uint16 ndarray
        Frames in file order.
    positions : (N, 3) sequence
        (0020,0032) of each frame, LPS mm.
    acquisition_number, acquisition_datetime : optional
        Top-level (0020,0012) and (0008,002A): what tells the files of a 4D series apart.
    frame_datetimes : (N,) sequence of DT strings, optional
        (0018,9074) Frame Acquisition DateTime of each frame.
    frame_types : (N,) sequence of (0008,9007) Frame Type values, optional
        e.g. ("ORIGINAL", "PRIMARY", "M", "NONE") and ("ORIGINAL", "PRIMARY", "P", "NONE").
    """
    pixels = np.asarray(pixels)
    ds = _base_dataset(
        ENHANCED_MR_IMAGE, "MR", study_uid or generate_uid(), series_uid or generate_uid(),
        frame_uid or generate_uid(), series_number, description,
    )  # fmt: skip
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Manufacturer = manufacturer
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = instance_number
    if acquisition_number is not None:
        ds.AcquisitionNumber = acquisition_number
    if acquisition_datetime is not None:
        ds.AcquisitionDateTime = acquisition_datetime
    ds.NumberOfFrames = int(pixels.shape[0])
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [_ds(v) for v in orientation]
    measures = Dataset()
    measures.PixelSpacing = [_ds(v) for v in pixel_spacing]
    measures.SliceThickness = "1"
    transform = Dataset()
    transform.RescaleSlope = _ds(rescale[0])
    transform.RescaleIntercept = _ds(rescale[1])
    transform.RescaleType = "US"
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    # (0020,9057) In-Stack Position Number counts positions along the stack, whatever the frame order.
    iop = np.asarray(orientation, dtype=np.float64)
    along = np.asarray(positions, dtype=np.float64) @ np.cross(iop[:3], iop[3:])
    rank = {value: n + 1 for n, value in enumerate(sorted(set(np.round(along, 3).tolist())))}
    for n, position in enumerate(positions):
        item = Dataset()
        plane = Dataset()
        plane.ImagePositionPatient = [_ds(v) for v in position]
        item.PlanePositionSequence = DicomSequence([plane])
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = rank[round(float(along[n]), 3)]
        if temporal_indices is not None:
            content.TemporalPositionIndex = int(temporal_indices[n])
        if frame_datetimes is not None:
            content.FrameAcquisitionDateTime = frame_datetimes[n]
        item.FrameContentSequence = DicomSequence([content])
        if frame_types is not None:
            frame_type = Dataset()
            frame_type.FrameType = list(frame_types[n])
            item.MRImageFrameTypeSequence = DicomSequence([frame_type])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _set_pixels(ds, pixels[0], None, None)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return Source(name=name, data=to_bytes(ds))


def bare_dataset(source: Source, *, little_endian: bool, implicit: bool, name: str | None = None) -> Source:
    """The same dataset without preamble and file meta, in any of the four encodings.

    Old ACR-NEMA style files and some PACS exports start straight with the
    dataset; implicit VR big endian is no DICOM transfer syntax but ACR-NEMA
    2.0 files were written that way.
    """
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(io.BytesIO(source.data))
    if not little_endian:
        swap_pixel_bytes(ds)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = little_endian, implicit
    write_dataset(buffer, ds)
    return Source(name=name or source.name, data=buffer.getvalue())


def swap_pixel_bytes(ds: Dataset) -> None:
    """Byte-swap native pixel data words for a big endian encoding (pydicom writes the bytes as they are)."""
    size = int(ds.BitsAllocated) // 8
    if size > 1:
        ds.PixelData = np.frombuffer(ds.PixelData, dtype=f"<u{size}").byteswap().tobytes()


def add_private(source: Source, group: int, creator: str, elements: Mapping[int, tuple[str, Any]]) -> Source:
    """The same file with private elements ``{offset: (VR, value)}`` in a block reserved by ``creator``."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(source.data))
    block = ds.private_block(group, creator, create=True)
    for offset, (vr, value) in elements.items():
        block.add_new(offset, vr, value)
    return Source(name=source.name, data=to_bytes(ds))


def make_segmentation(
    labels: np.ndarray,
    affine: np.ndarray,
    *,
    segment_labels: Sequence[str],
    fractional: bool = False,
    skip_empty: bool = True,
    frame_order_seed: int | None = None,
    spacing_between_slices: bool = True,
    name: str = "seg.dcm",
) -> Source:
    """A DICOM SEG (binary or fractional) of a label volume, one frame per non-empty (segment, slice).

    Parameters
    ----------
    labels : (K, rows, columns) int ndarray
        0 = background, n = segment n (1-based, ``len(segment_labels)`` segments).
    affine : (4, 4) ndarray
        LPS affine of ``(column, row, k)``, as :func:`lps_affine`.
    fractional : bool
        FRACTIONAL (8-bit, 255 = inside) instead of BINARY (1-bit packed).
    skip_empty : bool
        Leave out frames where a segment is absent (as SEG writers do).
    frame_order_seed : int, optional
        Shuffle the frames (their order in the file means nothing).
    """
    labels = np.asarray(labels)
    count, rows, columns = labels.shape
    col_spacing = float(np.linalg.norm(affine[:3, 0]))
    row_spacing = float(np.linalg.norm(affine[:3, 1]))
    orientation = [*(affine[:3, 0] / col_spacing), *(affine[:3, 1] / row_spacing)]
    ds = _base_dataset(SEGMENTATION, "SEG", generate_uid(), generate_uid(), generate_uid(), 300, "synthetic SEG")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.SegmentationType = "FRACTIONAL" if fractional else "BINARY"
    if fractional:
        ds.SegmentationFractionalType = "PROBABILITY"
        ds.MaximumFractionalValue = 255
    ds.ContentLabel = "SEG"
    segments = []
    for number, text in enumerate(segment_labels, start=1):
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = text
        item.SegmentAlgorithmType = "MANUAL"
        segments.append(item)
    ds.SegmentSequence = DicomSequence(segments)
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [_ds(v) for v in orientation]
    measures = Dataset()
    measures.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
    measures.SliceThickness = _ds(float(np.linalg.norm(affine[:3, 2])))
    if spacing_between_slices:
        measures.SpacingBetweenSlices = _ds(float(np.linalg.norm(affine[:3, 2])))
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames, per_frame = [], []
    for number in range(1, len(segment_labels) + 1):
        for k in range(count):
            mask = labels[k] == number
            if skip_empty and not mask.any():
                continue
            item = Dataset()
            plane = Dataset()
            plane.ImagePositionPatient = [_ds(v) for v in (affine @ [0.0, 0.0, float(k), 1.0])[:3]]
            item.PlanePositionSequence = DicomSequence([plane])
            ident = Dataset()
            ident.ReferencedSegmentNumber = number
            item.SegmentIdentificationSequence = DicomSequence([ident])
            per_frame.append(item)
            frames.append(mask)
    if frame_order_seed is not None:
        order = np.random.default_rng(frame_order_seed).permutation(len(frames))
        frames = [frames[n] for n in order]
        per_frame = [per_frame[n] for n in order]
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    stack = np.array(frames, dtype=np.uint8)
    if fractional:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = (stack * 255).astype(np.uint8).tobytes()
    else:
        from pydicom.pixels import pack_bits

        ds.BitsAllocated = ds.BitsStored = 1
        ds.HighBit = 0
        ds.PixelData = pack_bits(stack.ravel())
    return Source(name=name, data=to_bytes(ds))


def make_rtdose(
    dose_gy: np.ndarray,
    affine: np.ndarray,
    *,
    scaling: float = 1e-4,
    absolute_offsets: bool = False,
    units: str = "GY",
    name: str = "dose.dcm",
) -> Source:
    """An RT Dose grid: uint32 stored values times (3004,000E) Dose Grid Scaling give Gy.

    Parameters
    ----------
    dose_gy : (K, rows, columns) float ndarray
        Dose per frame (rounded to the scaling step when stored).
    affine : (4, 4) ndarray
        LPS affine; its third column is the step between frames (along the normal).
    absolute_offsets : bool
        Write (3004,000C) Grid Frame Offset Vector as z coordinates (first value = IPP z,
        allowed for axial grids, PS3.3 C.8.8.3.2) instead of offsets from the first frame.
    """
    dose_gy = np.asarray(dose_gy, dtype=np.float64)
    count, rows, columns = dose_gy.shape
    col_spacing = float(np.linalg.norm(affine[:3, 0]))
    row_spacing = float(np.linalg.norm(affine[:3, 1]))
    step = float(np.linalg.norm(affine[:3, 2]))
    ds = _base_dataset(RT_DOSE, "RTDOSE", generate_uid(), generate_uid(), generate_uid(), 500, "synthetic dose")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.ImageOrientationPatient = [_ds(v) for v in [*(affine[:3, 0] / col_spacing), *(affine[:3, 1] / row_spacing)]]
    ds.ImagePositionPatient = [_ds(v) for v in affine[:3, 3]]
    ds.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
    offsets = np.arange(count) * step
    if absolute_offsets:
        offsets = offsets + float(affine[2, 3])
    ds.GridFrameOffsetVector = [_ds(v) for v in offsets]
    ds.FrameIncrementPointer = 0x3004000C
    ds.NumberOfFrames = count
    ds.DoseUnits = units
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = _ds(scaling)
    stored = np.round(dose_gy / scaling).astype(np.uint32)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    return Source(name=name, data=to_bytes(ds))


UIH_CREATOR = "Image Private Header"


def make_uih_grid(
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    series_uid: str | None = None,
    acquisition_number: int = 1,
    with_frame_positions: bool = True,
    with_slice_normal: bool = True,
    name: str = "uih_grid.dcm",
) -> Source:
    """A United Imaging (UIH) "GRID" image: the slices of one volume tiled in one 2D image.

    Layout as UIH documents it (dcm2niix ``UIH/README.md``): (0065,1050) holds the
    slice count n; the grid has ``ceil(sqrt(n))`` tile columns and ``ceil(n / cols)``
    tile rows, slices filled row by row; (0065,1051) MR VFrame Sequence holds one
    item per slice with its own (0020,0032); the top-level (0020,0032) is that of
    the first slice (dicm2nii applies no Siemens-style corner shift to UIH).

    Parameters
    ----------
    volume : (K, rows, columns) uint16 ndarray
        Slices in acquisition (tile) order.
    affine : (4, 4) ndarray
        LPS affine of ``(column, row, k)``.
    """
    volume = np.asarray(volume)
    count, rows, columns = volume.shape
    grid_columns = int(np.ceil(np.sqrt(count)))
    grid_rows = int(np.ceil(count / grid_columns))
    mosaic = np.zeros((grid_rows * rows, grid_columns * columns), dtype=volume.dtype)
    for k in range(count):
        r, c = divmod(k, grid_columns)
        mosaic[r * rows : (r + 1) * rows, c * columns : (c + 1) * columns] = volume[k]
    col_spacing = float(np.linalg.norm(affine[:3, 0]))
    row_spacing = float(np.linalg.norm(affine[:3, 1]))
    step = affine[:3, 2]
    ds = _base_dataset(MR_IMAGE, "MR", generate_uid(), series_uid or generate_uid(), generate_uid(), 9, "uih grid")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Manufacturer = "UIH"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "VFRAME"]
    ds.InstanceNumber = acquisition_number
    ds.AcquisitionNumber = acquisition_number
    ds.ImageOrientationPatient = [_ds(v) for v in [*(affine[:3, 0] / col_spacing), *(affine[:3, 1] / row_spacing)]]
    ds.ImagePositionPatient = [_ds(v) for v in affine[:3, 3]]
    ds.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
    ds.SliceThickness = _ds(float(np.linalg.norm(step)))
    ds.SpacingBetweenSlices = _ds(float(np.linalg.norm(step)))
    block = ds.private_block(0x0065, UIH_CREATOR, create=True)
    block.add_new(0x50, "DS", str(count))
    if with_slice_normal:
        block.add_new(0x14, "DS", [_ds(v) for v in step / np.linalg.norm(step)])
    if with_frame_positions:
        items = []
        for k in range(count):
            item = Dataset()
            item.ImagePositionPatient = [_ds(v) for v in (affine @ [0.0, 0.0, float(k), 1.0])[:3]]
            item.AcquisitionDateTime = f"20240101120000.{k:03d}"
            items.append(item)
        block.add_new(0x51, "SQ", DicomSequence(items))
    _set_pixels(ds, mosaic, None, None)
    return Source(name=name, data=to_bytes(ds))


def make_palette_image(indices: np.ndarray, red: np.ndarray, green: np.ndarray, blue: np.ndarray,
                       *, entry_bits: int = 16, name: str = "palette.dcm") -> Source:  # fmt: skip
    """A PALETTE COLOR image: 8-bit indices and three lookup tables of ``entry_bits`` bits per entry."""
    indices = np.asarray(indices, dtype=np.uint8)
    ds = _base_dataset(SECONDARY_CAPTURE, "OT", generate_uid(), generate_uid(), generate_uid(), 1, "palette")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    _set_pixels(ds, indices, "PALETTE COLOR", None)
    dtype = np.uint16 if entry_bits == 16 else np.uint8
    for colour, table in (("Red", red), ("Green", green), ("Blue", blue)):
        table = np.asarray(table, dtype=dtype)
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [len(table), 0, entry_bits])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.tobytes())
    return Source(name=name, data=to_bytes(ds))


def make_dicomdir(referenced_paths: Sequence[Sequence[str]], name: str = "DICOMDIR") -> Source:
    """A DICOMDIR whose IMAGE records name ``referenced_paths`` (path components, e.g. ["..", "etc", "passwd"])."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = "TOMOFORGE"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    records = []
    for path in referenced_paths:
        record = Dataset()
        record.OffsetOfTheNextDirectoryRecord = 0
        record.RecordInUseFlag = 0xFFFF
        record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
        record.DirectoryRecordType = "IMAGE"
        record.ReferencedFileID = list(path)
        record.ReferencedSOPClassUIDInFile = CT_IMAGE
        record.ReferencedSOPInstanceUIDInFile = generate_uid()
        record.ReferencedTransferSyntaxUIDInFile = ExplicitVRLittleEndian
        records.append(record)
    ds.DirectoryRecordSequence = DicomSequence(records)
    return Source(name, to_bytes(ds))


def part10_big_endian(source: Source) -> Source:
    """The same file re-encoded as Explicit VR Big Endian (meta header stays little endian, PS3.10 7.1).

    pydicom refuses to change a dataset's endianness when saving and keeps pixel
    bytes as they are, so the dataset is written element by element and the pixel
    words are swapped here.
    """
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import ExplicitVRBigEndian

    ds = pydicom.dcmread(io.BytesIO(source.data))
    swap_pixel_bytes(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, ds.file_meta, enforce_standard=True)
    buffer.is_little_endian = False
    write_dataset(buffer, ds)
    return Source(source.name, buffer.getvalue())
