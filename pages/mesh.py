"""Mesh page: threshold or label map -> clean-up -> surface -> smoothing/decimation -> figures, 3D preview, export.

The work is done by :func:`core.mesh.build_meshes` from a plain
:class:`core.mesh.MeshRequest`, in a worker process (:mod:`core.worker`): seconds
of CPU in the server process would stall every user's session, and a crash in VTK
ends the worker, not the server. The page only collects the request, keeps the
last result in the session and shows it. The threshold overlay on the slice is
live (it costs one slice); the 3D surface is built when asked.

Stable element labels (used by tests): button ``"Build mesh"``; preset
selectbox key ``"mesh_preset"``; number inputs keys ``"mesh_lower"`` and
``"mesh_upper"``; mode radio key ``"mesh_mode"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from core import names
from core.errors import CoreError
from core.mask import (
    CT_PRESETS,
    LABEL_SCHEMES,
    MaskCleanup,
    guess_label_scheme,
    is_label_map,
    label_counts,
    label_name,
    otsu_threshold,
    preset_by_name,
)
from core.mesh import (
    DEFAULT_MESH_LIMITS,
    MeshRequest,
    MeshResult,
    build_meshes_and_preview,
    preview_figure,
    volume_frame,
)
from core.mesh_export import FORMATS, export_file_name, mesh_to_bytes, meshes_to_zip
from core.render import LabelOverlay, ThresholdOverlay, render_view, view_geometry
from core.windowing import default_window
from core.worker import run_in_worker
from pages.common import UPLOAD_KEY, download_token, plain, require_volume, show_error, show_warning

RESULT = "mesh_result"  # {"key": request token, "result": MeshResult, "preview": figure}
LABELS = "mesh_label_counts"  # {"key": (series id, frame), "counts": {label: voxels}}
PRESET_NOTE = "mesh_preset_note"  # why a preset could not be applied (e.g. Otsu on a constant image)
OTSU, CUSTOM = "Otsu (automatic)", "Custom"

series, volume = require_volume()
info = series.info
st.title("Mesh")
st.caption(
    "Threshold a scan (or take labels of a segmentation), clean the mask and get a printable surface in "
    "scanner millimetres: STL, OBJ or PLY, in LPS (what 3D Slicer assumes) or RAS."
)
if volume.is_rgb:
    show_error(
        f"{info.description or info.id} is an RGB colour image; meshing needs a scalar volume (CT, MR or a label map)."
    )
    st.stop()

frame = 0
if volume.n_frames > 1:
    frame = st.slider("Time point", 0, volume.n_frames - 1, 0, key="mesh_frame")
values = volume_frame(volume, frame)
is_ct = volume.modality.upper() == "CT" or volume.unit == "HU"
unit = volume.unit or "value"


def short_figure(value: float) -> str:
    """1761.17 -> "1,761", 190.71 -> "190.7", 0.04321 -> "0.04321"."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _lowest_value(array: np.ndarray) -> float:
    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
    return float(finite.min()) if finite.size else 0.0


def _set_preset() -> None:
    choice = st.session_state["mesh_preset"]
    st.session_state.pop(PRESET_NOTE, None)
    if choice == OTSU:
        try:
            otsu = round(otsu_threshold(values), 1)
        except CoreError as err:
            # A constant image has nothing to separate: keep a threshold the user can edit.
            st.session_state["mesh_preset"] = CUSTOM
            st.session_state[PRESET_NOTE] = (
                f"Otsu's method found no threshold ({err.message}). Set the thresholds by hand."
            )
            st.session_state.setdefault("mesh_lower", round(_lowest_value(values), 1))
            return
        st.session_state["mesh_lower"] = otsu
        st.session_state["mesh_use_upper"] = False
    elif choice != CUSTOM:
        preset = preset_by_name(choice)
        st.session_state["mesh_lower"] = float(preset.lower)
        st.session_state["mesh_use_upper"] = preset.upper is not None
        if preset.upper is not None:
            st.session_state["mesh_upper"] = float(preset.upper)
        st.session_state["mesh_drop_border"] = preset.drop_border_components


def _to_custom() -> None:
    # Edited by hand: the preset's name and source no longer describe the values.
    st.session_state["mesh_preset"] = CUSTOM


modes = ["Threshold", "Label map"]
st.session_state.setdefault("mesh_mode", "Label map" if is_label_map(volume) else "Threshold")
mode = st.radio("Build from", modes, horizontal=True, key="mesh_mode")

settings, view = st.columns([1, 1], gap="large")
with settings:
    lower = upper = None
    chosen_labels: tuple[int, ...] | None = None
    scheme = "numbers"
    if mode == "Threshold":
        presets = ([p.name for p in CT_PRESETS] if is_ct else []) + [OTSU, CUSTOM]
        if "mesh_lower" not in st.session_state:  # first visit: bone on CT, Otsu otherwise
            st.session_state["mesh_preset"] = presets[0]
            _set_preset()
        st.selectbox("Preset", presets, key="mesh_preset", on_change=_set_preset)
        preset_name = st.session_state["mesh_preset"]
        if st.session_state.get(PRESET_NOTE):
            show_warning(st.session_state[PRESET_NOTE])
        if preset_name not in (OTSU, CUSTOM):
            st.caption(f"Source: {plain(preset_by_name(preset_name).source)}")
        elif preset_name == OTSU:
            st.caption(
                "Otsu's method on the histogram (skimage.filters.threshold_otsu); on CT it separates air from the body."
            )
        low_col, high_col = st.columns(2)
        with low_col:
            lower = st.number_input(
                f"Lower threshold ({unit})", key="mesh_lower", step=10.0, format="%g", on_change=_to_custom
            )
        with high_col:
            use_upper = st.checkbox("Upper bound", key="mesh_use_upper")
            if use_upper:
                st.session_state.setdefault("mesh_upper", float(lower) + 1000.0)
                upper = st.number_input(
                    f"Upper threshold ({unit})", key="mesh_upper", step=10.0, format="%g", on_change=_to_custom
                )
        if upper is not None and upper < lower:
            show_error(f"The upper threshold {upper:g} is below the lower threshold {lower:g}.")
            st.stop()
    else:
        stored = st.session_state.get(LABELS)
        if stored is None or stored["key"] != (info.id, frame):
            try:
                counts = label_counts(values)
            except ValueError as err:
                show_error(f"{info.description or info.id} is not a label map: {err}. Use a threshold instead.")
                st.stop()
            st.session_state[LABELS] = stored = {"key": (info.id, frame), "counts": counts}
        counts = stored["counts"]
        if not counts:
            show_error("This label map holds only background (0); there is nothing to mesh.")
            st.stop()
        schemes = list(LABEL_SCHEMES)
        scheme = st.selectbox(
            "Label names",
            schemes,
            index=schemes.index(guess_label_scheme(counts)),
            key="mesh_scheme",
            help="TotalSegmentator ids (task total, v2) or plain numbers.",
        )
        by_size = sorted(counts, key=counts.__getitem__, reverse=True)
        default = sorted(by_size if len(by_size) <= 20 else by_size[:10])
        voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        chosen = st.multiselect(
            "Labels (one mesh each)",
            sorted(counts),
            default=default,
            format_func=lambda v: f"{label_name(v, scheme)} ({counts[v] * voxel_ml:.1f} mL)",
            key="mesh_labels",
        )
        chosen_labels = tuple(int(v) for v in chosen)

    with st.expander("Clean-up", expanded=mode == "Threshold"):
        keep = st.number_input(
            "Keep the N largest components (0 = all)",
            0,
            1000,
            0,
            key="mesh_keep",
            help="Components are 6-connected (voxels sharing a face), as the surface sees them.",
        )
        islands = st.number_input("Remove islands smaller than (mL)", 0.0, 10000.0, 0.0, step=0.1, key="mesh_islands")
        fill = st.checkbox("Fill enclosed cavities", key="mesh_fill", help="e.g. the marrow inside a bone")
        closing = st.number_input(
            "Closing radius (mm)",
            0.0,
            50.0,
            0.0,
            step=0.5,
            key="mesh_closing",
            help="Bridges gaps up to about twice the radius; round in mm on anisotropic voxels.",
        )
        drop_border = st.checkbox(
            "Drop components touching the volume border",
            key="mesh_drop_border",
            help="Removes the air around the patient (lung preset).",
        )
        use_crop = st.checkbox("Crop box", key="mesh_use_crop")
        crop: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
        if use_crop:
            ranges: list[tuple[int, int]] = []
            # After RAS reorientation i grows to the patient's right, j anterior, k superior.
            for axis, (name, direction) in enumerate(
                (("i", "left → right"), ("j", "posterior → anterior"), ("k", "inferior → superior"))
            ):
                size = volume.spatial_shape[axis]
                span = st.slider(f"{name} range (voxels, {direction})", 0, size, (0, size), key=f"mesh_crop_{name}")
                ranges.append((int(span[0]), int(span[1])))
            crop = (ranges[0], ranges[1], ranges[2])
    with st.expander("Surface"):
        smooth = st.slider(
            "Smoothing iterations (windowed sinc, volume-preserving; 0 = off)", 0, 50, 0, key="mesh_smooth"
        )
        decimate = st.radio(
            "Decimation", ["Off", "Keep a fraction", "Target triangles"], horizontal=True, key="mesh_decimate"
        )
        fraction = target = None
        if decimate == "Keep a fraction":
            fraction = st.slider("Fraction of triangles to keep", 0.01, 1.0, 0.25, key="mesh_fraction")
        elif decimate == "Target triangles":
            target = int(
                st.number_input("Triangles per mesh", 1000, 50_000_000, 200_000, step=10_000, key="mesh_target")
            )
        downsample_factor = st.number_input(
            "Downsample (use every n-th voxel)",
            1,
            8,
            1,
            key="mesh_downsample",
            help="For very large volumes; 2 makes ~4x fewer triangles.",
        )
        cap = st.checkbox(
            "Close the surface at the volume border",
            True,
            key="mesh_cap",
            help="A cut-off bone becomes a closed, printable solid.",
        )

with view:
    k_count = volume.spatial_shape[2]
    k = 0
    if k_count > 1:  # a slider needs two positions: a 2D image has one slice
        k = st.slider("Axial slice", 0, k_count - 1, (k_count - 1) // 2, key="mesh_slice")
    else:
        st.caption("A single slice (2D image).")
    window = default_window(volume)
    try:
        if mode == "Threshold":
            assert lower is not None
            overlay = ThresholdOverlay(float(lower), float(upper) if upper is not None else float("inf"))
            image = render_view(volume, "axial", k, window, frame=frame, overlays=[overlay])
            shown = f"Red: {lower:g} ≤ value{'' if upper is None else f' ≤ {upper:g}'} (before clean-up)"
        else:
            image = render_view(volume, "axial", k, window, frame=frame, overlays=[LabelOverlay(volume, 0.5)])
            shown = "Labels"
        letters = view_geometry(volume, "axial").letters  # the View page's default, radiological
        st.image(image, caption=f"{shown} · {letters['left']} left, {letters['top']} up", width="stretch")
    except CoreError as err:
        show_error(err.message)

cleanup = MaskCleanup(
    crop_box=crop,
    closing_mm=float(closing),
    drop_border_components=bool(drop_border),
    min_island_ml=float(islands),
    keep_largest=int(keep),
    fill_cavities=bool(fill),
)
request = MeshRequest(
    lower=None if lower is None else float(lower),
    upper=None if upper is None else float(upper),
    labels=chosen_labels,
    label_scheme=scheme,
    cleanup=cleanup,
    cap_borders=bool(cap),
    downsample=int(downsample_factor),
    frame=int(frame),
    smooth_iterations=int(smooth),
    keep_fraction=fraction,
    target_triangles=target,
)
# The upload's identity too: series ids repeat across uploads ("1", a file stem).
token = names.token(st.session_state.get(UPLOAD_KEY), info.id, request)

if mode == "Label map" and not chosen_labels:
    st.info("Choose at least one label.")
    st.stop()

if st.button("Build mesh", type="primary", icon=":material/deployed_code:"):
    try:
        with st.spinner("Building the surface (in a worker process)..."):
            built, shown_meshes = run_in_worker(
                build_meshes_and_preview, volume, request, what=f"mesh of {info.description or info.id}"
            )
            preview = preview_figure(shown_meshes)
        st.session_state[RESULT] = {"key": token, "result": built, "preview": preview}
    except CoreError as err:
        st.session_state.pop(RESULT, None)
        show_error(err.message)

stored = st.session_state.get(RESULT)
if stored is None:
    st.stop()
if stored["key"] != token:
    st.info("The settings changed since the last mesh; press **Build mesh** to update it.")
result: MeshResult = stored["result"]

for warning in result.warnings:
    show_warning(warning)

rows: list[dict[str, Any]] = []
for mesh, fig in zip(result.meshes, result.figures, strict=True):
    low, high = fig.bounds_in("LPS")
    rows.append(
        {
            "mesh": mesh.name,
            "triangles": fig.triangles,
            "vertices": fig.vertices,
            "volume (mL)": round(fig.volume_ml, 2),
            "area (cm²)": round(fig.area_cm2, 2),
            "size x·y·z (mm)": " × ".join(f"{h - lo:.1f}" for lo, h in zip(low, high, strict=True)),
            "pieces": fig.components,
            "watertight": "yes" if fig.watertight else "no",
            "manifold": "yes" if fig.manifold else "no",
        }
    )
if len(rows) == 1:
    row = rows[0]
    cols = st.columns(6)
    # Metrics are narrow: four significant digits fit with the unit; the table has the full figures.
    cols[0].metric("Triangles", f"{row['triangles']:,}")
    cols[1].metric("Volume", f"{short_figure(row['volume (mL)'])} mL")
    cols[2].metric("Area", f"{short_figure(row['area (cm²)'])} cm²")
    cols[3].metric("Pieces", row["pieces"])
    cols[4].metric("Watertight", row["watertight"])
    cols[5].metric("Manifold", row["manifold"])
    st.caption(f"Size (x·y·z): {row['size x·y·z (mm)']} mm. Vertices: {row['vertices']:,}.")
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
st.caption(" · ".join(f"{step} {seconds:.2f} s" for step, seconds in result.timings_s.items()))

shown = sum(m.n_triangles for m in result.meshes)
if shown > DEFAULT_MESH_LIMITS.preview_triangles:
    st.caption(
        f"Preview decimated to about {DEFAULT_MESH_LIMITS.preview_triangles:,} of {shown:,} triangles; "
        "the download is the full mesh."
    )
st.plotly_chart(stored["preview"], key="mesh_preview", config={"displaylogo": False})

st.subheader("Download")
fmt_col, space_col, scale_col = st.columns(3)
with fmt_col:
    fmt = st.selectbox("Format", list(FORMATS), format_func=lambda f: FORMATS[f][1], key="mesh_format")
with space_col:
    space = st.radio(
        "Coordinates",
        ["LPS", "RAS"],
        horizontal=True,
        key="mesh_space",
        help="LPS: what 3D Slicer and DICOM use (Slicer assumes it for model files). RAS: NIfTI's.",
    )
with scale_col:
    scale = st.number_input("Scale", 0.01, 100.0, 1.0, step=0.1, key="mesh_scale", help="1 = real size in mm.")
meshes = result.meshes
stem = "tomoforge"
# Streamlit serves downloads by a digest of size and samples: equal names across sessions could
# hand one user another's mesh, so a per-session salt goes into every name (as on the View page).
file_token = download_token(stored["key"], fmt, space, scale)


def _file() -> bytes:
    if len(meshes) == 1:
        return mesh_to_bytes(meshes[0], fmt, space=space, scale=scale)
    return meshes_to_zip(meshes, fmt, space=space, scale=scale, stem=stem)


if len(meshes) == 1:
    file_name = export_file_name(stem, meshes[0].name, fmt, file_token)
    label = f"Download {FORMATS[fmt][1]}"
    mime = "application/octet-stream"
else:
    file_name = f"{stem}-{len(meshes)}-meshes-{file_token}.zip"
    label = f"Download {len(meshes)} meshes ({FORMATS[fmt][1]}, zip)"
    mime = "application/zip"
st.download_button(
    label,
    data=_file,
    file_name=file_name,
    mime=mime,
    on_click="ignore",
    icon=":material/download:",
    type="primary",
    key="mesh_download",
)
st.caption(
    f"Coordinates in {space} mm{'' if scale == 1 else f' × {scale:g}'}; the file header says SPACE={space}. "
    "File names carry no patient data."
)
