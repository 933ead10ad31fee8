"""State shared by the pages of one session: the current upload, series and volume.

Everything lives in ``st.session_state`` (one per browser session); no module
global holds user data, so one user's scan can never reach another.

Pixels are decoded in a worker process (:mod:`core.worker`) with memory, CPU and
time limits: a file that crashes a decoding library ends that worker, not the
server, and the user sees an error message. The current series of an upload
starts decoding as soon as it is chosen (:func:`prefetch_current`), while the
user reads the series table; the pages that need pixels wait for that decode
rather than start another.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import streamlit as st

from core.errors import CoreError
from core.names import token
from core.series import ScanResult, Series
from core.sources import Source
from core.volume import Volume
from core.worker import DEFAULT_WORKER_LIMITS, load_series_in_worker, sources_for_series

SCAN = "scan"  # ScanResult of the current upload (or the sample)
CURRENT = "current_id"  # id of the series every page works on
VOLUMES = "volumes"  # {series id: Volume}, only the current one is kept
UPLOAD_KEY = "upload_key"  # identity of the files the scan came from
PAGE_STATE_PREFIXES = ("viewer_", "convert_", "mesh_", "slice_", "view_")
SOURCES = "sources"  # the uploaded files of the scan (list of Source), for decoding in a worker
PREFETCH = "prefetch"  # (series id, Future[Volume]): the current series, decoding in the background
PREFETCHER = "prefetcher"  # the session's _Prefetcher (one background decode at a time)
# A background decode waits for a worker slot and runs (each at most the job's wall time), maybe
# behind the one decode already running for the session; past that, something is wrong.
_PREFETCH_WAIT_S = 4 * DEFAULT_WORKER_LIMITS.wall_seconds + 60
DOWNLOAD_SALT = "download_salt"  # per-session part of every download name (core.names)
# Widget keys of the Open page's uploaders (pages/upload.py).
UPLOADER_KEYS = ("upload_files", "upload_folder")


def init_state() -> None:
    st.session_state.setdefault(SCAN, None)
    st.session_state.setdefault(CURRENT, None)
    st.session_state.setdefault(VOLUMES, {})
    st.session_state.setdefault(UPLOAD_KEY, None)
    st.session_state.setdefault(SOURCES, None)


def set_scan(result: ScanResult, upload_key: str, sources: Sequence[Source] | None = None) -> None:
    """Make ``result`` the session's current scan.

    Parameters
    ----------
    result : ScanResult
    upload_key : str
        Identity of the upload ("upload:<file ids>", or "sample").
    sources : sequence of Source, optional
        The files the scan read; series are decoded from them in a worker process.
        When omitted for an upload, they are taken from the Open page's uploaders
        (``UploadedFile.getvalue()`` shares the uploaded bytes, no copy).
    """
    if sources is None and upload_key.startswith("upload:"):
        sources = _uploaded_sources()
    # Pages keep per-series state (slice positions, caches, results) under these prefixes.
    # Series ids repeat across uploads ("3-1", a file stem), so a new scan must not inherit them.
    for key in list(st.session_state.keys()):
        if str(key).startswith(PAGE_STATE_PREFIXES):
            del st.session_state[key]
    st.session_state[SCAN] = result
    st.session_state[UPLOAD_KEY] = upload_key
    st.session_state[SOURCES] = list(sources) if sources else None
    st.session_state[VOLUMES] = {}
    st.session_state.pop(PREFETCH, None)  # a decode of the previous upload ends unseen
    if PREFETCHER in st.session_state:
        st.session_state[PREFETCHER].drop_pending()
    st.session_state[CURRENT] = result.series[0].info.id if result.series else None
    prefetch_current()


def _uploaded_sources() -> list[Source] | None:
    files = [f for key in UPLOADER_KEYS for f in (st.session_state.get(key) or [])]
    return [Source(name=f.name, data=f.getvalue()) for f in files] or None


def current_scan() -> ScanResult | None:
    return st.session_state.get(SCAN)


def current_series() -> Series | None:
    result = current_scan()
    wanted = st.session_state.get(CURRENT)
    if result is None or wanted is None:
        return None
    for item in result.series:
        if item.info.id == wanted:
            return item
    return None


def current_volume() -> Volume | None:
    """Decode the current series once per session; show the error and return None if it fails."""
    series = current_series()
    if series is None:
        return None
    volumes: dict[str, Volume] = st.session_state[VOLUMES]
    key = series.info.id
    if key not in volumes:
        pending: tuple[str, Future[Volume]] | None = st.session_state.pop(PREFETCH, None)
        try:
            with st.spinner(f"Decoding {plain(series.info.description or 'series')}..."):
                if pending is not None and pending[0] == key:
                    volume = pending[1].result(timeout=_PREFETCH_WAIT_S)
                else:
                    volume = _decode(series)
        except CoreError as err:
            show_error(err.message)
            return None
        except FutureTimeout:
            show_error("Decoding this series did not finish. Open the files again on the Open page.")
            return None
        volumes.clear()  # keep one decoded volume per session: they can be GBs
        volumes[key] = volume
    return volumes[key]


def prefetch_current() -> None:
    """Start decoding the current series of an upload in a worker, from a background thread.

    :func:`current_volume` takes the result (or the error) when a page needs the
    pixels. Nothing happens for the sample (decoded here in milliseconds), for a
    series already decoded or already being decoded. Each session decodes one
    series at a time (:class:`_Prefetcher`): choosing series after series
    quickly does not fill the server's few worker slots with decodes nobody waits for.
    """
    series = current_series()
    sources: list[Source] | None = st.session_state.get(SOURCES)
    if series is None or not sources or series.info.kind == "sample" or series.info.id in st.session_state[VOLUMES]:
        return
    pending = st.session_state.get(PREFETCH)
    if pending is not None and pending[0] == series.info.id:
        return
    prefetcher: _Prefetcher = st.session_state.setdefault(PREFETCHER, _Prefetcher())
    files = sources_for_series(sources, series.info.sources)
    st.session_state[PREFETCH] = (series.info.id, prefetcher.request(files, series.info.id, series.info.sources))


class _Prefetcher:
    """One session's background decodes: one at a time, and a newer request replaces one not started.

    The thread holds the files and the futures, never the session, so a session
    that ends meanwhile loses nothing but the wait.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: tuple[Sequence[Source], str, Sequence[str], Future[Volume]] | None = None
        self._running = False

    def request(self, files: Sequence[Source], series_id: str, expected: Sequence[str]) -> Future[Volume]:
        future: Future[Volume] = Future()
        with self._lock:
            if self._next is not None:
                self._next[3].cancel()  # not started: nobody will wait for it now
            self._next = (files, series_id, expected, future)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="tomoforge-prefetch", daemon=True).start()
        return future

    def drop_pending(self) -> None:
        """Cancel the request not started yet, if any (a new upload replaced its files)."""
        with self._lock:
            if self._next is not None:
                self._next[3].cancel()
                self._next = None

    def _run(self) -> None:
        while True:
            with self._lock:
                job, self._next = self._next, None
                if job is None:
                    self._running = False
                    return
            files, series_id, expected, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                volume = load_series_in_worker(files, series_id, expected_sources=expected)
            except BaseException as err:  # noqa: BLE001 - handed over, and raised, where the volume is taken
                future.set_exception(err)
            else:
                future.set_result(volume)


def _decode(series: Series) -> Volume:
    """Load a series in a worker process when its files are known (uploads), else here (the sample)."""
    sources: list[Source] | None = st.session_state.get(SOURCES)
    if not sources or series.info.kind == "sample":
        return series.load()
    return load_series_in_worker(
        sources_for_series(sources, series.info.sources), series.info.id, expected_sources=series.info.sources
    )


def require_volume() -> tuple[Series, Volume]:
    """The current series and volume, or a pointer to the Open page and stop."""
    series = current_series()
    volume = current_volume() if series is not None else None
    if series is None or volume is None:
        st.info("No scan is open yet. Go to **Open** to upload files or open the sample scan.")
        st.page_link("pages/upload.py", label="Open a scan", icon=":material/upload_file:")
        st.stop()
    assert series is not None and volume is not None
    return series, volume


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$])")


def plain(text: str) -> str:
    """Escape Markdown so file names and header values render as plain text, never as markup."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def show_error(message: str) -> None:
    st.error(plain(message), icon=":material/error:")


def show_warning(message: str) -> None:
    st.warning(plain(message), icon=":material/warning:")


def download_token(*made_from: object) -> str:
    """The token of a download name (see :mod:`core.names`).

    Made of a per-session salt, the current upload (series ids such as "1" repeat
    across uploads) and what the file was made from.
    """
    salt = st.session_state.setdefault(DOWNLOAD_SALT, secrets.token_hex(4))
    return token(salt, st.session_state.get(UPLOAD_KEY), *made_from)
