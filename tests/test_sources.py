"""Expanding uploads: zips in memory, nested folders, and the caps that stop hostile archives."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from core.errors import LimitError, UnsupportedFileError
from core.sources import Limits, Source, expand_sources, read_paths


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_zip_members_with_nested_folders_are_read_in_memory() -> None:
    data = make_zip({"study/series1/a.dcm": b"A" * 10, "study/series2/b.dcm": b"B" * 20, "study/empty/": b""})
    out = expand_sources([Source("upload.zip", data)])
    assert sorted(s.name for s in out) == ["upload.zip/study/series1/a.dcm", "upload.zip/study/series2/b.dcm"]
    assert {s.basename: len(s.data) for s in out} == {"a.dcm": 10, "b.dcm": 20}


def test_zip_inside_zip_is_expanded_once_and_deeper_nesting_is_refused() -> None:
    inner = make_zip({"x.nii": b"X" * 5})
    out = expand_sources([Source("outer.zip", make_zip({"inner.zip": inner, "y.txt": b"Y"}))])
    assert sorted(s.basename for s in out) == ["x.nii", "y.txt"]
    deep = make_zip({"l2.zip": make_zip({"l3.zip": make_zip({"z": b"Z"})})})
    with pytest.raises(LimitError, match="nested"):
        expand_sources([Source("deep.zip", deep)])


def test_zip_slip_names_stay_labels() -> None:
    out = expand_sources([Source("evil.zip", make_zip({"../../etc/passwd": b"root", "/abs/path.dcm": b"x"}))])
    names = sorted(s.name for s in out)
    assert names == ["evil.zip/abs/path.dcm", "evil.zip/etc/passwd"]
    assert all(".." not in s.name for s in out)


def test_macos_resource_forks_are_dropped() -> None:
    out = expand_sources([Source("mac.zip", make_zip({"__MACOSX/._a.dcm": b"junk", "a.dcm": b"real", "._b": b"j"}))])
    assert [s.basename for s in out] == ["a.dcm"]


def test_zip_bomb_is_refused_before_inflating() -> None:
    bomb = make_zip({"zeros.raw": bytes(50 * 1024**2)})  # 50 MB of zeros deflate ~1000x
    with pytest.raises(LimitError, match="inflates"):
        expand_sources([Source("bomb.zip", bomb)])


def test_too_many_members() -> None:
    data = make_zip({f"f{i}": b"x" for i in range(30)})
    with pytest.raises(LimitError, match="30 members"):
        expand_sources([Source("many.zip", data)], Limits(max_archive_members=20))


def test_total_size_cap() -> None:
    with pytest.raises(LimitError, match="larger than"):
        expand_sources([Source("a", b"x" * 100), Source("b", b"y" * 100)], Limits(max_total_bytes=150))


def test_truncated_zip_is_a_clear_error() -> None:
    data = make_zip({"a.dcm": b"A" * 1000, "b.dcm": b"B" * 1000}, zipfile.ZIP_STORED)
    with pytest.raises(UnsupportedFileError, match="damaged"):
        expand_sources([Source("cut.zip", data[: len(data) // 2])])


def test_encrypted_member_is_refused() -> None:
    data = bytearray(make_zip({"secret.dcm": b"S" * 100}, zipfile.ZIP_STORED))
    # Set the "encrypted" general-purpose flag in the local and central headers.
    data[6] |= 0x1
    central = data.find(b"PK\x01\x02")
    data[central + 8] |= 0x1
    with pytest.raises(UnsupportedFileError, match="encrypted"):
        expand_sources([Source("locked.zip", bytes(data))])


def test_suffixes() -> None:
    assert Source("dir/Brain.NII.GZ", b"").suffix == ".nii.gz"
    assert Source("a.mha", b"").suffix == ".mha"
    assert Source("IM0001", b"").suffix == ""


def test_read_paths_pools_folders_and_skips_symlinks(tmp_path) -> None:
    folder = tmp_path / "study"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.dcm").write_bytes(b"a")
    (folder / "sub" / "b.dcm").write_bytes(b"b")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    (folder / "link").symlink_to(secret)
    single = tmp_path / "c.nii"
    single.write_bytes(b"c")
    names = sorted(s.name for s in read_paths([folder, single]))
    assert names == ["c.nii", "study/a.dcm", "study/sub/b.dcm"]
    with pytest.raises(UnsupportedFileError, match="no such file"):
        read_paths([tmp_path / "missing"])


# --- inflating members (isal, from a view of the archive, in threads for big archives) -----------------------------


def _member_offset(archive: bytes, name: str) -> int:
    """Where a member's stored bytes begin, from its local header."""
    info = zipfile.ZipFile(io.BytesIO(archive)).getinfo(name)
    header = archive[info.header_offset : info.header_offset + 30]
    return info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")


def test_members_inflate_to_what_zipfile_reads_for_every_method() -> None:
    rng = np.random.default_rng(3)
    members = {f"m{n}.bin": rng.integers(0, 8, 50_000 + n, dtype=np.uint8).tobytes() for n in range(4)}
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        out = expand_sources([Source("a.zip", make_zip(members, method))])
        assert {s.basename: s.data for s in out} == members, method


def test_a_big_archive_inflates_in_threads_in_member_order() -> None:
    # More than 8 MB compressed takes the threaded path; the order must stay the archive's.
    rng = np.random.default_rng(4)
    members = {f"s/{n:03d}.dcm": rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes() for n in range(40)}
    out = expand_sources([Source("big.zip", make_zip(members))])
    assert [s.name for s in out] == [f"big.zip/{name}" for name in members]
    assert all(s.data == members[s.name.removeprefix("big.zip/")] for s in out)


def test_a_flipped_byte_fails_the_crc_check() -> None:
    data = b"".join(bytes([n % 251]) for n in range(5000))
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        archive = bytearray(make_zip({"x.dcm": data}, method))
        offset = _member_offset(bytes(archive), "x.dcm") + 100 if method == zipfile.ZIP_STORED else None
        if offset is None:
            # Inside deflate data a flip may break the stream instead: either way a clear error.
            offset = _member_offset(bytes(archive), "x.dcm") + 20
        archive[offset] ^= 0x01
        with pytest.raises(UnsupportedFileError, match="damaged or truncated"):
            expand_sources([Source("flip.zip", bytes(archive))])


def test_a_member_declaring_fewer_bytes_than_it_holds_is_refused() -> None:
    archive = bytearray(make_zip({"x.dcm": b"A" * 10_000}))
    info = zipfile.ZipFile(io.BytesIO(bytes(archive))).getinfo("x.dcm")
    central = bytes(archive).rfind(b"PK\x01\x02")
    archive[central + 24 : central + 28] = (5_000).to_bytes(4, "little")  # uncompressed size in the directory
    with pytest.raises(LimitError, match="more data than its header declares"):
        expand_sources([Source("liar.zip", bytes(archive))])
    assert info.file_size == 10_000


def test_a_member_shorter_than_declared_is_refused() -> None:
    archive = bytearray(make_zip({"x.dcm": b"B" * 10_000}, zipfile.ZIP_STORED))
    central = bytes(archive).rfind(b"PK\x01\x02")
    archive[central + 24 : central + 28] = (20_000).to_bytes(4, "little")  # declares more than stored
    with pytest.raises(UnsupportedFileError, match="damaged or truncated|shorter"):
        expand_sources([Source("short.zip", bytes(archive))])


def test_a_local_header_that_is_not_one_is_a_clear_error() -> None:
    archive = bytearray(make_zip({"w.dcm": b"W" * 1000, "x.dcm": b"C" * 1000}))
    info = zipfile.ZipFile(io.BytesIO(bytes(archive))).getinfo("x.dcm")
    archive[info.header_offset : info.header_offset + 4] = b"XXXX"  # the second member's local header
    with pytest.raises(UnsupportedFileError, match="damaged or truncated"):
        expand_sources([Source("bad.zip", bytes(archive))])
