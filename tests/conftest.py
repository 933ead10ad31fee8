"""Shared test fixtures: where the real-data corpus lives, and skipping when it is absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def data_path(*parts: str) -> Path:
    """A path inside ../shared/data; skips the test with a reason when the corpus is absent."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real-data corpus not found at {path} (it lives beside the repository, never in it)")
    return path


def expected_entries() -> list[dict]:
    path = DATA / "expected.json"
    if not path.exists():
        return []
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return data_path()
