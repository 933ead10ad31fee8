"""Run the benchmark: ``.venv/bin/python -m bench.run [--size tiny|full] [--out bench/out]``.

What it does, in one run and on the same files:

1. Writes the CT phantom (:mod:`bench.phantom`) as a DICOM series (512 x 512 x 300 at
   full size, one uncompressed file per slice) into a temporary folder, a zip of it,
   the phantom as ``.npy`` for the surface tasks, and a ``.nii.gz`` made by
   ``dcm2niix -z y`` for the NIfTI load tasks.
2. Measures each group (series load from the folder and from the zip, DICOM ->
   ``.nii.gz``, ``.nii.gz`` load, bone >= 300 HU -> binary STL): one warm-up round, then
   ``runs`` rounds; in each round every tool of the group runs once, in a fresh
   process (:mod:`bench.measure`), so the tools share the machine's slow moments.
   The first round also checks every result against the phantom (values, shape) and
   marks a wrong result in the table.
3. Times the views in one process (many slices of the series as our reader loads it,
   all three planes) and, in headless Chromium, a slider change to the painted image
   (:mod:`bench.browser`).
4. Writes a 2000-slice series (1 GB) and checks that it loads, displays (three views)
   and converts to ``.nii.gz`` without error, with times.
5. Writes ``results.md`` (and ``results.json``) into ``--out`` and prints the table,
   with the targets and PASS/FAIL.

No test asserts a time; ``tests/test_bench_smoke.py`` runs ``--size tiny`` only to
check that this still works.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.measure import REPO, Run, TaskFailed, machine_info, median, paired_ratio, run_command, run_python_task
from bench.phantom import phantom_volume, series_volume, write_ct_series, zip_folder

DCM2NIIX = str(Path(sys.executable).with_name("dcm2niix"))
# A user far from the server: 10 Mbit/s down and up, 20 ms latency (an informative row, no target).
SLOW_LINK = (10.0, 20.0)
VIEW_TARGET_TOOL = "axial: render_view + PNG level 1 + hover values (what the viewer sends)"


@dataclass(frozen=True)
class Size:
    shape: tuple[int, int, int]
    scale_slices: int
    runs: int
    warmup: int
    render_runs: int
    browser_steps: int
    browser_warmup: int


SIZES = {
    "full": Size((512, 512, 300), 2000, runs=5, warmup=1, render_runs=60, browser_steps=10, browser_warmup=2),
    "tiny": Size((64, 64, 20), 60, runs=1, warmup=0, render_runs=5, browser_steps=2, browser_warmup=1),
}


@dataclass
class Entry:
    """One tool of a group: a Python task or an external command."""

    key: str
    tool: str
    task: str = ""
    command: Callable[[Path], list[str]] | None = None
    output: str = ""  # file the command writes (checked in the first round)
    args: dict[str, Any] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    error: str = ""
    check: dict[str, Any] = field(default_factory=dict)
    problem: str = ""  # a wrong result found by the check


@dataclass
class Group:
    key: str
    title: str
    entries: list[Entry]

    def entry(self, key: str) -> Entry:
        return next(e for e in self.entries if e.key == key)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _measure_group(group: Group, size: Size, work: Path, dcm2niix_baseline: int | None) -> None:
    rounds = size.warmup + size.runs
    for number in range(rounds):
        timed = number >= size.warmup
        for entry in group.entries:
            if entry.error:
                continue
            out = _fresh(work / "out" / f"{group.key}-{entry.key}")
            first = number == 0
            try:
                if entry.command is not None:
                    run = run_command(entry.command(out), baseline_bytes=dcm2niix_baseline)
                    if first and entry.output:
                        from bench.tasks import _nifti_facts

                        entry.check = _nifti_facts(out / entry.output)
                else:
                    run = run_python_task(entry.task, {**entry.args, "out": str(out), "check": first})
                    if first:
                        entry.check = run.extra
            except TaskFailed as err:
                entry.error = str(err)
                _log(f"  {group.key}/{entry.key}: FAILED {err}")
                continue
            if timed:
                entry.runs.append(run)
            _log(
                f"  {group.key}/{entry.key} round {number + 1}/{rounds}{'' if timed else ' (warm-up)'}: "
                f"{run.seconds * 1000:.0f} ms"
            )
    shutil.rmtree(work / "out", ignore_errors=True)


def _expected_facts(volume_array: np.ndarray) -> dict[str, Any]:
    import hashlib

    return {
        "shape": sorted(int(n) for n in volume_array.shape),
        "sum": float(volume_array.sum(dtype=np.float64)),
        "min": float(volume_array.min()),
        "max": float(volume_array.max()),
        "sha1": hashlib.sha1(np.ascontiguousarray(volume_array, dtype=np.int16).tobytes()).hexdigest(),
    }


def _verify(entry: Entry, expected: dict[str, Any], *, exact: bool = False) -> None:
    """Mark a result that does not hold the phantom's values (wrong shape, sum or range)."""
    check = entry.check
    if not check or "sum" not in check:
        return
    problems = []
    if check.get("shape") != expected["shape"]:
        problems.append(f"shape {check.get('shape')} != {expected['shape']}")
    if abs(check["sum"] - expected["sum"]) > 0.5 or check["min"] != expected["min"] or check["max"] != expected["max"]:
        problems.append("values differ from the phantom")
    if exact and check.get("sha1") != expected["sha1"]:
        problems.append("voxels differ from the phantom in RAS+ order")
    entry.problem = "; ".join(problems)


def _seconds(entry: Entry) -> float | None:
    return median([r.seconds for r in entry.runs if r.seconds is not None])


def _mb(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.1f}" if value < 10e6 else f"{value / 1e6:.0f}"


def _time_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1000:.3f} ms"
    if seconds < 0.1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 10:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


def _entry_row(group: Group, entry: Entry, ours: Entry) -> list[str]:
    if entry.error and not entry.runs:
        return [group.title, entry.tool, f"n/a ({entry.error[:160]})", "0", "-", "-", "-", ""]
    peaks = [r.peak_bytes for r in entry.runs if r.peak_bytes is not None]
    above = [r.above_baseline_bytes for r in entry.runs if r.above_baseline_bytes is not None]
    ratio = "1.00 (ours)" if entry is ours else _ratio_text(paired_ratio(ours.runs, entry.runs))
    notes = []
    if entry.problem:
        notes.append(f"WRONG RESULT: {entry.problem}")
    check = entry.check
    if "triangles" in check:
        notes.append(f"{check['triangles']:,} triangles")
    if "on_disk_dtype" in check:
        notes.append(f"{check['on_disk_dtype']}, {check['bytes'] / 1e6:.0f} MB")
    elif "dtype" in check and group.key in ("load_folder", "load_zip", "niiload"):
        notes.append(check["dtype"])
    if entry.error:
        notes.append(f"some runs failed: {entry.error[:120]}")
    return [
        group.title,
        entry.tool,
        _time_text(_seconds(entry)),
        str(len(entry.runs)),
        _mb(median(peaks)),
        _mb(median(above)),
        ratio,
        "; ".join(notes),
    ]


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _target(name: str, measured: str, passed: bool | None, why: str = "") -> list[str]:
    result = "n/a" if passed is None else ("PASS" if passed else "FAIL")
    return [name, measured + (f" ({why})" if why else ""), result]


def _speedup(ours: Entry, other: Entry) -> float | None:
    """Median over runs of other/ours: how many times faster we are."""
    ratios = [
        b.seconds / a.seconds
        for a, b in zip(ours.runs, other.runs, strict=False)
        if a.seconds and b.seconds is not None
    ]
    return median(ratios)


def _table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _versions() -> str:
    names = ["pydicom", "SimpleITK", "nibabel", "dicom2nifti", "vtk", "scikit-image", "numpy-stl", "isal", "streamlit"]
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    try:
        parts.append(f"dcm2niix {importlib.metadata.version('dcm2niix')}")
    except importlib.metadata.PackageNotFoundError:
        pass
    return ", ".join(parts)


def run_benchmark(size_name: str, out_dir: Path, *, runs: int | None = None, keep: bool = False) -> Path:
    """Run everything at ``size_name`` and write ``results.md``/``results.json`` into ``out_dir``.

    Returns
    -------
    Path
        The Markdown file.
    """
    size = SIZES[size_name]
    if runs is not None:
        size = Size(**{**size.__dict__, "runs": runs})
    started = time.monotonic()
    machine = machine_info()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tomoforge-bench-"))
    _log(f"benchmark {size_name}: work folder {work}")
    try:
        return _run(size_name, size, out_dir, work, machine, date, started)
    finally:
        if keep:
            _log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(
    size_name: str, size: Size, out_dir: Path, work: Path, machine: dict[str, str], date: str, started: float
) -> Path:
    # ---- inputs
    t0 = time.monotonic()
    phantom = phantom_volume(size.shape)
    folder = work / "series"
    write_ct_series(phantom, folder)
    zip_path = zip_folder(folder, work / "series.zip")
    array_path, affine_path = work / "phantom.npy", work / "affine.npy"
    np.save(array_path, np.asarray(phantom.array))
    np.save(affine_path, phantom.affine)
    expected = _expected_facts(np.asarray(phantom.array))
    volume_bytes = phantom.nbytes
    nifti_dir = _fresh(work / "nifti")
    pigz = shutil.which("pigz")
    nifti_path = nifti_dir / "reference.nii.gz"
    try:
        run_command([DCM2NIIX, "-z", "y", "-o", str(nifti_dir), "-f", "reference", str(folder)])
        dcm2niix_baseline = run_command([DCM2NIIX, "-h"]).peak_bytes
    except TaskFailed as err:
        # The dcm2niix rows will say n/a; the NIfTI load rows still get a file.
        _log(f"dcm2niix unusable ({err}); the .nii.gz for the load rows is written with nibabel")
        import nibabel as nib

        nib.Nifti1Image(np.asarray(phantom.array), phantom.affine).to_filename(str(nifti_path))
        dcm2niix_baseline = None
    _log(
        f"inputs ready in {time.monotonic() - t0:.1f} s: {len(list(folder.iterdir()))} files, {volume_bytes / 1e6:.0f} MB"
    )

    common = {
        "folder": str(folder),
        "zip": str(zip_path),
        "nifti": str(nifti_path),
        "array": str(array_path),
        "affine": str(affine_path),
        "rows": size.shape[1],
        "columns": size.shape[0],
    }
    gz_tool = "dcm2niix -z y (pigz)" if pigz else "dcm2niix -z y (built-in gzip: no pigz on PATH)"
    groups = [
        Group(
            "load_folder",
            "Series load (folder)",
            [
                Entry("ours", "TomoForge: read + scan + load", "load_ours_folder", args=common),
                Entry("pydicom", "pydicom naive dcmread + stack", "load_pydicom_folder", args=common),
                Entry("sitk", "SimpleITK ImageSeriesReader", "load_sitk_folder", args=common),
                Entry(
                    "dcm2niix",
                    "dcm2niix -z n (writes .nii)",
                    command=lambda out: [DCM2NIIX, "-z", "n", "-o", str(out), "-f", "out", str(folder)],
                    output="out.nii",
                ),
                Entry("floor", "lower bound: read files + copy pixels", "read_files_only", args=common),
            ],
        ),
        Group(
            "load_zip",
            "Series load (zip in memory)",
            [
                Entry("ours", "TomoForge: scan + load", "load_ours_zip", args=common),
                Entry("pydicom", "pydicom naive from zip", "load_pydicom_zip", args=common),
                Entry("floor", "lower bound: our inflating only (expand_sources)", "inflate_zip_ours", args=common),
                Entry("zipfile", "zipfile (stdlib): inflate members only", "inflate_zip_only", args=common),
            ],
        ),
        Group(
            "nifti",
            "DICOM -> .nii.gz",
            [
                Entry("ours", "TomoForge: read + scan + convert + write", "nifti_ours", args=common),
                Entry(
                    "dcm2niix",
                    gz_tool,
                    command=lambda out: [DCM2NIIX, "-z", "y", "-o", str(out), "-f", "out", str(folder)],
                    output="out.nii.gz",
                ),
                Entry("dicom2nifti", "dicom2nifti", "nifti_dicom2nifti", args=common),
                Entry("sitk", "SimpleITK read + WriteImage", "nifti_sitk", args=common),
            ],
        ),
        Group(
            "niiload",
            ".nii.gz load (dcm2niix's file)",
            [
                Entry("ours", "TomoForge: read + scan + load", "niiload_ours", args=common),
                Entry("nibabel", "nibabel load + dataobj", "niiload_nibabel", args=common),
                Entry("sitk", "SimpleITK ReadImage", "niiload_sitk", args=common),
            ],
        ),
        Group(
            "stl",
            "Bone >= 300 HU -> binary STL",
            [
                Entry("ours", "TomoForge: threshold_surface + write_mesh", "stl_ours", args=common),
                Entry("vtk", "VTK vtkFlyingEdges3D + numpy-stl (wheel default, 1 thread)", "stl_vtk", args=common),
                Entry(
                    "vtk2",
                    "VTK vtkFlyingEdges3D + numpy-stl (STDThread, 2 threads)",
                    "stl_vtk",
                    args={**common, "threads": True},
                ),
                Entry("skimage", "scikit-image marching_cubes + numpy-stl", "stl_skimage", args=common),
            ],
        ),
    ]
    for group in groups:
        _log(f"{group.title}:")
        _measure_group(group, size, work, dcm2niix_baseline)
    for group in groups:
        for entry in group.entries:
            if group.key in ("load_folder", "load_zip", "nifti", "niiload"):
                _verify(entry, expected, exact=entry.key == "ours" and group.key in ("load_folder", "load_zip"))

    # ---- view render
    _log("view render:")
    render: dict[str, list[float]] = {}
    render_error = ""
    try:
        run = run_python_task("render", {**common, "runs": size.render_runs, "check": True})
        render = run.extra["timings"]
    except TaskFailed as err:
        render_error = str(err)

    # ---- browser
    _log("slider -> paint in headless Chromium:")
    from bench.browser import measure_slider_paint

    browser = measure_slider_paint(size.browser_steps, size.browser_warmup, log=work / "streamlit.log")
    if browser.error:
        _log(f"  n/a: {browser.error}")
    browser_slow = measure_slider_paint(
        size.browser_steps, size.browser_warmup, log=work / "streamlit-slow.log", throttle=SLOW_LINK
    )
    if browser_slow.error:
        _log(f"  n/a over a slow link: {browser_slow.error}")

    # ---- scale check
    _log(f"scale check: {size.scale_slices} slices")
    scale_folder = work / "scale"
    t_scale = time.monotonic()
    write_ct_series(phantom, scale_folder, n_slices=size.scale_slices)
    scale_expected = _expected_facts(series_volume(phantom, size.scale_slices))
    write_s = time.monotonic() - t_scale
    scale: dict[str, Any] = {}
    scale_error = ""
    scale_run: Run | None = None
    try:
        scale_run = run_python_task(
            "scale_ours", {"folder": str(scale_folder), "out": str(_fresh(work / "scale-out")), "check": True}
        )
        scale = scale_run.extra.get("scale", {})
        if scale_run.extra.get("sum") is not None and abs(scale_run.extra["sum"] - scale_expected["sum"]) > 0.5:
            scale_error = "loaded values differ from the written series"
    except TaskFailed as err:
        scale_error = str(err)
    scale_dcm2niix: Run | None = None
    scale_dcm2niix_error = ""
    try:
        scale_dcm2niix = run_command(
            [DCM2NIIX, "-z", "n", "-o", str(_fresh(work / "scale-ref")), "-f", "out", str(scale_folder)],
            baseline_bytes=dcm2niix_baseline,
        )
    except TaskFailed as err:
        scale_dcm2niix_error = str(err)
    shutil.rmtree(work / "scale-out", ignore_errors=True)
    shutil.rmtree(work / "scale-ref", ignore_errors=True)
    shutil.rmtree(scale_folder, ignore_errors=True)

    # ---- report
    elapsed = time.monotonic() - started
    markdown, summary = _report(
        size_name=size_name,
        size=size,
        machine=machine,
        date=date,
        groups=groups,
        render=render,
        render_error=render_error,
        browser=browser,
        browser_slow=browser_slow,
        scale=scale,
        scale_run=scale_run,
        scale_error=scale_error,
        scale_dcm2niix=scale_dcm2niix,
        scale_dcm2niix_error=scale_dcm2niix_error,
        scale_write_s=write_s,
        volume_bytes=volume_bytes,
        elapsed=elapsed,
    )
    target = out_dir / "results.md"
    target.write_text(markdown, encoding="utf-8")
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    print(markdown)
    return target


def _report(
    *,
    size_name: str,
    size: Size,
    machine: dict[str, str],
    date: str,
    groups: list[Group],
    render: dict[str, list[float]],
    render_error: str,
    browser: Any,
    browser_slow: Any,
    scale: dict[str, Any],
    scale_run: Run | None,
    scale_error: str,
    scale_dcm2niix: Run | None,
    scale_dcm2niix_error: str,
    scale_write_s: float,
    volume_bytes: int,
    elapsed: float,
) -> tuple[str, dict[str, Any]]:
    by_key = {group.key: group for group in groups}
    rows: list[list[str]] = []
    for group in groups:
        ours = group.entry("ours")
        rows.extend(_entry_row(group, entry, ours) for entry in group.entries)

    shape = " x ".join(str(n) for n in size.shape)
    render_medians = {key: median(values) for key, values in render.items()}
    axial = render_medians.get("axial_payload")
    n_render = len(render.get("axial_payload", []))

    def info_row(operation: str, tool: str, median_text: str, runs: int, notes: str = "") -> list[str]:
        return [operation, tool, median_text, str(runs), "-", "-", "-", notes]

    if render_error:
        rows.append(info_row("View render", "render_view", f"n/a ({render_error[:160]})", 0))
    else:
        axial_px = f"{size.shape[0]}x{size.shape[1]}"
        for plane in ("axial", "coronal", "sagittal"):
            what = f"{plane} {axial_px}" if plane == "axial" else f"{plane} (square pixels)"
            rows.append(
                info_row(
                    "View render", f"{what}: render_view", _time_text(render_medians.get(f"{plane}_render")), n_render
                )
            )
            tool = VIEW_TARGET_TOOL if plane == "axial" else f"{plane}: render + PNG + hover values"
            rows.append(info_row("View render", tool, _time_text(render_medians.get(f"{plane}_payload")), n_render))
    slow_tool = f"the same over {SLOW_LINK[0]:g} Mbit/s, {SLOW_LINK[1]:g} ms latency (DevTools throttling)"
    for tool, result in (
        ("headless Chromium, app's sample 256x256x120, axial slider +1", browser),
        (slow_tool, browser_slow),
    ):
        if result.error:
            rows.append(info_row("Slider -> painted image", tool, f"n/a ({result.error})", 0))
            continue
        seconds = result.seconds
        spread = f"min {min(seconds) * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms" if seconds else ""
        notes = "; ".join([spread, *result.notes])
        rows.append(info_row("Slider -> painted image", tool, _time_text(result.median), len(seconds), notes))

    # ---- targets
    targets: list[list[str]] = []
    load = by_key["load_folder"]
    ours_load = load.entry("ours")

    def ratio_target(name: str, ours: Entry, other: Entry, limit: float) -> None:
        ratio = paired_ratio(ours.runs, other.runs) if ours.runs and other.runs else None
        if ratio is None:
            targets.append(_target(name, "n/a", None, (ours.error or other.error)[:120]))
        else:
            targets.append(_target(name, f"{ratio:.2f}x", ratio <= limit))

    def speed_target(name: str, ours: Entry, other: Entry, factor: float) -> None:
        speed = _speedup(ours, other) if ours.runs and other.runs else None
        if speed is None:
            targets.append(_target(name, "n/a", None, (ours.error or other.error)[:120]))
        else:
            targets.append(_target(name, f"{speed:.1f}x faster", speed >= factor))

    ratio_target("Series load <= 1.0x dcm2niix -z n", ours_load, load.entry("dcm2niix"), 1.0)
    speed_target("Series load >= 3x faster than SimpleITK", ours_load, load.entry("sitk"), 3.0)
    nifti = by_key["nifti"]
    speed_target("DICOM -> .nii.gz >= 2x faster than dcm2niix -z y", nifti.entry("ours"), nifti.entry("dcm2niix"), 2.0)
    speed_target(
        "DICOM -> .nii.gz >= 10x faster than dicom2nifti", nifti.entry("ours"), nifti.entry("dicom2nifti"), 10.0
    )
    stl = by_key["stl"]
    ratio_target(
        "Bone -> STL <= 1.0x VTK flying edges + numpy-stl (wheel default)", stl.entry("ours"), stl.entry("vtk"), 1.0
    )
    if axial is None:
        targets.append(_target("View render <= 5 ms", "n/a", None, render_error[:120]))
    else:
        targets.append(_target("View render <= 5 ms (axial view payload)", f"{axial * 1000:.1f} ms", axial <= 0.005))
    if browser.median is None:
        targets.append(_target("Slider -> paint <= 150 ms", "n/a", None, browser.error))
    else:
        targets.append(_target("Slider -> paint <= 150 ms", f"{browser.median * 1000:.0f} ms", browser.median <= 0.150))
    above = median([r.above_baseline_bytes for r in ours_load.runs if r.above_baseline_bytes is not None])
    if above is None:
        targets.append(
            _target("Peak memory while loading <= 2x volume above baseline", "n/a", None, ours_load.error[:120])
        )
    else:
        targets.append(
            _target(
                "Peak memory while loading <= 2x volume above baseline",
                f"{above / volume_bytes:.2f}x ({above / 1e6:.0f} MB above baseline for a {_mb(volume_bytes)} MB volume)",
                above <= 2 * volume_bytes,
            )
        )
    scale_ok = not scale_error and bool(scale) and "convert_s" in scale
    scale_text = (
        f"load {_time_text(scale.get('load_s'))}, 3 views {_time_text(sum(scale.get(f'render_{p}_s', 0) for p in ('axial', 'coronal', 'sagittal')))}, "
        f"convert {_time_text(scale.get('convert_s'))}"
        if scale_ok
        else "n/a"
    )
    targets.append(
        _target(
            f"{size.scale_slices}-slice series loads, displays and converts",
            scale_text,
            scale_ok if scale or scale_error else None,
            scale_error[:160],
        )
    )

    # ---- scale table
    scale_rows = []
    if scale_ok and scale_run is not None:
        scale_bytes = int(np.prod(scale["shape"])) * 2
        load_peak = scale.get("load_peak_bytes")
        load_above = load_peak - scale_run.baseline_bytes if load_peak and scale_run.baseline_bytes else None
        shape_text = " x ".join(map(str, scale["shape"]))
        scale_rows.append(
            ["load (read + scan + load)", _time_text(scale["load_s"]), _mb(load_peak), _mb(load_above),
             f"{shape_text}, {_mb(scale_bytes)} MB"]
        )  # fmt: skip
        for plane in ("axial", "coronal", "sagittal"):
            shape_px = "x".join(str(n) for n in scale[f"render_{plane}_shape"][:2])
            seconds = scale[f"render_{plane}_s"]
            scale_rows.append([f"render {plane} view + PNG", _time_text(seconds), "-", "-", f"{shape_px} px"])
        scale_rows.append(
            ["convert to .nii.gz + write", _time_text(scale["convert_s"]), _mb(scale_run.peak_bytes),
             _mb(scale_run.above_baseline_bytes), f"{_mb(scale['nifti_bytes'])} MB file; peak since the load began"]
        )  # fmt: skip
    else:
        scale_rows.append(["load, display, convert", f"n/a ({scale_error[:160]})", "-", "-", ""])
    if scale_dcm2niix is not None:
        scale_rows.append(
            ["dcm2niix -z n (reference, 1 run)", _time_text(scale_dcm2niix.seconds), _mb(scale_dcm2niix.peak_bytes),
             _mb(scale_dcm2niix.above_baseline_bytes), ""]
        )  # fmt: skip
    else:
        scale_rows.append(["dcm2niix -z n (reference)", f"n/a ({scale_dcm2niix_error[:120]})", "-", "-", ""])

    header = [
        "Operation",
        "Tool",
        "Median",
        "Runs",
        "Peak RSS (MB)",
        "Above baseline (MB)",
        "Ours / tool (per-run median)",
        "Notes",
    ]
    lines = [
        f"## Benchmark results ({size_name}: {shape} CT series, {_mb(volume_bytes)} MB int16)",
        "",
        f"Machine: {machine['cores']} cores, {machine['memory']} memory, {machine['cpu']}; {machine['os']}, "
        f"Python {machine['python']}. Date: {date}. Load average at the end: {machine_info()['load']} "
        f"(at the start: {machine['load']}). Whole run: {elapsed / 60:.1f} min.",
        "",
        f"Tools: {_versions()}.",
        "",
        f"Each time is the median of {size.runs} run(s) after {size.warmup} warm-up round(s); every run is a fresh "
        "process and the tools of a group alternate within each round. Python tools are timed around the operation "
        "only (interpreter start-up and imports excluded, as in the long-running app); dcm2niix is timed from start to "
        "exit. Ratios are taken run by run, then their median (below 1.00: we are faster). Peak RSS is the whole "
        "process's high-water mark (VmHWM; dcm2niix: ru_maxrss); 'above baseline' is the high-water mark during the "
        "operation minus the same process's RSS just before it, after imports and setup (dcm2niix: minus its own "
        "peak printing its help).",
        "",
        _table(header, rows),
        "",
        "### Targets",
        "",
        _table(["Target", "Measured", "Result"], targets),
        "",
        f"### Scale check: {size.scale_slices} slices (written in {scale_write_s:.0f} s, one run)",
        "",
        _table(["Step", "Time", "Peak RSS (MB)", "Above baseline (MB)", "Notes"], scale_rows),
        "",
    ]
    summary = {
        "size": size_name,
        "machine": machine,
        "date": date,
        "elapsed_s": elapsed,
        "groups": {
            group.key: {
                entry.key: {
                    "tool": entry.tool,
                    "seconds": [r.seconds for r in entry.runs],
                    "peak_bytes": [r.peak_bytes for r in entry.runs],
                    "above_baseline_bytes": [r.above_baseline_bytes for r in entry.runs],
                    "error": entry.error,
                    "problem": entry.problem,
                    "check": entry.check,
                }
                for entry in group.entries
            }
            for group in groups
        },
        "render": render,
        "render_error": render_error,
        "browser": {"seconds": browser.seconds, "error": browser.error, "notes": browser.notes},
        "browser_slow_link": {"seconds": browser_slow.seconds, "error": browser_slow.error, "link": SLOW_LINK},
        "scale": scale,
        "scale_error": scale_error,
        "targets": [{"target": t[0], "measured": t[1], "result": t[2]} for t in targets],
    }
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="full", help="full: 512x512x300 (+2000 slices); tiny: CI smoke run"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "out", help="folder for results.md and results.json"
    )
    parser.add_argument("--runs", type=int, default=None, help="timed runs per tool (default 5 full, 1 tiny)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with the series and outputs")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    run_benchmark(args.size, args.out, runs=args.runs, keep=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
