"""core.worker: jobs in separate processes with memory, CPU and time limits.

The job functions live at module level here so the worker can import them by name.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import threading
import time
import zipfile

import numpy as np
import pytest

import core.worker
from core.errors import CoreError, LimitError, UnsupportedFileError
from core.io import scan
from core.sources import Source
from core.worker import (
    MAX_WORKERS,
    WorkerCrashError,
    WorkerLimits,
    load_series,
    load_series_in_worker,
    run_in_worker,
    sources_for_series,
)
from tests.dicom_factory import make_series

# --- jobs (run in the worker) -------------------------------------------------------


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reversed_copy(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array[::-1])


def read_only_view(shape: tuple[int, ...]) -> np.ndarray:
    array = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)[:, ::-1]  # not contiguous
    array.flags.writeable = False
    return array


def spin_forever() -> None:
    while True:
        pass


def raise_core_error(message: str) -> None:
    raise UnsupportedFileError(message, source="x.dcm")


def pid_and_window(seconds: float) -> tuple[int, float, float]:
    start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    time.sleep(seconds)
    return os.getpid(), start, time.monotonic()


def no_worker_left() -> bool:
    return not any(p.name == "tomoforge-worker" for p in multiprocessing.active_children())


# --- results and arguments ----------------------------------------------------------


def test_results_and_large_arguments_cross_the_process_boundary_intact() -> None:
    data = np.random.default_rng(0).bytes(3 * 1024**2)  # above the out-of-band threshold
    assert run_in_worker(digest, data) == digest(data)
    array = np.random.default_rng(1).integers(-1000, 3000, size=(64, 128, 100), dtype=np.int16)
    back = run_in_worker(reversed_copy, array)
    np.testing.assert_array_equal(back, array[::-1])
    assert back.flags.writeable  # a writable result stays writable (private mapping)


def test_read_only_and_strided_arrays_keep_values_and_flag() -> None:
    for shape in ((4, 5), (300, 400)):  # in-band and out-of-band
        back = run_in_worker(read_only_view, shape)
        expected = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)[:, ::-1]
        np.testing.assert_array_equal(back, expected)
        assert not back.flags.writeable


@pytest.mark.parametrize(
    ("make", "dense"),
    [
        (lambda a: a.transpose(2, 1, 0)[::-1, :, ::-1], True),  # a volume reoriented to RAS+
        (lambda a: a.transpose(1, 0, 2), True),
        (lambda a: a[::-1, ::-1, ::-1], True),
        (lambda a: np.asfortranarray(a), True),
        (lambda a: a[:, ::2, :], False),  # gaps between elements: sent element by element, C-ordered
        (lambda a: a[:, :, 3:40].transpose(2, 0, 1), False),
    ],
    ids=["ras-view", "transposed", "flipped", "fortran", "strided", "slab"],
)
def test_views_of_a_block_come_back_as_the_same_views(make, dense: bool) -> None:  # noqa: ANN001
    block = np.random.default_rng(2).integers(-1000, 3000, size=(64, 128, 100), dtype=np.int16)
    view = make(block)
    view.flags.writeable = False
    found = core.worker._dense_view(view)
    # A dense view travels in its memory order (a plain copy of the block), not as a C-ordered copy.
    assert (found is not None) == dense
    if found is not None:
        assert found[0].flags.c_contiguous and np.shares_memory(found[0], view)
    payload, blobs = core.worker._dump(view)
    try:
        back = core.worker._load(payload, blobs)
    finally:
        for fd in blobs:
            os.close(fd)
    np.testing.assert_array_equal(back, view)
    assert back.shape == view.shape and back.dtype == view.dtype
    assert not back.flags.writeable


def test_core_errors_come_back_with_type_message_and_source() -> None:
    with pytest.raises(UnsupportedFileError, match="broken header") as caught:
        run_in_worker(raise_core_error, "x.dcm: broken header")
    assert caught.value.source == "x.dcm"


def test_other_exceptions_keep_their_type() -> None:
    with pytest.raises(ValueError, match="invalid literal"):
        run_in_worker(int, "not a number")


# --- limits ----------------------------------------------------------------------------


def test_a_crash_in_a_c_library_ends_the_worker_not_the_caller() -> None:
    with pytest.raises(WorkerCrashError, match="SIGABRT") as caught:
        run_in_worker(os.abort, what="crash.dcm")
    assert isinstance(caught.value, CoreError)
    assert "crash.dcm" in caught.value.message and "Traceback" not in caught.value.message
    assert run_in_worker(digest, b"still working") == digest(b"still working")


def test_memory_limit_turns_a_huge_allocation_into_a_limit_error() -> None:
    with pytest.raises(LimitError, match="memory"):
        run_in_worker(np.ones, (8 * 1024**3,), np.uint8, limits=WorkerLimits(memory_bytes=512 * 1024**2))


def test_cpu_limit_stops_a_runaway_job() -> None:
    with pytest.raises(LimitError, match="CPU"):
        run_in_worker(spin_forever, limits=WorkerLimits(cpu_seconds=1, wall_seconds=60))
    assert no_worker_left()


def test_wall_time_limit_kills_a_stuck_job() -> None:
    with pytest.raises(LimitError, match="time limit"):
        run_in_worker(time.sleep, 60, limits=WorkerLimits(wall_seconds=1))
    assert no_worker_left()


def test_at_most_max_workers_jobs_run_at_once() -> None:
    results: list[tuple[int, float, float]] = []

    def call() -> None:
        results.append(run_in_worker(pid_and_window, 0.4))

    threads = [threading.Thread(target=call) for _ in range(MAX_WORKERS + 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == MAX_WORKERS + 2
    assert len({pid for pid, _, _ in results}) == len(results)  # a fresh process per job
    events = sorted([(start, 1) for _, start, _ in results] + [(end, -1) for _, _, end in results])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak <= MAX_WORKERS


# --- series ----------------------------------------------------------------------------


def _two_series() -> list[Source]:
    rng = np.random.default_rng(5)
    first = make_series(rng.integers(0, 2000, (6, 24, 20)).astype(np.int16), rescale=(1.0, -1024.0),
                        series_number=3, description="first", name_prefix="A")  # fmt: skip
    second = make_series(rng.integers(0, 500, (4, 16, 16)).astype(np.uint16), series_number=5,
                         description="second", name_prefix="B")  # fmt: skip
    return [*first, *second, Source("notes.txt", b"not a scan")]


@pytest.mark.parametrize("zipped", [False, True], ids=["files", "zip"])
def test_series_loaded_in_a_worker_equals_the_in_process_load(zipped: bool) -> None:
    sources = _two_series()
    if zipped:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for source in sources:
                archive.writestr(f"study/{source.name}", source.data)
        sources = [Source("study.zip", buffer.getvalue())]
    result = scan(sources)
    assert len(result.series) == 2
    for series in result.series:
        here = series.load()
        needed = sources_for_series(sources, series.info.sources)
        there = load_series_in_worker(needed, series.info.id, expected_sources=series.info.sources)
        np.testing.assert_array_equal(there.array, here.array)
        assert there.array.dtype == here.array.dtype
        np.testing.assert_array_equal(there.affine, here.affine)
        assert (there.modality, there.unit, there.description) == (here.modality, here.unit, here.description)
        assert not there.array.flags.writeable and not there.affine.flags.writeable


def test_sources_for_series_sends_only_the_series_files() -> None:
    sources = _two_series()
    series = scan(sources).series[1]
    needed = sources_for_series(sources, series.info.sources)
    assert {s.name for s in needed} == set(series.info.sources)
    assert all(s.name.startswith("B") for s in needed)


def test_a_series_that_is_gone_gives_a_clear_error() -> None:
    with pytest.raises(CoreError, match="not found"):
        load_series([Source("notes.txt", b"junk")], "3-1")


def test_meshing_in_a_worker_gives_the_same_surface() -> None:
    from core.mesh import threshold_surface
    from core.sample import make_sample_ct

    volume = make_sample_ct((64, 64, 30))
    here, _ = threshold_surface(volume, 299.5)
    there, _ = run_in_worker(threshold_surface, volume, 299.5, what="sample bone surface")
    np.testing.assert_array_equal(there.faces, here.faces)
    np.testing.assert_allclose(there.vertices, here.vertices)
    assert there.name == here.name
