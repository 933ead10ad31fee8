"""What a scan of an upload finds: series (loadable volumes), errors and skipped files.

Scanning reads headers only; pixels are decoded when a series is loaded, so
the app can list forty series of a study without decoding any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.sources import Source
from core.volume import Volume, spacing_from_affine


@dataclass(frozen=True)
class Window:
    """A display window in the units of the volume (DICOM (0028,1050)/(0028,1051))."""

    center: float
    width: float
    name: str = ""


@dataclass(frozen=True, eq=False)
class SeriesInfo:
    """Everything known about a series before its pixels are decoded.

    ``shape`` and ``affine`` are those of the :class:`~core.volume.Volume` that
    :meth:`Series.load` returns (after reorientation to RAS+).
    """

    id: str
    kind: str  # "dicom", "nifti", "nrrd", "metaimage", "analyze", "image", "sample"
    description: str
    modality: str
    shape: tuple[int, ...]
    affine: np.ndarray
    dtype: str
    warnings: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    windows: tuple[Window, ...] = ()
    is_rgb: bool = False

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        """The CLI's public JSON fields (``python -m core info --json``); extend, never change."""
        return {
            "id": self.id,
            "description": self.description,
            "modality": self.modality,
            "shape": list(self.shape),
            "spacing": [round(s, 6) for s in self.spacing_mm],
            "affine": [[float(v) for v in row] for row in self.affine],
            "dtype": self.dtype,
            "warnings": list(self.warnings),
            "kind": self.kind,
            "files": len(self.sources),
        }


@dataclass(frozen=True, eq=False)
class Series:
    """A loadable series: its info, a loader and the headers kept beside the volume.

    ``headers`` holds format-specific header objects (pydicom Datasets without
    pixel data in slice order, a nibabel header, a dict of NRRD/MetaImage
    fields); the header page reads them, the volume never does. ``files`` are
    the uploaded files the series was read from (the same bytes, not a copy),
    for exports that rewrite the originals, such as de-identified DICOM.
    """

    info: SeriesInfo
    loader: Callable[[], Volume]
    headers: Sequence[Any] = field(default_factory=tuple)
    files: Sequence[Source] = field(default_factory=tuple)

    def load(self) -> Volume:
        return self.loader()


@dataclass(frozen=True)
class Problem:
    """A file (or group of files) that produced no series, and why."""

    source: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"source": self.source, "message": self.message}


@dataclass(frozen=True)
class Skipped:
    """A file deliberately left out of every volume (e.g. a localizer, a DICOMDIR)."""

    source: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason}


@dataclass
class ScanResult:
    series: list[Series] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
