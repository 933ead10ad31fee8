"""Binary masks for meshing: thresholds with sourced presets, Otsu, clean-up and label maps.

A :class:`Mask` is stored as its bounding box inside the volume grid (plus the
grid's shape and affine), because a bone mask of a 512x512x300 CT fills a
fraction of the grid and every later step (components, closing, marching
cubes) costs in proportion to the box, not the grid. Functions take and
return values so they can run in a worker process.

References
----------
InVesalius threshold presets: ``invesalius/presets.py`` (``thresh_ct``), GPL-2.0,
https://github.com/invesalius/invesalius3.
TotalSegmentator class ids: ``totalsegmentator/map_to_binary.py`` (``class_map["total"]``),
Apache-2.0, https://github.com/wasserth/TotalSegmentator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

from core.errors import EmptySurfaceError, LimitError
from core.volume import Volume, spacing_from_affine

# Slabs of this many i-planes are thresholded at a time: the full-size boolean mask of a
# 512x512x300 CT (78 MB) is never allocated, and first-touch page faults on fresh memory
# cost more than the comparison itself on the VMs we run on.
_SLAB_BYTES = 8 * 1024**2

# 6-connectivity (voxels sharing a face): the connectivity VTK's marching cubes gives the
# inside. Voxels touching only by an edge or a corner become separate surface pieces, so
# "keep the largest component" with 6-connectivity (and cavities filled with 6-connected
# background) yields one closed surface; with 26-connectivity we measured 22-7000 pieces.
_FACE_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdPreset:
    """A threshold range in physical units and where it comes from.

    Parameters
    ----------
    name : str
        What the mask selects.
    lower, upper : float
        Inclusive range in ``unit``; ``upper`` None means no upper bound.
    unit : str
        "HU" for CT presets.
    source : str
        Who uses these values (a peer tool or the literature) or "TomoForge choice" with the reason.
    drop_border_components : bool
        Clean-up the preset needs: remove components touching the volume border (outside air).
    """

    name: str
    lower: float
    upper: float | None
    unit: str
    source: str
    drop_border_components: bool = False


CT_PRESETS: tuple[ThresholdPreset, ...] = (
    ThresholdPreset("Bone", 226, 3071, "HU", "InVesalius 3 preset 'Bone' (226..3071 HU)"),
    ThresholdPreset(
        "Bone, dense (>= 300 HU)",
        300,
        None,
        "HU",
        "TomoForge choice: fewer partial-volume islands than 226 HU; the value REFERENCE.md benchmarks use",
    ),
    ThresholdPreset("Soft tissue", -700, 225, "HU", "InVesalius 3 preset 'Soft Tissue' (-700..225 HU)"),
    ThresholdPreset("Skin (adult)", -718, -177, "HU", "InVesalius 3 preset 'Skin Tissue (Adult)' (-718..-177 HU)"),
    ThresholdPreset(
        "Lung and airways",
        -1024,
        -400,
        "HU",
        "TomoForge choice: air is -1000 HU, aerated lung about -900..-700 HU, soft tissue above -100 HU; "
        "components touching the volume border (air around the patient) are dropped",
        drop_border_components=True,
    ),
    ThresholdPreset(
        "Contrast-filled vessels",
        200,
        600,
        "HU",
        "TomoForge choice for CT angiography: iodinated lumen is typically 250..500 HU; "
        "cortical bone above 600 HU is left out, but bone touching vessels needs a crop box",
    ),
)


def preset_by_name(name: str) -> ThresholdPreset:
    """The CT preset called ``name`` (case-insensitive).

    Raises
    ------
    KeyError
        With the list of known names.
    """
    for preset in CT_PRESETS:
        if preset.name.lower() == name.lower():
            return preset
    raise KeyError(f"no threshold preset named {name!r}; known: {', '.join(p.name for p in CT_PRESETS)}")


# --------------------------------------------------------------------------------------
# The mask value
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Mask:
    """A binary mask kept as its bounding box inside a volume grid.

    Parameters
    ----------
    array : (a, b, c) bool ndarray
        The voxels of the bounding box; ``(0, 0, 0)`` when the mask is empty. Read-only.
    offset : (3,) tuple of int
        Grid index ``(i, j, k)`` of ``array[0, 0, 0]``.
    grid_shape : (3,) tuple of int
        Spatial shape ``(I, J, K)`` of the volume the mask belongs to.
    affine : (4, 4) ndarray
        Voxel index -> RAS+ mm of the volume grid.
    threshold : (lower, upper) or None
        The inclusive range the mask was thresholded with (None for a label map); the
        surface step places vertices between voxels by interpolating the values at it.
    cleaned : bool
        Clean-up changed the mask after thresholding, so it is no longer exactly the
        threshold of the values and the surface step must reconcile the two.
    """

    array: np.ndarray
    offset: tuple[int, int, int]
    grid_shape: tuple[int, int, int]
    affine: np.ndarray
    threshold: tuple[float, float | None] | None = None
    cleaned: bool = False

    def __post_init__(self) -> None:
        array = np.asarray(self.array, dtype=bool)
        if array.ndim != 3:
            raise ValueError(f"mask array must be 3D, got shape {array.shape}")
        if array.flags.writeable:
            array = array.view()
            array.flags.writeable = False
        affine = np.array(self.affine, dtype=np.float64)
        affine.flags.writeable = False
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "offset", tuple(int(v) for v in self.offset))
        object.__setattr__(self, "grid_shape", tuple(int(v) for v in self.grid_shape))

    @cached_property
    def voxel_count(self) -> int:
        # cached: counting a large box costs a pass over it, and the array is read-only
        return int(np.count_nonzero(self.array))

    @property
    def is_empty(self) -> bool:
        return self.array.size == 0 or self.voxel_count == 0

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    @property
    def volume_ml(self) -> float:
        """Volume of the selected voxels in mL (1 mL = 1000 mm3)."""
        return self.voxel_count * self.voxel_volume_mm3 / 1000.0

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Where ``array`` sits in the grid."""
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.array.shape, strict=True))  # type: ignore[return-value]

    def to_full(self) -> np.ndarray:
        """The mask on the whole grid, ``(I, J, K)`` bool (allocates the full size)."""
        full = np.zeros(self.grid_shape, dtype=bool)
        if self.array.size:
            full[self.slices] = self.array
        return full

    def plane_k(self, k: int) -> np.ndarray:
        """The ``(I, J)`` bool plane at grid index ``k`` (an axial slice after RAS reorientation)."""
        plane = np.zeros(self.grid_shape[:2], dtype=bool)
        local = k - self.offset[2]
        if self.array.size and 0 <= local < self.array.shape[2]:
            plane[self.slices[0], self.slices[1]] = self.array[:, :, local]
        return plane

    def touches_border(self) -> bool:
        """True when a selected voxel lies on a face of the volume grid."""
        if self.is_empty:
            return False
        for axis in range(3):
            if self.offset[axis] == 0 and np.take(self.array, 0, axis=axis).any():
                return True
            if (
                self.offset[axis] + self.array.shape[axis] == self.grid_shape[axis]
                and np.take(self.array, -1, axis=axis).any()
            ):
                return True
        return False

    def world_bounds_mm(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """RAS bounds (min xyz, max xyz) in mm of the centres of the selected voxels.

        Raises
        ------
        EmptySurfaceError
            The mask selects nothing.
        """
        if self.is_empty:
            raise EmptySurfaceError("the mask selects no voxels, so it has no bounds")
        # The extreme world coordinates are reached on the mask's boundary voxels; the
        # corners of its index bounding box are not enough for an oblique affine.
        eroded = ndimage.binary_erosion(self.array, border_value=0)
        ijk = np.argwhere(self.array & ~eroded) + np.asarray(self.offset)
        xyz = ijk @ self.affine[:3, :3].T + self.affine[:3, 3]
        return tuple(xyz.min(axis=0).tolist()), tuple(xyz.max(axis=0).tolist())  # type: ignore[return-value]


def mask_from_full(full: np.ndarray, affine: np.ndarray) -> Mask:
    """Wrap a whole-grid boolean array as a :class:`Mask` cropped to its bounding box.

    Parameters
    ----------
    full : (I, J, K) bool ndarray
    affine : (4, 4) ndarray
        Voxel index -> RAS+ mm.
    """
    full = np.asarray(full, dtype=bool)
    box = _bounding_box(full)
    if box is None:
        return _empty_mask(full.shape, affine)
    start = tuple(s.start for s in box)
    return Mask(np.ascontiguousarray(full[box]), start, full.shape, affine)  # type: ignore[arg-type]


def _empty_mask(
    grid_shape: Sequence[int],
    affine: np.ndarray,
    threshold: tuple[float, float | None] | None = None,
    *,
    cleaned: bool = False,
) -> Mask:
    return Mask(np.zeros((0, 0, 0), dtype=bool), (0, 0, 0), tuple(grid_shape), affine, threshold, cleaned)  # type: ignore[arg-type]


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Index box of the True voxels of a 3D bool array, or None when there are none."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def _refit(mask: Mask, array: np.ndarray, origin: Sequence[int]) -> Mask:
    """A cleaned mask from ``array`` placed at grid index ``origin``, cropped to its bounding box."""
    box = _bounding_box(array)
    if box is None:
        return _empty_mask(mask.grid_shape, mask.affine, mask.threshold, cleaned=True)
    start = tuple(int(o) + s.start for o, s in zip(origin, box, strict=True))
    return Mask(
        np.ascontiguousarray(array[box]),
        start,
        mask.grid_shape,
        mask.affine,
        mask.threshold,
        cleaned=True,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------


def integer_bounds(dtype: np.dtype, lower: float, upper: float | None) -> tuple[float, float | None]:
    """The inclusive range ``[lower, upper]`` expressed in values ``dtype`` can hold.

    For integer data a voxel ``v`` is selected when ``lower <= v <= upper``, which is
    ``ceil(lower) <= v <= floor(upper)``; returning those integers lets comparisons run
    in the array's own dtype (no float copy) and gives the surface step its half-integer
    levels. Float data is returned unchanged.
    """
    if not np.issubdtype(dtype, np.integer):
        return float(lower), (None if upper is None else float(upper))
    low = float(math.ceil(lower))
    high = None if upper is None else float(math.floor(upper))
    return low, high


def threshold_mask(volume_array: np.ndarray, affine: np.ndarray, lower: float, upper: float | None = None) -> Mask:
    """Select the voxels with ``lower <= value <= upper``.

    Parameters
    ----------
    volume_array : (I, J, K) ndarray
        Values in physical units (HU for CT). Integer data is compared in its own dtype.
    affine : (4, 4) ndarray
        Voxel index -> RAS+ mm.
    lower : float
        Inclusive lower bound in the volume's unit.
    upper : float or None
        Inclusive upper bound; None for no upper bound.

    Returns
    -------
    Mask
        Cropped to the bounding box of the selection (possibly empty); ``threshold`` is set.

    Raises
    ------
    ValueError
        ``upper < lower`` or NaN bounds.
    """
    array = np.asarray(volume_array)
    if array.dtype == bool:
        array = array.view(np.uint8)  # a binary volume: compare as 0/1
    if array.ndim != 3:
        raise ValueError(f"threshold_mask needs a 3D array, got shape {array.shape}")
    if math.isnan(lower) or (upper is not None and math.isnan(upper)):
        raise ValueError("threshold bounds must be numbers, got NaN")
    if upper is not None and upper < lower:
        raise ValueError(f"upper threshold {upper} is below the lower threshold {lower}")
    low, high = integer_bounds(array.dtype, lower, upper)
    if high is not None and high < low:
        return _empty_mask(array.shape, affine, (lower, upper))
    compare = _comparer(array.dtype, low, high)
    if compare is None:  # bounds outside what the dtype can hold
        return _empty_mask(array.shape, affine, (lower, upper))

    # Pass 1, slab by slab with one reused buffer: the bounding box.
    n_i = array.shape[0]
    plane_bytes = max(1, int(np.prod(array.shape[1:])))
    step = max(1, _SLAB_BYTES // plane_bytes)
    buffer = np.empty((min(step, n_i),) + array.shape[1:], dtype=bool)
    any_i = np.zeros(n_i, dtype=bool)
    any_j = np.zeros(array.shape[1], dtype=bool)
    any_k = np.zeros(array.shape[2], dtype=bool)
    for start in range(0, n_i, step):
        stop = min(start + step, n_i)
        slab = compare(array[start:stop], buffer[: stop - start])
        hit_i = slab.any(axis=(1, 2))
        if not hit_i.any():
            continue
        any_i[start:stop] = hit_i
        any_j |= slab.any(axis=(0, 2))
        any_k |= slab.any(axis=(0, 1))
    if not any_i.any():
        return _empty_mask(array.shape, affine, (lower, upper))
    box = tuple(slice(int(np.flatnonzero(hit)[0]), int(np.flatnonzero(hit)[-1]) + 1) for hit in (any_i, any_j, any_k))
    # Pass 2: the box only.
    crop = compare(array[box], np.empty(tuple(s.stop - s.start for s in box), dtype=bool))
    return Mask(crop, tuple(s.start for s in box), array.shape, affine, (lower, upper))  # type: ignore[arg-type]


def _comparer(dtype: np.dtype, low: float, high: float | None):  # noqa: ANN202
    """A function ``(values, out) -> out`` testing ``low <= values <= high`` in ``dtype``.

    Returns None when no value of ``dtype`` can be selected.
    """
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if low > info.max or (high is not None and high < info.min):
            return None
        low_value = dtype.type(max(low, info.min))
        high_value = None if high is None or high >= info.max else dtype.type(high)
    elif np.issubdtype(dtype, np.floating):
        low_value = dtype.type(low)
        high_value = None if high is None else dtype.type(high)
    else:
        raise ValueError(f"cannot threshold values of dtype {dtype}")

    def compare(values: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.greater_equal(values, low_value, out=out)
        if high_value is not None:
            out &= values <= high_value
        return out

    return compare


def otsu_threshold(volume_array: np.ndarray, *, max_samples: int = 4_000_000) -> float:
    """Otsu's threshold (skimage.filters.threshold_otsu) on a regular subsample of the voxels.

    Parameters
    ----------
    volume_array : (I, J, K) ndarray
    max_samples : int
        The array is strided down to about this many voxels: the histogram is the same to
        within a bin and a 512x512x300 CT takes 40 ms instead of a second.

    Returns
    -------
    float
        In the volume's unit. For CT this separates air from the body (about -500 HU),
        i.e. it gives a skin surface, as in NiiVue's ct2print default.

    Raises
    ------
    EmptySurfaceError
        All voxels have the same value: there is nothing to separate.
    """
    from skimage.filters import threshold_otsu

    array = np.asarray(volume_array)
    stride = max(1, round((array.size / max_samples) ** (1 / 3)))
    sample = array[::stride, ::stride, ::stride]
    sample = sample[np.isfinite(sample)] if np.issubdtype(sample.dtype, np.floating) else sample
    if sample.size == 0 or sample.min() == sample.max():
        raise EmptySurfaceError("all voxels have the same value, so Otsu's method finds no threshold")
    return float(threshold_otsu(sample))


# --------------------------------------------------------------------------------------
# Clean-up
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskCleanup:
    """Clean-up steps, applied in this order: crop, closing, border, islands, largest, cavities.

    Parameters
    ----------
    crop_box : ((i0, i1), (j0, j1), (k0, k1)) or None
        Keep only voxels with ``i0 <= i < i1`` etc. (grid indices, after RAS reorientation).
    closing_mm : float
        Morphological closing with a ball of this radius in mm (an ellipsoid in voxels on
        anisotropic grids); bridges gaps up to about twice the radius. 0 = off.
    drop_border_components : bool
        Remove components touching a face of the volume (e.g. the air around the patient).
    min_island_ml : float
        Remove components smaller than this many mL. 0 = off.
    keep_largest : int
        Keep only the N largest components. 0 = keep all.
    fill_cavities : bool
        Fill enclosed cavities (background not connected to the outside), e.g. marrow.
    """

    crop_box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
    closing_mm: float = 0.0
    drop_border_components: bool = False
    min_island_ml: float = 0.0
    keep_largest: int = 0
    fill_cavities: bool = False

    @property
    def is_noop(self) -> bool:
        return (
            self.crop_box is None
            and self.closing_mm <= 0
            and not self.drop_border_components
            and self.min_island_ml <= 0
            and self.keep_largest <= 0
            and not self.fill_cavities
        )


def clean_mask(mask: Mask, cleanup: MaskCleanup) -> Mask:
    """Apply :class:`MaskCleanup` steps to a mask.

    Parameters
    ----------
    mask : Mask
    cleanup : MaskCleanup

    Returns
    -------
    Mask
        A new mask with ``cleaned`` set (the same mask when there is nothing to do), possibly empty.

    Raises
    ------
    ValueError
        A crop box outside the grid or negative sizes.
    """
    if cleanup.is_noop or mask.is_empty:
        return mask
    if cleanup.keep_largest < 0 or cleanup.min_island_ml < 0 or cleanup.closing_mm < 0:
        raise ValueError(f"clean-up values must not be negative: {cleanup}")
    result = mask
    if cleanup.crop_box is not None:
        result = crop_mask(result, cleanup.crop_box)
    if cleanup.closing_mm > 0 and not result.is_empty:
        result = close_mask(result, cleanup.closing_mm)
    if (
        cleanup.drop_border_components or cleanup.min_island_ml > 0 or cleanup.keep_largest > 0
    ) and not result.is_empty:
        result = select_components(
            result,
            keep_largest=cleanup.keep_largest,
            min_volume_ml=cleanup.min_island_ml,
            drop_border=cleanup.drop_border_components,
        )
    if cleanup.fill_cavities and not result.is_empty:
        result = fill_cavities(result)
    return result


def crop_mask(mask: Mask, box: Sequence[Sequence[int]]) -> Mask:
    """Keep the voxels inside ``box`` = ``((i0, i1), (j0, j1), (k0, k1))``, half-open grid indices."""
    if len(box) != 3:
        raise ValueError(f"crop box needs three (start, stop) pairs, got {box}")
    bounds = []
    for axis, (start, stop) in enumerate(box):
        start, stop = int(start), int(stop)
        if not 0 <= start < stop <= mask.grid_shape[axis]:
            raise ValueError(
                f"crop box axis {'ijk'[axis]}: {start}..{stop} is empty or outside 0..{mask.grid_shape[axis]}"
            )
        bounds.append((start, stop))
    if mask.is_empty:
        return mask
    local = []
    for axis, (start, stop) in enumerate(bounds):
        lo = max(start - mask.offset[axis], 0)
        hi = min(stop - mask.offset[axis], mask.array.shape[axis])
        if hi <= lo:
            return _empty_mask(mask.grid_shape, mask.affine, mask.threshold, cleaned=True)
        local.append(slice(lo, hi))
    origin = [o + s.start for o, s in zip(mask.offset, local, strict=True)]
    return _refit(mask, mask.array[tuple(local)], origin)


def close_mask(mask: Mask, radius_mm: float) -> Mask:
    """Morphological closing with a ball of ``radius_mm`` in world millimetres.

    Uses Euclidean distance transforms with the grid spacing (``sampling``), so the ball is
    round in mm on anisotropic grids and the cost does not grow with the radius. The
    closing of a set lies within its bounding box, so the result is cropped back to it.
    """
    spacing = np.asarray(mask.spacing_mm)
    margin = np.ceil(radius_mm / spacing).astype(int) + 1
    padded_voxels = int(np.prod(np.asarray(mask.array.shape) + 2 * margin))
    check_mask_memory(padded_voxels, 2 + 8 + 4, f"closing with {radius_mm:g} mm")  # bools + EDT float64 + indices
    padded = np.pad(mask.array, [(m, m) for m in margin], constant_values=False)
    # dilation: within radius of the mask; erosion of that: farther than radius from its outside.
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing) <= radius_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing) > radius_mm
    inner = tuple(slice(m, m + n) for m, n in zip(margin, mask.array.shape, strict=True))
    return _refit(mask, closed[inner] | mask.array, mask.offset)


def select_components(
    mask: Mask, *, keep_largest: int = 0, min_volume_ml: float = 0.0, drop_border: bool = False
) -> Mask:
    """Keep connected components (6-connectivity: sharing a face) by size and position.

    Parameters
    ----------
    mask : Mask
    keep_largest : int
        Keep the N largest remaining components; 0 keeps all.
    min_volume_ml : float
        Drop components smaller than this volume in mL.
    drop_border : bool
        Drop components touching a face of the volume grid.
    """
    check_mask_memory(mask.array.size, 4 + 1, "labelling connected components")  # int32 labels + selection
    labels, count = ndimage.label(mask.array, structure=_FACE_CONNECTIVITY)
    if count == 0:
        return _empty_mask(mask.grid_shape, mask.affine, mask.threshold, cleaned=True)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = np.ones(count + 1, dtype=bool)
    keep[0] = False
    if drop_border:
        for axis in range(3):
            if mask.offset[axis] == 0:
                keep[np.unique(np.take(labels, 0, axis=axis))] = False
            if mask.offset[axis] + mask.array.shape[axis] == mask.grid_shape[axis]:
                keep[np.unique(np.take(labels, -1, axis=axis))] = False
        keep[0] = False
    if min_volume_ml > 0:
        keep &= sizes * mask.voxel_volume_mm3 / 1000.0 >= min_volume_ml
    if keep_largest > 0:
        order = np.argsort(np.where(keep, sizes, -1))[::-1]
        chosen = order[:keep_largest]
        largest = np.zeros_like(keep)
        largest[chosen] = keep[chosen]
        keep = largest
    return _refit(mask, keep[labels], mask.offset)


def fill_cavities(mask: Mask) -> Mask:
    """Fill background regions that do not reach the outside of the mask's bounding box.

    Background is 6-connected (scipy.ndimage.binary_fill_holes' default); with the
    6-connected components of :func:`select_components` this gives one closed surface.
    """
    return _refit(mask, ndimage.binary_fill_holes(mask.array), mask.offset)


def component_count(mask: Mask) -> int:
    """Number of 6-connected components of the mask (surface pieces marching cubes makes)."""
    if mask.is_empty:
        return 0
    return int(ndimage.label(mask.array, structure=_FACE_CONNECTIVITY)[1])


# --------------------------------------------------------------------------------------
# Label maps
# --------------------------------------------------------------------------------------

# TotalSegmentator v2 task "total" class ids (map_to_binary.py, class_map["total"]).
TOTALSEGMENTATOR_TOTAL: dict[int, str] = dict(
    enumerate(
        (
            "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right "
            "adrenal_gland_left lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right "
            "lung_middle_lobe_right lung_lower_lobe_right esophagus trachea thyroid_gland small_bowel "
            "duodenum colon urinary_bladder prostate kidney_cyst_left kidney_cyst_right sacrum "
            "vertebrae_S1 vertebrae_L5 vertebrae_L4 vertebrae_L3 vertebrae_L2 vertebrae_L1 vertebrae_T12 "
            "vertebrae_T11 vertebrae_T10 vertebrae_T9 vertebrae_T8 vertebrae_T7 vertebrae_T6 vertebrae_T5 "
            "vertebrae_T4 vertebrae_T3 vertebrae_T2 vertebrae_T1 vertebrae_C7 vertebrae_C6 vertebrae_C5 "
            "vertebrae_C4 vertebrae_C3 vertebrae_C2 vertebrae_C1 heart aorta pulmonary_vein "
            "brachiocephalic_trunk subclavian_artery_right subclavian_artery_left "
            "common_carotid_artery_right common_carotid_artery_left brachiocephalic_vein_left "
            "brachiocephalic_vein_right atrial_appendage_left superior_vena_cava inferior_vena_cava "
            "portal_vein_and_splenic_vein iliac_artery_left iliac_artery_right iliac_vena_left "
            "iliac_vena_right humerus_left humerus_right scapula_left scapula_right clavicula_left "
            "clavicula_right femur_left femur_right hip_left hip_right spinal_cord gluteus_maximus_left "
            "gluteus_maximus_right gluteus_medius_left gluteus_medius_right gluteus_minimus_left "
            "gluteus_minimus_right autochthon_left autochthon_right iliopsoas_left iliopsoas_right brain "
            "skull rib_left_1 rib_left_2 rib_left_3 rib_left_4 rib_left_5 rib_left_6 rib_left_7 rib_left_8 "
            "rib_left_9 rib_left_10 rib_left_11 rib_left_12 rib_right_1 rib_right_2 rib_right_3 rib_right_4 "
            "rib_right_5 rib_right_6 rib_right_7 rib_right_8 rib_right_9 rib_right_10 rib_right_11 "
            "rib_right_12 sternum costal_cartilages"
        ).split(),
        start=1,
    )
)

LABEL_SCHEMES: dict[str, dict[int, str]] = {
    "numbers": {},
    "TotalSegmentator (task total, v2)": TOTALSEGMENTATOR_TOTAL,
}

BONE_COLOR: tuple[int, int, int] = (241, 214, 145)  # 3D Slicer's "bone" colour


def label_color(label: int) -> tuple[int, int, int]:
    """The RGB colour (0-255) of a label: the same as the slice overlays (core.render.label_colors)."""
    from core.render import label_colors  # display module; imported only when colours are asked for

    return label_colors([int(label)]).get(int(label), BONE_COLOR)


def label_name(label: int, scheme: str = "numbers") -> str:
    """``"5 liver"`` in a known scheme, ``"label 5"`` otherwise."""
    names = LABEL_SCHEMES.get(scheme, {})
    return f"{label} {names[label]}" if label in names else f"label {label}"


def guess_label_scheme(labels: Iterable[int]) -> str:
    """TotalSegmentator names when the ids fit its 1..117 range and there are several; else numbers."""
    present = [int(v) for v in labels if int(v) != 0]
    if len(present) >= 3 and all(v in TOTALSEGMENTATOR_TOTAL for v in present):
        return "TotalSegmentator (task total, v2)"
    return "numbers"


def label_counts(volume_array: np.ndarray) -> dict[int, int]:
    """Voxel count per non-zero label of an integer-valued, non-negative label map.

    Raises
    ------
    ValueError
        Negative, non-integer or huge values: not a label map.
    """
    array = np.asarray(volume_array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError("a label map must hold whole numbers; this volume has fractional values")
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise ValueError(f"a label map must hold integers, got dtype {array.dtype}")
    if array.size == 0:
        return {}
    low, high = array.min(), array.max()
    if low < 0 or high > 65535:
        raise ValueError(f"label values must be 0..65535, this volume holds {low}..{high}")
    counts = np.bincount(array.astype(np.intp, copy=False).ravel(), minlength=int(high) + 1)
    return {int(v): int(counts[v]) for v in np.flatnonzero(counts) if v != 0}


def is_label_map(volume: Volume) -> bool:
    """Heuristic: integer-valued, non-negative, at most 128 distinct values, mostly zero.

    Used only to pick the page's default mode; the user can always switch.
    """
    if volume.is_rgb or volume.unit == "HU":
        return False
    array = volume.array if volume.n_frames == 1 else volume.array[..., 0]
    sample = array[::2, ::2, ::2]
    if np.issubdtype(sample.dtype, np.floating):
        if not np.array_equal(sample, np.round(sample)):
            return False
    elif not (np.issubdtype(sample.dtype, np.integer) or sample.dtype == bool):
        return False
    if sample.size == 0 or sample.min() < 0 or sample.max() > 65535:
        return False
    counts = np.bincount(sample.astype(np.intp, copy=False).ravel())
    distinct = int(np.count_nonzero(counts))
    return 2 <= distinct <= 128 and counts[0] >= 0.3 * sample.size


def label_masks(volume_array: np.ndarray, affine: np.ndarray, labels: Sequence[int] | None = None) -> dict[int, Mask]:
    """One :class:`Mask` per label, each cropped to that label's bounding box.

    Parameters
    ----------
    volume_array : (I, J, K) integer ndarray
        A label map (0 = background).
    affine : (4, 4) ndarray
    labels : sequence of int or None
        The labels wanted; None for every non-zero label present.

    Returns
    -------
    dict
        ``{label: Mask}`` in the order asked for.

    Raises
    ------
    EmptySurfaceError
        A requested label does not occur in the volume (the message lists those that do).
    """
    array = np.asarray(volume_array)
    counts = label_counts(array)
    wanted = sorted(counts) if labels is None else [int(v) for v in labels]
    missing = [v for v in wanted if v not in counts]
    if missing:
        shown = ", ".join(str(v) for v in sorted(counts)[:40]) or "none"
        raise EmptySurfaceError(
            f"label {', '.join(map(str, missing))} does not occur in this label map; labels present: {shown}"
        )
    # find_objects gives every label's box in one pass; it needs integer input.
    integer = array if np.issubdtype(array.dtype, np.integer) else array.astype(np.int32)
    boxes = ndimage.find_objects(integer, max_label=max(wanted) if wanted else 0)
    out: dict[int, Mask] = {}
    for value in wanted:
        box = boxes[value - 1]
        crop = np.ascontiguousarray(integer[box] == value)
        out[value] = Mask(crop, tuple(s.start for s in box), array.shape, affine)  # type: ignore[arg-type]
    return out


# --------------------------------------------------------------------------------------
# Warnings and memory
# --------------------------------------------------------------------------------------

# Air-to-skin partial-volume range on CT: a lower threshold here puts the surface on the skin.
_CT_SKIN_LOWER_HU = (-900.0, 100.0)


def face_warning(modality: str, mask: Mask, lower: float | None) -> str | None:
    """A warning when the surface may show a face, or None.

    Conditions, kept simple on purpose: the modality is CT or MR; the lower threshold is
    in the skin range (CT: -900..100 HU; MR intensities are not calibrated, so any
    threshold counts); and the mask reaches the anterior third of the volume (grid axis j
    points anterior after RAS reorientation). It cannot tell a head from a body, so the
    message says "if this is a head".
    """
    modality = (modality or "").upper()
    if modality not in ("CT", "MR") or mask.is_empty:
        return None
    if modality == "CT" and (lower is None or not _CT_SKIN_LOWER_HU[0] <= lower <= _CT_SKIN_LOWER_HU[1]):
        return None
    n_j = mask.grid_shape[1]
    anterior_start = math.ceil(2 * n_j / 3)
    local = anterior_start - mask.offset[1]
    if local >= mask.array.shape[1] or not mask.array[:, max(local, 0) :, :].any():
        return None
    return (
        "If this is a head scan, this surface shows the face: the threshold is in the skin range and the "
        "mask reaches the front of the volume. A face can identify the patient; crop it away (crop box, "
        "j axis) before sharing the file."
    )


def check_mask_memory(n_voxels: int, bytes_per_voxel: float, what: str) -> None:
    """Raise :class:`LimitError` before a step that would need more memory than is free.

    Parameters
    ----------
    n_voxels : int
    bytes_per_voxel : float
        Peak bytes the step allocates per voxel.
    what : str
        The step, for the message.
    """
    need = n_voxels * bytes_per_voxel
    free = available_memory_bytes()
    if free is not None and need > 0.6 * free:
        raise LimitError(
            f"{what} would need about {need / 1024**3:.1f} GB of memory and {free / 1024**3:.1f} GB is free. "
            "Use a crop box, a higher threshold or downsampling."
        )


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


__all__ = [
    "BONE_COLOR",
    "CT_PRESETS",
    "LABEL_SCHEMES",
    "Mask",
    "MaskCleanup",
    "ThresholdPreset",
    "TOTALSEGMENTATOR_TOTAL",
    "available_memory_bytes",
    "check_mask_memory",
    "clean_mask",
    "close_mask",
    "component_count",
    "crop_mask",
    "face_warning",
    "fill_cavities",
    "guess_label_scheme",
    "integer_bounds",
    "is_label_map",
    "label_color",
    "label_counts",
    "label_masks",
    "label_name",
    "mask_from_full",
    "otsu_threshold",
    "preset_by_name",
    "select_components",
    "threshold_mask",
]
