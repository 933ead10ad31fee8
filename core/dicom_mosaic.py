"""Siemens mosaics: many slices tiled in one 2D image, described by the CSA header.

A mosaic file's (0020,0032) Image Position (Patient) is the corner of the whole
mosaic, not of a slice; the true position of slice 0 is shifted by half the
difference between the mosaic and the tile size (nibabel ``MosaicWrapper``,
dcm2niix ``nii_mosaic``). Slices follow the CSA ``SliceNormalVector`` (which may
point against ``row x column``), spaced by (0018,0088) Spacing Between Slices.

References
----------
nibabel/nicom/dicomwrappers.py (MosaicWrapper.image_position), and
https://nipy.org/nibabel/dicom/dicom_mosaic.html
"""

from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

with warnings.catch_warnings():
    # nibabel.nicom warns on import that its DICOM wrappers are experimental; we
    # only use its CSA header parser, which is mature.
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader

from core.dicom_geometry import normalized_orientation
from core.dicom_headers import first_float, floats, image_type_tokens
from core.errors import SeriesGeometryError


def is_mosaic(ds: Dataset) -> bool:
    """Siemens marks mosaics with MOSAIC in (0008,0008) Image Type."""
    return "MOSAIC" in image_type_tokens(ds)


@dataclass(frozen=True)
class MosaicLayout:
    """Where the slices of one mosaic image are.

    Attributes
    ----------
    n_slices : int
        CSA NumberOfImagesInMosaic.
    tiles_per_side : int
        The mosaic is a ``tiles_per_side x tiles_per_side`` grid of tiles.
    tile_rows, tile_columns : int
        Size of one slice.
    positions : (n_slices, 3) ndarray
        LPS position of the first voxel of each slice, in tile order.
    """

    n_slices: int
    tiles_per_side: int
    tile_rows: int
    tile_columns: int
    positions: np.ndarray

    def tile(self, pixels: np.ndarray, index: int) -> np.ndarray:
        """The slice ``index`` (tile order) of a decoded mosaic, as a view."""
        row, column = divmod(index, self.tiles_per_side)
        return pixels[
            row * self.tile_rows : (row + 1) * self.tile_rows,
            column * self.tile_columns : (column + 1) * self.tile_columns,
        ]


def mosaic_layout(ds: Dataset, label: str) -> MosaicLayout:
    """Read the slice layout of a Siemens mosaic from its header.

    Raises
    ------
    SeriesGeometryError
        The CSA header (0029,1010) is missing or lacks NumberOfImagesInMosaic /
        SliceNormalVector (e.g. stripped by an anonymizer), or sizes disagree.
    """
    try:
        csa = csareader.get_csa_header(ds, "image")
    except (csareader.CSAError, ValueError, KeyError, IndexError, TypeError, struct.error) as err:
        raise SeriesGeometryError(
            f"{label}: Siemens mosaic with an unreadable CSA image header (0029,1010) ({err}); "
            "de-mosaicing needs it. Export the series without removing private tags.",
            source=label,
        ) from err
    if csa is None:
        raise SeriesGeometryError(
            f"{label}: Siemens mosaic without the CSA image header (0029,1010) (private tags removed?); "
            "the slice count and slice direction are unknown, so the mosaic cannot be split into slices. "
            "Export the series with private tags, or convert it with dcm2niix on the original files.",
            source=label,
        )
    n_slices = csareader.get_n_mosaic(csa)
    normal = csareader.get_slice_normal(csa)
    if not n_slices or normal is None:
        raise SeriesGeometryError(
            f"{label}: Siemens mosaic whose CSA header lacks NumberOfImagesInMosaic or SliceNormalVector; "
            "the mosaic cannot be split into slices.",
            source=label,
        )
    n_slices = int(n_slices)
    rows, columns = int(ds.Rows), int(ds.Columns)
    side = int(math.ceil(math.sqrt(n_slices)))
    if rows % side or columns % side:
        raise SeriesGeometryError(
            f"{label}: Siemens mosaic of {rows}x{columns} pixels cannot hold {n_slices} slices on a "
            f"{side}x{side} grid of equal tiles.",
            source=label,
        )
    tile_rows, tile_columns = rows // side, columns // side
    iop = floats(ds, "ImageOrientationPatient", 6)
    ipp = floats(ds, "ImagePositionPatient", 3)
    spacing = floats(ds, "PixelSpacing", 2)
    if iop is None or ipp is None or spacing is None:
        raise SeriesGeometryError(
            f"{label}: Siemens mosaic without (0020,0037)/(0020,0032)/(0028,0030); its geometry is unknown.",
            source=label,
        )
    orientation = normalized_orientation(iop)
    row_dir, col_dir = orientation[:3], orientation[3:]
    # IPP is the corner of the whole mosaic; move it to the corner of a tile.
    shift_rows = (rows - tile_rows) / 2.0
    shift_columns = (columns - tile_columns) / 2.0
    first = np.asarray(ipp) + col_dir * spacing[0] * shift_rows + row_dir * spacing[1] * shift_columns
    step = first_float(ds, "SpacingBetweenSlices") or first_float(ds, "SliceThickness") or 1.0
    unit_normal = np.asarray(normal, dtype=np.float64)
    unit_normal = unit_normal / np.linalg.norm(unit_normal)
    positions = first[None, :] + np.arange(n_slices)[:, None] * step * unit_normal[None, :]
    return MosaicLayout(
        n_slices=n_slices,
        tiles_per_side=side,
        tile_rows=tile_rows,
        tile_columns=tile_columns,
        positions=positions,
    )
