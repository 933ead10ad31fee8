"""The served app for the checks that drive it in a browser: start it, wait for it, stop it.

Used by the real-browser tests (``tests/test_browser.py``, ``tests/test_janitor.py``) and
by the benchmarks that time the served app (:mod:`bench.browser`, :mod:`bench.load_test`),
so they all start ``streamlit run app.py`` the same way, know it is up by the same sign
(``/_stcore/health`` answers 200) and launch the same headless Chromium.
Modelled on Streamlit's e2e_playwright/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.measure import REPO

# Debian's chromium, headless, and quiet: nothing it does on its own (updates, sync,
# background requests) runs alongside what is driven or timed.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Streamlit marks the app root with data-test-script-state while a script runs.
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"

_HOST = "127.0.0.1"
_LOG_TAIL_CHARS = 2000


def free_port() -> int:
    """A local TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _log_tail(log: Path | None) -> str:
    if log is None:
        return "(no log: the server's output was discarded)"
    try:
        return log.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
    except OSError as err:
        return f"(log {log} unreadable: {err})"


def start_app(
    *,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    options: Sequence[str] = (),
    timeout_s: float = 90.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``streamlit run app.py`` on a free local port and wait until it answers.

    Parameters
    ----------
    log
        File for the server's stdout and stderr; ``None`` discards them.
    env
        Environment variables for the server, on top of this process's environment
        (headless, no usage statistics).
    options
        Streamlit config options as ``"key=value"`` strings, passed as ``--key value``
        (e.g. ``"runner.postScriptGC=true"``).
    timeout_s
        How long ``/_stcore/health`` may take to answer 200.

    Returns
    -------
    tuple
        The server process (stop it with :func:`stop_app`) and its base URL.

    Raises
    ------
    RuntimeError
        The server exited, or did not answer within ``timeout_s`` (it is then killed);
        the message ends with the last 2000 characters of ``log``.
    """
    port = free_port()
    url = f"http://{_HOST}:{port}"
    command = [sys.executable, "-m", "streamlit", "run", "app.py"]
    command += ["--server.port", str(port), "--server.address", _HOST]
    for option in options:
        key, _, value = option.partition("=")
        command += [f"--{key}", value]
    environment = dict(os.environ, STREAMLIT_SERVER_HEADLESS="true", STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    environment.update(env or {})
    # The output goes to a file (or nowhere): a pipe nobody reads would fill up and block the server.
    with contextlib.ExitStack() as stack:
        output = subprocess.DEVNULL if log is None else stack.enter_context(open(log, "wb"))
        # The child keeps its own descriptor of the log; ours is closed on leaving the block.
        process = subprocess.Popen(
            command, cwd=REPO, env=environment, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass  # not listening yet
        if process.poll() is not None:
            raise RuntimeError(
                f"streamlit exited with {process.returncode} before /_stcore/health answered; "
                f"its output:\n{_log_tail(log)}"
            )
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(
                f"streamlit did not answer /_stcore/health within {timeout_s:.0f} s; its output:\n{_log_tail(log)}"
            )
        time.sleep(0.3)


def stop_app(process: subprocess.Popen[bytes]) -> None:
    """Stop a server from :func:`start_app`: politely first, then for sure."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
