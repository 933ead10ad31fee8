"""Measuring one operation per fresh process: wall time, peak memory, the machine.

Every measured run is a new process, so its peak resident set size is the peak of
that operation alone, as a user's process would see it:

* a Python task (:mod:`bench.tasks`) imports what it needs and runs its untimed
  setup, then resets its high-water mark (``/proc/self/clear_refs``), reads its RSS
  as the *baseline* (interpreter + imports + inputs already in memory), times the
  operation with :func:`time.perf_counter` and reads ``VmHWM`` before any
  verification: *above baseline* is the difference; the whole-process peak also
  counts the setup;
* an external program (dcm2niix) is started by a tiny launcher
  (``python -S``, about 10 MB) that times it from start to exit and reads its
  ``ru_maxrss`` with :func:`os.wait4`; its baseline is the same program printing
  its help.

``ru_maxrss`` of a child started straight from this (large) process would be
useless: Linux carries the parent's high-water mark over ``vfork`` + ``exec`` into
the child's ``ru_maxrss``; hence ``VmHWM`` (per address space) and the launcher.

Medians are over the timed runs; ratios are taken run by run (run ``n`` of ours
against run ``n`` of the other tool, the tools interleaved in each round) and
then their median, so a slow moment of a shared machine hits both sides.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
RESULT_MARKER = "BENCH-RESULT "
# Generous: a 2000-slice conversion on a busy 2-core machine takes tens of seconds.
CHILD_TIMEOUT_S = 600


@dataclass
class Run:
    """One measured run.

    ``seconds`` is None when the run failed; ``error`` then says why.
    """

    seconds: float | None
    peak_bytes: int | None = None  # whole process, setup included
    baseline_bytes: int | None = None  # RSS just before the operation
    op_peak_bytes: int | None = None  # high-water mark during the operation (= peak_bytes for commands)
    extra: dict = field(default_factory=dict)
    error: str = ""

    @property
    def above_baseline_bytes(self) -> int | None:
        peak = self.op_peak_bytes if self.op_peak_bytes is not None else self.peak_bytes
        if peak is None or self.baseline_bytes is None:
            return None
        return max(0, peak - self.baseline_bytes)


class TaskFailed(RuntimeError):
    """A measured process exited with an error or printed no result."""


def _maxrss_bytes(rusage: object) -> int:
    # Linux reports ru_maxrss in kilobytes.
    return int(rusage.ru_maxrss) * 1024  # type: ignore[attr-defined]


@dataclass
class _Exit:
    status: int
    seconds: float
    peak_bytes: int
    stdout: bytes
    stderr: bytes


def _spawn(command: Sequence[str], *, env: dict[str, str] | None, cwd: Path | None, timeout_s: float) -> _Exit:
    """Run a process to its end; its pipes are drained in threads and it is reaped with wait4.

    ``seconds`` runs from just before the start to the exit; ``peak_bytes`` is its
    ``ru_maxrss``, which includes this process's high-water mark (see the module notes).
    """
    chunks: dict[str, bytes] = {}

    def read(name: str, stream: IO[bytes]) -> None:
        chunks[name] = stream.read()

    start = time.perf_counter()
    with open(os.devnull, "rb") as stdin:
        try:
            process = subprocess.Popen(
                list(command), cwd=cwd, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as err:
            raise TaskFailed(f"{Path(command[0]).name} cannot be started ({err.strerror})") from err
        readers = [
            threading.Thread(target=read, args=("out", process.stdout), daemon=True),
            threading.Thread(target=read, args=("err", process.stderr), daemon=True),
        ]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, rusage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                process.returncode = -9
                raise TaskFailed(f"{Path(command[0]).name} timed out after {timeout_s:.0f} s")
            time.sleep(0.001)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        for reader in readers:
            reader.join(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    return _Exit(
        status=process.returncode,
        seconds=seconds,
        peak_bytes=_maxrss_bytes(rusage),
        stdout=chunks.get("out", b""),
        stderr=chunks.get("err", b""),
    )


def _tail(data: bytes, lines: int = 6) -> str:
    return " | ".join(data.decode(errors="replace").strip().splitlines()[-lines:])


def run_python_task(task: str, args: dict, *, timeout_s: float = CHILD_TIMEOUT_S) -> Run:
    """Run ``python -m bench.tasks TASK ARGS`` in a fresh interpreter and read its result line.

    Raises
    ------
    TaskFailed
        The child exited non-zero or printed no result (its stderr tail is in the message).
    """
    command = [sys.executable, "-m", "bench.tasks", task, json.dumps(args)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = _spawn(command, env=env, cwd=REPO, timeout_s=timeout_s)
    lines = [line for line in done.stdout.decode(errors="replace").splitlines() if line.startswith(RESULT_MARKER)]
    if done.status != 0 or not lines:
        raise TaskFailed(f"{task} exited with {done.status}: {_tail(done.stderr) or 'no output'}")
    result = json.loads(lines[-1][len(RESULT_MARKER) :])
    return Run(
        seconds=float(result["seconds"]),
        peak_bytes=int(result["process_peak_bytes"]),
        baseline_bytes=int(result["baseline_bytes"]),
        op_peak_bytes=int(result["peak_bytes"]),
        extra=result.get("extra", {}),
    )


# Runs in ``python -S``: starts the command, waits with wait4, prints seconds and ru_maxrss.
_LAUNCHER = r"""
import json, os, sys, time
command = json.loads(sys.argv[1])
start = time.perf_counter()
devnull = os.open(os.devnull, os.O_RDWR)
pid = os.posix_spawn(command[0], command, dict(os.environ),
                     file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1)])
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "status": os.waitstatus_to_exitcode(status),
                  "peak_bytes": usage.ru_maxrss * 1024}))
"""


def run_command(
    command: Sequence[str], *, baseline_bytes: int | None = None, timeout_s: float = CHILD_TIMEOUT_S
) -> Run:
    """Time an external program from start to exit and read its own peak memory (via the launcher).

    Raises
    ------
    TaskFailed
        The program is missing or exited non-zero (the tail of its stderr is in the message).
    """
    if not Path(command[0]).exists():
        raise TaskFailed(f"{command[0]} not found")
    done = _spawn([sys.executable, "-S", "-c", _LAUNCHER, json.dumps(list(command))], env=None, cwd=None,
                  timeout_s=timeout_s)  # fmt: skip
    try:
        result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError) as err:
        raise TaskFailed(f"launcher for {Path(command[0]).name} failed: {_tail(done.stderr)}") from err
    if result["status"] != 0:
        raise TaskFailed(f"{Path(command[0]).name} exited with {result['status']}: {_tail(done.stderr)}")
    return Run(seconds=float(result["seconds"]), peak_bytes=int(result["peak_bytes"]), baseline_bytes=baseline_bytes)


def median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(ours: Sequence[Run], other: Sequence[Run]) -> float | None:
    """Median over runs of ``ours[n].seconds / other[n].seconds`` (runs that failed are dropped)."""
    ratios = [
        a.seconds / b.seconds
        for a, b in zip(ours, other, strict=False)
        if a.seconds is not None and b.seconds is not None and b.seconds > 0
    ]
    return statistics.median(ratios) if ratios else None


def machine_info() -> dict[str, str]:
    """Cores, memory, CPU model, OS and Python: the line printed above the table."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
                break
    except OSError:
        pass
    try:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "unknown"
    return {
        "cores": str(os.cpu_count() or "unknown"),
        "memory": memory,
        "cpu": model,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load": load,
    }
