"""Surfaces: ellipsoids of known volume and area under oblique, anisotropic and mirrored affines,
the real CT and label map, smoothing, decimation, figures, and every export format read back
by an independent reader (numpy-stl, trimesh)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from core.errors import EmptySurfaceError, LimitError
from core.io import scan
from core.mask import MaskCleanup, label_counts, mask_from_full
from core.mesh import (
    Mesh,
    MeshLimits,
    MeshRequest,
    build_meshes,
    decimate_mesh,
    downsample,
    edge_counts,
    label_surfaces,
    mask_to_surface,
    mesh_figures,
    preview_figure,
    preview_meshes,
    repair_mesh,
    smooth_mesh,
    threshold_surface,
)
from core.mesh_export import export_vertices, format_from_suffix, mesh_to_bytes, meshes_to_zip
from core.sample import make_sample_ct
from core.sources import read_paths
from core.volume import Volume
from tests.conftest import data_path

SEMI_AXES = np.array([22.0, 15.0, 11.0])  # mm
ELLIPSOID_ROTATION = Rotation.from_euler("zyx", [10, 25, -5], degrees=True).as_matrix()
OBLIQUE = Rotation.from_euler("xyz", [20, -15, 35], degrees=True).as_matrix()

# Voxel -> mm linear parts, all with voxels of at most 1 mm.
AFFINES = {
    "isotropic": np.diag([1.0, 1.0, 1.0]),
    "anisotropic": np.diag([0.7, 0.9, 1.0]),
    "mirrored": np.diag([-0.8, 0.9, 1.0]),  # det < 0: winding must be flipped
    "oblique": OBLIQUE @ np.diag([0.8, 0.9, 1.0]),
    "oblique mirrored": OBLIQUE @ np.diag([0.8, -0.9, 0.6]),
}


def thomsen_area(a: float, b: float, c: float) -> float:
    """Knud Thomsen's ellipsoid area approximation: relative error at most 1.061 %."""
    p = 1.6075
    return 4 * np.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)


def ellipsoid_volume(linear: np.ndarray, shape=(80, 80, 80), dtype=np.int16, scale=1000.0) -> tuple[Volume, np.ndarray]:
    """A "CT" whose values are ``scale * (1 - rho)``, rho the ellipsoid radius: >= 0 inside.

    Returns the volume and the ellipsoid centre in world mm.
    """
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [-30.0, 40.0, -800.0]
    centre = linear @ (np.array(shape) / 2.0) + affine[:3, 3]
    ijk = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    local = (ijk @ linear.T + affine[:3, 3] - centre) @ ELLIPSOID_ROTATION
    rho = np.sqrt(((local / SEMI_AXES) ** 2).sum(axis=1)).reshape(shape)
    values = np.clip(scale * (1.0 - rho), -1000, 2000)
    values = np.round(values).astype(dtype) if np.issubdtype(dtype, np.integer) else values.astype(dtype)
    return Volume(values, affine, modality="CT", unit="HU"), centre


def analytic_bounds(centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    half = np.sqrt(((ELLIPSOID_ROTATION * SEMI_AXES) ** 2).sum(axis=1))
    return centre - half, centre + half


def face_normals(mesh: Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tri = mesh.vertices[mesh.faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    return cross, tri.mean(axis=1), np.linalg.norm(cross, axis=1) / 2


def half_voxel_world(affine: np.ndarray) -> np.ndarray:
    """Half the world extent of one voxel along x, y, z."""
    return np.abs(affine[:3, :3]).sum(axis=1) / 2


def _load(*parts: str) -> Volume:
    result = scan(read_paths([data_path(*parts)]))
    assert result.series, [e.message for e in result.errors]
    return result.series[0].load()


# --- ellipsoids ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(AFFINES))
def test_ellipsoid_volume_area_bounds_and_outward_normals(name: str) -> None:
    volume, centre = ellipsoid_volume(AFFINES[name])
    mesh, mask = threshold_surface(volume, 0)
    figures = mesh_figures(mesh)
    exact_volume = 4 / 3 * np.pi * SEMI_AXES.prod()
    assert figures.volume_ml * 1000 == pytest.approx(exact_volume, rel=0.01)
    # Thomsen's formula is within 1.061 %; marching cubes adds well under 1 % at these sizes.
    assert figures.area_cm2 * 100 == pytest.approx(thomsen_area(*SEMI_AXES), rel=0.02)
    assert figures.watertight and figures.manifold and figures.components == 1

    # Outward: positive signed volume, and every triangle's normal points away from the centre.
    cross, centroids, areas = face_normals(mesh)
    outward = np.einsum("ij,ij->i", cross, centroids - centre) > 0
    assert outward[areas > 1e-6].all()

    # Bounds: sub-voxel close to the analytic ellipsoid, and within half a voxel of the voxel
    # cubes of the mask (its voxel centres +- half a voxel).
    low, high = np.array(figures.bounds_mm[0]), np.array(figures.bounds_mm[1])
    exact_low, exact_high = analytic_bounds(centre)
    voxel = 2 * half_voxel_world(volume.affine)
    np.testing.assert_array_less(np.abs(low - exact_low), 0.1 * voxel)
    np.testing.assert_array_less(np.abs(high - exact_high), 0.1 * voxel)
    mask_low, mask_high = (np.array(b) for b in mask.world_bounds_mm())
    half = half_voxel_world(volume.affine)
    np.testing.assert_array_less(np.abs(low - (mask_low - half)), half + 1e-9)
    np.testing.assert_array_less(np.abs(high - (mask_high + half)), half + 1e-9)


def test_float_data_and_label_style_binary_surfaces() -> None:
    volume, _ = ellipsoid_volume(AFFINES["oblique"], dtype=np.float32, scale=1.0)
    exact_volume = 4 / 3 * np.pi * SEMI_AXES.prod()
    mesh, mask = threshold_surface(volume, 0.0)
    assert mesh_figures(mesh).volume_ml * 1000 == pytest.approx(exact_volume, rel=0.01)
    # Without the values (a label map), vertices sit half-way between voxel centres: the
    # volume is still close, the area is not (terraces), smoothing brings it back.
    binary = mask_to_surface(mask)
    figures = mesh_figures(binary)
    assert figures.volume_ml * 1000 == pytest.approx(exact_volume, rel=0.01)
    assert figures.watertight and figures.manifold and figures.volume_ml > 0
    smoothed = mesh_figures(smooth_mesh(binary, 15))
    assert smoothed.triangles == figures.triangles and smoothed.watertight
    assert smoothed.volume_ml == pytest.approx(figures.volume_ml, rel=0.01)
    exact_area = thomsen_area(*SEMI_AXES)
    assert abs(smoothed.area_cm2 * 100 - exact_area) < abs(figures.area_cm2 * 100 - exact_area)


def test_upper_threshold_makes_a_shell() -> None:
    volume, _ = ellipsoid_volume(AFFINES["anisotropic"])
    # 0 <= 1000 (1 - rho) <= 500 is 0.5 <= rho <= 1: the ellipsoid minus its half-size core.
    mesh, _ = threshold_surface(volume, 0, 500)
    figures = mesh_figures(mesh)
    exact = 4 / 3 * np.pi * SEMI_AXES.prod() * (1 - 0.5**3)
    assert figures.volume_ml * 1000 == pytest.approx(exact, rel=0.01)
    assert figures.components == 2 and figures.watertight  # outer and inner surface


def test_cleanup_keeps_subvoxel_accuracy() -> None:
    """Removing an island and filling a cavity must not move the remaining surface."""
    volume, _ = ellipsoid_volume(AFFINES["isotropic"], shape=(80, 80, 80))
    values = np.array(volume.array)
    values[2:6, 2:6, 2:6] = 900  # a separate island
    values[36:44, 36:44, 36:44] = -1000  # an enclosed cavity of 512 voxels
    noisy = Volume(values, volume.affine, modality="CT", unit="HU")
    exact = 4 / 3 * np.pi * SEMI_AXES.prod()
    raw = mesh_figures(threshold_surface(noisy, 0)[0])
    assert raw.components == 3
    cleaned_mesh, cleaned_mask = threshold_surface(noisy, 0, cleanup=MaskCleanup(keep_largest=1, fill_cavities=True))
    cleaned = mesh_figures(cleaned_mesh)
    assert cleaned_mask.cleaned and cleaned.components == 1 and cleaned.watertight
    assert cleaned.volume_ml * 1000 == pytest.approx(exact, rel=0.01)


def test_caps_close_the_surface_at_the_volume_border() -> None:
    volume, _ = ellipsoid_volume(AFFINES["anisotropic"], shape=(50, 80, 80))  # cut at i = 0 and i = 49
    capped_mesh, mask = threshold_surface(volume, 0)
    capped = mesh_figures(capped_mesh)
    assert mask.touches_border() and capped.watertight and capped.manifold and capped.volume_ml > 0
    # The cap is half a voxel beyond the last voxel centres (the voxel faces).
    x_spacing = volume.affine[0, 0]
    assert capped.bounds_mm[0][0] == pytest.approx(volume.affine[0, 3] - x_spacing / 2, abs=1e-4)
    assert capped.bounds_mm[1][0] == pytest.approx(volume.affine[0, 3] + 49.5 * x_spacing, abs=1e-4)

    open_mesh = mask_to_surface(mask, intensities=volume.array, cap_borders=False)
    opened = mesh_figures(open_mesh)
    assert not opened.watertight and opened.boundary_edges > 0 and opened.manifold
    # Every open edge lies on a border plane of the grid (i = 0 or i = 49).
    f = open_mesh.faces.astype(np.int64)
    start, end = f.reshape(-1), f[:, [1, 2, 0]].reshape(-1)
    key = np.minimum(start, end) * open_mesh.n_vertices + np.maximum(start, end)
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    rim = np.unique(np.concatenate([start, end])[np.tile(counts[inverse] == 1, 2)])
    ijk = (open_mesh.vertices[rim] - volume.affine[:3, 3]) @ np.linalg.inv(volume.affine[:3, :3]).T
    assert np.all(np.isclose(ijk[:, 0], 0, atol=1e-4) | np.isclose(ijk[:, 0], 49, atol=1e-4))


def test_downsampling_keeps_the_geometry() -> None:
    volume, centre = ellipsoid_volume(AFFINES["isotropic"])
    values, affine = downsample(volume.array, volume.affine, 2)
    assert values.shape == (40, 40, 40)
    np.testing.assert_allclose(affine[:3, :3], 2 * volume.affine[:3, :3])
    mesh, _ = threshold_surface(volume, 0, downsample_factor=2)
    figures = mesh_figures(mesh)
    assert figures.volume_ml * 1000 == pytest.approx(4 / 3 * np.pi * SEMI_AXES.prod(), rel=0.02)
    exact_low, _ = analytic_bounds(centre)
    np.testing.assert_array_less(np.abs(np.array(figures.bounds_mm[0]) - exact_low), 0.5)


def test_nan_voxels_are_outside_and_binary_volumes_threshold() -> None:
    volume, _ = ellipsoid_volume(AFFINES["isotropic"], dtype=np.float32, scale=1.0)
    values = np.array(volume.array)
    values[40:, :, :] = np.nan  # half the field of view was not reconstructed
    mesh, _ = threshold_surface(Volume(values, volume.affine), 0.0)
    figures = mesh_figures(mesh)
    assert figures.watertight and np.isfinite(mesh.vertices).all()
    assert figures.volume_ml * 1000 == pytest.approx(4 / 3 * np.pi * SEMI_AXES.prod() / 2, rel=0.03)
    binary = Volume(np.asarray(volume.array) > 0, volume.affine)
    assert mesh_figures(threshold_surface(binary, 1)[0]).watertight


def test_empty_and_over_the_limit() -> None:
    volume, _ = ellipsoid_volume(AFFINES["isotropic"], shape=(40, 40, 40))
    with pytest.raises(EmptySurfaceError, match="selects no voxels"):
        threshold_surface(volume, 5000)
    with pytest.raises(LimitError, match="cap of 10"):
        threshold_surface(volume, 0, limits=MeshLimits(max_triangles=10))


# --- real data ----------------------------------------------------------------------


def test_real_ct_bone_surface() -> None:
    """Siemens CT, 512x512x20: bone at 300 HU.

    Checked: the surface is non-empty; with border caps (default) it is watertight and
    manifold; without caps the only open edges lie on the grid's border planes (the bone
    is cut by the first and last slice), i.e. it is closed wherever the mask does not
    touch the volume border.
    """
    volume = _load("ct_siemens_20sl_uncompressed_derived", "dicom")
    mesh, mask = threshold_surface(volume, 300)
    figures = mesh_figures(mesh)
    assert figures.triangles > 10_000 and figures.volume_ml > 10
    assert figures.watertight and figures.manifold
    opened = mask_to_surface(mask, intensities=volume.array, cap_borders=False)
    f = opened.faces.astype(np.int64)
    start, end = f.reshape(-1), f[:, [1, 2, 0]].reshape(-1)
    key = np.minimum(start, end) * opened.n_vertices + np.maximum(start, end)
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    assert counts.max() == 2
    rim = np.unique(np.concatenate([start, end])[np.tile(counts[inverse] == 1, 2)])
    assert len(rim) > 0  # the spine is cut by the first and last slice
    ijk = (opened.vertices[rim] - volume.affine[:3, 3]) @ np.linalg.inv(volume.affine[:3, :3]).T
    shape = np.array(volume.spatial_shape) - 1
    on_border = np.isclose(ijk, 0, atol=1e-3) | np.isclose(ijk, shape, atol=1e-3)
    assert on_border.any(axis=1).all()


def test_real_ct_decimated_stays_closed() -> None:
    volume = _load("ct_siemens_20sl_uncompressed_derived", "dicom")
    mesh, _ = threshold_surface(volume, 300)
    before = mesh_figures(mesh)
    reduced = decimate_mesh(mesh, fraction=0.2)
    after = mesh_figures(reduced)
    assert reduced.n_triangles < 0.3 * mesh.n_triangles
    assert after.watertight and after.manifold
    # Small islands shrink or vanish when decimated; the bulk keeps its volume.
    assert after.volume_ml == pytest.approx(before.volume_ml, rel=0.05)


def test_label_map_gives_one_closed_mesh_per_label() -> None:
    seg = _load("nifti_ct_with_labelmap", "example_seg.nii.gz")
    counts = label_counts(seg.array)
    meshes = label_surfaces(seg, scheme="TotalSegmentator (task total, v2)")
    assert len(meshes) == len(counts) == 41
    assert [m.name.split()[0] for m in meshes] == [str(v) for v in sorted(counts)]
    assert meshes[4].name == "5 liver"
    voxel_ml = abs(np.linalg.det(seg.affine[:3, :3])) / 1000
    for mesh, label in zip(meshes, sorted(counts), strict=True):
        figures = mesh_figures(mesh)
        assert figures.watertight and figures.manifold and figures.volume_ml > 0, mesh.name
        # Binary surfaces run through the voxel faces' midpoints and trim the cubes' corners: never more
        # than the voxels' volume, and close to it for big labels.
        ratio = figures.volume_ml / (counts[label] * voxel_ml)
        assert ratio <= 1 + 1e-9, mesh.name
        if counts[label] >= 5000:
            assert ratio > 0.97, mesh.name
    # Same world placement as the voxels: the liver mesh sits within half a voxel of its voxel cubes.
    liver_mask = mask_from_full(seg.array == 5, seg.affine)
    low, high = (np.array(b) for b in liver_mask.world_bounds_mm())
    half = half_voxel_world(seg.affine)
    bounds = mesh_figures(meshes[4]).bounds_mm
    np.testing.assert_array_less(np.abs(np.array(bounds[0]) - (low - half)), half + 1e-6)
    np.testing.assert_array_less(np.abs(np.array(bounds[1]) - (high + half)), half + 1e-6)


# --- smoothing, decimation, repair, figures ------------------------------------------


def test_decimation_to_a_fraction_and_a_count() -> None:
    volume, _ = ellipsoid_volume(AFFINES["oblique"])
    mesh, _ = threshold_surface(volume, 0)
    exact = 4 / 3 * np.pi * SEMI_AXES.prod()
    for reduced in (decimate_mesh(mesh, fraction=0.1), decimate_mesh(mesh, target_triangles=1000)):
        figures = mesh_figures(reduced)
        assert figures.watertight and figures.manifold and figures.components == 1
        assert figures.volume_ml * 1000 == pytest.approx(exact, rel=0.01)
    assert abs(decimate_mesh(mesh, fraction=0.1).n_triangles - 0.1 * mesh.n_triangles) < 0.02 * mesh.n_triangles
    assert abs(decimate_mesh(mesh, target_triangles=1000).n_triangles - 1000) <= 20
    with pytest.raises(ValueError):
        decimate_mesh(mesh, fraction=1.5)


def _cube(size: float = 10.0, offset=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    v = np.array([[x, y, z] for x in (0, size) for y in (0, size) for z in (0, size)], dtype=float) + offset
    faces = np.array(
        [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
         [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]]
    )  # fmt: skip
    return v, faces


def test_figures_of_a_cube() -> None:
    v, f = _cube()
    figures = mesh_figures(Mesh(v, f))
    assert figures.volume_ml == pytest.approx(1.0) and figures.area_cm2 == pytest.approx(6.0)
    assert figures.watertight and figures.manifold and figures.components == 1
    assert figures.bounds_mm == ((0, 0, 0), (10, 10, 10))
    assert figures.bounds_in("LPS") == ((-10, -10, 0), (0, 0, 10))
    inside_out = mesh_figures(Mesh(v, f[:, ::-1]))
    assert inside_out.volume_ml == pytest.approx(-1.0) and inside_out.manifold
    one_flipped = f.copy()
    one_flipped[0] = one_flipped[0, ::-1]
    assert not mesh_figures(Mesh(v, one_flipped)).manifold
    holed = mesh_figures(Mesh(v, f[1:]))
    assert not holed.watertight and holed.boundary_edges == 3
    v2, f2 = _cube(offset=(20, 0, 0))
    assert mesh_figures(Mesh(np.vstack([v, v2]), np.vstack([f, f2 + 8]))).components == 2


def test_repair_splits_sheets_sharing_an_edge_and_fills_small_holes() -> None:
    # Two cubes sharing one edge: that edge has four triangles (non-manifold).
    v1, f1 = _cube()
    v2, f2 = _cube(offset=(10, 10, 0))
    vertices = np.vstack([v1, v2])
    faces = np.vstack([f1, f2 + 8])
    shared = [(7 - 1, 8 + 0), (7, 8 + 1)]  # cube 1 corner (10,10,0)/(10,10,10) = cube 2 corner (10,10,0)/(10,10,10)
    for a, b in shared:
        np.testing.assert_allclose(vertices[a], vertices[b])
        faces[faces == b] = a
    assert edge_counts(faces, len(vertices))[2] == 1  # one edge with 4 triangles
    fixed_v, fixed_f = repair_mesh(vertices, faces)
    figures = mesh_figures(Mesh(fixed_v, fixed_f))
    assert figures.watertight and figures.manifold and figures.volume_ml == pytest.approx(2.0)
    # A hole of one missing triangle is closed; unless its vertices are marked as a real opening.
    v, f = _cube()
    closed_v, closed_f = repair_mesh(v, f[1:], max_hole_edges=8)
    assert mesh_figures(Mesh(closed_v, closed_f)).watertight
    assert mesh_figures(Mesh(closed_v, closed_f)).volume_ml == pytest.approx(1.0)
    kept_v, kept_f = repair_mesh(v, f[1:], max_hole_edges=8, keep_open=v[f[0]])
    assert not mesh_figures(Mesh(kept_v, kept_f)).watertight


def test_build_meshes_warns_about_faces_and_islands() -> None:
    ct = make_sample_ct((96, 96, 48))
    skin = build_meshes(ct, MeshRequest(lower=-500.0, keep_fraction=0.5))
    assert any("face" in w for w in skin.warnings)
    assert skin.figures[0].watertight and set(skin.timings_s) >= {"mask", "surface", "decimation", "figures"}
    bone = build_meshes(ct, MeshRequest(lower=300.0, smooth_iterations=10))
    assert not any("face" in w for w in bone.warnings)
    labels = build_meshes(
        Volume(np.uint8(ct.array > 300) + np.uint8(ct.array > 1000), ct.affine), MeshRequest(labels=())
    )
    assert [m.name for m in labels.meshes] == ["label 1", "label 2"]


def test_preview_is_capped_and_light() -> None:
    volume, _ = ellipsoid_volume(AFFINES["isotropic"])
    mesh, _ = threshold_surface(volume, 0)
    small = preview_meshes([mesh, mesh], max_triangles=2000)
    assert sum(m.n_triangles for m in small) <= 2100
    figure = preview_figure(small, space="LPS")
    assert len(figure.data) == 2 and figure.data[0].type == "mesh3d"
    np.testing.assert_allclose(np.asarray(figure.data[0].x), -small[0].vertices[:, 0], rtol=1e-6)
    assert len(figure.to_json()) < 200_000


# --- export, read back by independent readers ----------------------------------------


@pytest.fixture(scope="module")
def export_mesh() -> Mesh:
    volume, _ = ellipsoid_volume(AFFINES["oblique mirrored"], shape=(60, 60, 60))
    mesh, _ = threshold_surface(volume, 200)
    return decimate_mesh(mesh, target_triangles=3000)


@pytest.mark.parametrize("space", ["LPS", "RAS"])
def test_stl_binary_and_ascii_read_back_with_numpy_stl(export_mesh: Mesh, space: str, tmp_path) -> None:
    from stl import mesh as stl_mesh

    expected = export_vertices(export_mesh, space)[export_mesh.faces]
    for fmt in ("stl", "stl-ascii"):
        path = tmp_path / f"m-{fmt}.stl"
        path.write_bytes(mesh_to_bytes(export_mesh, fmt, space=space))
        read = stl_mesh.Mesh.from_file(str(path), calculate_normals=False)  # keep the stored normals
        np.testing.assert_array_equal(read.vectors, expected)
        # Stored normals agree with the winding and point outward (positive volume).
        unit = np.cross(expected[:, 1] - expected[:, 0], expected[:, 2] - expected[:, 0])
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        np.testing.assert_allclose(read.normals, unit, atol=1e-5)
        assert read.get_mass_properties()[0] > 0
    header = (tmp_path / "m-stl.stl").read_bytes()[:80]
    assert not header.startswith(b"solid") and f"SPACE={space}".encode() in header
    ras = export_vertices(export_mesh, "RAS")
    lps = export_vertices(export_mesh, "LPS")
    np.testing.assert_array_equal(lps, ras * np.float32([-1, -1, 1]))


@pytest.mark.parametrize("fmt", ["obj", "ply"])
def test_obj_and_ply_read_back_with_trimesh(export_mesh: Mesh, fmt: str) -> None:
    import trimesh

    data = mesh_to_bytes(export_mesh, fmt, space="LPS", scale=0.5)
    read = trimesh.load(io.BytesIO(data), file_type=fmt, process=False)
    np.testing.assert_array_equal(np.asarray(read.vertices, dtype=np.float32), export_vertices(export_mesh, "LPS", 0.5))
    np.testing.assert_array_equal(np.asarray(read.faces), export_mesh.faces)
    assert read.is_watertight and read.is_winding_consistent and read.volume > 0
    assert read.volume == pytest.approx(mesh_figures(export_mesh).volume_ml * 1000 * 0.125, rel=1e-4)


def test_zip_of_label_meshes_and_format_names() -> None:
    seg = _load("nifti_ct_with_labelmap", "example_seg.nii.gz")
    meshes = label_surfaces(seg, [5, 10], scheme="TotalSegmentator (task total, v2)")
    archive = zipfile.ZipFile(io.BytesIO(meshes_to_zip(meshes, "stl")))
    assert archive.namelist() == ["tomoforge-5_liver.stl", "tomoforge-10_lung_upper_lobe_left.stl"]
    assert format_from_suffix("a/b/BONE.STL") == "stl" and format_from_suffix("x.stl", ascii_stl=True) == "stl-ascii"
    with pytest.raises(ValueError, match="use .stl, .obj or .ply"):
        format_from_suffix("x.vtk")
