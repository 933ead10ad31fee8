"""Download names: a token before the extension, equal only for equal inputs (core.names)."""

from __future__ import annotations

import pytest

from core.names import token, with_token


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("2_T1.nii.gz", "2_T1_abc.nii.gz"),
        ("2_T1.NII.GZ", "2_T1_abc.NII.GZ"),
        ("scan.nrrd", "scan_abc.nrrd"),
        ("mesh.stl", "mesh_abc.stl"),
        ("axial_s0012.png", "axial_s0012_abc.png"),
        ("tomoforge_header.json", "tomoforge_header_abc.json"),
        ("README", "README_abc"),
        (".hidden", ".hidden_abc"),
    ],
)
def test_the_token_goes_before_the_whole_extension(name: str, expected: str) -> None:
    assert with_token(name, "abc") == expected


def test_tokens_differ_with_any_input_and_repeat_for_equal_ones() -> None:
    assert token("salt", "3-1", ("window", 40, 400)) == token("salt", "3-1", ("window", 40, 400))
    variants = {
        token("salt", "3-1", ("window", 40, 400)),
        token("other salt", "3-1", ("window", 40, 400)),
        token("salt", "3-2", ("window", 40, 400)),
        token("salt", "3-1", ("window", 40, 401)),
        token(b"file bytes"),
        token(b"file bytez"),
    }
    assert len(variants) == 6
    assert all(len(t) == 8 and int(t, 16) >= 0 for t in variants)
