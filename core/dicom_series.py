"""The DICOM reader: find the volumes in a pile of DICOM files and load them.

:func:`scan_dicom` reads headers only (``stop_before_pixels``) and plans each
volume; :meth:`Series.load` decodes pixels into a preallocated array. Assembly
follows careful converters (dcm2niix, dicom2nifti; REFERENCE.md section 3):

1. Non-images (DICOMDIR, SR, presentation states, RT structures), localizers and
   repeated files (same SOP Instance UID) are skipped with a reason.
2. Images are grouped by (0020,000E) Series Instance UID, then image size, pixel
   spacing, echo, image type and orientation (within 1e-3). Several series are
   never stacked; a series with two orientations becomes two volumes.
3. Slices are sorted by the projection of Image Position (Patient) on the slice
   normal. Several images at one position form a time series when an attribute
   orders them (temporal position, acquisition number, trigger or acquisition
   time); otherwise the group is refused.
4. Spacing comes from the positions, never from Slice Thickness; uneven spacing,
   missing slices and gantry tilt are reported with their values.
5. Siemens mosaics are split into slices with the CSA header, UIH grids with
   their private slice positions; enhanced multi-frame files use their per-frame
   functional groups, and enhanced files of one series (one volume each) join
   into 4D. All images at one position are frames of one slice, not a volume.
6. A DICOM SEG becomes a label volume (voxel = segment number) on the planes of
   its frames, or on the grid of its image series when that is uploaded too; an
   RT Dose grid is placed by (3004,000C) and scaled to Gy by (3004,000E).
7. Values: Philips files get dcm2niix's default "precise" values (private scale
   slope (2005,100E)); files without a Part-10 header are read in whichever of
   the four encodings their first elements parse in.

The affine maps ``(i=column, j=row, k=slice)`` to RAS+ (DICOM LPS with x and y
negated), then the array is reoriented to the closest RAS+ axes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from core.dicom_fastread import quick_image, quick_path_allowed
from core.dicom_geometry import (
    SAME_PLACE_TOLERANCE_MM,
    centred_affine,
    cluster_orientations,
    cluster_positions,
    same_orientation,
    slice_normal,
    stack_affine,
)
from core.dicom_headers import (
    READ_ERRORS,
    Frame,
    classic_frames,
    enhanced_frames,
    first_float,
    floats,
    frame_voi,
    has_preamble,
    image_type,
    integer,
    is_enhanced,
    is_segmentation,
    multi_strings,
    number_of_frames,
    read_header,
    series_label,
    skip_reason,
    sniff_bare_dataset,
    transfer_syntax,
)
from core.dicom_mosaic import MosaicLayout, is_mosaic, mosaic_layout
from core.dicom_pixels import (
    OutputType,
    PixelFormat,
    codec_problem,
    iter_frames,
    native_stored,
    output_type,
    pixel_format,
    significant_bits,
    store_frame,
    store_native_frame,
    to_rgb8,
    volume_buffer,
)
from core.errors import CoreError, LimitError, SeriesGeometryError, UnsupportedFileError
from core.series import Problem, ScanResult, Series, SeriesInfo, Skipped, Window
from core.sources import DEFAULT_LIMITS, Limits, Source, SourceData
from core.volume import Volume, reorient_to_ras

__all__ = ["is_dicom", "scan_dicom"]

# Keys that order images at one slice position in time, most specific first.
# InstanceNumber is deliberately absent: two images that differ only by it are
# duplicates, not a time series.
_TIME_KEYS = ("temporal_position", "acquisition_number", "trigger_time", "acquisition_time", "content_time", "frame")
_DISCRETE_TIME_KEYS = {"temporal_position", "acquisition_number"}


def is_dicom(data: SourceData) -> bool:
    """Whether bytes look like DICOM, reading at most a few dozen bytes.

    True for a Part-10 file ("DICM" at offset 128), and for a bare dataset (no
    preamble, no "DICM", often no meta header: ACR-NEMA style files, some PACS
    exports) whose first elements parse consistently as DICOM in one of the four
    encodings (see :func:`core.dicom_headers.sniff_bare_dataset`).
    """
    if has_preamble(data):
        return True
    return sniff_bare_dataset(data) is not None


# One lock for parsing headers on demand: a Streamlit session and a worker thread may ask at once.
_PARSE_LOCK = threading.Lock()


@dataclass(eq=False)
class _File:
    """One readable DICOM image file of the scan.

    ``rows``, ``columns``, ``series_key``, ``segmentation`` and ``enhanced`` are
    read once, when the file is scanned. ``ds`` (the pydicom header) is parsed on
    first use when the file came through the fast path
    (:mod:`core.dicom_fastread`): assembly reads it for the first file of a
    volume only, and the header page when it shows a file.
    """

    source: Source
    fmt: PixelFormat
    uid: UID
    limits: Limits
    rows: int = 0
    columns: int = 0
    series_key: tuple[Any, ...] = ()
    segmentation: bool = False
    enhanced: bool = False
    frames: list[Frame] = field(default_factory=list)
    mosaic: MosaicLayout | None = None
    duplicates: list[str] = field(default_factory=list)
    parsed: Dataset | None = None

    @property
    def ds(self) -> Dataset:
        """The header as :func:`core.dicom_headers.read_header` reads it (parsed once, then kept)."""
        if self.parsed is None:
            with _PARSE_LOCK:
                if self.parsed is None:
                    self.parsed = read_header(self.source, self.limits)
        return self.parsed

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def label(self) -> str:
        return f"{series_label(self.ds)} ({self.source.name})"


@dataclass
class _Plan:
    """A volume to load: which frames go where, and its geometry.

    ``grid[t][k]`` is the frame at time ``t`` and slice ``k``. For a mosaic,
    ``grid[t][k]`` is a frame of file ``t`` and ``tiles[k]`` the tile it comes from.
    For a DICOM SEG, ``segments[k]`` lists the masks painted into slice ``k``.
    """

    files: list[_File]
    grid: list[list[Frame]]
    affine: np.ndarray
    warnings: list[str]
    rows: int
    columns: int
    tiles: list[int] | None = None
    split_note: str = ""
    # DICOM SEG: per slice, the (frame, segment number) pairs painted into it.
    segments: list[list[tuple[Frame, int]]] | None = None
    segment_names: dict[int, str] = field(default_factory=dict)
    segment_threshold: int = 1

    @property
    def first(self) -> _File:
        return self.files[self.grid[0][0].file]

    @property
    def n_slices(self) -> int:
        return len(self.grid[0])

    @property
    def n_times(self) -> int:
        return len(self.grid)


def scan_dicom(sources: list[Source], limits: Limits = DEFAULT_LIMITS, *, fast_path: bool = True) -> ScanResult:
    """Group DICOM files into loadable volumes, reading headers only.

    Parameters
    ----------
    sources : list of Source
        DICOM files of one upload (other files end up in ``errors``).
    limits : Limits
        ``max_voxels`` caps the size of each volume.
    fast_path : bool
        Read plain image files without pydicom (:mod:`core.dicom_fastread`). The
        result is the same either way; False reads every header with pydicom
        (the tests compare the two).

    Returns
    -------
    ScanResult
        One :class:`Series` per volume (its ``info`` holds the exact shape,
        affine and dtype that ``load()`` returns), plus skipped files (non-images,
        localizers, repeated files, single derived images beside their study) and
        errors (unreadable files, groups no correct volume can be built from).
        Every input file appears in exactly one of series sources, skipped or errors.
    """
    result = ScanResult()
    files = _read_files(sources, result, limits, fast_path=fast_path)
    plans: list[_Plan] = []
    for group in _group_files(files):
        try:
            plans.extend(_plan_group(group))
        except CoreError as err:
            if len(group) > 1 and group[0].mosaic is None and group[0].enhanced:
                plans.extend(_plan_enhanced_files_alone(group, err, result))
                continue
            names = list(dict.fromkeys(f.name for f in group))
            for name in names:
                result.errors.append(Problem(source=name, message=err.message))
    plans = _skip_derived_singles(plans, result)
    _align_segmentations(plans)
    _note_split_series(plans)
    plans.sort(key=_plan_sort_key)
    counters: dict[str, int] = defaultdict(int)
    for plan in plans:
        number = plan.first.ds.get("SeriesNumber", None)
        number_text = str(number).strip() if number not in (None, "") else "0"
        counters[number_text] += 1
        series_id = f"{number_text}-{counters[number_text]}"
        try:
            result.series.append(_make_series(plan, series_id, limits))
        except CoreError as err:
            for item in _plan_files_in_order(plan):
                result.errors.append(Problem(source=item.name, message=err.message))
    return result


def _plan_enhanced_files_alone(group: list[_File], err: CoreError, result: ScanResult) -> list[_Plan]:
    """Enhanced files of one series that do not join into one volume: each file is planned on its own.

    E.g. the same acquisition exported twice under new SOP Instance UIDs: nothing
    orders the copies in time, but each file is a valid volume by itself.
    """
    plans = []
    for item in group:
        try:
            for plan in _plan_group([item]):
                plan.warnings.insert(
                    0,
                    f"{item.label}: the {len(group)} enhanced files of this series do not join into one volume "
                    f"({err.message}); each file is loaded as a volume of its own.",
                )
                plans.append(plan)
        except CoreError as inner:
            result.errors.append(Problem(source=item.name, message=inner.message))
    return plans


def _note_split_series(plans: list[_Plan]) -> None:
    """Say so when one Series Instance UID gave several volumes (never a silent split)."""
    by_series: dict[tuple[Any, ...], list[_Plan]] = defaultdict(list)
    for plan in plans:
        by_series[plan.first.series_key].append(plan)
    for members in by_series.values():
        if len(members) < 2:
            continue
        members.sort(key=_plan_sort_key)
        for number, plan in enumerate(members, start=1):
            if plan.split_note:
                continue  # the orientation split already says why
            plan.split_note = f"volume {number} of {len(members)}"
            plan.warnings.insert(
                0,
                f"{series_label(plan.first.ds)}: this series holds {len(members)} volumes that cannot be stacked "
                "(they differ in image size, pixel spacing, echo, image type, stack or position); this is volume "
                f"{number}.",
            )


# --- reading -----------------------------------------------------------------


def _read_files(sources: Sequence[Source], result: ScanResult, limits: Limits, *, fast_path: bool) -> list[_File]:
    """Read every file's header once: plain image files through the fast path, others with pydicom."""
    files: list[_File] = []
    by_sop: dict[tuple[Any, ...], _File] = {}
    quick_allowed = fast_path and quick_path_allowed()
    for source in sources:
        try:
            if not is_dicom(source.data):
                result.errors.append(
                    Problem(
                        source.name,
                        f"{source.name}: not a DICOM file (no 'DICM' marker at byte 128 and no DICOM header).",
                    )
                )
                continue
            try:
                quick = quick_image(source.data, len(files), limits.max_voxels) if quick_allowed else None
                item: _File | None = None
                if quick is not None:
                    sop = quick.instance_key
                    item = _File(
                        source=source,
                        fmt=quick.fmt,
                        uid=quick.transfer_syntax,
                        limits=limits,
                        rows=quick.rows,
                        columns=quick.columns,
                        series_key=quick.series_key,
                        frames=[quick.frame],
                    )
                else:
                    ds = read_header(source, limits)
                    reason = skip_reason(ds, source.data)
                    if reason:
                        result.skipped.append(Skipped(source.name, reason))
                        continue
                    sop = _instance_key(ds)
                if sop and sop in by_sop:
                    kept = by_sop[sop]
                    kept.duplicates.append(source.name)
                    result.skipped.append(
                        Skipped(
                            source.name, f"same (0008,0018) SOP Instance UID as {kept.name}: a repeated copy, used once"
                        )
                    )
                    continue
                if item is None:
                    item = _File(source=source, fmt=pixel_format(ds), uid=transfer_syntax(ds), limits=limits, parsed=ds)
                    _describe_frames(item, len(files), limits)
                    item.series_key = _series_key(ds)
                    item.segmentation = is_segmentation(ds)
                    item.enhanced = is_enhanced(ds)
            except CoreError as err:
                result.errors.append(
                    Problem(source.name, err.message if source.name in err.message else f"{source.name}: {err.message}")
                )
                continue
            except READ_ERRORS as err:
                result.errors.append(
                    Problem(source.name, f"{source.name}: damaged DICOM header ({type(err).__name__}: {err}).")
                )
                continue
            if sop:
                by_sop[sop] = item
            files.append(item)
        finally:
            source.release_pages()  # the header's pages; the pixels are read again at load
    return files


def _instance_key(ds: Dataset) -> tuple[Any, ...]:
    """Identity of an image: its SOP Instance UID, plus where it is.

    The same UID at another position or instance number is a broken anonymizer
    reusing UIDs, not a repeated copy, so those files are kept.
    """
    sop = str(ds.get("SOPInstanceUID", "") or "")
    if not sop:
        return ()
    # Positions compared as numbers: a re-encoded copy may format the same DS value differently.
    position: tuple[Any, ...]
    try:
        position = tuple(round(float(v), 2) for v in ds.get("ImagePositionPatient") or ())
    except (TypeError, ValueError):
        position = (str(ds.get("ImagePositionPatient", "")),)
    return (sop, position, str(ds.get("InstanceNumber", "")))


def _describe_frames(item: _File, index: int, limits: Limits) -> None:
    """Fill ``item.frames`` (and ``item.mosaic``) from its header."""
    ds = item.ds
    rows, columns, count = int(ds.Rows), int(ds.Columns), number_of_frames(ds)
    item.rows, item.columns = rows, columns
    if rows <= 0 or columns <= 0:
        raise UnsupportedFileError(f"{item.name}: image of {rows}x{columns} pixels", source=item.name)
    # Checked before one record per frame is made: a header can claim 10^9 frames.
    declared = rows * columns * count * item.fmt.samples
    if declared > limits.max_voxels:
        raise LimitError(
            f"{item.name}: declares {count} frames of {rows}x{columns} pixels ({declared:,} values), above the "
            f"cap of {limits.max_voxels:,}. Split the file or raise the limit.",
            source=item.name,
        )
    if is_mosaic(ds) and number_of_frames(ds) == 1:
        item.mosaic = mosaic_layout(ds, item.label)
        item.frames = classic_frames(ds, index)
    elif is_enhanced(ds):
        item.frames = enhanced_frames(ds, index)
    else:
        item.frames = classic_frames(ds, index)


# --- grouping ----------------------------------------------------------------


def _series_key(ds: Dataset) -> tuple[Any, ...]:
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if uid:
        return (uid,)
    # No UID (seen in stripped exports): fall back to what names a series in a study.
    return (
        "",
        str(ds.get("StudyInstanceUID", "")),
        str(ds.get("SeriesNumber", "")),
        str(ds.get("SeriesDescription", "")),
    )


def _round(values: Sequence[float] | np.ndarray | None, digits: int) -> tuple[float, ...] | None:
    return None if values is None else tuple(round(float(v), digits) for v in values)


def _group_files(files: list[_File]) -> list[list[_File]]:
    """Candidate volumes: files that may be stacked together.

    Frames of enhanced files of one series are pooled, other multi-frame files are
    planned alone; frames are regrouped later by orientation and position.
    """
    groups: dict[tuple[Any, ...], list[_File]] = {}
    singles: list[list[_File]] = []
    for item in files:
        common = (item.series_key, item.rows, item.columns, item.fmt.samples, item.fmt.is_rgb)
        if item.mosaic is not None:
            frame = item.frames[0]
            key: tuple[Any, ...] = (
                "mosaic",
                *common,
                item.mosaic.n_slices,
                _round(frame.orientation, 3),
                _round(frame.position, 2),
                frame.split,
            )
        elif item.segmentation:
            singles.append([item])  # a SEG is one label volume, never stacked with images
            continue
        elif len(item.frames) == 1 and item.frames[0].has_geometry:
            frame = item.frames[0]
            key = ("stack", *common, _round(frame.pixel_spacing, 4), frame.split)
        elif item.enhanced and item.frames and all(frame.has_geometry for frame in item.frames):
            # Enhanced files of one series are planned together: a series stored one
            # volume per file (fMRI, dynamic series) becomes one 4D volume, a volume
            # split over several files one 3D volume. Frames are split by echo, frame
            # type and stack in _plan_group.
            key = ("enhanced", *common)
        else:
            # Multi-frame files and images without position are volumes on their own.
            singles.append([item])
            continue
        groups.setdefault(key, []).append(item)
    return [*groups.values(), *singles]


# --- planning ----------------------------------------------------------------


def _plan_group(group: list[_File]) -> list[_Plan]:
    first = group[0]
    if first.mosaic is not None:
        return [_plan_mosaics(group)]
    if first.segmentation:
        return [_plan_segmentation(first)]
    # Renumber frames to index into this group's file list.
    local = [_with_file(frame, n) for n, item in enumerate(group) for frame in item.frames]
    if all(frame.has_geometry for frame in local):
        # Enhanced files can hold several echoes, frame types, stacks or pixel sizes: one volume each.
        parts: dict[tuple[Any, ...], list[Frame]] = {}
        for frame in local:
            parts.setdefault((frame.split, _round(frame.pixel_spacing, 4)), []).append(frame)
        plans = []
        for frames in parts.values():
            plans.extend(_plan_stacks(group, frames))
        return plans
    if any(frame.has_geometry for frame in local):
        label = first.label
        missing = sum(not f.has_geometry for f in local)
        warning = (
            f"{label}: {missing} of {len(local)} frames lack (0020,0032)/(0020,0037) in their functional groups; "
            "frames are stacked in file order with an assumed spacing."
        )
        return [_plan_without_geometry(first, local, extra_warning=warning)]
    return [_plan_without_geometry(first, local)]


def _with_file(frame: Frame, file: int) -> Frame:
    return dataclasses.replace(frame, file=file)


def _plan_stacks(group: list[_File], frames: list[Frame]) -> list[_Plan]:
    """Split frames by orientation, then sort each part into slices (and time points)."""
    label = group[0].label
    labels = cluster_orientations([frame.orientation for frame in frames])  # type: ignore[misc]
    parts = sorted(set(labels))
    plans = []
    for part in parts:
        members = [frame for frame, lab in zip(frames, labels, strict=True) if lab == part]
        plan = _plan_stack(group, members, label)
        if len(parts) > 1:
            iop = [round(float(v), 4) for v in members[0].orientation]  # type: ignore[union-attr]
            plan.warnings.insert(
                0,
                f"{label}: images have {len(parts)} different orientations ((0020,0037) differs by more than 1e-3); "
                f"split into {len(parts)} volumes, this one of {len(members)} images with orientation {iop}.",
            )
            plan.split_note = f"orientation {part + 1} of {len(parts)}"
        plans.append(plan)
    return plans


def _plan_stack(group: list[_File], frames: list[Frame], label: str) -> _Plan:
    """Sort frames of one orientation along the normal; equal positions become time points.

    Raises
    ------
    SeriesGeometryError
        Images at one level but apart in-plane, unequal image counts per position,
        or several images per position that no attribute orders in time.
    """
    first = group[frames[0].file]
    orientation = frames[0].orientation
    normal = slice_normal(orientation)  # type: ignore[arg-type]
    distances = [float(frame.position @ normal) for frame in frames]  # type: ignore[operator]
    slices = [[frames[i] for i in members] for members in cluster_positions(distances)]
    for members in slices:
        places = np.array([frame.position for frame in members])
        spread = float(np.max(np.linalg.norm(places - places[0], axis=1)))
        if spread > SAME_PLACE_TOLERANCE_MM:
            raise SeriesGeometryError(
                f"{label}: {len(members)} images lie in the same plane (distance {members[0].position @ normal:.3f} mm "
                f"along the normal) but {spread:.3g} mm apart in-plane: several stacks in one series. "
                "Upload the stacks as separate series.",
                source=label,
            )
    counts = [len(members) for members in slices]
    if len(set(counts)) > 1:
        worst = int(np.argmax(counts))
        raise SeriesGeometryError(
            f"{label}: slice positions hold {min(counts)}-{max(counts)} images each (e.g. {counts[worst]} images at "
            f"{_distance_label(slices[worst][0], normal)}), so they are neither one volume nor a complete time series. "
            "Remove the duplicate or extra images, or upload one acquisition at a time.",
            source=label,
        )
    warnings: list[str] = []
    n_times = counts[0]
    if n_times > 1 and len(slices) == 1:
        # All images at one position: a cine loop or repeated scan of one slice, not a volume
        # (dicom2nifti NOT_A_VOLUME; dcm2niix stacks them as frames, X x Y x 1 x N).
        slices, key = _order_frames_at_one_position(slices, label)
        place = ", ".join(f"{v:.4g}" for v in slices[0][0].position)  # type: ignore[union-attr]
        warnings.append(
            f"{label}: all {n_times} images lie at one position ({place} mm): loaded as {n_times} frames of a "
            f"single slice, not a volume, ordered by {key.replace('_', ' ')}."
        )
    elif n_times > 1:
        slices, key = _order_in_time(slices, label)
        warnings.append(
            f"{label}: {n_times} images at each of {len(slices)} positions: loaded as a time series of "
            f"{n_times} volumes ordered by {key.replace('_', ' ')}."
        )
    grid = [[slices[k][t] for k in range(len(slices))] for t in range(n_times)]
    positions = np.array([frame.position for frame in grid[0]])
    spacing = frames[0].pixel_spacing
    if spacing is None:
        spacing = (1.0, 1.0)
        warnings.append(f"{label}: no (0028,0030) Pixel Spacing; 1 mm pixels assumed, so sizes are not in mm.")
    thickness = frames[0].thickness or frames[0].slice_spacing or 1.0
    geometry = stack_affine(
        orientation,  # type: ignore[arg-type]
        spacing,
        positions,
        single_slice_thickness_mm=thickness,
        gantry_tilt_deg=first_float(first.ds, "GantryDetectorTilt"),
        label=label,
    )
    warnings.extend(geometry.warnings)
    warnings.extend(_instance_number_warnings(group, frames, label))
    return _Plan(
        files=group,
        grid=grid,
        affine=geometry.affine,
        warnings=warnings,
        rows=first.rows,
        columns=first.columns,
    )


def _distance_label(frame: Frame, normal: np.ndarray) -> str:
    return f"{float(frame.position @ normal):.3f} mm along the slice normal"  # type: ignore[operator]


def _temporal_key(key: str) -> Callable[[Frame], Any]:
    def value(frame: Frame) -> Any:
        return frame.temporal[key]

    return value


def _order_in_time(slices: list[list[Frame]], label: str) -> tuple[list[list[Frame]], str]:
    """Sort the images of every position by the first attribute that tells them apart."""
    for key in _TIME_KEYS:
        values = [[frame.temporal.get(key) for frame in members] for members in slices]
        if any(v is None for row in values for v in row):
            continue
        if any(len(set(row)) != len(row) for row in values):
            continue
        if key in _DISCRETE_TIME_KEYS and len({tuple(sorted(row)) for row in values}) != 1:  # type: ignore[type-var]
            continue
        if key == "frame" and any(len({frame.file for frame in members}) > 1 for members in slices):
            # Frame numbers order the frames of one file; across files they are only instance
            # numbers, which tell copies apart, not time points.
            continue
        ordered = [sorted(members, key=_temporal_key(key)) for members in slices]
        return ordered, key
    count = len(slices[0])
    raise SeriesGeometryError(
        f"{label}: {count} images at each slice position, but no (0020,0100) Temporal Position Identifier, "
        "(0020,0012) Acquisition Number, (0018,1060) Trigger Time or (0008,0032) Acquisition Time tells them "
        "apart: they are duplicates, not a time series. Remove the repeated images and upload again.",
        source=label,
    )


def _order_frames_at_one_position(slices: list[list[Frame]], label: str) -> tuple[list[list[Frame]], str]:
    """Order images that all share one position: by a time attribute, else by distinct instance numbers.

    With a single position there is no volume for an instance number to be a
    duplicate of, so (0020,0013) may order the frames (as dcm2niix does).
    """
    try:
        return _order_in_time(slices, label)
    except SeriesGeometryError:
        members = slices[0]
        numbers = [frame.instance_number for frame in members]
        if any(n is None for n in numbers) or len(set(numbers)) != len(numbers):
            raise SeriesGeometryError(
                f"{label}: all {len(members)} images lie at one position and neither a time attribute nor distinct "
                "(0020,0013) Instance Numbers tell them apart: they are copies of one image. Remove the repeated "
                "files and upload again.",
                source=label,
            ) from None
        return [sorted(members, key=lambda frame: frame.instance_number)], "instance_number"  # type: ignore[arg-type,return-value]


def _instance_number_warnings(group: list[_File], frames: list[Frame], label: str) -> list[str]:
    numbers = [frame.instance_number for frame in frames if frame.index is None]
    if len(numbers) < 2 or len(numbers) != len(frames) or any(n is None for n in numbers):
        return []
    if len(set(numbers)) != len(numbers):
        return []
    span = max(numbers) - min(numbers) + 1  # type: ignore[type-var,operator]
    if span <= len(numbers):
        return []
    return [
        f"{label}: (0020,0013) Instance Number runs {min(numbers)}-{max(numbers)} ({span} numbers) but "  # type: ignore[type-var]
        f"{len(numbers)} images are present: {span - len(numbers)} images may be missing."
    ]


def _plan_mosaics(group: list[_File]) -> _Plan:
    """Mosaic files of one series at one position: each is a 3D volume, several make a time series."""
    first = group[0]
    label = first.label
    layout = first.mosaic
    assert layout is not None
    frames = [_with_file(item.frames[0], n) for n, item in enumerate(group)]
    warnings: list[str] = []
    if len(frames) > 1:
        ordered, key = _order_in_time([frames], label)
        frames = ordered[0]
        warnings.append(
            f"{label}: {len(frames)} mosaic volumes loaded as a time series ordered by {key.replace('_', ' ')}."
        )
    orientation = frames[0].orientation
    normal = slice_normal(orientation)  # type: ignore[arg-type]
    # Slices may run against row x column (CSA SliceNormalVector); sort them along it.
    order = sorted(range(layout.n_slices), key=lambda n: float(layout.positions[n] @ normal))
    spacing = frames[0].pixel_spacing or (1.0, 1.0)
    geometry = stack_affine(
        orientation,  # type: ignore[arg-type]
        spacing,
        layout.positions[order],
        label=label,
    )
    warnings.extend(geometry.warnings)
    return _Plan(
        files=group,
        grid=[[frame] * layout.n_slices for frame in frames],
        affine=geometry.affine,
        warnings=warnings,
        rows=layout.tile_rows,
        columns=layout.tile_columns,
        tiles=order,
    )


def _plan_without_geometry(item: _File, frames: list[Frame], extra_warning: str = "") -> _Plan:
    """A file whose frames have no position: frames stacked in file order."""
    ds = item.ds
    label = item.label
    warnings = [extra_warning] if extra_warning else []
    count = len(frames)
    row_spacing, column_spacing = frames[0].pixel_spacing or (1.0, 1.0)
    if count > 1:
        slice_step = first_float(ds, "SpacingBetweenSlices") or first_float(ds, "SliceThickness") or 1.0
    else:
        slice_step = first_float(ds, "SliceThickness") or first_float(ds, "SpacingBetweenSlices") or 1.0
    orientation = floats(ds, "ImageOrientationPatient", 6)
    position = floats(ds, "ImagePositionPatient", 3)
    offsets = floats(ds, "GridFrameOffsetVector")
    order = list(range(count))
    if count > 1 and orientation is not None and position is not None:
        normal = slice_normal(orientation)
        if offsets is not None and len(offsets) == count:
            # RT Dose: frame positions along the normal are given explicitly (PS3.3 C.8.8.3.2).
            relative = _grid_frame_offsets(offsets, position, normal, label)
            order = sorted(range(count), key=lambda n: relative[n])
            steps = relative[order]
            if len(set(steps.tolist())) != count:
                raise SeriesGeometryError(
                    f"{label}: (3004,000C) Grid Frame Offset Vector repeats offsets.", source=label
                )
        else:
            steps = np.arange(count) * slice_step
            warnings.append(
                f"{label}: {count} frames share one (0020,0032) Image Position; they are stacked along the slice "
                f"normal {slice_step:g} mm apart ((0018,0088)/(0018,0050)), an assumption the file does not state."
            )
        positions = np.asarray(position)[None, :] + steps[:, None] * normal[None, :]
        geometry = stack_affine(orientation, (row_spacing, column_spacing), positions, label=label)
        affine = geometry.affine
        warnings.extend(geometry.warnings)
    elif count == 1 and orientation is not None and position is not None:
        geometry = stack_affine(orientation, (row_spacing, column_spacing), np.asarray([position]),
                                single_slice_thickness_mm=slice_step, label=label)  # fmt: skip
        affine = geometry.affine
    else:
        affine = centred_affine((int(ds.Columns), int(ds.Rows), count), (column_spacing, row_spacing, slice_step))
        what = f"{count} frames stacked in file order" if count > 1 else "a 2D image"
        warnings.append(
            f"{label}: no patient position ((0020,0032)/(0020,0037)): {what}, centred on the origin with "
            f"{column_spacing:g} x {row_spacing:g} x {slice_step:g} mm voxels (as dcm2niix does); "
            "world positions are arbitrary."
        )
    local = [_with_file(frames[n], 0) for n in order]
    return _Plan(
        files=[item],
        grid=[local],
        affine=affine,
        warnings=warnings,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
    )


def _grid_frame_offsets(
    offsets: Sequence[float], position: Sequence[float], normal: np.ndarray, label: str
) -> np.ndarray:
    """(3004,000C) Grid Frame Offset Vector as distances (mm) along the slice normal from frame 0's plane.

    PS3.3 C.8.8.3.2: when the first offset is 0 the offsets are relative to
    (0020,0032); when it is not, they are z coordinates, which the standard only
    allows for an axial grid (IOP 1\\0\\0\\0\\1\\0) whose (0020,0032) z equals the first
    offset. Anything else cannot be placed unambiguously.

    Raises
    ------
    SeriesGeometryError
        A non-zero first offset that is not the absolute form.
    """
    values = np.asarray(offsets, dtype=np.float64)
    if values[0] == 0:
        return values
    axial = bool(np.allclose(normal, [0.0, 0.0, 1.0], atol=1e-4))
    if axial and abs(values[0] - float(position[2])) <= 0.01:
        return values - values[0]
    raise SeriesGeometryError(
        f"{label}: (3004,000C) Grid Frame Offset Vector starts at {values[0]:g} mm, not 0. The standard reads that "
        "as z coordinates, allowed only for an axial grid whose (0020,0032) z is the first offset; here z = "
        f"{float(position[2]):g} mm and the slice normal is {np.round(normal, 4).tolist()}. Where the dose planes "
        "are is ambiguous, so the grid is not loaded. Export the dose again from the planning system.",
        source=label,
    )


def _segment_names(ds: Dataset, label: str) -> dict[int, str]:
    """(0062,0002) Segment Sequence: segment number -> label."""
    names: dict[int, str] = {}
    for item in ds.get("SegmentSequence") or []:
        number = item.get("SegmentNumber", None)
        if number is None:
            continue
        try:
            key = int(number)
        except (TypeError, ValueError):
            continue
        names[key] = str(item.get("SegmentLabel", "") or item.get("SegmentDescription", "") or "").strip()
    if not names:
        raise SeriesGeometryError(
            f"{label}: DICOM SEG without (0062,0002) Segment Sequence numbers; its frames cannot be labelled.",
            source=label,
        )
    return names


def _plan_segmentation(item: _File) -> _Plan:
    """A DICOM SEG as one label volume: voxel value = segment number (0 = no segment).

    Each frame is the mask of one segment on one plane, placed by its per-frame
    (0020,9113) Plane Position, which puts the labels in the geometry of the
    images they were drawn on. Writers leave out empty frames, so planes are
    collected from all frames and the gaps between them filled with 0 on the
    regular grid (step (0018,0088) Spacing Between Slices, or the smallest gap).

    Raises
    ------
    SeriesGeometryError
        Frames without plane position/orientation, with several orientations, at
        positions that are not on one regular grid, or naming unknown segments.
    """
    ds = item.ds
    label = item.label
    names = _segment_names(ds, label)
    frames = [_with_file(frame, 0) for frame in item.frames]
    missing = [frame.index for frame in frames if not frame.has_geometry]
    if missing:
        raise SeriesGeometryError(
            f"{label}: DICOM SEG frames {missing[:5]}{' ...' if len(missing) > 5 else ''} have no (0020,9113) Plane "
            "Position / (0020,9116) Plane Orientation, so the segments cannot be placed in space; no label "
            "volume is built.",
            source=label,
        )
    unknown = sorted({str(frame.segment) for frame in frames if frame.segment not in names})
    if unknown:
        raise SeriesGeometryError(
            f"{label}: DICOM SEG frames refer to (0062,000B) Referenced Segment Number {', '.join(unknown)}, which "
            f"the (0062,0002) Segment Sequence does not define (it has {sorted(names)}).",
            source=label,
        )
    if len(set(cluster_orientations([frame.orientation for frame in frames]))) > 1:  # type: ignore[misc]
        raise SeriesGeometryError(
            f"{label}: DICOM SEG frames have several (0020,0037) orientations; one label volume needs one.",
            source=label,
        )
    spacing = frames[0].pixel_spacing
    if spacing is None:
        raise SeriesGeometryError(
            f"{label}: DICOM SEG without (0028,0030) Pixel Spacing in (0028,9110) Pixel Measures; the size of "
            "its pixels, and so where the labels lie, is unknown.",
            source=label,
        )
    orientation = frames[0].orientation
    normal = slice_normal(orientation)  # type: ignore[arg-type]
    distances = [float(frame.position @ normal) for frame in frames]  # type: ignore[operator]
    planes = cluster_positions(distances)
    anchors = np.array([frames[members[0]].position for members in planes])
    for members, anchor in zip(planes, anchors, strict=True):
        places = np.array([frames[n].position for n in members])
        spread = float(np.max(np.linalg.norm(places - anchor, axis=1)))
        if spread > SAME_PLACE_TOLERANCE_MM:
            raise SeriesGeometryError(
                f"{label}: DICOM SEG frames in one plane lie {spread:.3g} mm apart in-plane; their grid is unknown.",
                source=label,
            )
    thickness = frames[0].slice_spacing or frames[0].thickness or 1.0
    if len(planes) == 1:
        indices = [0]
        positions = anchors
    else:
        along = anchors @ normal
        gaps = np.diff(along)
        candidates = [step for step in (frames[0].slice_spacing, float(gaps.min())) if step and step > 0]
        for step in candidates:
            offsets = (along - along[0]) / step
            rounded = np.round(offsets)
            if float(np.max(np.abs(offsets - rounded))) * step <= min(SAME_PLACE_TOLERANCE_MM, 0.25 * step):
                break
        else:
            shown = ", ".join(f"{v:.4g}" for v in along[:6])
            raise SeriesGeometryError(
                f"{label}: DICOM SEG planes lie at {shown}{' ...' if len(along) > 6 else ''} mm along the normal, "
                f"which are not multiples of one slice step ((0018,0088) {frames[0].slice_spacing} mm, smallest gap "
                f"{float(gaps.min()):.4g} mm); the label volume's grid is unknown, so it is not built.",
                source=label,
            )
        indices = [int(v) for v in rounded]
        step_vector = (anchors[-1] - anchors[0]) / indices[-1]
        positions = anchors[0][None, :] + np.arange(indices[-1] + 1)[:, None] * step_vector[None, :]
        worst = float(np.max(np.linalg.norm(positions[indices] - anchors, axis=1)))
        if worst > SAME_PLACE_TOLERANCE_MM:
            raise SeriesGeometryError(
                f"{label}: DICOM SEG planes are not on one straight regular grid (a plane is {worst:.3g} mm off); "
                "the label volume's grid is unknown, so it is not built.",
                source=label,
            )
    geometry = stack_affine(
        orientation,  # type: ignore[arg-type]
        spacing,
        positions,
        single_slice_thickness_mm=thickness,
        label=label,
    )
    painted: list[list[tuple[Frame, int]]] = [[] for _ in range(len(positions))]
    for members, k in zip(planes, indices, strict=True):
        for n in members:
            painted[k].append((frames[n], int(frames[n].segment)))  # type: ignore[arg-type]
    warnings = list(geometry.warnings)
    shared = [k for k, members in enumerate(painted) if len({number for _, number in members}) > 1]
    if shared:
        warnings.append(
            f"{label}: several segments are drawn on {len(shared)} of {len(painted)} planes; where they overlap, a "
            "label volume can hold one value only and keeps the higher segment number."
        )
    threshold = 1
    if str(ds.get("SegmentationType", "")).upper() == "FRACTIONAL":
        # FRACTIONAL frames hold 0..(0062,000E) Maximum Fractional Value: inside from 50 %.
        maximum = integer(ds, "MaximumFractionalValue") or (2 ** int(ds.get("BitsStored", 8) or 8) - 1)
        threshold = max(1, (maximum + 1) // 2)
    return _Plan(
        files=[item],
        grid=[[frames[0]] * len(positions)],
        affine=geometry.affine,
        warnings=warnings,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        segments=painted,
        segment_names=names,
        segment_threshold=threshold,
    )


def _referenced_series(ds: Dataset) -> set[str]:
    """Series Instance UIDs a SEG was drawn on: (0008,1115) Referenced Series Sequence."""
    return {str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence") or []} - {""}


def _align_segmentations(plans: list[_Plan]) -> None:
    """Put each SEG on the grid of the image series it references, when that series is in the upload.

    The label volume then has the image's shape and affine, so it overlays voxel
    for voxel. Only when every SEG plane is one of the image's slices (same
    orientation, pixel spacing and size); otherwise the SEG keeps its own grid
    and says why.
    """
    for plan in plans:
        if plan.segments is None:
            continue
        wanted = _referenced_series(plan.first.ds)
        candidates = [
            other
            for other in plans
            if other.segments is None
            and other.tiles is None
            and str(other.first.ds.get("SeriesInstanceUID", "")) in wanted
        ]
        if not candidates:
            continue
        label = plan.first.label
        reasons = []
        for image in candidates:
            reason = _segmentation_fits(plan, image)
            if reason:
                reasons.append(reason)
                continue
            slice_positions = np.array([frame.position for frame in image.grid[0]])
            normal = slice_normal(image.grid[0][0].orientation)  # type: ignore[arg-type]
            along = slice_positions @ normal
            painted: list[list[tuple[Frame, int]]] = [[] for _ in range(len(slice_positions))]
            for members in plan.segments:
                for frame, number in members:
                    k = int(np.argmin(np.abs(along - float(frame.position @ normal))))  # type: ignore[operator]
                    painted[k].append((frame, number))
            plan.segments = painted
            plan.grid = [[plan.grid[0][0]] * len(slice_positions)]
            plan.affine = image.affine
            plan.warnings = [w for w in plan.warnings if "overlap" in w]
            plan.warnings.insert(
                0,
                f"{label}: labels placed on the grid of the referenced series {image.first.label}, "
                "so they overlay it voxel for voxel.",
            )
            break
        else:
            plan.warnings.append(
                f"{label}: the referenced image series is in the upload but its grid does not hold the SEG planes "
                f"({'; '.join(reasons)}); the labels keep the SEG's own grid."
            )


def _segmentation_fits(seg: _Plan, image: _Plan) -> str:
    """Why the SEG's planes are not slices of ``image`` ("" when they are)."""
    frame = seg.grid[0][0]
    reference = image.grid[0][0]
    if (seg.rows, seg.columns) != (image.rows, image.columns):
        return f"{seg.rows}x{seg.columns} pixels vs {image.rows}x{image.columns}"
    if not same_orientation(frame.orientation, reference.orientation):  # type: ignore[arg-type]
        return "another orientation"
    if not np.allclose(frame.pixel_spacing or (0, 0), reference.pixel_spacing or (1, 1), atol=1e-4):
        return f"pixel spacing {frame.pixel_spacing} vs {reference.pixel_spacing}"
    slice_positions = np.array([f.position for f in image.grid[0]])
    assert seg.segments is not None
    for members in seg.segments:
        for member, _ in members:
            offsets = np.linalg.norm(slice_positions - member.position, axis=1)
            if float(offsets.min()) > SAME_PLACE_TOLERANCE_MM:
                return f"a SEG plane lies {float(offsets.min()):.3g} mm from the nearest image slice"
    return ""


def _is_derived_single(plan: _Plan) -> bool:
    if plan.n_slices != 1 or plan.n_times != 1 or len(plan.files) != 1 or plan.tiles is not None:
        return False
    kind = image_type(plan.first.ds)
    return len(kind) >= 2 and kind[0] == "DERIVED" and kind[1] == "SECONDARY"


def _skip_derived_singles(plans: list[_Plan], result: ScanResult) -> list[_Plan]:
    """Skip single derived secondary images (screen captures, dose reports) beside their study's volumes.

    Uploaded alone they are loaded: the user asked for them.
    """
    studies_with_volumes = {
        str(plan.first.ds.get("StudyInstanceUID", "")) for plan in plans if not _is_derived_single(plan)
    }
    kept = []
    for plan in plans:
        study = str(plan.first.ds.get("StudyInstanceUID", ""))
        if _is_derived_single(plan) and study and study in studies_with_volumes:
            result.skipped.append(
                Skipped(
                    plan.first.name,
                    "single derived image ((0008,0008) Image Type DERIVED\\SECONDARY: a screen capture, report "
                    "or thumbnail) beside volumes of the same study; upload it alone to view it",
                )
            )
            continue
        kept.append(plan)
    return kept


def _plan_sort_key(plan: _Plan) -> tuple[Any, ...]:
    ds = plan.first.ds
    try:
        number = float(ds.get("SeriesNumber", None) or math.inf)
    except (TypeError, ValueError):
        number = math.inf
    names = sorted(item.name for item in plan.files)
    return (number, str(ds.get("SeriesInstanceUID", "")), plan.split_note, names[0])


# --- series ------------------------------------------------------------------


def _plan_files_in_order(plan: _Plan) -> list[_File]:
    seen: dict[int, _File] = {}
    for row in plan.grid:
        for frame in row:
            if frame.file not in seen:
                seen[frame.file] = plan.files[frame.file]
    return list(seen.values())


def _windows(ds: Dataset, value_per_display: float = 1.0) -> tuple[Window, ...]:
    """Stored windows in the units of the volume (``value_per_display``: see :class:`Frame`)."""
    voi = frame_voi(ds)
    try:
        centers = [float(v) * value_per_display for v in multi_strings(voi.get("WindowCenter", None))]
        widths = [float(v) * value_per_display for v in multi_strings(voi.get("WindowWidth", None))]
    except ValueError:
        return ()
    names = multi_strings(voi.get("WindowCenterWidthExplanation", None))
    windows = []
    for n, (center, width) in enumerate(zip(centers, widths, strict=False)):
        if width > 0 and math.isfinite(center) and math.isfinite(width):
            name = names[n] if n < len(names) else ""
            windows.append(Window(center=center, width=width, name=name.strip()))
    return tuple(windows)


def _unit(ds: Dataset, modality: str) -> str:
    if modality == "CT":
        return "HU"
    if modality == "PT":
        return str(ds.get("Units", "") or "")
    if modality == "RTDOSE":
        # (3004,0002) Dose Units: GY, or RELATIVE (to an implicit reference dose).
        units = str(ds.get("DoseUnits", "") or "").strip().upper()
        return {"GY": "Gy", "RELATIVE": "relative"}.get(units, units)
    return ""


def _make_series(plan: _Plan, series_id: str, limits: Limits) -> Series:
    files = _plan_files_in_order(plan)
    first = plan.first
    ds = first.ds
    label = series_label(ds)
    fmt_rgb = any(item.fmt.is_rgb for item in files)
    has_lut = "ModalityLUTSequence" in ds
    rescales = [(frame.slope, frame.intercept) for row in plan.grid for frame in row]
    out_type = output_type([item.fmt for item in files], rescales, has_lut=has_lut)
    if plan.segments is not None:
        fmt_rgb, has_lut = False, False
        out_type = OutputType(np.dtype(np.uint8 if max(plan.segment_names) <= 255 else np.uint16))
    dtype = out_type.dtype
    n_times, n_slices = plan.n_times, plan.n_slices
    raw_shape: tuple[int, ...] = (plan.columns, plan.rows, n_slices)
    if n_times > 1:
        raw_shape = (*raw_shape, n_times)
    if fmt_rgb:
        raw_shape = (*raw_shape, 3)
    voxels = int(np.prod(raw_shape))
    if voxels > limits.max_voxels:
        raise LimitError(
            f"{label}: {' x '.join(map(str, raw_shape))} = {voxels:,} voxels, above the cap of "
            f"{limits.max_voxels:,}. Upload a part of the series.",
            source=label,
        )
    dummy = np.broadcast_to(np.zeros((), dtype=dtype), raw_shape)
    oriented, affine = reorient_to_ras(dummy, plan.affine)
    warnings = list(plan.warnings)
    duplicates = [name for item in files for name in item.duplicates]
    if duplicates:
        warnings.append(
            f"{label}: {len(duplicates)} repeated files (same SOP Instance UID) used once: {', '.join(duplicates[:5])}"
        )
    problems = sorted({codec_problem(item.uid) for item in files} - {""})
    warnings.extend(f"{label}: {problem} Loading will fail until then." for problem in problems)
    value_per_display = plan.grid[0][0].value_per_display
    if value_per_display != 1.0:
        warnings.append(
            f"{label}: Philips precise values: FP = (stored x (0028,1053) RS + (0028,1052) RI) / (RS x (2005,100E) "
            "SS), as dcm2niix writes them by default (-p y); they are proportional to the measured signal. The "
            f"scanner displays FP x RS x SS (here x {1.0 / value_per_display:.6g}); stored windows are converted."
        )
    modality = str(ds.get("Modality", "") or "")
    description = str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or "").strip()
    if plan.split_note:
        description = f"{description} ({plan.split_note})".strip()
    if plan.segments is not None:
        listed = ", ".join(f"{number} {name}".strip() for number, name in sorted(plan.segment_names.items()))
        description = f"{description} (labels: {listed})".strip()
    info = SeriesInfo(
        id=series_id,
        kind="dicom",
        description=description,
        modality=modality,
        shape=tuple(int(n) for n in oriented.shape),
        affine=affine,
        dtype=str(np.dtype(dtype)),
        warnings=tuple(warnings),
        sources=tuple(item.name for item in files),
        windows=() if plan.segments is not None else _windows(ds, value_per_display),
        is_rgb=fmt_rgb,
    )
    loader = _make_loader(plan, info, out_type, fmt_rgb, has_lut, modality, _unit(ds, modality))
    return Series(info=info, loader=loader, headers=_Headers(files), files=tuple(item.source for item in files))


class _Headers(Sequence[Dataset]):
    """The pydicom headers of a series' files in slice order, parsed when first asked for.

    A scan of a plain series parses no header with pydicom (:mod:`core.dicom_fastread`);
    the header page, de-identification and conversion ask for them, and get the
    Datasets :func:`core.dicom_headers.read_header` returns (kept once parsed).
    """

    def __init__(self, files: Sequence[_File]) -> None:
        self._files = tuple(files)

    def __len__(self) -> int:
        return len(self._files)

    @overload
    def __getitem__(self, index: int) -> Dataset: ...

    @overload
    def __getitem__(self, index: slice) -> list[Dataset]: ...

    def __getitem__(self, index: int | slice) -> Dataset | list[Dataset]:
        if isinstance(index, slice):
            return [item.ds for item in self._files[index]]
        return self._files[index].ds

    def __iter__(self) -> Iterator[Dataset]:
        return (item.ds for item in self._files)

    def __repr__(self) -> str:
        return f"<{len(self._files)} DICOM headers>"


# --- loading -----------------------------------------------------------------


def _make_loader(
    plan: _Plan, info: SeriesInfo, out_type: OutputType, is_rgb: bool, has_lut: bool, modality: str, unit: str
) -> Callable[[], Volume]:
    def load() -> Volume:
        buffer = _decode_plan(plan, out_type, is_rgb, has_lut)
        # buffer is (T, K, rows, columns[, 3]); the volume is (columns, rows, K[, T][, 3]).
        if plan.n_times > 1:
            axes = (3, 2, 1, 0, 4) if is_rgb else (3, 2, 1, 0)
            array = buffer.transpose(axes)
        else:
            array = buffer[0].transpose((2, 1, 0, 3) if is_rgb else (2, 1, 0))
        array, affine = reorient_to_ras(array, plan.affine)
        volume = Volume(
            array=array,
            affine=affine,
            modality=modality,
            unit=unit,
            is_rgb=is_rgb,
            display_inverted=plan.first.fmt.photometric == "MONOCHROME1",
            description=info.description,
        )
        if volume.shape != info.shape or not np.array_equal(volume.affine, info.affine):
            raise SeriesGeometryError(
                f"{info.id}: loaded shape {volume.shape} differs from the scanned {info.shape} (internal error).",
                source=info.id,
            )
        return volume

    return load


def _decode_plan(plan: _Plan, out_type: OutputType, is_rgb: bool, has_lut: bool) -> np.ndarray:
    """Decode every needed frame once, straight into a (T, K, rows, columns[, 3]) buffer."""
    if plan.segments is not None:
        return _decode_segmentation(plan, out_type.dtype)
    shape: tuple[int, ...] = (plan.n_times, plan.n_slices, plan.rows, plan.columns)
    if is_rgb:
        shape = (*shape, 3)
    buffer = volume_buffer(shape, out_type.dtype)
    # Where each (file, frame) goes: mosaics fill a whole row of slices from one frame.
    targets: dict[int, dict[int | None, list[tuple[int, int, Frame]]]] = defaultdict(lambda: defaultdict(list))
    for t, row in enumerate(plan.grid):
        for k, frame in enumerate(row):
            targets[frame.file][frame.index].append((t, k, frame))
    # Uncompressed single frames are copied from the file bytes (no pydicom) by a few threads
    # (numpy releases the GIL); everything else is decoded here in file order. The first
    # error in file order is raised, as if the files were processed one after the other.
    native: list[tuple[int, _File, np.ndarray, list[tuple[int, int, Frame]]]] = []
    failure: tuple[int, Exception] | None = None
    for position, (file_index, by_frame) in enumerate(targets.items()):
        item = plan.files[file_index]
        indices = None if list(by_frame) == [None] else sorted(i for i in by_frame if i is not None)
        stored = None
        if indices is None and not (is_rgb or has_lut):
            stored = native_stored(item.source.data, item.uid, item.rows, item.columns, item.fmt)
        if stored is not None and plan.tiles is None:
            native.append((position, item, stored, by_frame[None]))
            continue
        try:
            _decode_file(plan, buffer, item, by_frame, indices, stored, out_type, is_rgb, has_lut)
        except Exception as err:  # noqa: BLE001 - re-raised below, after the earlier files are stored
            failure = (position, err)
            break
        finally:
            item.source.release_pages()
    if failure is not None:
        native = [job for job in native if job[0] < failure[0]]
    errors = [failure] if failure is not None else []
    errors.extend(_store_native_files(buffer, native, out_type.checked))
    if errors:
        raise min(errors, key=lambda found: found[0])[1]
    return buffer


def _decode_file(
    plan: _Plan,
    buffer: np.ndarray,
    item: _File,
    by_frame: dict[int | None, list[tuple[int, int, Frame]]],
    indices: list[int] | None,
    stored: np.ndarray | None,
    out_type: OutputType,
    is_rgb: bool,
    has_lut: bool,
) -> None:
    """Decode the needed frames of one file (pydicom, or a native mosaic) into ``buffer``."""
    decoded: Iterator[tuple[int, np.ndarray, Dataset | None]] | list[tuple[int, np.ndarray, Dataset | None]]
    if stored is not None:
        decoded = [(0, significant_bits(stored, item.fmt), None)]
    else:
        decoded = iter_frames(item.source.data, item.name, indices)
    for number, pixels, full in decoded:
        key: int | None = None if indices is None else number
        if is_rgb:
            assert full is not None
            pixels = to_rgb8(pixels, full, item.fmt, name=item.name)
        elif has_lut:
            assert full is not None
            pixels = _modality_lut(pixels, full, item.name)
        for t, k, frame in by_frame[key]:
            tile = pixels if plan.tiles is None else _tile(item, pixels, plan.tiles[k])
            slope, intercept = (1.0, 0.0) if (is_rgb or has_lut) else (frame.slope, frame.intercept)
            store_frame(buffer[t, k], tile, slope, intercept, item.name, checked=out_type.checked)


# Below this many bytes of pixels, threads cost more than they save.
_THREADED_BYTES = 16 * 1024**2
_MAX_THREADS = 4


def _store_native_files(
    buffer: np.ndarray, jobs: list[tuple[int, _File, np.ndarray, list[tuple[int, int, Frame]]]], checked: bool
) -> list[tuple[int, Exception]]:
    """Store uncompressed frames with :func:`store_native_frame`, in a few threads for large series.

    Each thread takes a contiguous run of files (so it fills a contiguous part of
    ``buffer``) and stops at its first error. Returns the errors with their file
    positions.
    """

    def run(part: list[tuple[int, _File, np.ndarray, list[tuple[int, int, Frame]]]]) -> list[tuple[int, Exception]]:
        for position, item, stored, places in part:
            try:
                for t, k, frame in places:
                    store_native_frame(
                        buffer[t, k], stored, item.fmt, frame.slope, frame.intercept, item.name, checked=checked
                    )
            except Exception as err:  # noqa: BLE001 - handed to the caller, which raises the first
                return [(position, err)]
            finally:
                item.source.release_pages()  # the file's pixels are in the volume now
        return []

    if not jobs:
        return []
    total = sum(stored.nbytes for _, _, stored, _ in jobs)
    threads = min(_MAX_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if threads < 2 or total < _THREADED_BYTES:
        return run(jobs)
    size = -(-len(jobs) // threads)
    parts = [jobs[start : start + size] for start in range(0, len(jobs), size)]
    with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="dicom-load") as pool:
        return [error for found in pool.map(run, parts) for error in found]


def _decode_segmentation(plan: _Plan, dtype: np.dtype) -> np.ndarray:
    """Paint each SEG frame's mask with its segment number into a (1, K, rows, columns) label buffer.

    Where masks of several segments overlap the higher segment number is kept,
    whatever the order of the frames in the file.
    """
    assert plan.segments is not None
    item = plan.files[0]
    buffer = np.zeros((1, plan.n_slices, plan.rows, plan.columns), dtype=dtype)
    where: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for k, members in enumerate(plan.segments):
        for frame, number in members:
            where[frame.index if frame.index is not None else 0].append((k, number))
    indices = None if item.frames[0].index is None else sorted(where)
    for index, pixels, _ in iter_frames(item.source.data, item.name, indices):
        if pixels.shape != (plan.rows, plan.columns):
            raise UnsupportedFileError(
                f"{item.name}: decoded SEG frame has shape {pixels.shape}, the header declares "
                f"{(plan.rows, plan.columns)}. The file is inconsistent.",
                source=item.name,
            )
        inside = pixels >= plan.segment_threshold
        for k, number in where[index]:
            target = buffer[0, k]
            np.maximum(target, np.where(inside, number, 0).astype(dtype), out=target)
    return buffer


def _tile(item: _File, pixels: np.ndarray, index: int) -> np.ndarray:
    assert item.mosaic is not None
    return item.mosaic.tile(pixels, index)


_LUT_ERRORS: tuple[type[BaseException], ...] = (*READ_ERRORS, RuntimeError)


def _modality_lut(pixels: np.ndarray, ds: Dataset, name: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    try:
        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    except _LUT_ERRORS as err:
        raise UnsupportedFileError(f"{name}: (0028,3000) Modality LUT cannot be applied ({err}).", source=name) from err
