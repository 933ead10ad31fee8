"""Any volume -> a classic DICOM series (one Part-10 file per slice), verified by reading it back.

What makes an export usable by other tools:

* every study- and series-level attribute (UIDs, dates, times, numbers, frame of
  reference, rescale) is the same object in every file, so dcm2niix and PACS see
  exactly one series (dcm2niix splits a series whose StudyTime differs);
* geometry from the affine, converted once from RAS to DICOM's LPS:
  (0020,0032) Image Position (Patient) per slice, (0020,0037) Image Orientation
  (Patient), (0028,0030) Pixel Spacing, (0018,0050) Slice Thickness and
  (0018,0088) Spacing Between Slices;
* integers stored exactly in 16 bits (with an integer intercept when needed),
  floats through (0028,1053) Rescale Slope / (0028,1052) Rescale Intercept with an
  error of at most slope/2;
* in-plane axes chosen so the images look as radiologists expect (patient's right on
  the viewer's left, anterior or superior at the top).

:func:`export_dicom_series` reads the files back with our own loader
(:func:`core.io.scan`) and compares voxels and affine before returning them, so
an export that does not round-trip is never offered.

References
----------
DICOM PS3.3 C.7.6.2 (Image Plane), C.7.6.3 (Image Pixel), C.8.2.1 (CT Image),
C.8.3.1 (MR Image), A.8 (Secondary Capture); PS3.10 (file format).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from core.errors import CoreError, SeriesGeometryError, UnsupportedFileError
from core.sources import Source
from core.volume import LPS_TO_RAS, Volume, reorient_to_ras

# Orthogonality needed for (0020,0037): two unit vectors at right angles.
ORTHOGONAL_TOLERANCE = 1e-5
# Read-back tolerance on world positions (issue 5: affine within 1e-4 mm).
AFFINE_TOLERANCE_MM = 1e-4

# Attributes copied from a reference dataset: Patient (C.7.1.1) and General Study (C.7.2.1).
PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
)
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


@dataclass(frozen=True)
class SlicePlan:
    """How a volume is cut into DICOM images.

    ``slice_axis`` is the volume axis that becomes the image index; the column index
    of each image runs along ``column_axis`` (DICOM's row direction) and its row index
    along ``row_axis``; a flip means the image runs against the volume axis.
    """

    slice_axis: int
    column_axis: int
    row_axis: int
    flip_columns: bool
    flip_rows: bool


@dataclass(frozen=True)
class PixelEncoding:
    """Stored 16-bit (or RGB 8-bit) pixels and the rescale that rebuilds the volume's values."""

    stored: np.ndarray
    slope: str
    intercept: str
    exact: bool
    max_error: float
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class DicomExport:
    """A verified DICOM series: ``files`` are ``(name, Part-10 bytes)`` in slice order."""

    files: tuple[tuple[str, bytes], ...]
    series_instance_uid: str
    plan: SlicePlan
    exact: bool
    max_error: float
    warnings: tuple[str, ...] = ()

    def zip_bytes(self, folder: str = "") -> bytes:
        """All files in one zip, under ``folder/`` when given."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for name, data in self.files:
                archive.writestr(f"{folder}/{name}" if folder else name, data)
        return buffer.getvalue()


def read_reference(data: bytes, name: str = "reference") -> Dataset:
    """Parse a reference DICOM file (headers only) whose patient and study attributes an export copies.

    Raises
    ------
    UnsupportedFileError
        The bytes are not a DICOM dataset.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise UnsupportedFileError(
            f"{name}: not a readable DICOM file ({err}). Upload one image of the study to copy from.", source=name
        ) from err
    if "PatientID" not in ds and "PatientName" not in ds and "StudyInstanceUID" not in ds:
        raise UnsupportedFileError(
            f"{name}: has no patient or study attributes to copy ((0010,0010), (0010,0020), (0020,000D)).",
            source=name,
        )
    return ds


# --------------------------------------------------------------------------- planning


def plan_slices(affine: np.ndarray, shape: Sequence[int], slice_axis: int | None = None) -> SlicePlan:
    """Choose the slice axis and the in-plane layout of the images.

    Parameters
    ----------
    affine : (4, 4) ndarray
        Voxel -> RAS+ mm.
    shape : sequence of int
        Spatial shape ``(I, J, K)``.
    slice_axis : int, optional
        Force the axis the images are stacked along. By default the axis with the
        thickest voxels (more than 1 % thicker than the others), else the one with the
        fewest voxels, else ``k``: the acquisition's own slices in most cases.

    Raises
    ------
    SeriesGeometryError
        The two in-plane axes are not orthogonal (DICOM images are rectangles).
    """
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    units = columns / spacing

    def in_plane_cosine(axis: int) -> float:
        p, q = (a for a in range(3) if a != axis)
        return abs(float(units[:, p] @ units[:, q]))

    if slice_axis is None:
        candidates = [a for a in range(3) if in_plane_cosine(a) <= ORTHOGONAL_TOLERANCE]
        if not candidates:
            raise SeriesGeometryError(
                f"no pair of volume axes is orthogonal (affine {np.round(affine, 4).tolist()}); a DICOM image must "
                "be a rectangle. Resample the volume to an orthogonal grid first."
            )
        thickest = max(candidates, key=lambda a: spacing[a])
        others = [spacing[a] for a in range(3) if a != thickest]
        if spacing[thickest] > 1.01 * max(others):
            slice_axis = thickest
        else:
            fewest = min(int(shape[a]) for a in candidates)
            slice_axis = (
                2
                if 2 in candidates and int(shape[2]) == fewest
                else min(a for a in candidates if int(shape[a]) == fewest)
            )
    elif in_plane_cosine(slice_axis) > ORTHOGONAL_TOLERANCE:
        raise SeriesGeometryError(
            f"the in-plane axes of slice axis {slice_axis} are not orthogonal (cosine {in_plane_cosine(slice_axis):.3g}); "
            "choose another slice axis or resample the volume."
        )
    p, q = (a for a in range(3) if a != slice_axis)
    lps = LPS_TO_RAS[:3, :3] @ units  # LPS is its own inverse of RAS: negate x and y
    normal = np.cross(lps[:, p], lps[:, q])
    plane = int(np.argmax(np.abs(normal)))  # 0 sagittal, 1 coronal, 2 axial (LPS x, y, z)
    # Radiological conventions: axial rows run to +x (L) and columns to +y (P); coronal
    # rows to +x, columns to -z (feet); sagittal rows to +y, columns to -z.
    row_target, column_target = {2: ((0, 1.0), (1, 1.0)), 1: ((0, 1.0), (2, -1.0)), 0: ((1, 1.0), (2, -1.0))}[plane]
    if abs(lps[row_target[0], p]) >= abs(lps[row_target[0], q]):
        column_axis, row_axis = p, q
    else:
        column_axis, row_axis = q, p
    flip_columns = lps[row_target[0], column_axis] * row_target[1] < 0
    flip_rows = lps[column_target[0], row_axis] * column_target[1] < 0
    return SlicePlan(slice_axis, column_axis, row_axis, bool(flip_columns), bool(flip_rows))


def _image_stack(array: np.ndarray, plan: SlicePlan) -> np.ndarray:
    """The volume as ``(rows, columns, slices, *rest)`` in image order (a view)."""
    stack = np.moveaxis(array, (plan.row_axis, plan.column_axis, plan.slice_axis), (0, 1, 2))
    if plan.flip_rows:
        stack = stack[::-1]
    if plan.flip_columns:
        stack = stack[:, ::-1]
    return stack


# --------------------------------------------------------------------------- pixels


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def encode_pixels(array: np.ndarray, *, is_rgb: bool = False) -> PixelEncoding:
    """Store values in 16 bits (8-bit RGB), exactly when possible.

    Integers (and floats holding only integers) whose range spans at most 65536
    values are stored exactly, as int16/uint16 with an integer intercept if needed.
    Other data are quantised to uint16 with ``value = stored * slope + intercept``;
    slope and intercept are rounded to their 16-character DS text *before* the
    quantisation so the file rebuilds every value within slope/2.

    Parameters
    ----------
    array : ndarray
        Voxel values in physical units.

    Returns
    -------
    PixelEncoding
    """
    warnings: list[str] = []
    if is_rgb:
        if array.dtype != np.uint8:
            if not (np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255):
                raise SeriesGeometryError(f"RGB volume of type {array.dtype} does not fit 8 bits per component.")
            array = array.astype(np.uint8)
        return PixelEncoding(array, "1", "0", True, 0.0)
    values = array
    if np.issubdtype(values.dtype, np.floating):
        finite = np.isfinite(values)
        if not finite.all():
            fill = float(values[finite].min()) if finite.any() else 0.0
            warnings.append(
                f"{int(np.count_nonzero(~finite))} voxels are NaN or infinite; DICOM cannot store them, so they "
                f"were written as the minimum value {fill:g}."
            )
            values = np.where(finite, values, fill)
    if values.size == 0:
        raise SeriesGeometryError("the volume has no voxels")
    low, high = float(values.min()), float(values.max())
    integral = (
        np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_ or np.array_equal(values, np.round(values))
    )
    if integral and high - low <= 65535:
        if -32768 <= low and high <= 32767:
            return PixelEncoding(values.astype(np.int16, copy=False), "1", "0", True, 0.0, tuple(warnings))
        if 0 <= low and high <= 65535:
            return PixelEncoding(values.astype(np.uint16, copy=False), "1", "0", True, 0.0, tuple(warnings))
        offset = int(low)
        stored = (values.astype(np.int64) - offset).astype(np.uint16)
        return PixelEncoding(stored, "1", str(offset), True, 0.0, tuple(warnings))
    # Lossy: quantise to 65535 steps. Slope and intercept are taken as the DS strings
    # will be read back, so the error bound holds for the file, not just in memory.
    intercept_text = _ds(low)
    intercept = float(intercept_text)
    slope_text = _ds((high - intercept) / 65535.0 * (1 + 1e-9) if high > intercept else 1.0)
    slope = float(slope_text)
    while (high - intercept) / slope > 65535.0:
        slope_text = _ds(slope * (1 + 1e-7))
        slope = float(slope_text)
    quantised = np.clip(np.round((values.astype(np.float64) - intercept) / slope), 0, 65535)
    error = float(np.max(np.abs(quantised * slope + intercept - values)))
    warnings.append(
        f"values are not integers (or span more than 16 bits): stored with (0028,1053) Rescale Slope {slope_text} "
        f"and (0028,1052) Rescale Intercept {intercept_text}; largest rounding error {error:.3g}."
    )
    return PixelEncoding(quantised.astype(np.uint16), slope_text, intercept_text, False, error, tuple(warnings))


# --------------------------------------------------------------------------- datasets


def _sop_class(modality: str, is_rgb: bool) -> tuple[str, str]:
    """SOP Class and the Modality value written."""
    if is_rgb:
        return SecondaryCaptureImageStorage, modality or "OT"
    if modality == "CT":
        return CTImageStorage, "CT"
    if modality == "MR":
        return MRImageStorage, "MR"
    return SecondaryCaptureImageStorage, modality or "OT"


def _window(stored: np.ndarray, slope: float, intercept: float) -> tuple[str, str]:
    """A display window from the 1st-99th percentiles of a subsample (fast on 100 M voxels)."""
    flat = stored.reshape(-1)
    sample = flat[:: max(1, flat.size // 200_000)].astype(np.float64) * slope + intercept
    low, high = np.percentile(sample, [1, 99])
    if high <= low:
        low, high = float(sample.min()), float(sample.max()) + 1
    return _ds((low + high) / 2), _ds(high - low)


def export_dicom_series(
    volume: Volume,
    *,
    series_description: str = "TomoForge export",
    series_number: int = 1001,
    modality: str | None = None,
    reference: Dataset | None = None,
    copy_frame_of_reference: bool = False,
    slice_axis: int | None = None,
    verify: bool = True,
) -> DicomExport:
    """Write a volume as a classic single-frame DICOM series and check it by reading it back.

    Parameters
    ----------
    volume : Volume
        3D, 4D (time) or RGB. 4D volumes become one image per slice and time point,
        with (0020,0100) Temporal Position Identifier.
    series_description, series_number :
        (0008,103E) and (0020,0011).
    modality : str, optional
        Defaults to the volume's: CT -> CT Image Storage, MR -> MR Image Storage,
        anything else (and RGB) -> Secondary Capture.
    reference : pydicom Dataset, optional
        Patient (C.7.1.1) and General Study (C.7.2.1) attributes are copied from it,
        so the export joins the reference's study. Nothing else is copied.
    copy_frame_of_reference : bool
        Also copy (0020,0052) Frame of Reference UID: only when the volume is in the
        reference's scanner space (e.g. a segmentation of it).
    slice_axis : int, optional
        See :func:`plan_slices`.
    verify : bool
        Read the files back with :func:`core.io.scan` and compare (always on in the app).

    Returns
    -------
    DicomExport

    Raises
    ------
    SeriesGeometryError
        The volume cannot be described by DICOM images, or the read-back differs
        (with the values).
    """
    affine = np.asarray(volume.affine, dtype=np.float64)
    plan = plan_slices(affine, volume.spatial_shape, slice_axis)
    encoding = encode_pixels(volume.array, is_rgb=volume.is_rgb)
    stack = _image_stack(encoding.stored, plan)
    n_rows, n_columns, n_slices = stack.shape[:3]
    n_times = volume.n_frames

    # Geometry in LPS (DICOM) from the RAS affine.
    lps = LPS_TO_RAS @ affine
    column_vector = lps[:3, plan.column_axis] * (-1 if plan.flip_columns else 1)
    row_vector = lps[:3, plan.row_axis] * (-1 if plan.flip_rows else 1)
    column_spacing = float(np.linalg.norm(column_vector))
    row_spacing = float(np.linalg.norm(row_vector))
    row_direction = column_vector / column_spacing  # IOP[:3]: along a row, the column index grows
    column_direction = row_vector / row_spacing  # IOP[3:]
    normal = np.cross(row_direction, column_direction)
    step = lps[:3, plan.slice_axis]
    slice_spacing = abs(float(step @ normal))
    corner = np.zeros(3)
    corner[plan.column_axis] = volume.spatial_shape[plan.column_axis] - 1 if plan.flip_columns else 0
    corner[plan.row_axis] = volume.spatial_shape[plan.row_axis] - 1 if plan.flip_rows else 0
    first_position = lps[:3, :3] @ corner + lps[:3, 3]

    sop_class, written_modality = _sop_class(
        (modality if modality is not None else volume.modality).upper(), volume.is_rgb
    )
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    common = Dataset()
    common.SpecificCharacterSet = "ISO_IR 100"
    common.SOPClassUID = sop_class
    common.Modality = written_modality
    common.PatientName = ""
    common.PatientID = ""
    common.PatientBirthDate = ""
    common.PatientSex = ""
    common.StudyInstanceUID = study_uid
    common.StudyDate = date
    common.StudyTime = time
    common.StudyID = ""
    common.AccessionNumber = ""
    common.ReferringPhysicianName = ""
    common.SeriesInstanceUID = series_uid
    common.SeriesNumber = int(series_number)
    common.SeriesDate = date
    common.SeriesTime = time
    common.ContentDate = date
    common.ContentTime = time
    common.SeriesDescription = series_description[:64]
    common.FrameOfReferenceUID = frame_uid
    common.PositionReferenceIndicator = ""
    if written_modality in ("CT", "MR"):
        common.PatientPosition = ""  # type 2C for CT and MR: present, unknown for a derived volume
    common.Manufacturer = "TomoForge"
    common.SoftwareVersions = "TomoForge"
    common.ImageType = ["DERIVED", "SECONDARY"] + (["AXIAL"] if written_modality == "CT" else [])
    common.ImageOrientationPatient = [_ds(v) for v in (*row_direction, *column_direction)]
    common.PixelSpacing = [_ds(row_spacing), _ds(column_spacing)]
    common.SliceThickness = _ds(slice_spacing)
    common.SpacingBetweenSlices = _ds(slice_spacing)
    common.Rows = int(n_rows)
    common.Columns = int(n_columns)
    if volume.is_rgb:
        common.SamplesPerPixel = 3
        common.PhotometricInterpretation = "RGB"
        common.PlanarConfiguration = 0
        common.BitsAllocated = 8
        common.BitsStored = 8
        common.HighBit = 7
        common.PixelRepresentation = 0
    else:
        common.SamplesPerPixel = 1
        common.PhotometricInterpretation = "MONOCHROME1" if volume.display_inverted else "MONOCHROME2"
        common.BitsAllocated = 16
        common.BitsStored = 16
        common.HighBit = 15
        common.PixelRepresentation = 1 if encoding.stored.dtype == np.int16 else 0
        common.RescaleIntercept = encoding.intercept
        common.RescaleSlope = encoding.slope
        common.RescaleType = "HU" if written_modality == "CT" else "US"
        center, width = _window(encoding.stored, float(encoding.slope), float(encoding.intercept))
        common.WindowCenter = center
        common.WindowWidth = width
    if written_modality == "CT":
        common.KVP = ""
        common.AcquisitionNumber = 1
    elif written_modality == "MR":
        common.ScanningSequence = "RM"  # research mode: the sequence is unknown
        common.SequenceVariant = "NONE"
        common.ScanOptions = ""
        common.MRAcquisitionType = ""
        common.RepetitionTime = ""
        common.EchoTime = ""
        common.EchoTrainLength = ""
    if sop_class == SecondaryCaptureImageStorage:
        common.ConversionType = "WSD"  # workstation
    if n_times > 1:
        common.NumberOfTemporalPositions = int(n_times)
    if reference is not None:
        _copy_reference(common, reference, copy_frame_of_reference)

    files: list[tuple[str, bytes]] = []
    digits = max(4, len(str(n_slices * n_times)))
    for t in range(n_times):
        for n in range(n_slices):
            instance = t * n_slices + n + 1
            position = first_position + n * step
            image = stack[:, :, n, t] if n_times > 1 else stack[:, :, n]
            ds = _slice_dataset(common, position, normal, image, instance, t if n_times > 1 else None)
            files.append((f"IM{instance:0{digits}d}.dcm", _part10_bytes(ds)))

    result = DicomExport(
        files=tuple(files),
        series_instance_uid=series_uid,
        plan=plan,
        exact=encoding.exact,
        max_error=encoding.max_error,
        warnings=encoding.warnings,
    )
    if verify:
        verify_dicom_export(result, volume, slope=float(encoding.slope))
    return result


def _copy_reference(common: Dataset, reference: Dataset, copy_frame_of_reference: bool) -> None:
    keywords = list(PATIENT_KEYWORDS) + list(STUDY_KEYWORDS)
    if copy_frame_of_reference:
        keywords.append("FrameOfReferenceUID")
    if "SpecificCharacterSet" in reference:
        # Copied names are decoded with the reference's character set; keep it.
        common.SpecificCharacterSet = reference.SpecificCharacterSet
    for keyword in keywords:
        if keyword in reference:
            element = reference[keyword]
            common[element.tag] = DataElement(element.tag, element.VR, element.value)


def _slice_dataset(
    common: Dataset, position: np.ndarray, normal: np.ndarray, image: np.ndarray, instance: int, time_index: int | None
) -> Dataset:
    # A new Dataset sharing the common elements: they are never mutated, and sharing
    # them is what guarantees identical series-level values in every file.
    ds = Dataset()
    for element in common:
        ds[element.tag] = element
    sop_uid = generate_uid()
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(float(position @ normal))
    if time_index is not None:
        ds.TemporalPositionIdentifier = time_index + 1
        ds.AcquisitionNumber = time_index + 1
    ds.PixelData = np.ascontiguousarray(image).astype(image.dtype.newbyteorder("<"), copy=False).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = common.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "TOMOFORGE"
    ds.file_meta = meta
    return ds


def _part10_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------- verification


def verify_dicom_export(export: DicomExport, volume: Volume, *, slope: float = 1.0) -> None:
    """Read an export back with :func:`core.io.scan` and compare it with the volume.

    Passes when the files form exactly one series whose world geometry matches
    within 1e-4 mm (corner voxels compared in world space, whatever the voxel
    order) and whose voxels are equal (exact encodings) or within slope/2 (plus
    the float rounding of the loaded values).

    Raises
    ------
    SeriesGeometryError
        With what differs and by how much.
    """
    from core.io import scan  # late: core.io imports every reader, not needed to build files

    result = scan([Source(name=name, data=data) for name, data in export.files])
    if len(result.series) != 1:
        found = ", ".join(f"{s.info.id} {s.info.shape}" for s in result.series) or "none"
        errors = "; ".join(e.message for e in result.errors[:3])
        raise SeriesGeometryError(
            f"DICOM export check: the {len(export.files)} written files read back as {len(result.series)} series "
            f"({found}){': ' + errors if errors else ''}. The export was not offered."
        )
    try:
        loaded = result.series[0].load()
    except CoreError as err:
        raise SeriesGeometryError(
            f"DICOM export check: the written series cannot be loaded back: {err.message}"
        ) from err
    compare_volumes(loaded, volume, exact=export.exact, tolerance=slope / 2, label="DICOM export check")


def compare_volumes(
    loaded: Volume, original: Volume, *, exact: bool, tolerance: float = 0.0, label: str = "read-back"
) -> None:
    """Compare two volumes in world space (both reoriented to RAS+ first).

    Raises
    ------
    SeriesGeometryError
        Shapes differ, corner positions differ by more than 1e-4 mm, or voxels differ
        (at all when ``exact``, else by more than ``tolerance`` plus float rounding).
    """
    a_array, a_affine = reorient_to_ras(np.asarray(loaded.array), loaded.affine)
    b_array, b_affine = reorient_to_ras(np.asarray(original.array), original.affine)
    if a_array.shape != b_array.shape:
        raise SeriesGeometryError(f"{label}: read back shape {a_array.shape}, expected {b_array.shape}.")
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in b_array.shape[:3]], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    distance = float(np.max(np.linalg.norm((a_affine @ corners - b_affine @ corners)[:3], axis=0)))
    if distance > AFFINE_TOLERANCE_MM:
        raise SeriesGeometryError(
            f"{label}: corner voxels moved by {distance:.3g} mm (tolerance {AFFINE_TOLERANCE_MM} mm). "
            "The geometry did not survive the export."
        )
    if exact:
        if not np.array_equal(a_array, b_array):
            differ = int(np.count_nonzero(a_array != b_array))
            raise SeriesGeometryError(
                f"{label}: {differ} voxels differ from the original although the encoding is exact."
            )
        return
    difference = np.abs(a_array.astype(np.float64) - b_array.astype(np.float64))
    rounding = 4 * float(np.finfo(np.float32).eps) * float(np.max(np.abs(b_array))) if b_array.size else 0.0
    worst = float(difference.max()) if difference.size else 0.0
    if worst > tolerance * (1 + 1e-6) + rounding:
        raise SeriesGeometryError(f"{label}: voxels differ by up to {worst:.4g}, more than slope/2 = {tolerance:.4g}.")
