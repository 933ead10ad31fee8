"""AppTest of the View page: the sample and real scans, sliders, presets, overlays, 4D, MONOCHROME1, RGB;
a label map read in a worker process (a crash there is a message); header values escaped in HTML.

The views are a Streamlit component; AppTest cannot run its JavaScript, but it
sees the bytes the page sends to it (a JSON header and the PNG), so the tests
decode them and compare with ``core.render.render_view`` computed here.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

import core.io
import core.series
import core.worker
from core.render import render_view
from core.sample import make_sample_ct
from core.windowing import preset_by_name
from tests.conftest import REPO, data_path
from tests.dicom_factory import make_series

PLANES = ("axial", "coronal", "sagittal")


def open_viewer(files: list[Path] | None = None, named: list[tuple[str, bytes]] | None = None) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.run()
    if files is None and named is None:
        at.button[0].click().run()  # "Open sample scan"
    else:
        uploads = [(f.name, f.read_bytes()) for f in files or []] + list(named or [])
        at.file_uploader(key="upload_files").set_value([(n, d, "application/octet-stream") for n, d in uploads])
        at.run()
    assert not at.exception
    at.switch_page("pages/viewer.py")
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def views(at: AppTest) -> dict[str, tuple[dict, np.ndarray]]:
    """Header and decoded image of every view on the page, by plane."""
    out = {}
    for element in at.get("bidi_component"):
        proto = element.proto
        if proto.WhichOneof("data") != "bytes":
            continue  # the cursor component carries JSON
        payload = proto.bytes
        if payload[:4] == b"TFVV":
            continue  # a view's values, sent after the images
        assert payload[:4] == b"TFV1"
        (length,) = struct.unpack("<I", payload[4:8])
        header = json.loads(payload[8 : 8 + length])
        png = payload[8 + length : 8 + length + header["pngBytes"]]
        image = np.asarray(Image.open(io.BytesIO(png)))
        out[header["plane"]] = (header, image)
    return out


def test_sample_shows_three_views_that_are_the_exact_rendered_slices() -> None:
    at = open_viewer()
    assert [s.label for s in at.slider if s.label.endswith("slice")] == [
        "Axial slice",
        "Coronal slice",
        "Sagittal slice",
    ]
    shown = views(at)
    assert set(shown) == set(PLANES)
    volume = make_sample_ct()
    window = preset_by_name("Soft tissue").window  # the CT default when the file has no window
    assert at.number_input(key="viewer_center").value == window.center
    assert at.number_input(key="viewer_width").value == window.width
    for plane, (header, image) in shown.items():
        expected = render_view(volume, plane, header["index"], window)[:, :, 0]
        np.testing.assert_array_equal(image, expected)
        assert (header["width"], header["height"]) == (image.shape[1], image.shape[0])
    assert shown["axial"][0]["letters"] == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert shown["sagittal"][0]["letters"] == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    # Coronal of 0.8 mm pixels and 2 mm slices is shown in proportion: 120 slices -> 300 rows.
    assert shown["coronal"][1].shape == (300, 256)
    assert any("Crosshair:" in m.value and "HU" in m.value for m in at.markdown)


def test_moving_a_slider_changes_that_view_only() -> None:
    at = open_viewer()
    before = views(at)
    at.slider(key="slice_axial").set_value(10).run()
    assert not at.exception
    after = views(at)
    assert after["axial"][0]["index"] == 10
    assert not np.array_equal(after["axial"][1], before["axial"][1])
    for plane in ("coronal", "sagittal"):
        np.testing.assert_array_equal(after[plane][1], before[plane][1])
    crosshair = next(m.value for m in at.markdown if "Crosshair:" in m.value)
    assert crosshair.endswith("10\\)")  # voxel (i, j, 10)


def test_changing_preset_sets_center_and_width_and_manual_edit_is_custom() -> None:
    at = open_viewer()
    before = views(at)["axial"][1]
    lung = next(o for o in at.selectbox(key="viewer_window_choice").options if o.startswith("Lung"))
    at.selectbox(key="viewer_window_choice").select(lung).run()
    assert not at.exception
    assert at.number_input(key="viewer_center").value == -600.0
    assert at.number_input(key="viewer_width").value == 1500.0
    header, image = views(at)["axial"]
    np.testing.assert_array_equal(
        image, render_view(make_sample_ct(), "axial", header["index"], preset_by_name("Lung").window)[:, :, 0]
    )
    assert not np.array_equal(image, before)
    at.number_input(key="viewer_width").set_value(123.0).run()
    assert at.selectbox(key="viewer_window_choice").value == "Custom"


def test_one_view_layout_neurological_mip_colormap_and_threshold() -> None:
    at = open_viewer()
    at.radio(key="viewer_layout").set_value("One view").run()
    at.radio(key="viewer_plane").set_value("coronal").run()
    assert list(views(at)) == ["coronal"]
    at.toggle(key="viewer_radiological").set_value(False).run()
    at.selectbox(key="viewer_slab").select("MIP (maximum)").run()
    at.selectbox(key="viewer_colormap").select("hot").run()
    assert not at.exception and not at.error
    header, image = views(at)["coronal"]
    assert header["letters"]["left"] == "L" and "MIP 10 mm" in header["info"]
    assert image.ndim == 3 and image.shape[2] == 3
    at.radio(key="viewer_overlay_kind").set_value("Threshold").run()
    assert not at.exception and not at.error
    assert at.number_input(key="viewer_thr_lo").value == 300.0


def _tripwire(what: str):  # type: ignore[no-untyped-def]
    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{what} ran in the server process; an upload is read in a worker process")

    return tripwire


def _crash_the_worker(patch: pytest.MonkeyPatch) -> None:
    """Jobs started through core.worker.run_in_worker run os.abort instead: a real crash of the worker."""
    real = core.worker.run_in_worker

    def crashing(fn: object, *args: object, limits: object = core.worker.DEFAULT_WORKER_LIMITS, what: str = "",
                 **kwargs: object) -> object:  # fmt: skip
        return real(os.abort, limits=limits, what=what)

    patch.setattr(core.worker, "run_in_worker", crashing)


def test_label_map_overlay_from_an_upload_aligns_with_a_dicom_ct(monkeypatch: pytest.MonkeyPatch) -> None:
    ct = sorted(data_path("ct_siemens_20sl_uncompressed_derived", "dicom").iterdir())
    seg = data_path("ct_siemens_j2k_20sl", "extra", "example_seg_dicom.nii.gz")
    at = open_viewer(ct)
    plain = views(at)["axial"][1]
    # The label map is parsed and decoded in a worker: here, scanning or loading would fail.
    monkeypatch.setattr(core.io, "scan", _tripwire("core.io.scan"))
    monkeypatch.setattr(core.series.Series, "load", _tripwire("Series.load"))
    at.radio(key="viewer_overlay_kind").set_value("Label map").run()
    at.file_uploader(key="viewer_label_upload").set_value([(seg.name, seg.read_bytes(), "application/gzip")]).run()
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    legend = " ".join(str(h.proto.body) for h in at.get("html"))
    assert "Labels:" in legend
    image = views(at)["axial"][1]
    assert image.ndim == 3
    coloured = np.any(image != np.repeat(plain[:, :, None], 3, axis=2), axis=2)
    assert 0.01 < coloured.mean() < 0.5  # organs painted, the rest untouched


def test_a_non_label_upload_is_refused_with_a_message_and_a_real_one_then_works() -> None:
    ct = data_path("nifti_ct_with_labelmap", "example_ct_sm.nii.gz")
    seg = data_path("nifti_ct_with_labelmap", "example_seg.nii.gz")
    at = open_viewer([ct])
    at.radio(key="viewer_overlay_kind").set_value("Label map").run()
    at.file_uploader(key="viewer_label_upload").set_value([("notes.txt", b"not an image", "text/plain")]).run()
    assert not at.exception
    assert any("Label map not loaded" in e.value and "notes" in e.value for e in at.error)
    at.file_uploader(key="viewer_label_upload").set_value([(seg.name, seg.read_bytes(), "application/gzip")]).run()
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    assert any("Labels:" in str(h.proto.body) for h in at.get("html"))


def test_4d_series_has_a_time_slider_that_changes_the_image() -> None:
    at = open_viewer([data_path("nifti_oblique_4d", "example4d.nii.gz")])
    time_slider = at.slider(key="viewer_frame")
    assert time_slider.label == "Time point"
    before = views(at)["axial"]
    assert "oblique" in before[0]["info"]
    time_slider.set_value(1).run()
    assert not at.exception
    after = views(at)["axial"]
    assert not np.array_equal(before[1], after[1])
    assert at.selectbox(key="viewer_window_choice").value.startswith("Auto")  # MR default


def test_monochrome1_is_announced_and_rgb_needs_no_window() -> None:
    cr = data_path("single_files_pydicom", "dicom", "CR_MONOCHROME1_6154.dcm")
    at = open_viewer([cr])
    assert any("MONOCHROME1" in c.value for c in at.caption)
    rgb = data_path("single_files_pydicom", "dicom", "SC_rgb_jpeg_dcmtk.dcm")
    at = open_viewer([rgb])
    assert not [s for s in at.selectbox if s.label == "Window"]
    header, image = views(at)["axial"]
    assert header["rgb"] and image.ndim == 3 and image.shape[2] == 3


@pytest.mark.parametrize("plane", PLANES)
def test_download_buttons_exist_for_each_view(plane: str) -> None:
    at = open_viewer()
    labels = [b.proto.label for b in at.get("download_button")]
    assert f"PNG of this {plane} view" in labels
    assert any(label.startswith("All ") and label.endswith(f"{plane} slices (zip)") for label in labels)


def test_settings_and_position_survive_a_visit_to_another_page() -> None:
    at = open_viewer()
    lung = next(o for o in at.selectbox(key="viewer_window_choice").options if o.startswith("Lung"))
    at.selectbox(key="viewer_window_choice").select(lung).run()
    at.slider(key="slice_coronal").set_value(40).run()
    at.toggle(key="viewer_invert").set_value(True).run()
    at.switch_page("pages/upload.py")
    at.run()
    at.switch_page("pages/viewer.py")
    at.run()
    assert not at.exception
    assert at.selectbox(key="viewer_window_choice").value == lung
    assert at.number_input(key="viewer_center").value == -600.0
    assert at.toggle(key="viewer_invert").value is True
    assert views(at)["coronal"][0]["index"] == 40


def test_choosing_another_series_resets_the_window_and_position() -> None:
    ct = sorted(data_path("ct_siemens_20sl_uncompressed_derived", "dicom").iterdir())
    mr = sorted(data_path("mr_siemens_gre_fieldmap_5sl", "dicom").glob("*.dcm"))
    at = open_viewer(ct + mr)
    first = at.session_state["current_id"]
    at.slider(key="slice_axial").set_value(0).run()
    at.switch_page("pages/upload.py")
    at.run()
    other = next(item.info.id for item in at.session_state["scan"].series if item.info.id != first)
    at.selectbox(key="series_choice").select(other).run()
    at.switch_page("pages/viewer.py")
    at.run()
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    shown = views(at)
    volume = at.session_state["volumes"][other]
    expected_choice = "Auto" if volume.modality == "MR" else "File"
    assert at.selectbox(key="viewer_window_choice").value.startswith(expected_choice)
    assert shown["axial"][0]["series"] == other
    assert shown["axial"][0]["index"] == (volume.spatial_shape[2] - 1) // 2  # centred again


def test_a_crash_reading_the_label_map_is_a_message_and_the_viewer_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    ct = data_path("nifti_ct_with_labelmap", "example_ct_sm.nii.gz")
    seg = data_path("nifti_ct_with_labelmap", "example_seg.nii.gz")
    at = open_viewer([ct])
    at.radio(key="viewer_overlay_kind").set_value("Label map").run()
    with monkeypatch.context() as patch:
        _crash_the_worker(patch)
        at.file_uploader(key="viewer_label_upload").set_value([(seg.name, seg.read_bytes(), "application/gzip")])
        at.run()
        assert not at.exception, at.exception
        assert any("Label map not loaded" in e.value and "SIGABRT" in e.value for e in at.error), [
            e.value for e in at.error
        ]
        assert set(views(at)) == {"axial", "coronal", "sagittal"}  # the views are still drawn
    at.file_uploader(key="viewer_label_upload").set_value([(seg.name, seg.read_bytes(), "application/gzip")]).run()
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    assert any("Labels:" in str(h.proto.body) for h in at.get("html"))


def test_a_unit_from_the_header_is_escaped_in_html() -> None:
    unit = "<i>B&Q</i>"  # (0054,1001) Units of a PET series: free text from the file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom: not a valid CS value (the point of the test)
        sources = make_series(
            np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8), modality="PT", extra={"Units": unit}
        )
    at = open_viewer(named=[(s.name, s.data) for s in sources])
    assert at.session_state["volumes"][at.session_state["current_id"]].unit == unit
    at.radio(key="viewer_overlay_kind").set_value("Threshold").run()
    assert not at.exception, at.exception
    [caption] = [str(h.proto.body) for h in at.get("html") if " to " in str(h.proto.body)]
    assert "&lt;i&gt;B&amp;Q&lt;/i&gt;" in caption
    assert "<i>" not in caption and "B&Q" not in caption


def test_the_values_of_each_view_come_after_every_image() -> None:
    """A slow link paints the three images first; each view's values (for the readout) follow."""
    at = open_viewer()
    kinds, value_keys = [], []
    for element in at.get("bidi_component"):
        if element.proto.WhichOneof("data") != "bytes":
            continue
        payload = element.proto.bytes
        kinds.append(payload[:4])
        if payload[:4] == b"TFVV":
            (length,) = struct.unpack("<I", payload[4:8])
            value_keys.append(json.loads(payload[8 : 8 + length])["key"])
    assert kinds == [b"TFV1"] * 3 + [b"TFVV"] * 3
    assert sorted(value_keys) == sorted(header["values"]["key"] for header, _ in views(at).values())
