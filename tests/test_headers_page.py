"""AppTest of the Headers page: private by default, every view renders, exports offer de-identification."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core.io import scan
from core.series import ScanResult
from core.sources import Source
from pages.common import CURRENT, SCAN, UPLOAD_KEY, VOLUMES
from tests.conftest import REPO
from tests.phi_factory import MARKER_DATE, MARKER_NUMBER, MARKERS, make_phi_study


def open_headers(result: ScanResult, index: int = 0) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.session_state[SCAN] = result
    at.session_state[CURRENT] = result.series[index].info.id
    at.session_state[VOLUMES] = {}
    at.session_state[UPLOAD_KEY] = "test-upload"
    at.switch_page("pages/headers.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def rendered_bytes(at: AppTest) -> bytes:
    """Every protobuf the page sent to the browser, serialized: text, labels, options and dataframe (Arrow) bytes."""
    chunks: list[bytes] = []

    def walk(node) -> None:
        proto = getattr(node, "proto", None)
        if proto is not None and hasattr(proto, "SerializeToString"):
            chunks.append(proto.SerializeToString())
        children = getattr(node, "children", None)
        if isinstance(children, dict):
            for child in children.values():
                walk(child)

    walk(at._tree)
    return b"".join(chunks)


def warnings_text(at: AppTest) -> str:
    # Warnings go through pages.common.plain, which escapes Markdown with backslashes.
    return " ".join(w.value for w in at.warning).replace("\\", "")


def leaked(at: AppTest, extra: tuple[bytes, ...] = ()) -> list[bytes]:
    page = rendered_bytes(at)
    dashed = MARKER_DATE[:4] + "-" + MARKER_DATE[4:6] + "-" + MARKER_DATE[6:]  # a date reformatted for display
    return [m for m in (*MARKERS, dashed.encode(), *extra) if m in page]


@pytest.fixture(scope="module")
def phi_scan() -> tuple[ScanResult, set[str]]:
    study = make_phi_study(n_series=1, n_slices=3)
    result = scan(study.sources)
    assert len(result.series) == 1, [e.message for e in result.errors]
    return result, study.original_uids


def test_hidden_by_default_no_marker_anywhere(phi_scan) -> None:
    result, original_uids = phi_scan
    at = open_headers(result)
    assert at.toggle(key="headers_hide").value is True
    assert at.dataframe, "the element tables rendered"
    uids = tuple(u.encode() for u in original_uids)
    assert leaked(at, uids) == []
    # Every view: another instance, a search, the sequence switch; still nothing leaks.
    at.selectbox(key="headers_instance").select(2).run()
    at.text_input(key="headers_search").input("PHIMARKER").run()
    assert not at.exception
    assert leaked(at, uids) == []
    assert "0 of" in " ".join(t.value for t in at.text)  # hidden values cannot be found by typing them
    at.text_input(key="headers_search").input("").run()
    at.checkbox(key="headers_expand").uncheck().run()
    assert leaked(at, uids) == []


def test_switch_off_shows_the_values(phi_scan) -> None:
    """The same check finds the markers once the user asks to see them: the check can fail."""
    result, _ = phi_scan
    at = open_headers(result)
    at.toggle(key="headers_hide").set_value(False).run()
    assert not at.exception
    assert set(leaked(at)) >= {b"PHIMARKER", MARKER_DATE.encode(), MARKER_NUMBER.encode()}


def test_views_tables_and_exports(phi_scan) -> None:
    result, _ = phi_scan
    at = open_headers(result)
    summary = at.dataframe[0].value
    assert list(summary["field"])[:2] == ["Patient name", "Patient ID"]
    assert summary.set_index("field").loc["Modality", "value"] == "CT"
    assert summary.set_index("field").loc["Patient name", "value"] == "•••••"
    elements = at.dataframe[1].value
    assert {"(0010,0010)", "(0020,0032)", "(0009,0010)"} <= set(elements["tag"])
    assert elements.set_index("tag").loc["(0020,0032)", "value"] == "-40.0\\-30.0\\100.0"  # geometry is not hidden
    differing = at.dataframe[2].value
    assert "ImagePositionPatient" in set(differing["name"])
    assert differing.set_index("name").loc["ImagePositionPatient", "range"] == "[-40, -30, 100] … [-40, -30, 105]"
    assert differing.set_index("name").loc["AcquisitionComments", "range"] == "•••••"
    private = at.dataframe[3].value
    # Top-level blocks (0009, 0029) and the ones inside sequence items (0011, 0013, 0015).
    assert set(private["tag"].str[1:5]) == {"0009", "0011", "0013", "0015", "0029"}
    assert set(private["private creator"]) == {"•••••"}  # an unknown creator string is masked too
    assert [c.value for c in at.checkbox if c.key in ("headers_json_deid", "headers_csv_deid")] == [True, True]
    assert not at.warning  # a CT with BurnedInAnnotation=NO needs no confirmation
    at.checkbox(key="headers_json_deid").uncheck().run()
    assert "identifying data" in warnings_text(at)


def test_burned_in_annotation_blocks_the_dicom_download_until_confirmed() -> None:
    study = make_phi_study(n_series=1, n_slices=2, modality="US", burned_in=None)
    at = open_headers(scan(study.sources))
    assert "Burned In Annotation" in warnings_text(at)
    assert leaked(at) == []
    assert at.checkbox(key="headers_burned_in_ok").value is False
    at.checkbox(key="headers_burned_in_ok").check().run()
    assert not at.exception


def test_nifti_fields_and_qform_sform_warning(tmp_path) -> None:
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    img = nib.Nifti1Image(np.zeros((11, 5, 6), dtype=np.int16), affine)
    img.header["descrip"] = b"PHIMARKER 19010203"
    img.set_qform(affine, 1)
    shifted = affine.copy()
    shifted[0, 3] += 0.5
    img.set_sform(shifted, 2)
    path = tmp_path / "x.nii"
    nib.save(img, path)
    result = scan([Source("x.nii", path.read_bytes())])
    assert result.series, [e.message for e in result.errors]
    at = open_headers(result)
    assert "disagree by up to 0.5 mm" in warnings_text(at)
    derived = at.dataframe[0].value.set_index("field")["value"]
    assert derived["orientation"] == "RAS" and derived["voxel size"] == "2 x 3 x 4 unknown"
    assert leaked(at) == []
    at.toggle(key="headers_hide").set_value(False).run()
    assert b"PHIMARKER" in rendered_bytes(at)


def test_without_a_scan_the_page_points_to_open() -> None:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.switch_page("pages/headers.py")
    at.run()
    assert not at.exception
    assert "No scan is open yet" in " ".join(i.value for i in at.info)
