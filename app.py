"""TomoForge entry point: set up per-session state and route the pages. Nothing else."""

import streamlit as st

from pages.common import init_state
from pages.janitor import start_janitor

st.set_page_config(page_title="TomoForge", page_icon="🩻", layout="wide")
init_state()
start_janitor()  # once per process: shuts down sessions Streamlit forgets (pages/janitor.py)

navigation = st.navigation(
    [
        st.Page("pages/upload.py", title="Open", icon=":material/upload_file:", default=True),
        st.Page("pages/viewer.py", title="View", icon=":material/visibility:"),
        st.Page("pages/headers.py", title="Headers", icon=":material/list_alt:"),
        st.Page("pages/convert.py", title="Convert", icon=":material/swap_horiz:"),
        st.Page("pages/mesh.py", title="Mesh", icon=":material/deployed_code:"),
    ]
)
navigation.run()
