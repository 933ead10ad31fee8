"""The measured operations, each run alone in a fresh interpreter: ``python -m bench.tasks TASK JSON``.

A task is a *setup* (imports, inputs put in memory, a tiny warm-up so lazy imports
and thread pools are not timed: the app is a long-running process that has done
them already) that returns the *operation* to time and an optional *check* run
after timing (never timed, never counted in the peak memory). The child prints
one line ``BENCH-RESULT {json}`` with ``seconds``, ``baseline_bytes`` (its RSS
after setup, once the high-water mark is reset), ``peak_bytes`` (``VmHWM`` after
the operation), ``process_peak_bytes`` (setup included) and ``extra``.

"Ours" is TomoForge's ``core`` called as the app calls it; the reference tools are
called the way their documentation shows, with the choices a careful user makes
(e.g. flying edges without normals, which an STL does not need). Each function's
docstring says exactly what is timed.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULT_MARKER = "BENCH-RESULT "
BONE_HU = 300.0
# 300 HU on integer data: 299.5 selects the same voxels without zero-area triangles (REFERENCE.md 7).
BONE_LEVEL = 299.5

Operation = Callable[[], Any]
Check = Callable[[Any], dict[str, Any]]
Setup = Callable[[dict[str, Any]], tuple[Operation, Check | None]]

TASKS: dict[str, Setup] = {}


def task(name: str) -> Callable[[Setup], Setup]:
    def register(function: Setup) -> Setup:
        TASKS[name] = function
        return function

    return register


def _status_bytes(field_name: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process from /proc/self/status (bytes)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _peak_bytes() -> int:
    """High-water RSS of this address space since exec or the last :func:`_reset_peak`.

    Not ``ru_maxrss``: that also holds the parent's high-water mark from before exec.
    """
    return _status_bytes("VmHWM")


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _array_facts(array: np.ndarray) -> dict[str, Any]:
    """Order-independent facts the parent compares with the phantom (shape sorted, sum, range)."""
    array = np.asarray(array)
    return {
        "shape": sorted(int(n) for n in array.shape),
        "dtype": str(array.dtype),
        "sum": float(array.sum(dtype=np.float64)),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def _exact_facts(array: np.ndarray) -> dict[str, Any]:
    """Facts plus a digest of the C-ordered int16 values (for volumes that must equal the phantom exactly)."""
    facts = _array_facts(array)
    facts["sha1"] = hashlib.sha1(np.ascontiguousarray(np.asarray(array), dtype=np.int16).tobytes()).hexdigest()
    facts["axis_shape"] = [int(n) for n in np.asarray(array).shape]
    return facts


def _nifti_facts(path: Path) -> dict[str, Any]:
    import nibabel as nib

    image = nib.load(str(path))
    facts = _array_facts(np.asanyarray(image.dataobj))
    facts["bytes"] = path.stat().st_size
    facts["on_disk_dtype"] = str(image.get_data_dtype())
    facts["affine"] = np.asarray(image.affine).round(4).tolist()
    return facts


def _stl_facts(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"bytes": len(data), "triangles": int.from_bytes(data[80:84], "little")}


# ----------------------------------------------------------------------------- series load


@task("load_ours_folder")
def load_ours_folder(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Timed: read the folder's files (``read_paths``), ``scan`` the headers, ``load`` the volume."""
    from core.io import scan
    from core.sources import read_paths

    def op() -> Any:
        result = scan(read_paths([args["folder"]]))
        if len(result.series) != 1:
            raise RuntimeError(f"expected one series, got {len(result.series)}: {result.errors[:3]}")
        return result.series[0].load()

    return op, lambda volume: _exact_facts(volume.array)


@task("load_ours_zip")
def load_ours_zip(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Untimed: the zip's bytes in memory (an upload). Timed: ``scan`` (inflates members) and ``load``."""
    from core.io import scan
    from core.sources import Source

    data = Path(args["zip"]).read_bytes()

    def op() -> Any:
        result = scan([Source(name=Path(args["zip"]).name, data=data)])
        if len(result.series) != 1:
            raise RuntimeError(f"expected one series, got {len(result.series)}: {result.errors[:3]}")
        return result.series[0].load()

    return op, lambda volume: _exact_facts(volume.array)


def _naive_stack(datasets: list[Any]) -> np.ndarray:
    """What most tutorials do: sort by z, stack ``pixel_array``, add the intercept in int16."""
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    image = np.stack([ds.pixel_array for ds in datasets]).astype(np.int16)
    slope, intercept = float(datasets[0].RescaleSlope), float(datasets[0].RescaleIntercept)
    if slope != 1:
        image = (slope * image.astype(np.float64)).astype(np.int16)
    image += np.int16(intercept)
    return image


@task("load_pydicom_folder")
def load_pydicom_folder(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Timed: ``dcmread`` every file, sort by z, stack ``pixel_array``, rescale to int16 HU."""
    import pydicom

    _warm_pydicom()

    def op() -> Any:
        return _naive_stack([pydicom.dcmread(path) for path in sorted(Path(args["folder"]).iterdir())])

    return op, _array_facts


@task("load_pydicom_zip")
def load_pydicom_zip(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Untimed: the zip's bytes in memory. Timed: inflate each member, ``dcmread`` it, then as the folder."""
    import pydicom

    _warm_pydicom()
    data = Path(args["zip"]).read_bytes()

    def op() -> Any:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            datasets = [pydicom.dcmread(io.BytesIO(archive.read(name))) for name in archive.namelist()]
        return _naive_stack(datasets)

    return op, _array_facts


def _warm_pydicom() -> None:
    """Import pydicom's pixel back ends once, as a running process would have."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    if path:
        import pydicom

        pydicom.dcmread(path).pixel_array  # noqa: B018


@task("inflate_zip_ours")
def inflate_zip_ours(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Lower bound for our zip load: ``expand_sources`` alone (every member inflated, nothing parsed)."""
    from core.sources import Source, expand_sources

    data = Path(args["zip"]).read_bytes()

    def op() -> Any:
        return sum(len(s.data) for s in expand_sources([Source(name=Path(args["zip"]).name, data=data)]))

    return op, None


@task("inflate_zip_only")
def inflate_zip_only(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """The standard library's way: ``zipfile`` inflates every member into memory, nothing else."""
    data = Path(args["zip"]).read_bytes()

    def op() -> Any:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return sum(len(archive.read(name)) for name in archive.namelist())

    return op, None


@task("read_files_only")
def read_files_only(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Lower bound for the folder: read every file and copy its last rows*columns*2 bytes into one array."""

    def op() -> Any:
        paths = sorted(Path(args["folder"]).iterdir())
        rows, columns = args["rows"], args["columns"]
        out = np.empty((len(paths), rows, columns), dtype=np.uint16)
        size = rows * columns * 2
        for k, path in enumerate(paths):
            data = path.read_bytes()
            out[k] = np.frombuffer(data, dtype="<u2", count=rows * columns, offset=len(data) - size).reshape(
                rows, columns
            )
        return out

    return op, None


@task("load_sitk_folder")
def load_sitk_folder(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Timed: ``ImageSeriesReader`` (GDCM file names of the series, ``Execute``); array viewed, not copied."""
    import SimpleITK as sitk

    def op() -> Any:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(args["folder"]))
        return reader.Execute()

    return op, lambda image: _array_facts(sitk.GetArrayViewFromImage(image))


# ----------------------------------------------------------------------------- DICOM -> .nii.gz


def _write_conversion(conversion: Any, out: Path) -> int:
    """Write a conversion's files as the CLI does (streamed when the Conversion can); returns the bytes written."""
    if hasattr(conversion, "write"):
        paths = conversion.write(out)
    else:  # a Conversion that only holds bytes
        paths = []
        for name, data in conversion.outputs:
            (out / name).write_bytes(data)
            paths.append(out / name)
    return sum(Path(path).stat().st_size for path in paths)


@task("nifti_ours")
def nifti_ours(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Timed: read the folder, scan, ``convert_series`` to .nii.gz (loads the volume), write the file
    (``Conversion.write``, streamed as the CLI does)."""
    from core.convert import ConvertOptions, convert_series
    from core.io import scan
    from core.sources import read_paths

    out = Path(args["out"])

    def op() -> Any:
        result = scan(read_paths([args["folder"]]))
        conversion = convert_series(result.series[0], ConvertOptions(to="nifti", compress=True))
        _write_conversion(conversion, out)
        return out / conversion.primary

    return op, _nifti_facts


@task("nifti_sitk")
def nifti_sitk(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Timed: ``ImageSeriesReader`` then ``WriteImage(image, "out.nii.gz")``."""
    import SimpleITK as sitk

    target = Path(args["out"]) / "out.nii.gz"

    def op() -> Any:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(args["folder"]))
        sitk.WriteImage(reader.Execute(), str(target))
        return target

    return op, _nifti_facts


@task("nifti_dicom2nifti")
def nifti_dicom2nifti(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Timed: ``dicom2nifti.dicom_series_to_nifti(folder, "out.nii.gz")`` with its defaults (reorients)."""
    import logging

    import dicom2nifti

    logging.getLogger("dicom2nifti").setLevel(logging.ERROR)
    target = Path(args["out"]) / "out.nii.gz"

    def op() -> Any:
        dicom2nifti.dicom_series_to_nifti(args["folder"], str(target), reorient_nifti=True)
        return target

    return op, _nifti_facts


# ----------------------------------------------------------------------------- .nii.gz load


@task("niiload_ours")
def niiload_ours(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Timed: read the file's bytes, ``scan``, ``load``."""
    from core.io import scan
    from core.sources import Source

    path = Path(args["nifti"])

    def op() -> Any:
        result = scan([Source(name=path.name, data=path.read_bytes())])
        return result.series[0].load()

    return op, lambda volume: _array_facts(volume.array)


@task("niiload_nibabel")
def niiload_nibabel(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Timed: ``nib.load`` then ``np.asanyarray(img.dataobj)`` (scaled values, nibabel's choice of dtype)."""
    import nibabel as nib

    def op() -> Any:
        return np.asanyarray(nib.load(args["nifti"]).dataobj)

    return op, _array_facts


@task("niiload_sitk")
def niiload_sitk(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Timed: ``sitk.ReadImage``; the array is viewed, not copied."""
    import SimpleITK as sitk

    def op() -> Any:
        return sitk.ReadImage(args["nifti"])

    return op, lambda image: _array_facts(sitk.GetArrayViewFromImage(image))


# ----------------------------------------------------------------------------- bone -> STL


def _phantom(args: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The phantom's int16 HU array and RAS affine, from the .npy files the parent wrote (untimed)."""
    return np.load(args["array"]), np.load(args["affine"])


@task("stl_ours")
def stl_ours(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Timed: ``threshold_surface(volume, 300)`` (flying edges on the bone's box, caps on cut faces)
    then ``write_mesh(..., "stl")`` to a file."""
    from core.mesh import threshold_surface
    from core.mesh_export import write_mesh
    from core.volume import Volume

    array, affine = _phantom(args)
    volume = Volume(array=array, affine=affine, modality="CT", unit="HU")
    # Warm-up on a tiny cube: VTK's modules and thread pool are loaded once per process.
    cube = np.full((6, 6, 6), -1000, dtype=np.int16)
    cube[2:4, 2:4, 2:4] = 1000
    threshold_surface(Volume(array=cube, affine=np.eye(4)), BONE_HU)
    target = Path(args["out"]) / "bone.stl"

    def op() -> Any:
        mesh, _ = threshold_surface(volume, BONE_HU)
        with open(target, "wb") as handle:
            write_mesh(mesh, handle, "stl")
        return target

    return op, _stl_facts


def _numpy_stl_write(triangles: np.ndarray, target: Path) -> None:
    """numpy-stl as documented: a Mesh of the triangle corners, saved as binary (normals computed on save)."""
    from stl import Mode
    from stl import mesh as stl_mesh

    data = np.zeros(len(triangles), dtype=stl_mesh.Mesh.dtype)
    data["vectors"] = triangles
    stl_mesh.Mesh(data, calculate_normals=False).save(str(target), mode=Mode.BINARY)


def _vtk_setup(threads: bool) -> None:
    from vtkmodules.vtkCommonCore import vtkSMPTools

    if threads:
        vtkSMPTools.SetBackend("STDThread")
        vtkSMPTools.Initialize(2)


@task("stl_vtk")
def stl_vtk(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Timed: ``vtkFlyingEdges3D`` at 299.5 HU on the whole volume (no copy: the C-ordered array is
    handed to VTK with its axes reversed; normals, gradients and scalars off), then numpy-stl writes it.
    ``threads``: VTK's STDThread SMP back end with 2 threads instead of the wheel's default."""
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersCore import vtkFlyingEdges3D

    _vtk_setup(bool(args.get("threads")))
    array, affine = _phantom(args)
    spacing = np.diag(affine)[:3]
    origin = affine[:3, 3]
    target = Path(args["out"]) / "bone.stl"
    import stl  # noqa: F401  (imported before timing)

    def op() -> Any:
        image = vtkImageData()
        image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
        image.SetSpacing(spacing[2], spacing[1], spacing[0])
        image.SetOrigin(origin[2], origin[1], origin[0])
        image.GetPointData().SetScalars(numpy_to_vtk(array.reshape(-1), deep=False))
        contour = vtkFlyingEdges3D()
        contour.SetInputData(image)
        contour.SetValue(0, BONE_LEVEL)
        contour.ComputeNormalsOff()
        contour.ComputeGradientsOff()
        contour.ComputeScalarsOff()
        contour.Update()
        output = contour.GetOutput()
        points = vtk_to_numpy(output.GetPoints().GetData())[:, ::-1]  # back to (x, y, z) = (i, j, k) order
        faces = vtk_to_numpy(output.GetPolys().GetConnectivityArray()).reshape(-1, 3)
        _numpy_stl_write(points[faces], target)
        return target

    return op, _stl_facts


@task("stl_skimage")
def stl_skimage(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Timed: ``skimage.measure.marching_cubes(volume, 299.5, spacing=...)`` on the whole volume, then numpy-stl."""
    from skimage.measure import marching_cubes

    array, affine = _phantom(args)
    spacing = tuple(float(s) for s in np.diag(affine)[:3])
    origin = affine[:3, 3]
    target = Path(args["out"]) / "bone.stl"
    marching_cubes(np.zeros((3, 3, 3), np.float32) + np.arange(3)[:, None, None], 0.5)  # warm-up (lazy imports)
    import stl  # noqa: F401

    def op() -> Any:
        vertices, faces, _, _ = marching_cubes(array, level=BONE_LEVEL, spacing=spacing)
        _numpy_stl_write((vertices + origin)[faces], target)
        return target

    return op, _stl_facts


# ----------------------------------------------------------------------------- view render


@task("render")
def render(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """Many views in one process (a view takes milliseconds), on the volume as our DICOM reader returns it
    (its memory layout decides which plane is contiguous). Per view, timed apart: ``render_view`` of a
    windowed view (soft tissue W 400 / L 40), and the whole view payload the View page builds:
    render + PNG (level 1) + the hover values (``view_values``, byte-shuffled, deflated).
    Slice indices change every run, as a slider does. Lists of times are in ``extra``."""
    import zlib

    from core.io import scan
    from core.render import encode_png, render_view, view_values
    from core.series import Window

    volume = scan_and_load(args["folder"], scan)
    window = Window(40.0, 400.0, "soft tissue")
    runs = int(args["runs"])
    sizes = {"axial": volume.shape[2], "coronal": volume.shape[1], "sagittal": volume.shape[0]}

    def one(plane: str, index: int) -> tuple[float, float]:
        start = time.perf_counter()
        image = render_view(volume, plane, index, window)
        middle = time.perf_counter()
        encode_png(image)
        values = view_values(volume, plane, index)
        shuffled = values.reshape(-1).view(np.uint8).reshape(-1, values.dtype.itemsize).T.tobytes()
        _deflate(shuffled)
        end = time.perf_counter()
        return middle - start, end - start

    try:
        from core.render import deflate as _deflate  # what the viewer uses
    except ImportError:  # an older core.render: the same thing with zlib

        def _deflate(data: bytes) -> bytes:
            return zlib.compress(data, 1)

    for n in range(5):  # warm-up: geometry caches and LUTs are built once per volume in the app too
        for plane in sizes:
            one(plane, n)

    def op() -> Any:
        timings: dict[str, list[float]] = {}
        for n in range(runs):
            for plane, count in sizes.items():
                render_s, total_s = one(plane, (n * 37 + 11) % count)
                timings.setdefault(f"{plane}_render", []).append(render_s)
                timings.setdefault(f"{plane}_payload", []).append(total_s)
        return timings

    shape = [int(n) for n in volume.shape]
    return op, lambda timings: {"timings": timings, "shape": shape, "strides": [int(s) for s in volume.array.strides]}


def scan_and_load(folder: str, scan: Callable[..., Any]) -> Any:
    """The one series of a folder, loaded (untimed set-up of tasks that need a volume)."""
    from core.sources import read_paths

    result = scan(read_paths([folder]))
    if len(result.series) != 1:
        raise RuntimeError(f"expected one series in {folder}, got {len(result.series)}")
    return result.series[0].load()


# ----------------------------------------------------------------------------- scale check


@task("scale_ours")
def scale_ours(args: dict[str, Any]) -> tuple[Operation, Check | None]:
    """The long series: load (timed as ``seconds``), then render three views and convert to .nii.gz,
    each timed in ``extra``; the peak RSS right after loading is in ``extra["load_peak_bytes"]``."""
    import base64

    from core.convert import ConvertOptions, convert_series
    from core.io import scan
    from core.render import encode_png, n_slices, render_view
    from core.series import Window
    from core.sources import read_paths

    out = Path(args["out"])
    extra: dict[str, Any] = {}

    def op() -> Any:
        start = time.perf_counter()
        result = scan(read_paths([args["folder"]]))
        series = result.series[0]
        volume = series.load()
        extra["load_s"] = time.perf_counter() - start
        extra["load_peak_bytes"] = _peak_bytes()
        extra["shape"] = [int(n) for n in volume.shape]
        for plane in ("axial", "coronal", "sagittal"):
            start = time.perf_counter()
            image = render_view(volume, plane, n_slices(volume, plane) // 2, Window(40.0, 400.0))
            base64.b64encode(encode_png(image))
            extra[f"render_{plane}_s"] = time.perf_counter() - start
            extra[f"render_{plane}_shape"] = [int(n) for n in image.shape]
        start = time.perf_counter()
        conversion = convert_series(series, ConvertOptions(to="nifti", compress=True), volume=volume)
        extra["nifti_bytes"] = _write_conversion(conversion, out)
        extra["convert_s"] = time.perf_counter() - start
        extra["warnings"] = list(conversion.warnings)
        return volume

    return op, lambda volume: {"scale": extra, **_array_facts(volume.array)}


# ----------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in TASKS:
        print(f"usage: python -m bench.tasks TASK JSON_ARGS; tasks: {', '.join(sorted(TASKS))}", file=sys.stderr)
        return 2
    args = json.loads(argv[2])
    op, check = TASKS[argv[1]](args)
    gc.collect()
    setup_peak = _peak_bytes()
    # Without the reset, a transient peak of the setup (e.g. a warm-up) would hide the operation's.
    reset = _reset_peak()
    baseline = _status_bytes("VmRSS") if reset else setup_peak
    start = time.perf_counter()
    value = op()
    seconds = time.perf_counter() - start
    peak = _peak_bytes()
    extra: dict[str, Any] = {}
    if check is not None and args.get("check", True):
        extra = check(value)
    result = {
        "seconds": seconds,
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "process_peak_bytes": max(peak, setup_peak),
        "extra": extra,
    }
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
