"""AppTest of the Convert page: QA shown, every format converts, batch conversion of an upload, all of it
in worker processes (nothing decoded or encoded in the server; a crashed worker is a message).

Also tests the worker jobs of the page in :mod:`core.convert`: :func:`convert_loaded` (through
:func:`convert_series_in_worker`), :func:`convert_sources_batch` (and :func:`convert_batch_in_worker`)
and :func:`detach_header`.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
from streamlit.testing.v1 import AppTest

import core.convert
import core.series
import core.worker
from core.convert import (
    ConvertOptions,
    convert_batch,
    convert_batch_in_worker,
    convert_series,
    convert_series_in_worker,
    convert_sources_batch,
    detach_header,
)
from core.dicom_headers import read_header
from core.io import scan
from core.sources import Source
from tests.conftest import REPO, data_path
from tests.dicom_factory import add_private, make_series


def _tripwire(what: str):  # type: ignore[no-untyped-def]
    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{what} ran in the server process; it belongs in a worker process")

    return tripwire


def _forbid_work_in_the_server(patch: pytest.MonkeyPatch) -> None:
    """Decoding and converting in the test (= server) process fail; a worker imports its own, untouched copies."""
    patch.setattr(core.series.Series, "load", _tripwire("Series.load (decoding)"))
    patch.setattr(core.convert, "convert_series", _tripwire("convert_series"))
    patch.setattr(core.convert, "convert_batch", _tripwire("convert_batch"))


def _crash_the_worker(patch: pytest.MonkeyPatch) -> None:
    """Jobs started by core.convert or the page run os.abort instead: a real crash of the worker process."""
    real = core.worker.run_in_worker

    def crashing(fn: object, *args: object, limits: object = core.worker.DEFAULT_WORKER_LIMITS, what: str = "",
                 **kwargs: object) -> object:  # fmt: skip
        return real(os.abort, limits=limits, what=what)

    patch.setattr(core.convert, "run_in_worker", crashing)
    patch.setattr(core.worker, "run_in_worker", crashing)  # what the page imports


def _mr_and_gapped() -> list[Source]:
    mr = sorted(data_path("mr_siemens_gre_fieldmap_5sl", "dicom").glob("*.dcm"))
    gapped = make_series(
        np.arange(6 * 5 * 5, dtype=np.int16).reshape(6, 5, 5), drop=[2], series_number=8, description="axial"
    )
    return [Source(f.name, f.read_bytes()) for f in mr] + gapped


def _open_sample() -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.run()
    next(b for b in at.button if b.label == "Open sample scan").click().run()
    assert not at.exception
    at.switch_page("pages/convert.py")
    at.run()
    assert not at.exception, at.exception
    return at


def _click(at: AppTest, label: str) -> None:
    next(b for b in at.button if b.label.startswith(label)).click().run()
    assert not at.exception, at.exception


def test_sample_shows_qa_and_converts_to_nifti(monkeypatch: pytest.MonkeyPatch) -> None:
    at = _open_sample()
    monkeypatch.setattr(core.convert, "convert_series", _tripwire("convert_series"))  # the sample too
    checks = at.dataframe[0].value
    assert len(checks) == 6 and set(checks["result"]) == {"passed"}
    assert any(m.label == "Slices" for m in at.metric)
    _click(at, "Convert")
    assert not at.error, [e.value for e in at.error]
    assert at.success and ".nii.gz" in at.success[0].value.replace("\\", "")
    conversion = at.session_state["convert_result"]["conversion"]
    image = nib.Nifti1Image.from_bytes(gzip.decompress(conversion.outputs[0][1]))
    assert image.shape == tuple(at.session_state["volumes"]["sample"].shape)


def test_every_format_converts_without_error() -> None:
    at = _open_sample()
    for choice in ("DICOM series (.zip)", "NRRD (.nrrd)", "MetaImage (.mha)", "NIfTI (.nii)"):
        at.radio(key="convert_format").set_value(choice).run()
        _click(at, "Convert")
        assert not at.error, (choice, [e.value for e in at.error])
        assert at.success, choice


def _open_upload(sources: list[Source]) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.run()
    at.file_uploader(key="upload_files").set_value([(s.name, s.data, "application/octet-stream") for s in sources])
    at.run()
    at.switch_page("pages/convert.py")
    at.run()
    assert not at.exception, at.exception
    return at


def test_batch_converts_an_upload_of_two_series(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_work_in_the_server(monkeypatch)
    at = _open_upload(_mr_and_gapped())
    _click(at, "Convert all 2 series")
    assert not at.error, [e.value for e in at.error]
    assert any("_Eq" in w.value for w in at.warning)  # the gapped series was resampled, visibly
    assert any(b.proto.label.startswith("Download 2 conversions") for b in at.get("download_button"))
    archive = zipfile.ZipFile(io.BytesIO(at.session_state["convert_batch"]["result"].data))
    names = sorted(archive.namelist())
    assert "8_axial_Eq.nii.gz" in names and any(n.startswith("2_gre_field_mapping") for n in names)
    image = nib.Nifti1Image.from_bytes(gzip.decompress(archive.read("8_axial_Eq.nii.gz")))
    assert image.shape == (5, 5, 6)


def test_a_series_of_an_upload_converts_in_a_worker_to_what_convert_series_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sources = _mr_and_gapped()
    gapped = next(item for item in scan(sources).series if item.info.description == "axial")
    expected = convert_series(gapped, ConvertOptions(to="nrrd"))  # here, before the server is watched
    at = _open_upload(sources)
    at.switch_page("pages/upload.py").run()
    at.selectbox(key="series_choice").select(gapped.info.id).run()
    at.switch_page("pages/convert.py").run()
    _forbid_work_in_the_server(monkeypatch)
    at.radio(key="convert_format").set_value("NRRD (.nrrd)").run()
    _click(at, "Convert")
    assert not at.error, [e.value for e in at.error]
    assert any("_Eq" in w.value for w in at.warning)  # resampled in the worker, visibly
    conversion = at.session_state["convert_result"]["conversion"]
    assert conversion.outputs == expected.outputs  # the same bytes, names and suffix
    assert conversion.warnings == expected.warnings


def test_a_crashed_worker_is_a_message_and_the_page_keeps_working(monkeypatch: pytest.MonkeyPatch) -> None:
    at = _open_upload(_mr_and_gapped())
    with monkeypatch.context() as patch:
        _crash_the_worker(patch)
        for label in ("Convert all 2 series", "Convert"):
            _click(at, label)
            assert any("crashed" in e.value and "SIGABRT" in e.value for e in at.error), [e.value for e in at.error]
            assert not at.success
        assert "convert_result" not in at.session_state and "convert_batch" not in at.session_state
    _click(at, "Convert")  # the page still works once the worker does
    assert not at.error, [e.value for e in at.error]
    assert at.success


def test_a_reference_dicom_file_is_read_in_a_worker_and_its_patient_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    at = _open_sample()
    at.radio(key="convert_format").set_value("DICOM series (.zip)").run()
    at.radio(key="convert_reference_source").set_value("Patient and study of an uploaded DICOM file").run()
    [reference] = make_series(np.zeros((1, 4, 4), dtype=np.int16), extra={"PatientID": "REF-42"})
    with monkeypatch.context() as patch:
        _crash_the_worker(patch)
        at.file_uploader(key="convert_reference_file").set_value([("ref.dcm", reference.data, "application/dicom")])
        at.run()
        assert not at.exception, at.exception
        assert any("crashed" in e.value and "ref\\.dcm" in e.value for e in at.error), [e.value for e in at.error]
    at.file_uploader(key="convert_reference_file").set_value([("ref.dcm", reference.data, "application/dicom")])
    at.run()
    assert not at.error, [e.value for e in at.error]
    _click(at, "Convert")
    assert not at.error, [e.value for e in at.error]
    files = at.session_state["convert_result"]["conversion"].outputs
    copied = pydicom.dcmread(io.BytesIO(files[0][1]), stop_before_pixels=True)
    assert copied.PatientID == "REF-42"
    at.file_uploader(key="convert_reference_file").set_value([("notes.txt", b"not DICOM", "text/plain")])
    at.run()
    assert not at.exception
    assert any("notes\\.txt" in e.value and "not a readable DICOM" in e.value for e in at.error), [
        e.value for e in at.error
    ]


# --------------------------------------------------------------------------- the worker jobs


def test_convert_sources_batch_equals_convert_batch_and_names_lost_series() -> None:
    sources = _mr_and_gapped()
    found = scan(sources).series
    ids = [item.info.id for item in found]
    in_process = convert_batch(found)
    expected = zipfile.ZipFile(io.BytesIO(in_process.data))
    for result in (
        convert_sources_batch(sources, [*ids, "no-such-series"]),
        convert_batch_in_worker(sources, [*ids, "no-such-series"], ConvertOptions()),
    ):
        archive = zipfile.ZipFile(io.BytesIO(result.data))
        assert archive.namelist() == expected.namelist()
        for name in expected.namelist():
            assert archive.read(name) == expected.read(name), name
        assert [c.stem for c in result.conversions] == [c.stem for c in in_process.conversions]
        assert [c.warnings for c in result.conversions] == [c.warnings for c in in_process.conversions]
        assert [p.source for p in result.problems] == ["no-such-series"]
        assert "not found" in result.problems[0].message


def test_convert_in_a_worker_gives_the_files_of_convert_series() -> None:
    sources = _mr_and_gapped()
    for item in scan(sources).series:
        volume = item.load()
        for options in (ConvertOptions(to="nifti", sidecar=True), ConvertOptions(to="mha")):
            expected = convert_series(item, options, volume=volume)
            conversion, bundle = convert_series_in_worker(item, options, volume=volume)
            assert conversion.outputs == expected.outputs
            assert (conversion.primary, conversion.stem, conversion.warnings) == (
                expected.primary,
                expected.stem,
                expected.warnings,
            )
            assert conversion.report.to_json() == expected.report.to_json()
            if len(expected.outputs) > 1:  # the NIfTI and its sidecar
                assert bundle is not None
                assert zipfile.ZipFile(io.BytesIO(bundle)).namelist() == [n for n, _ in expected.outputs]
            else:
                assert bundle is None


def test_detach_header_keeps_values_and_drops_the_file_bytes() -> None:
    pixels = np.arange(2 * 128 * 128, dtype=np.int16).reshape(2, 128, 128)  # 32 kB of pixels per file
    [source, _] = make_series(pixels, series_number=4, description="detach")
    big = bytes(range(256)) * 400  # 100 kB: over read_header's 64 kB, so left in the file until read
    source = add_private(source, 0x0029, "TOMOFORGE TEST", {0x10: ("OB", big)})
    header = read_header(source)
    private_tag = next(tag for tag in header.keys() if tag.group == 0x0029 and tag.element >= 0x1000)
    assert header.get_item(private_tag, keep_deferred=True).value is None  # still in the file
    detached = detach_header(header)
    restored = pickle.loads(pickle.dumps(detached))
    assert restored[private_tag].value == big
    assert restored.SeriesNumber == 4 and restored.ImagePositionPatient == header.ImagePositionPatient
    assert len(pickle.dumps(detached)) < len(source.data) - pixels[0].nbytes // 2  # no copy of the file
    assert header.buffer is not None  # the original is untouched
    reference = pydicom.dcmread(io.BytesIO(source.data), stop_before_pixels=True)
    assert detach_header(reference).PatientID == reference.PatientID
    assert detach_header("a NIfTI header") == "a NIfTI header"


def test_a_second_upload_with_the_same_series_id_gets_another_download_name() -> None:
    """Series ids repeat across uploads ("1"); the download name must not, or a stale URL could serve
    the first upload's file for the second."""
    first = make_series(np.zeros((4, 6, 6), dtype=np.int16), series_number=1, description="axial")
    second = make_series(np.ones((4, 6, 6), dtype=np.int16), series_number=1, description="axial", name_prefix="B")
    at = _open_upload(first)
    _click(at, "Convert")
    name_first = at.session_state["convert_result"]["file_name"]
    at.switch_page("pages/upload.py").run()
    at.file_uploader(key="upload_files").set_value([(s.name, s.data, "application/octet-stream") for s in second])
    at.run()
    at.switch_page("pages/convert.py").run()
    assert at.session_state["current_id"] == scan(first).series[0].info.id == scan(second).series[0].info.id
    _click(at, "Convert")
    name_second = at.session_state["convert_result"]["file_name"]
    assert name_first.split("_")[:-1] == name_second.split("_")[:-1]  # the same words...
    assert name_first != name_second  # ...and another token
