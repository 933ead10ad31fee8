"""The Volume model: validation, immutability, derived geometry, reorientation."""

from __future__ import annotations

import numpy as np
import pytest
from nibabel.orientations import aff2axcodes

from core.errors import SeriesGeometryError
from core.volume import Volume, reorient_to_ras, spacing_from_affine


def test_array_is_read_only_and_affine_float64() -> None:
    source = np.zeros((2, 3, 4), dtype=np.int16)
    volume = Volume(source, np.eye(4))
    assert not volume.array.flags.writeable
    assert volume.affine.dtype == np.float64
    with pytest.raises(ValueError):
        volume.array[0, 0, 0] = 1
    with pytest.raises(ValueError):
        volume.affine[0, 0] = 2.0
    source[0, 0, 0] = 5  # the caller's array stays theirs
    assert volume.shape == (2, 3, 4)


@pytest.mark.parametrize(
    ("affine", "match"),
    [
        (np.full((4, 4), np.nan), "NaN"),
        (np.zeros((4, 4)), "last row"),
        (np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
        (np.eye(3), "4x4"),
    ],
)
def test_broken_affines_are_refused(affine: np.ndarray, match: str) -> None:
    with pytest.raises(SeriesGeometryError, match=match):
        Volume(np.zeros((2, 2, 2)), affine)


def test_rgb_and_time_axes() -> None:
    rgb = Volume(np.zeros((4, 5, 1, 3), dtype=np.uint8), np.eye(4), is_rgb=True)
    assert rgb.spatial_shape == (4, 5, 1) and rgb.n_frames == 1
    series = Volume(np.zeros((4, 5, 6, 7)), np.eye(4))
    assert series.n_frames == 7
    with pytest.raises(SeriesGeometryError, match="3 components"):
        Volume(np.zeros((4, 5, 1, 4)), np.eye(4), is_rgb=True)
    with pytest.raises(SeriesGeometryError, match="spatial axes"):
        Volume(np.zeros((4, 5)), np.eye(4))


def test_spacing_is_derived_from_an_oblique_affine() -> None:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.5, 0.7, 2.5])
    assert spacing_from_affine(affine) == pytest.approx((0.5, 0.7, 2.5))


def _world_corners(shape: tuple[int, ...], affine: np.ndarray) -> set[tuple[float, ...]]:
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1).T
    world = (affine[:3, :3] @ corners.T).T + affine[:3, 3]
    return {tuple(np.round(p, 6)) for p in world}


@pytest.mark.parametrize(
    "matrix",
    [
        np.diag([-0.8, -0.8, 2.0]),  # DICOM axial LPS stored as RAS: LAS... x and y flipped
        np.array([[0, 0, 5.0], [-4.375, 0, 0], [0, 4.375, 0]]),  # sagittal, PSR
        np.array([[1.0, 0, 0], [0, 0, -3.0], [0, 2.0, 0]]),  # coronal
    ],
)
def test_reorient_keeps_world_positions_and_values(matrix: np.ndarray) -> None:
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = [10.0, -20.0, 30.0]
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)
    new_array, new_affine = reorient_to_ras(array, affine)
    assert "".join(aff2axcodes(new_affine)) == "RAS"
    assert _world_corners(array.shape, affine) == _world_corners(new_array.shape, new_affine)
    # The value at every world point is unchanged.
    ijk = np.array([1, 2, 3, 1.0])
    world = affine @ ijk
    new_ijk = np.rint(np.linalg.solve(new_affine, world)[:3]).astype(int)
    assert new_array[tuple(new_ijk)] == array[1, 2, 3]


def test_reorient_keeps_trailing_axes() -> None:
    array = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    new_array, _ = reorient_to_ras(array, np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert new_array.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(new_array[..., 2], array[::-1, ::-1, :, 2])


def test_a_pickled_volume_comes_back_read_only_and_equal() -> None:
    import pickle

    volume = Volume(
        np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.diag([2.0, 3.0, 4.0, 1.0]), modality="CT", unit="HU"
    )
    copy = pickle.loads(pickle.dumps(volume))
    assert not copy.array.flags.writeable and not copy.affine.flags.writeable
    np.testing.assert_array_equal(copy.array, volume.array)
    np.testing.assert_array_equal(copy.affine, volume.affine)
    assert (copy.modality, copy.unit) == ("CT", "HU")
