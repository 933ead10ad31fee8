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
