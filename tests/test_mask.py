"""Masks for meshing: thresholds against numpy, clean-up on phantoms with known answers, label maps on real data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import core.mask as mask_module
from core.errors import EmptySurfaceError
from core.io import scan
from core.mask import (
    CT_PRESETS,
    TOTALSEGMENTATOR_TOTAL,
    MaskCleanup,
    clean_mask,
    component_count,
    face_warning,
    guess_label_scheme,
    is_label_map,
    label_counts,
    label_masks,
    label_name,
    mask_from_full,
    otsu_threshold,
    preset_by_name,
    threshold_mask,
)
from core.sources import read_paths
from core.volume import Volume
from tests.conftest import data_path


def _affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def _load(*parts: str) -> Volume:
    result = scan(read_paths([data_path(*parts)]))
    assert result.series, [e.message for e in result.errors]
    return result.series[0].load()


# --- thresholds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "lower", "upper"),
    [
        (np.int16, 300, None),
        (np.int16, 299.5, None),  # fractional bound on integer data: same as >= 300
        (np.int16, -700, 225),
        (np.int16, 225.2, 225.9),  # no integer inside: empty
        (np.uint8, 0, 10),
        (np.int16, 40000, None),  # above what int16 holds: empty
        (np.float32, 0.25, 0.75),
        (np.float64, -0.1, None),
    ],
)
def test_threshold_mask_matches_numpy(dtype, lower, upper, monkeypatch) -> None:
    monkeypatch.setattr(mask_module, "_SLAB_BYTES", 700)  # many slabs on a small array
    rng = np.random.default_rng(7)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = rng.integers(max(info.min, -1000), min(info.max, 1500), size=(23, 17, 11)).astype(dtype)
    else:
        values = rng.random((23, 17, 11)).astype(dtype)
    expected = values >= lower
    if upper is not None:
        expected &= values <= upper
    mask = threshold_mask(values, _affine(), lower, upper)
    np.testing.assert_array_equal(mask.to_full(), expected)
    assert mask.voxel_count == int(expected.sum())
    if expected.any():  # the stored box is the tight bounding box
        nz = np.argwhere(expected)
        assert mask.offset == tuple(nz.min(axis=0))
        assert mask.array.shape == tuple(nz.max(axis=0) - nz.min(axis=0) + 1)
    assert mask.threshold == (lower, upper) and not mask.cleaned


def test_threshold_rejects_inverted_range() -> None:
    with pytest.raises(ValueError, match="below the lower"):
        threshold_mask(np.zeros((3, 3, 3), np.int16), _affine(), 10, 5)


def test_volume_ml_uses_the_voxel_size() -> None:
    values = np.zeros((10, 10, 10), np.int16)
    values[2:6, 2:7, 2:8] = 1  # 120 voxels
    mask = threshold_mask(values, _affine((0.5, 2.0, 3.0)), 1)
    assert mask.volume_ml == pytest.approx(120 * 3.0 / 1000)


def test_otsu_separates_two_populations() -> None:
    rng = np.random.default_rng(1)
    air = rng.random((40, 40, 40)) < 0.4
    values = np.where(air, rng.normal(-800, 30, air.shape), rng.normal(40, 30, air.shape)).astype(np.float32)
    threshold = otsu_threshold(values)
    assert -800 < threshold < 40
    assert np.mean((values >= threshold) == ~air) > 0.999  # it separates the populations
    with pytest.raises(EmptySurfaceError):
        otsu_threshold(np.full((4, 4, 4), 7, np.int16))


def test_presets_cite_sources() -> None:
    bone = preset_by_name("bone")
    assert (bone.lower, bone.upper) == (226, 3071) and "InVesalius" in bone.source
    assert preset_by_name("Skin (adult)").lower == -718
    assert all(p.source and p.unit == "HU" for p in CT_PRESETS)
    with pytest.raises(KeyError, match="known"):
        preset_by_name("cartilage")


# --- clean-up -----------------------------------------------------------------------


def _two_blocks() -> np.ndarray:
    full = np.zeros((30, 20, 20), bool)
    full[2:12, 2:12, 2:12] = True  # 1000 voxels
    full[16:20, 5:9, 5:9] = True  # 64 voxels
    full[25, 15, 15] = True  # 1 voxel
    return full


def test_keep_largest_and_islands() -> None:
    mask = mask_from_full(_two_blocks(), _affine((2.0, 1.0, 1.0)))  # 2 mm3 voxels
    largest = clean_mask(mask, MaskCleanup(keep_largest=1))
    assert largest.voxel_count == 1000 and largest.offset == (2, 2, 2) and largest.cleaned
    two = clean_mask(mask, MaskCleanup(keep_largest=2))
    assert two.voxel_count == 1064
    # 64 voxels x 2 mm3 = 0.128 mL: kept by a 0.1 mL cut, dropped by a 0.2 mL cut.
    assert clean_mask(mask, MaskCleanup(min_island_ml=0.1)).voxel_count == 1064
    assert clean_mask(mask, MaskCleanup(min_island_ml=0.2)).voxel_count == 1000


def test_components_are_face_connected() -> None:
    full = np.zeros((6, 6, 6), bool)
    full[1, 1, 1] = full[2, 2, 2] = True  # touching at a corner only
    mask = mask_from_full(full, _affine())
    assert component_count(mask) == 2
    assert ndimage.label(full, structure=np.ones((3, 3, 3)))[1] == 1  # 26-connectivity would join them


def test_fill_cavities_fills_a_hollow_ball() -> None:
    grid = np.indices((31, 31, 31)) - 15
    radius = np.sqrt((grid**2).sum(axis=0))
    solid = radius <= 12
    shell = solid & (radius > 8)
    mask = mask_from_full(shell, _affine())
    filled = clean_mask(mask, MaskCleanup(fill_cavities=True))
    np.testing.assert_array_equal(filled.to_full(), solid)
    # A cavity open to the outside is not filled.
    opened = shell.copy()
    opened[15, 15, 15:] = False
    assert clean_mask(mask_from_full(opened, _affine()), MaskCleanup(fill_cavities=True)).voxel_count == opened.sum()


def test_closing_radius_is_in_millimetres_on_anisotropic_grids() -> None:
    # Two empty voxels between two blocks: the nearest voxel centres are 3 steps apart, 1.5 mm
    # along i (0.5 mm voxels) and 9 mm along k (3 mm voxels). A ball of radius r bridges < 2 r.
    spacing = (0.5, 1.0, 3.0)
    along_i = np.zeros((20, 9, 9), bool)
    along_i[2:8, 2:7, 2:7] = True
    along_i[10:16, 2:7, 2:7] = True
    along_k = np.zeros((9, 9, 20), bool)
    along_k[2:7, 2:7, 2:8] = True
    along_k[2:7, 2:7, 10:16] = True
    for full, bridged in ((along_i, True), (along_k, False)):
        closed = clean_mask(mask_from_full(full, _affine(spacing)), MaskCleanup(closing_mm=1.5))
        assert (component_count(closed) == 1) is bridged
        assert closed.to_full()[full].all()  # closing never removes voxels
    assert component_count(clean_mask(mask_from_full(along_k, _affine(spacing)), MaskCleanup(closing_mm=4.0))) == 2
    assert component_count(clean_mask(mask_from_full(along_k, _affine(spacing)), MaskCleanup(closing_mm=5.0))) == 1


def test_drop_border_components_and_crop_box() -> None:
    full = np.zeros((20, 20, 20), bool)
    full[0:5, 5:10, 5:10] = True  # touches the i = 0 face: the "air around the patient"
    full[8:14, 8:14, 8:14] = True
    mask = mask_from_full(full, _affine())
    inner = clean_mask(mask, MaskCleanup(drop_border_components=True))
    assert inner.voxel_count == 216 and inner.offset == (8, 8, 8)
    cropped = clean_mask(mask, MaskCleanup(crop_box=((10, 20), (0, 20), (0, 12))))
    expected = np.zeros_like(full)
    expected[10:20, :, 0:12] = full[10:20, :, 0:12]
    np.testing.assert_array_equal(cropped.to_full(), expected)
    with pytest.raises(ValueError, match="crop box"):
        clean_mask(mask, MaskCleanup(crop_box=((5, 5), (0, 20), (0, 20))))


def test_world_bounds_follow_an_oblique_affine() -> None:
    full = np.zeros((10, 12, 14), bool)
    full[3:7, 2:9, 4:6] = True
    theta = np.deg2rad(30)
    affine = np.eye(4)
    affine[:3, :3] = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    ) @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [10, -20, 30]
    low, high = mask_from_full(full, affine).world_bounds_mm()
    xyz = np.argwhere(full) @ affine[:3, :3].T + affine[:3, 3]
    np.testing.assert_allclose(low, xyz.min(axis=0))
    np.testing.assert_allclose(high, xyz.max(axis=0))


# --- face warning -------------------------------------------------------------------


def _head(modality: str) -> Volume:
    grid = np.indices((40, 48, 40)).astype(float)
    inside = ((grid[0] - 20) / 16) ** 2 + ((grid[1] - 24) / 22) ** 2 + ((grid[2] - 20) / 18) ** 2 <= 1
    values = np.where(inside, 40, -1000).astype(np.int16)
    return Volume(values, _affine((4.0, 4.0, 4.0)), modality=modality, unit="HU" if modality == "CT" else "")


def test_face_warning_for_skin_thresholds_on_ct_and_mr() -> None:
    head = _head("CT")
    skin = threshold_mask(head.array, head.affine, -500)
    assert "face" in face_warning("CT", skin, -500)
    assert face_warning("CT", threshold_mask(head.array, head.affine, 20), 300) is None  # bone range
    assert face_warning("", skin, -500) is None  # unknown modality
    assert "face" in face_warning("MR", skin, 12.0)  # MR values are not calibrated: any threshold
    posterior = clean_mask(skin, MaskCleanup(crop_box=((0, 40), (0, 20), (0, 40))))
    assert face_warning("CT", posterior, -500) is None  # nothing in the anterior third


# --- label maps (real TotalSegmentator output) --------------------------------------


def test_label_counts_and_masks_match_the_file() -> None:
    import nibabel as nib

    path = data_path("nifti_ct_with_labelmap", "example_seg.nii.gz")
    raw = np.asarray(nib.load(path).dataobj)
    values, counts = np.unique(raw, return_counts=True)
    expected = {int(v): int(c) for v, c in zip(values, counts, strict=True) if v != 0}
    volume = _load("nifti_ct_with_labelmap", "example_seg.nii.gz")
    assert is_label_map(volume)
    assert label_counts(volume.array) == expected
    masks = label_masks(volume.array, volume.affine, [5, 13, 117])
    assert list(masks) == [5, 13, 117]
    for label, mask in masks.items():
        np.testing.assert_array_equal(mask.to_full(), volume.array == label)
    with pytest.raises(EmptySurfaceError, match="labels present: 1, 2, 3"):
        label_masks(volume.array, volume.affine, [12])


def test_totalsegmentator_names_fit_the_anatomy() -> None:
    """Liver is soft tissue on the patient's right, the left upper lung lobe is air on the left."""
    seg = _load("nifti_ct_with_labelmap", "example_seg.nii.gz")
    ct = _load("nifti_ct_with_labelmap", "example_ct_sm.nii.gz")
    assert not is_label_map(ct)
    np.testing.assert_allclose(seg.affine, ct.affine)
    assert guess_label_scheme(label_counts(seg.array)) == "TotalSegmentator (task total, v2)"
    assert len(TOTALSEGMENTATOR_TOTAL) == 117
    liver, lung = 5, 10
    assert label_name(liver, "TotalSegmentator (task total, v2)") == "5 liver"
    assert label_name(lung, "TotalSegmentator (task total, v2)") == "10 lung_upper_lobe_left"
    assert label_name(lung) == "label 10"

    def centre_x(label: int) -> float:
        ijk = np.argwhere(seg.array == label).mean(axis=0)
        return float(seg.affine[0, :3] @ ijk + seg.affine[0, 3])

    assert 0 < ct.array[seg.array == liver].mean() < 100
    assert ct.array[seg.array == lung].mean() < -500
    assert centre_x(liver) > 0 > centre_x(lung)  # RAS: +x is the patient's right
