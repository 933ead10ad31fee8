"""Slices of a volume as screen images: orientation, proportions, slabs, overlays, readouts, export.

Screen conventions (the common radiology ones):

* **axial**: seen from the feet. Anterior at the top. Radiological (default):
  the patient's right on the screen's left; neurological: the patient's left
  on the left.
* **coronal**: seen from the front. Superior at the top; left/right as axial.
* **sagittal**: seen from the patient's left. Superior at the top, anterior on
  the screen's **left** (the radiological/neurological toggle does not apply).

The array of a :class:`~core.volume.Volume` is already reoriented to the
closest RAS+ axes (``i`` to Right, ``j`` to Anterior, ``k`` to Superior), so
an axial slice is ``array[:, :, k]`` and the screen is that slice transposed and
flipped. An oblique tilt stays in the affine: the slice is shown as acquired
(no resampling across slices), the edge letters name the closest anatomical
direction and :attr:`ViewGeometry.obliquity_deg` says how far off it is.

Physical proportions: voxels are rarely square in a coronal or sagittal view
(e.g. 0.7 mm pixels, 2 mm slices). Images are resampled (nearest neighbour,
so every screen pixel shows one true voxel value) to square pixels of the
finer spacing. All coordinates exchanged with the UI (``col``, ``row``) are in
pixels of that output image.
"""

from __future__ import annotations

import io
import math
import struct
import weakref
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image

try:  # optional: Intel ISA-L deflate, in requirements.txt for .nii.gz export
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - plain zlib is only slower
    _isal_zlib = None  # type: ignore[assignment]

from core.errors import CoreError
from core.series import Window
from core.volume import Volume
from core.windowing import apply_window, colormap_lut, display_lut, is_lut_dtype, lut_index

__all__ = [
    "PLANES",
    "LabelOverlay",
    "Readout",
    "Slab",
    "ThresholdOverlay",
    "ViewGeometry",
    "encode_jpeg",
    "deflate",
    "direction_letter",
    "encode_png",
    "histogram",
    "label_colors",
    "label_values",
    "linked_indices",
    "n_slices",
    "plane_zip",
    "readout",
    "render_view",
    "sample_labels",
    "screen_to_voxel",
    "slab_range",
    "view_file_name",
    "view_geometry",
    "view_values",
    "voxel_to_screen",
]

Plane = Literal["axial", "coronal", "sagittal"]
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")

# Voxel axis normal to each plane, and the axes along screen columns and rows.
_SLICE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
_COL_AXIS = {"axial": 0, "coronal": 0, "sagittal": 1}
_ROW_AXIS = {"axial": 1, "coronal": 2, "sagittal": 2}
_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of x, y, z in RAS+

MAX_SIDE_PX = 4096  # cap on a resampled view's side, for absurd spacing ratios


def _check_plane(plane: str) -> str:
    if plane not in _SLICE_AXIS:
        raise CoreError(f"unknown plane {plane!r}; choose one of {', '.join(PLANES)}")
    return plane


def direction_letter(direction: np.ndarray) -> str:
    """The anatomical letter (R/L/A/P/S/I) of the RAS+ axis closest to ``direction`` (3,)."""
    axis = int(np.argmax(np.abs(direction)))
    return _LETTERS[axis][1 if direction[axis] > 0 else 0]


@dataclass(frozen=True, eq=False)
class ViewGeometry:
    """How one plane of a volume maps to screen pixels. Built by :func:`view_geometry`.

    Attributes
    ----------
    plane : str
        ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    slice_axis, col_axis, row_axis : int
        Voxel axes (0=i, 1=j, 2=k) normal to the plane, along screen columns and rows.
    col_descending, row_descending : bool
        The voxel index decreases from the screen's left to right / top to bottom.
    native_shape : (rows, cols)
        One pixel per voxel.
    shape : (H, W)
        Output image size in pixels.
    pixel_mm : (float, float)
        Output pixel size (row height, column width) in mm; equal when square.
    col_src, row_src : (W,) and (H,) int ndarray
        Native screen column / row shown by each output column / row.
    col_voxel, row_voxel : (W,) and (H,) int ndarray
        Voxel index along ``col_axis`` / ``row_axis`` for each output column / row.
    letters : dict
        ``{"left", "right", "top", "bottom"}`` -> R/L/A/P/S/I, from the affine.
    obliquity_deg : float
        Largest angle between a screen direction and its letter's axis.
    """

    plane: str
    radiological: bool
    slice_axis: int
    col_axis: int
    row_axis: int
    col_descending: bool
    row_descending: bool
    n_slices: int
    native_shape: tuple[int, int]
    shape: tuple[int, int]
    pixel_mm: tuple[float, float]
    col_src: np.ndarray
    row_src: np.ndarray
    col_voxel: np.ndarray
    row_voxel: np.ndarray
    letters: dict[str, str]
    obliquity_deg: float
    slice_spacing_mm: float

    @property
    def resampled(self) -> bool:
        return self.shape != self.native_shape


def _nearest_map(n_native: int, n_out: int) -> np.ndarray:
    # Output pixel centre -> the native pixel that contains it.
    out = np.floor((np.arange(n_out) + 0.5) * n_native / n_out).astype(np.intp)
    return np.minimum(out, n_native - 1)


@lru_cache(maxsize=64)
def _geometry_cached(
    shape: tuple[int, int, int],
    affine_bytes: bytes,
    plane: str,
    radiological: bool,
    square_pixels: bool,
) -> ViewGeometry:
    affine = np.frombuffer(affine_bytes, dtype=np.float64).reshape(4, 4)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    slice_axis, col_axis, row_axis = _SLICE_AXIS[plane], _COL_AXIS[plane], _ROW_AXIS[plane]
    # Rows always run from the top (A for axial, S otherwise) down; columns run from R
    # (radiological) or L (neurological); sagittal columns from A.
    col_descending = True if plane == "sagittal" else radiological
    row_descending = True
    n_cols, n_rows = shape[col_axis], shape[row_axis]
    col_mm, row_mm = float(spacing[col_axis]), float(spacing[row_axis])
    if square_pixels:
        size = min(col_mm, row_mm)
        size = max(size, col_mm * n_cols / MAX_SIDE_PX, row_mm * n_rows / MAX_SIDE_PX)
        width = max(1, int(round(n_cols * col_mm / size)))
        height = max(1, int(round(n_rows * row_mm / size)))
        pixel_mm = (n_rows * row_mm / height, n_cols * col_mm / width)
    else:
        width, height = n_cols, n_rows
        pixel_mm = (row_mm, col_mm)
    # The nearest-voxel map is built in voxel order and then mirrored, so a flipped display
    # is exactly the mirror image (ties at voxel borders resolve the same way on both sides).
    col_voxel = _nearest_map(n_cols, width)
    row_voxel = _nearest_map(n_rows, height)
    if col_descending:
        col_voxel = col_voxel[::-1].copy()
    if row_descending:
        row_voxel = row_voxel[::-1].copy()
    col_src = (n_cols - 1 - col_voxel) if col_descending else col_voxel.copy()
    row_src = (n_rows - 1 - row_voxel) if row_descending else row_voxel.copy()

    # Letters: the world direction of moving right / down on the screen.
    right = np.zeros(3)
    right[col_axis] = -1.0 if col_descending else 1.0
    down = np.zeros(3)
    down[row_axis] = -1.0 if row_descending else 1.0
    world_right = affine[:3, :3] @ right
    world_down = affine[:3, :3] @ down
    letters = {
        "right": direction_letter(world_right),
        "left": direction_letter(-world_right),
        "bottom": direction_letter(world_down),
        "top": direction_letter(-world_down),
    }
    angles = []
    for vector in (world_right, world_down):
        unit = vector / np.linalg.norm(vector)
        angles.append(math.degrees(math.acos(min(1.0, float(np.max(np.abs(unit)))))))
    for array in (col_src, row_src, col_voxel, row_voxel):
        array.flags.writeable = False
    return ViewGeometry(
        plane=plane,
        radiological=radiological,
        slice_axis=slice_axis,
        col_axis=col_axis,
        row_axis=row_axis,
        col_descending=col_descending,
        row_descending=row_descending,
        n_slices=int(shape[slice_axis]),
        native_shape=(n_rows, n_cols),
        shape=(height, width),
        pixel_mm=pixel_mm,
        col_src=col_src,
        row_src=row_src,
        col_voxel=col_voxel,
        row_voxel=row_voxel,
        letters=letters,
        obliquity_deg=max(angles),
        slice_spacing_mm=float(spacing[slice_axis]),
    )


def view_geometry(
    volume: Volume,
    plane: str,
    *,
    radiological: bool = True,
    square_pixels: bool = True,
) -> ViewGeometry:
    """Screen geometry of one plane of ``volume`` (cached on shape and affine).

    Parameters
    ----------
    volume : Volume
    plane : {"axial", "coronal", "sagittal"}
    radiological : bool
        Patient's right on the screen's left in axial and coronal views.
    square_pixels : bool
        Resample to square pixels (physical proportions); False keeps one pixel per voxel.
    """
    _check_plane(plane)
    return _geometry_cached(
        volume.spatial_shape, volume.affine.tobytes(), plane, bool(radiological), bool(square_pixels)
    )


def n_slices(volume: Volume, plane: str) -> int:
    """Number of slices of ``volume`` in ``plane``."""
    return int(volume.spatial_shape[_SLICE_AXIS[_check_plane(plane)]])


def linked_indices(ijk: Sequence[int]) -> dict[str, int]:
    """Slice index of each plane passing through voxel ``ijk`` (for a linked crosshair)."""
    return {plane: int(ijk[_SLICE_AXIS[plane]]) for plane in PLANES}


@dataclass(frozen=True)
class Slab:
    """A thick-slab projection through the slice.

    Parameters
    ----------
    mode : {"max", "min", "mean"}
        Maximum (MIP), minimum (MinIP) or mean intensity projection.
    thickness_mm : float
        Slab thickness; rounded to a whole number of slices (at least one),
        centred on the current slice and clipped at the volume's ends.
    """

    mode: Literal["max", "min", "mean"]
    thickness_mm: float


def slab_range(geometry: ViewGeometry, index: int, slab: Slab | None) -> tuple[int, int]:
    """Slices ``[start, stop)`` a slab covers around ``index`` (just ``index`` without a slab)."""
    if slab is None:
        return index, index + 1
    count = max(1, int(round(slab.thickness_mm / geometry.slice_spacing_mm)))
    start = index - (count - 1) // 2
    stop = start + count
    return max(0, start), min(geometry.n_slices, stop)


@dataclass(frozen=True, eq=False)
class LabelOverlay:
    """A label map drawn over the view, aligned through world coordinates.

    Parameters
    ----------
    labels : Volume
        Integer labels, 0 = background. Its own grid and affine: every screen
        pixel takes the label of the label-map voxel nearest to its world position.
    opacity : float
        0 (invisible) to 1 (opaque).
    colors : mapping label -> (r, g, b), optional
        Defaults to :func:`label_colors`.
    """

    labels: Volume
    opacity: float = 0.5
    colors: Mapping[int, tuple[int, int, int]] | None = None


@dataclass(frozen=True)
class ThresholdOverlay:
    """A mask of the displayed values within ``[lower, upper]`` (physical units), drawn in colour."""

    lower: float
    upper: float
    opacity: float = 0.4
    color: tuple[int, int, int] = (255, 60, 60)


Overlay = LabelOverlay | ThresholdOverlay


# Per-volume facts computed once (value range). Keyed weakly by the Volume object so
# nothing outlives the session that holds the volume.
_VOLUME_FACTS: weakref.WeakKeyDictionary[Volume, dict[str, object]] = weakref.WeakKeyDictionary()


def _facts(volume: Volume) -> dict[str, object]:
    facts = _VOLUME_FACTS.get(volume)
    if facts is None:
        facts = {}
        _VOLUME_FACTS[volume] = facts
    return facts


def _value_range(volume: Volume) -> tuple[float, float]:
    facts = _facts(volume)
    if "range" not in facts:
        array = volume.array
        if array.dtype.kind == "f":
            finite = array[np.isfinite(array)] if not np.all(np.isfinite(array)) else array
            facts["range"] = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        else:
            facts["range"] = (float(array.min()), float(array.max()))
    return facts["range"]  # type: ignore[return-value]


def _frame_array(volume: Volume, frame: int) -> np.ndarray:
    """The 3D (or 3D x RGB) array of one time point, as a view."""
    array = volume.array
    has_time = array.ndim == (5 if volume.is_rgb else 4)
    if not has_time:
        if frame not in (0, -1):
            raise CoreError(f"frame {frame} requested but the volume has a single frame (shape {array.shape})")
        return array
    frames = volume.n_frames
    if not 0 <= frame < frames:
        raise CoreError(f"frame {frame} is outside 0..{frames - 1} of this {frames}-frame series")
    return array[:, :, :, frame, :] if volume.is_rgb else array[:, :, :, frame]


def _check_index(geometry: ViewGeometry, index: int) -> int:
    if not 0 <= index < geometry.n_slices:
        raise CoreError(
            f"{geometry.plane} slice {index} is outside 0..{geometry.n_slices - 1}; choose a slice in that range"
        )
    return int(index)


def _to_screen(plane_array: np.ndarray, geometry: ViewGeometry) -> np.ndarray:
    """(col_axis, row_axis[, 3]) voxel order -> (rows, cols[, 3]) screen order, as a view."""
    screen = np.swapaxes(plane_array, 0, 1)
    if geometry.row_descending:
        screen = screen[::-1]
    if geometry.col_descending:
        screen = screen[:, ::-1]
    return screen


def _native_raw(array3: np.ndarray, geometry: ViewGeometry, index: int, slab: Slab | None, rgb: bool) -> np.ndarray:
    """Values of the slice (or slab projection) in native screen orientation (rows, cols[, 3])."""
    axis = geometry.slice_axis
    if slab is None or rgb:
        selector: list[slice | int] = [slice(None)] * 3
        selector[axis] = index
        return _to_screen(array3[tuple(selector)], geometry)
    start, stop = slab_range(geometry, index, slab)
    selector = [slice(None)] * 3
    selector[axis] = slice(start, stop)
    block = array3[tuple(selector)]
    if slab.mode == "max":
        projected = block.max(axis=axis)
    elif slab.mode == "min":
        projected = block.min(axis=axis)
    elif slab.mode == "mean":
        projected = block.mean(axis=axis, dtype=np.float64).astype(np.float32)
    else:
        raise CoreError(f"unknown slab mode {slab.mode!r}; choose max, min or mean")
    return _to_screen(projected, geometry)


def _window_gray_or_color(volume: Volume, raw: np.ndarray, window: Window, invert: bool, colormap: str) -> np.ndarray:
    """Window native raw values to uint8 (rows, cols) grey or (rows, cols, 3) colour, contiguous."""
    if is_lut_dtype(raw.dtype):
        table = display_lut(raw.dtype, window, invert=invert, colormap=colormap)
        return np.take(table, np.ascontiguousarray(lut_index(raw)), axis=0)
    if raw.dtype.kind in "iu":
        lo, hi = _value_range(volume)
        if hi - lo < 65536:
            # Wider integers with a small range (e.g. int32 CT): offset into a 16-bit table.
            shifted = (raw - np.asarray(lo, dtype=raw.dtype)).astype(np.uint16)
            table = _offset_lut(int(lo), window, invert, colormap)
            return np.take(table, shifted, axis=0)
    gray = apply_window(raw, window, invert=invert)
    if colormap != "gray":
        return colormap_lut(colormap)[gray]
    return np.ascontiguousarray(gray)


@lru_cache(maxsize=32)
def _offset_lut_cached(lo: int, center: float, width: float, invert: bool, colormap: str) -> np.ndarray:
    values = lo + np.arange(65536, dtype=np.int64)
    gray = apply_window(values, Window(center, width), invert=invert)
    table = gray if colormap == "gray" else colormap_lut(colormap)[gray]
    table.flags.writeable = False
    return table


def _offset_lut(lo: int, window: Window, invert: bool, colormap: str) -> np.ndarray:
    return _offset_lut_cached(lo, float(window.center), float(window.width), bool(invert), colormap)


def _rgb_display(raw: np.ndarray, window: Window, invert: bool) -> np.ndarray:
    """RGB voxels as they are (8-bit) or windowed per component (other dtypes)."""
    if raw.dtype == np.uint8:
        out = np.ascontiguousarray(raw)
        return 255 - out if invert else out
    return apply_window(np.ascontiguousarray(raw), window, invert=invert)


def _resample(image: np.ndarray, geometry: ViewGeometry) -> np.ndarray:
    if not geometry.resampled:
        return image
    if geometry.shape[0] != geometry.native_shape[0]:
        image = np.take(image, geometry.row_src, axis=0)
    if geometry.shape[1] != geometry.native_shape[1]:
        image = np.take(image, geometry.col_src, axis=1)
    return image


def view_values(
    volume: Volume,
    plane: str,
    index: int,
    *,
    frame: int = 0,
    radiological: bool = True,
    slab: Slab | None = None,
) -> np.ndarray:
    """The values a view shows, one per voxel, in native screen orientation.

    Returns
    -------
    (rows, cols) or (rows, cols, 3) ndarray
        Contiguous; ``rows, cols = view_geometry(...).native_shape``. Physical
        units (the slab projection when ``slab`` is given). For hover readouts
        in the browser: output pixel ``(col, row)`` shows native pixel
        ``(geometry.row_src[row], geometry.col_src[col])``.
    """
    geometry = view_geometry(volume, plane, radiological=radiological)
    array3 = _frame_array(volume, frame)
    return np.ascontiguousarray(_native_raw(array3, geometry, _check_index(geometry, index), slab, volume.is_rgb))


def render_view(
    volume: Volume,
    plane: str,
    index: int,
    window: Window,
    *,
    frame: int = 0,
    radiological: bool = True,
    invert: bool = False,
    colormap: str = "gray",
    slab: Slab | None = None,
    overlays: Sequence[Overlay] = (),
    square_pixels: bool = True,
) -> np.ndarray:
    """One view of a volume as display pixels.

    Parameters
    ----------
    volume : Volume
    plane : {"axial", "coronal", "sagittal"}
    index : int
        Slice number along the plane's normal axis (``k`` axial, ``j`` coronal,
        ``i`` sagittal), ``0 <= index < n_slices(volume, plane)``.
    window : Window
        In the volume's units (HU for CT).
    frame : int
        Time point of a 4D volume.
    radiological : bool
        Patient's right on the screen's left (axial, coronal).
    invert : bool
        The user's inversion, applied on top of MONOCHROME1
        (``volume.display_inverted``), which is always honoured.
    colormap : str
        One of :data:`core.windowing.COLORMAPS`; ignored for RGB volumes.
    slab : Slab, optional
        Maximum/minimum/mean projection over a thickness in mm.
    overlays : sequence of LabelOverlay or ThresholdOverlay
        Drawn in order over the image.
    square_pixels : bool
        Resample to square pixels so proportions are physical (default).

    Returns
    -------
    (H, W, 1) or (H, W, 3) uint8 ndarray
        Grey when the colormap is grey, there are no overlays and the volume
        is not RGB; colour otherwise. ``(H, W) = view_geometry(...).shape``.

    Raises
    ------
    CoreError
        Unknown plane, colormap or slab mode; slice or frame out of range.
    """
    geometry = view_geometry(volume, plane, radiological=radiological, square_pixels=square_pixels)
    index = _check_index(geometry, index)
    array3 = _frame_array(volume, frame)
    raw = _native_raw(array3, geometry, index, slab, volume.is_rgb)
    if any(isinstance(o, ThresholdOverlay) for o in overlays):
        raw = np.ascontiguousarray(raw)  # gathered once, read by the window and each mask
    flip = bool(invert) != bool(volume.display_inverted)
    if volume.is_rgb:
        image = _rgb_display(raw, window, flip)
    else:
        image = _window_gray_or_color(volume, raw, window, flip, colormap)
    image = _resample(image, geometry)
    if overlays:
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        for overlay in overlays:
            if isinstance(overlay, ThresholdOverlay):
                if volume.is_rgb:
                    raise CoreError("a threshold mask needs a scalar volume; this one is RGB")
                # The mask is taken on the values shown (the slab projection when there is one).
                mask = (raw >= overlay.lower) & (raw <= overlay.upper)
                image = _blend(image, _resample(mask, geometry), overlay.color, overlay.opacity)
            elif isinstance(overlay, LabelOverlay):
                labels = sample_labels(
                    volume, overlay.labels, plane, index, radiological=radiological, square_pixels=square_pixels
                )
                image = _blend_labels(image, labels, overlay)
            else:
                raise CoreError(f"unknown overlay type {type(overlay).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    return image


def _blend(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int], opacity: float) -> np.ndarray:
    alpha = float(np.clip(opacity, 0.0, 1.0))
    if not mask.any() or alpha == 0.0:
        return image
    out = image.copy()
    pixels = out[mask].astype(np.float32)
    out[mask] = np.floor(pixels * (1.0 - alpha) + np.asarray(color, np.float32) * alpha + 0.5).astype(np.uint8)
    return out


# Distinct colours for labels 1, 2, ... (cycled); 3D Slicer-like saturated hues.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)  # fmt: skip


def label_colors(values: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """A colour per label value (0 is background and gets none); stable for a given value."""
    return {int(v): _PALETTE[(abs(int(v)) - 1) % len(_PALETTE)] for v in values if int(v) != 0}


def label_values(labels: Volume) -> list[int]:
    """The non-zero label values present (sorted), computed once per label volume.

    Raises
    ------
    CoreError
        The label map holds non-integer values (e.g. an image uploaded by mistake).
    """
    facts = _facts(labels)
    if "labels" not in facts:
        array = labels.array
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or not np.array_equal(array, np.rint(array)):
                raise CoreError(
                    f"the overlay '{labels.description or 'label map'}' holds non-integer values; "
                    "upload a segmentation (label map) with whole-number labels"
                )
        values = np.unique(array)
        facts["labels"] = [int(v) for v in values if v != 0]
    return facts["labels"]  # type: ignore[return-value]


def sample_labels(
    volume: Volume,
    labels: Volume,
    plane: str,
    index: int,
    *,
    radiological: bool = True,
    square_pixels: bool = True,
) -> np.ndarray:
    """Labels under every output pixel of a view, looked up through world coordinates.

    Each output pixel's voxel centre in ``volume`` is mapped to millimetres
    (``volume.affine``) and back into ``labels``' grid (``inv(labels.affine)``);
    the nearest label voxel gives the label, 0 outside the label map. The
    label map may have any grid (resolution, flips, axis order, extent).

    Returns
    -------
    (H, W) int64 ndarray
    """
    geometry = view_geometry(volume, plane, radiological=radiological, square_pixels=square_pixels)
    index = _check_index(geometry, index)
    label_array = labels.array
    if labels.is_rgb:
        raise CoreError("an RGB image cannot be used as a label map; upload a segmentation")
    if label_array.ndim == 4:
        label_array = label_array[..., 0]
    to_label = np.linalg.solve(labels.affine, volume.affine)  # base voxel -> label voxel
    base = to_label[:3, 3] + to_label[:3, geometry.slice_axis] * index
    along_col = to_label[:3, geometry.col_axis][:, None] * geometry.col_voxel[None, :]  # (3, W)
    along_row = to_label[:3, geometry.row_axis][:, None] * geometry.row_voxel[None, :]  # (3, H)
    height, width = geometry.shape
    inside = np.ones((height, width), dtype=bool)
    coords = []
    for axis in range(3):
        # Nearest voxel: integer coordinates are voxel centres, so round half up.
        coord = np.floor(base[axis] + along_row[axis][:, None] + along_col[axis][None, :] + 0.5).astype(np.intp)
        inside &= (coord >= 0) & (coord < label_array.shape[axis])
        coords.append(coord)
    coords = [np.where(inside, c, 0) for c in coords]  # keep the gather in bounds
    out = label_array[coords[0], coords[1], coords[2]]
    if out.dtype.kind == "f":
        out = np.rint(out)
    out = out.astype(np.int64)
    out[~inside] = 0
    return out


def _blend_labels(image: np.ndarray, labels: np.ndarray, overlay: LabelOverlay) -> np.ndarray:
    present = np.unique(labels)
    present = present[present != 0]
    if present.size == 0:
        return image
    colors = label_colors(present.tolist())
    if overlay.colors:
        colors.update({int(k): (int(v[0]), int(v[1]), int(v[2])) for k, v in overlay.colors.items()})
    # One lookup instead of a pass per label: position of each pixel's label among those present.
    table = np.array([colors[int(v)] for v in present], dtype=np.float32)
    mask = labels != 0
    painted = table[np.searchsorted(present, labels[mask])]
    alpha = float(np.clip(overlay.opacity, 0.0, 1.0))
    out = image.copy()
    blended = out[mask].astype(np.float32) * (1.0 - alpha) + painted * alpha
    out[mask] = np.floor(blended + 0.5).astype(np.uint8)
    return out


def screen_to_voxel(geometry: ViewGeometry, index: int, col: float, row: float) -> tuple[int, int, int]:
    """The voxel ``(i, j, k)`` shown at output pixel ``(col, row)`` of a view at slice ``index``.

    ``col``/``row`` may be fractional (a mouse position in output pixels);
    they are clamped to the image.
    """
    width_px, height_px = geometry.shape[1], geometry.shape[0]
    c = int(np.clip(math.floor(col), 0, width_px - 1))
    r = int(np.clip(math.floor(row), 0, height_px - 1))
    ijk = [0, 0, 0]
    ijk[geometry.slice_axis] = int(index)
    ijk[geometry.col_axis] = int(geometry.col_voxel[c])
    ijk[geometry.row_axis] = int(geometry.row_voxel[r])
    return ijk[0], ijk[1], ijk[2]


def voxel_to_screen(geometry: ViewGeometry, ijk: Sequence[int]) -> tuple[float, float]:
    """Output-pixel coordinates ``(col, row)`` of the centre of voxel ``ijk``'s footprint in a view."""
    n_rows, n_cols = geometry.native_shape
    height, width = geometry.shape
    col_native = ijk[geometry.col_axis]
    row_native = ijk[geometry.row_axis]
    if geometry.col_descending:
        col_native = n_cols - 1 - col_native
    if geometry.row_descending:
        row_native = n_rows - 1 - row_native
    return (col_native + 0.5) * width / n_cols, (row_native + 0.5) * height / n_rows


@dataclass(frozen=True)
class Readout:
    """What is under the cursor.

    Attributes
    ----------
    ijk : (int, int, int)
        Voxel index in the volume's (RAS-reoriented) array.
    ras_mm : (float, float, float)
        Voxel centre in RAS+ millimetres: ``affine @ (i, j, k, 1)``.
    value : float or tuple of float
        Voxel value in physical units (three components for RGB).
    unit : str
        ``"HU"`` for CT, ``""`` when arbitrary.
    """

    ijk: tuple[int, int, int]
    ras_mm: tuple[float, float, float]
    value: float | tuple[float, ...]
    unit: str = ""

    def text(self) -> str:
        """One line for the UI, e.g. ``-56 HU · RAS (12.3, -45.6, 78.9) mm · voxel (256, 240, 150)``."""
        if isinstance(self.value, tuple):
            value = "RGB (" + ", ".join(f"{v:g}" for v in self.value) + ")"
        else:
            value = f"{self.value:.6g}" + (f" {self.unit}" if self.unit else "")
        ras = ", ".join(f"{v:.1f}" for v in self.ras_mm)
        ijk = ", ".join(str(v) for v in self.ijk)
        return f"{value} · RAS ({ras}) mm · voxel ({ijk})"


def readout(volume: Volume, ijk: Sequence[int], *, frame: int = 0) -> Readout:
    """Value, RAS position and voxel index at voxel ``ijk`` (through the full affine, oblique included).

    Raises
    ------
    CoreError
        ``ijk`` lies outside the volume.
    """
    shape = volume.spatial_shape
    ijk_t = tuple(int(v) for v in ijk)
    if len(ijk_t) != 3 or not all(0 <= v < n for v, n in zip(ijk_t, shape)):
        raise CoreError(f"voxel {ijk_t} is outside the volume of shape {shape}")
    array3 = _frame_array(volume, frame)
    ras = volume.affine @ np.array([*ijk_t, 1.0])
    raw = array3[ijk_t]
    value: float | tuple[float, ...]
    value = tuple(float(v) for v in raw) if volume.is_rgb else float(raw)
    return Readout(ijk=ijk_t, ras_mm=(float(ras[0]), float(ras[1]), float(ras[2])), value=value, unit=volume.unit)


def histogram(volume: Volume, *, bins: int = 256, max_samples: int = 4_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of the volume's values (all frames; subsampled regularly when large).

    Returns
    -------
    counts : (bins,) int64 ndarray
    edges : (bins + 1,) float64 ndarray
        In physical units. Integer data of a small range gets one bin per
        value when that needs no more than ``bins`` bins.
    """
    array = volume.array
    n = int(array.size)
    if n > max_samples:
        step = int(math.ceil((n / max_samples) ** (1.0 / array.ndim)))
        array = array[(slice(None, None, step),) * array.ndim]
    values = np.asarray(array).reshape(-1)
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    if values.size == 0:
        return np.zeros(bins, dtype=np.int64), np.linspace(0.0, 1.0, bins + 1)
    lo, hi = float(values.min()), float(values.max())
    if values.dtype.kind in "iub" and hi - lo + 1 <= bins:
        edges = np.arange(lo - 0.5, hi + 1.0, 1.0)
    else:
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    counts, edges = np.histogram(values, bins=edges)
    return counts.astype(np.int64), edges.astype(np.float64)


def encode_png(image: np.ndarray, *, compress_level: int = 1) -> bytes:
    """PNG bytes of a (H, W), (H, W, 1) or (H, W, 3) uint8 image, with no metadata chunks.

    Only IHDR, IDAT and IEND are written: no text, time or profile, so nothing
    about the patient or the machine can travel with the file.

    Speed: rows use PNG's "Sub" filter (difference to the left neighbour,
    computed with numpy) and are deflated with python-isal when it is
    installed: ~0.4 ms for a 512x512 CT slice against ~3.7 ms for Pillow at
    level 1, at the same size. ``compress_level`` is zlib's (0-9); isal has
    levels 0-3, so higher levels use isal's 3.
    """
    if image.dtype != np.uint8:
        raise CoreError(f"only uint8 images can be encoded, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        color_type, channels = 0, 1
    elif image.ndim == 3 and image.shape[2] == 3:
        color_type, channels = 2, 3
    else:
        raise CoreError(f"cannot encode an image of shape {image.shape}; expected (H, W), (H, W, 1) or (H, W, 3)")
    height, width = image.shape[:2]
    flat = np.ascontiguousarray(image).reshape(height, width * channels)
    rows = np.empty((height, width * channels + 1), dtype=np.uint8)
    rows[:, 0] = 1  # filter type Sub
    rows[:, 1 : 1 + channels] = flat[:, :channels]
    # uint8 arithmetic wraps modulo 256, which is exactly PNG's Sub filter.
    np.subtract(flat[:, channels:], flat[:, :-channels], out=rows[:, 1 + channels :])
    data = _deflate(rows.tobytes(), compress_level)
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _deflate(data: bytes, level: int) -> bytes:
    """zlib-format deflate: python-isal (4-5x faster) when installed, else zlib."""
    if _isal_zlib is not None:
        return bytes(_isal_zlib.compress(data, min(max(level, 0), 3)))
    return zlib.compress(data, level)


def deflate(data: bytes, level: int = 1) -> bytes:
    """zlib-format (RFC 1950) compression of ``data``, fast (see :func:`encode_png`)."""
    return _deflate(data, level)


def encode_jpeg(image: np.ndarray, *, quality: int = 90) -> bytes:
    """JPEG bytes (baseline, JFIF, no EXIF) of a (H, W[, 1 or 3]) uint8 image."""
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _pil(image: np.ndarray) -> Image.Image:
    if image.dtype != np.uint8:
        raise CoreError(f"only uint8 images can be encoded, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(image), mode="L")
    if image.ndim == 3 and image.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    raise CoreError(f"cannot encode an image of shape {image.shape}; expected (H, W), (H, W, 1) or (H, W, 3)")


def _fmt(value: float) -> str:
    text = f"{value:.6g}"
    return text.replace("-", "m").replace(".", "p")


def view_file_name(
    plane: str,
    index: int,
    window: Window,
    *,
    frame: int | None = None,
    slab: Slab | None = None,
    suffix: str = "",
    ext: str = "png",
) -> str:
    """A file name for an exported view: plane, slice, window (and frame/slab); never patient data.

    Example: ``axial_s0150_W400_L40.png``; a negative level is written
    ``Lm600``. ``suffix`` (e.g. a short hash of the view settings) keeps names
    unique across downloads.
    """
    parts = [_check_plane(plane), f"s{int(index):04d}", f"W{_fmt(window.width)}", f"L{_fmt(window.center)}"]
    if frame is not None:
        parts.append(f"t{int(frame):03d}")
    if slab is not None:
        parts.append(f"{slab.mode}{_fmt(slab.thickness_mm)}mm")
    if suffix:
        parts.append("".join(ch for ch in suffix if ch.isalnum()))
    return "_".join(parts) + f".{ext}"


def plane_zip(
    volume: Volume,
    plane: str,
    window: Window,
    *,
    progress: Callable[[float], None] | None = None,
    **view_options: object,
) -> bytes:
    """All slices of a plane as PNGs in one zip (stored: PNG is already compressed).

    ``view_options`` are those of :func:`render_view` (frame, radiological,
    invert, colormap, slab, overlays). Member names come from
    :func:`view_file_name`.
    """
    count = n_slices(volume, plane)
    frame = view_options.get("frame")
    slab = view_options.get("slab")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for index in range(count):
            image = render_view(volume, plane, index, window, **view_options)  # type: ignore[arg-type]
            name = view_file_name(
                plane,
                index,
                window,
                frame=frame if volume.n_frames > 1 else None,  # type: ignore[arg-type]
                slab=slab,  # type: ignore[arg-type]
            )
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # no time stamp of the export
            archive.writestr(info, encode_png(image, compress_level=6), compress_type=zipfile.ZIP_STORED)
            if progress is not None:
                progress((index + 1) / count)
    return buffer.getvalue()
