"""AppTest of the Mesh page: the sample's bone mesh with its figures, a skin surface's face warning,
and one mesh per label of an uploaded TotalSegmentator label map."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from tests.conftest import REPO, data_path


def open_mesh_page(upload: list | None = None) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.run()
    if upload is None:
        at.button[0].click().run()  # "Open sample scan"
    else:
        at.file_uploader(key="upload_files").set_value(
            [(f.name, f.read_bytes(), "application/octet-stream") for f in upload]
        )
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


def test_sample_bone_mesh_with_figures() -> None:
    at = open_mesh_page()
    assert at.radio(key="mesh_mode").value == "Threshold"
    assert at.selectbox(key="mesh_preset").value == "Bone"
    assert at.number_input(key="mesh_lower").value == 226
    [overlay] = [e for e in at.main if type(e).__name__ == "Image"]  # the slice with the live threshold
    assert "226" in overlay.proto.imgs[0].caption and "3071" in overlay.proto.imgs[0].caption
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
