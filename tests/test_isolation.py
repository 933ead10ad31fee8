"""Isolation between users: sessions never see each other's data, downloads never share a name,
no per-user state sits in module globals, caches are per session, temporary files are private.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import REPO

# Module globals that are mutated at run time on purpose, with the reason they hold no user data.
ALLOWED_MUTABLE_GLOBALS = {
    ("core/mesh.py", "_SMP_READY"): "process-wide flag: VTK's thread back end was initialised",
}
MUTATING_METHODS = {
    "append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem", "clear", "remove", "discard",
    "appendleft", "extendleft", "move_to_end", "__setitem__",
}  # fmt: skip
MUTABLE_FACTORIES = {"list", "dict", "set", "defaultdict", "OrderedDict", "deque", "Counter", "bytearray"}


def _nifti(values: np.ndarray) -> bytes:
    return nib.Nifti1Image(values, np.diag([1.0, 1.0, 2.0, 1.0])).to_bytes()


def _session() -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    return at


def _upload(at: AppTest, name: str, data: bytes) -> None:
    at.file_uploader(key="upload_files").set_value([(name, data, "application/octet-stream")])
    at.run()
    assert not at.exception


def _run_recording_downloads(at: AppTest, page: str, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Run ``page`` and return the file names its download buttons register with Streamlit's media manager.

    AppTest builds a new media manager for every run, so the names are recorded on
    the way in (the manager's own methods still run).
    """
    from streamlit.runtime.media_file_manager import MediaFileManager

    names: set[str] = set()
    add, add_deferred = MediaFileManager.add, MediaFileManager.add_deferred

    def recording_add(self, path_or_data, mimetype, coordinates, file_name=None, is_for_static_download=False):  # type: ignore[no-untyped-def]
        if is_for_static_download and file_name:
            names.add(file_name)
        return add(self, path_or_data, mimetype, coordinates, file_name, is_for_static_download)

    def recording_add_deferred(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):  # type: ignore[no-untyped-def]
        if file_name:
            names.add(file_name)
        return add_deferred(self, data_callable, mimetype, coordinates, file_name, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(MediaFileManager, "add", recording_add)
        patch.setattr(MediaFileManager, "add_deferred", recording_add_deferred)
        at.switch_page(page).run()
    assert not at.exception
    return names


def _two_sessions(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[AppTest, np.ndarray, set[str]]]:
    """Two sessions upload different data under one file name and open the viewer and header pages."""
    rng = np.random.default_rng(9)
    mine = rng.integers(0, 1000, size=(24, 20, 6)).astype(np.int16)
    # Same shape and the same values in another order: the same automatic window, so only the
    # identity of the upload can tell the two sessions' downloads apart.
    theirs = rng.permutation(mine.reshape(-1)).reshape(mine.shape)
    assert not np.array_equal(mine, theirs)
    sessions = {"first": (_session(), mine), "second": (_session(), theirs)}
    for at, values in sessions.values():
        _upload(at, "scan.nii", _nifti(values))  # the same file name in both sessions
    out = {}
    for label, (at, values) in sessions.items():
        offered = _run_recording_downloads(at, "pages/viewer.py", monkeypatch)
        assert not at.error, [e.value for e in at.error]
        offered |= _run_recording_downloads(at, "pages/headers.py", monkeypatch)
        out[label] = (at, values, offered)
    return out


def test_two_sessions_see_only_their_own_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    for at, expected, _ in _two_sessions(monkeypatch).values():
        (volume,) = at.session_state["volumes"].values()
        np.testing.assert_array_equal(volume.array, expected)  # a diagonal affine: stored RAS+ already
        assert [s.data for s in at.session_state["sources"]] == [_nifti(expected)]


def test_two_sessions_never_offer_downloads_under_one_name(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = (offered for _, _, offered in _two_sessions(monkeypatch).values())
    assert first and second
    assert not first & second, (
        f"two sessions offer downloads under the same name {sorted(first & second)}: Streamlit may serve one "
        "user's file to the other (REFERENCE.md section 5)"
    )


# --------------------------------------------------------------------------- static checks


def _modules() -> list[Path]:
    return sorted((REPO / "core").glob("*.py")) + [REPO / "pages" / "common.py"]


def _is_mutable_value(node: ast.expr) -> bool:
    if isinstance(node, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
        return True
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        return name in MUTABLE_FACTORIES
    return False


def _module_mutables(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign) and _is_mutable_value(node.value):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None and _is_mutable_value(node.value):
            targets = [node.target]
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _mutated_in_functions(tree: ast.Module, names: set[str]) -> set[str]:
    """Names of ``names`` that a function body changes (method calls, item assignment, ``global``)."""
    found = set()
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Global):
                found |= names & set(node.names)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id in names and node.func.attr in MUTATING_METHODS:
                    found.add(owner.id)
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                        if target.value.id in names:
                            found.add(target.value.id)
    return found


def test_no_module_global_is_mutated_at_run_time() -> None:
    offenders = []
    for path in _modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        relative = path.relative_to(REPO).as_posix()
        for name in sorted(_mutated_in_functions(tree, _module_mutables(tree))):
            if (relative, name) not in ALLOWED_MUTABLE_GLOBALS:
                offenders.append(f"{relative}: {name}")
    assert not offenders, f"module-level containers changed at run time (shared by every user): {offenders}"


def test_the_global_check_finds_a_per_user_cache() -> None:
    tree = ast.parse(
        "SEEN = {}\ndef remember(key, value):\n    SEEN[key] = value\nCACHE = []\ndef keep(x):\n    CACHE.append(x)\n"
    )
    assert _mutated_in_functions(tree, _module_mutables(tree)) == {"SEEN", "CACHE"}


def _calls(tree: ast.AST, *names: str) -> list[ast.Call]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in names:
                out.append(node)
    return out


def test_streamlit_caches_are_scoped_to_the_session() -> None:
    """st.cache_data / st.cache_resource are shared by all users unless scope="session" (REFERENCE.md 5)."""
    offenders = []
    for path in sorted((REPO / "pages").glob("*.py")) + [REPO / "app.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            uses = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for decorator in node.decorator_list:
                    target = decorator.func if isinstance(decorator, ast.Call) else decorator
                    if isinstance(target, ast.Attribute) and target.attr in ("cache_data", "cache_resource"):
                        uses.append(decorator)
            for use in uses:
                scoped = isinstance(use, ast.Call) and any(
                    k.arg == "scope" and isinstance(k.value, ast.Constant) and k.value.value == "session"
                    for k in use.keywords
                )
                if not scoped:
                    offenders.append(f"{path.name}:{use.lineno}")
    assert not offenders, f"caches shared between users: {offenders}"


@pytest.mark.parametrize("folder", ["core", "pages"])
def test_temporary_files_only_in_private_folders_that_are_removed(folder: str) -> None:
    """Only ``tempfile.TemporaryDirectory()`` used as a context manager: private (0700) and removed."""
    offenders = []
    for path in sorted((REPO / folder).glob("*.py")) + ([REPO / "app.py"] if folder == "pages" else []):
        tree = ast.parse(path.read_text())
        managed = {
            id(item.context_expr)
            for node in ast.walk(tree)
            if isinstance(node, (ast.With, ast.AsyncWith))
            for item in node.items
        }
        for call in _calls(tree, "mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile", "mktemp"):
            offenders.append(f"{path.name}:{call.lineno} {ast.unparse(call.func)}")
        for call in _calls(tree, "TemporaryDirectory"):
            if id(call) not in managed:
                offenders.append(f"{path.name}:{call.lineno} TemporaryDirectory outside a with statement")
    assert not offenders, offenders
