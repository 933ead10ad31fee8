"""Slice geometry, readouts, slabs, overlays and export of core.render on phantoms with known answers.

The phantom is a sphere placed in the patient's right-anterior-superior octant of
the field of view, defined in world (RAS) millimetres and voxelised on grids
acquired in different ways (axial, sagittal, oblique, mirrored). Each grid goes
through ``reorient_to_ras`` exactly as the readers do. Wherever it was
acquired, the sphere must land on the screen where radiologists expect it:

* axial (radiological): patient right on the screen's left, anterior at the top;
* coronal (radiological): right on the left, superior at the top;
* sagittal: anterior on the screen's left, superior at the top.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile

import numpy as np
import pytest
from nibabel.affines import apply_affine
from PIL import Image

from core.errors import CoreError
from core.render import (
    LabelOverlay,
    Slab,
    ThresholdOverlay,
    encode_jpeg,
    encode_png,
    histogram,
    label_values,
    linked_indices,
    n_slices,
    plane_zip,
    readout,
    render_view,
    sample_labels,
    screen_to_voxel,
    view_file_name,
    view_geometry,
    view_values,
    voxel_to_screen,
)
from core.series import Window
from core.volume import Volume, reorient_to_ras
from tests.conftest import data_path

MARKER = 1000
WHITE = Window(center=500.0, width=100.0)  # background 0 -> black, marker 1000 -> white
OFFSET_MM = np.array([16.0, 11.0, 13.0])  # marker centre from the FOV centre: Right, Anterior, Superior
RADIUS_MM = 6.0


def _rotation_x(degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    return np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])


def _affine(columns: np.ndarray, spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel -> RAS affine whose unit axes are ``columns`` (3x3), centred on the world origin."""
    affine = np.eye(4)
    affine[:3, :3] = columns @ np.diag(spacing)
    centre_voxel = (np.array(shape) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre_voxel
    return affine


# (name, unit direction of i, j, k as columns in RAS, spacing mm, shape)
GRIDS = {
    # DICOM axial (i -> L, j -> P in RAS terms), thick slices.
    "axial": (np.column_stack([[-1, 0, 0], [0, -1, 0], [0, 0, 1]]).astype(float), (0.9, 0.9, 2.5), (60, 56, 24)),
    # DICOM sagittal: rows along P (LPS +y), columns along I, slices from R to L.
    "sagittal": (np.column_stack([[0, -1, 0], [0, 0, -1], [-1, 0, 0]]).astype(float), (0.8, 0.8, 3.0), (64, 70, 20)),
    # Axial tilted 20 degrees about the left-right axis (gantry-tilt-like oblique).
    "oblique": (
        _rotation_x(20.0) @ np.column_stack([[-1, 0, 0], [0, -1, 0], [0, 0, 1]]).astype(float),
        (1.0, 1.0, 2.0),
        (56, 60, 30),
    ),
    # Mirrored: i -> R, j -> A, k -> I (a flipped slice order), anisotropic in-plane.
    "mirrored": (np.column_stack([[1, 0, 0], [0, 1, 0], [0, 0, -1]]).astype(float), (0.7, 1.1, 1.8), (72, 50, 26)),
}


def phantom(grid: str) -> Volume:
    """The RAS-octant sphere voxelised on ``grid`` and reoriented like a reader does."""
    columns, spacing, shape = GRIDS[grid]
    raw_affine = _affine(columns, spacing, shape)
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    world = apply_affine(raw_affine, np.stack([ii, jj, kk], axis=-1))
    inside = np.linalg.norm(world - OFFSET_MM, axis=-1) <= RADIUS_MM
    raw = np.where(inside, MARKER, 0).astype(np.int16)
    array, affine = reorient_to_ras(raw, raw_affine)
    return Volume(np.ascontiguousarray(array), affine, modality="CT", unit="HU")


def marker_index(volume: Volume) -> np.ndarray:
    """Voxel of the volume nearest to the marker centre (independent of core.render)."""
    return np.rint(apply_affine(np.linalg.inv(volume.affine), OFFSET_MM)).astype(int)


EXPECTED = {
    # plane: (quadrant (horizontal, vertical), letters left/right/top/bottom) in radiological display
    "axial": (("left", "top"), {"left": "R", "right": "L", "top": "A", "bottom": "P"}),
    "coronal": (("left", "top"), {"left": "R", "right": "L", "top": "S", "bottom": "I"}),
    "sagittal": (("left", "top"), {"left": "A", "right": "P", "top": "S", "bottom": "I"}),
}


def _centroid(image: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(image[:, :, 0] > 127)
    assert rows.size, "marker not visible in the view"
    return float(cols.mean()), float(rows.mean())


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_marker_lands_in_the_expected_quadrant_with_the_right_letters(grid: str, plane: str) -> None:
    volume = phantom(grid)
    ijk = marker_index(volume)
    index = linked_indices(ijk)[plane]
    image = render_view(volume, plane, index, WHITE)
    height, width = image.shape[:2]
    col, row = _centroid(image)
    (horizontal, vertical), letters = EXPECTED[plane]
    assert (col < width / 2) == (horizontal == "left"), (col, width)
    assert (row < height / 2) == (vertical == "top"), (row, height)
    geometry = view_geometry(volume, plane)
    assert geometry.letters == letters
    if grid == "oblique":
        assert 15.0 < geometry.obliquity_deg < 25.0
    elif grid != "oblique":
        assert geometry.obliquity_deg < 1e-6


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("plane", ["axial", "coronal"])
def test_neurological_display_mirrors_left_and_right(grid: str, plane: str) -> None:
    volume = phantom(grid)
    index = linked_indices(marker_index(volume))[plane]
    radiological = render_view(volume, plane, index, WHITE)
    neurological = render_view(volume, plane, index, WHITE, radiological=False)
    np.testing.assert_array_equal(neurological, radiological[:, ::-1])
    letters = view_geometry(volume, plane, radiological=False).letters
    assert (letters["left"], letters["right"]) == ("L", "R")


def test_sagittal_ignores_the_radiological_toggle() -> None:
    volume = phantom("axial")
    index = linked_indices(marker_index(volume))["sagittal"]
    np.testing.assert_array_equal(
        render_view(volume, "sagittal", index, WHITE), render_view(volume, "sagittal", index, WHITE, radiological=False)
    )


@pytest.mark.parametrize("grid", ["axial", "sagittal", "mirrored"])
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_pixels_are_square_in_millimetres_so_the_sphere_looks_round(grid: str, plane: str) -> None:
    volume = phantom(grid)
    geometry = view_geometry(volume, plane)
    spacing = volume.spacing_mm
    height, width = geometry.shape
    # The image spans the field of view in mm, with square pixels.
    assert width * geometry.pixel_mm[1] == pytest.approx(
        volume.spatial_shape[geometry.col_axis] * spacing[geometry.col_axis], rel=1e-9
    )
    assert height * geometry.pixel_mm[0] == pytest.approx(
        volume.spatial_shape[geometry.row_axis] * spacing[geometry.row_axis], rel=1e-9
    )
    assert geometry.pixel_mm[0] == pytest.approx(geometry.pixel_mm[1], rel=0.02)
    image = render_view(volume, plane, linked_indices(marker_index(volume))[plane], WHITE)
    rows, cols = np.nonzero(image[:, :, 0] > 127)
    extent_w = (cols.max() - cols.min() + 1) * geometry.pixel_mm[1]
    extent_h = (rows.max() - rows.min() + 1) * geometry.pixel_mm[0]
    # A 12 mm sphere cut near its centre: both extents are 12 mm up to one voxel each (voxelisation).
    # Without the resampling they would differ by the spacing ratio (up to 3.75x here).
    col_mm, row_mm = spacing[geometry.col_axis], spacing[geometry.row_axis]
    assert abs(extent_w - extent_h) <= col_mm + row_mm + 1e-6, (extent_w, extent_h)
    for extent, voxel in ((extent_w, col_mm), (extent_h, row_mm)):
        assert 2 * RADIUS_MM - 2 * voxel <= extent <= 2 * RADIUS_MM + voxel + 1e-6


@pytest.mark.parametrize("grid", list(GRIDS))
def test_screen_and_voxel_coordinates_round_trip(grid: str) -> None:
    volume = phantom(grid)
    ijk = tuple(int(v) for v in marker_index(volume))
    for plane, index in linked_indices(ijk).items():
        geometry = view_geometry(volume, plane)
        col, row = voxel_to_screen(geometry, ijk)
        assert screen_to_voxel(geometry, index, col, row) == ijk
        # The pixel there shows that voxel's value.
        values = view_values(volume, plane, index)
        assert values[geometry.row_src[int(row)], geometry.col_src[int(col)]] == volume.array[ijk]
    # Every output pixel shows the value of the voxel screen_to_voxel names.
    geometry = view_geometry(volume, "coronal")
    index = ijk[1]
    image = render_view(volume, "coronal", index, WHITE)
    for row in range(0, geometry.shape[0], 7):
        for col in range(0, geometry.shape[1], 5):
            voxel = screen_to_voxel(geometry, index, col + 0.5, row + 0.5)
            assert (image[row, col, 0] == 255) == (volume.array[voxel] == MARKER)


def test_clicking_the_marker_in_one_view_moves_the_other_planes_to_it() -> None:
    volume = phantom("oblique")
    ijk = tuple(int(v) for v in marker_index(volume))
    axial = view_geometry(volume, "axial")
    image = render_view(volume, "axial", ijk[2], WHITE)
    col, row = _centroid(image)
    clicked = screen_to_voxel(axial, ijk[2], col, row)
    targets = linked_indices(clicked)
    assert targets["axial"] == ijk[2]
    for plane in ("coronal", "sagittal"):
        view = render_view(volume, plane, targets[plane], WHITE)
        assert (view[:, :, 0] == 255).any(), f"the {plane} view at the clicked point misses the marker"


@pytest.mark.parametrize("grid", list(GRIDS))
def test_readout_ras_is_the_affine_applied_to_the_voxel_index(grid: str) -> None:
    volume = phantom(grid)
    ijk = marker_index(volume)
    result = readout(volume, ijk)
    np.testing.assert_allclose(result.ras_mm, apply_affine(volume.affine, ijk), atol=1e-9)
    assert result.value == MARKER and result.unit == "HU"
    # Near the marker's centre the readout position is within a voxel of where it was placed.
    assert np.linalg.norm(np.array(result.ras_mm) - OFFSET_MM) <= max(volume.spacing_mm)
    assert "HU" in result.text() and "RAS" in result.text()
    with pytest.raises(CoreError, match="outside the volume"):
        readout(volume, (volume.spatial_shape[0], 0, 0))


def _ramp_volume() -> Volume:
    rng = np.random.default_rng(7)
    array = rng.integers(-1000, 3000, size=(30, 34, 40), dtype=np.int16)
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    return Volume(array, affine, modality="CT", unit="HU")


@pytest.mark.parametrize("mode,reduce", [("max", np.max), ("min", np.min), ("mean", np.mean)])
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_slab_projection_equals_numpy_over_the_slab(mode: str, reduce, plane: str) -> None:
    volume = _ramp_volume()
    geometry = view_geometry(volume, plane)
    thickness = 6.0
    count = max(1, round(thickness / geometry.slice_spacing_mm))
    index = 12
    start = index - (count - 1) // 2
    values = view_values(volume, plane, index, slab=Slab(mode, thickness))
    rows, cols = geometry.native_shape
    for row in range(0, rows, 3):
        for col in range(0, cols, 4):
            voxel = list(screen_to_voxel(view_geometry(volume, plane, square_pixels=False), index, col, row))
            line = []
            for s in range(start, start + count):
                voxel[geometry.slice_axis] = s
                line.append(volume.array[tuple(voxel)])
            assert values[row, col] == pytest.approx(reduce(np.array(line, dtype=np.float64)), rel=1e-6)


def test_slab_is_clipped_at_the_ends_and_a_thin_slab_is_the_slice() -> None:
    volume = _ramp_volume()
    thin = view_values(volume, "axial", 0, slab=Slab("max", 0.1))
    np.testing.assert_array_equal(thin, view_values(volume, "axial", 0))
    edge = view_values(volume, "axial", 0, slab=Slab("max", 15.0))  # 10 slices, 4 before slice 0
    geometry = view_geometry(volume, "axial", square_pixels=False)
    i, j, _ = screen_to_voxel(geometry, 0, 3, 5)
    assert edge[5, 3] == volume.array[i, j, 0:6].max()


def test_label_overlay_at_half_resolution_aligns_through_world_coordinates() -> None:
    base = phantom("axial")
    # The same sphere as a label map on a half-resolution grid acquired sagittally.
    columns, _, _ = GRIDS["sagittal"]
    shape = (32, 35, 10)
    spacing = (1.6, 1.6, 6.0)
    raw_affine = _affine(columns, spacing, shape)
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    world = apply_affine(raw_affine, np.stack([ii, jj, kk], axis=-1))
    raw = np.where(np.linalg.norm(world - OFFSET_MM, axis=-1) <= RADIUS_MM, 7, 0).astype(np.uint8)
    array, affine = reorient_to_ras(raw, raw_affine)
    labels = Volume(np.ascontiguousarray(array), affine)
    assert label_values(labels) == [7]
    ijk = marker_index(base)
    for plane, index in linked_indices(ijk).items():
        sampled = sample_labels(base, labels, plane, index)
        marker = render_view(base, plane, index, WHITE)[:, :, 0] == 255
        assert set(np.unique(sampled)) <= {0, 7}
        overlap = (sampled == 7) & marker
        union = (sampled == 7) | marker
        assert overlap.sum() / union.sum() > 0.6, plane  # same place despite 2x coarser voxels


@pytest.mark.parametrize("grid", ["sagittal", "oblique", "mirrored"])
def test_label_overlay_on_an_unreoriented_flipped_grid_matches_exactly(grid: str) -> None:
    base = phantom(grid)
    # The label map is the marker itself stored in another voxel order: flipped and permuted,
    # with the affine describing the same world positions.
    flipped = base.array[::-1, :, ::-1].transpose(2, 0, 1)
    to_old = np.zeros((4, 4))
    ni, _, nk = base.spatial_shape
    # new (a, b, c) = old (ni-1-b, c, nk-1-a)
    to_old[0, 1] = -1
    to_old[0, 3] = ni - 1
    to_old[1, 2] = 1
    to_old[2, 0] = -1
    to_old[2, 3] = nk - 1
    to_old[3, 3] = 1
    labels = Volume((np.ascontiguousarray(flipped) == MARKER).astype(np.uint8) * 3, base.affine @ to_old)
    ijk = marker_index(base)
    for plane, index in linked_indices(ijk).items():
        sampled = sample_labels(base, labels, plane, index)
        marker = render_view(base, plane, index, WHITE)[:, :, 0] == 255
        np.testing.assert_array_equal(sampled == 3, marker)


def test_label_overlay_is_drawn_in_colour_with_the_chosen_opacity() -> None:
    base = phantom("axial")
    labels = Volume((base.array == MARKER).astype(np.uint8) * 2, base.affine)
    index = int(marker_index(base)[2])
    plain = render_view(base, "axial", index, Window(center=2000.0, width=100.0))  # all black
    assert plain.shape[2] == 1 and plain.max() == 0
    red = (200, 0, 0)
    shown = render_view(
        base, "axial", index, Window(center=2000.0, width=100.0),
        overlays=[LabelOverlay(labels, opacity=0.5, colors={2: red})],
    )  # fmt: skip
    mask = render_view(base, "axial", index, WHITE)[:, :, 0] == 255
    assert shown.shape[2] == 3
    np.testing.assert_array_equal(shown[mask], np.tile([100, 0, 0], (int(mask.sum()), 1)))
    assert shown[~mask].max() == 0


def test_threshold_overlay_marks_values_in_range() -> None:
    volume = _ramp_volume()
    window = Window(40.0, 400.0)
    shown = render_view(
        volume, "axial", 5, window, square_pixels=False,
        overlays=[ThresholdOverlay(lower=300.0, upper=3000.0, opacity=1.0, color=(0, 255, 0))],
    )  # fmt: skip
    values = view_values(volume, "axial", 5)
    inside = (values >= 300) & (values <= 3000)
    assert np.all(shown[inside] == [0, 255, 0])
    gray = render_view(volume, "axial", 5, window, square_pixels=False)[:, :, 0]
    np.testing.assert_array_equal(shown[~inside][:, 1], gray[~inside])


def test_monochrome1_is_shown_inverted_and_invert_toggles_it_back() -> None:
    volume = _ramp_volume()
    mono1 = Volume(volume.array, volume.affine, display_inverted=True)
    window = Window(500.0, 1000.0)
    normal = render_view(volume, "axial", 3, window)
    np.testing.assert_array_equal(render_view(mono1, "axial", 3, window), 255 - normal)
    np.testing.assert_array_equal(render_view(mono1, "axial", 3, window, invert=True), normal)


def test_rgb_volume_is_shown_in_colour_and_4d_frames_are_selectable() -> None:
    rgb = np.zeros((4, 5, 3, 3), dtype=np.uint8)
    rgb[3, 4, 1] = (255, 0, 0)  # the most right-anterior voxel of slice 1: top-left in radiological axial
    volume = Volume(rgb, np.eye(4), is_rgb=True)
    image = render_view(volume, "axial", 1, Window(128, 256))
    assert image.shape == (5, 4, 3)
    assert tuple(image[0, 0]) == (255, 0, 0) and image[1:].max() == 0
    assert readout(volume, (3, 4, 1)).value == (255.0, 0.0, 0.0)

    series = np.zeros((6, 6, 4, 3), dtype=np.int16)
    for t in range(3):
        series[..., t] = 100 * (t + 1)
    dynamic = Volume(series, np.eye(4))
    for t in range(3):
        frame = render_view(dynamic, "axial", 0, Window(200.0, 200.0), frame=t)
        expected = render_view(Volume(series[..., t].copy(), np.eye(4)), "axial", 0, Window(200.0, 200.0))
        np.testing.assert_array_equal(frame, expected)
        assert readout(dynamic, (1, 1, 1), frame=t).value == 100 * (t + 1)
    with pytest.raises(CoreError, match="frame 3"):
        render_view(dynamic, "axial", 0, Window(200.0, 200.0), frame=3)


def test_wide_integer_and_float_volumes_window_like_int16() -> None:
    volume = _ramp_volume()
    window = Window(40.0, 400.0)
    expected = render_view(volume, "sagittal", 9, window, colormap="hot")
    for dtype in (np.int32, np.int64, np.float32, np.float64):
        other = Volume(volume.array.astype(dtype), volume.affine)
        np.testing.assert_array_equal(render_view(other, "sagittal", 9, window, colormap="hot"), expected)


def test_out_of_range_requests_fail_with_a_message() -> None:
    volume = _ramp_volume()
    with pytest.raises(CoreError, match="axial slice 40 is outside 0..39"):
        render_view(volume, "axial", 40, WHITE)
    with pytest.raises(CoreError, match="unknown plane"):
        render_view(volume, "oblique", 0, WHITE)
    with pytest.raises(CoreError, match="unknown colormap"):
        render_view(volume, "axial", 0, WHITE, colormap="rainbow")
    assert n_slices(volume, "coronal") == 34


def _png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        chunks.append(data[offset + 4 : offset + 8])
        offset += 12 + length
    return chunks


def test_png_is_the_exact_view_without_metadata() -> None:
    volume = phantom("mirrored")
    image = render_view(volume, "coronal", 20, WHITE)
    data = encode_png(image)
    assert set(_png_chunks(data)) == {b"IHDR", b"IDAT", b"IEND"}
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(decoded, image[:, :, 0])
    coloured = render_view(volume, "coronal", 20, WHITE, colormap="viridis")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(coloured)))), coloured)
    jpeg = encode_jpeg(image)
    assert jpeg[:2] == b"\xff\xd8" and b"Exif" not in jpeg


def test_zip_holds_every_slice_of_the_plane_named_by_plane_slice_and_window() -> None:
    volume = phantom("axial")
    window = Window(-600.0, 1500.0)
    data = plane_zip(volume, "sagittal", window)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        assert len(names) == n_slices(volume, "sagittal")
        assert names[0] == "sagittal_s0000_W1500_Lm600.png"
        index = 37
        member = archive.read(f"sagittal_s{index:04d}_W1500_Lm600.png")
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(member))), render_view(volume, "sagittal", index, window)[:, :, 0]
    )


def test_file_names_carry_view_settings_only() -> None:
    name = view_file_name("axial", 7, Window(40.0, 400.0, name="Soft tissue"), frame=2, slab=Slab("max", 10.0))
    assert name == "axial_s0007_W400_L40_t002_max10mm.png"
    assert (
        view_file_name("coronal", 3, Window(0.5, 0.25), suffix="ab/12", ext="zip")
        == "coronal_s0003_W0p25_L0p5_ab12.zip"
    )


def test_histogram_counts_every_value() -> None:
    volume = _ramp_volume()
    counts, edges = histogram(volume, bins=64)
    assert counts.sum() == volume.array.size
    np.testing.assert_array_equal(counts, np.histogram(volume.array, bins=edges)[0])
    small = Volume(np.arange(27, dtype=np.uint8).reshape(3, 3, 3) % 5, np.eye(4))
    counts, edges = histogram(small)
    np.testing.assert_array_equal(edges, np.arange(-0.5, 5.0, 1.0))
    assert counts.tolist() == [6, 6, 5, 5, 5]


def test_totalsegmentator_label_map_in_dcm2niix_order_aligns_with_the_ct_read_from_dicom() -> None:
    """Real data: the seg is stored LAS (y flipped against DICOM rows); only world alignment gets it right."""
    import nibabel as nib

    from core.io import scan
    from core.sources import read_paths

    folder = data_path("ct_siemens_20sl_uncompressed_derived", "dicom")
    seg_path = data_path("ct_siemens_j2k_20sl", "extra", "example_seg_dicom.nii.gz")
    ct = scan(read_paths([folder])).series[0].load()
    image = nib.load(seg_path)
    raw = np.asarray(image.dataobj).astype(np.uint8)
    array, affine = reorient_to_ras(raw, image.affine)
    labels = Volume(np.ascontiguousarray(array), affine)
    index = ct.spatial_shape[2] // 2
    sampled = sample_labels(ct, labels, "axial", index)
    # Independent lookup: nibabel's raw (unreoriented) grid and affine, one pixel at a time.
    geometry = view_geometry(ct, "axial")
    inverse = np.linalg.inv(image.affine)
    for row in range(0, geometry.shape[0], 37):
        for col in range(0, geometry.shape[1], 41):
            ijk = screen_to_voxel(geometry, index, col, row)
            voxel = np.rint(apply_affine(inverse, apply_affine(ct.affine, ijk))).astype(int)
            inside = all(0 <= v < n for v, n in zip(voxel, raw.shape))
            assert sampled[row, col] == (raw[tuple(voxel)] if inside else 0)
    # Anatomy agrees: labelled pixels are tissue, not air (a flipped overlay puts ~20 % on air).
    values = view_values(ct, "axial", index)[np.ix_(geometry.row_src, geometry.col_src)]
    labelled = sampled > 0
    assert labelled.mean() > 0.05
    assert (values[labelled] < -900).mean() < 0.02


def test_png_encoder_round_trips_odd_sizes_and_random_content() -> None:
    rng = np.random.default_rng(11)
    for shape in [(1, 1), (1, 7), (5, 1), (13, 17), (3, 4, 3), (1, 1, 3), (9, 2, 1)]:
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        decoded = np.asarray(Image.open(io.BytesIO(encode_png(image, compress_level=6))))
        np.testing.assert_array_equal(decoded, image.reshape(decoded.shape))
    with pytest.raises(CoreError, match="uint8"):
        encode_png(np.zeros((2, 2), dtype=np.int16))
    with pytest.raises(CoreError, match="shape"):
        encode_png(np.zeros((2, 2, 4), dtype=np.uint8))


def test_each_label_gets_its_own_colour() -> None:
    labels_array = np.zeros((6, 4, 2), dtype=np.int32)
    labels_array[0:2, :, :] = 3
    labels_array[4:6, :, :] = 70000  # a large label value
    base = Volume(np.zeros((6, 4, 2), dtype=np.int16), np.eye(4))
    labels = Volume(labels_array, np.eye(4))
    colors = {3: (0, 0, 200), 70000: (100, 50, 0)}
    image = render_view(base, "axial", 0, Window(1000.0, 10.0), overlays=[LabelOverlay(labels, 1.0, colors)])
    geometry = view_geometry(base, "axial")
    for row in range(image.shape[0]):
        for col in range(image.shape[1]):
            i, j, k = screen_to_voxel(geometry, 0, col, row)
            expected = colors.get(int(labels_array[i, j, k]), (0, 0, 0))
            assert tuple(image[row, col]) == expected
    assert label_values(labels) == [3, 70000]


def test_all_slices_of_a_plane_zip_in_a_worker_equal_the_zip_made_here(monkeypatch) -> None:  # noqa: ANN001
    import core.render
    from core.render import plane_zip
    from core.sample import make_sample_ct
    from core.worker import run_in_worker

    volume = make_sample_ct((48, 40, 12))
    expected = plane_zip(volume, "coronal", Window(40.0, 400.0), radiological=False, colormap="hot")

    def tripwire(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("rendered in the server process")

    monkeypatch.setattr(core.render, "render_view", tripwire)  # the worker has its own copy
    assert (
        run_in_worker(plane_zip, volume, "coronal", Window(40.0, 400.0), radiological=False, colormap="hot") == expected
    )
