"""Window/level and colour: turning values in physical units into display grey levels.

A window is DICOM's VOI LINEAR function (PS3.3 C.11.2.1.2.1): values below
``center - width/2`` are black, values from ``center + width/2 - 1`` up are white,
and the ramp in between is linear. This is what pydicom's
``pydicom.pixels.apply_windowing`` computes, scaled here to 0..255.

Speed: integer data of at most 16 bits is windowed with a lookup table of
65,536 entries indexed by the raw bits (one ``np.take`` per slice, ~0.2 ms for
512x512) instead of float arithmetic per pixel; the table is built once per
(dtype, window, invert, colormap) and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from core.errors import CoreError
from core.series import Window
from core.volume import Volume

__all__ = [
    "COLORMAPS",
    "CT_PRESETS",
    "Preset",
    "apply_colormap",
    "apply_window",
    "auto_window",
    "colormap_lut",
    "default_window",
    "display_lut",
    "file_windows",
    "is_lut_dtype",
    "lut_index",
    "preset_by_name",
    "window_bounds",
]


@dataclass(frozen=True)
class Preset:
    """A named CT window in Hounsfield units, with where its numbers come from.

    Parameters
    ----------
    name : str
        Label shown in the app.
    center, width : float
        Window center (level) and width in HU.
    source : str
        Citation for the numbers (peers disagree; see ``../shared/REFERENCE.md`` section 2).
    """

    name: str
    center: float
    width: float
    source: str

    @property
    def window(self) -> Window:
        return Window(center=self.center, width=self.width, name=self.name)


# Width/level pairs (HU). Peers disagree, so each names the source it follows.
CT_PRESETS: tuple[Preset, ...] = (
    Preset("Brain", 40.0, 80.0, "OHIF, InVesalius and the radiology literature agree on W 80 / L 40"),
    Preset(
        "Subdural",
        75.0,
        200.0,
        "radiology literature, W 200 / L 75 to 80 (e.g. Radiopaedia 'Windowing (CT)'); lower level of the range",
    ),
    Preset(
        "Stroke",
        40.0,
        40.0,
        "Turner PJ, Holdsworth G. CT stroke window settings: an unfortunate misleading misnomer? "
        "Br J Radiol 2011;84:1061-6 (W 40 / L 40)",
    ),
    Preset("Lung", -600.0, 1500.0, "OHIF 'Lung' preset and the radiology literature: W 1500 / L -600"),
    Preset("Mediastinum", 50.0, 350.0, "radiology literature (e.g. Radiopaedia 'Windowing (CT)'): W 350 / L 50"),
    Preset("Soft tissue", 40.0, 400.0, "OHIF 'Soft tissue' preset: W 400 / L 40 (literature 350/50 to 400/40)"),
    Preset("Liver", 30.0, 150.0, "radiology literature (e.g. Radiopaedia 'Windowing (CT)'): W 150 / L 30"),
    Preset("Bone", 400.0, 1800.0, "radiology literature (e.g. Radiopaedia 'Windowing (CT)'): W 1800 / L 400"),
)


def preset_by_name(name: str) -> Preset:
    """The CT preset called ``name`` (case-insensitive).

    Raises
    ------
    CoreError
        No preset has that name; the message lists the names there are.
    """
    for preset in CT_PRESETS:
        if preset.name.lower() == name.lower():
            return preset
    names = ", ".join(p.name for p in CT_PRESETS)
    raise CoreError(f"no CT window preset called {name!r}; choose one of {names}")


def file_windows(windows: tuple[Window, ...] | list[Window]) -> list[Window]:
    """The windows stored in the file ((0028,1050)/(0028,1051)), labelled for a menu.

    Readers put every value of a multi-valued Window Center/Width pair in
    ``SeriesInfo.windows``; windows with a non-positive or non-finite width are
    dropped (they cannot be displayed).
    """
    out: list[Window] = []
    for number, window in enumerate(windows, start=1):
        if not (np.isfinite(window.center) and np.isfinite(window.width) and window.width > 0):
            continue
        label = window.name.strip() if window.name and window.name.strip() else f"#{number}"
        out.append(Window(center=float(window.center), width=float(window.width), name=f"File: {label}"))
    return out


def _sample(array: np.ndarray, max_samples: int) -> np.ndarray:
    """A regular subsample of ``array`` (strided views, no full copy), flattened."""
    n = int(array.size)
    if n <= max_samples:
        return np.asarray(array).reshape(-1)
    # One stride per axis so the sample stays spread over the whole volume.
    step = int(np.ceil((n / max_samples) ** (1.0 / array.ndim)))
    return np.asarray(array[(slice(None, None, step),) * array.ndim]).reshape(-1)


def auto_window(
    values: np.ndarray | Volume,
    *,
    low_percentile: float = 1.0,
    high_percentile: float = 99.0,
    max_samples: int = 2_000_000,
) -> Window:
    """A window spanning the given percentiles of the values: the default for MR and non-CT data.

    Parameters
    ----------
    values : ndarray or Volume
        Any shape; NaN and infinities are ignored. Large arrays are subsampled
        regularly to at most ``max_samples`` values.
    low_percentile, high_percentile : float
        Percentiles (0-100) mapped to black and white.

    Returns
    -------
    Window
        Named ``"Auto (p1-p99)"``. Width is at least 1 for integer data and
        positive for float data, so a constant image still displays.

    Raises
    ------
    CoreError
        The array holds no finite value.
    """
    array = values.array if isinstance(values, Volume) else np.asarray(values)
    sample = _sample(array, max_samples)
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise CoreError("cannot choose a window: the image has no finite value (all NaN or empty)")
    lo, hi = (float(v) for v in np.percentile(sample, [low_percentile, high_percentile]))
    width = hi - lo
    if sample.dtype.kind in "iub":
        width = max(width, 1.0)
    elif width <= 0:
        width = max(abs(hi) * 1e-3, 1e-6)
    name = f"Auto (p{low_percentile:g}-p{high_percentile:g})"
    return Window(center=lo + width / 2.0, width=width, name=name)


def default_window(volume: Volume, stored: tuple[Window, ...] | list[Window] = ()) -> Window:
    """The window a view opens with.

    CT (modality ``CT`` or unit ``HU``): the file's first window when it has
    one (the scanner or reader chose it), else the soft-tissue preset. Any other
    data: the automatic percentile window.
    """
    if volume.modality.upper() == "CT" or volume.unit == "HU":
        usable = file_windows(stored)
        return usable[0] if usable else preset_by_name("Soft tissue").window
    return auto_window(volume)


def window_bounds(window: Window) -> tuple[float, float]:
    """The values mapped to the first and last grey level: ``(black_at_or_below, white_from)``."""
    if window.width >= 1.0:
        return window.center - window.width / 2.0, window.center + window.width / 2.0 - 1.0
    return window.center - window.width / 2.0, window.center + window.width / 2.0


def _window_float(values: np.ndarray, window: Window) -> np.ndarray:
    """DICOM VOI LINEAR mapped to 0..255 as float64, before rounding.

    PS3.3 C.11.2.1.2.1: ``y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255`` between the
    bounds. DICOM requires ``w >= 1``; a narrower window only makes sense for
    float data (e.g. a 0..1 parametric map), where the plain ramp over
    ``[c - w/2, c + w/2]`` is used instead.
    """
    x = np.asarray(values, dtype=np.float64)
    c, w = float(window.center), float(window.width)
    if not (np.isfinite(c) and np.isfinite(w) and w > 0):
        raise CoreError(f"window center {c} / width {w} cannot be displayed; the width must be a positive number")
    if w >= 1.0:
        y = ((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0 if w > 1.0 else np.where(x > c - 0.5, 255.0, 0.0)
        y = np.where(x <= c - 0.5 - (w - 1.0) / 2.0, 0.0, y)
        y = np.where(x > c - 0.5 + (w - 1.0) / 2.0, 255.0, y)
    else:
        y = (x - (c - w / 2.0)) / w * 255.0
    return np.clip(y, 0.0, 255.0)


def _to_uint8(y: np.ndarray) -> np.ndarray:
    # Round half up: np.rint would round 0.5 to even and differ from floor(y + 0.5).
    return np.floor(y + 0.5).astype(np.uint8)


def is_lut_dtype(dtype: np.dtype) -> bool:
    """True for integer dtypes a 65,536-entry table covers (8 and 16 bits, signed or not)."""
    dtype = np.dtype(dtype)
    return dtype.kind in "iub" and dtype.itemsize <= 2


def lut_index(values: np.ndarray) -> np.ndarray:
    """Indices into a :func:`display_lut` table for 8/16-bit integer ``values`` (a view, no copy).

    Signed values are read as their unsigned bit pattern, so int16 -1 indexes
    entry 65535; the table is built in the same order.
    """
    dtype = values.dtype
    if dtype.kind == "b":
        return values.view(np.uint8)
    if dtype.itemsize == 1:
        return values.view(np.uint8)
    return values.view(np.uint16)


def _lut_values(dtype: np.dtype) -> np.ndarray:
    """The value each table entry stands for, in :func:`lut_index` order."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return np.arange(256, dtype=np.float64)  # booleans index entries 0 and 1 only
    unsigned = np.arange(2 ** (8 * dtype.itemsize), dtype=np.uint16 if dtype.itemsize == 2 else np.uint8)
    return unsigned.view(dtype).astype(np.float64)


@lru_cache(maxsize=64)
def _gray_lut(dtype_str: str, center: float, width: float, invert: bool) -> np.ndarray:
    values = _lut_values(np.dtype(dtype_str))
    gray = _to_uint8(_window_float(values, Window(center, width)))
    if invert:
        gray = 255 - gray
    gray.flags.writeable = False
    return gray


# Colormap control points (position 0..1, RGB 0..255), interpolated linearly to 256 entries.
_VIRIDIS = [
    "#440154",
    "#482878",
    "#3e4989",
    "#31688e",
    "#26828e",
    "#1f9e89",
    "#35b779",
    "#6ece58",
    "#b5de2b",
    "#fde725",
]


def _hex_points(colors: list[str]) -> list[tuple[float, tuple[int, int, int]]]:
    n = len(colors) - 1
    return [(i / n, (int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16))) for i, c in enumerate(colors)]


_COLORMAP_POINTS: dict[str, list[tuple[float, tuple[int, int, int]]]] = {
    "gray": [(0.0, (0, 0, 0)), (1.0, (255, 255, 255))],
    # matplotlib's "hot": black -> red -> yellow -> white (PET/NM convention).
    "hot": [(0.0, (10, 0, 0)), (0.365, (255, 0, 0)), (0.746, (255, 255, 0)), (1.0, (255, 255, 255))],
    # matplotlib's "bone": grey with a blue tint in the darks.
    "bone": [(0.0, (0, 0, 0)), (0.365, (81, 81, 113)), (0.746, (166, 198, 198)), (1.0, (255, 255, 255))],
    "viridis": _hex_points(_VIRIDIS),
}
COLORMAPS: tuple[str, ...] = tuple(_COLORMAP_POINTS)


@cache
def colormap_lut(name: str) -> np.ndarray:
    """A (256, 3) uint8 table: grey level -> RGB for the colormap ``name``.

    Raises
    ------
    CoreError
        Unknown colormap; the message lists :data:`COLORMAPS`.
    """
    points = _COLORMAP_POINTS.get(name)
    if points is None:
        raise CoreError(f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}")
    where = np.array([p for p, _ in points])
    rgb = np.array([c for _, c in points], dtype=np.float64)
    x = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(x, where, rgb[:, ch]) for ch in range(3)], axis=1)
    out = np.floor(table + 0.5).astype(np.uint8)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=64)
def _display_lut(dtype_str: str, center: float, width: float, invert: bool, colormap: str) -> np.ndarray:
    gray = _gray_lut(dtype_str, center, width, invert)
    if colormap == "gray":
        return gray
    table = colormap_lut(colormap)[gray]
    table.flags.writeable = False
    return table


def display_lut(dtype: np.dtype, window: Window, *, invert: bool = False, colormap: str = "gray") -> np.ndarray:
    """The cached table from raw 8/16-bit integer values to display colours.

    Parameters
    ----------
    dtype : dtype
        An 8- or 16-bit integer dtype (see :func:`is_lut_dtype`).
    window : Window
        In the units of the values.
    invert, colormap
        As in :func:`apply_window` and :func:`apply_colormap`.

    Returns
    -------
    (N,) or (N, 3) uint8 ndarray
        ``N`` is 256 or 65,536, indexed by :func:`lut_index`. Grey when
        ``colormap == "gray"``, RGB otherwise. Read-only.
    """
    dtype = np.dtype(dtype)
    if not is_lut_dtype(dtype):
        raise CoreError(f"no lookup table for {dtype} data; only 8- and 16-bit integers use one")
    return _display_lut(dtype.str, float(window.center), float(window.width), bool(invert), colormap)


def apply_window(values: np.ndarray, window: Window, *, invert: bool = False) -> np.ndarray:
    """Map values in physical units to grey levels 0..255 (DICOM VOI LINEAR).

    Parameters
    ----------
    values : ndarray
        Any shape, any real dtype (HU for CT).
    window : Window
        ``center`` and ``width`` in the units of ``values``.
    invert : bool
        Show high values dark (what MONOCHROME1 needs, or a user's choice).

    Returns
    -------
    ndarray of uint8
        Same shape as ``values``. 8/16-bit integers go through a cached lookup
        table; other dtypes are computed in float64. NaN maps to 0 (black).

    Raises
    ------
    CoreError
        The width is not a positive finite number.

    Notes
    -----
    DICOM PS3.3 C.11.2.1.2.1 (VOI LUT Function LINEAR), the same arithmetic as
    ``pydicom.pixels.apply_windowing``, with the output range 0..255 and
    rounding half up.
    """
    values = np.asarray(values)
    if is_lut_dtype(values.dtype):
        return np.take(display_lut(values.dtype, window, invert=invert), lut_index(values))
    y = _window_float(values, window)
    if values.dtype.kind == "f":
        y = np.where(np.isnan(values), 0.0, y)
    gray = _to_uint8(y)
    return 255 - gray if invert else gray


def apply_colormap(gray: np.ndarray, name: str = "gray") -> np.ndarray:
    """Colour grey levels: ``(...)`` uint8 -> ``(..., 3)`` uint8 RGB via :func:`colormap_lut`."""
    if gray.dtype != np.uint8:
        raise CoreError(f"apply_colormap needs uint8 grey levels, got {gray.dtype}; window the values first")
    return colormap_lut(name)[gray]
