"""Thin Streamlit pages. Logic lives in ``core``; pages lay out widgets and call it."""
