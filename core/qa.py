"""Geometry QA of a series before conversion: where every slice sits, and what is wrong with it.

The report is computed from the per-image headers (DICOM (0020,0032) Image
Position (Patient) and (0020,0037) Image Orientation (Patient)), not from the
volume's affine, because an affine cannot show a missing slice or an uneven
step: it is the summary the checks are meant to verify. Series without per-image
positions (NIfTI, NRRD, mosaics, images without a plane) are described by their
affine, and the report says so.

The same :class:`SliceStack` drives the resampling of tilted or unevenly spaced
series in :mod:`core.convert`, so the report and the conversion always agree.

References
----------
DICOM PS3.3 C.7.6.2.1.1 (Image Position and Image Orientation); the checks follow
dcm2niix and dicom2nifti (see ``../shared/REFERENCE.md`` section 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from core.deidentify import safe_description
from core.dicom_geometry import (
    GAP_FACTOR,
    ORIENTATION_TOLERANCE,
    SAME_POSITION_TOLERANCE_MM,
    SHEAR_TOLERANCE_MM,
    SPACING_ABS_TOLERANCE_MM,
    SPACING_REL_TOLERANCE,
    cluster_positions,
)
from core.dicom_mosaic import is_mosaic
from core.errors import SeriesGeometryError
from core.series import Series
from core.volume import LPS_TO_RAS

_LPS_TO_RAS_3 = LPS_TO_RAS[:3, :3]


@dataclass(frozen=True)
class SliceStack:
    """Where the slices of a series sit in the world (RAS+ mm).

    A stack is a set of parallel planes, each an image of ``(n_columns, n_rows)``
    pixels whose column index grows along ``row_direction`` and whose row index
    grows along ``column_direction`` (the DICOM convention). Slices are sorted by
    increasing distance along ``normal``.

    Attributes
    ----------
    row_direction, column_direction : (3,) ndarray
        Unit vectors (RAS) along which the column index ``i`` and the row index ``j`` grow.
    normal : (3,) ndarray
        ``row_direction x column_direction`` (unit, RAS).
    pixel_spacing_mm : (2,) tuple of float
        Voxel size along ``row_direction`` then ``column_direction`` (i, j order, not DICOM's).
    origins : (K, 3) ndarray
        World position of pixel ``(0, 0)`` of each slice, sorted along the normal.
    images_per_slice : (K,) ndarray of int
        How many images share each position (time points, echoes...).
    n_columns, n_rows : int
        In-plane size of one image.
    orientation_spread : float
        Largest difference between any image's direction cosines and the first's.
    image_sizes : tuple of (rows, columns)
        Every distinct image size seen.
    gantry_tilt_deg : float or None
        (0018,1120) Gantry/Detector Tilt when the header states one.
    source : str
        ``"headers"`` (per-image DICOM positions), ``"frames"`` (per-frame functional
        groups) or ``"affine"`` (derived from the volume's affine).
    note : str
        Why the affine was used, when it was.
    """

    row_direction: np.ndarray
    column_direction: np.ndarray
    normal: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    origins: np.ndarray
    images_per_slice: np.ndarray
    n_columns: int
    n_rows: int
    orientation_spread: float = 0.0
    image_sizes: tuple[tuple[int, int], ...] = ()
    gantry_tilt_deg: float | None = None
    source: str = "headers"
    note: str = ""

    @property
    def n_slices(self) -> int:
        return int(self.origins.shape[0])

    @property
    def distances_mm(self) -> np.ndarray:
        """(K,) position of each slice along the normal, mm (world, not relative)."""
        return self.origins @ self.normal

    @property
    def steps_mm(self) -> np.ndarray:
        """(K-1,) increments between consecutive slices along the normal, mm."""
        return np.diff(self.distances_mm)

    @property
    def in_plane_offsets_mm(self) -> np.ndarray:
        """(K, 2) in-plane displacement of each slice from the first, along i and j, mm."""
        delta = self.origins - self.origins[0]
        return np.stack([delta @ self.row_direction, delta @ self.column_direction], axis=1)

    @property
    def shear_mm(self) -> float:
        """In-plane displacement of the last slice relative to the first, mm."""
        return float(np.linalg.norm(self.in_plane_offsets_mm[-1])) if self.n_slices > 1 else 0.0

    @property
    def tilt_deg(self) -> float:
        """Angle between the first-to-last slice vector and the normal, degrees (0 for one slice)."""
        if self.n_slices < 2:
            return 0.0
        total = self.origins[-1] - self.origins[0]
        cosine = abs(float(total @ self.normal)) / max(float(np.linalg.norm(total)), 1e-12)
        return float(np.degrees(np.arccos(min(1.0, cosine))))

    @property
    def is_tilted(self) -> bool:
        """The slices drift in-plane by more than the shear tolerance over the stack."""
        return self.shear_mm > SHEAR_TOLERANCE_MM

    @property
    def spacing_tolerance_mm(self) -> float:
        median = float(np.median(self.steps_mm)) if self.n_slices > 1 else 0.0
        return SPACING_ABS_TOLERANCE_MM + SPACING_REL_TOLERANCE * median

    @property
    def is_uniform(self) -> bool:
        """Every increment is within the tolerance of the median (dicom2nifti's rule)."""
        if self.n_slices < 3:
            return True
        steps = self.steps_mm
        return bool(np.all(np.abs(steps - np.median(steps)) <= self.spacing_tolerance_mm))

    @property
    def gap_indices(self) -> np.ndarray:
        """Indices ``g`` of increments (between slice g and g+1) longer than 1.5x the median."""
        if self.n_slices < 3:
            return np.zeros(0, dtype=int)
        steps = self.steps_mm
        return np.flatnonzero(steps > GAP_FACTOR * float(np.median(steps)))


@dataclass(frozen=True)
class Check:
    """One QA check: a stable machine name, a label for people, the verdict and the values."""

    name: str
    label: str
    passed: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class QAReport:
    """Geometry QA of one series (see :func:`qa_report`).

    Attributes
    ----------
    n_slices : int
        Distinct slice positions.
    n_images : int
        Images (or frames) the positions were read from; ``n_images / n_slices``
        images share each position in a time series.
    positions_mm : list of float
        Position of each slice along the normal, mm, in increasing order.
    spacing_min_mm, spacing_median_mm, spacing_max_mm : float
        Statistics of the increments between consecutive slices (0 with one slice).
    spacing_variation : float
        ``(max - min) / median`` of the increments (0 with fewer than two increments).
    tilt_deg : float
        Angle of the slice stack against the normal (gantry tilt), degrees.
    checks : tuple of Check
        Every check with passed/failed and the values behind the verdict.
    """

    series_id: str
    description: str
    n_slices: int
    n_images: int
    positions_mm: list[float]
    spacing_min_mm: float
    spacing_median_mm: float
    spacing_max_mm: float
    spacing_variation: float
    tilt_deg: float
    shear_mm: float
    gantry_tilt_deg: float | None
    geometry_source: str
    checks: tuple[Check, ...] = field(default_factory=tuple)
    note: str = ""

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def check(self, name: str) -> Check:
        for item in self.checks:
            if item.name == name:
                return item
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the downloadable report (no patient data: ids, geometry and checks only)."""
        return {
            # Ids and descriptions can come from file names or free text: technical words only.
            "series_id": safe_description(self.series_id) or "series",
            "description": safe_description(self.description),
            "n_slices": self.n_slices,
            "n_images": self.n_images,
            "positions_along_normal_mm": [round(p, 6) for p in self.positions_mm],
            "spacing_mm": {
                "min": round(self.spacing_min_mm, 6),
                "median": round(self.spacing_median_mm, 6),
                "max": round(self.spacing_max_mm, 6),
                "relative_variation": round(self.spacing_variation, 6),
            },
            "tilt_deg": round(self.tilt_deg, 4),
            "shear_mm": round(self.shear_mm, 4),
            "gantry_tilt_tag_deg": self.gantry_tilt_deg,
            "geometry_source": self.geometry_source,
            "note": self.note,
            "passed": self.passed,
            "checks": [check.to_json() for check in self.checks],
        }


# --------------------------------------------------------------------------- geometry


def slice_stack(series: Series) -> SliceStack:
    """The slice geometry of a series: from its DICOM headers when they have positions, else its affine.

    Parameters
    ----------
    series : Series
        A scanned series; ``series.headers`` holds pydicom Datasets (without pixel
        data) for DICOM, anything else for other formats.

    Returns
    -------
    SliceStack
        ``source`` tells where the geometry came from.
    """
    info = series.info

    def from_affine(note: str) -> SliceStack:
        return stack_from_affine(info.affine, info.shape, is_rgb=info.is_rgb, note=note)

    headers = list(series.headers or ())
    if info.kind != "dicom" or not headers or not all(isinstance(h, Dataset) for h in headers):
        return from_affine(f"{info.kind} file: one affine, no per-slice positions")
    if len(headers) == 1 and "PerFrameFunctionalGroupsSequence" in headers[0]:
        stack = _stack_from_frames(headers[0])
        if stack is None:
            return from_affine("the multi-frame file has no per-frame positions")
    elif any(is_mosaic(h) for h in headers):
        return from_affine("Siemens mosaic: slice positions come from the de-mosaiced volume")
    elif all("ImagePositionPatient" in h and "ImageOrientationPatient" in h and "PixelSpacing" in h for h in headers):
        stack = _stack_from_images(headers)
    else:
        return from_affine("the images have no (0020,0032) Image Position (Patient) and Orientation")
    # A layout the headers do not describe one image per slice (a mosaic of another
    # vendor, say) would give a wrong report: then trust the reader's affine.
    described = sorted((stack.n_columns, stack.n_rows, stack.n_slices))
    frames_of_one_slice = stack.n_slices == 1 and int(stack.images_per_slice.sum()) > 1  # reported as such
    if described != sorted(int(n) for n in info.shape[:3]) and not frames_of_one_slice:
        return from_affine(
            f"the headers describe {stack.n_columns}x{stack.n_rows} images at {stack.n_slices} positions, "
            f"not the volume's {'x'.join(str(n) for n in info.shape[:3])} voxels"
        )
    return stack


def stack_from_affine(affine: np.ndarray, shape: Sequence[int], *, is_rgb: bool = False, note: str = "") -> SliceStack:
    """Describe a regular grid (voxel -> RAS affine) as a stack of slices along its third axis.

    A sheared affine (third column not along the normal of the first two) shows up
    as a tilt, as it would for DICOM slices.

    Parameters
    ----------
    affine : (4, 4) ndarray
        Voxel -> RAS+ mm.
    shape : sequence of int
        The volume's array shape; axes after the third are time points (and the RGB
        components when ``is_rgb``).
    """
    affine = np.asarray(affine, dtype=np.float64)
    columns = affine[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    row_direction = columns[:, 0] / spacing[0]
    column_direction = columns[:, 1] / spacing[1]
    normal = np.cross(row_direction, column_direction)
    normal /= np.linalg.norm(normal)
    if float(columns[:, 2] @ normal) < 0:
        normal = -normal  # keep slices in voxel order: k grows along +normal
    n_slices = int(shape[2])
    extra = tuple(shape[3:-1] if is_rgb else shape[3:])
    frames = int(np.prod(extra)) if extra else 1
    origins = affine[:3, 3][None, :] + np.arange(n_slices)[:, None] * columns[:, 2][None, :]
    return SliceStack(
        row_direction=row_direction,
        column_direction=column_direction,
        normal=normal,
        pixel_spacing_mm=(float(spacing[0]), float(spacing[1])),
        origins=origins,
        images_per_slice=np.full(n_slices, frames, dtype=int),
        n_columns=int(shape[0]),
        n_rows=int(shape[1]),
        image_sizes=((int(shape[1]), int(shape[0])),),
        source="affine",
        note=note,
    )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _float_or_none(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if np.isfinite(result) else None


def _vector(value: Any, size: int, what: str) -> np.ndarray:
    try:
        array = np.asarray([float(v) for v in _as_list(value)], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise SeriesGeometryError(f"{what} {value!r} is not a list of numbers; the file's geometry is broken.") from err
    if array.shape != (size,) or not np.all(np.isfinite(array)):
        raise SeriesGeometryError(f"{what} {value!r} must hold {size} finite numbers.")
    return array


def _directions(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction and normal in RAS from a DICOM IOP (LPS)."""
    row = iop[:3] / np.linalg.norm(iop[:3])
    column = iop[3:] / np.linalg.norm(iop[3:])
    row, column = _LPS_TO_RAS_3 @ row, _LPS_TO_RAS_3 @ column
    normal = np.cross(row, column)
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise SeriesGeometryError(
            f"(0020,0037) Image Orientation (Patient) {iop.tolist()} has parallel direction cosines."
        )
    return row, column, normal / length


def _build_stack(
    positions_lps: np.ndarray,
    orientations: np.ndarray,
    pixel_spacing: np.ndarray,
    sizes: list[tuple[int, int]],
    gantry_tilt: float | None,
    source: str,
) -> SliceStack:
    row, column, normal = _directions(orientations[0])
    spread = float(np.max(np.abs(orientations - orientations[0]))) if len(orientations) else 0.0
    positions = positions_lps @ _LPS_TO_RAS_3.T
    groups = cluster_positions(positions @ normal, SAME_POSITION_TOLERANCE_MM)
    origins = np.stack([positions[members].mean(axis=0) for members in groups])
    counts = np.asarray([len(members) for members in groups], dtype=int)
    rows, columns = sizes[0]
    return SliceStack(
        row_direction=row,
        column_direction=column,
        normal=normal,
        # DICOM Pixel Spacing is [row spacing, column spacing]: the column index i steps by the second.
        pixel_spacing_mm=(float(pixel_spacing[1]), float(pixel_spacing[0])),
        origins=origins,
        images_per_slice=counts,
        n_columns=int(columns),
        n_rows=int(rows),
        orientation_spread=spread,
        image_sizes=tuple(sorted(set(sizes))),
        gantry_tilt_deg=gantry_tilt,
        source=source,
    )


def _stack_from_images(headers: Sequence[Any]) -> SliceStack:
    positions = np.stack([_vector(h.ImagePositionPatient, 3, "(0020,0032) Image Position (Patient)") for h in headers])
    orientations = np.stack(
        [_vector(h.ImageOrientationPatient, 6, "(0020,0037) Image Orientation (Patient)") for h in headers]
    )
    spacing = _vector(headers[0].PixelSpacing, 2, "(0028,0030) Pixel Spacing")
    sizes = [(int(h.get("Rows", 0) or 0), int(h.get("Columns", 0) or 0)) for h in headers]
    tilt = _float_or_none(headers[0].get("GantryDetectorTilt"))
    return _build_stack(positions, orientations, spacing, sizes, tilt, "headers")


def _stack_from_frames(header: Any) -> SliceStack | None:
    """Per-frame positions of an enhanced multi-frame file (PS3.3 C.7.6.16)."""
    shared = header.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else None

    def pick(item: Any, sequence: str, keyword: str) -> Any:
        for source in (item, shared_item):
            if source is not None and sequence in source and source[sequence].value:
                inner = source[sequence].value[0]
                if keyword in inner:
                    return inner[keyword].value
        return None

    frames = header.PerFrameFunctionalGroupsSequence
    positions, orientations = [], []
    spacing = None
    for item in frames:
        position = pick(item, "PlanePositionSequence", "ImagePositionPatient")
        orientation = pick(item, "PlaneOrientationSequence", "ImageOrientationPatient")
        if position is None or orientation is None:
            return None
        positions.append(_vector(position, 3, "(0020,0032) Image Position (Patient)"))
        orientations.append(_vector(orientation, 6, "(0020,0037) Image Orientation (Patient)"))
        if spacing is None:
            value = pick(item, "PixelMeasuresSequence", "PixelSpacing")
            spacing = None if value is None else _vector(value, 2, "(0028,0030) Pixel Spacing")
    if spacing is None:
        return None
    size = (int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0))
    return _build_stack(
        np.stack(positions),
        np.stack(orientations),
        spacing,
        [size],
        _float_or_none(header.get("GantryDetectorTilt")),
        "frames",
    )


# --------------------------------------------------------------------------- report


def qa_report(series: Series) -> QAReport:
    """Check the slice geometry of a series and summarise it.

    Parameters
    ----------
    series : Series
        A scanned series (pixels need not be decoded).

    Returns
    -------
    QAReport
        Checks, each with passed/failed and the values behind the verdict:
        ``orientation_consistent``, ``spacing_uniform``, ``no_missing_slice``,
        ``no_tilt``, ``distinct_positions``, ``single_image_size``.

    Raises
    ------
    SeriesGeometryError
        A header holds a position or orientation that is not numbers.
    """
    stack = slice_stack(series)
    return report_from_stack(stack, series_id=series.info.id, description=series.info.description)


def report_from_stack(stack: SliceStack, *, series_id: str = "", description: str = "") -> QAReport:
    """Build the QA report of a :class:`SliceStack` (see :func:`qa_report`)."""
    steps = stack.steps_mm
    if steps.size:
        low, median, high = float(steps.min()), float(np.median(steps)), float(steps.max())
        variation = (high - low) / median if steps.size > 1 and median > 0 else 0.0
    else:
        low = median = high = variation = 0.0
    n_images = int(stack.images_per_slice.sum())
    checks = (
        _check_orientation(stack),
        _check_spacing(stack, low, median, high),
        _check_missing(stack, median),
        _check_tilt(stack),
        _check_distinct(stack, n_images),
        _check_size(stack),
    )
    return QAReport(
        series_id=series_id,
        description=description,
        n_slices=stack.n_slices,
        n_images=n_images,
        positions_mm=[float(d) for d in stack.distances_mm],
        spacing_min_mm=low,
        spacing_median_mm=median,
        spacing_max_mm=high,
        spacing_variation=float(variation),
        tilt_deg=stack.tilt_deg,
        shear_mm=stack.shear_mm,
        gantry_tilt_deg=stack.gantry_tilt_deg,
        geometry_source=stack.source,
        checks=checks,
        note=stack.note,
    )


def _check_orientation(stack: SliceStack) -> Check:
    passed = stack.orientation_spread <= ORIENTATION_TOLERANCE
    if stack.source == "affine":
        detail = "one affine for the whole volume"
    elif passed:
        detail = (
            "all direction cosines are identical"
            if stack.orientation_spread == 0
            else f"all direction cosines agree within {stack.orientation_spread:.2g} (tolerance {ORIENTATION_TOLERANCE:g})"
        )
    else:
        detail = (
            f"(0020,0037) Image Orientation (Patient) differs by up to {stack.orientation_spread:.4g} between images "
            f"(tolerance {ORIENTATION_TOLERANCE:g}): the images are not one stack"
        )
    return Check("orientation_consistent", "Orientation consistent", passed, detail)


def _check_spacing(stack: SliceStack, low: float, median: float, high: float) -> Check:
    if stack.n_slices < 3:
        return Check("spacing_uniform", "Spacing uniform", True, f"{stack.n_slices} slice(s): nothing to compare")
    passed = stack.is_uniform
    tolerance = stack.spacing_tolerance_mm
    detail = f"increments {low:.4g}-{high:.4g} mm, median {median:.4g} mm (tolerance +-{tolerance:.3g} mm)"
    if not passed:
        deviating = int(np.count_nonzero(np.abs(stack.steps_mm - median) > tolerance))
        detail += f"; {deviating} of {stack.steps_mm.size} increments are off"
    return Check("spacing_uniform", "Spacing uniform", passed, detail)


def _check_missing(stack: SliceStack, median: float) -> Check:
    gaps = stack.gap_indices
    counts = stack.images_per_slice
    uneven_counts = counts.size > 0 and int(counts.min()) != int(counts.max())
    passed = gaps.size == 0 and not uneven_counts
    parts = []
    if gaps.size:
        steps = stack.steps_mm
        where = ", ".join(f"{steps[g]:.4g} mm between slices {g + 1} and {g + 2}" for g in gaps[:5])
        missing = int(sum(round(steps[g] / median) - 1 for g in gaps)) if median > 0 else 0
        parts.append(
            f"gap(s) longer than {GAP_FACTOR}x the median step {median:.4g} mm: {where} (about {missing} slice(s) missing)"
        )
    if uneven_counts:
        parts.append(
            f"positions hold {int(counts.min())} to {int(counts.max())} images each: a time point or echo is incomplete"
        )
    if passed:
        parts.append("no gap longer than 1.5x the median step" if stack.n_slices > 2 else "too few slices to see a gap")
    return Check("no_missing_slice", "No missing slice", passed, "; ".join(parts))


def _check_tilt(stack: SliceStack) -> Check:
    passed = not stack.is_tilted
    tag = ""
    if stack.gantry_tilt_deg:
        tag = f"; (0018,1120) Gantry/Detector Tilt {stack.gantry_tilt_deg:g} degrees"
    detail = (
        f"stack angle {stack.tilt_deg:.3g} degrees, in-plane drift {stack.shear_mm:.3g} mm from first to last slice "
        f"(tolerance {SHEAR_TOLERANCE_MM} mm){tag}"
    )
    return Check("no_tilt", "No gantry tilt", passed, detail)


def _check_distinct(stack: SliceStack, n_images: int) -> Check:
    passed = stack.n_slices > 1 or n_images == 1
    if passed:
        detail = f"{stack.n_slices} distinct position(s) for {n_images} image(s)"
    else:
        detail = f"all {n_images} images sit at the same position: frames of one slice, not a volume"
    return Check("distinct_positions", "Not all positions identical", passed, detail)


def _check_size(stack: SliceStack) -> Check:
    sizes = stack.image_sizes
    passed = len(sizes) <= 1
    listed = ", ".join(f"{rows}x{columns}" for rows, columns in sizes)
    detail = f"image size (rows x columns) {listed}" if passed else f"several image sizes in one series: {listed}"
    return Check("single_image_size", "Single image size", passed, detail)
