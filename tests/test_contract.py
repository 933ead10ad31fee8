"""One contract over every reader: what any loaded Volume promises to the rest of the app.

Like nibabel's tests/test_image_api.py: the same checks run on each input kind, so a
new reader cannot forget one.
"""

from __future__ import annotations

import numpy as np
import pytest

from core.io import scan
from core.sample import sample_series
from core.series import Series
from core.sources import Source, read_paths
from tests.conftest import data_path

# One representative input per reader, from the real-data corpus.
CASES = {
    "dicom_ct_j2k": "ct_siemens_j2k_20sl/dicom",
    "dicom_ct_uncompressed": "ct_siemens_20sl_uncompressed_derived/dicom",
    "dicom_mr_sagittal": "mr_siemens_gre_fieldmap_5sl/dicom",
    "dicom_single_files": "single_files_pydicom/dicom",
    "dicom_enhanced": "mr_philips_enhanced_multiframe/dicom",
    "nifti_4d_oblique": "nifti_oblique_4d/example4d.nii.gz",
    "nifti_ct": "nifti_ct_with_labelmap/example_ct_sm.nii.gz",
    "nrrd": "nrrd_mr_with_label/brain1_image.nrrd",
    "metaimage_mha": "metaimage/niivue_mha.mha",
    "metaimage_mhd_raw": "metaimage",
}


def _series_for(case: str) -> list[Series]:
    sources: list[Source] = read_paths([data_path(*CASES[case].split("/"))])
    result = scan(sources)
    assert result.series, f"{case}: nothing loaded; errors: {result.errors}"
    return result.series


def check_contract(series: Series) -> None:
    info = series.info
    volume = series.load()
    label = f"{info.kind} {info.id} {info.description}"
    assert np.all(np.isfinite(volume.affine)), label
    assert volume.affine.dtype == np.float64 and volume.affine.shape == (4, 4), label
    assert not volume.array.flags.writeable, label
    assert volume.shape == tuple(info.shape), label
    np.testing.assert_allclose(volume.affine, info.affine, atol=1e-9, err_msg=label)
    assert str(volume.array.dtype) == info.dtype, label
    assert volume.array.dtype != np.float64, f"{label}: float64 doubles the memory for nothing"
    assert volume.axcodes == "RAS", f"{label}: readers must reorient to the closest RAS+ axes"
    assert all(s > 0 for s in volume.spacing_mm), label
    if volume.modality == "CT":
        assert volume.unit == "HU", label
        assert volume.array.min() >= -3024 and volume.array.max() <= 32767, f"{label}: not Hounsfield units"
    if volume.is_rgb:
        assert volume.array.shape[-1] == 3 and volume.array.dtype == np.uint8, label
    assert info.nbytes == volume.nbytes, label


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_reader_keeps_the_contract(case: str) -> None:
    for series in _series_for(case):
        check_contract(series)


def test_sample_keeps_the_contract() -> None:
    check_contract(sample_series())
