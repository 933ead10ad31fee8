"""Uploaded bytes with their names: expanding zips in memory and reading paths for the CLI.

Inputs to ``core`` are plain ``Source(name, data)`` values, never Streamlit
objects or open files. Names are only labels: nothing here writes to disk, and a
name inside a zip is never used as a path.

``data`` is ``bytes``, except for DICOM files the CLI reads from disk: those are
read-only memory maps (:func:`read_paths`), so a series' file bytes live in the
kernel's page cache rather than in the process (a 1 GB series would otherwise
be held twice: its files and its volume). Code that reads ``data`` uses what
both types share: ``len``, slices (which give ``bytes``), ``find``/``rfind``,
and the buffer protocol (``memoryview``, ``np.frombuffer``, ``io.BytesIO``).
``x in data`` is not shared: on a map it tests for one byte.
"""

from __future__ import annotations

import io
import mmap
import os
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeAlias, TypeVar, cast

from isal import isal_zlib

from core.errors import LimitError, UnsupportedFileError


@dataclass(frozen=True)
class Limits:
    """Caps checked before anything is allocated. Defaults suit a 24 GiB, 2-core server."""

    max_total_bytes: int = 4 * 1024**3  # all uncompressed inputs of one upload together
    max_archive_members: int = 20_000
    max_compression_ratio: float = 200.0  # per zip member; CT zips deflate ~3x, bombs 1000x
    max_voxels: int = 1_100_000_000  # a 512x512x4000 int16 CT is 1.05e9 voxels (2 GB)
    max_nesting: int = 2  # zip inside zip


DEFAULT_LIMITS = Limits()


SourceData: TypeAlias = bytes | mmap.mmap
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, eq=False)
class Source:
    """One uploaded file: a display name (relative path inside the upload) and its bytes."""

    name: str
    data: SourceData

    def as_bytes(self) -> bytes:
        """The data as ``bytes``: itself, or a copy of a mapped file (for readers that need ``bytes``)."""
        return self.data if isinstance(self.data, bytes) else bytes(self.data)

    def release_pages(self) -> None:
        """Give back the pages of a memory-mapped file this process has touched (no-op for bytes).

        The next access reads them again from the page cache. Called once a
        file's header has been read and once its pixels are in the volume, so
        the process never holds the file bytes and the volume at the same time.
        """
        if isinstance(self.data, mmap.mmap):
            self.data.madvise(mmap.MADV_DONTNEED)

    def __reduce__(self) -> tuple[Any, ...]:
        # A map cannot cross a process boundary; its bytes can.
        return (Source, (self.name, self.as_bytes()))

    @property
    def basename(self) -> str:
        return PurePosixPath(self.name.replace("\\", "/")).name

    @property
    def suffix(self) -> str:
        """Lower-case suffix, with the double suffixes we care about (".nii.gz")."""
        lower = self.basename.lower()
        for double in (".nii.gz", ".nrrd.gz", ".hdr.gz", ".img.gz"):
            if lower.endswith(double):
                return double
        return PurePosixPath(lower).suffix


def open_data(data: SourceData) -> BinaryIO:
    """A read-only binary file over the data, without copying it.

    ``io.BytesIO`` shares a ``bytes`` object but copies anything else (a whole
    mapped file, kept alive by a pydicom dataset that reads lazily from it).
    """
    if isinstance(data, bytes):
        return io.BytesIO(data)
    # Not wrapped in io.BufferedReader: pydicom takes one for a file on disk and reopens it by name.
    return _ViewReader(memoryview(data))


class _ViewReader(io.RawIOBase, BinaryIO):
    """A seekable reader over a memoryview, for :func:`open_data`."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._pos + size
        chunk = self._view[self._pos : end].tobytes()
        self._pos += len(chunk)
        return chunk

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(buffer)]
        buffer[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET and offset < 0:
            raise ValueError(f"negative seek position {offset}")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)  # as io.BytesIO: relative seeks stop at the start
        return self._pos

    def tell(self) -> int:
        return self._pos


def is_zip(data: SourceData) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def expand_sources(sources: Iterable[Source], limits: Limits = DEFAULT_LIMITS) -> list[Source]:
    """Replace every zip by its members (recursively, up to ``limits.max_nesting``).

    Member names are prefixed with the zip's name so messages can say where a
    file came from. Directories, macOS resource forks and empty members are
    dropped.

    Raises
    ------
    LimitError
        Too many members, a member that inflates more than the allowed ratio,
        or more uncompressed bytes in total than allowed.
    UnsupportedFileError
        A damaged or encrypted zip.
    """
    out: list[Source] = []
    total = 0
    pending = [(s, 0) for s in sources]
    while pending:
        source, depth = pending.pop(0)
        if not is_zip(source.data):
            total += len(source.data)
            _check_total(total, limits)
            out.append(source)
            continue
        if depth >= limits.max_nesting:
            raise LimitError(
                f"{source.name}: zip nested more than {limits.max_nesting} levels deep. "
                "Unpack the inner archives and upload the files.",
                source=source.name,
            )
        # Members are counted towards the total when they are taken off the queue.
        pending.extend((member, depth + 1) for member in _zip_members(source, limits))
    return out


def _check_total(total: int, limits: Limits) -> None:
    if total > limits.max_total_bytes:
        raise LimitError(
            f"upload is larger than {limits.max_total_bytes / 1024**3:.1f} GB once unpacked. "
            "Upload one series at a time."
        )


def _declared_member_count(data: SourceData) -> int | None:
    """The number of members the zip's end-of-central-directory record declares, or None if not found.

    Read from the last bytes only, before :class:`zipfile.ZipFile` builds one
    ``ZipInfo`` per member (about 500 bytes each: a 1 GB upload can declare 20
    million members).
    """
    tail_start = max(0, len(data) - (22 + 65535))  # the record is 22 bytes plus a comment of at most 64 kB
    end = data.rfind(b"PK\x05\x06", tail_start)
    if end < 0 or end + 22 > len(data):
        return None
    count = int.from_bytes(data[end + 10 : end + 12], "little")
    if count != 0xFFFF:
        return count
    # Zip64: the locator just before the record points at the zip64 end record.
    locator = end - 20
    if locator < 0 or data[locator : locator + 4] != b"PK\x06\x07":
        return None
    record = int.from_bytes(data[locator + 8 : locator + 16], "little")
    if data[record : record + 4] != b"PK\x06\x06":
        return None
    return int.from_bytes(data[record + 32 : record + 40], "little")


def _zip_members(source: Source, limits: Limits) -> list[Source]:
    declared = _declared_member_count(source.data)
    if declared is not None and declared > limits.max_archive_members:
        raise LimitError(
            f"{source.name}: {declared} members, more than the cap of {limits.max_archive_members}. "
            "Split the archive by series.",
            source=source.name,
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(source.data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise UnsupportedFileError(
            f"{source.name}: damaged zip archive ({err}). Re-create the zip and upload it again.",
            source=source.name,
        ) from err
    if len(infos) > limits.max_archive_members:
        raise LimitError(
            f"{source.name}: {len(infos)} members, more than the cap of {limits.max_archive_members}. "
            "Split the archive by series.",
            source=source.name,
        )
    wanted: list[tuple[zipfile.ZipInfo, str]] = []
    declared_total = 0
    for info in infos:
        name = info.filename.replace("\\", "/")
        base = PurePosixPath(name).name
        if info.is_dir() or not base or base.startswith("._") or "__MACOSX/" in name:
            continue
        if info.flag_bits & 0x1:
            raise UnsupportedFileError(
                f"{source.name}: member {base} is encrypted. Upload an archive without a password.",
                source=source.name,
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > 1024**2 and ratio > limits.max_compression_ratio:
            raise LimitError(
                f"{source.name}: member {base} inflates {ratio:.0f}x, above the cap of "
                f"{limits.max_compression_ratio:.0f}x (a zip bomb?). Upload the files unzipped.",
                source=source.name,
            )
        declared_total += info.file_size
        _check_total(declared_total, limits)
        if info.file_size:
            # The member path is a label only; strip anything that looks absolute or climbs up.
            wanted.append((info, "/".join(part for part in PurePosixPath(name).parts if part not in ("..", "/", ""))))

    def read(item: tuple[zipfile.ZipInfo, str]) -> Source | None:
        info, safe = item
        data = _inflate(source, archive, info)
        return Source(name=f"{source.basename}/{safe.lstrip('/')}", data=data) if data else None

    # Inflating is most of an upload's scan time, and isal releases the GIL: a few threads share it.
    # Only our own inflating runs in threads; members zipfile reads (bzip2, LZMA) are read one by one.
    ours = all(info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) for info, _ in wanted)
    threaded = ours and sum(info.compress_size for info, _ in wanted) >= _THREADED_INFLATE_BYTES
    found = _map_in_threads(read, wanted, "inflate") if threaded else [read(item) for item in wanted]
    return [member for member in found if member is not None]


def _map_in_threads(function: Callable[[T], R], items: Sequence[T], name: str) -> list[R]:
    """``[function(item) for item in items]`` in up to ``_READ_THREADS`` threads, in order (the first error raised)."""
    threads = min(_READ_THREADS, len(items))
    if threads < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name) as pool:
        return list(pool.map(function, items))


def _inflate(source: Source, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, at most its declared size; raw deflate straight from the archive's memory.

    Members stored or deflated (nearly every zip) are inflated here with isal
    from a view of the archive (no copy, ~2x zlib's speed) and their CRC-32 is
    checked as :mod:`zipfile` does; other methods (bzip2, LZMA) go through
    :mod:`zipfile`. Reading at most the declared size + 1 means a lying header
    cannot inflate further.
    """
    base = PurePosixPath(info.filename.replace("\\", "/")).name
    try:
        raw = _raw_member(source.data, info)
        if raw is None:
            with archive.open(info) as handle:
                data = handle.read(info.file_size + 1)
        else:
            data = raw.tobytes() if info.compress_type == zipfile.ZIP_STORED else _inflate_raw(raw, info.file_size + 1)
            if len(data) == info.file_size and isal_zlib.crc32(data) != info.CRC:
                raise zipfile.BadZipFile(f"bad CRC-32 for file {base!r}")
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, ValueError, _IsalError) as err:
        raise UnsupportedFileError(
            f"{source.name}: member {base} cannot be read ({err}). The archive is damaged or truncated.",
            source=source.name,
        ) from err
    if len(data) > info.file_size:
        raise LimitError(
            f"{source.name}: member {base} holds more data than its header declares.",
            source=source.name,
        )
    if len(data) < info.file_size:
        raise UnsupportedFileError(
            f"{source.name}: member {base} is shorter than its header declares. The archive is damaged or truncated.",
            source=source.name,
        )
    return data


def _raw_member(data: SourceData, info: zipfile.ZipInfo) -> memoryview | None:
    """The member's stored bytes, located through its local header; None when zipfile must read it."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return None
    start = info.header_offset
    header = data[start : start + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local file header for {info.filename!r}")
    begin = start + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    end = begin + info.compress_size
    if end > len(data):
        raise zipfile.BadZipFile(f"member {info.filename!r} runs past the end of the archive")
    return memoryview(data)[begin:end]


def _inflate_raw(raw: memoryview, max_length: int) -> bytes:
    inflater = isal_zlib.decompressobj(-15)  # raw deflate, no zlib header
    return inflater.decompress(raw, max_length)


def read_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Source]:
    """Read files and folders (recursively) from disk for the CLI, pooled as one upload.

    Symbolic links are not followed inside folders. Names are relative to the
    argument they came from. Files are read by a few threads (a read releases the
    GIL, and on a 300-file series the kernel's copying is most of the time); the
    list keeps the order of the arguments and of sorted folder entries, and the
    first error in that order is raised.

    DICOM files (the "DICM" marker at byte 128) of at least ``_MAP_MIN_BYTES``
    are memory-mapped read-only instead of read (see the module docstring), as
    long as the process has file descriptors to spare: each map keeps one open.
    A file changed or truncated while the command runs is therefore read as it is
    then; do not edit the inputs of a running command.
    """
    # (name, path to read) or (argument, None) for an argument that does not exist.
    entries: list[tuple[str, Path | None]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.is_file() and not file.is_symlink():
                    entries.append((f"{path.name}/{file.relative_to(path).as_posix()}", file))
        elif path.is_file():
            entries.append((path.name, path))
        else:
            entries.append((str(raw), None))
            break  # nothing after it is read: the error is raised when the files before it are in

    # Mapping is a few system calls per file, fastest in one thread; reading copies bytes, which threads share.
    budget = _map_budget()  # the first `budget` files may be mapped
    contents: list[SourceData | None] = [
        _map_file(path) if path is not None and index < budget else None for index, (_, path) in enumerate(entries)
    ]
    unread = [(index, path) for index, (_, path) in enumerate(entries) if path is not None and contents[index] is None]
    read = _map_in_threads(lambda item: item[1].read_bytes(), unread, "read-paths")
    for (index, _), content in zip(unread, read, strict=True):
        contents[index] = content
    sources: list[Source] = []
    for (name, _), data in zip(entries, contents, strict=True):
        if data is None:
            raise UnsupportedFileError(f"{name}: no such file or folder", source=name)
        sources.append(Source(name=name, data=data))
    return sources


def _map_file(path: Path) -> mmap.mmap | None:
    """A read-only map of a DICOM file worth mapping, or None (the file is then read)."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size < _MAP_MIN_BYTES or os.pread(handle.fileno(), 4, 128) != b"DICM":
            return None
        try:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None  # out of descriptors or maps, or a file that cannot be mapped: read it
    mapped.madvise(mmap.MADV_WILLNEED)  # read ahead into the page cache, not into this process
    return mapped


def _map_budget() -> int:
    """How many files may still be mapped: the open-file limit minus open descriptors and a reserve.

    0 where the open descriptors cannot be counted (no ``/proc``).
    """
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        open_now = len(os.listdir("/proc/self/fd"))
    except (ImportError, OSError):
        return 0
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(0, soft - open_now - _FD_RESERVE)


# Smaller files are read: a map costs a descriptor and a system call or two.
_MAP_MIN_BYTES = 64 * 1024
# Descriptors left for everything else the process opens (outputs, libraries, workers).
_FD_RESERVE = 256

# isal's stub declares its error class as an instance.
_IsalError = cast("type[Exception]", isal_zlib.error)

# Below this many compressed bytes, inflating in threads costs more than it saves.
_THREADED_INFLATE_BYTES = 8 * 1024**2

# Two cores share the page-cache copying; more threads only add contention.
_READ_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
