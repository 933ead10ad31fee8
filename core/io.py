"""Sniff an upload and dispatch it to the right reader: the single entry point for loading.

Everything of one upload is pooled (files, folders, zips), as a user expects
when they drop a study folder: DICOM files are grouped into series across the
whole upload, and a MetaImage header finds its data file wherever it sits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from core.dicom_series import is_dicom, scan_dicom
from core.errors import CoreError
from core.formats import scan_other
from core.series import Problem, ScanResult, Series
from core.sources import DEFAULT_LIMITS, Limits, Source, expand_sources

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


def _no_progress(fraction: float, text: str) -> None:
    del fraction, text


def scan(
    sources: Iterable[Source],
    limits: Limits = DEFAULT_LIMITS,
    progress: Progress = _no_progress,
) -> ScanResult:
    """Find every series in an upload.

    Parameters
    ----------
    sources : iterable of Source
        The uploaded files; zips are expanded in memory.
    limits : Limits
        Caps checked before allocating.
    progress : callable(fraction, text)
        Called as work advances (the app shows a progress bar).

    Returns
    -------
    ScanResult
        Series (headers read, pixels not yet decoded), errors and skipped files.
        Every input file ends up in exactly one of them.
    """
    result = ScanResult()
    expanded: list[Source] = []
    for source in sources:
        try:
            expanded.extend(expand_sources([source], limits))
        except CoreError as err:
            result.errors.append(Problem(source=source.name, message=err.message))
    progress(0.1, f"{len(expanded)} files")

    dicom = [s for s in expanded if is_dicom(s.data)]
    other = [s for s in expanded if not is_dicom(s.data)]
    for group, reader, text in ((dicom, scan_dicom, "DICOM headers"), (other, scan_other, "other files")):
        if not group:
            continue
        progress(0.2 if reader is scan_dicom else 0.7, f"reading {len(group)} {text}")
        try:
            found = reader(group, limits)
        except CoreError as err:
            found = ScanResult(errors=[Problem(source=s.name, message=err.message) for s in group])
        except Exception as err:  # noqa: BLE001 - the boundary: a reader bug must not take the upload down
            log.exception("reader %s failed", reader.__name__)
            message = (
                f"an internal error stopped reading these files ({type(err).__name__}). "
                "The rest of the upload was read; please report this file type."
            )
            found = ScanResult(errors=[Problem(source=s.name, message=f"{s.name}: {message}") for s in group])
        result.series.extend(found.series)
        result.errors.extend(found.errors)
        result.skipped.extend(found.skipped)
    _make_ids_unique(result.series)
    progress(1.0, f"{len(result.series)} series found")
    return result


def _make_ids_unique(series: list[Series]) -> None:
    """Readers pick readable ids; pooled uploads can repeat one, so suffix repeats."""
    seen: dict[str, int] = {}
    for item in series:
        count = seen.get(item.info.id, 0)
        seen[item.info.id] = count + 1
        if count:
            object.__setattr__(item.info, "id", f"{item.info.id}.{count + 1}")
