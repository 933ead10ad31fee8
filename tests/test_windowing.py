"""Window/level against pydicom's reference implementation on real CT values, presets, auto window."""

from __future__ import annotations

import re

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_windowing

from core.errors import CoreError
from core.series import Window
from core.volume import Volume
from core.windowing import (
    COLORMAPS,
    CT_PRESETS,
    apply_colormap,
    apply_window,
    auto_window,
    colormap_lut,
    default_window,
    display_lut,
    file_windows,
    preset_by_name,
    window_bounds,
)
from tests.conftest import DATA, data_path


def _pydicom_as_8bit(hu: np.ndarray, ds: pydicom.Dataset, window: Window) -> np.ndarray:
    """pydicom's windowing of ``hu`` with ``window``, rescaled from its output range to 0..255 (float)."""
    ds = pydicom.Dataset(ds)  # shallow copy: the window is ours, the rest (bits, rescale) the file's
    ds.WindowCenter = window.center
    ds.WindowWidth = window.width
    ds.VOILUTFunction = "LINEAR"
    y_min, y_max = apply_windowing(np.array([-1e12, 1e12]), ds)  # the range pydicom maps onto
    return (apply_windowing(hu, ds) - y_min) / (y_max - y_min) * 255.0


def _assert_matches_pydicom(hu: np.ndarray, ds: pydicom.Dataset, window: Window) -> None:
    expected = _pydicom_as_8bit(hu, ds, window)
    ours = apply_window(hu, window).astype(np.float64)
    # Ours is pydicom's value rounded to the nearest grey level.
    assert np.max(np.abs(ours - expected)) <= 0.5 + 1e-9, window


def _windows_to_try(ds: pydicom.Dataset) -> list[Window]:
    windows = [p.window for p in CT_PRESETS] + [Window(40.0, 1.0), Window(40.0, 2.0), Window(-1000.0, 7.0)]
    if "WindowCenter" in ds:
        centers = ds.WindowCenter if ds["WindowCenter"].VM > 1 else [ds.WindowCenter]
        widths = ds.WindowWidth if ds["WindowWidth"].VM > 1 else [ds.WindowWidth]
        windows += [Window(float(c), float(w)) for c, w in zip(centers, widths)]
    return windows


def test_window_matches_pydicom_on_pydicom_ct_small() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert hu.min() < -500 and hu.max() > 500  # real CT range: air to bone
    for window in _windows_to_try(ds):
        _assert_matches_pydicom(hu, ds, window)  # float64 arithmetic path
        _assert_matches_pydicom(hu.astype(np.int16), ds, window)  # 16-bit lookup-table path


def test_window_matches_pydicom_on_a_real_siemens_ct_with_multi_valued_windows() -> None:
    folder = data_path("ct_siemens_20sl_uncompressed_derived", "dicom")
    files = sorted(folder.iterdir())[::7]
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds["WindowCenter"].VM == 2  # (0028,1050) holds two windows
        hu = apply_modality_lut(ds.pixel_array, ds).astype(np.int16)
        for window in _windows_to_try(ds):
            _assert_matches_pydicom(hu, ds, window)


def test_window_matches_pydicom_on_float_values_of_a_monochrome1_radiograph() -> None:
    path = data_path("single_files_pydicom", "dicom", "CR_MONOCHROME1_6154.dcm")
    ds = pydicom.dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds)  # slope 0.684: not integers
    assert values.dtype.kind == "f"
    for window in (Window(float(ds.WindowCenter), float(ds.WindowWidth)), Window(1000.0, 333.3)):
        _assert_matches_pydicom(values, ds, window)


def test_lookup_table_and_arithmetic_agree_on_every_int16_value() -> None:
    every = np.arange(-32768, 32768, dtype=np.int64)
    for window in (Window(40.0, 400.0), Window(-600.0, 1500.0), Window(0.3, 1.0), Window(12.5, 2.0)):
        np.testing.assert_array_equal(apply_window(every.astype(np.int16), window), apply_window(every, window))
        np.testing.assert_array_equal(
            apply_window(every.astype(np.int16), window, invert=True), 255 - apply_window(every, window)
        )
    small = np.arange(256, dtype=np.int64)
    for dtype in (np.uint8, np.int8, np.uint16):
        values = small.astype(dtype)
        np.testing.assert_array_equal(
            apply_window(values, Window(100.0, 50.0)), apply_window(values.astype(np.float64), Window(100.0, 50.0))
        )


def test_window_bounds_are_where_black_and_white_start() -> None:
    window = Window(40.0, 400.0)
    black, white = window_bounds(window)
    values = np.array([black - 1, black, black + 1, white - 1, white, white + 1])
    assert apply_window(values, window).tolist()[:2] == [0, 0]
    assert apply_window(values, window)[2] > 0
    assert apply_window(values, window)[3] < 255
    assert apply_window(values, window).tolist()[4:] == [255, 255]


def test_narrow_window_on_float_data_and_nan() -> None:
    values = np.array([0.0, 0.25, 0.5, 0.1, np.nan])
    out = apply_window(values, Window(0.25, 0.5))
    assert out.tolist() == [0, 128, 255, 51, 0]
    with pytest.raises(CoreError, match="width must be a positive"):
        apply_window(values, Window(0.25, 0.0))


def _reference_table() -> dict[str, set[tuple[float, float]]]:
    """Section 2 of ../shared/REFERENCE.md: every width/level pair quoted for each preset."""
    path = DATA.parent / "REFERENCE.md"
    if not path.exists():
        pytest.skip(f"{path} not found (it lives beside the repository)")
    table: dict[str, set[tuple[float, float]]] = {}
    section = path.read_text().split("## 2.")[1].split("\n## ")[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or cells[0] in ("preset", "") or set(cells[0]) <= {"-"}:
            continue
        pairs = {(float(w), float(level)) for w, level in re.findall(r"(\d+)/(-?\d+)", " ".join(cells[1:]))}
        table[cells[0].split("/")[0].strip()] = pairs
    return table


def test_every_issue_preset_is_present_cited_and_quoted_by_a_peer_or_the_literature() -> None:
    table = _reference_table()
    names = {p.name.lower() for p in CT_PRESETS}
    assert names == {"brain", "subdural", "stroke", "lung", "mediastinum", "soft tissue", "liver", "bone"}
    for preset in CT_PRESETS:
        row = table["soft tissue" if preset.name.lower() == "soft tissue" else preset.name.lower()]
        assert (preset.width, preset.center) in row, (preset, row)
        assert len(preset.source) > 10
    assert preset_by_name("lung").window == Window(-600.0, 1500.0, "Lung")
    with pytest.raises(CoreError, match="Brain, Subdural"):
        preset_by_name("kidney")


def test_file_windows_keep_every_usable_value_of_a_multi_valued_pair() -> None:
    stored = (Window(40.0, 300.0), Window(300.0, 1500.0, "BONE"), Window(10.0, 0.0), Window(float("nan"), 10.0))
    assert file_windows(stored) == [Window(40.0, 300.0, "File: #1"), Window(300.0, 1500.0, "File: BONE")]


def _mr_like() -> np.ndarray:
    rng = np.random.default_rng(3)
    values = np.zeros((40, 40, 20), dtype=np.float32)
    values[5:35, 5:35, 2:18] = rng.gamma(4.0, 150.0, size=(30, 30, 16))
    return values


def test_auto_window_maps_the_percentiles_to_black_and_white() -> None:
    values = _mr_like()
    window = auto_window(values, low_percentile=2.0, high_percentile=98.0)
    gray = apply_window(values, window)
    assert (gray == 255).mean() == pytest.approx(0.02, abs=0.003)
    assert (gray == 0).mean() >= 0.02  # the background is below p2
    lo, hi = np.percentile(values, [2.0, 98.0])
    assert window.center - window.width / 2 == pytest.approx(lo)
    assert window.center + window.width / 2 == pytest.approx(hi)
    sampled = auto_window(values, max_samples=1000)  # a regular subsample finds nearly the same window
    full = auto_window(values)
    assert sampled.width == pytest.approx(full.width, rel=0.1)
    constant = auto_window(np.full((3, 3, 3), 7, dtype=np.int16))
    assert constant.width == 1.0
    with pytest.raises(CoreError, match="no finite value"):
        auto_window(np.full((2, 2, 2), np.nan))


def test_default_window_is_the_files_for_ct_and_automatic_otherwise() -> None:
    affine = np.eye(4)
    ct = Volume(np.zeros((4, 4, 4), np.int16), affine, modality="CT", unit="HU")
    assert default_window(ct, (Window(40.0, 350.0),)) == Window(40.0, 350.0, "File: #1")
    assert default_window(ct) == preset_by_name("Soft tissue").window
    mr = Volume(_mr_like(), affine, modality="MR")
    assert default_window(mr).name.startswith("Auto")


def test_colormaps() -> None:
    gray = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(apply_colormap(gray, "gray"), np.repeat(gray[:, None], 3, axis=1))
    viridis = colormap_lut("viridis")
    assert tuple(viridis[0]) == (0x44, 0x01, 0x54) and tuple(viridis[255]) == (0xFD, 0xE7, 0x25)
    hot = colormap_lut("hot")
    assert tuple(hot[255]) == (255, 255, 255) and hot[128, 0] > hot[128, 2]
    for name in COLORMAPS:
        lut = colormap_lut(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
        luminance = lut.astype(np.float64) @ [0.2126, 0.7152, 0.0722]  # Rec. 709
        assert np.all(np.diff(luminance) > -0.5), name  # brighter values never look darker
    table = display_lut(np.dtype(np.int16), Window(40.0, 400.0), colormap="viridis")
    assert table.shape == (65536, 3)
    with pytest.raises(CoreError, match="unknown colormap"):
        colormap_lut("jet")
