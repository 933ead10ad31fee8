"""The built-in sample phantom: HU per tissue, and asymmetries that expose flipped axes.

Everything is measured on the generated volume in RAS world coordinates (via its
affine), not read back from the generator's constants: a flipped axis in the
array or the affine makes these tests fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from core.sample import DESCRIPTION, make_sample_ct, sample_marker_ras, sample_series
from core.volume import Volume


@pytest.fixture(scope="module")
def phantom() -> Volume:
    return make_sample_ct()


def _world(volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World x, y, z (mm) of the voxel centres along i, j, k (the phantom's affine is diagonal)."""
    a = volume.affine
    assert np.allclose(a[:3, :3], np.diag(np.diag(a[:3, :3]))), "the sample is stored without rotation"
    i, j, k = (np.arange(n) for n in volume.spatial_shape)
    return a[0, 0] * i + a[0, 3], a[1, 1] * j + a[1, 3], a[2, 2] * k + a[2, 3]


def _body(volume: Volume) -> np.ndarray:
    """The patient: the largest connected region denser than -500 HU (the table is separate),
    with its holes (the lungs) filled slice by slice."""
    labels, n = ndimage.label(volume.array > -500)
    assert n >= 2, "body and table should be separate objects"
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(body, structure=np.ones((3, 3, 1), dtype=bool))


def _body_centre(volume: Volume, body: np.ndarray) -> np.ndarray:
    x, y, z = _world(volume)
    i, j, k = np.nonzero(body)
    return np.array([x[i].mean(), y[j].mean(), z[k].mean()])


def test_format_and_geometry(phantom: Volume) -> None:
    assert phantom.shape == (256, 256, 120)
    assert phantom.array.dtype == np.int16
    assert phantom.modality == "CT" and phantom.unit == "HU"
    assert phantom.description == DESCRIPTION
    np.testing.assert_allclose(phantom.spacing_mm, (0.8, 0.8, 2.0))
    assert phantom.axcodes == "RAS"
    assert not phantom.array.flags.writeable
    # A plausible scanner position: the field of view is centred near the isocentre in x and y.
    centre = phantom.affine @ np.array([127.5, 127.5, 59.5, 1.0])
    assert abs(centre[0]) < 50 and abs(centre[1]) < 50


def test_is_deterministic() -> None:
    first, second = make_sample_ct((64, 64, 30)), make_sample_ct((64, 64, 30))
    np.testing.assert_array_equal(first.array, second.array)
    np.testing.assert_array_equal(first.affine, second.affine)


def test_hounsfield_units_per_tissue(phantom: Volume) -> None:
    hu = phantom.array
    # Outside the patient: air, with noise of a few HU.
    corner = hu[:20, -20:, :]
    assert -1010 <= np.median(corner) <= -990
    assert 2 <= corner.std() <= 25, "mild noise expected"
    body = _body(phantom)
    inside = hu[body]
    counts = {
        "lung": ((inside > -900) & (inside < -800)).mean(),
        "fat": ((inside > -130) & (inside < -70)).mean(),
        "soft tissue": ((inside > 10) & (inside < 70)).mean(),
        "cancellous bone": ((inside > 220) & (inside < 280)).mean(),
        "cortical bone": ((inside > 650) & (inside < 750)).mean(),
    }
    for tissue, fraction in counts.items():
        assert fraction > 0.002, f"{tissue}: only {fraction:.4f} of the body"
    lung = inside[(inside > -950) & (inside < -700)]
    assert -870 <= np.median(lung) <= -830
    fat = inside[(inside > -200) & (inside < -20)]
    assert -115 <= np.median(fat) <= -85
    soft = inside[(inside > -20) & (inside < 100)]
    assert 25 <= np.median(soft) <= 55
    assert hu.max() >= 1400, "the marker is the brightest structure"
    assert hu.min() >= -1024


def test_right_lung_is_larger_than_left(phantom: Volume) -> None:
    x, _, _ = _world(phantom)
    body = _body(phantom)
    lung = (phantom.array > -950) & (phantom.array < -700) & body
    per_x = lung.sum(axis=(1, 2))
    right = per_x[x > 0].sum()  # RAS: +x is the patient's right
    left = per_x[x < 0].sum()
    assert left > 0
    assert right > 1.3 * left, (right, left)


def test_marker_is_left_anterior_superior(phantom: Volume) -> None:
    x, y, z = _world(phantom)
    i, j, k = np.nonzero(phantom.array > 1200)
    assert 100 < i.size < 5000, "one small sphere"
    centroid = np.array([x[i].mean(), y[j].mean(), z[k].mean()])
    np.testing.assert_allclose(centroid, sample_marker_ras(), atol=1.0)
    centre = _body_centre(phantom, _body(phantom))
    marker = np.array(sample_marker_ras())
    assert marker[0] < centre[0] - 20, "marker on the patient's left (smaller x in RAS)"
    assert marker[1] > centre[1] + 20, "marker anterior"
    assert marker[2] > centre[2] + 50, "marker superior"
    # The voxel nearest the marker centre is bright.
    ijk = np.linalg.solve(phantom.affine, [*marker, 1.0])[:3]
    assert phantom.array[tuple(np.round(ijk).astype(int))] > 1300


def test_spine_and_table_are_posterior(phantom: Volume) -> None:
    x, y, _ = _world(phantom)
    body = _body(phantom)
    centre = _body_centre(phantom, body)
    hu = phantom.array
    bone = (hu > 500) & (hu < 900) & body
    near_midline = np.abs(x - centre[0]) < 12
    i, j, _ = np.nonzero(bone & near_midline[:, None, None])
    assert i.size > 1000
    assert y[j].mean() < centre[1] - 20, "spine must be posterior of the body centre"
    table = (hu > -500) & ~body
    _, jt, _ = np.nonzero(table)
    assert jt.size > 0
    assert y[jt].max() < y[np.nonzero(body)[1]].min(), "the table is under (posterior of) the patient"


def test_heart_is_on_the_left() -> None:
    volume = make_sample_ct()
    x, y, z = _world(volume)
    hu = volume.array
    # Soft tissue between the lungs at lung level, in front of the spine: the heart and mediastinum.
    body = _body(volume)
    centre = _body_centre(volume, body)
    level = np.abs(z - (centre[2] - 20)) < 20
    front = y > centre[1]
    soft = (hu > 0) & (hu < 90) & body & level[None, None, :] & front[None, :, None]
    inner = np.abs(x - centre[0]) < 45
    i, _, _ = np.nonzero(soft & inner[:, None, None])
    assert x[i].mean() < centre[0] - 3, "heart shifted to the patient's left"


def test_other_shapes_keep_the_anatomy_in_place() -> None:
    small = make_sample_ct((96, 96, 48))
    x, y, z = _world(small)
    i, j, k = np.nonzero(small.array > 1200)
    centroid = np.array([x[i].mean(), y[j].mean(), z[k].mean()])
    np.testing.assert_allclose(centroid, sample_marker_ras(), atol=2.5)


def test_sample_series_matches_its_volume() -> None:
    series = sample_series()
    info = series.info
    assert info.kind == "sample" and info.modality == "CT" and info.description == DESCRIPTION
    volume = series.load()
    assert volume.shape == info.shape
    np.testing.assert_allclose(volume.affine, info.affine, atol=1e-9)
    assert str(volume.array.dtype) == info.dtype == "int16"
