"""The one image object of TomoForge: a read-only array plus a voxel -> RAS+ mm affine.

Conventions (the same everywhere in the project):

* ``array`` has shape ``(I, J, K)`` for a scalar volume, ``(I, J, K, T)`` for a
  time series and ``(I, J, K, 3)`` for RGB (``is_rgb`` tells the two apart).
  A 2D image is a volume with ``K == 1``.
* ``affine`` is a float64 4x4 matrix mapping ``(i, j, k, 1)`` to ``(x, y, z, 1)``
  in millimetres, RAS+ (x to the patient's Right, y Anterior, z Superior), the
  convention of NIfTI and nibabel. DICOM and ITK work in LPS; readers convert
  exactly once, when they build the volume.
* Readers reorient the array to the closest RAS+ axes with flips and transposes
  only (:func:`reorient_to_ras`), so ``i`` grows towards the patient's left
  side's opposite (Right), ``j`` towards Anterior, ``k`` towards Superior. An
  oblique tilt stays in the affine; nothing is resampled.
* Values are in physical units: Hounsfield units for CT after the rescale,
  ``unit`` says which.

Spacing, origin, direction and orientation codes are derived from the affine,
never stored beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation

from core.errors import SeriesGeometryError

# LPS (DICOM, ITK) <-> RAS (NIfTI): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Volume:
    """An image in physical space.

    Parameters
    ----------
    array : (I, J, K) or (I, J, K, T) or (I, J, K, 3) ndarray
        Voxel values in physical units; made read-only on construction.
    affine : (4, 4) ndarray
        Voxel index -> RAS+ millimetres.
    modality : str
        DICOM modality code ("CT", "MR", ...) or "" when unknown.
    unit : str
        Unit of the values ("HU" for CT, "" when arbitrary).
    is_rgb : bool
        The last axis holds three colour components.
    display_inverted : bool
        MONOCHROME1: higher values must be shown darker.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str = ""
    unit: str = ""
    is_rgb: bool = False
    display_inverted: bool = False
    description: str = field(default="")

    def __post_init__(self) -> None:
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise SeriesGeometryError(f"affine must be 4x4, got shape {affine.shape}")
        if not np.all(np.isfinite(affine)):
            raise SeriesGeometryError("affine has NaN or infinite entries; the file's geometry is broken")
        if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
            raise SeriesGeometryError(f"affine's last row must be 0 0 0 1, got {affine[3].tolist()}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise SeriesGeometryError("affine is singular (a voxel size or direction is zero)")
        spatial = 4 if self.is_rgb else 3
        if self.array.ndim not in (spatial, spatial + 1):
            raise SeriesGeometryError(f"volume must have 3 spatial axes (+ time), got array shape {self.array.shape}")
        if self.is_rgb and self.array.shape[-1] != 3:
            raise SeriesGeometryError(f"RGB volume needs 3 components, got {self.array.shape[-1]}")
        array = self.array
        if array.flags.writeable:
            array = array.view()
            array.flags.writeable = False
        affine.flags.writeable = False
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "affine", affine)

    def __reduce__(self) -> tuple[type[Volume], tuple[object, ...]]:
        # Rebuild through __init__ so a Volume sent to or from a worker process is validated
        # and read-only again (unpickled arrays come back writeable).
        return (
            type(self),
            (self.array, self.affine, self.modality, self.unit, self.is_rgb, self.display_inverted, self.description),
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        i, j, k = self.array.shape[:3]
        return int(i), int(j), int(k)

    @property
    def n_frames(self) -> int:
        """Number of time points (1 for a 3D volume)."""
        extra = self.array.shape[3:-1] if self.is_rgb else self.array.shape[3:]
        return int(extra[0]) if extra else 1

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    @property
    def axcodes(self) -> str:
        return "".join(aff2axcodes(self.affine))

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along i, j, k: the column norms of the 3x3 part."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return float(norms[0]), float(norms[1]), float(norms[2])


def reorient_to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip and transpose the first three axes so they point to the closest of R, A, S.

    No resampling: an oblique tilt stays in the returned affine. Trailing axes
    (time, colour) are kept as they are.

    Returns
    -------
    array : ndarray
        A view of ``array`` when possible.
    affine : (4, 4) ndarray
        The affine of the reoriented array, describing the same world positions.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ornt = io_orientation(affine)
    spatial_shape = array.shape[:3]
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return array, affine
    new_array = apply_orientation(array, ornt)
    new_affine = affine @ inv_ornt_aff(ornt, spatial_shape)
    return new_array, new_affine
