"""core.io.scan: pooling, and the boundary that keeps one reader's bug from losing the upload."""

from __future__ import annotations

import pytest

import core.io
from core.io import scan
from core.sources import Source
from tests.conftest import data_path


def test_dicom_and_nifti_in_one_upload_are_both_found() -> None:
    ct = data_path("single_files_pydicom", "dicom", "CT_small.dcm")
    nifti = data_path("nifti_ct_with_labelmap", "example_seg.nii.gz")
    result = scan([Source(ct.name, ct.read_bytes()), Source(nifti.name, nifti.read_bytes())])
    assert sorted(s.info.kind for s in result.series) == ["dicom", "nifti"]
    assert result.errors == []


def test_an_unexpected_reader_failure_becomes_a_message_and_the_rest_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_reader(sources, limits):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(core.io, "scan_other", broken_reader)
    ct = data_path("single_files_pydicom", "dicom", "CT_small.dcm")
    result = scan([Source(ct.name, ct.read_bytes()), Source("x.nii", b"not really")])
    assert [s.info.modality for s in result.series] == ["CT"]
    assert len(result.errors) == 1 and "internal error" in result.errors[0].message
    assert "bug" not in result.errors[0].message  # no exception text (it may carry header values)


def test_series_ids_are_unique_across_readers() -> None:
    ct = data_path("single_files_pydicom", "dicom", "CT_small.dcm")
    dicom_only = scan([Source(ct.name, ct.read_bytes())])
    clashing_name = f"{dicom_only.series[0].info.id}.nii.gz"  # a NIfTI reader names series by file stem
    nifti = data_path("nifti_ct_with_labelmap", "example_seg.nii.gz")
    result = scan([Source(ct.name, ct.read_bytes()), Source(clashing_name, nifti.read_bytes())])
    ids = [s.info.id for s in result.series]
    assert len(ids) == 2 and len(set(ids)) == 2, ids
