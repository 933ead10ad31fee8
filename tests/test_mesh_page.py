"""AppTest of the Mesh page: the sample's bone mesh with its figures, a skin surface's face warning,
one mesh per label of an uploaded TotalSegmentator label map; meshing in a worker process (a crash
there is a message), 2D images, constant images, download names unique per session.

Also tests :func:`core.mesh.build_meshes_and_preview` and :func:`core.mesh.read_label_map`, the
worker jobs of the Mesh and View pages.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

import core.mesh
import core.worker
from core.errors import CoreError, UnsupportedFileError
from core.mesh import (
    DEFAULT_MESH_LIMITS,
    MeshLimits,
    MeshRequest,
    build_meshes,
    build_meshes_and_preview,
    preview_meshes,
    read_label_map,
)
from core.sample import make_sample_ct
from core.sources import Source
from tests.conftest import REPO, data_path
from tests.test_isolation import _run_recording_downloads


def open_mesh_page(upload: list[Path] | None = None, files: list[tuple[str, bytes]] | None = None) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.run()
    if upload is None and files is None:
        at.button[0].click().run()  # "Open sample scan"
    else:
        named = [(f.name, f.read_bytes()) for f in upload or []] + list(files or [])
        at.file_uploader(key="upload_files").set_value([(n, d, "application/octet-stream") for n, d in named])
        at.run()
    assert not at.exception
    at.switch_page("pages/mesh.py")
    at.run()
    assert not at.exception, at.exception
    return at


def build(at: AppTest) -> None:
    [button] = [b for b in at.button if b.label == "Build mesh"]
    button.click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


@pytest.fixture
def no_meshing_in_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make meshing in the test (= server) process fail; a worker process imports its own, untouched copy."""

    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError("build_meshes ran in the server process; it belongs in a worker process")

    monkeypatch.setattr(core.mesh, "build_meshes", tripwire)


def crash_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every job started through core.worker.run_in_worker runs os.abort instead: a real crash of the worker."""
    real = core.worker.run_in_worker

    def crashing(fn: object, *args: object, limits: object = core.worker.DEFAULT_WORKER_LIMITS, what: str = "",
                 **kwargs: object) -> object:  # fmt: skip
        return real(os.abort, limits=limits, what=what)

    monkeypatch.setattr(core.worker, "run_in_worker", crashing)


def nifti(values: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    return nib.Nifti1Image(values, np.eye(4) if affine is None else affine).to_bytes()


def test_sample_bone_mesh_with_figures(no_meshing_in_the_server: None) -> None:
    at = open_mesh_page()
    assert at.radio(key="mesh_mode").value == "Threshold"
    assert at.selectbox(key="mesh_preset").value == "Bone"
    assert at.number_input(key="mesh_lower").value == 226
    [overlay] = [e for e in at.main if type(e).__name__ == "Image"]  # the slice with the live threshold
    assert "226" in overlay.proto.imgs[0].caption and "3071" in overlay.proto.imgs[0].caption
    assert "R left, A up" in overlay.proto.imgs[0].caption  # radiological, as on the View page
    build(at)
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Triangles"].replace(",", "")) > 10_000
    assert float(metrics["Volume"].split()[0]) > 10
    assert metrics["Watertight"] == "yes" and metrics["Manifold"] == "yes"
    table = at.dataframe[0].value
    assert list(table["mesh"]) == ["surface"]
    assert any(b.label.startswith("Download binary STL") for b in at.get("download_button"))
    assert at.session_state["mesh_result"]["result"].figures[0].watertight


def test_skin_threshold_warns_about_the_face() -> None:
    at = open_mesh_page()
    # The phantom has no partial-volume skin layer, so the soft-tissue range gives the body surface.
    at.selectbox(key="mesh_preset").select("Soft tissue").run()
    assert at.number_input(key="mesh_lower").value == -700
    assert at.number_input(key="mesh_upper").value == 225
    at.number_input(key="mesh_keep").set_value(1).run()
    build(at)
    at.number_input(key="mesh_lower").set_value(-600).run()  # edited by hand: no longer the preset
    assert at.selectbox(key="mesh_preset").value == "Custom"
    assert any("settings changed" in i.value for i in at.info)
    assert any("face" in w.value for w in at.warning)
    assert at.metric[0].label == "Triangles"


def test_label_map_one_mesh_per_label() -> None:
    at = open_mesh_page(upload=[data_path("nifti_ct_with_labelmap", "example_seg.nii.gz")])
    assert at.radio(key="mesh_mode").value == "Label map"
    assert at.selectbox(key="mesh_scheme").value == "TotalSegmentator (task total, v2)"
    at.multiselect(key="mesh_labels").set_value([5, 10, 30]).run()
    build(at)
    table = at.dataframe[0].value
    assert list(table["mesh"]) == ["5 liver", "10 lung_upper_lobe_left", "30 vertebrae_L2"]
    assert set(table["watertight"]) == {"yes"}
    assert any("3 meshes" in b.label for b in at.get("download_button"))


def test_a_crashed_worker_is_a_message_and_the_page_keeps_working(monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_mesh_page()
    with monkeypatch.context() as patch:
        crash_the_worker(patch)
        [button] = [b for b in at.button if b.label == "Build mesh"]
        button.click().run()
        assert not at.exception, at.exception
        assert any("crashed" in e.value and "SIGABRT" in e.value for e in at.error), [e.value for e in at.error]
        assert "mesh_result" not in at.session_state
        assert at.selectbox(key="mesh_preset").value == "Bone"  # the page is still there
    build(at)  # and works again once the worker does
    assert at.metric[0].label == "Triangles"


def test_a_2d_image_has_no_slice_slider_and_meshes_as_a_slab() -> None:
    rows, columns = np.mgrid[:24, :20]
    disc = ((rows - 12.0) ** 2 + (columns - 9.0) ** 2 < 36).astype(np.float32) * 100  # 113 pixels of 1 mm
    at = open_mesh_page(files=[("disc.nii", nifti(disc))])
    assert at.session_state["volumes"][at.session_state["current_id"]].spatial_shape == (24, 20, 1)
    assert not [s for s in at.slider if s.label == "Axial slice"]
    assert any("single slice" in c.value for c in at.caption)
    at.radio(key="mesh_mode").set_value("Threshold").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="mesh_preset").value.startswith("Otsu")
    assert 0 < at.number_input(key="mesh_lower").value < 100
    build(at)
    pixels_ml = float(np.count_nonzero(disc)) / 1000.0  # 1 mm pixels, a slab 1 mm thick
    volume_ml = float(at.metric[1].value.split()[0])
    assert volume_ml == pytest.approx(pixels_ml, rel=0.2)


def test_a_constant_image_falls_back_to_custom_thresholds() -> None:
    at = open_mesh_page(files=[("flat.nii", nifti(np.full((10, 8, 6), 3.5, dtype=np.float32)))])
    assert at.radio(key="mesh_mode").value == "Threshold"
    assert at.selectbox(key="mesh_preset").value == "Custom"  # Otsu has nothing to separate
    assert any("Otsu" in w.value and "same value" in w.value for w in at.warning), [w.value for w in at.warning]
    assert at.number_input(key="mesh_lower").value == 3.5
    at.selectbox(key="mesh_preset").select("Otsu (automatic)").run()  # chosen again: the callback path
    assert not at.exception, at.exception
    assert at.selectbox(key="mesh_preset").value == "Custom"
    assert any("Otsu" in w.value for w in at.warning)
    build(at)  # 3.5 <= value everywhere: the whole box of 10 x 8 x 6 voxels of 1 mm, closed by the border caps
    # The caps pass through the border voxels or their outer faces: 9 x 7 x 5 to 10 x 8 x 6 mm.
    assert 9 * 7 * 5 / 1000.0 - 0.005 <= float(at.metric[1].value.split()[0]) <= 10 * 8 * 6 / 1000.0 + 0.005


def test_two_sessions_never_offer_a_mesh_under_one_name(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = np.indices((20, 18, 8)).astype(np.float64)
    offered = []
    for centre in ((8.0, 9.0, 4.0), (11.0, 9.0, 4.0)):  # the same file name, shape and request; other content
        ball = (((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(axis=0) < 16).astype(np.int16) * 100
        at = open_mesh_page(files=[("scan.nii", nifti(ball))])
        at.radio(key="mesh_mode").set_value("Threshold").run()
        at.number_input(key="mesh_lower").set_value(50.0).run()
        build(at)
        offered.append(_run_recording_downloads(at, "pages/mesh.py", monkeypatch))
    first, second = offered
    assert first and second
    assert not first & second, f"two sessions offer a mesh under the same name {sorted(first & second)}"


# --------------------------------------------------------------------------- the worker jobs


def test_build_meshes_and_preview_in_a_worker_equals_build_meshes_here() -> None:
    volume = make_sample_ct((64, 64, 30))
    request = MeshRequest(lower=300.0, smooth_iterations=5)
    limits = MeshLimits(preview_triangles=2_000)  # small, so that the preview is decimated
    here = build_meshes(volume, request, limits=limits)
    there, preview = core.worker.run_in_worker(build_meshes_and_preview, volume, request, mesh_limits=limits)
    assert there.masks == () and len(here.masks) == 1  # the masks stay in the worker
    np.testing.assert_array_equal(there.meshes[0].faces, here.meshes[0].faces)
    np.testing.assert_allclose(there.meshes[0].vertices, here.meshes[0].vertices)
    assert there.figures == here.figures and there.warnings == here.warnings
    assert here.meshes[0].n_triangles > 2_000
    expected = preview_meshes(here.meshes, 2_000)
    assert [m.n_triangles for m in preview] == [m.n_triangles for m in expected]
    assert sum(m.n_triangles for m in preview) <= 2_000 < DEFAULT_MESH_LIMITS.preview_triangles


def test_read_label_map_returns_the_labels_present() -> None:
    labels = np.zeros((12, 10, 4), dtype=np.uint8)
    labels[2:5, 2:5, 1:3] = 7
    labels[6:9, 5:8, 0:2] = 3
    volume, present = core.worker.run_in_worker(read_label_map, Source("seg.nii", nifti(labels)))
    assert present == [3, 7]
    np.testing.assert_array_equal(volume.array, labels)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("notes.txt", b"not an image", "notes.txt"),
        ("ct.nii", nifti(np.linspace(0.0, 1.0, 60, dtype=np.float32).reshape(5, 4, 3)), "non-integer"),
    ],
    ids=["not-an-image", "fractional-values"],
)
def test_read_label_map_refuses_what_is_not_a_label_map(name: str, data: bytes, message: str) -> None:
    with pytest.raises(CoreError, match=message) as caught:
        read_label_map(Source(name, data))
    assert name == "ct.nii" or isinstance(caught.value, UnsupportedFileError)


@pytest.fixture(autouse=True)
def _no_leftover_workers() -> Iterator[None]:
    yield
    # Every job's process is gone once its answer (or its crash) is in.
    assert not [p for p in multiprocessing.active_children() if p.name == "tomoforge-worker"]
