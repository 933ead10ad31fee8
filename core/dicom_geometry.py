"""Slice geometry of DICOM images: sorting, spacing checks and the voxel -> world affine.

Pure numpy, no pydicom: the functions take positions and orientations already read
from the headers, so they are easy to test with analytic inputs.

Conventions
-----------
* DICOM (0020,0037) Image Orientation (Patient) holds two unit vectors in LPS: the
  direction in which a row runs (column index grows, ``IOP[:3]``) and the direction
  in which a column runs (row index grows, ``IOP[3:]``).
* (0028,0030) Pixel Spacing is ``[row spacing, column spacing]``: the distance
  between rows (along ``IOP[3:]``) first, then between columns (along ``IOP[:3]``).
* Our voxel array is built as ``(columns, rows, slices[, time])`` so that ``i`` indexes
  columns, ``j`` rows and ``k`` slices; the affine's columns are then
  ``IOP[:3] * spacing[1]``, ``IOP[3:] * spacing[0]`` and the slice step vector.
* Slices are sorted by the projection of (0020,0032) Image Position (Patient) on the
  slice normal ``IOP[:3] x IOP[3:]`` (dcm2niix, dicom2nifti), never by file name,
  InstanceNumber or z.

References
----------
DICOM PS3.3 C.7.6.2.1.1 (Image Position and Image Orientation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import SeriesGeometryError
from core.volume import LPS_TO_RAS

# Two orientations are the same when every cosine agrees within this (dicom2nifti).
ORIENTATION_TOLERANCE = 1e-3
# Images whose positions along the normal differ by less than this share a slice.
SAME_POSITION_TOLERANCE_MM = 0.01
# Images sharing a slice must sit at the same in-plane place within this.
SAME_PLACE_TOLERANCE_MM = 0.1
# Slice increments agree when |step - median| <= ABS + REL * median (dicom2nifti's
# allclose(rtol=0.05, atol=0.1)): rounding of oblique positions (~0.01 mm) passes.
SPACING_ABS_TOLERANCE_MM = 0.1
SPACING_REL_TOLERANCE = 0.05
# A step longer than this times the median means slices are missing.
GAP_FACTOR = 1.5
# Slices displaced in-plane by more than this over the whole stack are sheared (tilt).
SHEAR_TOLERANCE_MM = 0.1


def slice_normal(orientation: Sequence[float] | np.ndarray) -> np.ndarray:
    """Unit normal of the image plane, ``row direction x column direction`` (LPS).

    Parameters
    ----------
    orientation : (6,) sequence of float
        (0020,0037) Image Orientation (Patient).

    Returns
    -------
    (3,) ndarray
        Unit vector in LPS.

    Raises
    ------
    SeriesGeometryError
        The two direction cosines are zero or parallel.
    """
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if not np.isfinite(norm) or norm < 1e-6:
        raise SeriesGeometryError(
            f"(0020,0037) Image Orientation (Patient) {iop.tolist()} has parallel or zero direction cosines; "
            "the file's geometry is broken."
        )
    return normal / norm


def normalized_orientation(orientation: Sequence[float] | np.ndarray) -> np.ndarray:
    """IOP with each direction vector scaled to unit length (some writers round them)."""
    iop = np.asarray(orientation, dtype=np.float64).reshape(2, 3)
    norms = np.linalg.norm(iop, axis=1, keepdims=True)
    if np.any(norms < 1e-6) or not np.all(np.isfinite(iop)):
        raise SeriesGeometryError(
            f"(0020,0037) Image Orientation (Patient) {iop.ravel().tolist()} has a zero or invalid direction."
        )
    return (iop / norms).ravel()


def same_orientation(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, tolerance: float = ORIENTATION_TOLERANCE
) -> bool:
    """Whether two IOP values agree component-wise within ``tolerance``."""
    return bool(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))) <= tolerance)


def cluster_orientations(
    orientations: Sequence[Sequence[float]], tolerance: float = ORIENTATION_TOLERANCE
) -> list[int]:
    """Label each IOP with the index of its orientation cluster (first come, first labelled).

    Returns
    -------
    list of int
        ``labels[n]`` is the cluster of ``orientations[n]``; clusters are numbered 0, 1, ...
        in order of first appearance.
    """
    centres: list[np.ndarray] = []
    labels: list[int] = []
    for iop in orientations:
        for index, centre in enumerate(centres):
            if same_orientation(iop, centre, tolerance):
                labels.append(index)
                break
        else:
            centres.append(np.asarray(iop, dtype=np.float64))
            labels.append(len(centres) - 1)
    return labels


def cluster_positions(distances: Sequence[float], tolerance_mm: float = SAME_POSITION_TOLERANCE_MM) -> list[list[int]]:
    """Group images by slice: indices sorted by distance along the normal, equal ones together.

    Parameters
    ----------
    distances : (N,) sequence of float
        Projection of each image position on the slice normal, mm.

    Returns
    -------
    list of list of int
        One list of image indices per slice, slices in increasing distance; inside a
        slice the indices keep their input order.
    """
    values = np.asarray(distances, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    slices: list[list[int]] = []
    last = -np.inf
    for index in order:
        if slices and values[index] - last < tolerance_mm:
            slices[-1].append(int(index))
        else:
            slices.append([int(index)])
        last = values[index]
    for members in slices:
        members.sort()
    return slices


@dataclass(frozen=True)
class StackGeometry:
    """Where the slices of a stack sit, and what is unusual about their spacing.

    Attributes
    ----------
    affine : (4, 4) ndarray
        Voxel ``(i=column, j=row, k=slice)`` -> RAS+ mm, before reorientation.
    warnings : tuple of str
        Uneven spacing, missing slices, gantry tilt: each with its values.
    """

    affine: np.ndarray
    warnings: tuple[str, ...]


def stack_affine(
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    positions: np.ndarray,
    *,
    single_slice_thickness_mm: float = 1.0,
    gantry_tilt_deg: float | None = None,
    label: str = "",
) -> StackGeometry:
    """Build the RAS affine of slices already sorted along the normal, and check their spacing.

    Parameters
    ----------
    orientation : (6,) sequence of float
        (0020,0037) shared by all slices.
    pixel_spacing : (2,) sequence of float
        (0028,0030) ``[row spacing, column spacing]`` in mm.
    positions : (K, 3) ndarray
        (0020,0032) of each slice in LPS mm, sorted by increasing projection on the normal.
    single_slice_thickness_mm : float
        Third voxel size when ``K == 1`` (SliceThickness, as dcm2niix does).
    gantry_tilt_deg : float, optional
        (0018,1120) Gantry/Detector Tilt, quoted in the tilt warning.
    label : str
        Names the series in warnings.

    Returns
    -------
    StackGeometry
        The affine uses the mean step vector from the first to the last slice, so
        the first and last slices are exact and a gantry tilt stays in the matrix as
        a shear; uneven spacing is reported, never silently averaged.

    Notes
    -----
    The increments check follows dicom2nifti (``rtol=0.05``, ``atol=0.1`` mm); a
    step longer than 1.5x the median is reported as missing slices.
    """
    iop = normalized_orientation(orientation)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = slice_normal(iop)
    row_spacing, col_spacing = (float(v) for v in pixel_spacing)
    if not (row_spacing > 0 and col_spacing > 0 and np.isfinite(row_spacing) and np.isfinite(col_spacing)):
        raise SeriesGeometryError(
            f"{label}: (0028,0030) Pixel Spacing {list(pixel_spacing)} must be two positive numbers."
        )
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    count = positions.shape[0]
    warnings: list[str] = []
    if count == 1:
        thickness = float(single_slice_thickness_mm)
        if not (thickness > 0 and np.isfinite(thickness)):
            thickness = 1.0
        step = normal * thickness
    else:
        distances = positions @ normal
        increments = np.diff(distances)
        if np.any(increments <= 0):
            raise SeriesGeometryError(f"{label}: slices are not sorted along the normal (internal error).")
        step = (positions[-1] - positions[0]) / (count - 1)
        warnings.extend(_spacing_warnings(increments, float(step @ normal), label))
        tilt = _tilt_warning(positions, normal, step, gantry_tilt_deg, label)
        if tilt:
            warnings.append(tilt)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return StackGeometry(affine=LPS_TO_RAS @ lps, warnings=tuple(warnings))


def _spacing_warnings(increments: np.ndarray, mean_step: float, label: str) -> list[str]:
    """Uneven increments and gaps, in words with the values."""
    # np.median's value, without its first-call import of numpy.ma (15 ms in a fresh process).
    ordered = np.sort(increments)
    middle = ordered.size // 2
    median = float(ordered[middle] if ordered.size % 2 else (ordered[middle - 1] + ordered[middle]) / 2)
    low, high = float(increments.min()), float(increments.max())
    out: list[str] = []
    gaps = np.flatnonzero(increments > GAP_FACTOR * median)
    if gaps.size:
        where = ", ".join(f"{increments[g]:.4g} mm after slice {g + 1}" for g in gaps[:5])
        more = f" and {gaps.size - 5} more" if gaps.size > 5 else ""
        out.append(
            f"{label}: slice spacing varies {low:.4g}-{high:.4g} mm (median {median:.4g} mm): "
            f"gap of {where}{more} is longer than {GAP_FACTOR}x the median, so slices are missing. "
            f"The volume uses the mean step {mean_step:.4g} mm, so slices between the first and last "
            "are drawn at approximate positions. Upload the complete series."
        )
        return out
    uneven = np.abs(increments - median) > SPACING_ABS_TOLERANCE_MM + SPACING_REL_TOLERANCE * median
    if np.any(uneven):
        out.append(
            f"{label}: slice spacing varies {low:.4g}-{high:.4g} mm (median {median:.4g} mm; "
            f"{int(np.count_nonzero(uneven))} of {increments.size} increments differ by more than "
            f"{SPACING_ABS_TOLERANCE_MM} mm + {SPACING_REL_TOLERANCE:.0%}). The volume uses the mean step "
            f"{mean_step:.4g} mm, so slices between the first and last are drawn at approximate positions."
        )
    return out


def _tilt_warning(
    positions: np.ndarray, normal: np.ndarray, step: np.ndarray, gantry_tilt_deg: float | None, label: str
) -> str:
    """Shear of the stack: the slice-to-slice vector is not along the normal."""
    total = positions[-1] - positions[0]
    in_plane = total - (total @ normal) * normal
    shear_mm = float(np.linalg.norm(in_plane))
    if shear_mm <= SHEAR_TOLERANCE_MM:
        return ""
    angle = float(np.degrees(np.arccos(min(1.0, abs(float(step @ normal)) / float(np.linalg.norm(step))))))
    tag = ""
    if gantry_tilt_deg is not None and gantry_tilt_deg != 0:
        tag = f"; (0018,1120) Gantry/Detector Tilt says {gantry_tilt_deg:g} degrees"
    return (
        f"{label}: gantry tilt of {angle:.2f} degrees (slices are shifted {shear_mm:.3g} mm in-plane from "
        f"first to last{tag}). The affine keeps this shear, so world positions are correct; tools that "
        "assume orthogonal voxels (NIfTI qform) will see a tilted grid."
    )


def centred_affine(shape: Sequence[int], spacing_mm: Sequence[float]) -> np.ndarray:
    """Affine for images without position: LPS identity directions, centred on the origin.

    dcm2niix uses the same convention for images without (0020,0032)/(0020,0037),
    so its output and ours describe the same world positions.

    Parameters
    ----------
    shape : (3,) sequence of int
        ``(columns, rows, slices)``.
    spacing_mm : (3,) sequence of float
        Voxel size along the same axes.

    Returns
    -------
    (4, 4) ndarray
        Voxel -> RAS+ mm.
    """
    sizes = np.asarray(shape[:3], dtype=np.float64)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    lps = np.diag([*spacing, 1.0])
    lps[:3, 3] = -(sizes - 1) / 2 * spacing
    return LPS_TO_RAS @ lps
