"""The built-in sample scan: a synthetic chest CT phantom, generated (no file, no download).

The phantom is deliberately asymmetric so that any flipped or swapped axis is
visible at a glance and testable:

* left/right: the right lung is larger than the left, and the heart sits on
  the patient's left;
* front/back: the spine and the table are posterior, the sternum anterior;
* head/feet and everything at once: a small bright marker sphere (1500 HU) in
  the patient's left-anterior-superior region, at :func:`sample_marker_ras`.

Values are Hounsfield units (int16): air -1000, fat -100, soft tissue and
heart 40, lung -850, cancellous bone 250, cortical bone 700, plus mild
Gaussian noise from a fixed seed, so the phantom is the same on every call.
The array is stored in RAS+ order (i to the Right, j Anterior, k Superior) with
0.8 x 0.8 x 2.0 mm voxels at the default size, centred near the scanner's
isocentre at a typical table position.
"""

from __future__ import annotations

import numpy as np

from core.series import Series, SeriesInfo
from core.volume import Volume

DESCRIPTION = "Sample CT phantom (synthetic)"
DEFAULT_SHAPE = (256, 256, 120)
# Field of view (mm) along x, y, z: 256 x 0.8, 256 x 0.8, 120 x 2.0 at the default size.
# Other shapes keep the field of view (and so the anatomy) and change the voxel size.
FIELD_OF_VIEW_MM = (204.8, 204.8, 240.0)
# RAS position (mm) of the centre of the field of view; the body is centred at x = y = 0 (isocentre).
FOV_CENTRE_MM = (0.0, -10.0, -450.0)
NOISE_SEED = 20240917
NOISE_SD_HU = 10.0

AIR, FAT, SOFT, LUNG, HEART = -1000, -100, 40, -850, 45
CANCELLOUS, CORTICAL, RIB, DISC, CSF, MARKER = 250, 700, 600, 90, 15, 1500

# Geometry in mm relative to the body centre (x, y) = (0, 0) and the FOV centre in z.
_BODY_SEMI_AXES = (95.0, 72.0)
_FAT_MM = 9.0
_RIGHT_LUNG = ((46.0, 6.0, 8.0), (34.0, 46.0, 95.0))  # centre, semi-axes: the larger lung
_LEFT_LUNG = ((-47.0, 6.0, 14.0), (27.0, 40.0, 84.0))
_HEART = ((-20.0, 20.0, -28.0), (40.0, 32.0, 42.0))
_VERTEBRA = ((0.0, -36.0), 16.0)  # centre, radius
_CANAL = ((0.0, -57.0), 6.5)
_MARKER = ((-52.0, 44.0, 92.0), 6.0)  # left (x < 0), anterior (y > 0), superior (z > 0)
_TABLE_TOP_Y = -76.0  # 4 mm below the body's posterior edge (a thin pad lies between, shown as air)


def sample_spacing_mm(shape: tuple[int, int, int] = DEFAULT_SHAPE) -> tuple[float, float, float]:
    """Voxel size (mm) of the phantom of ``shape``: the field of view divided by the shape."""
    return (
        FIELD_OF_VIEW_MM[0] / shape[0],
        FIELD_OF_VIEW_MM[1] / shape[1],
        FIELD_OF_VIEW_MM[2] / shape[2],
    )


def sample_affine(shape: tuple[int, int, int] = DEFAULT_SHAPE) -> np.ndarray:
    """Voxel -> RAS mm affine of the phantom of ``shape`` (diagonal: the array is already RAS+)."""
    spacing = sample_spacing_mm(shape)
    affine = np.diag([*spacing, 1.0])
    for axis in range(3):
        affine[axis, 3] = FOV_CENTRE_MM[axis] - spacing[axis] * (shape[axis] - 1) / 2.0
    return affine


def sample_marker_ras() -> tuple[float, float, float]:
    """RAS position (mm) of the centre of the marker sphere (left, anterior, superior)."""
    (x, y, dz), _ = _MARKER
    return (float(x), float(y), float(FOV_CENTRE_MM[2] + dz))


def _ellipsoid(
    volume: np.ndarray,
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
    centre: tuple[float, float, float],
    semi: tuple[float, float, float],
    value: int,
) -> None:
    """Set ``value`` inside an axis-aligned ellipsoid, working only on its bounding box."""
    boxes = []
    for coords, c, r in zip(axes, centre, semi, strict=True):
        inside = np.nonzero(np.abs(coords - c) <= r)[0]
        if inside.size == 0:
            return
        boxes.append(slice(int(inside[0]), int(inside[-1]) + 1))
    x, y, z = (coords[box] for coords, box in zip(axes, boxes, strict=True))
    q = (
        (((x - centre[0]) / semi[0]) ** 2)[:, None, None]
        + (((y - centre[1]) / semi[1]) ** 2)[None, :, None]
        + (((z - centre[2]) / semi[2]) ** 2)[None, None, :]
    )
    region = volume[boxes[0], boxes[1], boxes[2]]
    region[q <= 1.0] = value


def make_sample_ct(shape: tuple[int, int, int] = DEFAULT_SHAPE) -> Volume:
    """Generate the synthetic chest CT phantom.

    Parameters
    ----------
    shape : (3,) tuple of int
        Voxels along x (Right), y (Anterior), z (Superior). The field of view
        stays 204.8 x 204.8 x 240 mm, so the default (256, 256, 120) gives
        0.8 x 0.8 x 2.0 mm voxels.

    Returns
    -------
    Volume
        int16 Hounsfield units in RAS+ order, modality "CT", unit "HU".
    """
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"sample shape must be three sizes of at least 2, got {shape}")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    affine = sample_affine(shape)
    # World coordinates of the voxel centres, relative to the body centre (x, y) and the FOV centre (z).
    x = affine[0, 3] + affine[0, 0] * np.arange(shape[0])
    y = affine[1, 3] + affine[1, 1] * np.arange(shape[1])
    z = affine[2, 3] + affine[2, 2] * np.arange(shape[2]) - FOV_CENTRE_MM[2]
    xx, yy = x[:, None], y[None, :]

    volume = np.full(shape, AIR, dtype=np.int16)

    # Cross-sections that are the same on every slice, broadcast along z.
    a, b = _BODY_SEMI_AXES
    r_body = np.sqrt((xx / a) ** 2 + (yy / b) ** 2)
    r_inner = np.sqrt((xx / (a - _FAT_MM)) ** 2 + (yy / (b - _FAT_MM)) ** 2)
    table = (yy < _TABLE_TOP_Y) & (yy >= _TABLE_TOP_Y - 10.0) & (np.abs(xx) < 100.0)
    table_shell = table & ((yy >= _TABLE_TOP_Y - 2.0) | (yy < _TABLE_TOP_Y - 8.0))
    volume[np.broadcast_to(table, shape[:2])] = -700  # foam core of the carbon-fibre table
    volume[np.broadcast_to(table_shell, shape[:2])] = 250
    volume[r_body <= 1.0] = FAT
    volume[r_inner <= 1.0] = SOFT

    axes = (x, y, z)
    _ellipsoid(volume, axes, _RIGHT_LUNG[0], _RIGHT_LUNG[1], LUNG)
    _ellipsoid(volume, axes, _LEFT_LUNG[0], _LEFT_LUNG[1], LUNG)
    _ellipsoid(volume, axes, _HEART[0], _HEART[1], HEART)

    # Ribs: a band just inside the fat, every 25 mm along z, open at the sternum and the spine.
    rib_band = (r_inner > 0.90) & (r_inner <= 0.99) & ~((np.abs(xx) < 22.0) & (yy > 0)) & ~(np.abs(xx) < 14.0)
    rib_slices = (np.mod(z + 6.0, 25.0) < 9.0) & (np.abs(z) < 105.0)
    if rib_slices.any():
        ribs = volume[:, :, rib_slices]
        ribs[np.broadcast_to(rib_band, shape[:2])] = RIB
        volume[:, :, rib_slices] = ribs
    sternum = (np.abs(xx) < 11.0) & (yy > b - _FAT_MM - 10.0) & (r_inner <= 1.0)
    volume[np.broadcast_to(sternum, shape[:2])] = 400

    # Spine (posterior): vertebral bodies with a cortical shell, discs every 28 mm, canal and arch.
    (vx, vy), vr = _VERTEBRA
    r_vert = np.hypot(xx - vx, yy - vy)
    (cx, cy), cr = _CANAL
    r_canal = np.hypot(xx - cx, yy - cy)
    arch = ((r_canal > cr) & (r_canal <= cr + 5.0) & (yy < vy - vr + 3.0)) | (
        (np.abs(xx) < 3.0) & (yy < cy - cr) & (yy > -b + 4.0)
    )
    discs = np.mod(z + 10.0, 28.0) < 6.0
    bone = volume[:, :, ~discs]
    bone[np.broadcast_to(r_vert <= vr, shape[:2])] = CORTICAL
    bone[np.broadcast_to(r_vert <= vr - 2.5, shape[:2])] = CANCELLOUS
    bone[np.broadcast_to(arch, shape[:2])] = CORTICAL
    volume[:, :, ~discs] = bone
    disc = volume[:, :, discs]
    disc[np.broadcast_to(r_vert <= vr, shape[:2])] = DISC
    volume[:, :, discs] = disc
    volume[np.broadcast_to(r_canal <= cr, shape[:2])] = CSF

    (mx, my, mz), mr = _MARKER
    _ellipsoid(volume, axes, (mx, my, mz), (mr, mr, mr), MARKER)

    # Mild noise from a fixed seed: the same phantom on every call, but windowing looks like a scan.
    rng = np.random.default_rng(NOISE_SEED)
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= NOISE_SD_HU
    np.rint(noise, out=noise)
    volume += noise.astype(np.int16)
    np.clip(volume, -1024, 3071, out=volume)
    return Volume(array=volume, affine=affine, modality="CT", unit="HU", description=DESCRIPTION)


def sample_series() -> Series:
    """The phantom as a loadable series (kind "sample"), generated when loaded."""
    shape = DEFAULT_SHAPE
    info = SeriesInfo(
        id="sample",
        kind="sample",
        description=DESCRIPTION,
        modality="CT",
        shape=shape,
        affine=sample_affine(shape),
        dtype="int16",
        sources=(),
    )
    return Series(info=info, loader=lambda: make_sample_ct(shape), headers=())
