"""Convert page: the geometry QA of the current series, then NIfTI, DICOM, NRRD or MetaImage downloads.

Conversions run in a worker process (:mod:`core.worker`): encoding is seconds of CPU
that would stall every user's session in the server process, and converting every
series decodes untrusted files, which may crash a decoding library. The server only
reads the headers (the geometry check) and sends the worker the decoded volume, or
for a batch the uploaded files to read again.
"""

from __future__ import annotations

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.convert import (
    Conversion,
    ConvertOptions,
    convert_batch,
    convert_batch_in_worker,
    convert_series_in_worker,
    detach_header,
    output_stem,
)
from core.dicom_export import read_reference
from core.errors import CoreError
from core.names import with_token
from core.qa import QAReport, qa_report
from core.worker import run_in_worker
from pages.common import SOURCES, current_scan, download_token, plain, require_volume, show_error, show_warning

RESULT = "convert_result"  # {"key": ..., "conversion": Conversion, "file": (name, data), "file_name": str}
BATCH = "convert_batch"  # {"key": ..., "result": BatchResult, "file_name": str}
REFERENCE = "convert_reference"  # {"key": upload id, "reference": Dataset | None, "error": str}

FORMATS = {
    "NIfTI (.nii.gz)": ("nifti", True),
    "NIfTI (.nii)": ("nifti", False),
    "DICOM series (.zip)": ("dicom", True),
    "NRRD (.nrrd)": ("nrrd", True),
    "MetaImage (.mha)": ("mha", True),
}

st.title("Convert")
series, volume = require_volume()
info = series.info
st.caption(f"Series {plain(info.id)}: {plain(info.description or info.kind)}")


def _positions_figure(report: QAReport) -> go.Figure:
    positions = report.positions_mm
    steps = [0.0] + [b - a for a, b in zip(positions, positions[1:], strict=False)]
    figure = go.Figure(
        go.Scatter(
            x=list(range(1, len(positions) + 1)),
            y=positions,
            mode="lines+markers",
            customdata=steps,
            hovertemplate="slice %{x}<br>%{y:.3f} mm<br>step %{customdata:.3f} mm<extra></extra>",
        )
    )
    figure.update_layout(
        xaxis_title="slice",
        yaxis_title="position along the slice normal (mm)",
        height=300,
        margin={"l": 10, "r": 10, "t": 10, "b": 10},
    )
    return figure


# --- QA ----------------------------------------------------------------------
st.subheader("Geometry check")
try:
    report = qa_report(series)
except CoreError as err:
    show_error(err.message)
    st.stop()

columns = st.columns(5)
columns[0].metric("Slices", report.n_slices, help=f"{report.n_images} images")
columns[1].metric("Median spacing", f"{report.spacing_median_mm:.4g} mm")
columns[2].metric("Spacing min / max", f"{report.spacing_min_mm:.4g} / {report.spacing_max_mm:.4g} mm")
columns[3].metric("Spacing variation", f"{report.spacing_variation:.2%}")
columns[4].metric("Tilt", f"{report.tilt_deg:.2f}°")
if report.note:
    st.caption(f"Geometry from the volume's affine: {plain(report.note)}.")
st.dataframe(
    pd.DataFrame(
        [
            {"check": check.label, "result": "passed" if check.passed else "FAILED", "detail": check.detail}
            for check in report.checks
        ]
    ),
    hide_index=True,
    width="stretch",
)
if report.n_slices > 1:
    st.plotly_chart(_positions_figure(report), key="qa_positions")
stem = output_stem(series)
report_json = json.dumps(report.to_json(), indent=2).encode("utf-8")
st.download_button(
    "Download QA report (JSON)",
    data=report_json,
    file_name=with_token(f"{stem}_qa.json", download_token(report_json)),
    mime="application/json",
    icon=":material/download:",
)

# --- options -----------------------------------------------------------------
st.subheader("Convert this series")
choice = st.radio("Format", list(FORMATS), horizontal=True, key="convert_format")
target, compress = FORMATS[choice]
is_dicom_source = info.kind == "dicom" and bool(series.headers)
sidecar = False
if target == "nifti" and is_dicom_source:
    sidecar = st.checkbox(
        "BIDS-style JSON sidecar (acquisition parameters only, no patient data)", key="convert_sidecar"
    )
strict = st.checkbox(
    "Refuse uneven slice spacing or missing slices instead of resampling to equal spacing",
    key="convert_strict",
)
reference = None
reference_label = "none"
if target == "dicom":
    sources = ["No patient data (a new, anonymous study)"]
    if is_dicom_source:
        sources.append("Patient and study of this series")
    sources.append("Patient and study of an uploaded DICOM file")
    origin = st.radio("Patient and study attributes", sources, key="convert_reference_source")
    if origin == "Patient and study of this series":
        reference = series.headers[0]
        reference_label = f"series:{info.id}"
    elif origin == "Patient and study of an uploaded DICOM file":
        upload = st.file_uploader("Reference DICOM file", type=None, key="convert_reference_file")
        if upload is not None:
            # Parsed once per upload, in a worker like every other upload (its header is untrusted).
            cached = st.session_state.get(REFERENCE)
            if cached is None or cached["key"] != upload.file_id:
                cached = {"key": upload.file_id, "reference": None, "error": ""}
                try:
                    with st.spinner("Reading the reference file (in a worker process)..."):
                        parsed = run_in_worker(
                            read_reference, upload.getvalue(), upload.name, what=f"reference {upload.name}"
                        )
                    cached["reference"] = detach_header(parsed)
                except CoreError as err:
                    cached["error"] = err.message
                st.session_state[REFERENCE] = cached
            if cached["error"]:
                show_error(cached["error"])
            else:
                reference = cached["reference"]
                reference_label = f"file:{upload.file_id}"

options = ConvertOptions(to=target, compress=compress, sidecar=sidecar, strict=strict, reference=reference)
key = (info.id, target, compress, sidecar, strict, reference_label)

if st.button("Convert", type="primary", icon=":material/swap_horiz:"):
    try:
        with st.spinner("Converting (in a worker process)..."):
            converted, bundle = convert_series_in_worker(series, options, volume=volume, stem=stem)
        name, data = converted.outputs[0] if bundle is None else (f"{converted.stem}.zip", bundle)
        st.session_state[RESULT] = {
            "key": key,
            "conversion": converted,
            "file": (name, data),
            "file_name": with_token(name, download_token(key, name)),
        }
    except CoreError as err:
        st.session_state.pop(RESULT, None)
        show_error(err.message)

stored = st.session_state.get(RESULT)
if stored is not None and stored["key"] == key:
    conversion: Conversion = stored["conversion"]
    for warning in conversion.warnings:
        show_warning(warning)
    name, data = stored["file"]
    verified = " Read back and verified." if target == "dicom" else ""
    st.success(f"{plain(conversion.primary)}: {len(data) / 1e6:.1f} MB.{verified}", icon=":material/check_circle:")
    st.download_button(
        f"Download {name}",
        data=data,
        file_name=stored["file_name"],
        mime="application/octet-stream",
        icon=":material/download:",
        type="primary",
    )

# --- batch -------------------------------------------------------------------
scan = current_scan()
if scan is not None and len(scan.series) > 1:
    st.subheader("Every series of the upload")
    st.caption(
        f"{len(scan.series)} series, one {choice} each, named like dcm2niix (series number and description), "
        "with their QA reports, in one zip."
    )
    series_ids = [s.info.id for s in scan.series]
    batch_key = (tuple(series_ids), *key[1:])
    if st.button(f"Convert all {len(scan.series)} series", icon=":material/folder_zip:"):
        uploaded = st.session_state.get(SOURCES)
        try:
            with st.spinner(f"Converting {len(series_ids)} series (in a worker process)..."):
                if uploaded:
                    # The worker reads the files again and decodes every series: never here.
                    result = convert_batch_in_worker(uploaded, series_ids, options)
                elif all(s.info.kind == "sample" for s in scan.series):
                    result = convert_batch(scan.series, options)  # generated here, no file to decode
                else:
                    raise CoreError(
                        "The uploaded files are no longer held by this session; open them again on the "
                        "Open page to convert every series."
                    )
            st.session_state[BATCH] = {
                "key": batch_key,
                "result": result,
                "file_name": with_token("tomoforge_conversions.zip", download_token(batch_key)),
            }
        except CoreError as err:
            st.session_state.pop(BATCH, None)
            show_error(err.message)
    batch = st.session_state.get(BATCH)
    if batch is not None and batch["key"] == batch_key:
        result = batch["result"]
        for problem in result.problems:
            show_error(f"{problem.source}: {problem.message}")
        for conversion in result.conversions:
            for warning in conversion.warnings:
                show_warning(warning)
        if result.conversions:
            st.download_button(
                f"Download {len(result.conversions)} conversions (.zip)",
                data=result.data,
                file_name=batch["file_name"],
                mime="application/zip",
                icon=":material/download:",
            )
