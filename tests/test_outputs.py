"""CLI outputs are written to a temporary name and moved into place (core.outputs).

An output may replace an input the same command has memory-mapped; truncating
a mapped file in place makes the next read of it die with SIGBUS.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.phantom import phantom_volume, write_ct_series
from core.outputs import replacing, write_file
from core.sources import read_paths
from tests.conftest import REPO


def test_the_new_contents_appear_only_when_the_block_ends(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with replacing(target) as handle:
        handle.write(b"new contents")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), replacing(target) as handle:
        handle.write(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_new_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    write_file(tmp_path / "a.json", "{}\n")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "a.json").read_text() == "{}\n"


# Reads a mapped file after another write replaced it; prints its first bytes.
_READ_AFTER_WRITE = """
import mmap, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from core.outputs import replacing
path = Path(sys.argv[2])
with path.open("rb") as handle:
    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
if sys.argv[3] == "replace":
    with replacing(path) as out:
        out.write(b"x")
else:
    path.write_bytes(b"x")  # truncates the mapped file in place
print(bytes(mapped[-4:]).hex())
"""


@pytest.mark.parametrize("how", ["replace", "truncate"])
def test_a_mapped_input_survives_being_replaced(tmp_path: Path, how: str) -> None:
    path = tmp_path / "input.dcm"
    path.write_bytes(bytes(range(256)) * 1024)
    done = subprocess.run(
        [sys.executable, "-c", _READ_AFTER_WRITE, str(REPO), str(path), how], capture_output=True, text=True, timeout=60
    )
    if how == "replace":
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "fcfdfeff"
    else:  # the hazard the module exists for
        assert done.returncode == -7, (done.returncode, done.stderr)  # SIGBUS


def test_converting_a_folder_into_itself_twice_works(tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    write_ct_series(phantom_volume((256, 256, 8)), folder)  # 128 KB files: mapped when read
    assert all(isinstance(s.data, mmap.mmap) for s in read_paths([folder]))
    command = [sys.executable, "-m", "core", "convert", str(folder), "--to", "dicom", "-o", str(folder)]
    for _ in range(2):  # the second run reads the first run's output while it writes it again
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert not list(folder.rglob("*.part"))
    info = subprocess.run(
        [sys.executable, "-m", "core", "info", str(folder)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert info.returncode == 0, info.stderr
