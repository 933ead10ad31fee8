"""Run decoding, conversion and meshing in worker processes with memory, CPU and time limits.

A hostile or broken file can make a C library crash (GDCM aborts on a scrambled
JPEG 2000 stream), loop or allocate without end. Run in the server process, that
takes every user's session down with it; run here, it ends one worker process and
becomes a :class:`~core.errors.CoreError` for the one user who sent the file.

Design
------
* One fresh process per job, forked from a ``forkserver`` that has already imported
  numpy, pydicom and the readers (a fork costs milliseconds, not the 1-2 s of a
  spawned interpreter). A fresh process gets its own limits, can be killed on its
  own when it overruns without failing anybody else's job (a shared
  ``ProcessPoolExecutor`` can only be torn down whole), and gives all its memory
  back to the system when it ends.
* At most :data:`MAX_WORKERS` jobs run at once (2: the machine's cores); more
  wait for a slot, so one user's long job never stalls the server's event loop
  (REFERENCE.md section 5: ten meshing jobs in the server process took health
  checks to 5.8 s).
* Each job sets ``RLIMIT_AS`` (its address space may grow by
  ``WorkerLimits.memory_bytes``) and ``RLIMIT_CPU``; the parent enforces the wall
  time and kills the process when it is over.
* Large ``bytes`` and numpy arrays, in either direction, travel through anonymous
  memory files (``memfd``) whose descriptors are passed over the pipe: the upload
  is copied once into the job, and the decoded volume is mapped by the parent
  without a copy. Nothing is written to disk.

The job function and its arguments must be picklable: a module-level function and
plain values. :class:`~core.series.Series` loaders are closures, so a series is
loaded with :func:`load_series_in_worker`, which sends the uploaded files and reads
them again in the worker.
"""

from __future__ import annotations

import io
import mmap
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import reduction
from typing import Any, TypeVar

import numpy as np

from core.errors import CoreError, LimitError, UnsupportedFileError
from core.sources import DEFAULT_LIMITS, Limits, Source, is_zip
from core.volume import Volume

__all__ = [
    "MAX_WORKERS",
    "WorkerCrashError",
    "WorkerLimits",
    "DEFAULT_WORKER_LIMITS",
    "run_in_worker",
    "load_series",
    "load_series_in_worker",
    "sources_for_series",
]

T = TypeVar("T")

# Two cores on the server: two jobs at once keep both busy and the event loop free.
MAX_WORKERS = max(1, int(os.environ.get("TOMOFORGE_WORKERS", "2")))
# Values at least this large travel through memfd instead of the pickle stream.
OUT_OF_BAND_BYTES = 256 * 1024
# Modules imported once by the fork server, so that each job starts with them loaded.
PRELOAD = ["core.worker", "core.io", "core.dicom_pixels"]


class WorkerCrashError(CoreError):
    """The worker process of a job stopped without an answer (a crash inside a C library, or killed)."""


@dataclass(frozen=True)
class WorkerLimits:
    """Limits of one job's process.

    Parameters
    ----------
    memory_bytes : int
        How much the job's address space (``RLIMIT_AS``) may grow beyond what the
        process maps when it starts. Decoding needs the volume about twice (the
        decoded array and its copy into shared memory); the largest volume the
        readers accept (``Limits.max_voxels`` int16) is 2.2 GB.
    cpu_seconds : int
        CPU time (``RLIMIT_CPU``); the kernel ends the process past it.
    wall_seconds : float
        Time from start to answer; the parent kills the process past it. Also the
        longest a job waits for a free worker slot.
    """

    memory_bytes: int = 10 * 1024**3
    cpu_seconds: int = 600
    wall_seconds: float = 900.0


DEFAULT_WORKER_LIMITS = WorkerLimits()

# Server-wide (not per-user) resources: the job slots and the process context.
_SLOTS = threading.BoundedSemaphore(MAX_WORKERS)
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


# --------------------------------------------------------------------------- public API


def run_in_worker(
    fn: Callable[..., T],
    *args: Any,
    limits: WorkerLimits = DEFAULT_WORKER_LIMITS,
    what: str = "",
    **kwargs: Any,
) -> T:
    """Call ``fn(*args, **kwargs)`` in a fresh worker process and return its result.

    Parameters
    ----------
    fn : callable
        A module-level function (it is pickled by reference).
    *args, **kwargs
        Picklable arguments; large ``bytes`` and arrays are shared, not pickled.
    limits : WorkerLimits
        Memory, CPU and wall-time limits of the job.
    what : str
        What the job works on, for messages (a file or series name).

    Returns
    -------
    The function's return value. Arrays in it are backed by shared memory that is
    freed when they are; they are read-only when they were read-only in the worker.

    Raises
    ------
    CoreError
        Whatever CoreError the function raised, as it raised it.
    LimitError
        The job ran out of memory, CPU time or wall time, or no worker slot came free in time.
    WorkerCrashError
        The worker process died (a crash in a C library, killed by the system).
    Exception
        Any other exception the function raised (a bug), with its type and message.
    """
    label = what or getattr(fn, "__name__", "job")
    started = time.monotonic()
    if not _SLOTS.acquire(timeout=limits.wall_seconds):
        raise LimitError(
            f"{label}: the server is busy ({MAX_WORKERS} jobs running for {limits.wall_seconds:.0f} s); "
            "try again in a few minutes.",
            source=label,
        )
    try:
        status, value = _run(fn, args, kwargs, limits, label, started)
    finally:
        _SLOTS.release()
    if status == "ok":
        return value  # type: ignore[no-any-return]
    raise value


def load_series(
    sources: Sequence[Source],
    series_id: str,
    expected_sources: Sequence[str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Volume:
    """Scan ``sources`` and load one series (what a worker runs; also usable in-process).

    Parameters
    ----------
    sources : sequence of Source
        Uploaded files (zips are expanded).
    series_id : str
        ``SeriesInfo.id`` from the scan in the server.
    expected_sources : sequence of str, optional
        ``SeriesInfo.sources`` from that scan. When given, only those files are
        scanned again (faster for a study of many series) and the series is
        chosen by its files, which identify it whatever its id in the smaller scan.
    limits : Limits
        The caps of the first scan.

    Raises
    ------
    CoreError
        The series is not found again, or loading it fails.
    """
    from core.io import scan
    from core.sources import expand_sources

    pool = list(sources)
    if expected_sources:
        wanted = set(expected_sources)
        expanded: list[Source] = []
        for source in pool:
            try:
                expanded.extend(expand_sources([source], limits))
            except CoreError:
                continue  # a refused archive holds none of this series' files (the scan said why)
        subset = [s for s in expanded if s.name in wanted]
        if {s.name for s in subset} == wanted:
            pool = subset
    result = scan(pool, limits)
    chosen = None
    if expected_sources:
        chosen = next((s for s in result.series if tuple(s.info.sources) == tuple(expected_sources)), None)
    if chosen is None:
        chosen = next((s for s in result.series if s.info.id == series_id), None)
    if chosen is None:
        reason = result.errors[0].message if result.errors else "the files no longer form that series"
        raise UnsupportedFileError(
            f"series {series_id}: not found when the upload was read again for decoding ({reason}).",
            source=series_id,
        )
    return chosen.load()


def load_series_in_worker(
    sources: Sequence[Source],
    series_id: str,
    *,
    expected_sources: Sequence[str] | None = None,
    source_limits: Limits = DEFAULT_LIMITS,
    limits: WorkerLimits = DEFAULT_WORKER_LIMITS,
) -> Volume:
    """Decode a series in a worker process (see :func:`load_series` and :func:`run_in_worker`).

    Parameters
    ----------
    sources : sequence of Source
        The upload (or the part of it holding the series: :func:`sources_for_series`).
    series_id : str
    expected_sources : sequence of str, optional
        ``SeriesInfo.sources`` of the series.
    source_limits : Limits
        Caps for reading the files again.
    limits : WorkerLimits
        Limits of the worker process.

    Returns
    -------
    Volume
        Its array maps shared memory (read-only, no copy).
    """
    volume = run_in_worker(
        load_series,
        list(sources),
        series_id,
        tuple(expected_sources) if expected_sources is not None else None,
        source_limits,
        limits=limits,
        what=f"series {series_id}",
    )
    if not isinstance(volume, Volume):  # pragma: no cover - load_series returns a Volume
        raise TypeError(f"worker returned {type(volume).__name__}, not a Volume")
    return volume


def sources_for_series(sources: Sequence[Source], series_sources: Sequence[str]) -> list[Source]:
    """The uploaded files a series needs: those it names, and the zips its files came from.

    Keeps the copy sent to a worker small when a study of many series was
    uploaded. Zip members are named ``<zip name>/<path>``; when a name matches no
    uploaded file or zip (members of a zip inside a zip), every zip is sent.
    """
    wanted = set(series_sources)
    direct = [s for s in sources if s.name in wanted]
    zips = [s for s in sources if s.name not in wanted and is_zip(s.data)]
    prefixes = {s.basename + "/": s for s in zips}
    matched = [z for prefix, z in prefixes.items() if any(name.startswith(prefix) for name in wanted)]
    covered = {s.name for s in direct} | {n for n in wanted if any(n.startswith(p) for p in prefixes)}
    if covered != wanted:
        matched = zips
    return direct + [z for z in zips if any(z is m for m in matched)]


# --------------------------------------------------------------------------- parent side


def _run(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    limits: WorkerLimits,
    label: str,
    started: float,
) -> tuple[str, Any]:
    payload, blobs = _dump((fn, args, kwargs))
    parent_end, child_end = _CONTEXT.Pipe(duplex=True)
    process = _CONTEXT.Process(target=_worker_main, args=(child_end, limits), name="tomoforge-worker", daemon=True)
    try:
        try:
            process.start()
        finally:
            child_end.close()
        assert process.pid is not None  # set by start()
        try:
            _send(parent_end, payload, blobs, process.pid)
        except OSError:
            pass  # the worker died before reading its job: its exit status says why
        return _receive(parent_end, process, limits, label, started)
    finally:
        for fd in blobs:
            os.close(fd)
        parent_end.close()
        _reap(process)


def _receive(
    conn: multiprocessing.connection.Connection, process: Any, limits: WorkerLimits, label: str, started: float
) -> tuple[str, Any]:
    deadline = started + limits.wall_seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            process.kill()
            raise LimitError(
                f"{label}: stopped after {limits.wall_seconds:.0f} s, the time limit of a job. The file may be "
                "damaged or too large; try a smaller part of it.",
                source=label,
            )
        ready = multiprocessing.connection.wait([conn, process.sentinel], timeout=min(remaining, 1.0))
        if conn in ready or (ready and conn.poll()):
            try:
                n_blobs, payload = conn.recv()
                fds = [reduction.recv_handle(conn) for _ in range(n_blobs)]
            except (EOFError, OSError):
                break  # died while answering
            try:
                return _load(payload, fds)  # type: ignore[no-any-return]
            finally:
                for fd in fds:
                    os.close(fd)
        if process.sentinel in ready:
            break
    process.join(timeout=5)
    raise _death_error(process.exitcode, limits, label)


def _death_error(exitcode: int | None, limits: WorkerLimits, label: str) -> CoreError:
    if exitcode is not None and exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == signal.SIGXCPU:
            return LimitError(
                f"{label}: stopped after {limits.cpu_seconds} s of CPU time, the limit of a job. The file may be "
                "damaged or too large; try a smaller part of it.",
                source=label,
            )
        if number == signal.SIGKILL:
            return WorkerCrashError(
                f"{label}: the worker processing this file was killed (SIGKILL; out of memory?). Try a smaller "
                "part of the data.",
                source=label,
            )
        return WorkerCrashError(
            f"{label}: the worker processing this file stopped: it crashed with {name} inside a decoding "
            "library. The file is probably damaged; the rest of the app is unaffected.",
            source=label,
        )
    return WorkerCrashError(
        f"{label}: the worker processing this file stopped without an answer (exit code {exitcode}).",
        source=label,
    )


def _reap(process: Any) -> None:
    """Make sure the job's process is gone (it normally exits right after answering)."""
    if process.pid is None:
        return
    process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join(timeout=5)
    if not process.is_alive():
        process.close()


# --------------------------------------------------------------------------- worker side


def _worker_main(conn: multiprocessing.connection.Connection, limits: WorkerLimits) -> None:
    """Entry point of a job's process: set limits, run the job, send the answer, exit."""
    _apply_limits(limits)
    fds: list[int] = []
    try:
        n_blobs, payload = conn.recv()
        fds = [reduction.recv_handle(conn) for _ in range(n_blobs)]
        fn, args, kwargs = _load(payload, fds)
        for fd in fds:
            os.close(fd)
        fds = []
        answer: tuple[str, Any] = ("ok", fn(*args, **kwargs))
    except MemoryError:
        answer = (
            "error",
            LimitError(
                f"decoding needs more memory than a job may use ({limits.memory_bytes / 1024**3:.1f} GB). "
                "Upload a smaller part of the data."
            ),
        )
    except CoreError as err:
        answer = ("error", err)
    except BaseException as err:  # a bug: keep its type and message, log the traceback on the server
        traceback.print_exc(file=sys.stderr)
        answer = ("error", _portable(err))
    try:
        payload, blobs = _dump(answer)
    except (pickle.PicklingError, TypeError, AttributeError, MemoryError) as err:
        payload, blobs = _dump(("error", RuntimeError(f"the job's answer cannot be sent back ({err})")))
    try:
        _send(conn, payload, blobs, os.getppid())
    except OSError:
        pass  # the parent gave up (time limit) and closed the pipe
    finally:
        for fd in blobs + fds:
            os.close(fd)
        conn.close()


def _portable(err: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # any failure to rebuild it: send a plain copy instead
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _apply_limits(limits: WorkerLimits) -> None:
    import resource

    # No core files: a crash must not leave a memory image (patient data) on the disk.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    wanted = _address_space_bytes() + limits.memory_bytes
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(usage.ru_utime + usage.ru_stime) + int(limits.cpu_seconds)
    if cpu_hard != resource.RLIM_INFINITY:
        cpu = min(cpu, cpu_hard)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu_hard))


# --------------------------------------------------------------------------- transport


def _send(conn: multiprocessing.connection.Connection, payload: bytes, blobs: list[int], pid: int) -> None:
    conn.send((len(blobs), payload))
    for fd in blobs:
        reduction.send_handle(conn, fd, pid)


class _Pickler(pickle.Pickler):
    """Pickles large bytes and arrays as references to memfd descriptors (collected in ``blobs``)."""

    def __init__(self, file: io.BytesIO, blobs: list[int]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.blobs = blobs

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is bytes and len(obj) >= OUT_OF_BAND_BYTES:
            self.blobs.append(_memfd_with(memoryview(obj), len(obj)))
            return ("bytes", len(self.blobs) - 1, len(obj))
        if (
            type(obj) is np.ndarray
            and obj.nbytes >= OUT_OF_BAND_BYTES
            and obj.dtype.fields is None
            and not obj.dtype.hasobject
        ):
            found = None if obj.flags.c_contiguous else _dense_view(obj)
            if found is None:  # C-ordered already, or with gaps between elements (a strided slice)
                self.blobs.append(_memfd_with(obj, obj.nbytes))
                return ("ndarray", len(self.blobs) - 1, obj.shape, obj.dtype.str, bool(obj.flags.writeable))
            # A flipped or transposed view of a contiguous block (a volume reoriented to RAS+): the block
            # goes in its memory order (a plain copy, several times faster than a strided one) and the
            # receiver takes the same view of it.
            dense, flips, order = found
            self.blobs.append(_memfd_with(dense, dense.nbytes))
            return ("view", len(self.blobs) - 1, dense.shape, flips, order, obj.dtype.str, bool(obj.flags.writeable))
        return None

    def reducer_override(self, obj: Any) -> Any:
        # numpy's own pickling drops the read-only flag (a Volume's array and affine are read-only).
        if type(obj) is np.ndarray and not obj.flags.writeable and obj.dtype.fields is None and not obj.dtype.hasobject:
            return _readonly_array, (obj.tobytes(), obj.shape, obj.dtype.str)
        return NotImplemented


def _readonly_array(data: bytes, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Rebuild a small read-only array (``np.frombuffer`` over bytes is read-only)."""
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, fds: list[int]) -> None:
        super().__init__(file)
        self.fds = fds

    def persistent_load(self, pid: Any) -> Any:
        kind, index, *rest = pid
        if kind == "bytes":
            (size,) = rest
            with mmap.mmap(self.fds[index], size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mapped:
                return mapped[:]
        if kind == "ndarray":
            shape, dtype_str, writeable = rest
            array = self._array(index, shape, np.dtype(dtype_str))
        elif kind == "view":
            shape, flips, order, dtype_str, writeable = rest
            array = self._array(index, shape, np.dtype(dtype_str)).transpose(np.argsort(order))
            if flips:
                array = np.flip(array, axis=flips)
        else:
            raise pickle.UnpicklingError(f"unknown out-of-band value {kind!r}")
        array.flags.writeable = bool(writeable)
        return array

    def _array(self, index: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        # Private (copy-on-write) mapping: the array is writable without touching the sender's copy.
        mapped = mmap.mmap(self.fds[index], size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return np.ndarray(shape, dtype=dtype, buffer=mapped)


def _dense_view(array: np.ndarray) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]] | None:
    """A C-contiguous view of the memory of a flipped and/or transposed contiguous array, or None.

    Returns ``(dense, flips, order)``: ``array`` is
    ``np.flip(dense.transpose(np.argsort(order)), flips)``.
    """
    flips = tuple(axis for axis, stride in enumerate(array.strides) if stride < 0)
    positive = np.flip(array, axis=flips) if flips else array
    order = tuple(sorted(range(array.ndim), key=lambda axis: -positive.strides[axis]))
    dense = positive.transpose(order)
    return (dense, flips, order) if dense.flags.c_contiguous else None


def _memfd_with(value: np.ndarray | memoryview, size: int) -> int:
    """An anonymous memory file holding ``value`` (C order for arrays), as an open descriptor."""
    fd = os.memfd_create("tomoforge", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mapped:
            if isinstance(value, np.ndarray):
                target = np.ndarray(value.shape, dtype=value.dtype, buffer=mapped)
                np.copyto(target, value)  # one copy, whatever the strides of the source
                del target
            else:
                mapped[:] = value
    except BaseException:
        os.close(fd)
        raise
    return fd


def _dump(value: Any) -> tuple[bytes, list[int]]:
    blobs: list[int] = []
    buffer = io.BytesIO()
    try:
        _Pickler(buffer, blobs).dump(value)
    except BaseException:
        for fd in blobs:
            os.close(fd)
        raise
    return buffer.getvalue(), blobs


def _load(payload: bytes, fds: list[int]) -> Any:
    return _Unpickler(io.BytesIO(payload), fds).load()
