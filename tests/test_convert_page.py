"""AppTest of the Convert page: QA shown, every format converts, batch conversion of an upload."""

from __future__ import annotations

import gzip
import io
import zipfile

import nibabel as nib
import numpy as np
from streamlit.testing.v1 import AppTest

from tests.conftest import REPO, data_path
from tests.dicom_factory import make_series


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


def test_sample_shows_qa_and_converts_to_nifti() -> None:
    at = _open_sample()
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


def test_batch_converts_an_upload_of_two_series() -> None:
    mr = sorted(data_path("mr_siemens_gre_fieldmap_5sl", "dicom").glob("*.dcm"))
    gapped = make_series(np.zeros((6, 5, 5), dtype=np.int16), drop=[2], series_number=8, description="axial")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.run()
    at.file_uploader(key="upload_files").set_value(
        [(f.name, f.read_bytes(), "application/octet-stream") for f in mr]
        + [(s.name, s.data, "application/octet-stream") for s in gapped]
    )
    at.run()
    at.switch_page("pages/convert.py")
    at.run()
    assert not at.exception
    _click(at, "Convert all 2 series")
    assert not at.error, [e.value for e in at.error]
    assert any("_Eq" in w.value for w in at.warning)  # the gapped series was resampled, visibly
    assert any(b.proto.label.startswith("Download 2 conversions") for b in at.get("download_button"))
    archive = zipfile.ZipFile(io.BytesIO(at.session_state["convert_batch"]["result"].data))
    names = sorted(archive.namelist())
    assert "8_axial_Eq.nii.gz" in names and any(n.startswith("2_gre_field_mapping") for n in names)
    image = nib.Nifti1Image.from_bytes(gzip.decompress(archive.read("8_axial_Eq.nii.gz")))
    assert image.shape == (5, 5, 6)
