"""DICOM files read from disk are memory-mapped, not read: same results, half the peak memory.

``read_paths`` maps DICOM files so their bytes stay in the page cache and the
process holds only the volume (issue 8: peak memory while loading <= 2x the
volume). These tests check that a mapped source gives exactly what its bytes
give, on every real DICOM unit, and measure the peak in a fresh process.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.phantom import phantom_volume, write_ct_series
from core.dicom_headers import has_pixel_data
from core.io import scan
from core.sources import Source, open_data, read_paths
from tests.conftest import REPO, data_path, expected_entries


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256 x 256 x 40 CT series: 128 KB files, above the size from which files are mapped."""
    folder = tmp_path_factory.mktemp("mapped") / "ct"
    write_ct_series(phantom_volume((256, 256, 40)), folder)
    return folder


def test_dicom_files_are_mapped_and_other_files_read(ct_folder: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.dcm"
    small.write_bytes(next(ct_folder.iterdir()).read_bytes()[:2000])  # DICM, but below the size worth a map
    text = tmp_path / "notes.txt"
    text.write_bytes(b"x" * 200_000)
    paths = [*sorted(ct_folder.iterdir()), small, text]
    sources = read_paths(paths)  # files, in this order
    assert [type(s.data) for s in sources] == [mmap.mmap] * 40 + [bytes, bytes]
    assert [s.as_bytes() for s in sources] == [path.read_bytes() for path in paths]


def test_a_mapped_series_loads_like_its_bytes(ct_folder: Path) -> None:
    mapped = read_paths([ct_folder])
    read = [Source(s.name, s.as_bytes()) for s in mapped]
    assert all(isinstance(s.data, mmap.mmap) for s in mapped)
    _assert_same_scan(scan(mapped), scan(read))


def _dicom_units() -> list[tuple[str, str]]:
    units = [
        (entry["name"], unit["unit"])
        for entry in expected_entries()
        if entry["kind"].startswith("dicom")
        for unit in entry["units"]
    ]
    return units or [("missing", "missing")]


@pytest.mark.parametrize(("entry", "unit"), _dicom_units(), ids=lambda v: str(v))
def test_every_real_dicom_unit_loads_the_same_mapped_or_read(entry: str, unit: str) -> None:
    path = data_path(entry, *unit.rstrip("/").split("/"))
    mapped = read_paths([path])
    read = [Source(s.name, s.as_bytes()) for s in mapped]
    _assert_same_scan(scan(mapped), scan(read))


def _assert_same_scan(mapped, read) -> None:  # noqa: ANN001 - two ScanResults
    assert [p.message for p in mapped.errors] == [p.message for p in read.errors]
    assert [(s.name, s.reason) for s in mapped.skipped] == [(s.name, s.reason) for s in read.skipped]
    assert [s.info.to_json() for s in mapped.series] == [s.info.to_json() for s in read.series]
    for ours, theirs in zip(mapped.series, read.series, strict=True):
        a, b = ours.load(), theirs.load()
        assert a.shape == b.shape and a.array.dtype == b.array.dtype
        assert np.array_equal(a.array, b.array)
        assert np.array_equal(a.affine, b.affine)


def test_pixel_data_tag_is_found_in_a_map(ct_folder: Path) -> None:
    # `tag in data` on a map tests for a single byte: this is the bug that would hide.
    source = read_paths([next(ct_folder.iterdir())])[0]
    assert isinstance(source.data, mmap.mmap)
    assert has_pixel_data(source.data)
    assert not has_pixel_data(source.data[:300])


def test_a_mapped_source_pickles_as_bytes(ct_folder: Path) -> None:
    source = read_paths([next(ct_folder.iterdir())])[0]
    copy = pickle.loads(pickle.dumps(source))
    assert isinstance(copy.data, bytes)
    assert copy.name == source.name and copy.data == source.data[:]


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=300),
    steps=st.lists(
        st.tuples(st.sampled_from(["read", "seek0", "seek1", "seek2"]), st.integers(min_value=-50, max_value=400)),
        max_size=12,
    ),
)
def test_open_data_on_a_view_reads_like_bytesio(data: bytes, steps: list[tuple[str, int]]) -> None:
    reader = open_data(bytearray(data))  # type: ignore[arg-type] - any buffer other than bytes takes the view path
    reference = io.BytesIO(data)
    assert not isinstance(reader, io.BytesIO)
    for step, number in steps:
        if step == "read":
            size = number if number < 0 or number % 3 else None  # -1/None/n as pydicom uses them
            assert reader.read(size) == reference.read(size)
        else:
            whence = int(step[-1])
            offset = abs(number) if whence == 0 else number
            try:
                expected = reference.seek(offset, whence)
            except ValueError:
                with pytest.raises(ValueError):
                    reader.seek(offset, whence)
                continue
            assert reader.seek(offset, whence) == expected
        assert reader.tell() == reference.tell()


# Runs in a fresh interpreter so the measured high-water mark is the load's alone.
_PEAK_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from core.io import scan
from core.sources import Source, read_paths

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

mode = sys.argv[3]
Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
baseline = status("VmRSS")
sources = read_paths([sys.argv[2]])
if mode == "bytes":
    sources = [Source(s.name, s.as_bytes()) for s in sources]
volume = scan(sources).series[0].load()
print(json.dumps({"above": status("VmHWM") - baseline, "volume": volume.array.nbytes}))
"""


def _peak_ratio(folder: Path, mode: str) -> float:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure a process's peak memory")
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, str(REPO), str(folder), mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found["above"] / found["volume"]


def test_loading_from_disk_holds_the_volume_not_the_files_too(tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    write_ct_series(phantom_volume((512, 512, 100)), folder)  # 52 MB volume, 100 files of 512 KB
    mapped = _peak_ratio(folder, "mapped")
    held = _peak_ratio(folder, "bytes")
    # The control shows the probe sees held bytes: files + volume is 2x.
    assert held > 1.9, f"the probe should see the held file bytes: {held:.2f}x"
    assert mapped < 1.3, f"peak while loading mapped files is {mapped:.2f}x the volume"


_FEW_DESCRIPTORS = """
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
import mmap
from core.io import scan
from core.sources import read_paths

open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 256 + 10, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
sources = read_paths([sys.argv[2]])
volume = scan(sources).series[0].load()
print(json.dumps({"mapped": sum(isinstance(s.data, mmap.mmap) for s in sources), "files": len(sources),
                  "sum": int(volume.array.sum(dtype="int64"))}))
"""


def test_files_beyond_the_spare_descriptors_are_read(ct_folder: Path) -> None:
    if not Path("/proc/self/fd").exists():
        pytest.skip("needs Linux /proc to count open descriptors")
    done = subprocess.run(
        [sys.executable, "-c", _FEW_DESCRIPTORS, str(REPO), str(ct_folder)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ},
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["files"] == 40
    assert 1 <= found["mapped"] <= 12, found  # about the 10 spare, never all 40
    expected = scan([Source(s.name, s.as_bytes()) for s in read_paths([ct_folder])]).series[0].load()
    assert found["sum"] == int(expected.array.sum(dtype="int64"))
