"""Writing the command line's output files: to a temporary name beside the target, then moved into place.

Two reasons. An output may replace a file the same command is reading: DICOM
inputs are memory-mapped (:func:`core.sources.read_paths`), and truncating a
mapped file in place would make the next read of it fail with SIGBUS; replacing
it leaves the old file intact for whoever still reads it. And an interrupted
write (full disk, Ctrl-C) leaves no half-written file under the output's name.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["replacing", "write_file"]


@contextmanager
def replacing(target: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file to write ``target``'s new contents into; it becomes ``target`` when the block ends.

    The temporary file is created beside the target (same folder, so the final
    rename is atomic) with the permissions a new file would get, and is removed
    if the block raises.
    """
    path = Path(target)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    # O_EXCL: never follow or reuse something already there; mode 0o666 & umask, as open() would.
    handle = os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
    try:
        with handle:
            yield handle
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_file(target: str | os.PathLike[str], data: bytes | str) -> None:
    """Write bytes (or UTF-8 text) to ``target`` through :func:`replacing`."""
    with replacing(target) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
