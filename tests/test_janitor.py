"""The session janitor (pages/janitor.py) against the real server: a closed session's memory comes back.

Streamlit 1.67 forgets a disconnected session after ``server.disconnectedSessionTTL``
without shutting it down, so its uploads and session state stay in the server's memory.
This test starts ``streamlit run app.py`` with a 2 s TTL and a 1 s janitor interval,
uploads a ~50 MB NIfTI in headless Chromium, opens it in the viewer, closes the page,
and checks that the server's resident memory falls back near its pre-upload value.
With the janitor off (``TOMOFORGE_JANITOR_INTERVAL_S=0``) the same steps leave the
upload in memory, which the second test shows, so the first test can fail.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.served import CHROMIUM_ARGS, IDLE, start_app, stop_app
from pages.janitor import INTERVAL_ENV

pytestmark = pytest.mark.browser

TTL_S = 2
JANITOR_INTERVAL_S = 1
UPLOAD_MB = 50
# The upload alone is 50 MB (and its decoded volume as much again): a leak is well above this.
TOLERANCE_MB = 30
MB = 1024**2


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _settled_rss_bytes(pid: int, *, seconds: float) -> int:
    """The lowest RSS seen over ``seconds``: memory is released a sweep at a time."""
    lowest = _rss_bytes(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        lowest = min(lowest, _rss_bytes(pid))
    return lowest


def _nifti_file(path: Path, megabytes: int) -> Path:
    """A random int16 NIfTI of about ``megabytes`` MB (random, so nothing compresses or dedupes)."""
    import nibabel as nib

    depth = max(1, megabytes * MB // (256 * 256 * 2))
    values = np.random.default_rng(7).integers(0, 2000, size=(256, 256, depth), dtype=np.int16)
    nib.save(nib.Nifti1Image(values, np.diag([0.9, 0.9, 1.5, 1.0])), path)
    return path


class Server:
    """``streamlit run app.py`` on a free port with a ``TTL_S`` session TTL and the given janitor
    interval; its output goes to ``log``."""

    def __init__(self, janitor_interval_s: float, log: Path) -> None:
        self.log = log
        env = {"STREAMLIT_SERVER_DISCONNECTED_SESSION_TTL": str(TTL_S), INTERVAL_ENV: str(janitor_interval_s)}
        try:
            self.process, self.url = start_app(log=log, env=env)
        except RuntimeError as err:
            pytest.fail(f"streamlit did not start: {err}")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_app(self.process)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium package is not installed (scripts/test.sh installs it)")
    pytest.importorskip("playwright", reason="playwright drives the browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def upload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _nifti_file(tmp_path_factory.mktemp("janitor") / "janitorscan.nii", UPLOAD_MB)


def _wait_idle(page) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_timeout(300)  # let a rerun start before waiting for its end
    page.wait_for_selector(IDLE, timeout=90_000)


def _session(browser, url: str, upload: Path) -> None:  # type: ignore[no-untyped-def]
    """One user: upload the file, see it listed, open it in the viewer, leave."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    step = "open the app"
    try:
        page.goto(url, wait_until="domcontentloaded")
        _wait_idle(page)
        step = "upload"
        uploader = page.locator("[data-testid='stFileUploader']").first
        uploader.locator("input[type='file']").set_input_files(str(upload), timeout=60_000)
        page.get_by_text("1 series found").wait_for(timeout=90_000)
        _wait_idle(page)
        step = "view"
        page.get_by_role("link", name="View").first.click()
        page.locator("img[alt='Axial view']").wait_for(timeout=90_000)
        _wait_idle(page)
        assert page.locator("[data-testid='stException']").count() == 0
    except Exception as err:
        text = page.inner_text("body")[-1500:] if not page.is_closed() else ""
        raise AssertionError(f"session failed at step {step!r}: {err}\npage text:\n{text}") from err
    finally:
        context.close()  # the websocket closes: Streamlit stores the session for TTL_S seconds


def _memory_after_sessions(browser, upload: Path, janitor_interval_s: float, log: Path) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """RSS of the server (bytes): before the upload, with the session open, and after it expired."""
    server = Server(janitor_interval_s, log)
    try:
        # Warm-up with the same file: the first visit imports each page's modules, and the
        # first decode starts the worker fork server; neither is per-session memory.
        _session(browser, server.url, upload)
        wait_s = TTL_S + 3 * JANITOR_INTERVAL_S + 3
        baseline = _settled_rss_bytes(server.process.pid, seconds=wait_s)
        _session(browser, server.url, upload)
        loaded = _rss_bytes(server.process.pid)
        after = _settled_rss_bytes(server.process.pid, seconds=wait_s)
        assert server.process.poll() is None, server.stderr()[-2000:]
        return baseline, loaded, after
    finally:
        server.stop()


def test_memory_of_a_closed_session_is_released(browser, upload: Path, tmp_path: Path) -> None:
    baseline, loaded, after = _memory_after_sessions(browser, upload, JANITOR_INTERVAL_S, tmp_path / "server.log")
    # The session really held the upload (else this test could not fail).
    assert loaded - baseline > UPLOAD_MB * MB * 0.8, (baseline / MB, loaded / MB)
    janitor_log = [line for line in (tmp_path / "server.log").read_text().splitlines() if "janitor" in line]
    assert after - baseline < TOLERANCE_MB * MB, (
        f"server RSS {after / MB:.0f} MB after the session expired, {baseline / MB:.0f} MB before the upload; "
        f"janitor log: {janitor_log}"
    )


def test_without_the_janitor_the_closed_session_stays_in_memory(browser, upload: Path, tmp_path: Path) -> None:
    # The problem the janitor solves, shown on the same steps: if a future Streamlit shuts expired
    # sessions down itself, this fails, and the janitor can go.
    baseline, loaded, after = _memory_after_sessions(browser, upload, 0, tmp_path / "server.log")
    assert loaded - baseline > UPLOAD_MB * MB * 0.8, (baseline / MB, loaded / MB)
    assert after - baseline > UPLOAD_MB * MB * 0.8, (baseline / MB, after / MB)
