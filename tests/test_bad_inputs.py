"""The bad-input corpus (tests/bad_inputs.py) through the readers, the caps, the CLI and the app.

Every entry must get a clear answer: a CoreError subclass or a refused file with a
message that names the file, holds no traceback and repeats no header text (the
corpus puts a marker in every free-text header value), or a valid volume when the
input is odd but legitimate. Sizes are checked against the caps before anything
is allocated: the memory traced while reading a hostile file stays far below what
its header declares or its bombs inflate to.
"""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from core.errors import CoreError, LimitError
from core.io import scan
from core.series import ScanResult
from core.sources import Limits, Source
from core.volume import Volume
from core.worker import load_series_in_worker, sources_for_series
from tests.bad_inputs import BOMB_BYTES, MARKER, BadInput, corpus, write_corpus
from tests.conftest import REPO
from tests.dicom_factory import make_series

# Codec plug-ins are C libraries that may abort the process on a damaged stream (GDCM does on
# a scrambled JPEG 2000 frame): those entries are only ever decoded in a worker.
NATIVE_CRASH_CATEGORIES = {"corrupt codec stream"}
# Most memory reading any corpus entry may trace: the honest data is a few hundred kB, the
# hostile headers declare gigabytes to petabytes and the bombs inflate to 64 MB.
PEAK_BUDGET_BYTES = 16 * 1024**2
SERVER_FILE_CONTENT = "root:x:0:0"


@functools.cache
def entries() -> tuple[BadInput, ...]:
    return tuple(corpus())


def by_expect(*expects: str) -> list[BadInput]:
    return [entry for entry in entries() if entry.expect in expects]


def ids(items: list[BadInput]) -> list[str]:
    return [entry.name for entry in items]


def assert_clean_message(text: str) -> None:
    """A message for a person: no traceback, no header text, no server file, no control characters."""
    assert text.strip(), "empty message"
    assert "Traceback" not in text and 'File "' not in text, text
    assert MARKER not in text, f"header text repeated in the message: {text}"
    assert SERVER_FILE_CONTENT not in text, text
    assert all(ch >= " " or ch == "\n" for ch in text), f"control characters in {text!r}"
    assert len(text) < 2000, f"message of {len(text)} characters"


def scan_texts(result: ScanResult) -> list[str]:
    return (
        [p.message for p in result.errors]
        + [s.reason for s in result.skipped]
        + [w for s in result.series for w in s.info.warnings]
    )


def accounted_for(result: ScanResult, source: Source) -> bool:
    """The file (or, for a zip, some member of it) appears among errors, skipped or series sources."""
    names = (
        {p.source for p in result.errors}
        | {s.source for s in result.skipped}
        | {n for s in result.series for n in s.info.sources}
    )
    return any(name == source.name or name.startswith(source.basename + "/") for name in names)


def load(entry: BadInput, result: ScanResult, index: int) -> Volume:
    series = result.series[index]
    if entry.category in NATIVE_CRASH_CATEGORIES:
        needed = sources_for_series(entry.sources, series.info.sources)
        return load_series_in_worker(needed, series.info.id, expected_sources=series.info.sources)
    return series.load()


# --------------------------------------------------------------------------- readers


def test_the_corpus_covers_every_class_of_the_issue() -> None:
    categories = {entry.category for entry in entries()}
    for wanted in (
        "not medical", "wrong extension", "empty", "truncated header", "truncated pixels", "declared > data",
        "giant dimensions", "decompression bomb", "length past end", "nested sequences", "invalid VR in meta",
        "corrupt codec stream", "inconsistent LUT", "inconsistent overlay", "file reference", "hostile zip",
        "broken geometry", "negative dimensions", "vox_offset past the end", "bits stored", "slope 0 or NaN",
        "character set", "markup in values and names", "noise volume",
    ):  # fmt: skip
        assert wanted in categories
    formats = {entry.name.split("-")[0] for entry in entries() if entry.category == "giant dimensions"}
    assert {"dicom", "nifti", "nrrd", "mha"} <= formats
    bombs = {entry.name for entry in entries() if entry.category == "decompression bomb"}
    assert {"dicom-deflate-bomb", "niigz-bomb", "nrrd-gzip-bomb", "zip-bomb"} <= bombs


@pytest.mark.parametrize("entry", entries(), ids=ids(list(entries())))
def test_scan_answers_every_file_clearly(entry: BadInput) -> None:
    result = scan(list(entry.sources))
    for text in scan_texts(result):
        assert_clean_message(text)
    for source in entry.sources:
        assert accounted_for(result, source), f"{source.name} is in no list of the scan"
    if entry.expect in ("refused", "skipped"):
        assert not result.series, [s.info.id for s in result.series]
    if entry.expect == "skipped":
        assert result.skipped and not result.errors
    if entry.expect in ("loads", "load_fails"):
        assert result.series, [p.message for p in result.errors]


@pytest.mark.parametrize(
    "entry", by_expect("loads", "load_fails", "clean"), ids=ids(by_expect("loads", "load_fails", "clean"))
)
def test_loading_fails_cleanly_or_gives_a_valid_volume(entry: BadInput) -> None:
    result = scan(list(entry.sources))
    for index, series in enumerate(result.series):
        try:
            volume = load(entry, result, index)
        except CoreError as err:
            assert entry.expect != "loads", f"{entry.name} should load: {err.message}"
            assert_clean_message(err.message)
            if entry.error is not None:
                assert isinstance(err, entry.error), f"{type(err).__name__}: {err.message}"
            continue
        assert entry.expect != "load_fails", f"{entry.name} loaded {volume.shape}"
        assert volume.shape == series.info.shape
        assert np.all(np.isfinite(volume.affine)) and abs(np.linalg.det(volume.affine[:3, :3])) > 0
        assert not volume.array.flags.writeable


def test_zip_member_names_are_labels_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("zip-slip", "zip-absolute-name"):
        entry = next(e for e in entries() if e.name == name)
        result = scan(list(entry.sources))
        names = [n for s in result.series for n in s.info.sources]
        assert names and all(".." not in n.split("/") and not n.split("/", 1)[1].startswith("/") for n in names)
    assert not any(tmp_path.iterdir()) and not Path("/tmp/tomoforge_slip.dcm").exists()


def test_bombs_stop_at_the_declared_size() -> None:
    for name in ("niigz-bomb", "nrrd-gzip-bomb", "mha-zlib-bomb"):
        entry = next(e for e in entries() if e.name == name)
        series = scan(list(entry.sources)).series[0]
        with pytest.raises(LimitError, match="bomb"):
            series.load()


def test_nothing_near_the_declared_sizes_is_ever_allocated() -> None:
    """Trace the memory of scanning and loading each entry (in process); the hostile ones declare far more."""
    over = {}
    for entry in entries():
        if entry.category in NATIVE_CRASH_CATEGORIES:
            continue
        tracemalloc.start()
        try:
            result = scan(list(entry.sources))
            for series in result.series:
                try:
                    series.load()
                except CoreError:
                    pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        if peak > PEAK_BUDGET_BYTES:
            over[entry.name] = peak
    assert not over, {name: f"{peak / 1024**2:.0f} MB" for name, peak in over.items()}
    assert BOMB_BYTES > 2 * PEAK_BUDGET_BYTES  # the bombs would have shown


def test_a_noise_volume_stops_at_the_triangle_cap() -> None:
    from core.mesh import MeshLimits, threshold_surface

    entry = next(e for e in entries() if "noise" in e.tags)
    volume = scan(list(entry.sources)).series[0].load()
    with pytest.raises(LimitError, match="triangles"):
        threshold_surface(volume, 500, limits=MeshLimits(max_triangles=100_000))


# --------------------------------------------------------------------------- configurable caps


def _volume_files(shape: tuple[int, int, int]) -> dict[str, list[Source]]:
    values = (np.arange(int(np.prod(shape))) % 3000).astype(np.int16).reshape(shape)
    raw = values.tobytes(order="F")
    sizes = " ".join(map(str, shape))
    nrrd = (f"NRRD0004\ntype: short\ndimension: 3\nsizes: {sizes}\nendian: little\nencoding: raw\n\n").encode() + raw
    mha = (
        f"ObjectType = Image\nNDims = 3\nDimSize = {sizes}\nElementType = MET_SHORT\nElementSpacing = 1 1 1\n"
        "ElementDataFile = LOCAL\n"
    ).encode() + raw
    dicom = make_series(values.transpose(2, 1, 0)[: shape[2]].astype(np.int16))
    return {
        "nifti": [Source("v.nii", nib.Nifti1Image(values, np.eye(4)).to_bytes())],
        "nrrd": [Source("v.nrrd", nrrd)],
        "metaimage": [Source("v.mha", mha)],
        "dicom": dicom,
    }


@pytest.mark.parametrize("kind", ["nifti", "nrrd", "metaimage", "dicom"])
def test_the_voxel_cap_is_configurable_and_checked_before_allocating(kind: str) -> None:
    shape = (256, 256, 64)  # 4 M voxels, 8 MB of int16
    sources = _volume_files(shape)[kind]
    assert scan(sources).series, "the honest volume loads under the default caps"
    tracemalloc.start()
    try:
        result = scan(sources, Limits(max_voxels=2_000_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not result.series
    assert any("2,000,000" in p.message for p in result.errors), [p.message for p in result.errors]
    assert peak < np.prod(shape) * 2 / 2, f"{peak} bytes traced before refusing"


def _zip(members: dict[str, bytes]) -> Source:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return Source("upload.zip", buffer.getvalue())


@pytest.mark.parametrize(
    ("limits", "members", "words"),
    [
        (Limits(max_archive_members=10), {f"f{n}.dcm": b"x" for n in range(11)}, "cap of 10"),
        (Limits(max_compression_ratio=2.0), {"zeros.dcm": bytes(2 * 1024**2)}, "cap of 2x"),
        (Limits(max_total_bytes=1024**2), {"a.bin": np.random.default_rng(0).bytes(600_000),
                                           "b.bin": np.random.default_rng(1).bytes(600_000)}, "once unpacked"),
        (Limits(max_nesting=1), {"inner.zip": _zip({"a.dcm": b"x"}).data}, "nested"),
    ],
    ids=["members", "ratio", "total bytes", "nesting"],
)  # fmt: skip
def test_archive_caps_are_configurable(limits: Limits, members: dict[str, bytes], words: str) -> None:
    result = scan([_zip(members)], limits)
    assert not result.series
    assert any(words in p.message for p in result.errors), [p.message for p in result.errors]


# --------------------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def _write(entries_: list[BadInput], folder: Path) -> dict[str, list[Path]]:
    written: dict[str, list[Path]] = {}
    for entry in entries_:
        target = folder / entry.name
        target.mkdir(parents=True)
        written[entry.name] = []
        for source in entry.sources:
            path = target / source.name.replace("/", "_")
            path.write_bytes(source.data)
            written[entry.name].append(path)
    return written


def test_cli_info_exits_3_with_a_message_for_every_refused_file(tmp_path: Path) -> None:
    refused = by_expect("refused", "skipped")
    written = _write(refused, tmp_path)
    paths = [str(p) for files in written.values() for p in files]
    out = run_cli("info", "--json", *paths)
    assert out.returncode == 3, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["series"] == []
    listed = [e["source"] for e in report["errors"]] + [s["source"] for s in report["skipped"]]
    for path in paths:
        name = Path(path).name
        assert any(item == name or item.startswith(name + "/") for item in listed), name
    for text in [e["message"] for e in report["errors"]] + [s["reason"] for s in report["skipped"]]:
        assert_clean_message(text)
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == len(report["errors"]) + 1  # one per refused file, then the summary
    assert "Traceback" not in out.stderr


def test_cli_convert_exits_3_with_a_message_for_every_series_that_cannot_be_decoded(tmp_path: Path) -> None:
    failing = [e for e in by_expect("load_fails") if e.category not in NATIVE_CRASH_CATEGORIES]
    written = _write(failing, tmp_path / "in")
    out = run_cli("convert", *[str(p) for files in written.values() for p in files], "-o", str(tmp_path / "out"))
    assert out.returncode == 3, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) >= len(failing)
    for line in errors:
        assert_clean_message(line)
    assert "Traceback" not in out.stderr


def test_write_corpus_makes_one_folder_per_entry(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path)
    assert {p.parent.name for p in paths} == {e.name for e in entries()}


# --------------------------------------------------------------------------- the app


def test_the_whole_corpus_through_the_open_and_view_pages() -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.run()
    uploads = [(s.name, s.data, "application/octet-stream") for e in entries() for s in e.sources]
    at.file_uploader(key="upload_files").set_value(uploads)
    at.run()
    assert not at.exception
    shown = " ".join(e.value.replace("\\", "") for e in at.error)  # undo the Markdown escaping
    skipped = at.dataframe[1].value if len(at.dataframe) > 1 else None
    skipped_names = " ".join(skipped["file"]) if skipped is not None else ""
    assert MARKER not in shown and "Traceback" not in shown
    result = at.session_state["scan"]
    for entry in by_expect("refused"):
        for source in entry.sources:
            assert accounted_for(result, source), source.name
    for problem in result.errors:  # every refused file's message is on the page (once per distinct text)
        assert problem.message.replace("\\", "") in shown, problem.message
    for skipped_file in result.skipped:
        assert skipped_file.source in skipped_names
    for element in [*at.markdown, *at.error, *at.warning, *at.info, *at.caption]:
        assert "<script>" not in element.value and "<img " not in element.value, element.value  # escaped

    # Decode every series whose pixels are suspect, as a user choosing it and opening the viewer would.
    table = at.dataframe[0].value
    # Pixels that fail to decode (a few of each kind; every entry's own outcome is tested above).
    suspect = {n for e in by_expect("load_fails") for n in e.names}
    suspect |= {n for e in entries() if e.category in NATIVE_CRASH_CATEGORIES | {"declared > data"} for n in e.names}
    for series_id, files in _series_files(at).items():
        if not suspect & set(files):
            continue
        at.session_state["current_id"] = series_id  # what choosing it on the Open page does
        at.switch_page("pages/viewer.py").run()
        assert not at.exception, (series_id, at.exception)
        assert at.error, f"{series_id} ({files}) decoded without complaint"
        for element in at.error:
            assert_clean_message(element.value.replace("\\", ""))
            assert any(name in element.value.replace("\\", "") for name in files) or "series" in element.value
    assert len(table) >= len(by_expect("loads"))

    # The session goes on: the sample still opens.
    at.switch_page("pages/upload.py").run()
    at.button[0].click().run()
    assert not at.exception
    assert list(at.dataframe[0].value["modality"]) == ["CT"]


def _series_files(at) -> dict[str, tuple[str, ...]]:  # type: ignore[no-untyped-def]
    result = at.session_state["scan"]
    return {s.info.id: tuple(n.split("/")[0] for n in s.info.sources) for s in result.series}
