"""Real-browser test: the served app in headless Chromium (Debian's package, driven by Playwright).

Modelled on Streamlit's e2e_playwright/conftest.py: start the server on a free port and
poll /_stcore/health (:mod:`bench.served`), then drive the page like a user.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from bench.served import CHROMIUM_ARGS, IDLE, start_app, stop_app
from tests.conftest import REPO

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("app") / "server.log"
    try:
        server, url = start_app(log=log)
    except RuntimeError as err:
        pytest.fail(f"streamlit did not start: {err}")
    try:
        yield url
    finally:
        stop_app(server)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium package is not installed (scripts/test.sh installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def wait_for_app_idle(page) -> None:
    """Streamlit marks the app root with data-test-script-state while a script runs."""
    page.wait_for_selector(IDLE, timeout=60_000)


def open_sample_view(browser, app_url: str, **page_options):  # noqa: ANN001, ANN201
    """A new page with the sample open on the View page (reached inside the session: a fresh URL
    would start a new session without the scan); returns the page and the axial view's image."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, **page_options)
    page.goto(app_url)
    wait_for_app_idle(page)
    page.get_by_role("button", name="Open sample scan").click()
    page.get_by_text("1 series found").wait_for(timeout=60_000)
    page.get_by_role("link", name="View").click()
    image = page.locator("img[alt='Axial view']")
    image.wait_for(timeout=60_000)
    wait_for_app_idle(page)
    return page, image


def wait_for_values(page, image) -> None:  # noqa: ANN001
    """Point at the view until its readout shows a value: the slice's values arrive after the image."""
    box = image.bounding_box()
    assert box is not None
    readout = image.locator("xpath=ancestor::div[contains(@class, 'tf-view')]").locator(".tf-readout")
    for attempt in range(100):
        page.mouse.move(box["x"] + box["width"] / 2 + attempt % 2, box["y"] + box["height"] / 2)
        if " HU · RAS" in readout.inner_text():
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"no value under the pointer after 10 s: {readout.inner_text()!r}")


def test_open_sample_scan_shows_the_series_table(app_url: str, browser, tmp_path) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_url)
    wait_for_app_idle(page)
    page.get_by_role("button", name="Open sample scan").click()
    page.get_by_text("1 series found").wait_for(timeout=60_000)
    wait_for_app_idle(page)
    # The grid is a lazily loaded component: a skeleton first, then the table.
    page.locator("[data-testid='stDataFrame']").wait_for(timeout=60_000)
    assert page.locator("[data-testid='stDataFrame']").count() == 1
    assert page.locator("[data-testid='stException']").count() == 0
    page.screenshot(path=str(tmp_path / "open_page.png"), full_page=True)
    page.close()


def test_viewer_slider_changes_the_painted_image(app_url: str, browser, tmp_path) -> None:
    page, image = open_sample_view(browser, app_url)
    before_slice = image.get_attribute("data-slice")
    before_src = image.get_attribute("src")
    slider = page.get_by_role("slider", name="Axial slice")
    slider.focus()
    for _ in range(5):
        slider.press("ArrowUp")
    page.wait_for_function(
        "([sel, old]) => { const el = document.querySelector(sel) ||"
        " [...document.querySelectorAll('*')].map(e => e.shadowRoot && e.shadowRoot.querySelector(sel)).find(Boolean);"
        " return el && el.getAttribute('data-slice') !== old; }",
        arg=["img[alt='Axial view']", before_slice],
        timeout=30_000,
    )
    wait_for_app_idle(page)
    assert image.get_attribute("data-slice") != before_slice
    assert image.get_attribute("src") != before_src
    # The painted image is really there (decoded, non-zero size).
    width = image.evaluate("img => img.complete ? img.naturalWidth : 0")
    assert width > 0
    assert page.locator("[data-testid='stException']").count() == 0
    page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
    page.close()


@pytest.mark.parametrize("acquired", ["axial", "sagittal"])
def test_a_thin_slab_sits_in_a_panel_like_the_others(app_url: str, browser, tmp_path, acquired: str) -> None:
    """6 slices of 2 mm: two views are thin strips in true proportions (12 x 205 mm), wide for an
    axial acquisition, tall for a sagittal one. Letters and titles go to the panel's edges instead
    of over a wide strip, and the three panels line up at one height."""
    import numpy as np

    from tests.dicom_factory import AXIAL, SAGITTAL, lps_affine, make_series, write_sources

    pixels = np.random.default_rng(5).integers(-1000, 1000, (6, 128, 128), dtype=np.int16)
    orientation = AXIAL if acquired == "axial" else SAGITTAL
    affine = lps_affine(orientation, pixel_spacing=(1.6, 1.6), slice_step=2.0)
    folder = write_sources(make_series(pixels, affine=affine, rescale=(1.0, 0.0)), tmp_path / "thin")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_url)
    wait_for_app_idle(page)
    page.locator("input[type=file]").first.set_input_files([str(p) for p in sorted(folder.iterdir())])
    page.get_by_text("1 series found").wait_for(timeout=60_000)
    wait_for_app_idle(page)
    page.get_by_role("link", name="View").click()
    page.locator("img[alt='Coronal view']").wait_for(timeout=60_000)
    wait_for_app_idle(page)
    page.screenshot(path=str(tmp_path / "thin.png"), full_page=True)

    def box(plane: str, selector: str) -> dict:
        found = page.locator(f".st-key-view_{plane} {selector}").bounding_box()
        assert found is not None, (plane, selector)
        return found

    def overlap(a: dict, b: dict) -> bool:
        return not (
            a["x"] + a["width"] <= b["x"]
            or b["x"] + b["width"] <= a["x"]
            or a["y"] + a["height"] <= b["y"]
            or b["y"] + b["height"] <= a["y"]
        )

    heights = set()
    for plane in ("axial", "coronal", "sagittal"):
        image, info = box(plane, "img.tf-image"), box(plane, ".tf-info")
        letters = {edge: box(plane, f".tf-{edge}") for edge in ("left", "right", "top", "bottom")}
        assert not any(overlap(info, letter) for letter in letters.values()), plane
        heights.add(round(box(plane, ".tf-frame")["height"]))
        if acquired == "axial" and plane != "axial":
            assert image["height"] < 0.2 * image["width"], "a 12 mm slab across 205 mm should be a strip"
            assert not overlap(letters["top"], image) and not overlap(letters["bottom"], image), plane
            assert not overlap(info, image), plane
        if acquired == "sagittal" and plane != "sagittal":
            assert image["width"] < 0.2 * image["height"], "a 12 mm slab across 205 mm should be a strip"
            assert not overlap(letters["left"], image) and not overlap(letters["right"], image), plane
    assert len(heights) == 1, f"the three panels differ in height: {heights}"
    page.close()


def test_dragging_on_a_view_sets_window_and_level(app_url: str, browser, tmp_path) -> None:
    """Shift-drag right widens the window (x2 per 200 px), down raises the center (a window per
    200 px); the grey preview shows while dragging, every view gets the window on release, and the
    drag does not move the crosshair as a click would."""
    page, image = open_sample_view(browser, app_url)
    center0 = float(page.get_by_label("Center").input_value())
    width0 = float(page.get_by_label("Width").input_value())
    slices0 = [page.get_by_role("slider", name=f"{p} slice").input_value() for p in PLANES]
    sources0 = {p: page.locator(f"img[alt='{p} view']").get_attribute("src") for p in PLANES}
    wait_for_values(page, image)
    box = image.bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.keyboard.down("Shift")
    page.mouse.down()
    page.mouse.move(x + 100, y + 50, steps=5)
    preview = page.locator(".st-key-view_axial canvas.tf-preview")
    assert preview.is_visible(), "the grey preview should show while dragging"
    assert "Window: center" in page.locator(".st-key-view_axial .tf-readout").inner_text()
    page.mouse.up()
    page.keyboard.up("Shift")
    page.wait_for_function(
        "([sel, old]) => { const el = document.querySelector(sel) ||"
        " [...document.querySelectorAll('*')].map(e => e.shadowRoot && e.shadowRoot.querySelector(sel)).find(Boolean);"
        " return el && el.getAttribute('src') !== old; }",
        arg=["img[alt='Axial view']", sources0["Axial"]],
        timeout=30_000,
    )
    wait_for_app_idle(page)
    assert float(page.get_by_label("Width").input_value()) == pytest.approx(round(width0 * 2**0.5), abs=1)
    assert float(page.get_by_label("Center").input_value()) == pytest.approx(round(center0 + 50 * width0 / 200), abs=1)
    assert page.get_by_role("combobox", name="Window").input_value() == "Custom"
    assert all(page.locator(f"img[alt='{p} view']").get_attribute("src") != sources0[p] for p in PLANES)
    assert [page.get_by_role("slider", name=f"{p} slice").input_value() for p in PLANES] == slices0
    assert not preview.is_visible()
    assert page.locator("[data-testid='stException']").count() == 0
    page.screenshot(path=str(tmp_path / "window_drag.png"), full_page=True)
    page.close()


PLANES = ("Axial", "Coronal", "Sagittal")


def test_the_drag_preview_windows_like_the_server(browser) -> None:
    """The grey levels the browser draws while dragging equal core.windowing.apply_window's."""
    import re

    import numpy as np

    from core.series import Window
    from core.windowing import apply_window

    source = (REPO / "pages" / "viewer.py").read_text()
    grey = re.search(r"function grey\(x, c, w\) \{.*?\n\}\n", source, re.DOTALL)
    assert grey is not None, "pages/viewer.py has no grey() preview function"
    rng = np.random.default_rng(8)
    cases = [
        (float(x), c, w)
        for c, w in [(40.0, 400.0), (-600.0, 1500.0), (0.5, 1.0), (10.0, 2.0), (0.3, 0.25), (1000.0, 1.0)]
        for x in [*rng.uniform(c - w, c + w, 40).round(2), c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2, c, c - 0.5]
    ]
    page = browser.new_page()
    drawn = page.evaluate(f"(cases) => {{ {grey.group(0)}; return cases.map(([x, c, w]) => grey(x, c, w)); }}", cases)
    page.close()
    expected = [int(apply_window(np.array([x]), Window(c, w))[0]) for x, c, w in cases]
    assert drawn == expected


def test_zoom_and_pan_keep_the_readout_on_the_pointed_voxel(app_url: str, browser) -> None:
    page, image = open_sample_view(browser, app_url)
    wait_for_values(page, image)
    readout = page.locator(".st-key-view_axial .tf-readout")
    before = image.bounding_box()
    assert before is not None
    x, y = before["x"] + before["width"] * 0.3, before["y"] + before["height"] * 0.6
    page.mouse.move(x, y)
    pointed = readout.inner_text().split("voxel")[-1]
    page.keyboard.down("Control")
    page.mouse.wheel(0, -300)  # zoom in about the pointer
    page.keyboard.up("Control")
    page.mouse.move(x + 0.2, y)  # a move, so the readout is computed again
    zoomed = image.bounding_box()
    assert zoomed is not None
    assert zoomed["width"] == pytest.approx(before["width"] * 1.0015**300, rel=0.02)
    assert readout.inner_text().split("voxel")[-1] == pointed
    page.keyboard.down("Control")
    page.mouse.down()
    page.mouse.move(x + 40, y + 10, steps=4)  # pan
    page.mouse.up()
    page.keyboard.up("Control")
    panned = image.bounding_box()
    assert panned is not None
    assert (panned["x"] - zoomed["x"], panned["y"] - zoomed["y"]) == pytest.approx((40, 10), abs=1.5)
    slider = page.get_by_role("slider", name="Sagittal slice").input_value()
    page.mouse.dblclick(x, y)
    reset = image.bounding_box()
    assert reset is not None and reset["width"] == pytest.approx(before["width"], abs=1)
    page.wait_for_function(  # a double click is a click too: the crosshair moves there
        "old => document.querySelector('input[aria-label=\"Sagittal slice\"]').value !== old", arg=slider
    )
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    page.close()


def test_the_drag_preview_keeps_the_colour_map(app_url: str, browser) -> None:
    from core.windowing import colormap_lut

    page, image = open_sample_view(browser, app_url)
    page.get_by_role("combobox", name="Colormap").click()
    page.get_by_role("option", name="hot").click()
    wait_for_app_idle(page)
    wait_for_values(page, image)
    box = image.bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.keyboard.down("Shift")
    page.mouse.down()
    page.mouse.move(x + 30, y + 20, steps=3)
    colours = page.locator(".st-key-view_axial canvas.tf-preview").evaluate(
        "canvas => { const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;"
        " const seen = new Set(); for (let i = 0; i < d.length; i += 4 * 97) seen.add(d[i] + ',' + d[i+1] + ',' + d[i+2]);"
        " return [...seen]; }"
    )
    page.mouse.up()
    page.keyboard.up("Shift")
    table = {",".join(str(int(v)) for v in row) for row in colormap_lut("hot")}
    assert len(colours) > 5 and set(colours) <= table, "every preview pixel is a colour of the 'hot' map"
    assert any(len(set(c.split(","))) > 1 for c in colours), "and not grey"
    page.close()


def test_the_zip_of_a_plane_downloads_with_every_slice(app_url: str, browser, tmp_path) -> None:
    """The deferred download runs outside the script (no session context) and renders in a worker."""
    import io
    import zipfile

    page, image = open_sample_view(browser, app_url, accept_downloads=True)
    button = page.get_by_role("button", name="All 120 axial slices (zip)")
    with page.expect_download(timeout=120_000) as download:
        button.click()
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as archive:
        names = archive.namelist()
        assert len(names) == 120 and all(n.endswith(".png") for n in names)
        assert archive.read(names[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.name.startswith("axial_all_") and path.suffix == ".zip"
    page.close()
