"""De-identification: Table E.1-1 actions, the PHI-seeded study through every DICOM export path, the CLI."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, UltrasoundImageStorage

from core import cli_deidentify
from core.deidentify import (
    BASIC_PROFILE,
    COMBINED_ACTIONS,
    IMPLEMENTATION_CLASS_UID,
    UIDMap,
    action_code,
    burned_in_annotation_reason,
    deidentify_dataset,
    deidentify_datasets,
    deidentify_sources,
    is_identifying_text,
    masked,
    resolve_action,
    safe_description,
    shift_date,
    shift_datetime,
    zip_export,
)
from core.errors import EXIT_NOTHING_PROCESSED, EXIT_OK, EXIT_USAGE
from core.header import datasets_to_json, flatten_dataset, rows_to_csv
from core.sources import Source
from tests.conftest import REPO, data_path, expected_entries
from tests.phi_factory import (
    MARKER,
    MARKER_TIME,
    PIXEL_SPACING,
    find_markers,
    make_phi_study,
)

DCM2NIIX = REPO / ".venv" / "bin" / "dcm2niix"
SECRET = b"0123456789abcdef0123456789abcdef"


# --- the table ------------------------------------------------------------------------------------

# Spot checks typed from PS3.15 Table E.1-1 (Basic Prof. column), independent of the module's table.
STANDARD_CODES = {
    "PatientName": "Z",
    "PatientID": "Z",
    "PatientBirthDate": "Z",
    "PatientSex": "Z",
    "AccessionNumber": "Z",
    "StudyDate": "Z",
    "StudyTime": "Z",
    "StudyID": "Z",
    "ReferringPhysicianName": "Z",
    "PatientAge": "X",
    "PatientWeight": "X",
    "OtherPatientIDs": "X",
    "PatientAddress": "X",
    "SeriesDescription": "X",
    "StudyDescription": "X",
    "ImageComments": "X",
    "InstitutionAddress": "X",
    "PerformingPhysicianName": "X",
    "PersonName": "D",
    "VerifyingObserverName": "D",
    "ContentSequence": "D",
    "StudyInstanceUID": "U",
    "SeriesInstanceUID": "U",
    "SOPInstanceUID": "U",
    "FrameOfReferenceUID": "U",
    "ReferencedSOPInstanceUID": "U",
    "ContentDate": "Z/D",
    "AcquisitionDate": "X/Z",
    "ReferencedStudySequence": "X/Z",
    "ProtocolName": "X/D",
    "SeriesDate": "X/D",
    "InstitutionName": "X/Z/D",
    "StationName": "X/Z/D",
    "OperatorsName": "X/Z/D",
    "DeviceSerialNumber": "X/Z/D",
    "ReferencedImageSequence": "X/Z/U*",
    "SourceImageSequence": "X/Z/U*",
}


@pytest.mark.parametrize("keyword, code", sorted(STANDARD_CODES.items()))
def test_table_matches_the_standard(keyword: str, code: str) -> None:
    assert action_code(Tag(keyword)) == code


def test_table_covers_repeating_groups_and_keeps_technical_attributes() -> None:
    assert action_code(0x60023000) == "X"  # Overlay Data, any overlay group
    assert action_code(0x601E4000) == "X"  # Overlay Comments
    assert action_code(0x50020110) == "X"  # anything in a curve group
    for keyword in ("Modality", "Manufacturer", "ImagePositionPatient", "PixelSpacing", "RescaleSlope", "SOPClassUID"):
        assert action_code(Tag(keyword)) is None, keyword
    assert len(BASIC_PROFILE) > 600  # the 2024b table lists over 600 attributes


def test_every_code_resolves_to_one_action() -> None:
    codes = set(BASIC_PROFILE.values())
    assert codes <= {"D", "Z", "X", "U", *COMBINED_ACTIONS}
    assert {resolve_action(c) for c in codes} <= {"D", "Z", "X", "U"}
    with pytest.raises(ValueError, match="unknown"):
        resolve_action("Q")


# --- actions, one per type ------------------------------------------------------------------------


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.SeriesInstanceUID = "1.2.3.4.5.6"
    ds.PatientName = "Doe^Jane"
    ds.PatientAge = "042Y"
    ds.PersonName = "Roe^Richard"
    ds.add_new(0x0040A121, "DA", "20200102")  # Date (D)
    ds.VerifyingObserverSequence = DicomSequence([Dataset()])
    ds.VerifyingObserverSequence[0].VerifyingObserverName = "Watcher^Walt"
    ds.AcquisitionDate = "20200102"
    ds.ProtocolName = "Protocol of Jane Doe"
    ds.InstitutionName = "Saint Somewhere"
    ds.ContentDate = "20200102"
    ds.SeriesDescription = "CT Head Jane Doe 19700101"
    ds.Manufacturer = "ACME"
    ds.ImagePositionPatient = [1.5, 2.5, 3.5]
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5.6.8"
    ref.PatientName = "Doe^Jane"
    ds.ReferencedImageSequence = DicomSequence([ref])
    return ds


def _clean(ds: Dataset, **kwargs) -> Dataset:
    return deidentify_dataset(ds, uid_map=UIDMap(SECRET), **kwargs)


def test_action_x_removes() -> None:
    out = _clean(_dataset())
    assert "PatientAge" not in out


def test_action_z_empties_but_keeps_the_attribute() -> None:
    out = _clean(_dataset())
    assert "PatientName" in out and out["PatientName"].value in ("", None)


def test_action_d_puts_a_dummy_of_the_right_vr() -> None:
    out = _clean(_dataset())
    assert out.PersonName == "ANONYMIZED"
    assert out[0x0040A121].value == "19000101"  # a valid DA, not the original
    assert len(out.VerifyingObserverSequence) == 0  # no dummy item can be made up: emptied


def test_action_u_maps_uids_deterministically_per_secret() -> None:
    ds = _dataset()
    one = _clean(ds)
    again = _clean(ds)
    other = deidentify_dataset(ds, uid_map=UIDMap(b"another secret of 32 bytes......"))
    assert one.SOPInstanceUID.startswith("2.25.") and one.SOPInstanceUID != ds.SOPInstanceUID
    assert pydicom.uid.UID(one.SOPInstanceUID).is_valid
    assert one.SOPInstanceUID == again.SOPInstanceUID
    assert other.SOPInstanceUID != one.SOPInstanceUID
    assert one.SOPClassUID == CTImageStorage  # class UIDs identify nobody
    assert ds.SOPInstanceUID == "1.2.3.4.5.6.7"  # the input is not changed


def test_action_k_from_an_override_keeps() -> None:
    out = _clean(_dataset(), overrides={int(Tag("SeriesDescription")): "K"})
    assert out.SeriesDescription == "CT Head Jane Doe 19700101"


def test_action_c_cleans_free_text() -> None:
    out = _clean(_dataset(), overrides={int(Tag("SeriesDescription")): "C"})
    assert out.SeriesDescription == "CT Head"


@pytest.mark.parametrize(
    "keyword, present, empty",
    [
        ("AcquisitionDate", True, True),  # X/Z -> Z
        ("ProtocolName", False, False),  # X/D -> X
        ("InstitutionName", True, True),  # X/Z/D -> Z
        ("ContentDate", True, True),  # Z/D -> Z
    ],
)
def test_combined_actions(keyword: str, present: bool, empty: bool) -> None:
    ds = _dataset()
    out = _clean(ds)
    assert (keyword in out) is present
    if present:
        assert (out[keyword].value in ("", None)) is empty


def test_combined_u_star_keeps_references_and_remaps_them() -> None:
    ds = _dataset()
    uid_map = UIDMap(SECRET)
    out = deidentify_dataset(ds, uid_map=uid_map)
    (item,) = out.ReferencedImageSequence
    assert item.ReferencedSOPClassUID == CTImageStorage
    assert item.ReferencedSOPInstanceUID == uid_map("1.2.3.4.5.6.8")
    assert item["PatientName"].value in ("", None)  # the items are cleaned too


def test_recursion_private_tags_unknown_tags_and_stray_uids() -> None:
    ds = _dataset()
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "Jane Doe")
    item = Dataset()
    item.PatientID = "ID-123"
    item.add_new(0x00200242, "UI", "1.2.3.999")  # SOP Instance UID of Concatenation Source: not in the table
    item.private_block(0x0011, "ACME 1.0", create=True).add_new(0x02, "SH", "Jane")
    deeper = Dataset()
    deeper.PatientBirthDate = "19700101"
    item.AnatomicRegionSequence = DicomSequence([deeper])
    ds.ReferencedSeriesSequence = DicomSequence([item])  # not in the table: kept, cleaned inside
    ds.add_new(0x00221234, "LO", "unknown public")  # (0022,1234): not in the dictionary
    out = _clean(ds)
    assert not any(elem.tag.is_private for elem in out.iterall())
    assert 0x00221234 not in out
    (kept,) = out.ReferencedSeriesSequence
    assert kept["PatientID"].value in ("", None)
    assert kept[0x00200242].value.startswith("2.25.")
    assert kept.AnatomicRegionSequence[0]["PatientBirthDate"].value in ("", None)
    assert out.Manufacturer == "ACME" and list(out.ImagePositionPatient) == [1.5, 2.5, 3.5]


def test_markers_of_de_identification() -> None:
    out = _clean(_dataset())
    assert out.PatientIdentityRemoved == "YES"
    codes = [(i.CodeValue, i.CodingSchemeDesignator, i.CodeMeaning) for i in out.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM", "Basic Application Confidentiality Profile")]
    assert "Basic Application Confidentiality Profile" in out.DeidentificationMethod
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert out.preamble == b"\x00" * 128
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID


def test_date_shift_keeps_intervals_and_times() -> None:
    ds = _dataset()
    ds.StudyDate = "20200102"
    ds.SeriesDate = "20200105"
    ds.StudyTime = "101112"
    ds.AcquisitionDateTime = "20200105131415.5+0100"
    ds.PatientBirthDate = "19700101"
    out = _clean(ds, date_shift_days=-100)
    assert out.StudyDate == "20190924"  # 2020-01-02 minus 100 days
    assert out.SeriesDate == "20190927"  # three days later, as before
    assert out.StudyTime == "101112"
    assert out.AcquisitionDateTime == "20190927131415.5+0100"
    assert out["PatientBirthDate"].value in ("", None)  # never shifted: emptied as the profile says
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"


def test_date_helpers() -> None:
    assert shift_date("20200301", -1) == "20200229"
    assert shift_date("2020.03.01", 1) == "20200302"
    assert shift_date("2020", 5) == ""  # not a full date: cannot be shifted safely
    assert shift_date("99991231", 1) == ""
    assert shift_datetime("20201231235959", 1) == "20210101235959"


@pytest.mark.parametrize(
    "modality, sop_class, burned_in, blocked",
    [
        ("CT", CTImageStorage, None, False),
        ("CT", CTImageStorage, "YES", True),
        ("US", UltrasoundImageStorage, None, True),
        ("US", UltrasoundImageStorage, "NO", False),
        ("SC", "1.2.840.10008.5.1.4.1.1.7", None, True),
        ("OT", "1.2.840.10008.5.1.4.1.1.7.4", None, True),
    ],
)
def test_burned_in_annotation(modality: str, sop_class: str, burned_in: str | None, blocked: bool) -> None:
    ds = Dataset()
    ds.Modality = modality
    ds.SOPClassUID = sop_class
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    assert bool(burned_in_annotation_reason(ds)) is blocked


def test_free_text_helpers() -> None:
    assert safe_description("CT Body 3.0 FDG TK KM") == "CT Body 3.0 FDG"
    assert safe_description(f"{MARKER} Smith 19010203 T1 axial 512x512x20") == "T1 axial 512x512x20"
    assert safe_description("<b>John</b> =cmd|' /C calc'!A0") == ""
    assert is_identifying_text("Smith") and is_identifying_text("19010203") and is_identifying_text("ID 884422")
    assert not is_identifying_text("CT chest 1.25 mm") and not is_identifying_text("")
    assert masked("Doe^Jane") == masked("x") != "" and "Doe" not in masked("Doe^Jane")
    assert masked("") == ""


# --- the PHI-seeded study through the DICOM export paths -----------------------------------------


@pytest.fixture(scope="module")
def study():
    return make_phi_study(n_series=2, n_slices=4)


def _all_elements(ds: Dataset):
    yield from ds.file_meta
    yield from ds.iterall()


def check_export(files: dict[str, bytes], study) -> dict[str, list[Dataset]]:
    """The privacy checks every export must pass; returns the datasets by folder."""
    uids = [u.encode() for u in study.original_uids]
    by_folder: dict[str, list[Dataset]] = {}
    for name, data in files.items():
        assert find_markers(name.encode()) == [], name
        assert find_markers(data) == [], f"{name} still holds a marker"
        assert [u for u in uids if u in data] == [], f"{name} still holds an original UID"
        assert data[:128] == b"\x00" * 128
        ds = pydicom.dcmread(io.BytesIO(data))
        assert not [e.tag for e in _all_elements(ds) if e.tag.is_private]
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        by_folder.setdefault(name.rsplit("/", 1)[0], []).append(ds)
    return by_folder


def check_consistency(by_folder: dict[str, list[Dataset]], study) -> None:
    assert len(by_folder) == len(study.sop_uids_by_series)
    series_uids = set()
    for datasets in by_folder.values():
        assert len({ds.SeriesInstanceUID for ds in datasets}) == 1  # exactly one new series UID per series
        series_uids.add(datasets[0].SeriesInstanceUID)
        sops = {int(ds.InstanceNumber): ds.SOPInstanceUID for ds in datasets}
        for ds in datasets:
            # The factory makes slice k reference slice k+1: the link must survive remapping.
            target = sops[int(ds.InstanceNumber) % len(datasets) + 1]
            assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == target
            assert ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == target
            assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ds.SeriesInstanceUID
    assert len(series_uids) == len(by_folder)
    everything = [ds for datasets in by_folder.values() for ds in datasets]
    assert len({ds.StudyInstanceUID for ds in everything}) == 1
    assert len({ds.FrameOfReferenceUID for ds in everything}) == 1


def check_geometry(by_folder: dict[str, list[Dataset]], study) -> None:
    originals = [pydicom.dcmread(io.BytesIO(s.data)) for s in study.sources]
    expected = sorted((o.SeriesNumber, o.InstanceNumber, tuple(o.ImagePositionPatient)) for o in originals)
    got = []
    for datasets in by_folder.values():
        for ds in datasets:
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert [float(v) for v in ds.PixelSpacing] == list(PIXEL_SPACING)
            got.append((ds.SeriesNumber, ds.InstanceNumber, tuple(ds.ImagePositionPatient)))
            original = next(
                o for o in originals if o.SeriesNumber == ds.SeriesNumber and o.InstanceNumber == ds.InstanceNumber
            )
            assert np.array_equal(ds.pixel_array, original.pixel_array)
    assert sorted(got) == expected


def test_core_export_leaks_nothing_and_keeps_geometry(study) -> None:
    export = deidentify_sources(study.sources)
    assert export.problems == []
    by_folder = check_export({f.name: f.data for f in export.files}, study)
    check_consistency(by_folder, study)
    check_geometry(by_folder, study)
    for item in export.files:
        assert item.series_uid == pydicom.dcmread(io.BytesIO(item.data)).SeriesInstanceUID


def test_two_exports_cannot_be_linked(study) -> None:
    one = deidentify_sources(study.sources[:1])
    two = deidentify_sources(study.sources[:1])
    a, b = (pydicom.dcmread(io.BytesIO(e.files[0].data)) for e in (one, two))
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.StudyInstanceUID != b.StudyInstanceUID


def test_date_shift_export_leaks_no_date(study) -> None:
    export = deidentify_sources(study.sources, date_shift_days=365)
    for item in export.files:
        assert find_markers(item.data) == []
        ds = pydicom.dcmread(io.BytesIO(item.data))
        assert ds.StudyDate == "19020203"  # 1901-02-03 + 365 days
        assert ds.StudyTime == MARKER_TIME  # times of day are kept
        assert ds.PatientBirthDate == ""


def _dcm2niix(folder: Path, out: Path) -> list[Path]:
    out.mkdir()
    subprocess.run(
        [str(DCM2NIIX), "-z", "n", "-b", "n", "-f", "%s_%p", "-o", str(out), str(folder)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return sorted(out.glob("*.nii"))


@pytest.mark.skipif(not DCM2NIIX.exists(), reason="dcm2niix is not installed in .venv")
def test_dcm2niix_reads_each_de_identified_series_as_one_volume(study, tmp_path: Path) -> None:
    export = deidentify_sources(study.sources)
    cli_deidentify.write_export(export, tmp_path / "out")
    original = tmp_path / "original"
    original.mkdir()
    first_series = study.sources[:4]
    for source in first_series:
        (original / f"{len(list(original.iterdir())):03d}.dcm").write_bytes(source.data)
    # dcm2niix also writes the PHI overlay of the original as an "_ROI" image; the volume is the other one.
    (reference,) = [p for p in _dcm2niix(original, tmp_path / "nii_original") if "_ROI" not in p.name]
    for folder in sorted((tmp_path / "out").iterdir()):
        (nii,) = _dcm2niix(folder, tmp_path / f"nii_{folder.name}")
        img, ref = nib.load(nii), nib.load(reference)
        assert img.shape == ref.shape == (10, 12, 4)
        assert np.allclose(img.affine, ref.affine, atol=1e-4)
        assert np.array_equal(np.asarray(img.dataobj), np.asarray(ref.dataobj))  # both series hold the same phantom


# --- JSON and CSV exports of the header ------------------------------------------------------------


def test_json_and_csv_exports_of_de_identified_headers(study) -> None:
    headers = [pydicom.dcmread(io.BytesIO(s.data), stop_before_pixels=True) for s in study.sources[:4]]
    cleaned = deidentify_datasets(headers)
    exports = {
        "header.json": datasets_to_json(cleaned),
        "header.csv": b"".join(rows_to_csv(flatten_dataset(ds)) for ds in cleaned),
    }
    uids = [u.encode() for u in study.original_uids]
    for name, data in exports.items():
        assert find_markers(data) == [], name
        assert [u for u in uids if u in data] == [], name
    models = json.loads(exports["header.json"])
    assert len(models) == 4
    for model in models:
        assert not [key for key in model if int(key[:4], 16) % 2 == 1]  # no private tags
        assert model["00100010"]["vr"] == "PN" and "Value" not in model["00100010"]
        assert model["00120062"]["Value"] == ["YES"]
    assert len({m["0020000E"]["Value"][0] for m in models}) == 1
    # Without de-identification the same export does hold the markers: the check can fail.
    assert find_markers(datasets_to_json(headers))


# --- the CLI ----------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m core")
    commands = parser.add_subparsers(dest="command", required=True)
    cli_deidentify.add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.run(args))


def _write_sources(sources: list[Source], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for source in sources:
        (folder / source.name).write_bytes(source.data)
    return folder


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_writes_one_folder_per_series(study, tmp_path: Path, capsys) -> None:
    inputs = _write_sources(study.sources, tmp_path / f"in_{MARKER}")
    code = _cli(["deidentify", str(inputs), "-o", str(tmp_path / "out")])
    assert code == EXIT_OK
    files = _read_tree(tmp_path / "out")
    assert len(files) == len(study.sources)
    by_folder = check_export(files, study)
    check_consistency(by_folder, study)
    check_geometry(by_folder, study)
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_cli_reads_zips(study, tmp_path: Path) -> None:
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for source in study.sources:
            zf.writestr(f"{MARKER}/{source.name}", source.data)
    assert _cli(["deidentify", str(archive), "-o", str(tmp_path / "out")]) == EXIT_OK
    check_consistency(check_export(_read_tree(tmp_path / "out"), study), study)


def test_cli_exit_3_when_nothing_is_dicom(tmp_path: Path, capsys) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a scan")
    assert _cli(["deidentify", str(junk), "-o", str(tmp_path / "out")]) == EXIT_NOTHING_PROCESSED
    err = capsys.readouterr().err
    assert "notes.txt" in err and "nothing could be de-identified" in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_non_empty_output_folder(study, tmp_path: Path) -> None:
    inputs = _write_sources(study.sources[:1], tmp_path / "in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "other.txt").write_text("x")
    assert _cli(["deidentify", str(inputs), "-o", str(tmp_path / "out")]) == EXIT_USAGE


def test_cli_blocks_burned_in_annotation_unless_allowed(tmp_path: Path, capsys) -> None:
    us = make_phi_study(n_series=1, n_slices=2, modality="US", burned_in=None)
    inputs = _write_sources(us.sources, tmp_path / "in")
    assert _cli(["deidentify", str(inputs), "-o", str(tmp_path / "blocked")]) == EXIT_NOTHING_PROCESSED
    assert "Burned In Annotation" in capsys.readouterr().err
    assert _cli(["deidentify", str(inputs), "-o", str(tmp_path / "allowed"), "--allow-burned-in"]) == EXIT_OK
    check_export(_read_tree(tmp_path / "allowed"), us)


def test_cli_through_python_m_core(study, tmp_path: Path) -> None:
    from core.cli import build_parser

    parser = build_parser()
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "deidentify" not in choices:
        pytest.skip("the deidentify subcommand is not wired into core/cli.py yet")
    inputs = _write_sources(study.sources, tmp_path / "in")
    done = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-m", "core", "deidentify", str(inputs), "-o", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == EXIT_OK, done.stderr
    check_consistency(check_export(_read_tree(tmp_path / "out"), study), study)


@pytest.mark.skipif(not DCM2NIIX.exists(), reason="dcm2niix is not installed in .venv")
def test_real_jpeg2000_ct_keeps_its_geometry(tmp_path: Path) -> None:
    """A real Siemens CT (JPEG 2000 lossless): de-identified, it converts to the reference dcm2niix affine."""
    folder = data_path("ct_siemens_j2k_20sl", "dicom")
    (entry,) = [e for e in expected_entries() if e["name"] == "ct_siemens_j2k_20sl"]
    (reference,) = entry["units"][0]["dcm2niix"]["outputs"]
    originals = sorted(folder.iterdir())
    names = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientName) for p in originals}
    export = deidentify_sources([Source(p.name, p.read_bytes()) for p in originals])
    assert export.problems == [] and len(export.files) == 20
    for item in export.files:
        ds = pydicom.dcmread(io.BytesIO(item.data))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # pixels untouched, still J2K
        assert not [e for e in ds.iterall() if e.tag.is_private]
        assert all(n.encode() not in item.data for n in names if n)
    cli_deidentify.write_export(export, tmp_path / "out")
    (nii,) = _dcm2niix(tmp_path / "out" / "series_001_CT", tmp_path / "nii")
    img = nib.load(nii)
    assert list(img.shape) == reference["shape"]
    assert np.allclose(img.affine, reference["affine"], atol=1e-4)


def test_zip_of_a_scanned_series_from_its_headers(study) -> None:
    """The Headers page's DICOM download: the series' uploaded files (Series.files), zipped de-identified."""
    from core.io import scan

    result = scan(study.sources)
    assert len(result.series) == 2
    for series in result.series:
        sources = list(series.files)
        assert len(sources) == 4 and {s.data for s in sources} <= {s.data for s in study.sources}
        archive = zip_export(deidentify_sources(sources))
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            files = {name: zf.read(name) for name in zf.namelist()}
        assert sorted(files) == [f"series_001_CT/IM{n:05d}.dcm" for n in range(1, 5)]
        check_export(files, study)


def test_the_headers_page_export_runs_in_a_worker_and_passes_every_privacy_check(monkeypatch) -> None:  # noqa: ANN001
    import core.deidentify
    from core.worker import run_in_worker

    study = make_phi_study(n_series=2, n_slices=3)

    def tripwire(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("de-identification ran in the server process")

    monkeypatch.setattr(core.deidentify, "deidentify_sources", tripwire)  # the worker has its own copy
    data = run_in_worker(core.deidentify.deidentified_zip, study.sources, date_shift_days=-10)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    by_folder = check_export(files, study)
    assert len(by_folder) == 2 and sum(len(v) for v in by_folder.values()) == 6
