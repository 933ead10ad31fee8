"""Slider change -> painted image, in the served app, in headless Chromium.

The app is started with ``streamlit run app.py`` on a free port (by
:mod:`bench.served`, as the browser tests do), the sample scan is opened with the "Open sample scan" button on the
Open page, and the View page is opened from the sidebar. The "Axial slice"
slider is focused and moved one step with the keyboard (ArrowRight). Timing
runs inside the page, on the browser's clock:

* start: the ``keydown`` event (capture phase, before the slider sees it);
* end: the first moment after the axial view's ``<img>`` has a new ``src``,
  that image is decoded (``img.decode()``) and a frame has been produced
  (``requestAnimationFrame``, then a message-channel task, which runs after
  that frame's paint).

Each step is checked: the image's ``data-slice`` must be the slider's new value.
The app's own sample is 256 x 256 x 120 (what a user opens), not the benchmark's
phantom.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import REPO
from bench.served import CHROMIUM_ARGS, IDLE, start_app, stop_app

VIEW_IMAGE = '.st-key-view_axial img[alt="Axial view"]'

# Runs in the page: watch the view's shadow root for a new src, then wait for decode + paint.
_INSTRUMENT = r"""
(img) => {
  const root = img.getRootNode();
  const state = { t0: null, t1: null, src: img.getAttribute("src"), slice: null, armed: false };
  window.__tfBench = state;
  document.addEventListener("keydown", () => {
    if (state.armed && state.t0 === null) state.t0 = performance.now();
  }, true);
  const observer = new MutationObserver(() => {
    if (!state.armed || state.t0 === null || state.t1 !== null || state.pending) return;
    const current = root.querySelector("img.tf-image");
    if (!current || current.getAttribute("src") === state.src) return;
    state.pending = true;
    current.decode().catch(() => null).then(() => requestAnimationFrame(() => {
      const channel = new MessageChannel();
      channel.port1.onmessage = () => {
        state.t1 = performance.now();
        state.slice = current.dataset.slice;
        state.src = current.getAttribute("src");
        state.pending = false;
      };
      channel.port2.postMessage(0);
    }));
  });
  observer.observe(root, { subtree: true, childList: true, attributes: true, attributeFilter: ["src"] });
  return true;
}
"""
_ARM = "() => { const s = window.__tfBench; s.t0 = null; s.t1 = null; s.slice = null; s.armed = true; }"


@dataclass
class BrowserResult:
    """Per-step times in seconds, or why the measurement could not run."""

    seconds: list[float] = field(default_factory=list)
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


def measure_slider_paint(
    steps: int, warmup: int = 2, log: Path | None = None, *, throttle: tuple[float, float] | None = None
) -> BrowserResult:
    """Start the app, open the sample, move the axial slider ``warmup + steps`` times.

    ``throttle`` = (Mbit/s, latency in ms) slows the page's network, the websocket
    included, with Chromium's DevTools emulation once the view is open: what a user
    far from the server sees.

    Returns
    -------
    BrowserResult
        ``seconds`` holds the ``steps`` measured times; ``error`` says why none could be
        measured (no Chromium, no Playwright, no viewer page, a timeout...).
    """
    chromium = shutil.which("chromium")
    if chromium is None:
        return BrowserResult(error="no chromium on PATH (scripts/test.sh installs Debian's package)")
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        return BrowserResult(error="playwright is not installed (requirements-dev.txt)")
    if not (REPO / "pages" / "viewer.py").exists():
        return BrowserResult(error="pages/viewer.py does not exist yet")

    result = BrowserResult()
    server: subprocess.Popen[bytes] | None = None
    try:
        server, url = start_app(log=log)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                page.wait_for_selector(IDLE, timeout=60_000)
                page.get_by_role("button", name="Open sample scan").click()
                page.get_by_text("1 series found").wait_for(timeout=60_000)
                page.wait_for_selector(IDLE, timeout=60_000)
                page.locator('[data-testid="stSidebarNavLink"]', has_text="View").click()
                image = page.locator(VIEW_IMAGE)
                image.wait_for(timeout=60_000)
                page.wait_for_selector(IDLE, timeout=60_000)
                if throttle is not None:
                    cdp = page.context.new_cdp_session(page)
                    cdp.send("Network.enable")
                    rate = throttle[0] * 1e6 / 8  # bytes per second
                    conditions = {"offline": False, "latency": throttle[1], "downloadThroughput": rate}
                    cdp.send("Network.emulateNetworkConditions", {**conditions, "uploadThroughput": rate})
                slider = page.get_by_role("slider", name="Axial slice")
                slider.focus()
                image.evaluate(_INSTRUMENT)
                for step in range(warmup + steps):
                    page.wait_for_selector(IDLE, timeout=60_000)
                    before = int(slider.get_attribute("value") or "0")
                    page.evaluate(_ARM)
                    page.keyboard.press("ArrowRight")
                    page.wait_for_function("() => window.__tfBench.t1 !== null", timeout=60_000)
                    state = page.evaluate("() => window.__tfBench")
                    if str(state["slice"]) != str(before + 1):
                        raise RuntimeError(f"slider moved to {before + 1} but the view shows slice {state['slice']}")
                    if step >= warmup:
                        result.seconds.append((state["t1"] - state["t0"]) / 1000.0)
                page.wait_for_selector(IDLE, timeout=60_000)
                if page.locator("[data-testid='stException']").count():
                    result.notes.append("the app showed an exception")
            finally:
                browser.close()
    except (RuntimeError, PlaywrightError) as err:
        result.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    finally:
        if server is not None:
            stop_app(server)
    return result
