"""TomoForge entry point: set up per-session state and route the pages. Nothing else."""

from pathlib import Path

import streamlit as st

from pages.common import init_state

st.set_page_config(page_title="TomoForge", page_icon="🩻", layout="wide")
init_state()

PAGES = [
    ("pages/upload.py", "Open", ":material/upload_file:"),
    ("pages/viewer.py", "View", ":material/visibility:"),
    ("pages/headers.py", "Headers", ":material/list_alt:"),
    ("pages/convert.py", "Convert", ":material/swap_horiz:"),
    ("pages/mesh.py", "Mesh", ":material/deployed_code:"),
]
HERE = Path(__file__).parent
navigation = st.navigation(
    [
        st.Page(path, title=title, icon=icon, default=index == 0)
        for index, (path, title, icon) in enumerate(PAGES)
        if (HERE / path).exists()  # TODO(session-1): drop once every page exists
    ]
)
navigation.run()
