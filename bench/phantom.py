"""CT phantom series for the benchmark: the sample chest phantom written as a real DICOM series.

The voxels come from :func:`core.sample.make_sample_ct` (HU, RAS+ order). They are
written the way a CT scanner exports them: one uncompressed (Explicit VR Little
Endian) file per axial slice, CT Image Storage, 12-bit unsigned stored values with
(0028,1052) Rescale Intercept -1024, Image Orientation (Patient) 1\\0\\0\\0\\1\\0 (rows
towards the patient's left, columns towards posterior, LPS), slices 0.8 mm apart at
512 x 512 x 300.

A longer series (the 2000-slice scale check) repeats the phantom's slices back and
forth (0..K-1, K-1..0, ...) at the same spacing, so it looks like a whole-body scan
of the same anatomy without generating a 1 GB phantom first.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from core.sample import make_sample_ct
from core.volume import Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RESCALE_INTERCEPT = -1024
BITS_STORED = 12


def phantom_volume(shape: tuple[int, int, int]) -> Volume:
    """The chest phantom of ``shape`` voxels (int16 HU, RAS+), see :mod:`core.sample`."""
    return make_sample_ct(shape)


def slice_order(n_source: int, n_slices: int) -> np.ndarray:
    """Which source slice each written slice shows: 0..K-1, then back K-1..0, and so on.

    Parameters
    ----------
    n_source : int
        Slices in the phantom (K).
    n_slices : int
        Slices to write (may exceed K).

    Returns
    -------
    (n_slices,) int ndarray
    """
    period = np.concatenate([np.arange(n_source), np.arange(n_source)[::-1]])
    return period[np.arange(n_slices) % period.size]


def series_volume(volume: Volume, n_slices: int | None = None) -> np.ndarray:
    """The (I, J, n_slices) int16 HU array the written series holds, in RAS+ order (for checks)."""
    n = volume.shape[2] if n_slices is None else n_slices
    return np.asarray(volume.array)[:, :, slice_order(volume.shape[2], n)]


def _template(volume: Volume, description: str) -> Dataset:
    spacing = volume.spacing_mm
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.Modality = "CT"
    ds.Manufacturer = "TomoForge benchmark"
    ds.SeriesDescription = description
    ds.PatientName = "Phantom^Benchmark"
    ds.PatientID = "BENCH0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = "120"
    ds.SliceThickness = f"{spacing[2]:.10g}"
    ds.ConvolutionKernel = "B30f"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    # DICOM order: row spacing (between rows, along y), then column spacing (along x).
    ds.PixelSpacing = [f"{spacing[1]:.10g}", f"{spacing[0]:.10g}"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = volume.shape[1]
    ds.Columns = volume.shape[0]
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def write_ct_series(
    volume: Volume, folder: Path, *, n_slices: int | None = None, description: str = "Benchmark chest phantom"
) -> list[Path]:
    """Write ``volume`` (int16 HU, axis-aligned RAS+) as one DICOM file per axial slice.

    Parameters
    ----------
    volume : Volume
        From :func:`phantom_volume`: diagonal affine, values in -1024..3071 HU.
    folder : Path
        Created if needed; files are named ``IM00001.dcm``...
    n_slices : int, optional
        Slices to write (default: the volume's); more than the volume repeats its slices
        back and forth (:func:`slice_order`) with positions continuing at the same spacing.

    Returns
    -------
    list of Path
        The files, in slice order (inferior to superior).
    """
    affine = np.asarray(volume.affine)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(np.diag(affine)[:3] <= 0):
        raise ValueError("write_ct_series needs an axis-aligned RAS+ volume (diagonal affine, positive spacing)")
    n_i, n_j, n_k = volume.shape[:3]
    n = n_k if n_slices is None else int(n_slices)
    spacing = volume.spacing_mm
    # Column c is voxel i = I-1-c and row r is j = J-1-r: DICOM LPS x, y are RAS -x, -y.
    x_ras_last = affine[0, 3] + spacing[0] * (n_i - 1)
    y_ras_last = affine[1, 3] + spacing[1] * (n_j - 1)
    folder.mkdir(parents=True, exist_ok=True)
    ds = _template(volume, description)
    # Slices made contiguous once ((k, i*j): a 2D transpose, cheaper than a strided copy per file).
    array = np.asarray(volume.array)
    by_slice = np.ascontiguousarray(array.reshape(n_i * n_j, n_k).T)
    order = slice_order(n_k, n)
    paths = []
    for k in range(n):
        hu = by_slice[order[k]].reshape(n_i, n_j)[::-1, ::-1].T  # (rows, columns)
        stored = (np.clip(hu, RESCALE_INTERCEPT, 2**BITS_STORED - 1 + RESCALE_INTERCEPT) - RESCALE_INTERCEPT).astype(
            "<u2"
        )
        z = affine[2, 3] + spacing[2] * k
        uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{-x_ras_last:.6f}", f"{-y_ras_last:.6f}", f"{z:.6f}"]
        ds.SliceLocation = f"{z:.6f}"
        ds.PixelData = stored.tobytes()
        path = folder / f"IM{k + 1:05d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def zip_folder(folder: Path, target: Path) -> Path:
    """Deflate every file of ``folder`` into ``target``.

    Level 1 keeps the benchmark's set-up short; inflating (what is measured) costs
    about the same at any level.
    """
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, arcname=f"{folder.name}/{path.name}")
    return target
