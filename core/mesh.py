"""Surfaces from masks in scanner millimetres: extraction, smoothing, decimation, figures, preview.

A :class:`Mesh` holds vertices in RAS+ millimetres (the project's world frame) and
triangles wound counter-clockwise seen from outside, so the signed volume is
positive. Export converts to LPS (what 3D Slicer assumes for model files) or
keeps RAS; see :mod:`core.mesh_export`.

Extraction uses VTK's flying edges (Schroeder et al. 2015), the fastest marching-
cubes variant we measured (REFERENCE.md section 7), on the mask's bounding box.
When the mask comes from a threshold, vertices are interpolated in the voxel
values (sub-voxel accurate); for label maps they sit half-way between voxels.
Thresholds on integer data are moved to half-integers (300 HU -> 299.5), which
selects the same voxels and avoids zero-area triangles.

References
----------
W. Schroeder, R. Maynard, B. Geveci, "Flying edges: A high-performance scalable
isocontouring algorithm", IEEE LDAV 2015.
G. Taubin, T. Zhang, G. Golub, "Optimal surface smoothing as filter design", ECCV 1996
(the windowed-sinc smoother, vtkWindowedSincPolyDataFilter).
M. Garland, P. Heckbert, "Surface simplification using quadric error metrics",
SIGGRAPH 1997 (fast_simplification).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import EmptySurfaceError, LimitError, UnsupportedFileError
from core.mask import (
    BONE_COLOR,
    Mask,
    MaskCleanup,
    available_memory_bytes,
    check_mask_memory,
    clean_mask,
    integer_bounds,
    label_color,
    label_masks,
    label_name,
    threshold_mask,
)
from core.sources import DEFAULT_LIMITS, Limits, Source
from core.volume import Volume

if TYPE_CHECKING:
    import plotly.graph_objects as go

# fast_simplification keeps the mesh being simplified in module-global C++ state: two
# sessions decimating at once would overwrite each other's mesh. One at a time.
_SIMPLIFY_LOCK = threading.Lock()
_SMP_READY: list[bool] = []

SPACES = ("LPS", "RAS")


@dataclass(frozen=True)
class MeshLimits:
    """Caps on meshes, checked before the steps they protect.

    Parameters
    ----------
    max_triangles : int
        Largest surface kept after extraction. Smoothing, decimation and export need
        roughly 200-300 bytes per triangle; 20 M triangles is ~5 GB of work memory.
    preview_triangles : int
        Triangles sent to the browser, all meshes together (~24 bytes each once
        base64-encoded: 200 k is ~5 MB of figure JSON).
    """

    max_triangles: int = 20_000_000
    preview_triangles: int = 200_000


DEFAULT_MESH_LIMITS = MeshLimits()


@dataclass(frozen=True, eq=False)
class Mesh:
    """A triangle surface in RAS+ millimetres.

    Parameters
    ----------
    vertices : (V, 3) float64 ndarray
        RAS+ mm. Read-only.
    faces : (F, 3) int32 ndarray
        Vertex indices, counter-clockwise seen from outside (outward normals). Read-only.
    name : str
        Shown in the preview and used in export file names (no patient data).
    color : (3,) tuple of int
        RGB 0-255 for the preview.
    """

    vertices: np.ndarray
    faces: np.ndarray
    name: str = "surface"
    color: tuple[int, int, int] = BONE_COLOR

    def __post_init__(self) -> None:
        vertices = np.asarray(self.vertices, dtype=np.float64)
        faces = np.asarray(self.faces)
        if vertices.ndim != 2 or vertices.shape[1] != 3:
            raise ValueError(f"vertices must have shape (V, 3), got {vertices.shape}")
        if faces.ndim != 2 or faces.shape[1] != 3:
            raise ValueError(f"faces must have shape (F, 3), got {faces.shape}")
        if faces.dtype != np.int32:
            if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
                raise ValueError("faces refer to vertices that do not exist")
            faces = faces.astype(np.int32)
        for array in (vertices, faces):
            array.flags.writeable = False
        object.__setattr__(self, "vertices", vertices)
        object.__setattr__(self, "faces", faces)

    @property
    def n_triangles(self) -> int:
        return int(self.faces.shape[0])

    @property
    def n_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.vertices.nbytes + self.faces.nbytes)

    def with_geometry(self, vertices: np.ndarray, faces: np.ndarray) -> Mesh:
        """The same name and colour on new geometry."""
        return Mesh(vertices, faces, self.name, self.color)


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------


def volume_frame(volume: Volume, frame: int = 0) -> np.ndarray:
    """The ``(I, J, K)`` values of one time point of a scalar volume.

    Raises
    ------
    UnsupportedFileError
        RGB volumes (colour photos, screenshots) have no physical values to threshold.
    UnsupportedFileError
        ``frame`` outside ``0 .. n_frames - 1``.
    """
    if volume.is_rgb:
        raise UnsupportedFileError(
            f"{volume.description or 'this volume'} is an RGB colour image; meshing needs a scalar volume "
            "(CT, MR or a label map)"
        )
    if not 0 <= frame < volume.n_frames:
        raise UnsupportedFileError(
            f"time point {frame} does not exist: this volume has {volume.n_frames} (0..{volume.n_frames - 1})"
        )
    return volume.array if volume.array.ndim == 3 else volume.array[..., frame]


def downsample(volume_array: np.ndarray, affine: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ``factor``-th voxel along each axis, with the matching affine (no copy).

    Parameters
    ----------
    volume_array : (I, J, K) ndarray
    affine : (4, 4) ndarray
    factor : int
        1 returns the inputs unchanged.

    Returns
    -------
    array : (ceil(I/f), ceil(J/f), ceil(K/f)) ndarray
        A strided view; the voxel centres kept are exact positions of the original grid.
    affine : (4, 4) ndarray
    """
    if factor < 1:
        raise ValueError(f"downsampling factor must be >= 1, got {factor}")
    if factor == 1:
        return volume_array, np.asarray(affine, dtype=np.float64)
    scaled = np.asarray(affine, dtype=np.float64) @ np.diag([factor, factor, factor, 1.0])
    return volume_array[::factor, ::factor, ::factor], scaled


def mask_to_surface(
    mask: Mask,
    *,
    intensities: np.ndarray | None = None,
    cap_borders: bool = True,
    name: str = "surface",
    color: tuple[int, int, int] = BONE_COLOR,
    limits: MeshLimits = DEFAULT_MESH_LIMITS,
) -> Mesh:
    """The surface of a mask, in RAS+ mm through the mask's full affine.

    Parameters
    ----------
    mask : Mask
        From :func:`core.mask.threshold_mask` (then maybe cleaned) or a label map.
    intensities : (I, J, K) ndarray or None
        The values the mask was thresholded from. When given (and ``mask.threshold``
        is set), vertices are interpolated at the threshold, so the surface is sub-voxel
        accurate; voxels added or removed by clean-up are treated as just inside or
        just outside. When None, the surface of the binary mask (vertices half-way
        between voxel centres).
    cap_borders : bool
        Close the surface where the mask touches a face of the volume (a cap half a
        voxel beyond the last voxel centres), so cut-off bones are printable solids.
        False leaves those openings.
    name, color
        Carried by the mesh.
    limits : MeshLimits

    Returns
    -------
    Mesh
        Outward-wound triangles (flipped when the affine mirrors space).

    Raises
    ------
    EmptySurfaceError
        The mask selects nothing.
    LimitError
        Not enough free memory for the box, or more triangles than ``limits.max_triangles``.
    """
    if mask.is_empty:
        what = f"threshold {_describe_threshold(mask.threshold)}" if mask.threshold else "the mask"
        raise EmptySurfaceError(
            f"{what} selects no voxels (after clean-up), so there is no surface. "
            "Lower the threshold, relax the clean-up or pick another label."
        )
    use_values = intensities is not None and mask.threshold is not None
    field, level, origin = _surface_field(mask, intensities if use_values else None, cap_borders)
    # VTK sees the C-ordered box as (x, y, z) = (k, j, i): reverse the columns, then the affine.
    linear = mask.affine[:3, :3] @ np.eye(3)[::-1]
    offset = mask.affine[:3, :3] @ np.asarray(origin, dtype=np.float64) + mask.affine[:3, 3]
    # Flying edges winds triangles outward (positive volume) in its own (x, y, z) frame
    # when inside values are the high ones; a mirroring map to world flips that.
    flip = bool(np.linalg.det(linear) < 0)
    vertices, faces = _flying_edges(field, level, linear, offset, flip, limits.max_triangles)
    del field
    if faces.shape[0] == 0:
        raise EmptySurfaceError(
            f"the mask ({mask.voxel_count} voxels) produced no triangles; it is too thin for a surface at this level"
        )
    return Mesh(vertices, faces, name, color)


def _describe_threshold(threshold: tuple[float, float | None] | None) -> str:
    if threshold is None:
        return ""
    lower, upper = threshold
    return f">= {lower:g}" if upper is None else f"{lower:g}..{upper:g}"


def _surface_field(
    mask: Mask, intensities: np.ndarray | None, cap_borders: bool
) -> tuple[np.ndarray, float, tuple[int, int, int]]:
    """The contiguous scalar box flying edges runs on.

    Returns
    -------
    field : (a, b, c) ndarray
        Values above ``level`` inside the mask and below it outside, at every voxel.
    level : float
    origin : (3,) tuple of int
        Grid index of ``field[0, 0, 0]`` (-1 on a capped face).
    """
    region, pad_before, pad_after = [], [], []
    for axis in range(3):
        low = mask.offset[axis] - 1
        high = mask.offset[axis] + mask.array.shape[axis] + 1
        region.append(slice(max(low, 0), min(high, mask.grid_shape[axis])))
        pad_before.append(1 if cap_borders and low < 0 else 0)
        pad_after.append(1 if cap_borders and high > mask.grid_shape[axis] else 0)
    box_shape = tuple(s.stop - s.start + b + a for s, b, a in zip(region, pad_before, pad_after, strict=True))
    origin = tuple(s.start - b for s, b in zip(region, pad_before, strict=True))
    inner = tuple(slice(b, b + s.stop - s.start) for s, b in zip(region, pad_before, strict=True))
    in_box = tuple(slice(o - g, o - g + n) for o, g, n in zip(mask.offset, origin, mask.array.shape, strict=True))
    n_box = int(np.prod(box_shape))

    if intensities is None:
        check_mask_memory(n_box, 1, "the surface of this mask")
        field = np.zeros(box_shape, dtype=np.uint8)
        field[in_box] = mask.array
        return field, 0.5, origin  # type: ignore[return-value]

    assert mask.threshold is not None
    values = np.asarray(intensities)[tuple(region)]
    if values.dtype == bool:
        values = values.view(np.uint8)
    lower, upper = integer_bounds(values.dtype, *mask.threshold)
    is_integer = np.issubdtype(values.dtype, np.integer)
    level_low = lower - 0.5 if is_integer else lower
    level_high = None if upper is None else (upper + 0.5 if is_integer else upper)
    if level_high is not None and values.size and values.max() <= level_high:
        level_high = None  # no voxel is above the upper bound: it changes nothing here
    # Fixed values for voxels whose side is set by the mask, not by their own value; on
    # integer data half a unit from the level, like every other voxel.
    step = 0.5 if is_integer else _float_step(values)

    if level_high is None:
        dtype = values.dtype
        if is_integer and (lower - 1 < np.iinfo(dtype).min or lower > np.iinfo(dtype).max):
            dtype = np.dtype(np.float32)  # the outside value would not fit (e.g. uint8 with lower 0)
        check_mask_memory(n_box, dtype.itemsize + (2 if mask.cleaned else 0), "the surface of this mask")
        field = np.empty(box_shape, dtype=dtype)
        field[inner] = values
        level = level_low
    else:
        dtype = np.dtype(np.float32)
        check_mask_memory(n_box, 4 + 8 + (2 if mask.cleaned else 0), "the surface of this mask")
        field = np.empty(box_shape, dtype=dtype)
        as_float = values.astype(np.float32)
        np.minimum(as_float - np.float32(level_low), np.float32(level_high) - as_float, out=field[inner])
        del as_float
        level = 0.0
    inside_value = level + step
    outside_value = level - step
    if dtype.kind in "iu":
        inside_value, outside_value = math.ceil(inside_value), math.floor(outside_value)

    if not is_integer:
        # NaN/inf voxels (outside a reconstruction's field of view) are outside, never a crossing.
        core = field[inner]
        core[~np.isfinite(core)] = outside_value
    if mask.cleaned:
        core = field[inner]
        selected = np.zeros(core.shape, dtype=bool)
        selected[tuple(slice(s.start - b, s.stop - b) for s, b in zip(in_box, pad_before, strict=True))] = mask.array
        by_value = core > level
        core[selected & ~by_value] = inside_value
        core[~selected & by_value] = outside_value
        del selected, by_value
    _fill_caps(field, inner, pad_before, pad_after, level, outside_value)
    return field, float(level), origin  # type: ignore[return-value]


def _float_step(values: np.ndarray) -> float:
    """Offset from the level for clean-up voxels of float data: 1e-3 of the value range."""
    finite = values[np.isfinite(values)] if values.size else values
    span = float(finite.max() - finite.min()) if finite.size else 1.0
    return max(span * 1e-3, 1e-6)


def _fill_caps(
    field: np.ndarray,
    inner: tuple[slice, ...],
    pad_before: Sequence[int],
    pad_after: Sequence[int],
    level: float,
    outside_value: float,
) -> None:
    """Write the one-voxel pad beyond the grid faces.

    The pad mirrors the border voxel about the level (``2 * level - v``), so a cap crosses
    exactly half-way, half a voxel beyond the last voxel centres (the voxel's face), and
    is never above the level (outside stays outside).
    """
    dtype = field.dtype
    for axis in range(3):
        for side, present in (("before", pad_before[axis]), ("after", pad_after[axis])):
            if not present:
                continue
            border_index = inner[axis].start if side == "before" else inner[axis].stop - 1
            pad_index = border_index - 1 if side == "before" else border_index + 1
            # Only the inner part of the face: pad corners/edges stay at outside_value.
            face_slices = list(inner)
            face_slices[axis] = slice(border_index, border_index + 1)
            border = field[tuple(face_slices)].astype(np.float64)
            mirrored = np.minimum(2 * level - border, outside_value)
            if dtype.kind in "iu":
                info = np.iinfo(dtype)
                mirrored = np.clip(np.floor(mirrored), info.min, info.max)
            target = [slice(None)] * 3
            target[axis] = slice(pad_index, pad_index + 1)
            field[tuple(target)] = outside_value
            face_slices[axis] = slice(pad_index, pad_index + 1)
            field[tuple(face_slices)] = mirrored.astype(dtype)


def _init_smp() -> None:
    """Use VTK's std::thread SMP backend once per process (1.7x on 2 cores, REFERENCE.md 7)."""
    if _SMP_READY:
        return
    from vtkmodules.vtkCommonCore import vtkSMPTools

    if vtkSMPTools.SetBackend("STDThread"):
        vtkSMPTools.Initialize(min(os.cpu_count() or 1, 8))
    _SMP_READY.append(True)


def _flying_edges(
    field: np.ndarray, level: float, linear: np.ndarray, offset: np.ndarray, flip: bool, max_triangles: int
) -> tuple[np.ndarray, np.ndarray]:
    """Run vtkFlyingEdges3D on a C-contiguous box and map its output to world coordinates.

    Parameters
    ----------
    field : (a, b, c) ndarray
    level : float
    linear, offset : (3, 3) and (3,) ndarray
        World = linear @ (x, y, z) + offset for VTK's point coordinates.
    flip : bool
        Reverse the winding of every triangle.
    max_triangles : int
        Raise :class:`LimitError` above this, before copying VTK's output.

    Returns
    -------
    vertices : (V, 3) float64 ndarray
    faces : (F, 3) int32 ndarray
    """
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersCore import vtkFlyingEdges3D

    _init_smp()
    field = np.ascontiguousarray(field)
    image = vtkImageData()
    image.SetDimensions(field.shape[2], field.shape[1], field.shape[0])
    scalars = numpy_to_vtk(field.reshape(-1), deep=False)  # shares memory; `field` stays alive here
    image.GetPointData().SetScalars(scalars)
    contour = vtkFlyingEdges3D()
    contour.SetInputData(image)
    contour.SetValue(0, level)
    contour.ComputeNormalsOff()
    contour.ComputeGradientsOff()
    contour.ComputeScalarsOff()
    contour.InterpolateAttributesOff()
    contour.Update()
    output = contour.GetOutput()
    n_triangles = output.GetNumberOfPolys()
    if output.GetNumberOfPoints() == 0 or n_triangles == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int32)
    if n_triangles > max_triangles:
        raise LimitError(
            f"the surface has {n_triangles:,} triangles, more than the cap of {max_triangles:,}. "
            "Keep the largest component, raise the threshold, crop or downsample the volume."
        )
    # Views on VTK's arrays (valid while `output` lives), converted once each: few large
    # temporaries, since first-touch page faults dominate at these sizes.
    points = vtk_to_numpy(output.GetPoints().GetData())
    vertices = points @ linear.T
    vertices += offset
    connectivity = vtk_to_numpy(output.GetPolys().GetConnectivityArray())
    faces = np.empty((n_triangles, 3), dtype=np.int32)
    order = (0, 2, 1) if flip else (0, 1, 2)
    for column, corner in enumerate(order):
        faces[:, column] = connectivity[corner::3]
    return vertices, faces


def threshold_surface(
    volume: Volume,
    lower: float,
    upper: float | None = None,
    *,
    cleanup: MaskCleanup | None = None,
    cap_borders: bool = True,
    downsample_factor: int = 1,
    frame: int = 0,
    name: str = "surface",
    limits: MeshLimits = DEFAULT_MESH_LIMITS,
) -> tuple[Mesh, Mask]:
    """Threshold, clean up and extract in one call (what the CLI does).

    Parameters
    ----------
    volume : Volume
    lower, upper : float
        Inclusive range in the volume's unit (HU for CT); ``upper`` None = no upper bound.
    cleanup : MaskCleanup or None
    cap_borders : bool
        See :func:`mask_to_surface`.
    downsample_factor : int
        Keep every n-th voxel along each axis first (for very large volumes).
    frame : int
        Time point of a 4D volume.
    name : str
    limits : MeshLimits

    Returns
    -------
    mesh : Mesh
    mask : Mask
        The mask the surface was built from (for figures, overlays, warnings).
    """
    values, affine = downsample(volume_frame(volume, frame), volume.affine, downsample_factor)
    mask = threshold_mask(values, affine, lower, upper)
    if cleanup is not None:
        mask = clean_mask(mask, cleanup)
    mesh = mask_to_surface(mask, intensities=values, cap_borders=cap_borders, name=name, limits=limits)
    return mesh, mask


def label_surfaces(
    volume: Volume,
    labels: Sequence[int] | None = None,
    *,
    scheme: str = "numbers",
    cleanup: MaskCleanup | None = None,
    cap_borders: bool = True,
    downsample_factor: int = 1,
    frame: int = 0,
    limits: MeshLimits = DEFAULT_MESH_LIMITS,
) -> list[Mesh]:
    """One mesh per label of a label map (a segmentation loaded as the volume).

    Parameters
    ----------
    volume : Volume
        Integer-valued, 0 = background.
    labels : sequence of int or None
        Labels to mesh, in this order; None = every label present.
    scheme : str
        Naming scheme from :data:`core.mask.LABEL_SCHEMES` for mesh names.
    cleanup, cap_borders, downsample_factor, frame, limits
        As in :func:`threshold_surface`; clean-up applies to each label separately.

    Returns
    -------
    list of Mesh
        Named ``"5 liver"`` (or ``"label 5"``) and coloured per label.

    Raises
    ------
    EmptySurfaceError
        A requested label is absent (the message lists those present), or the map has no labels.
    """
    values, affine = downsample(volume_frame(volume, frame), volume.affine, downsample_factor)
    masks = label_masks(values, affine, labels)
    if not masks:
        raise EmptySurfaceError("this label map holds only background (0); there is nothing to mesh")
    meshes = []
    for value, mask in masks.items():
        if cleanup is not None:
            mask = clean_mask(mask, cleanup)
        meshes.append(
            mask_to_surface(
                mask, cap_borders=cap_borders, name=label_name(value, scheme), color=label_color(value), limits=limits
            )
        )
    return meshes


# --------------------------------------------------------------------------------------
# After extraction
# --------------------------------------------------------------------------------------


def _check_mesh_memory(mesh: Mesh, bytes_per_triangle: float, what: str) -> None:
    need = mesh.n_triangles * bytes_per_triangle
    free = available_memory_bytes()
    if free is not None and need > 0.6 * free:
        raise LimitError(
            f"{what} of {mesh.n_triangles:,} triangles would need about {need / 1024**3:.1f} GB of memory "
            f"and {free / 1024**3:.1f} GB is free. Decimate first, keep the largest component or crop."
        )


def _to_polydata(vertices: np.ndarray, faces: np.ndarray) -> Any:
    from vtkmodules.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray
    from vtkmodules.vtkCommonCore import vtkPoints
    from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData

    points = vtkPoints()
    points.SetData(numpy_to_vtk(np.ascontiguousarray(vertices, dtype=np.float64), deep=True))
    offsets = np.arange(0, 3 * len(faces) + 1, 3, dtype=np.int64)
    cells = vtkCellArray()
    cells.SetData(
        numpy_to_vtkIdTypeArray(offsets, deep=True),
        numpy_to_vtkIdTypeArray(np.ascontiguousarray(faces, dtype=np.int64).reshape(-1), deep=True),
    )
    polydata = vtkPolyData()
    polydata.SetPoints(points)
    polydata.SetPolys(cells)
    return polydata


def smooth_mesh(mesh: Mesh, iterations: int = 15, *, pass_band: float = 0.1) -> Mesh:
    """Volume-preserving smoothing with a windowed-sinc filter (vtkWindowedSincPolyDataFilter).

    Parameters
    ----------
    mesh : Mesh
    iterations : int
        Filter order; 10-20 removes marching-cubes terracing, 0 returns the mesh unchanged.
    pass_band : float
        0 < pass_band < 2; smaller smooths more (3D Slicer uses 10**(-4 * factor)).

    Returns
    -------
    Mesh
        Same triangles, moved vertices: a closed mesh stays closed. Borders (open
        edges) and sharp features are smoothed like the rest (no feature detection).
    """
    if iterations <= 0 or mesh.n_triangles == 0:
        return mesh
    if not 0 < pass_band < 2:
        raise ValueError(f"pass_band must be between 0 and 2, got {pass_band}")
    _check_mesh_memory(mesh, 250, "Smoothing")
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkFiltersCore import vtkWindowedSincPolyDataFilter

    _init_smp()
    smoother = vtkWindowedSincPolyDataFilter()
    smoother.SetInputData(_to_polydata(mesh.vertices, mesh.faces))
    smoother.SetNumberOfIterations(int(iterations))
    smoother.SetPassBand(float(pass_band))
    smoother.BoundarySmoothingOff()
    smoother.FeatureEdgeSmoothingOff()
    smoother.NonManifoldSmoothingOn()
    # Scale to a unit cube inside the filter: the pass band then means the same at any size.
    smoother.NormalizeCoordinatesOn()
    smoother.Update()
    moved = np.array(vtk_to_numpy(smoother.GetOutput().GetPoints().GetData()), dtype=np.float64)
    return mesh.with_geometry(moved, mesh.faces)


def decimate_mesh(mesh: Mesh, *, fraction: float | None = None, target_triangles: int | None = None) -> Mesh:
    """Quadric decimation (fast_simplification) to a fraction or a number of triangles.

    Parameters
    ----------
    mesh : Mesh
    fraction : float
        Fraction of the triangles to keep, 0 < fraction <= 1.
    target_triangles : int
        Triangles to keep (alternative to ``fraction``).

    Returns
    -------
    Mesh
        Repaired with :func:`repair_mesh` (collapses in thin parts can leave duplicate
        triangles or two sheets sharing an edge). A closed mesh stayed closed in our tests;
        :func:`mesh_figures` says whether it is (``watertight``, ``manifold``).
    """
    if (fraction is None) == (target_triangles is None):
        raise ValueError("give exactly one of fraction or target_triangles")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction of triangles to keep must be in (0, 1], got {fraction}")
        target = int(round(mesh.n_triangles * fraction))
    else:
        target = int(target_triangles)  # type: ignore[arg-type]
        if target < 1:
            raise ValueError(f"target triangle count must be >= 1, got {target}")
    if target >= mesh.n_triangles or mesh.n_triangles < 8:
        return mesh
    _check_mesh_memory(mesh, 300, "Decimation")
    import fast_simplification

    # Openings the surface had before (e.g. at the volume border without caps) stay put
    # (preserve_border) and are never mistaken for holes the collapses made.
    border = _boundary_vertices(mesh.faces)
    with _SIMPLIFY_LOCK:
        # Writable copies: the binding refuses read-only arrays.
        points, faces = fast_simplification.simplify(
            np.array(mesh.vertices, order="C"),
            np.array(mesh.faces, order="C"),
            target_count=max(target, 4),
            preserve_border=bool(len(border)),
        )
    points, faces = repair_mesh(
        np.asarray(points), np.asarray(faces), max_hole_edges=64, keep_open=mesh.vertices[border]
    )
    return mesh.with_geometry(points, faces)


def _boundary_vertices(faces: np.ndarray) -> np.ndarray:
    """Indices of vertices on edges used by only one triangle."""
    if len(faces) == 0:
        return np.zeros(0, dtype=np.int64)
    f = faces.astype(np.int64)
    start, end = f.reshape(-1), f[:, [1, 2, 0]].reshape(-1)
    n = int(f.max()) + 1
    key = np.minimum(start, end) * n + np.maximum(start, end)
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    single = counts[inverse.reshape(-1)] == 1
    return np.unique(np.concatenate([start[single], end[single]]))


def repair_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    *,
    max_hole_edges: int = 0,
    keep_open: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Undo the defects quadric collapses leave in thin parts.

    1. Triangles with a repeated vertex and triangles present more than once (the
       back-to-back "fins" a collapse leaves) are removed: they enclose no volume.
    2. Where two sheets of the surface end up sharing an edge or a vertex (e.g. four
       triangles on one edge), the shared vertices are split so each sheet gets its own
       copy: every edge is then used by at most two consistently oriented triangles. The
       sheets still touch geometrically, as they did.
    3. Holes of at most ``max_hole_edges`` edges (what steps 1-2 leave, typically 3-10
       edges) are closed with a fan around their centroid, unless a vertex of the hole
       is in ``keep_open``.
    4. Unused vertices are dropped.

    Parameters
    ----------
    vertices : (V, 3) ndarray
    faces : (F, 3) integer ndarray
    max_hole_edges : int
        0 leaves holes open.
    keep_open : (N, 3) ndarray or None
        Positions of vertices on openings that belong to the surface (e.g. where it meets
        the volume border); holes through them are not closed.

    Returns
    -------
    vertices : (V', 3) float64 ndarray
    faces : (F', 3) int32 ndarray
    """
    faces = np.asarray(faces, dtype=np.int64)
    vertices = np.asarray(vertices, dtype=np.float64)
    ok = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    faces = faces[ok]
    if len(faces):
        triple = np.sort(faces, axis=1)
        _, inverse, counts = np.unique(triple, axis=0, return_inverse=True, return_counts=True)
        faces = faces[counts[inverse.reshape(-1)] == 1]
    _, boundary, nonmanifold, oriented = edge_counts(faces, len(vertices))
    if nonmanifold or not oriented:
        vertices, faces = _split_nonmanifold(vertices, faces)
        _, boundary, _, _ = edge_counts(faces, len(vertices))
    if boundary and max_hole_edges > 0:
        vertices, faces = _fill_small_holes(vertices, faces, max_hole_edges, keep_open)
    return _drop_unused_vertices(vertices, faces.astype(np.int32))


def _boundary_loops(faces: np.ndarray) -> list[list[int]]:
    """Closed chains of boundary edges (used by one triangle), in the triangles' direction."""
    start = faces.reshape(-1)
    end = faces[:, [1, 2, 0]].reshape(-1)
    n = int(faces.max()) + 1
    key = np.minimum(start, end) * n + np.maximum(start, end)
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    single = counts[inverse.reshape(-1)] == 1
    following: dict[int, list[int]] = {}
    for a, b in zip(start[single].tolist(), end[single].tolist(), strict=True):
        following.setdefault(a, []).append(b)
    loops = []
    for first in list(following):
        while following.get(first):
            loop, current = [first], following[first].pop()
            while current != first and following.get(current):
                loop.append(current)
                current = following[current].pop()
            if current == first:
                loops.append(loop)
    return loops


def _fill_small_holes(
    vertices: np.ndarray, faces: np.ndarray, max_edges: int, keep_open: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    protected: set[tuple[float, float, float]] = set()
    if keep_open is not None and len(keep_open):
        protected = {tuple(p) for p in np.asarray(keep_open, dtype=np.float64).tolist()}
    new_vertices, new_faces = [], []
    next_index = len(vertices)
    for loop in _boundary_loops(faces):
        if len(loop) > max_edges or any(tuple(vertices[v].tolist()) in protected for v in loop):
            continue
        # The hole's triangles run against the boundary edges (b -> a for an edge a -> b),
        # so their normals agree with the surrounding surface.
        centre = next_index
        next_index += 1
        new_vertices.append(vertices[loop].mean(axis=0))
        ring = np.asarray(loop + loop[:1])
        new_faces.append(np.column_stack([np.full(len(loop), centre), ring[1:], ring[:-1]]))
    if not new_faces:
        return vertices, faces
    return np.vstack([vertices, np.asarray(new_vertices)]), np.vstack([faces, *new_faces])


def _split_nonmanifold(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give each fan of triangles around a vertex its own vertex copy.

    Corners (triangle, vertex) are joined when their triangles share an edge through that
    vertex that is used by exactly two triangles in opposite directions; each connected
    group of corners becomes one vertex. Manifold regions keep one vertex per position.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_faces = len(faces)
    n_vertices = len(vertices)
    start = faces.reshape(-1)  # directed edge e = 3 f + c runs from corner c to corner c + 1
    end = faces[:, [1, 2, 0]].reshape(-1)
    low, high = np.minimum(start, end), np.maximum(start, end)
    key = low * n_vertices + high
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    # Runs of equal undirected keys of length exactly two, traversed in opposite directions.
    is_start = np.concatenate(([True], sorted_key[1:] != sorted_key[:-1]))
    run_id = np.cumsum(is_start) - 1
    run_length = np.bincount(run_id)
    first = order[is_start]
    pair = run_length == 2
    e1 = first[pair]
    e2 = order[np.flatnonzero(is_start)[pair] + 1]
    opposite = start[e1] == end[e2]
    e1, e2 = e1[opposite], e2[opposite]
    # Edge e of face f = e // 3 goes from corner e % 3 to corner (e + 1) % 3. The twin runs
    # the other way, so corner "from" of e1 matches corner "to" of e2 and vice versa.
    f1, c1 = e1 // 3, e1 % 3
    f2, c2 = e2 // 3, e2 % 3
    corner_a = (3 * f1 + c1, 3 * f2 + (c2 + 1) % 3)
    corner_b = (3 * f1 + (c1 + 1) % 3, 3 * f2 + c2)
    rows = np.concatenate([corner_a[0], corner_b[0]])
    cols = np.concatenate([corner_a[1], corner_b[1]])
    n_corners = 3 * n_faces
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n_corners, n_corners))
    _, group = connected_components(graph, directed=False)
    # One new vertex per corner group, placed at the group's original vertex.
    original = faces.reshape(-1)
    new_vertex_of_group = np.full(group.max() + 1, -1, dtype=np.int64)
    new_vertex_of_group[group] = original
    new_vertices = vertices[new_vertex_of_group]
    return new_vertices, group.reshape(n_faces, 3)


def _drop_unused_vertices(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    used = np.zeros(len(vertices), dtype=bool)
    used[faces.reshape(-1)] = True
    if used.all():
        return vertices, faces
    remap = np.cumsum(used) - 1
    return vertices[used], remap[faces].astype(np.int32)


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeshFigures:
    """What a user checks before printing.

    Parameters
    ----------
    triangles, vertices : int
    volume_ml : float
        Enclosed volume (divergence theorem on the signed tetrahedra); meaningful when
        ``watertight``. Positive for outward-wound faces.
    area_cm2 : float
        Surface area.
    bounds_mm : ((x, y, z), (x, y, z))
        Minimum and maximum corner in RAS+ mm.
    components : int
        Connected pieces (sharing vertices).
    watertight : bool
        Closed: every edge is shared by exactly two triangles.
    manifold : bool
        No edge is shared by more than two triangles, and the two triangles at each
        shared edge traverse it in opposite directions (consistent orientation).
    boundary_edges, nonmanifold_edges : int
        Edges used once / more than twice.
    """

    triangles: int
    vertices: int
    volume_ml: float
    area_cm2: float
    bounds_mm: tuple[tuple[float, float, float], tuple[float, float, float]]
    components: int
    watertight: bool
    manifold: bool
    boundary_edges: int
    nonmanifold_edges: int

    def bounds_in(self, space: str = "LPS") -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Bounds in LPS (x, y negated) or RAS mm."""
        low, high = self.bounds_mm
        if space.upper() == "RAS":
            return low, high
        if space.upper() != "LPS":
            raise ValueError(f"space must be LPS or RAS, got {space!r}")
        return (-high[0], -high[1], low[2]), (-low[0], -low[1], high[2])

    def to_json(self, space: str = "LPS") -> dict[str, Any]:
        """The CLI's public fields (``python -m core mesh``); extend, never rename."""
        low, high = self.bounds_in(space)
        return {
            "triangles": self.triangles,
            "vertices": self.vertices,
            "volume_ml": round(self.volume_ml, 4),
            "area_cm2": round(self.area_cm2, 4),
            "bounds_mm": [[round(v, 4) for v in low], [round(v, 4) for v in high]],
            "space": space.upper(),
            "components": self.components,
            "watertight": self.watertight,
            "manifold": self.manifold,
            "boundary_edges": self.boundary_edges,
            "nonmanifold_edges": self.nonmanifold_edges,
        }


def signed_volume_mm3(vertices: np.ndarray, faces: np.ndarray, *, chunk: int = 2_000_000) -> float:
    """Sum of signed tetrahedra (origin, a, b, c) / 6: the enclosed volume of a closed mesh."""
    # Centring first keeps float64 cancellation small for meshes far from the origin.
    centre = vertices.mean(axis=0) if len(vertices) else np.zeros(3)
    total = 0.0
    for start in range(0, len(faces), chunk):
        f = faces[start : start + chunk]
        a, b, c = (vertices[f[:, n]] - centre for n in range(3))
        total += float(np.einsum("ij,ij->", a, np.cross(b, c)))
    return total / 6.0


def surface_area_mm2(vertices: np.ndarray, faces: np.ndarray, *, chunk: int = 2_000_000) -> float:
    total = 0.0
    for start in range(0, len(faces), chunk):
        f = faces[start : start + chunk]
        a = vertices[f[:, 0]]
        cross = np.cross(vertices[f[:, 1]] - a, vertices[f[:, 2]] - a)
        total += float(np.sqrt(np.einsum("ij,ij->i", cross, cross)).sum())
    return total / 2.0


def edge_counts(faces: np.ndarray, n_vertices: int) -> tuple[int, int, int, bool]:
    """Edge statistics from one sort of the directed edges.

    Returns
    -------
    shared_twice, boundary, nonmanifold : int
        Undirected edges used by exactly two, one, more than two triangles.
    oriented : bool
        No directed edge appears twice (two triangles sharing an edge traverse it in
        opposite directions).
    """
    if len(faces) == 0:
        return 0, 0, 0, True
    f = faces.astype(np.int64)
    start = f.reshape(-1)
    end = f[:, [1, 2, 0]].reshape(-1)
    low, high = np.minimum(start, end), np.maximum(start, end)
    # key = undirected edge * 2 + direction bit: sorted, equal undirected edges are adjacent
    # and a repeated full key is a directed edge used twice.
    keys = np.sort((low * n_vertices + high) * 2 + (start > end))
    oriented = not bool(np.any(keys[1:] == keys[:-1]))
    undirected = keys >> 1
    boundaries = np.flatnonzero(np.diff(undirected)) + 1
    counts = np.diff(np.concatenate(([0], boundaries, [len(undirected)])))
    return int(np.sum(counts == 2)), int(np.sum(counts == 1)), int(np.sum(counts > 2)), oriented


def count_components(faces: np.ndarray, n_vertices: int) -> int:
    """Connected pieces of the mesh (triangles sharing a vertex), unused vertices ignored."""
    if len(faces) == 0:
        return 0
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    f = faces.astype(np.int64)
    rows = np.concatenate([f[:, 0], f[:, 1]])
    cols = np.concatenate([f[:, 1], f[:, 2]])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n_vertices, n_vertices))
    count, labels = connected_components(graph, directed=False)
    used = np.zeros(n_vertices, dtype=bool)
    used[f.reshape(-1)] = True
    return int(count - np.count_nonzero(~used))


def mesh_figures(mesh: Mesh) -> MeshFigures:
    """Triangles, vertices, volume, area, bounds, components, watertight, manifold."""
    if mesh.n_triangles == 0:
        raise EmptySurfaceError(f"{mesh.name}: the mesh has no triangles")
    _check_mesh_memory(mesh, 120, "Measuring the mesh")
    vertices, faces = mesh.vertices, mesh.faces
    used = np.zeros(mesh.n_vertices, dtype=bool)
    used[faces.reshape(-1)] = True
    used_vertices = vertices[used]
    twice, boundary, nonmanifold, oriented = edge_counts(faces, mesh.n_vertices)
    return MeshFigures(
        triangles=mesh.n_triangles,
        vertices=mesh.n_vertices,
        volume_ml=signed_volume_mm3(vertices, faces) / 1000.0,
        area_cm2=surface_area_mm2(vertices, faces) / 100.0,
        bounds_mm=(tuple(used_vertices.min(axis=0).tolist()), tuple(used_vertices.max(axis=0).tolist())),  # type: ignore[arg-type]
        components=count_components(faces, mesh.n_vertices),
        watertight=boundary == 0 and nonmanifold == 0,
        manifold=nonmanifold == 0 and oriented,
        boundary_edges=boundary,
        nonmanifold_edges=nonmanifold,
    )


# --------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeshRequest:
    """Everything that decides a mesh, as plain values (picklable for a worker process).

    Parameters
    ----------
    lower, upper : float or None
        Threshold mode: inclusive range in the volume's unit; ``upper`` None = no bound.
    labels : tuple of int or None
        Label-map mode when set: one mesh per label (empty tuple = every label present).
    label_scheme : str
        Names for label meshes, a key of :data:`core.mask.LABEL_SCHEMES`.
    cleanup : MaskCleanup
    cap_borders : bool
    downsample : int
    frame : int
    smooth_iterations : int
        Windowed-sinc iterations; 0 = off.
    pass_band : float
    keep_fraction : float or None
        Decimate to this fraction of the triangles (0 < f <= 1).
    target_triangles : int or None
        Decimate to this many triangles (per mesh); alternative to ``keep_fraction``.
    """

    lower: float | None = None
    upper: float | None = None
    labels: tuple[int, ...] | None = None
    label_scheme: str = "numbers"
    cleanup: MaskCleanup = MaskCleanup()
    cap_borders: bool = True
    downsample: int = 1
    frame: int = 0
    smooth_iterations: int = 0
    pass_band: float = 0.1
    keep_fraction: float | None = None
    target_triangles: int | None = None


@dataclass(frozen=True, eq=False)
class MeshResult:
    """Meshes with their figures, the masks they came from, warnings and time per step (s)."""

    meshes: tuple[Mesh, ...]
    figures: tuple[MeshFigures, ...]
    masks: tuple[Mask, ...]
    warnings: tuple[str, ...]
    timings_s: dict[str, float]


def build_meshes(volume: Volume, request: MeshRequest, *, limits: MeshLimits = DEFAULT_MESH_LIMITS) -> MeshResult:
    """Threshold or label map -> clean-up -> surface -> smoothing -> decimation -> figures.

    Parameters
    ----------
    volume : Volume
    request : MeshRequest
    limits : MeshLimits

    Returns
    -------
    MeshResult

    Raises
    ------
    EmptySurfaceError
        Nothing selected (or a requested label is absent).
    LimitError
        Over a memory or triangle cap.
    UnsupportedFileError
        An RGB volume, or label mode on a volume that is not a label map.
    """
    import time

    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(step: str) -> None:
        now = time.perf_counter()
        timings[step] = round(timings.get(step, 0.0) + now - clock[0], 4)
        clock[0] = now

    values, affine = downsample(volume_frame(volume, request.frame), volume.affine, request.downsample)
    warnings: list[str] = []
    if request.labels is not None:
        try:
            masks = label_masks(values, affine, request.labels or None)
        except ValueError as err:
            raise UnsupportedFileError(
                f"{volume.description or 'this volume'} is not a label map ({err}); use a threshold instead"
            ) from err
        if not masks:
            raise EmptySurfaceError("this label map holds only background (0); there is nothing to mesh")
        named = [(mask, label_name(value, request.label_scheme), label_color(value)) for value, mask in masks.items()]
        intensities = None
    else:
        if request.lower is None:
            raise ValueError("threshold mode needs a lower threshold")
        named = [(threshold_mask(values, affine, request.lower, request.upper), "surface", BONE_COLOR)]
        intensities = values
    lap("mask")
    cleaned = [(clean_mask(mask, request.cleanup), name, color) for mask, name, color in named]
    lap("clean-up")
    meshes = []
    for mask, name, color in cleaned:
        meshes.append(
            mask_to_surface(
                mask, intensities=intensities, cap_borders=request.cap_borders, name=name, color=color, limits=limits
            )
        )
    lap("surface")
    if request.smooth_iterations > 0:
        meshes = [smooth_mesh(m, request.smooth_iterations, pass_band=request.pass_band) for m in meshes]
        lap("smoothing")
    if request.keep_fraction is not None or request.target_triangles is not None:
        meshes = [
            decimate_mesh(m, fraction=request.keep_fraction, target_triangles=request.target_triangles) for m in meshes
        ]
        lap("decimation")
    figures = [mesh_figures(m) for m in meshes]
    lap("figures")

    if request.labels is None:
        from core.mask import face_warning

        warning = face_warning(volume.modality, cleaned[0][0], request.lower)
        if warning:
            warnings.append(warning)
    for mesh, fig in zip(meshes, figures, strict=True):
        if not fig.watertight:
            where = "" if len(meshes) == 1 else f"{mesh.name}: "
            warnings.append(
                f"{where}the mesh is not closed ({fig.boundary_edges} open edges, {fig.nonmanifold_edges} edges "
                "shared by more than two triangles); a 3D printer may reject it. Keep the border caps on."
            )
        if fig.components > 50:
            where = "" if len(meshes) == 1 else f"{mesh.name}: "
            warnings.append(
                f"{where}{fig.components} separate pieces: most are small islands. Keep the largest component or "
                "remove islands smaller than a few mL."
            )
    return MeshResult(
        meshes=tuple(meshes),
        figures=tuple(figures),
        masks=tuple(mask for mask, _, _ in cleaned),
        warnings=tuple(warnings),
        timings_s=timings,
    )


# --------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------


def to_space(vertices: np.ndarray, space: str) -> np.ndarray:
    """RAS+ mm -> LPS (negate x and y: a rotation, so winding stays outward) or RAS."""
    space = space.upper()
    if space == "RAS":
        return vertices
    if space != "LPS":
        raise ValueError(f"space must be LPS or RAS, got {space!r}")
    return vertices * np.array([-1.0, -1.0, 1.0])


def preview_meshes(meshes: Sequence[Mesh], max_triangles: int = DEFAULT_MESH_LIMITS.preview_triangles) -> list[Mesh]:
    """Decimate for display so all meshes together have at most ``max_triangles``.

    Each mesh gets a share proportional to its size (at least 500 triangles).
    """
    total = sum(m.n_triangles for m in meshes)
    if total <= max_triangles:
        return list(meshes)
    out = []
    for mesh in meshes:
        share = max(500, int(max_triangles * mesh.n_triangles / total))
        out.append(decimate_mesh(mesh, target_triangles=share) if mesh.n_triangles > share else mesh)
    return out


def preview_figure(meshes: Sequence[Mesh], *, space: str = "LPS") -> go.Figure:
    """A plotly 3D figure of the meshes (already decimated for display), in LPS or RAS mm.

    The camera looks at the patient's front (anterior), head up. Arrays are float32/int32
    so plotly's base64 encoding keeps the figure small.
    """
    import plotly.graph_objects as go

    space = space.upper()
    figure = go.Figure()
    for mesh in meshes:
        xyz = to_space(mesh.vertices, space).astype(np.float32)
        faces = mesh.faces.astype(np.int32)
        figure.add_trace(
            go.Mesh3d(
                x=xyz[:, 0],
                y=xyz[:, 1],
                z=xyz[:, 2],
                i=faces[:, 0],
                j=faces[:, 1],
                k=faces[:, 2],
                color="rgb({},{},{})".format(*mesh.color),
                name=mesh.name,
                showlegend=len(meshes) > 1,
                hoverinfo="name",
                flatshading=False,
                lighting={"ambient": 0.35, "diffuse": 0.8, "specular": 0.15, "roughness": 0.6},
            )
        )
    x_dir, y_dir = ("left", "posterior") if space == "LPS" else ("right", "anterior")
    anterior_y = -2.0 if space == "LPS" else 2.0
    figure.update_layout(
        scene={
            "aspectmode": "data",
            "xaxis_title": f"x mm (+{x_dir})",
            "yaxis_title": f"y mm (+{y_dir})",
            "zaxis_title": "z mm (+superior)",
            "camera": {"eye": {"x": 0.0, "y": anterior_y, "z": 0.4}, "up": {"x": 0, "y": 0, "z": 1}},
        },
        margin={"l": 0, "r": 0, "t": 0, "b": 0},
        height=560,
        legend={"itemsizing": "constant"},
    )
    return figure


# --------------------------------------------------------------------------------------
# Jobs for worker processes (core.worker): plain arguments in, picklable values out
# --------------------------------------------------------------------------------------


def build_meshes_and_preview(
    volume: Volume,
    request: MeshRequest,
    *,
    mesh_limits: MeshLimits = DEFAULT_MESH_LIMITS,
) -> tuple[MeshResult, list[Mesh]]:
    """:func:`build_meshes` and the meshes decimated for display, as the app runs them in a worker process.

    Both steps are seconds of CPU on a large CT, which in the server process would stall
    every user's session (REFERENCE.md section 5).

    Parameters
    ----------
    volume : Volume
    request : MeshRequest
    mesh_limits : MeshLimits
        ``mesh_limits.preview_triangles`` caps the preview meshes. (Not ``limits``:
        :func:`core.worker.run_in_worker` takes that keyword for the worker's own limits.)

    Returns
    -------
    result : MeshResult
        Without its masks (``masks == ()``): they are as large as the volume and only the
        meshes and figures travel back.
    preview : list of Mesh
        :func:`preview_meshes` of the result.

    Raises
    ------
    CoreError
        As :func:`build_meshes`.
    """
    import dataclasses

    result = build_meshes(volume, request, limits=mesh_limits)
    preview = preview_meshes(result.meshes, mesh_limits.preview_triangles)
    return dataclasses.replace(result, masks=()), preview


def read_label_map(source: Source, limits: Limits = DEFAULT_LIMITS) -> tuple[Volume, list[int]]:
    """Read an uploaded segmentation (NIfTI, NRRD, ... label map): its first series, checked to hold labels.

    Meant to run in a worker process (:func:`core.worker.run_in_worker`): it parses and
    decodes an untrusted upload.

    Parameters
    ----------
    source : Source
        The uploaded file (a zip is expanded; its first series is taken).
    limits : Limits
        Caps for reading it.

    Returns
    -------
    labels : Volume
        The label map, on its own grid (an overlay aligns it through world coordinates).
    present : list of int
        The non-zero label values it holds, sorted (:func:`core.render.label_values`;
        finding them is a sort of every voxel, work for the worker too).

    Raises
    ------
    UnsupportedFileError
        No image in the file, or an RGB image.
    CoreError
        Values that are not whole numbers (:func:`core.render.label_values`), or reading
        and decoding failed (the reader's message).
    """
    from core.io import scan  # late: core.io imports every reader
    from core.render import label_values

    found = scan([source], limits)
    if not found.series:
        reason = "; ".join(p.message for p in found.errors) or f"{source.name}: no image found in the file"
        raise UnsupportedFileError(reason, source=source.name)
    labels = found.series[0].load()
    if labels.is_rgb:
        raise UnsupportedFileError(
            f"{source.name}: an RGB image is not a label map; upload a segmentation", source=source.name
        )
    present = label_values(labels)  # refuses non-integer values with a message
    return labels, list(present)


__all__ = [
    "DEFAULT_MESH_LIMITS",
    "SPACES",
    "Mesh",
    "MeshFigures",
    "MeshLimits",
    "MeshRequest",
    "MeshResult",
    "build_meshes",
    "build_meshes_and_preview",
    "count_components",
    "decimate_mesh",
    "downsample",
    "edge_counts",
    "label_surfaces",
    "mask_to_surface",
    "mesh_figures",
    "preview_figure",
    "preview_meshes",
    "read_label_map",
    "repair_mesh",
    "signed_volume_mm3",
    "smooth_mesh",
    "surface_area_mm2",
    "threshold_surface",
    "to_space",
    "volume_frame",
]
