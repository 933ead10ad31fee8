"""Open page (home): upload files, folders or zips, or open the sample; choose the current series."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.io import scan
from core.sample import sample_series
from core.series import ScanResult
from core.sources import Source
from pages.common import CURRENT, current_scan, plain, prefetch_current, set_scan, show_error

st.title("TomoForge")
st.caption(
    "Open medical scans in the browser: DICOM (files, folders, zips, compressed), NIfTI, NRRD, "
    "MetaImage, Analyze, PNG/JPEG/TIFF. Files stay in this session's memory and are never stored."
)

files_column, folder_column = st.columns(2)
with files_column:
    files = st.file_uploader(
        "Files or zips",
        accept_multiple_files=True,
        type=None,  # DICOM files often have no extension
        key="upload_files",
        help="Any number of DICOM files, zips of folders, NIfTI, NRRD, MHA/MHD (+ raw), Analyze .hdr/.img, images.",
    )
with folder_column:
    folder = st.file_uploader(
        "A whole folder",
        accept_multiple_files="directory",
        key="upload_folder",
        help="Every file in the folder and its subfolders is read; series are found by their headers.",
    )

uploaded = list(files or []) + list(folder or [])
if uploaded:
    key = "upload:" + ",".join(sorted(f.file_id for f in uploaded))
    # Compare with the last upload seen, not the current scan: after "Open sample scan" the
    # files still sit in the uploader and must not replace the sample on the next rerun.
    if st.session_state.get("upload_seen") != key:
        st.session_state["upload_seen"] = key
        bar = st.progress(0.0, text="Reading files...")
        sources = [Source(name=f.name, data=f.getvalue()) for f in uploaded]
        result = scan(sources, progress=lambda fraction, text: bar.progress(fraction, text=plain(text)))
        bar.empty()
        set_scan(result, key, sources=sources)

if st.button("Open sample scan", icon=":material/science:", type="primary" if not uploaded else "secondary"):
    set_scan(ScanResult(series=[sample_series()]), "sample")

result = current_scan()
if result is None:
    st.info("Upload files above, or press **Open sample scan** to try the app with a synthetic CT.")
    st.stop()

# A refused series yields one problem per file with the same message: show it once.
messages: dict[str, int] = {}
for problem in result.errors:
    messages[problem.message] = messages.get(problem.message, 0) + 1
for message, count in messages.items():
    show_error(message if count == 1 else f"{message} ({count} files)")

if not result.series:
    st.warning("Nothing in this upload could be opened as an image. See the messages above.")
    st.stop()

rows = []
for item in result.series:
    info = item.info
    rows.append(
        {
            "id": info.id,
            "description": info.description,
            "modality": info.modality,
            "dimensions": " x ".join(str(n) for n in info.shape),
            "voxel size (mm)": " x ".join(f"{s:.3g}" for s in info.spacing_mm),
            "MB": round(info.nbytes / 1e6, 1),
            "files": len(info.sources),
            "warnings": "; ".join(info.warnings),
        }
    )
st.subheader(f"{len(rows)} series found")
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

ids = [item.info.id for item in result.series]
labels = {item.info.id: f"{item.info.id}: {item.info.description or item.info.kind}" for item in result.series}
if st.session_state.get(CURRENT) not in ids:
    st.session_state[CURRENT] = ids[0]


def _choose() -> None:
    # The widget's own key is dropped when another page runs; CURRENT must survive page changes.
    st.session_state[CURRENT] = st.session_state["series_choice"]
    prefetch_current()


st.selectbox(
    "Current series (used by every page)",
    ids,
    index=ids.index(st.session_state[CURRENT]),
    format_func=labels.__getitem__,
    key="series_choice",
    on_change=_choose,
)

for item in result.series:
    if item.info.id == st.session_state[CURRENT]:
        for warning in item.info.warnings:
            st.warning(plain(warning), icon=":material/warning:")

if result.skipped:
    with st.expander(f"{len(result.skipped)} files left out of every volume"):
        st.dataframe(
            pd.DataFrame([{"file": s.source, "reason": s.reason} for s in result.skipped]),
            hide_index=True,
            width="stretch",
        )
