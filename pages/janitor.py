"""Shut down browser sessions that Streamlit forgets, so their uploads and state leave memory.

Why this exists (Streamlit 1.67, read in ``streamlit/runtime/``):

* When a browser goes away, ``WebsocketSessionManager.disconnect_session`` keeps the
  ``AppSession`` in ``MemorySessionStorage``, a ``TTLCache`` with a TTL of
  ``server.disconnectedSessionTTL``, so that a reconnect can resume it.
* When the TTL is over, the cache only *hides* the entry: it is removed by the next write
  to the cache (another session disconnecting), and then dropped without a call to
  ``AppSession.shutdown()``. So once the last users have left, every expired session stays
  in memory with its ``st.session_state`` (the scan, the uploaded bytes, the decoded
  volume) and its uploaded files (the uploaded-file manager keeps them per session id until
  ``shutdown()``). The load test (bench/load_test.py) saw the server stay at 2.4 GB.
* A dropped session is shut down by ``AppSession.__del__`` only when it is garbage
  collected, and the last session the runtime flushed messages to never is until another
  user connects: ``Runtime._loop_coroutine`` keeps it in its loop variable.

Streamlit has no option to shut expired sessions down. This janitor, started once per
server process by :func:`start_janitor`, runs every ``TOMOFORGE_JANITOR_INTERVAL_S``
seconds (default 30, at most the TTL; ``0`` disables it). On the server's event loop
(Streamlit's session manager is not thread-safe: "must be called on the eventloop
thread") it

1. takes the expired entries out of the session storage and shuts each session down,
   which is what Streamlit's own ``close_session`` does for a stored session (an expired
   entry cannot be resumed any more: the cache already reports it as absent);
2. shuts down the sessions it saw at the previous sweep that have since left Streamlit's
   books (dropped by the cache) but are still in memory. It tracks them through weak
   references, so it never keeps one alive itself; a session is on the books for at least
   the TTL after its browser leaves, and the interval is at most the TTL, so a sweep sees it.

Shutting a session down (:func:`_shut_down`) also empties its ``session_state``, so that a
stray reference to the session object (the runtime's loop variable) holds no scan.

When something was released, the janitor then runs a full garbage collection (a session
is held in reference cycles, and with ``runner.postScriptGC`` off an idle server may not
run one for a long time) and glibc's ``malloc_trim(0)``: freed heap pages (the many small
DICOM file buffers of a zip) otherwise stay with the process. Large buffers (a whole
upload, a decoded volume) are ``mmap``-ed and go back to the system as soon as they are freed.

The janitor reaches into Streamlit internals (``Runtime._session_mgr``, the storage's
``_cache``, the runtime's event loop). They are looked up and checked once, at start; if a
future Streamlit changes them, the janitor logs a warning and stays off instead of breaking
the app. A sweep that fails logs a warning and stops the janitor. It holds no user data.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import gc
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streamlit import config
from streamlit.logger import get_logger

__all__ = ["INTERVAL_ENV", "THREAD_NAME", "start_janitor"]

INTERVAL_ENV = "TOMOFORGE_JANITOR_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0
# The thread's name is the once-per-process guard: Streamlit may import this module again
# (a source change reloads modules), and a module-level flag would then start a second janitor.
THREAD_NAME = "tomoforge-session-janitor"
# A sweep runs on the server's event loop and only walks the session lists: this is generous.
SWEEP_TIMEOUT_S = 60.0

_LOGGER = get_logger("tomoforge.janitor")  # Streamlit's handler and logger.level
_START_LOCK = threading.Lock()
# Set when this Streamlit's internals are not the expected ones: warn once, not on every run.
_INCOMPATIBLE = threading.Event()


@dataclass
class _Sweep:
    """Ids of the sessions one sweep shut down: expired in the storage, or dropped by it."""

    expired: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def released(self) -> bool:
        return bool(self.expired or self.dropped)


@dataclass
class _Internals:
    """The Streamlit objects a sweep needs, looked up (and checked) once."""

    loop: Any  # the server's asyncio event loop
    session_mgr: Any  # WebsocketSessionManager
    cache: Any  # MemorySessionStorage's TTLCache: expire() -> [(session id, SessionInfo)]
    storage_lock: Any  # the manager's lock around moves between active sessions and storage
    media_file_mgr: Any
    # Sessions on Streamlit's books at the last sweep, held weakly (see step 2).
    seen: weakref.WeakValueDictionary[str, Any] = field(default_factory=weakref.WeakValueDictionary)


def interval_from_env() -> float:
    """Seconds between sweeps from ``TOMOFORGE_JANITOR_INTERVAL_S`` (default 30; 0 = off)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        _LOGGER.warning("%s=%r is not a number of seconds; using %s s", INTERVAL_ENV, raw, DEFAULT_INTERVAL_S)
        return DEFAULT_INTERVAL_S
    return max(0.0, value)


def start_janitor(interval_s: float | None = None) -> bool:
    """Start the session janitor once per process; later calls do nothing.

    Cheap after the first call, so ``app.py`` calls it on every run.

    Parameters
    ----------
    interval_s : float, optional
        Seconds between sweeps; default from ``TOMOFORGE_JANITOR_INTERVAL_S`` (30 s).
        ``0`` disables the janitor. Capped at ``server.disconnectedSessionTTL`` (at least
        1 s), so that every session is seen by a sweep while Streamlit still lists it.

    Returns
    -------
    bool
        True if the janitor is running (started now or before), False if it is disabled,
        there is no Streamlit server (bare mode, AppTest), or this Streamlit version's
        internals are not the expected ones (a warning is logged).
    """
    interval = interval_from_env() if interval_s is None else interval_s
    if interval <= 0 or _INCOMPATIBLE.is_set():
        return False
    with _START_LOCK:
        if any(thread.name == THREAD_NAME and thread.is_alive() for thread in threading.enumerate()):
            return True
        internals = _find_internals()
        if internals is None:
            return False
        interval = min(interval, max(1.0, float(config.get_option("server.disconnectedSessionTTL"))))
        thread = threading.Thread(target=_run, args=(internals, interval), name=THREAD_NAME, daemon=True)
        thread.start()
        _LOGGER.info("session janitor started: sweeps every %.0f s", interval)
        return True


def _find_internals() -> _Internals | None:
    """Look up the Streamlit objects the janitor uses; None (and a warning) if they changed."""
    from streamlit import runtime

    if not runtime.exists():
        return None  # bare `python app.py` or AppTest: no server, no sessions to clean
    try:
        rt: Any = runtime.get_instance()  # Any: private attributes follow, checked below
        session_mgr = rt._session_mgr
        internals = _Internals(
            loop=rt._get_async_objs().eventloop,
            session_mgr=session_mgr,
            cache=session_mgr._session_storage._cache,
            storage_lock=getattr(session_mgr, "_storage_lock", None) or contextlib.nullcontext(),
            media_file_mgr=rt.media_file_mgr,
        )
        required = [
            (internals.loop, "call_soon_threadsafe"),
            (internals.cache, "expire"),
            (session_mgr, "list_sessions"),
            (internals.media_file_mgr, "remove_orphaned_files"),
        ]
        missing = [name for owner, name in required if not callable(getattr(owner, name, None))]
        if missing:
            raise AttributeError(f"missing {', '.join(missing)}")
    except (AttributeError, RuntimeError) as err:
        # RuntimeError: the runtime has not started its event loop (never the case in a script run).
        _INCOMPATIBLE.set()
        _LOGGER.warning(
            "session janitor disabled: this Streamlit version's session internals differ (%s); "
            "expired sessions keep their uploads in memory until the server restarts",
            err,
        )
        return None
    return internals


def _run(internals: _Internals, interval: float) -> None:
    stop = threading.Event()  # never set: a daemon thread ends with the process
    released_before = False
    while not stop.wait(interval):
        try:
            sweep = functools.partial(_sweep, internals, finish_downloads=released_before)
            result = _on_loop(internals.loop, sweep, SWEEP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a janitor failure must never take the server down
            if not internals.loop.is_closed():  # a closed loop: the server is stopping
                _LOGGER.warning("session janitor: a sweep failed; the janitor is stopped", exc_info=True)
            return
        if result.released:
            _LOGGER.info(
                "session janitor: shut down %d expired and %d dropped session(s)",
                len(result.expired),
                len(result.dropped),
            )
        if result.released or released_before:
            # Here, off the event loop: a collection holds only the interpreter lock.
            gc.collect()
            _malloc_trim()
        released_before = result.released


def _on_loop(loop: Any, function: Callable[[], _Sweep], timeout_s: float) -> _Sweep:
    """Run ``function`` on the event loop thread and return its result."""
    future: concurrent.futures.Future[_Sweep] = concurrent.futures.Future()

    def call() -> None:
        try:
            future.set_result(function())
        except BaseException as err:  # noqa: BLE001 - handed back to the waiting thread
            future.set_exception(err)

    loop.call_soon_threadsafe(call)
    return future.result(timeout=timeout_s)


def _sweep(internals: _Internals, *, finish_downloads: bool) -> _Sweep:
    """One sweep; runs on the event loop thread.

    ``remove_orphaned_files`` deletes an unreferenced download only on its second call (the
    first marks it, so a click racing a rerun still finds the file). Streamlit calls it at
    the end of every script run, which never comes once the last user has left; so the sweep
    after one that shut sessions down calls it again (``finish_downloads``).
    """
    result = _Sweep()
    if finish_downloads:
        internals.media_file_mgr.remove_orphaned_files()
    # 1. Expired stored sessions: out of the storage, then shut down.
    with internals.storage_lock:
        expired = internals.cache.expire()
    for session_id, session_info in expired:
        _shut_down(session_info.session)
        result.expired.append(session_id)
    # 2. Sessions the storage dropped since the last sweep (it reaps expired entries on its
    # next write, and evicts the oldest beyond 128) that something still holds.
    infos = internals.session_mgr.list_sessions()  # connected + stored for a reconnect
    on_books = {info.session.id for info in infos}
    for session_id, session in list(internals.seen.items()):
        if session_id not in on_books and session_id not in result.expired:
            _shut_down(session)
            result.dropped.append(session_id)
    internals.seen.clear()
    internals.seen.update((info.session.id, info.session) for info in infos)
    return result


def _shut_down(session: Any) -> None:
    """Shut a forgotten session down as Streamlit's ``close_session`` would, and empty its state.

    ``shutdown()`` (idempotent) releases the session's uploaded files, media files,
    dataframe sources and caches. Emptying ``session_state`` frees the scan, the uploaded
    bytes and the decoded volume even while something still references the session object.
    A shut-down session is never resumed, so nothing reads that state again.
    """
    session.shutdown()
    state = getattr(session, "session_state", None)
    if state is not None and callable(getattr(state, "clear", None)):
        state.clear()
        # clear() keeps the widgets' metadata, whose callbacks (on_change=...) are functions of
        # the page scripts and so hold the pages' globals: `volume = ...` in a page is a Volume.
        metadata = getattr(getattr(state, "_new_widget_state", None), "widget_metadata", None)
        if isinstance(metadata, dict):
            metadata.clear()


def _malloc_trim() -> None:
    """Ask glibc to return free heap pages to the system (a no-op elsewhere: musl, macOS)."""
    trim = _malloc_trim_function()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim_function() -> Any:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the interpreter is linked with
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim
