"""Load test of the real server: concurrent sessions browsing and uploading, isolation and health.

Not part of CI (it takes minutes and needs Debian's chromium). It starts
``streamlit run app.py`` on a free local port, then drives headless Chromium
(one browser context per session, so each is its own Streamlit session):

* ``--browsers`` sessions (default 10) each upload a small NIfTI with a unique name
  and walk Open -> View -> Headers -> Open for ``--rounds`` rounds;
* ``--uploaders`` sessions (default 3) each upload a zip of a DICOM series of
  ``--upload-mb`` MB (default 200) with a unique series description, open it in the
  viewer (decoded in a worker process) and on the header page.

Every session checks on every page that it sees its own name and never another
session's. Meanwhile a thread polls ``/_stcore/health`` every 0.2 s, and the
resident memory of the server and its worker processes is sampled. After the
sessions close, the script waits for Streamlit to drop them
(``server.disconnectedSessionTTL``) and measures memory again.

Usage::

    .venv/bin/python bench/load_test.py                 # the issue's figures (200 MB uploads)
    .venv/bin/python bench/load_test.py --upload-mb 60  # a quicker run

Prints a table and exits non-zero when a session saw an error or another
session's data. Traffic goes to 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.served import CHROMIUM_ARGS, IDLE, start_app, stop_app  # noqa: E402
from tests.dicom_factory import make_series  # noqa: E402

EXCEPTION = "[data-testid='stException']"
PAGE_TIMEOUT_MS = 240_000
NAVIGATION_TIMEOUT_MS = 120_000
VERBOSE = "--verbose" in sys.argv


@dataclass
class SessionReport:
    name: str
    token: str
    pages: int = 0
    errors: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    step: str = "start"

    def at(self, step: str) -> None:
        """Record (and with --verbose print) where the session is, so a stuck one can be diagnosed."""
        self.step = step
        if VERBOSE:
            print(f"{time.strftime('%H:%M:%S')} {self.name}: {step}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- server and monitors


def tree_rss_bytes(root: int) -> int:
    """Resident memory of a process and all its descendants (the fork server and workers included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except OSError:
            continue
    total, pending = 0, [root]
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class Monitor(threading.Thread):
    """Polls the health endpoint and samples the server's memory until stopped."""

    def __init__(self, url: str, pid: int) -> None:
        super().__init__(daemon=True)
        self.url = f"{url}/_stcore/health"
        self.pid = pid
        self.latencies: list[float] = []
        self.failures = 0
        self.peak_rss = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    response.read()
                    if response.status != 200:
                        self.failures += 1
            except OSError:
                self.failures += 1
            self.latencies.append(time.perf_counter() - start)
            self.peak_rss = max(self.peak_rss, tree_rss_bytes(self.pid))
            self.stop.wait(0.2)


# --------------------------------------------------------------------------- data


def small_nifti(seed: int) -> bytes:
    import nibabel as nib

    values = np.random.default_rng(seed).integers(0, 1000, size=(48, 48, 24)).astype(np.int16)
    return nib.Nifti1Image(values, np.eye(4)).to_bytes()


def series_zip(path: Path, description: str, megabytes: int, seed: int) -> Path:
    """A zip (stored, like most PACS exports of compressed data) of a 512 x 512 int16 DICOM series."""
    slices = max(1, megabytes * 1024**2 // (512 * 512 * 2))
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for start in range(0, slices, 50):
            count = min(50, slices - start)
            pixels = rng.integers(0, 2000, size=(count, 512, 512)).astype(np.int16)
            positions = [[0.0, 0.0, float(start + k)] for k in range(count)]
            batch = make_series(pixels, positions=positions, rescale=(1.0, -1024.0), description=description,
                                series_uid=f"1.2.826.0.1.3680043.10.1.{seed}", study_uid=f"1.2.826.0.1.3680043.10.2.{seed}",
                                frame_uid=f"1.2.826.0.1.3680043.10.3.{seed}", instance_numbers=range(start + 1, start + count + 1),
                                name_prefix=f"IM{start:05d}_")  # fmt: skip
            for source in batch:
                archive.writestr(f"series/{source.name}", source.data)
    return path


# --------------------------------------------------------------------------- sessions


async def wait_idle(page) -> None:  # type: ignore[no-untyped-def]
    await page.wait_for_timeout(300)  # let the rerun start before waiting for its end
    await page.wait_for_selector(IDLE, timeout=PAGE_TIMEOUT_MS)


async def check_page(page, report: SessionReport, others: list[str], *, own_required: bool) -> None:  # type: ignore[no-untyped-def]
    report.pages += 1
    selector = page.locator("[data-testid='stSelectbox'] input")
    if own_required:
        # The Open page names the current series in its selector ("id: description").
        try:
            await selector.first.wait_for(timeout=60_000)
        except Exception:  # noqa: BLE001 - recorded below, the session goes on
            pass
    if await page.locator(EXCEPTION).count():
        report.errors.append(f"page {report.pages}: exception shown")
    values = [await selector.nth(n).input_value() for n in range(await selector.count())]
    text = await page.inner_text("body") + "\n" + "\n".join(values)
    if own_required and report.token not in text:
        report.errors.append(f"page {report.pages}: own data ({report.token}) not shown")
    for token in others:
        if token in text:
            report.leaks.append(f"page {report.pages}: saw {token}")


async def session(
    browser, url: str, report: SessionReport, upload: dict, others: list[str], rounds: int, delay: float
) -> None:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await context.new_page()
    try:
        await asyncio.sleep(delay)  # users do not all arrive in the same millisecond
        report.at("open the app")
        await page.goto(url, timeout=NAVIGATION_TIMEOUT_MS, wait_until="domcontentloaded")
        await page.wait_for_selector(IDLE, timeout=PAGE_TIMEOUT_MS)
        report.at("upload")
        await page.locator("input[type='file']").first.set_input_files(upload, timeout=PAGE_TIMEOUT_MS)
        report.at("wait for the series table")
        await page.get_by_text("1 series found").wait_for(timeout=PAGE_TIMEOUT_MS)
        await wait_idle(page)
        await check_page(page, report, others, own_required=True)
        for round_number in range(rounds):
            for title in ("View", "Headers", "Open"):
                report.at(f"round {round_number + 1}: {title}")
                await page.get_by_role("link", name=title).first.click(timeout=PAGE_TIMEOUT_MS)
                await wait_idle(page)
                await check_page(page, report, others, own_required=title == "Open")
                if title == "View" and await page.locator("[data-testid='stAlertContentError']").count():
                    report.errors.append(f"page {report.pages}: error on the viewer")
    except Exception as err:  # a timeout or a closed page is a result of the load test, not a crash of it
        report.errors.append(f"{report.step}: {type(err).__name__}: {str(err)[:200]}")
    finally:
        report.seconds = time.perf_counter() - start
        await context.close()


async def warm_up(url: str) -> None:
    """Visit every page once with the sample: the first visit imports each page's modules (plotly, pandas,
    VTK), which holds the interpreter for a second; a long-running server has paid that before any load."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = await browser.new_page()
        await page.goto(url, timeout=NAVIGATION_TIMEOUT_MS, wait_until="domcontentloaded")
        await page.wait_for_selector(IDLE, timeout=PAGE_TIMEOUT_MS)
        await page.get_by_role("button", name="Open sample scan").click()
        await page.get_by_text("1 series found").wait_for(timeout=PAGE_TIMEOUT_MS)
        for title in ("View", "Headers", "Convert", "Mesh", "Open"):
            await page.get_by_role("link", name=title).first.click(timeout=PAGE_TIMEOUT_MS)
            await wait_idle(page)
        await browser.close()


async def drive(url: str, args: argparse.Namespace, folder: Path) -> list[SessionReport]:
    from playwright.async_api import async_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Debian's chromium is needed (apt-get install chromium)")
    reports, uploads = [], []
    for n in range(args.browsers):
        token = f"browse{n:02d}q"
        reports.append(SessionReport(f"browse {n}", token))
        uploads.append({"name": f"{token}.nii", "mimeType": "application/octet-stream", "buffer": small_nifti(n)})
    for n in range(args.uploaders):
        token = f"upload{n:02d}q"
        reports.append(SessionReport(f"upload {n}", token))
        uploads.append(str(series_zip(folder / f"{token}.zip", f"LOADTEST {token}", args.upload_mb, 100 + n)))
    tokens = [r.token for r in reports]
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            await asyncio.gather(
                *[
                    session(
                        browser, url, report, upload, [t for t in tokens if t != report.token], args.rounds, 0.3 * n
                    )
                    for n, (report, upload) in enumerate(zip(reports, uploads, strict=True))
                ]
            )
        finally:
            await browser.close()
    return reports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--browsers", type=int, default=10)
    parser.add_argument("--uploaders", type=int, default=3)
    parser.add_argument("--upload-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttl", type=int, default=20, help="server.disconnectedSessionTTL for this run (s)")
    parser.add_argument("--verbose", action="store_true", help="print each session's steps on stderr")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a streamlit config option for this run, e.g. runner.postScriptGC=true")  # fmt: skip
    args = parser.parse_args()

    log = Path(tempfile.mkstemp(prefix="tomoforge-load-", suffix=".log")[1])
    # e.g. --option runner.postScriptGC=true, to compare with .streamlit/config.toml
    options = [f"server.disconnectedSessionTTL={args.ttl}", *args.option]
    server, url = start_app(log=log, options=options)
    try:
        asyncio.run(warm_up(url))
        time.sleep(args.ttl + 10)  # the warm-up session is dropped after the TTL
        baseline = tree_rss_bytes(server.pid)
        monitor = Monitor(url, server.pid)
        monitor.start()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            reports = asyncio.run(drive(url, args, Path(folder)))
        elapsed = time.perf_counter() - started
        closed = tree_rss_bytes(server.pid)
        time.sleep(args.ttl + 15)  # Streamlit drops disconnected sessions after the TTL
        after = tree_rss_bytes(server.pid)
        monitor.stop.set()
        monitor.join()
    finally:
        stop_app(server)

    latencies = sorted(monitor.latencies)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    errors = sum(len(r.errors) for r in reports)
    leaks = sum(len(r.leaks) for r in reports)
    mb = 1024**2
    print(f"sessions: {args.browsers} browsing ({args.rounds} rounds of Open/View/Headers), "
          f"{args.uploaders} uploading {args.upload_mb} MB DICOM series zips; {elapsed:.0f} s")  # fmt: skip
    print("| figure | value |")
    print("|---|---|")
    print(f"| pages checked | {sum(r.pages for r in reports)} |")
    print(f"| errors | {errors} |")
    print(f"| sessions that saw another session's data | {sum(1 for r in reports if r.leaks)} |")
    print(f"| health checks | {len(latencies)} ({monitor.failures} failed) |")
    if latencies:
        print(f"| health p50 / p99 / max | {statistics.median(latencies) * 1000:.0f} / {p99 * 1000:.0f} / "
              f"{latencies[-1] * 1000:.0f} ms |")  # fmt: skip
    print(f"| server + workers RSS: after warm-up / peak / sessions closed / +{args.ttl + 15} s | {baseline / mb:.0f} / "
          f"{monitor.peak_rss / mb:.0f} / {closed / mb:.0f} / {after / mb:.0f} MB |")  # fmt: skip
    output = log.read_text(errors="replace")
    print(f"| tracebacks in the server log | {output.count('Traceback')} |")
    for report in reports:
        if report.errors or report.leaks:
            print(f"{report.name}: {report.errors[:3]} {report.leaks[:3]}")
    if "Traceback" in output:
        print(f"server log ({log}), first traceback:")
        start = output.index("Traceback")
        print(output[max(0, start - 300) : start + 3000])
    else:
        log.unlink()
    print("| session | seconds |")
    for report in reports:
        print(f"| {report.name} | {report.seconds:.0f} |")
    return 1 if errors or leaks or monitor.failures else 0


if __name__ == "__main__":
    sys.exit(main())
