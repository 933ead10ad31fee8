"""Mesh files: binary and ASCII STL, OBJ, binary PLY, in mm, LPS (default) or RAS.

3D Slicer (since 4.11, February 2020) saves models in LPS, writes ``SPACE=LPS`` or
``SPACE=RAS`` in the file header (STL header/solid line, OBJ and PLY comments) and
assumes LPS when the header says nothing, so LPS is the default and every file we
write names its space the same way.
LPS <-> RAS negates x and y, a rotation by 180 degrees about z: triangle winding
(outward normals) is unchanged. Every writer uses the same float32 vertices, so the
coordinates read back from any format are identical.

Headers carry the coordinate system and the tool name only, never patient data.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from core.errors import LimitError
from core.mask import available_memory_bytes
from core.mesh import Mesh, to_space

# name -> (suffix, description)
FORMATS: dict[str, tuple[str, str]] = {
    "stl": (".stl", "binary STL"),
    "stl-ascii": (".stl", "ASCII STL"),
    "obj": (".obj", "Wavefront OBJ"),
    "ply": (".ply", "binary PLY"),
}

_STL_RECORD = np.dtype([("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])
# Bytes per triangle of each format, for the memory check before writing.
_BYTES_PER_TRIANGLE = {"stl": 50 + 100, "stl-ascii": 260 + 100, "obj": 70, "ply": 35}


def format_from_suffix(path: str | Path, *, ascii_stl: bool = False) -> str:
    """The format name for an output file name: ``.stl`` (binary unless ``ascii_stl``), ``.obj``, ``.ply``.

    Raises
    ------
    ValueError
        Any other suffix (the message lists the supported ones).
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".stl":
        return "stl-ascii" if ascii_stl else "stl"
    if suffix in (".obj", ".ply"):
        return suffix[1:]
    raise ValueError(f"{Path(path).name}: unknown mesh format {suffix or '(no suffix)'}; use .stl, .obj or .ply")


def export_vertices(mesh: Mesh, space: str = "LPS", scale: float = 1.0) -> np.ndarray:
    """The ``(V, 3)`` float32 vertex coordinates every writer stores.

    Parameters
    ----------
    mesh : Mesh
    space : {"LPS", "RAS"}
    scale : float
        Multiplies the millimetres (e.g. 0.5 prints at half size). Must be positive, so
        the winding stays outward.
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return np.ascontiguousarray(to_space(mesh.vertices, space) * scale, dtype=np.float32)


def _header_text(space: str, scale: float) -> str:
    unit = "mm" if scale == 1 else f"mm x {scale:g}"
    return f"TomoForge surface SPACE={space.upper()} units {unit}"


def write_mesh(mesh: Mesh, out: BinaryIO, fmt: str = "stl", *, space: str = "LPS", scale: float = 1.0) -> None:
    """Write a mesh to a binary file object.

    Parameters
    ----------
    mesh : Mesh
    out : binary file object
    fmt : {"stl", "stl-ascii", "obj", "ply"}
    space : {"LPS", "RAS"}
    scale : float

    Raises
    ------
    LimitError
        The file would not fit in the free memory while being built.
    ValueError
        Unknown format or space.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown mesh format {fmt!r}; use one of {', '.join(FORMATS)}")
    need = mesh.n_triangles * _BYTES_PER_TRIANGLE[fmt]
    free = available_memory_bytes()
    if free is not None and need > 0.6 * free:
        raise LimitError(
            f"writing {mesh.n_triangles:,} triangles as {FORMATS[fmt][1]} needs about {need / 1024**3:.1f} GB "
            f"and {free / 1024**3:.1f} GB is free. Decimate the mesh or choose binary STL/PLY."
        )
    vertices = export_vertices(mesh, space, scale)
    header = _header_text(space, scale)
    if fmt == "stl":
        _write_stl_binary(vertices, mesh.faces, out, header)
    elif fmt == "stl-ascii":
        _write_stl_ascii(vertices, mesh.faces, out, _safe_name(mesh.name), header)
    elif fmt == "obj":
        _write_obj(vertices, mesh.faces, out, _safe_name(mesh.name), header)
    else:
        _write_ply(vertices, mesh.faces, out, header)


def mesh_to_bytes(mesh: Mesh, fmt: str = "stl", *, space: str = "LPS", scale: float = 1.0) -> bytes:
    """The file contents of :func:`write_mesh` as bytes."""
    buffer = io.BytesIO()
    write_mesh(mesh, buffer, fmt, space=space, scale=scale)
    return buffer.getvalue()


def meshes_to_zip(
    meshes: Sequence[Mesh], fmt: str = "stl", *, space: str = "LPS", scale: float = 1.0, stem: str = "tomoforge"
) -> bytes:
    """One file per mesh (e.g. one per label) in a zip, named ``<stem>-<mesh name>.<ext>``."""
    suffix = FORMATS[fmt][0]
    buffer = io.BytesIO()
    used: set[str] = set()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for mesh in meshes:
            base = f"{stem}-{_safe_name(mesh.name)}"
            name, n = base, 2
            while name in used:
                name, n = f"{base}-{n}", n + 1
            used.add(name)
            archive.writestr(name + suffix, mesh_to_bytes(mesh, fmt, space=space, scale=scale))
    return buffer.getvalue()


def _safe_name(name: str) -> str:
    """Letters, digits, '_' and '-' only: usable in file names and OBJ/STL headers."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return cleaned or "surface"


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit normals ``(F, 3)`` float32 of the triangles (zero for degenerate ones)."""
    return _triangle_normals(vertices[faces])


def _triangle_normals(triangles: np.ndarray) -> np.ndarray:
    """Unit normals of ``(F, 3, 3)`` triangle corners, right-hand rule; zero when degenerate."""
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    length = np.sqrt(np.einsum("ij,ij->i", normals, normals))[:, None]
    np.divide(normals, length, out=normals, where=length > 0)
    normals[length[:, 0] == 0] = 0
    return normals.astype(np.float32, copy=False)


def _write_stl_binary(vertices: np.ndarray, faces: np.ndarray, out: BinaryIO, header: str, chunk: int = 65_536) -> None:
    # An 80-byte header that must not start with "solid": readers take that for ASCII STL.
    out.write(header.encode("ascii")[:80].ljust(80, b" "))
    out.write(np.uint32(len(faces)).tobytes())
    # Chunks bound the temporary memory; the record buffer is reused and written without a copy.
    records = np.zeros(min(chunk, len(faces)), dtype=_STL_RECORD)
    for start in range(0, len(faces), chunk):
        f = faces[start : start + chunk]
        block = records[: len(f)]
        triangles = vertices[f]
        block["vertices"] = triangles
        block["normal"] = _triangle_normals(triangles)
        out.write(block.view(np.uint8).data)


def _write_stl_ascii(vertices: np.ndarray, faces: np.ndarray, out: BinaryIO, name: str, header: str) -> None:
    # '%.9g' round-trips float32 exactly, so ASCII and binary STL read back identically.
    facet = (
        "facet normal %.9g %.9g %.9g\n outer loop\n  vertex %.9g %.9g %.9g\n"
        "  vertex %.9g %.9g %.9g\n  vertex %.9g %.9g %.9g\n endloop\nendfacet\n"
    )
    out.write(f"solid {name} {header}\n".encode("ascii"))
    for start in range(0, len(faces), 100_000):
        f = faces[start : start + 100_000]
        rows = np.concatenate([face_normals(vertices, f), vertices[f].reshape(len(f), 9)], axis=1).tolist()
        out.write("".join(facet % tuple(row) for row in rows).encode("ascii"))
    out.write(f"endsolid {name}\n".encode("ascii"))


def _write_obj(vertices: np.ndarray, faces: np.ndarray, out: BinaryIO, name: str, header: str) -> None:
    out.write(f"# {header}\no {name}\n".encode("ascii"))
    for start in range(0, len(vertices), 200_000):
        block = vertices[start : start + 200_000].tolist()
        out.write("".join("v %.9g %.9g %.9g\n" % tuple(row) for row in block).encode("ascii"))
    for start in range(0, len(faces), 200_000):
        block = (faces[start : start + 200_000].astype(np.int64) + 1).tolist()  # OBJ counts from 1
        out.write("".join("f %d %d %d\n" % tuple(row) for row in block).encode("ascii"))


def _write_ply(vertices: np.ndarray, faces: np.ndarray, out: BinaryIO, header: str) -> None:
    head = (
        "ply\nformat binary_little_endian 1.0\n"
        f"comment {header}\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    out.write(head.encode("ascii"))
    out.write(vertices.astype("<f4", copy=False).tobytes())
    records = np.empty(len(faces), dtype=np.dtype([("n", "u1"), ("index", "<i4", (3,))]))
    records["n"] = 3
    records["index"] = faces
    out.write(records.tobytes())


def export_file_name(stem: str, mesh_name: str, fmt: str, token: str) -> str:
    """A download name without patient data: ``<stem>-<mesh name>-<token><suffix>``.

    ``token`` should differ between different files (e.g. a hash of the mesh options):
    Streamlit can confuse two downloads of equal size and name (REFERENCE.md section 5).
    """
    return f"{_safe_name(stem)}-{_safe_name(mesh_name)}-{_safe_name(token)}{FORMATS[fmt][0]}"


__all__ = [
    "FORMATS",
    "export_file_name",
    "export_vertices",
    "face_normals",
    "format_from_suffix",
    "mesh_to_bytes",
    "meshes_to_zip",
    "write_mesh",
]
