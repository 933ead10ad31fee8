"""Mosaics: many slices tiled in one 2D image (Siemens, described by the CSA header; UIH "grid").

A Siemens mosaic file's (0020,0032) Image Position (Patient) is the corner of the whole
mosaic, not of a slice; the true position of slice 0 is shifted by half the
difference between the mosaic and the tile size (nibabel ``MosaicWrapper``,
dcm2niix ``nii_mosaic``). Slices follow the CSA ``SliceNormalVector`` (which may
point against ``row x column``), spaced by (0018,0088) Spacing Between Slices.
UIH grids list every slice's position in a private sequence (:func:`uih_layout`).

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
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.values import convert_SQ

with warnings.catch_warnings():
    # nibabel.nicom warns on import that its DICOM wrappers are experimental; we
    # only use its CSA header parser, which is mature.
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader

from core.dicom_geometry import normalized_orientation
from core.dicom_headers import first_float, floats, image_type_tokens, number_of_frames
from core.errors import SeriesGeometryError, UnsupportedFileError


def is_mosaic(ds: Dataset) -> bool:
    """Siemens marks mosaics with MOSAIC in (0008,0008) Image Type; UIH "grid" images are mosaics too."""
    return "MOSAIC" in image_type_tokens(ds) or is_uih_grid(ds)


# United Imaging (UIH) "GRID" images: private block "Image Private Header" in group 0065
# (dcm2niix UIH/README.md, from UIH): xx50 MR Number Of Slice In Volume (DS), xx51 MR
# VFrame Sequence (SQ, one item per slice with its (0020,0032)), xx14 SliceNormalVector (DS).
UIH_CREATOR = "Image Private Header"
_UIH_SLICES, _UIH_FRAMES, _UIH_NORMAL = 0x50, 0x51, 0x14


def is_uih(ds: Dataset) -> bool:
    manufacturer = str(ds.get("Manufacturer", "") or "").strip().upper()
    return manufacturer.startswith("UIH") or "UNITED IMAGING" in manufacturer


def _uih_element(ds: Dataset, offset: int) -> DataElement | None:
    try:
        tag: int = ds.private_block(0x0065, UIH_CREATOR).get_tag(offset)
    except KeyError:
        if 0x00650010 in ds:
            return None  # block 0x10 belongs to another creator
        tag = 0x00651000 | offset  # creator stripped: UIH's usual block (dcm2niix reads it there)
    return ds[tag] if tag in ds else None


def _uih_numbers(ds: Dataset, offset: int) -> list[float] | None:
    element = _uih_element(ds, offset)
    if element is None:
        return None
    value = element.value
    if isinstance(value, (bytes, bytearray)):  # VR unknown to the reader (implicit VR): DS text
        value = bytes(value).decode("ascii", "replace").strip("\x00 ").split("\\")
    if not isinstance(value, (list, tuple, MultiValue)):
        value = [value]
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return numbers if numbers and all(math.isfinite(v) for v in numbers) else None


def _uih_frame_items(ds: Dataset) -> list[Dataset] | None:
    element = _uih_element(ds, _UIH_FRAMES)
    if element is None:
        return None
    if element.VR == "SQ":
        return list(element.value)
    if isinstance(element.value, (bytes, bytearray)):
        # A sequence of unknown VR is encoded implicit VR little endian (PS3.5 6.2.2).
        try:
            return list(convert_SQ(bytes(element.value), True, True))
        except (ValueError, KeyError, IndexError, TypeError, EOFError, struct.error, NotImplementedError):
            return None
    return None


def uih_slice_count(ds: Dataset) -> int | None:
    """(0065,xx50) MR Number Of Slice In Volume, or None."""
    numbers = _uih_numbers(ds, _UIH_SLICES)
    if not numbers or numbers[0] < 1 or not float(numbers[0]).is_integer():
        return None
    return int(numbers[0])


def is_uih_grid(ds: Dataset) -> bool:
    """A UIH image holding a whole volume as a grid of tiles.

    UIH writes (0065,xx50) only on grid images ("appeared when image type has
    VFRAME"); the VFRAME/MOSAIC type or the per-slice VFrame sequence is also
    required so that a per-slice image carrying the count is never cut into tiles.
    """
    if not is_uih(ds) or number_of_frames(ds) != 1:
        return False
    count = uih_slice_count(ds)
    if count is None or count < 2:
        return False
    tokens = image_type_tokens(ds)
    return "VFRAME" in tokens or "MOSAIC" in tokens or _uih_element(ds, _UIH_FRAMES) is not None


@dataclass(frozen=True)
class MosaicLayout:
    """Where the slices of one mosaic image are.

    Attributes
    ----------
    n_slices : int
        CSA NumberOfImagesInMosaic.
    tiles_per_side : int
        Tiles per row of the grid, filled row by row (Siemens: a square grid; UIH: a
        grid with ``ceil(n / tiles_per_side)`` rows).
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
    if is_uih_grid(ds):
        return uih_layout(ds, label)
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


def uih_layout(ds: Dataset, label: str) -> MosaicLayout:
    """Read the slice layout of a United Imaging (UIH) grid image.

    The grid has ``ceil(sqrt(n))`` tile columns and ``ceil(n / columns)`` tile rows
    (UIH's description in dcm2niix UIH/README.md; dicm2nii ``mos2vol`` uses one row
    less than a square the same way), filled row by row. Each slice's position is
    the (0020,0032) of its item in the (0065,xx51) MR VFrame Sequence. Without that
    sequence, slice 0 is at the top-level (0020,0032) (dicm2nii and dcm2niix apply no
    Siemens corner shift to UIH) and the others follow (0065,xx14) SliceNormalVector
    at (0018,0088) Spacing Between Slices.

    Raises
    ------
    SeriesGeometryError
        The image cannot hold the tiles, or slice positions cannot be known.
    """
    count = uih_slice_count(ds)
    assert count is not None
    rows, columns = int(ds.Rows), int(ds.Columns)
    grid_columns = int(math.ceil(math.sqrt(count)))
    grid_rows = int(math.ceil(count / grid_columns))
    if rows % grid_rows or columns % grid_columns:
        raise SeriesGeometryError(
            f"{label}: UIH grid image of {rows}x{columns} pixels cannot hold (0065,1050) {count} slices on "
            f"{grid_rows} rows x {grid_columns} columns of equal tiles; the layout is unknown, so it is not split.",
            source=label,
        )
    tile_rows, tile_columns = rows // grid_rows, columns // grid_columns
    iop = floats(ds, "ImageOrientationPatient", 6)
    spacing = floats(ds, "PixelSpacing", 2)
    if iop is None or spacing is None:
        raise SeriesGeometryError(
            f"{label}: UIH grid image without (0020,0037)/(0028,0030); its geometry is unknown.", source=label
        )
    items = _uih_frame_items(ds)
    if items is not None:
        positions = []
        for item in items:
            try:
                position = floats(item, "ImagePositionPatient", 3)
            except UnsupportedFileError:
                position = None
            positions.append(position)
        if len(positions) != count or any(p is None for p in positions):
            raise SeriesGeometryError(
                f"{label}: UIH grid with {count} slices but its (0065,1051) MR VFrame Sequence holds "
                f"{sum(p is not None for p in positions)} slice positions in {len(items)} items; the slices "
                "cannot be placed. Export the series one file per slice.",
                source=label,
            )
        return MosaicLayout(
            n_slices=count,
            tiles_per_side=grid_columns,
            tile_rows=tile_rows,
            tile_columns=tile_columns,
            positions=np.asarray(positions, dtype=np.float64),
        )
    normal = _uih_numbers(ds, _UIH_NORMAL)
    ipp = floats(ds, "ImagePositionPatient", 3)
    step = first_float(ds, "SpacingBetweenSlices")
    if normal is None or len(normal) != 3 or ipp is None or not step or np.linalg.norm(normal) < 1e-6:
        raise SeriesGeometryError(
            f"{label}: UIH grid image without the private (0065,1051) MR VFrame Sequence and without "
            "(0065,1014) SliceNormalVector, (0020,0032) or (0018,0088): the position of its slices is unknown "
            "(private tags removed?). Export the series with private tags, or one file per slice.",
            source=label,
        )
    unit_normal = np.asarray(normal, dtype=np.float64) / np.linalg.norm(normal)
    positions = np.asarray(ipp)[None, :] + np.arange(count)[:, None] * step * unit_normal[None, :]
    return MosaicLayout(
        n_slices=count,
        tiles_per_side=grid_columns,
        tile_rows=tile_rows,
        tile_columns=tile_columns,
        positions=positions,
    )
