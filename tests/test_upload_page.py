"""AppTest of the Open page: upload a series, see the table, choose it; junk gives a message."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from tests.conftest import REPO, data_path
from tests.test_viewer_page import views


def open_app() -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    return at


def upload(at: AppTest, files: list[Path]) -> None:
    at.file_uploader(key="upload_files").set_value(
        [(f.name, f.read_bytes(), "application/octet-stream") for f in files]
    )
    at.run()


def test_sample_button_lists_the_sample_series() -> None:
    at = open_app()
    assert [b.label for b in at.button] == ["Open sample scan"]
    at.button[0].click().run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["modality"]) == ["CT"]
    assert "Sample CT phantom" in table["description"][0]
    assert at.session_state["current_id"] == table["id"][0]


def test_upload_two_series_and_choose_one() -> None:
    ct = sorted(data_path("ct_siemens_20sl_uncompressed_derived", "dicom").iterdir())
    mr = sorted(data_path("mr_siemens_gre_fieldmap_5sl", "dicom").glob("*.dcm"))
    at = open_app()
    upload(at, ct + mr)
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    assert sorted(table["modality"]) == ["CT", "MR"]
    assert sorted(table["files"]) == [5, 20]
    ct_row = table[table["modality"] == "CT"].iloc[0]
    assert sorted(int(n) for n in ct_row["dimensions"].split(" x ")) == [20, 512, 512]
    mr_id = table[table["modality"] == "MR"].iloc[0]["id"]
    at.selectbox(key="series_choice").select(mr_id).run()
    assert at.session_state["current_id"] == mr_id


def test_junk_upload_shows_an_error_and_the_app_keeps_working() -> None:
    at = open_app()
    at.file_uploader(key="upload_files").set_value(
        [("notes.txt", b"hello, not a scan", "text/plain"), ("x.dcm", b"DICM" * 3, "application/dicom")]
    )
    at.run()
    assert not at.exception
    messages = " ".join(e.value.replace("\\", "") for e in at.error)  # undo Markdown escaping
    assert "notes.txt" in messages and "x.dcm" in messages
    assert "Traceback" not in messages
    at.button[0].click().run()  # the sample still opens in the same session
    assert not at.exception
    assert list(at.dataframe[0].value["modality"]) == ["CT"]


def _nifti_bytes(size: int) -> bytes:
    import nibabel as nib
    import numpy as np

    image = nib.Nifti1Image(np.arange(size**3, dtype=np.int16).reshape(size, size, size), np.eye(4))
    return image.to_bytes()


def test_a_new_upload_does_not_inherit_the_previous_scans_page_state() -> None:
    # Series ids repeat across uploads (a file stem here): pages must not show the old scan.
    at = open_app()
    at.file_uploader(key="upload_files").set_value([("scan.nii", _nifti_bytes(40), "application/octet-stream")])
    at.run()
    at.switch_page("pages/viewer.py").run()
    assert not at.exception
    assert max(s.max for s in at.slider) == 39
    at.switch_page("pages/upload.py").run()
    at.file_uploader(key="upload_files").set_value([("scan.nii", _nifti_bytes(20), "application/octet-stream")])
    at.run()
    assert at.dataframe[0].value["dimensions"][0] == "20 x 20 x 20"
    at.switch_page("pages/viewer.py").run()
    assert not at.exception
    assert max(s.max for s in at.slider) == 19
    shown = views(at)
    assert shown and all(image.shape[0] == 20 for _, image in shown.values()), {
        plane: image.shape for plane, (_, image) in shown.items()
    }
    positions = at.session_state["viewer_pos"]
    assert all(positions[plane] < 20 for plane in ("axial", "coronal", "sagittal"))


def test_the_sample_stays_open_while_files_remain_in_the_uploader() -> None:
    at = open_app()
    at.file_uploader(key="upload_files").set_value([("scan.nii", _nifti_bytes(10), "application/octet-stream")])
    at.run()
    assert at.dataframe[0].value["dimensions"][0] == "10 x 10 x 10"
    at.button[0].click().run()
    assert list(at.dataframe[0].value["modality"]) == ["CT"]
    at.run()  # any later interaction reruns the page with the files still in the uploader
    assert list(at.dataframe[0].value["modality"]) == ["CT"]


def test_the_current_series_decodes_while_the_table_is_read_and_the_view_takes_that_volume(monkeypatch) -> None:  # noqa: ANN001
    import numpy as np

    import pages.common
    from core.io import scan
    from core.sources import Source

    ct = sorted(data_path("ct_siemens_20sl_uncompressed_derived", "dicom").iterdir())
    mr = sorted(data_path("mr_siemens_gre_fieldmap_5sl", "dicom").glob("*.dcm"))
    at = open_app()
    upload(at, ct + mr)
    series_id, future = at.session_state["prefetch"]
    assert series_id == at.session_state["current_id"]
    volume = future.result(timeout=120)  # decoded in a worker, from a background thread
    scanned = scan([Source(f.name, f.read_bytes()) for f in ct + mr])
    expected = next(s for s in scanned.series if s.info.id == series_id)
    assert np.array_equal(volume.array, expected.load().array)

    # Choosing another series starts its decode; the View page then waits for it instead of decoding again.
    other = next(s for s in scanned.series if s.info.id != series_id)
    at.selectbox(key="series_choice").select(other.info.id).run()
    assert at.session_state["prefetch"][0] == other.info.id

    def no_second_decode(series):  # noqa: ANN001, ANN202
        raise AssertionError(f"{series.info.id} decoded again")

    monkeypatch.setattr(pages.common, "_decode", no_second_decode)
    at.switch_page("pages/viewer.py").run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert "prefetch" not in at.session_state
    assert np.array_equal(at.session_state["volumes"][other.info.id].array, other.load().array)


def test_a_series_that_fails_to_decode_shows_the_error_on_the_page_that_needs_it() -> None:
    ct = sorted(data_path("ct_siemens_20sl_uncompressed_derived", "dicom").iterdir())
    at = open_app()
    # Cut the pixels of every file: the headers still scan, the decode fails (in the background).
    at.file_uploader(key="upload_files").set_value(
        [(f.name, f.read_bytes()[:-20000], "application/octet-stream") for f in ct]
    )
    at.run()
    assert not at.exception
    with_error = at.session_state["prefetch"][1]
    assert with_error.exception(timeout=120) is not None
    at.switch_page("pages/viewer.py").run()
    assert not at.exception, at.exception
    assert at.error, "the decoding error should be shown"


def test_a_session_decodes_one_series_at_a_time_and_skips_the_ones_passed_over(monkeypatch) -> None:  # noqa: ANN001
    """Choosing series A, B, C quickly: A decodes, B (never started) is dropped, C decodes next."""
    import threading

    import pages.common

    release = threading.Event()
    started: list[str] = []
    running = threading.Semaphore(0)

    def fake_load(files, series_id, *, expected_sources):  # noqa: ANN001, ANN202
        started.append(series_id)
        running.release()
        assert release.wait(30)
        return f"volume {series_id}"

    monkeypatch.setattr(pages.common, "load_series_in_worker", fake_load)
    prefetcher = pages.common._Prefetcher()
    a = prefetcher.request([], "A", ())
    assert running.acquire(timeout=30)  # A is decoding
    b = prefetcher.request([], "B", ())
    c = prefetcher.request([], "C", ())
    assert b.cancelled() and not c.done()
    release.set()
    assert a.result(timeout=30) == "volume A"
    assert c.result(timeout=30) == "volume C"
    assert started == ["A", "C"]
    d = prefetcher.request([], "D", ())  # the thread ended when it ran out of work; a new one starts
    assert d.result(timeout=30) == "volume D"
    prefetcher.drop_pending()
    assert started == ["A", "C", "D"]


def test_a_background_decode_that_never_finishes_becomes_a_message(monkeypatch) -> None:  # noqa: ANN001
    import threading

    import pages.common

    release = threading.Event()

    def stuck(files, series_id, *, expected_sources):  # noqa: ANN001, ANN202
        release.wait(60)
        raise AssertionError("released")

    monkeypatch.setattr(pages.common, "load_series_in_worker", stuck)
    monkeypatch.setattr(pages.common, "_PREFETCH_WAIT_S", 0.5)
    at = open_app()
    upload(at, sorted(data_path("mr_siemens_gre_fieldmap_5sl", "dicom").glob("*.dcm")))
    at.switch_page("pages/viewer.py").run()
    release.set()
    assert not at.exception, at.exception
    assert any("did not finish" in e.value for e in at.error)
