"""Conversion of series to NIfTI, DICOM, NRRD and MetaImage, with geometry that is right or says why not.

Pipeline for one series (:func:`convert_series`):

1. :func:`core.qa.qa_report` checks the slice geometry from the headers.
2. :func:`regularize` resamples a gantry-tilted stack to an orthogonal grid (as
   dcm2niix's ``_Tilt`` output) and an unevenly spaced or gapped stack to equal
   spacing (as dcm2niix's ``_Eq``), each with a warning stating the values; or
   refuses uneven spacing when ``strict``. A correct stack passes untouched.
3. The writer of the chosen format: :mod:`core.nifti_export`,
   :mod:`core.dicom_export` (verified by reading back), or the small NRRD and
   MetaImage writers below (self-contained: data attached and gzip/zlib
   compressed; only geometry in the header, never patient data).

Output names follow dcm2niix (``<series number>_<description>``, sanitised, with
``_Tilt``/``_Eq`` suffixes); no patient name ever enters a name or a header.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import json
import math
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from isal import isal_zlib
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from core.deidentify import safe_description
from core.dicom_export import export_dicom_series
from core.errors import CoreError, SeriesGeometryError
from core.nifti_export import XFORM_ALIGNED, XFORM_SCANNER, bids_sidecar, gzip_to, nifti_storage, write_nifti
from core.outputs import replacing
from core.qa import QAReport, SliceStack, report_from_stack, slice_stack
from core.series import Problem, Series, SeriesInfo
from core.sources import DEFAULT_LIMITS, Limits, Source
from core.volume import LPS_TO_RAS, Volume, reorient_to_ras
from core.worker import DEFAULT_WORKER_LIMITS, WorkerLimits, run_in_worker

FORMATS = ("nifti", "dicom", "nrrd", "mha")

# Below this interpolation weight an output slice is the source slice itself (no blur).
_SNAP = 1e-6


@dataclass(frozen=True)
class ConvertOptions:
    """What to convert to and how.

    Attributes
    ----------
    to : str
        ``"nifti"``, ``"dicom"``, ``"nrrd"`` or ``"mha"``.
    compress : bool
        NIfTI: ``.nii.gz`` (True, default) or ``.nii``.
    sidecar : bool
        NIfTI from DICOM: also write a BIDS-style JSON of acquisition parameters.
    strict : bool
        Refuse unevenly spaced or gapped series instead of resampling them.
    reference : pydicom Dataset, optional
        DICOM export: copy patient and study attributes from it.
    """

    to: str = "nifti"
    compress: bool = True
    sidecar: bool = False
    strict: bool = False
    reference: Dataset | None = None

    def __post_init__(self) -> None:
        if self.to not in FORMATS:
            raise ValueError(f"unknown output format {self.to!r}; choose one of {', '.join(FORMATS)}")


Writer = Callable[[BinaryIO], None]


@dataclass(frozen=True)
class Conversion:
    """The files of one converted series.

    ``writers`` are ``(relative path, write(stream))``: the image is encoded when it
    is asked for, straight into a file (:meth:`write`, the CLI) or into memory
    (:attr:`outputs`, the app), so a 150 MB volume is never held twice. ``primary``
    is the path a user asks for (the image file, or the folder of a DICOM series).
    The checks that refuse a conversion (geometry, DICOM read-back) have run when a
    Conversion exists; encoding the image can still raise :class:`CoreError` for a
    voxel type the format cannot hold.
    """

    series_id: str
    primary: str
    writers: tuple[tuple[str, Writer], ...]
    warnings: tuple[str, ...]
    report: QAReport
    stem: str = ""  # base name of the outputs, with the _Tilt/_Eq suffix
    resampled: str = ""  # "", "Tilt", "Eq" or "Tilt_Eq"

    @functools.cached_property
    def outputs(self) -> tuple[tuple[str, bytes], ...]:
        """``(relative path, bytes)`` of every file, encoded once."""
        files = []
        for name, write in self.writers:
            data = _constant_data(write)
            if data is None:
                buffer = io.BytesIO()
                write(buffer)
                data = buffer.getvalue()
            files.append((name, data))  # encoded files are shared with their writers, not copied
        return tuple(files)

    def write(self, folder: Path) -> list[Path]:
        """Write every file under ``folder`` (created if needed), streaming the image."""
        written = []
        for name, write in self.writers:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with replacing(target) as stream:
                write(stream)
            written.append(target)
        return written

    @property
    def nbytes(self) -> int:
        return sum(len(data) for _, data in self.outputs)

    def zip_bytes(self) -> bytes:
        return zip_outputs(self.outputs)


def _constant(data: bytes) -> Writer:
    # A partial of a module-level function, not a closure: a Conversion of encoded files
    # pickles, so a worker process can send it back (convert_loaded).
    return functools.partial(_write_constant, data)


def _write_constant(data: bytes, stream: BinaryIO) -> None:
    stream.write(data)


def _constant_data(write: Writer) -> bytes | None:
    """The bytes a writer made by :func:`_constant` writes, or None for an encoding writer."""
    if isinstance(write, functools.partial) and write.func is _write_constant:
        return write.args[0]  # type: ignore[no-any-return]
    return None


@dataclass(frozen=True)
class Regularized:
    """A volume on a regular orthogonal grid, and what was done to get it there."""

    volume: Volume
    suffix: str
    warnings: tuple[str, ...]


@dataclass
class BatchResult:
    """Every series of an upload converted into one zip.

    ``conversions`` describe what was converted (names, warnings, QA reports) and
    carry no files: those are in ``data``.
    """

    data: bytes
    conversions: list[Conversion] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


# --------------------------------------------------------------------------- resampling


def stack_array(volume: Volume, stack: SliceStack) -> np.ndarray:
    """The volume's voxels in stack order ``(n_columns, n_rows, n_slices, *rest)``.

    The loader reorients arrays to RAS+; this undoes it by matching each volume axis
    to the stack axis it runs along (row direction, column direction, normal), so the
    voxels can be put back where the headers say each slice is.

    Raises
    ------
    SeriesGeometryError
        The volume's axes or shape do not match the headers' stack.
    """
    units = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    targets = np.stack([stack.row_direction, stack.column_direction, stack.normal], axis=1)
    cosines = units.T @ targets  # [volume axis, stack axis]
    order = [int(np.argmax(np.abs(cosines[axis]))) for axis in range(3)]
    if sorted(order) != [0, 1, 2]:
        raise SeriesGeometryError(
            f"the volume's axes do not match its slice orientation (cosines {np.round(cosines, 3).tolist()}); "
            "cannot resample it."
        )
    permutation = [order.index(b) for b in range(3)]
    array = np.asarray(volume.array)
    array = np.moveaxis(array, permutation, (0, 1, 2))
    for b in range(3):
        if cosines[permutation[b], b] < 0:
            array = np.flip(array, axis=b)
    expected = (stack.n_columns, stack.n_rows, stack.n_slices)
    if array.shape[:3] != expected:
        raise SeriesGeometryError(
            f"the volume holds {array.shape[:3]} voxels (columns, rows, slices) but the headers describe "
            f"{expected}; cannot resample it."
        )
    return array


def regularize(volume: Volume, stack: SliceStack, *, strict: bool = False, label: str = "") -> Regularized:
    """Resample a tilted or unevenly spaced stack to a regular orthogonal grid; pass others untouched.

    Parameters
    ----------
    volume : Volume
        The loaded series.
    stack : SliceStack
        Its slice geometry (:func:`core.qa.slice_stack`).
    strict : bool
        Refuse uneven spacing or missing slices instead of resampling.
    label : str
        Names the series in warnings and errors.

    Returns
    -------
    Regularized
        ``suffix`` is ``""``, ``"_Tilt"``, ``"_Eq"`` or ``"_Tilt_Eq"`` (dcm2niix's names).

    Raises
    ------
    SeriesGeometryError
        ``strict`` and the spacing is uneven; or the volume does not match the headers.

    Notes
    -----
    Output voxel ``(i, j, k)`` sits at ``O + i*s0*r + j*s1*c + z_k*n`` with the
    first slice's row and column directions ``r, c`` and pixel sizes ``s0, s1``,
    the normal ``n`` and ``z_k = k * dz``. Each source slice is shifted in-plane by
    its drift (tilt) with linear interpolation; output slices between two source
    slices are linear blends (dcm2niix does the same). For equal spacing the step
    is the smallest source step, shortened so the grid ends on the last slice.
    The in-plane grid grows to hold every shifted slice; voxels outside all of them
    get the volume's minimum (air on CT).
    """
    tilted = stack.is_tilted
    gaps = stack.gap_indices
    uneven = not stack.is_uniform or gaps.size > 0
    if not tilted and not uneven:
        return Regularized(volume, "", ())
    name = f"{label}: " if label else ""
    steps = stack.steps_mm
    median = float(np.median(steps))
    if uneven and strict:
        raise SeriesGeometryError(
            f"{name}slice spacing varies {steps.min():.4g}-{steps.max():.4g} mm (median {median:.4g} mm"
            f"{f', {gaps.size} gap(s) longer than 1.5x the median: missing slices' if gaps.size else ''}). "
            "Refused because strict geometry was asked for; convert without strict to resample to equal "
            "spacing, or upload the complete series."
        )
    data = stack_array(volume, stack)
    spatial: tuple[int, int, int] = (int(data.shape[0]), int(data.shape[1]), int(data.shape[2]))
    rest = tuple(int(n) for n in data.shape[3:])
    flat = data.reshape(spatial + (-1,))
    fill = float(np.min(flat)) if flat.size else 0.0

    spacing = np.asarray(stack.pixel_spacing_mm, dtype=np.float64)
    drift = stack.in_plane_offsets_mm / spacing if tilted else np.zeros((stack.n_slices, 2))
    low = np.floor(drift.min(axis=0) + 1e-9).astype(int)
    high = np.ceil(drift.max(axis=0) - 1e-9).astype(int)
    out_plane = (spatial[0] + int(high[0] - low[0]), spatial[1] + int(high[1] - low[1]))

    distances = stack.distances_mm - stack.distances_mm[0]
    if uneven:
        extent = float(distances[-1])
        intervals = max(1, math.ceil(extent / float(steps.min()) - 1e-6))
        dz = extent / intervals
        z_out = np.arange(intervals + 1) * dz
    else:
        dz = float(distances[-1]) / max(1, stack.n_slices - 1)
        z_out = distances  # slices stay where they are: only the tilt is removed

    # Same type as the input: integers are rounded back (as dcm2niix does), float32 stays float32.
    out = np.empty(out_plane + (len(z_out), flat.shape[-1]), dtype=flat.dtype)
    cache: dict[int, np.ndarray] = {}

    def placed(s: int) -> np.ndarray:
        # Output slices visit source slices in increasing order: two cached planes suffice.
        if s not in cache:
            if len(cache) >= 2:
                cache.pop(min(cache))
            cache[s] = _place_slice(flat[:, :, s, :], drift[s] - low, out_plane, fill)
        return cache[s]

    for k, z in enumerate(z_out):
        if not uneven:
            out[:, :, k, :] = _cast(placed(k), out.dtype)
            continue
        s = int(np.clip(np.searchsorted(distances, z, side="right") - 1, 0, stack.n_slices - 2))
        weight = (z - distances[s]) / (distances[s + 1] - distances[s])
        if weight <= _SNAP:
            out[:, :, k, :] = _cast(placed(s), out.dtype)
        elif weight >= 1 - _SNAP:
            out[:, :, k, :] = _cast(placed(s + 1), out.dtype)
        else:
            out[:, :, k, :] = _cast((1 - weight) * placed(s) + weight * placed(s + 1), out.dtype)

    result = out.reshape(out_plane + (len(z_out),) + rest)
    row, column, normal = stack.row_direction, stack.column_direction, stack.normal
    affine = np.eye(4)
    affine[:3, 0] = row * spacing[0]
    affine[:3, 1] = column * spacing[1]
    affine[:3, 2] = normal * (dz if dz > 0 else 1.0)
    affine[:3, 3] = stack.origins[0] + low[0] * spacing[0] * row + low[1] * spacing[1] * column
    array, affine = reorient_to_ras(result, affine)
    regular = Volume(
        array=array,
        affine=affine,
        modality=volume.modality,
        unit=volume.unit,
        is_rgb=volume.is_rgb,
        display_inverted=volume.display_inverted,
        description=volume.description,
    )
    warnings = []
    suffix = ""
    if tilted:
        suffix += "_Tilt"
        tag = (
            f"; (0018,1120) Gantry/Detector Tilt says {stack.gantry_tilt_deg:g} degrees"
            if stack.gantry_tilt_deg
            else ""
        )
        warnings.append(
            f"{name}gantry tilt of {stack.tilt_deg:.2f} degrees (slices drift {stack.shear_mm:.3g} mm in-plane from "
            f"first to last{tag}): resampled to an orthogonal grid of {out_plane[0]}x{out_plane[1]} pixels "
            f"(as dcm2niix's _Tilt output); voxels outside the acquired slices are {fill:g}."
        )
    if uneven:
        suffix += "_Eq"
        why = (
            f"{gaps.size} gap(s) longer than 1.5x the median step (missing slices)"
            if gaps.size
            else "increments differ by more than the tolerance"
        )
        warnings.append(
            f"{name}slice spacing varies {steps.min():.4g}-{steps.max():.4g} mm (median {median:.4g} mm; {why}): "
            f"resampled from {stack.n_slices} to {len(z_out)} slices at equal spacing {dz:.4g} mm by linear "
            "interpolation (as dcm2niix's _Eq output)."
        )
    return Regularized(regular, suffix, tuple(warnings))


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.round(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def _place_slice(image: np.ndarray, shift: np.ndarray, plane: tuple[int, int], fill: float) -> np.ndarray:
    """Put ``image`` (columns, rows, M) into a larger plane, shifted by ``shift`` voxels (linear).

    ``out[x] = image[x - shift]``: the integer part is a copy, the fraction an interpolation.
    """
    whole = np.floor(shift + 1e-9).astype(int)
    fraction = shift - whole
    canvas = np.full(plane + (image.shape[-1],), fill, dtype=np.float64)
    canvas[whole[0] : whole[0] + image.shape[0], whole[1] : whole[1] + image.shape[1], :] = image
    if np.all(np.abs(fraction) < 1e-6):
        return canvas
    from scipy import ndimage  # late: 0.2 s of import that only tilted series need

    for m in range(canvas.shape[-1]):
        canvas[:, :, m] = ndimage.shift(canvas[:, :, m], fraction, order=1, mode="constant", cval=fill)
    return canvas


# --------------------------------------------------------------------------- NRRD / MetaImage

_NRRD_TYPES = {
    "int8": "int8",
    "uint8": "uint8",
    "int16": "int16",
    "uint16": "uint16",
    "int32": "int32",
    "uint32": "uint32",
    "int64": "int64",
    "uint64": "uint64",
    "float32": "float",
    "float64": "double",
}
_MET_TYPES = {
    "int8": "MET_CHAR",
    "uint8": "MET_UCHAR",
    "int16": "MET_SHORT",
    "uint16": "MET_USHORT",
    "int32": "MET_INT",
    "uint32": "MET_UINT",
    "int64": "MET_LONG_LONG",
    "uint64": "MET_ULONG_LONG",
    "float32": "MET_FLOAT",
    "float64": "MET_DOUBLE",
}


def _stored_for_raster(volume: Volume) -> np.ndarray:
    """Voxels as stored by NRRD/MHA: exact physical values, in the smallest type that holds them."""
    stored, slope, inter = nifti_storage(volume.array, is_rgb=volume.is_rgb)
    if slope != 1.0 or inter != 0.0:
        # NRRD and MetaImage have no rescale: keep physical values.
        return np.asarray(volume.array)
    return stored


def _raster_bytes(stored: np.ndarray, is_rgb: bool) -> bytes:
    """Voxels with the first index fastest (components fastest of all for RGB)."""
    if is_rgb:
        stored = np.moveaxis(stored, -1, 0)
    return stored.astype(stored.dtype.newbyteorder("<"), copy=False).tobytes(order="F")


def _number(value: float) -> str:
    # 17 significant digits round-trip a float64; "+ 0.0" turns -0.0 into 0.0.
    return f"{float(value) + 0.0:.17g}"


def nrrd_bytes(volume: Volume, *, repetition_time_s: float | None = None) -> bytes:
    """A self-contained NRRD (attached, gzip-encoded data) in LPS space, geometry only in the header.

    Parameters
    ----------
    volume : Volume
        3D, 4D (time: a ``list`` axis) or RGB (an ``RGB-color`` axis first).

    Returns
    -------
    bytes
        ``NRRD0004`` header, blank line, gzip stream of the voxels.
    """
    stored = _stored_for_raster(volume)
    lps = LPS_TO_RAS @ volume.affine  # NRRD's customary space (Slicer, ITK)
    spatial = volume.spatial_shape
    sizes: list[int] = list(spatial)
    directions = ["(" + ",".join(_number(v) for v in lps[:3, axis]) + ")" for axis in range(3)]
    kinds = ["domain", "domain", "domain"]
    if volume.n_frames > 1:
        sizes.append(volume.n_frames)
        directions.append("none")
        kinds.append("list")
    if volume.is_rgb:
        sizes.insert(0, 3)
        directions.insert(0, "none")
        kinds.insert(0, "RGB-color")
    lines = [
        "NRRD0004",
        "# Written by TomoForge",
        f"type: {_NRRD_TYPES[stored.dtype.name]}",
        f"dimension: {len(sizes)}",
        "space: left-posterior-superior",
        f"sizes: {' '.join(str(n) for n in sizes)}",
        f"space directions: {' '.join(directions)}",
        f"kinds: {' '.join(kinds)}",
        "endian: little",
        "encoding: gzip",
        "space origin: (" + ",".join(_number(v) for v in lps[:3, 3]) + ")",
        'space units: "mm" "mm" "mm"',
    ]
    if volume.n_frames > 1 and repetition_time_s:
        lines.append(f"# repetition time {repetition_time_s:g} s")
    buffer = io.BytesIO()
    buffer.write(("\n".join(lines) + "\n\n").encode("ascii"))
    gzip_to(buffer, [_raster_bytes(stored, volume.is_rgb)])
    return buffer.getvalue()


def mha_bytes(volume: Volume, *, repetition_time_s: float | None = None) -> bytes:
    """A self-contained MetaImage (``.mha``, zlib-compressed data) in LPS, geometry only in the header.

    ``TransformMatrix`` lists the direction of each axis in turn (ITK's layout),
    ``Offset`` is the first voxel's LPS position.
    """
    stored = _stored_for_raster(volume)
    lps = LPS_TO_RAS @ volume.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    dims = list(volume.spatial_shape)
    offset = list(lps[:3, 3])
    spacings = list(spacing)
    matrix = [direction[r, c] for c in range(3) for r in range(3)]
    if volume.n_frames > 1:
        dims.append(volume.n_frames)
        offset.append(0.0)
        spacings.append(float(repetition_time_s) if repetition_time_s else 1.0)
        full = np.eye(4)
        full[:3, :3] = direction
        matrix = [full[r, c] for c in range(4) for r in range(4)]
    payload = isal_zlib.compress(_raster_bytes(stored, volume.is_rgb), 1)
    lines = [
        "ObjectType = Image",
        f"NDims = {len(dims)}",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        "CompressedData = True",
        f"CompressedDataSize = {len(payload)}",
        "TransformMatrix = " + " ".join(_number(v) for v in matrix),
        "Offset = " + " ".join(_number(v) for v in offset),
        "CenterOfRotation = " + " ".join("0" for _ in dims),
        "ElementSpacing = " + " ".join(_number(v) for v in spacings),
        "DimSize = " + " ".join(str(n) for n in dims),
    ]
    if volume.is_rgb:
        lines.append("ElementNumberOfChannels = 3")
    lines += [f"ElementType = {_MET_TYPES[stored.dtype.name]}", "ElementDataFile = LOCAL"]
    return ("\n".join(lines) + "\n").encode("ascii") + payload


# --------------------------------------------------------------------------- names

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_name(text: str, *, max_length: int = 80) -> str:
    """A file-name-safe version of ``text``: letters, digits, ``._-``; runs of others become ``_``."""
    cleaned = _UNSAFE.sub("_", text).strip("._-")
    cleaned = re.sub(r"_+", "_", cleaned)
    return cleaned[:max_length].rstrip("._-")


def output_stem(series: Series) -> str:
    """dcm2niix-style base name: ``<series number>_<description>`` (sanitised), never a patient name."""
    number = ""
    headers = list(series.headers or ())
    if series.info.kind == "dicom" and headers and isinstance(headers[0], Dataset):
        value = headers[0].get("SeriesNumber")
        if value not in (None, ""):
            try:
                number = str(int(value))
            except (TypeError, ValueError):
                number = sanitize_name(str(value))
    description = series.info.description
    if series.info.kind != "dicom":
        description = re.sub(
            r"\.(nii\.gz|nii|nrrd|nhdr|mha|mhd|hdr|img|gz|png|jpe?g|tiff?)$", "", description, flags=re.I
        )
    # Descriptions and file names can hold a patient's name: keep technical words only.
    parts = [part for part in (number, sanitize_name(safe_description(description))) if part]
    return "_".join(parts) or "series"


def unique_stems(series_list: Sequence[Series]) -> list[str]:
    """One stem per series; repeats get ``_2``, ``_3``... in order."""
    seen: dict[str, int] = {}
    stems = []
    for item in series_list:
        stem = output_stem(item)
        count = seen.get(stem, 0) + 1
        seen[stem] = count
        stems.append(stem if count == 1 else f"{stem}_{count}")
    return stems


# --------------------------------------------------------------------------- conversion


def _dicom_headers(series: Series) -> list[Dataset]:
    if series.info.kind != "dicom":
        return []
    return [h for h in (series.headers or ()) if isinstance(h, Dataset)]


def repetition_time_s(series: Series) -> float | None:
    """(0018,0080) Repetition Time of the first image, in seconds, when stated."""
    headers = _dicom_headers(series)
    if not headers:
        return None
    value = headers[0].get("RepetitionTime")
    try:
        seconds = float(value) / 1000.0
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 and math.isfinite(seconds) else None


def shared_rescale(series: Series) -> tuple[float, float] | None:
    """(0028,1053)/(0028,1052) when every image of the series has the same, else None."""
    headers = _dicom_headers(series)
    if not headers or any("PerFrameFunctionalGroupsSequence" in h for h in headers):
        return None
    pairs = set()
    for header in headers:
        try:
            pairs.add((float(header.get("RescaleSlope", 1) or 1), float(header.get("RescaleIntercept", 0) or 0)))
        except (TypeError, ValueError):
            return None
    return pairs.pop() if len(pairs) == 1 else None


def _kept_loader_warnings(series: Series, regularized: bool) -> list[str]:
    """The reader's warnings, minus its geometry notes once resampling has replaced them."""
    if not regularized:
        return list(series.info.warnings)
    superseded = ("slice spacing varies", "gantry tilt of")  # core.dicom_geometry's geometry warnings
    return [w for w in series.info.warnings if not any(word in w.lower() for word in superseded)]


def convert_series(
    series: Series,
    options: ConvertOptions = ConvertOptions(),
    *,
    volume: Volume | None = None,
    stem: str | None = None,
) -> Conversion:
    """Convert one series: QA, regularise the geometry if needed, write the chosen format.

    Parameters
    ----------
    series : Series
        A scanned series.
    options : ConvertOptions
        Format and choices.
    volume : Volume, optional
        The series already loaded (the app keeps it); loaded here otherwise.
    stem : str, optional
        Base name of the outputs (default :func:`output_stem`).

    Returns
    -------
    Conversion

    Raises
    ------
    CoreError
        The series cannot be loaded, its geometry is refused (``strict``), or a DICOM
        export did not read back identically.
    """
    stack = slice_stack(series)
    report = report_from_stack(stack, series_id=series.info.id, description=series.info.description)
    if volume is None:
        volume = series.load()
    label = series.info.description or series.info.id
    regular = regularize(volume, stack, strict=options.strict, label=label)
    volume = regular.volume
    warnings = _kept_loader_warnings(series, bool(regular.suffix)) + list(regular.warnings)
    for check in report.checks:
        if not check.passed and check.name in ("orientation_consistent", "distinct_positions", "single_image_size"):
            warnings.append(f"{label}: QA check '{check.label}' failed: {check.detail}")
    base = (stem or output_stem(series)) + regular.suffix
    from_dicom = series.info.kind == "dicom"
    tr = repetition_time_s(series) if volume.n_frames > 1 else None
    writers: list[tuple[str, Writer]] = []
    if options.to == "nifti":
        primary = base + (".nii.gz" if options.compress else ".nii")
        writers.append(
            (
                primary,
                functools.partial(
                    write_nifti,
                    volume,
                    compress=options.compress,
                    xform_code=XFORM_SCANNER if from_dicom else XFORM_ALIGNED,
                    repetition_time_s=tr,
                    rescale=shared_rescale(series) if not regular.suffix else None,
                ),
            )
        )
        headers = _dicom_headers(series)
        if options.sidecar and headers:
            extra: dict[str, Any] = {}
            if regular.suffix:
                extra["TomoForgeResampled"] = regular.suffix.lstrip("_")
            sidecar = bids_sidecar(headers[0], extra=extra)
            writers.append((base + ".json", _constant((json.dumps(sidecar, indent=2) + "\n").encode("utf-8"))))
    elif options.to == "dicom":
        number = _series_number(series)
        # Built and verified now: an export that does not read back is never offered.
        export = export_dicom_series(
            volume,
            # PS3.15 lists Series Description as X (remove): keep its technical words only.
            series_description=(safe_description(series.info.description) or base)[:64],
            series_number=number,
            reference=options.reference,
        )
        warnings.extend(export.warnings)
        primary = base
        writers.extend((f"{base}/{name}", _constant(data)) for name, data in export.files)
    elif options.to == "nrrd":
        primary = base + ".nrrd"
        writers.append((primary, _constant(nrrd_bytes(volume, repetition_time_s=tr))))
    else:
        primary = base + ".mha"
        writers.append((primary, _constant(mha_bytes(volume, repetition_time_s=tr))))
    return Conversion(
        series_id=series.info.id,
        primary=primary,
        writers=tuple(writers),
        warnings=tuple(warnings),
        report=report,
        stem=base,
        resampled=regular.suffix.lstrip("_"),
    )


def _series_number(series: Series) -> int:
    headers = _dicom_headers(series)
    if headers:
        try:
            return int(headers[0].get("SeriesNumber") or 0) or 1001
        except (TypeError, ValueError):
            return 1001
    return 1001


def convert_batch(
    series_list: Iterable[Series],
    options: ConvertOptions = ConvertOptions(),
    *,
    progress: Callable[[float, str], None] | None = None,
) -> BatchResult:
    """Convert every series into one zip: one conversion per series plus its QA report.

    A series that fails is listed in ``problems`` with the reason; the others are
    still converted. Each volume is loaded, converted and released in turn, so the
    memory peak is one series.

    Returns
    -------
    BatchResult
        ``data`` is the zip; members are ``<stem>.<ext>`` (or ``<stem>/IM*.dcm``) and
        ``qa/<stem>_qa.json``.
    """
    items = list(series_list)
    stems = unique_stems(items)
    result = BatchResult(data=b"")
    members: list[tuple[str, bytes]] = []
    for index, (series, stem) in enumerate(zip(items, stems, strict=True)):
        if progress is not None:
            progress(index / max(1, len(items)), f"converting {stem}")
        try:
            conversion = convert_series(series, options, stem=stem)
        except CoreError as err:
            result.problems.append(Problem(source=series.info.id, message=err.message))
            continue
        members.extend(conversion.outputs)
        # Keep names, warnings and QA only: the files are in the zip, and the writers
        # would keep every decoded volume of the upload alive.
        result.conversions.append(dataclasses.replace(conversion, writers=()))
        report = json.dumps(conversion.report.to_json(), indent=2).encode("utf-8")
        members.append((f"qa/{stem}_qa.json", report))
    if progress is not None:
        progress(1.0, f"{len(result.conversions)} series converted")
    result.data = zip_outputs(members)
    return result


def zip_outputs(outputs: Iterable[tuple[str, bytes]]) -> bytes:
    """Zip files; already-compressed ones (``.gz``, ``.nrrd``, ``.mha``) are stored, not deflated again."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in outputs:
            packed = name.endswith((".gz", ".nrrd", ".mha"))
            archive.writestr(
                name,
                data,
                compress_type=zipfile.ZIP_STORED if packed else zipfile.ZIP_DEFLATED,
                compresslevel=None if packed else 1,
            )
    return buffer.getvalue()


# --------------------------------------------------------------------------- worker processes
#
# The app converts in a worker process (core.worker): encoding a volume is seconds of CPU that
# would stall every session in the server process, and a batch decodes untrusted files. Series
# loaders are closures, so a job gets plain values: the series' info and headers with the
# decoded volume, or the uploaded files to scan again.


def detach_header(header: Any) -> Any:
    """A shallow copy of a pydicom header without the file's bytes, small enough to send to a worker.

    pydicom keeps the whole file it read (pixels included) in ``FileDataset.buffer``,
    so pickling a header would copy the image with it: 10 MB for the headers of a
    20-slice CT instead of 0.2 MB. Values that were left in the file (read with
    ``defer_size``) are read first. Elements are shared with ``header``. Anything
    that is not a pydicom Dataset holding a buffer is returned as it is.

    Parameters
    ----------
    header : object
        A ``Series.headers`` item or a reference dataset.

    Returns
    -------
    object
        The copy (or ``header`` itself).
    """
    if not isinstance(header, Dataset) or getattr(header, "buffer", None) is None:
        return header
    for tag in list(header.keys()):
        element = header.get_item(tag, keep_deferred=True)
        if isinstance(element, RawDataElement) and element.value is None and element.length:
            header[tag]  # read the deferred value now (pydicom keeps it), while the file's bytes are at hand
    clone = copy.copy(header)
    clone.buffer = None
    return clone


def _loaded(volume: Volume) -> Volume:
    return volume


def convert_loaded(
    info: SeriesInfo,
    headers: Sequence[Any],
    volume: Volume,
    options: ConvertOptions = ConvertOptions(),
    *,
    stem: str | None = None,
) -> tuple[Conversion, bytes | None]:
    """Convert a series that is already loaded and encode its files now (the job of a worker process).

    Parameters
    ----------
    info : SeriesInfo
        ``Series.info`` of the series.
    headers : sequence
        ``Series.headers`` (DICOM headers through :func:`detach_header` to keep the job small).
    volume : Volume
        The decoded series.
    options : ConvertOptions
        Format and choices.
    stem : str, optional
        Base name of the outputs (default :func:`output_stem`).

    Returns
    -------
    conversion : Conversion
        Its writers hold the encoded files, so it pickles and ``outputs`` costs no encoding.
    bundle : bytes or None
        Every file in one zip (:func:`zip_outputs`) when there is more than one, else None.

    Raises
    ------
    CoreError
        As :func:`convert_series`.
    """
    series = Series(info=info, loader=functools.partial(_loaded, volume), headers=tuple(headers))
    conversion = convert_series(series, options, volume=volume, stem=stem)
    outputs = conversion.outputs
    # A new Conversion without the cached outputs: each file crosses the process boundary once.
    encoded = dataclasses.replace(conversion, writers=tuple((name, _constant(data)) for name, data in outputs))
    bundle = zip_outputs(outputs) if len(outputs) > 1 else None
    return encoded, bundle


def convert_series_in_worker(
    series: Series,
    options: ConvertOptions,
    *,
    volume: Volume,
    stem: str | None = None,
    limits: WorkerLimits = DEFAULT_WORKER_LIMITS,
) -> tuple[Conversion, bytes | None]:
    """:func:`convert_loaded` in a worker process: the server only sends the volume and headers.

    Parameters
    ----------
    series : Series
    options : ConvertOptions
    volume : Volume
        The decoded series (the app keeps it).
    stem : str, optional
    limits : WorkerLimits

    Returns
    -------
    conversion : Conversion
    bundle : bytes or None
        See :func:`convert_loaded`.

    Raises
    ------
    CoreError
        As :func:`convert_series`; :class:`~core.worker.WorkerCrashError` or
        :class:`~core.errors.LimitError` when the worker dies or runs over its limits.
    """
    headers = tuple(detach_header(h) for h in series.headers or ())
    if options.reference is not None:
        options = dataclasses.replace(options, reference=detach_header(options.reference))
    result: tuple[Conversion, bytes | None] = run_in_worker(
        convert_loaded, series.info, headers, volume, options, stem=stem, limits=limits, what=f"series {series.info.id}"
    )
    return result


def convert_sources_batch(
    sources: Sequence[Source],
    series_ids: Sequence[str],
    options: ConvertOptions = ConvertOptions(),
    limits: Limits = DEFAULT_LIMITS,
) -> BatchResult:
    """Scan uploaded files again and convert the named series into one zip (the job of a worker process).

    Parameters
    ----------
    sources : sequence of Source
        The uploaded files (zips are expanded).
    series_ids : sequence of str
        ``SeriesInfo.id`` of the series to convert, from the scan of the same files, in
        the order wanted.
    options : ConvertOptions
    limits : Limits
        Caps for reading the files (those of the first scan).

    Returns
    -------
    BatchResult
        As :func:`convert_batch`; a series that the new scan does not find is a problem.
    """
    from core.io import scan  # late: core.io imports every reader

    found = {item.info.id: item for item in scan(sources, limits).series}
    chosen = [found[series_id] for series_id in series_ids if series_id in found]
    result = convert_batch(chosen, options)
    for series_id in series_ids:
        if series_id not in found:
            result.problems.append(
                Problem(
                    source=series_id,
                    message=f"series {series_id}: not found when the upload was read again for conversion. "
                    "Upload the files again.",
                )
            )
    return result


def convert_batch_in_worker(
    sources: Sequence[Source],
    series_ids: Sequence[str],
    options: ConvertOptions,
    *,
    source_limits: Limits = DEFAULT_LIMITS,
    limits: WorkerLimits = DEFAULT_WORKER_LIMITS,
) -> BatchResult:
    """:func:`convert_sources_batch` in a worker process: decoding untrusted files never happens in the caller.

    Parameters
    ----------
    sources : sequence of Source
        The uploaded files (sent to the worker through shared memory, not pickled).
    series_ids : sequence of str
        The series to convert, ids from the scan of ``sources``.
    options : ConvertOptions
        A reference dataset is sent without its file's bytes (:func:`detach_header`).
    source_limits : Limits
        Caps for reading the files again.
    limits : WorkerLimits
        Memory, CPU and time of the worker; one job converts every series.

    Returns
    -------
    BatchResult

    Raises
    ------
    CoreError
        :class:`~core.worker.WorkerCrashError` or :class:`~core.errors.LimitError` when the
        worker dies or runs over its limits (a series that fails is a problem in the result).
    """
    if options.reference is not None:
        options = dataclasses.replace(options, reference=detach_header(options.reference))
    result: BatchResult = run_in_worker(
        convert_sources_batch,
        list(sources),
        tuple(series_ids),
        options,
        source_limits,  # positional: run_in_worker's own ``limits`` are the worker's
        limits=limits,
        what=f"conversion of {len(series_ids)} series",
    )
    return result
