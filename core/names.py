"""Download file names: technical words and a short token, never patient data.

Streamlit serves a download under a URL made from its file name and a few
samples of its bytes, so two different files with one name and size could be
served under one URL, one user's file to another (REFERENCE.md section 5).
Every page therefore puts a token into each download name that differs between
sessions and between contents: :func:`token` of a per-session salt and of what
the file was made from (``pages.common.download_token``).
"""

from __future__ import annotations

import hashlib

__all__ = ["token", "with_token"]

# Longest first: "a.nii.gz" gets its token before ".nii.gz", not before ".gz".
_EXTENSIONS = (".nii.gz", ".nrrd.gz", ".tar.gz", ".nii", ".nrrd", ".mha", ".zip", ".json", ".csv", ".png")


def token(*values: object) -> str:
    """Eight hex digits of a digest of ``values`` (their ``repr``): equal values, equal token."""
    return hashlib.sha256(repr(values).encode()).hexdigest()[:8]


def with_token(name: str, tag: str) -> str:
    """``name`` with ``_tag`` before its extension: ``2_T1.nii.gz`` -> ``2_T1_1a2b3c4d.nii.gz``."""
    lower = name.lower()
    for extension in _EXTENSIONS:
        if lower.endswith(extension):
            return f"{name[: -len(extension)]}_{tag}{name[-len(extension) :]}"
    stem, dot, extension = name.rpartition(".")
    return f"{stem}_{tag}.{extension}" if dot and stem else f"{name}_{tag}"
