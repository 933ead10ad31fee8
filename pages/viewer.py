"""View page: axial, coronal and sagittal slices with window/level, readouts, overlays, slabs and export.

The views are drawn by a small Streamlit component (``st.components.v2``): the
server renders each view to a PNG with :func:`core.render.render_view`, and the
browser shows it with the crosshair, the orientation letters and a readout of
the value, RAS position and voxel under the mouse, all computed in the browser
from the slice's values (sent in a second element after every image, so images
paint first) and the affine. A click sends the pixel back and the other planes
move there; a right- or shift-drag sets window and level (previewed in the
browser); ctrl+wheel zooms and ctrl-drag pans. (A Plotly image cannot report a
click position to Streamlit, hence the component.)

Everything under the title runs in one ``st.fragment``: moving a slider or
changing the window reruns only the viewer, never the rest of the app.

Stable element labels (used by the browser test): sliders ``"Axial slice"``,
``"Coronal slice"``, ``"Sagittal slice"``; each view is an ``img`` with
``alt="Axial view"`` (etc.) inside ``.st-key-view_axial`` (etc.).
"""

from __future__ import annotations

import html
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from core import names
from core.errors import CoreError
from core.mesh import read_label_map
from core.render import (
    PLANES,
    LabelOverlay,
    Slab,
    ThresholdOverlay,
    deflate,
    encode_png,
    histogram,
    label_colors,
    linked_indices,
    n_slices,
    plane_zip,
    readout,
    render_view,
    screen_to_voxel,
    view_file_name,
    view_geometry,
    view_values,
)
from core.series import Window
from core.sources import Source
from core.volume import Volume
from core.windowing import COLORMAPS, CT_PRESETS, auto_window, colormap_lut, default_window, file_windows
from core.worker import run_in_worker
from pages.common import download_token, plain, require_volume, show_error

VIEW_HELP = (
    "Click: move the crosshair · wheel: slices · ctrl+wheel or pinch: zoom · ctrl- or middle-drag: pan"
    " · double click: reset the zoom"
)

VIEW_CSS = """
.tf-view { width: 100%; font-family: var(--st-font, sans-serif); }
/* The frame is at least as tall as it is wide (up to the height cap), so a thin slab's coronal or
   sagittal view sits in a panel like the others, with its letters and title outside the image. */
.tf-frame { position: relative; width: 100%; display: flex; justify-content: center; align-items: center;
  background: #000; border-radius: 4px; overflow: hidden; }
.tf-stage { position: relative; display: inline-block; line-height: 0; transform-origin: 0 0; }
.tf-image { display: block; cursor: crosshair; user-select: none; -webkit-user-drag: none; }
.tf-cross { position: absolute; inset: 0; width: 100%; height: 100%; pointer-events: none; }
.tf-preview { position: absolute; inset: 0; width: 100%; height: 100%; pointer-events: none;
  image-rendering: pixelated; display: none; }
.tf-cross line { stroke: rgba(255, 214, 0, 0.75); stroke-width: 1; vector-effect: non-scaling-stroke; }
.tf-letter, .tf-info { position: absolute; color: #fff; font: 600 14px/1 sans-serif;
  text-shadow: 0 0 3px #000, 0 0 2px #000; pointer-events: none; }
.tf-left { left: 4px; top: 50%; transform: translateY(-50%); }
.tf-right { right: 4px; top: 50%; transform: translateY(-50%); }
.tf-top { top: 4px; left: 50%; transform: translateX(-50%); }
.tf-bottom { bottom: 4px; left: 50%; transform: translateX(-50%); }
.tf-info { left: 4px; top: 4px; font-weight: 400; font-size: 12px; }
.tf-readout { min-height: 1.4em; margin-top: 4px; font: 13px/1.4 monospace; color: var(--st-text-color, inherit); }
"""

# The browser side of a view. Called again with new data on every rerun; it keeps its DOM and
# the decoded slice values on the root element and only swaps what changed.
VIEW_JS = r"""
const TYPES = { int8: Int8Array, uint8: Uint8Array, int16: Int16Array, uint16: Uint16Array,
  int32: Int32Array, uint32: Uint32Array, float32: Float32Array, float64: Float64Array };

function fmt(value) {
  if (Number.isInteger(value)) return String(value);
  const text = Number(value).toPrecision(5);
  return text.includes("e") ? text : String(Number(text));
}

function pixelAt(root, event) {
  const s = root._state, img = root._img;
  const rect = img.getBoundingClientRect();
  const col = Math.min(s.width - 1e-6, Math.max(0, (event.clientX - rect.left) / rect.width * s.width));
  const row = Math.min(s.height - 1e-6, Math.max(0, (event.clientY - rect.top) / rect.height * s.height));
  return { col, row };
}

function describe(root, p) {
  const s = root._state;
  const c = Math.floor(p.col), r = Math.floor(p.row);
  const nc = s.colSrc[c], nr = s.rowSrc[r];
  const ijk = [0, 0, 0];
  ijk[s.sliceAxis] = s.index;
  ijk[s.colAxis] = s.colDesc ? s.nCols - 1 - nc : nc;
  ijk[s.rowAxis] = s.rowDesc ? s.nRows - 1 - nr : nr;
  const a = s.affine;
  const ras = [0, 1, 2].map((d) => a[d][0] * ijk[0] + a[d][1] * ijk[1] + a[d][2] * ijk[2] + a[d][3]);
  let value = "";
  const v = root._values;
  if (v && root._valuesKey === (s.values && s.values.key)) {
    const at = nr * s.nCols + nc;
    value = s.rgb ? "RGB (" + [0, 1, 2].map((ch) => fmt(v[at * 3 + ch])).join(", ") + ")"
                  : fmt(v[at]) + (s.unit ? " " + s.unit : "");
    value += " · ";
  }
  return value + "RAS (" + ras.map((x) => x.toFixed(1)).join(", ") + ") mm · voxel (" + ijk.join(", ") + ")";
}

// Window/level by dragging (right button, or shift + left): right widens the window, down
// raises the center, as in OsiriX and ImageJ. While the mouse moves, the slice's own values are
// windowed here (the same DICOM LINEAR arithmetic as core/windowing.py, then the colour map;
// overlays are left out); on release the new window goes to the server, which renders every
// view with it.
function dragWindow(start, dx, dy) {
  const width = Math.max(start.width * Math.pow(2, dx / 200), 1e-6);
  return { center: start.center + dy * start.width / 200, width };
}

function grey(x, c, w) {
  let y;
  if (w >= 1) {
    if (x <= c - 0.5 - (w - 1) / 2) y = 0;
    else if (x > c - 0.5 + (w - 1) / 2) y = 255;
    else y = w > 1 ? ((x - (c - 0.5)) / (w - 1) + 0.5) * 255 : 255;
  } else {
    y = Math.min(255, Math.max(0, (x - (c - w / 2)) / w * 255));
  }
  return Number.isNaN(x) ? 0 : Math.floor(y + 0.5);
}

function drawPreview(root) {
  root._previewPending = false;
  const s = root._state, v = root._values, win = root._dragWindow;
  if (!s || !v || !win) return;
  const canvas = root.querySelector(".tf-preview");
  if (canvas.width !== s.width || canvas.height !== s.height) { canvas.width = s.width; canvas.height = s.height; }
  const context = canvas.getContext("2d");
  const image = context.createImageData(s.width, s.height);
  const out = image.data, colors = s.colors;
  for (let r = 0; r < s.height; r++) {
    const base = s.rowSrc[r] * s.nCols;
    for (let c = 0; c < s.width; c++) {
      let g = grey(v[base + s.colSrc[c]], win.center, win.width);
      if (s.inverted) g = 255 - g;
      const at = (r * s.width + c) * 4;
      if (colors) { out[at] = colors[g * 3]; out[at + 1] = colors[g * 3 + 1]; out[at + 2] = colors[g * 3 + 2]; }
      else { out[at] = g; out[at + 1] = g; out[at + 2] = g; }
      out[at + 3] = 255;
    }
  }
  context.putImageData(image, 0, 0);
  canvas.style.display = "block";
}

// Zoom (ctrl + wheel, or a pinch) about the pointer and pan (ctrl-drag or middle-drag) move the
// image inside its panel with a CSS transform; readouts and clicks keep working because they
// measure the image where it is drawn. A double click, or another series, resets both.
function applyZoom(root) {
  const z = root._zoom;
  root.querySelector(".tf-stage").style.transform = "translate(" + z.x + "px, " + z.y + "px) scale(" + z.scale + ")";
}

function zoomAt(root, clientX, clientY, factor) {
  const z = root._zoom, rect = root.querySelector(".tf-stage").getBoundingClientRect();
  const scale = Math.min(16, Math.max(1, z.scale * factor));
  if (scale === 1) { root._zoom = { scale: 1, x: 0, y: 0 }; applyZoom(root); return; }
  // Keep the point under the pointer where it is: x' = x + u (s - s'), u in unscaled stage pixels.
  const u = (clientX - rect.left) / z.scale, v = (clientY - rect.top) / z.scale;
  root._zoom = { scale, x: z.x + u * (z.scale - scale), y: z.y + v * (z.scale - scale) };
  applyZoom(root);
}

function windowText(win) {
  return "Window: center " + fmt(Number(win.center.toPrecision(6))) + ", width " + fmt(Number(win.width.toPrecision(6)));
}

// Values travel byte-shuffled (all first bytes, then all second bytes, ...), which deflates
// better; put the bytes of each value back together before viewing them as numbers.
function unshuffle(bytes, size) {
  if (size === 1) return bytes.buffer;
  const n = bytes.length / size, out = new Uint8Array(bytes.length);
  for (let b = 0; b < size; b++) {
    const plane = bytes.subarray(b * n, (b + 1) * n);
    for (let i = 0; i < n; i++) out[i * size + b] = plane[i];
  }
  return out.buffer;
}

// A view's values come in a separate element after all the images (VALUES_JS), so a slow link
// paints the image first; they wait in window.__tomoforgeValues until their view asks.
async function loadValues(root) {
  const s = root._state;
  if (!s || !s.values) { if (root) { root._values = null; root._valuesKey = null; } return; }
  const key = s.values.key;
  const packed = (window.__tomoforgeValues || {})[key];
  if (!packed || root._valuesKey === key || root._loadingKey === key) return;
  root._loadingKey = key;
  const stream = new Blob([packed]).stream().pipeThrough(new DecompressionStream("deflate"));
  const buffer = await new Response(stream).arrayBuffer();
  if (!root._state.values || root._state.values.key !== key) return;  // a newer slice arrived meanwhile
  const type = TYPES[s.values.dtype];
  root._values = new type(unshuffle(new Uint8Array(buffer), type.BYTES_PER_ELEMENT));
  root._valuesKey = key;
}

// The payload is binary: "TFV1", a uint32 (little-endian) header length, the JSON header,
// then the PNG. Binary data skips base64 and JSON on both ends.
function unpack(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const length = view.getUint32(4, true);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + length)));
  header.png = bytes.subarray(8 + length, 8 + length + header.pngBytes);
  return header;
}

function layout(root) {
  const s = root._state, img = root._img;
  const available = Math.max(50, root.clientWidth);
  const tallest = Math.max(120, window.innerHeight * s.maxHeight);
  const scale = Math.min(available / s.width, tallest / s.height);
  const height = Math.round(s.height * scale);
  img.style.width = Math.round(s.width * scale) + "px";
  img.style.height = height + "px";
  // At least square (up to the cap), and as tall as the tallest view beside it (same column width).
  let panel = Math.max(height, Math.round(Math.min(available, tallest)));
  for (const ratio of s.panelRatios || []) panel = Math.max(panel, Math.round(Math.min(available * ratio, tallest)));
  root.querySelector(".tf-frame").style.height = panel + "px";
}

// The crosshair is the voxel of the shared cursor (window.__tomoforgeCursor, set by the
// cursor component). Keeping it out of each view's data lets Streamlit send an unchanged
// view as a cache reference instead of the image again.
function drawCross(root) {
  const s = root._state, cursor = window.__tomoforgeCursor;
  const svg = root.querySelector(".tf-cross");
  const show = !!(s && cursor && cursor.show && cursor.series === s.series);
  svg.style.display = show ? "" : "none";
  if (!show) return;
  svg.setAttribute("viewBox", "0 0 " + s.width + " " + s.height);
  let nc = cursor.ijk[s.colAxis], nr = cursor.ijk[s.rowAxis];
  if (s.colDesc) nc = s.nCols - 1 - nc;
  if (s.rowDesc) nr = s.nRows - 1 - nr;
  const col = (nc + 0.5) * s.width / s.nCols, row = (nr + 0.5) * s.height / s.nRows;
  const h = root.querySelector(".tf-h"), v = root.querySelector(".tf-v");
  for (const [el, x1, y1, x2, y2] of [[h, 0, row, s.width, row], [v, col, 0, col, s.height]]) {
    el.setAttribute("x1", x1); el.setAttribute("y1", y1); el.setAttribute("x2", x2); el.setAttribute("y2", y2);
  }
}

export default function (component) {
  const { data, parentElement, setTriggerValue } = component;
  let root = parentElement.querySelector(".tf-view");
  if (!root) {
    root = document.createElement("div");
    root.className = "tf-view";
    root.innerHTML = '<div class="tf-frame"><div class="tf-stage">' +
      '<img class="tf-image" draggable="false"><canvas class="tf-preview"></canvas>' +
      '<svg class="tf-cross" preserveAspectRatio="none"><line class="tf-h"/><line class="tf-v"/></svg></div>' +
      '<span class="tf-letter tf-left"></span><span class="tf-letter tf-right"></span>' +
      '<span class="tf-letter tf-top"></span><span class="tf-letter tf-bottom"></span>' +
      '<span class="tf-info"></span></div><div class="tf-readout" aria-live="polite"></div>';
    parentElement.appendChild(root);
    root._img = root.querySelector(".tf-image");
    const readoutEl = root.querySelector(".tf-readout");
    root._img.addEventListener("mousemove", (event) => {
      if (root._state && !root._drag) readoutEl.textContent = describe(root, pixelAt(root, event));
    });
    root._img.addEventListener("mouseleave", () => { readoutEl.textContent = root._state ? root._state.idle : ""; });
    root._img.addEventListener("click", (event) => {
      if (!root._state) return;
      if (root._dragged) { root._dragged = false; return; }  // the end of a drag (window or pan), not a click
      const p = pixelAt(root, event);
      root._setTrigger("click", { col: p.col, row: p.row });
    });
    root._img.addEventListener("contextmenu", (event) => event.preventDefault());
    root._img.addEventListener("mousedown", (event) => { if (event.button === 1) event.preventDefault(); });  // no autoscroll
    root._zoom = { scale: 1, x: 0, y: 0 };
    root._img.addEventListener("dblclick", () => { root._zoom = { scale: 1, x: 0, y: 0 }; applyZoom(root); });
    root._img.addEventListener("pointerdown", (event) => {
      const s = root._state;
      if (!s) return;
      const pan = event.button === 1 || (event.button === 0 && (event.ctrlKey || event.metaKey));
      const level = !pan && !!s.window && (event.button === 2 || (event.button === 0 && event.shiftKey));
      if (!pan && !level) return;
      event.preventDefault();
      root._img.setPointerCapture(event.pointerId);
      const start = pan ? { ...root._zoom } : s.window;
      root._drag = { kind: pan ? "pan" : "window", x: event.clientX, y: event.clientY, start, moved: false };
    });
    root._img.addEventListener("pointermove", (event) => {
      const drag = root._drag;
      if (!drag) return;
      const dx = event.clientX - drag.x, dy = event.clientY - drag.y;
      if (!drag.moved && Math.abs(dx) + Math.abs(dy) < 3) return;
      drag.moved = true;
      if (drag.kind === "pan") {
        if (drag.start.scale > 1) { root._zoom = { ...drag.start, x: drag.start.x + dx, y: drag.start.y + dy }; applyZoom(root); }
        return;
      }
      root._dragWindow = dragWindow(drag.start, dx, dy);
      readoutEl.textContent = windowText(root._dragWindow);
      if (!root._previewPending) { root._previewPending = true; requestAnimationFrame(() => drawPreview(root)); }
    });
    const endDrag = (event) => {
      const drag = root._drag;
      if (!drag) return;
      root._drag = null;
      if (root._img.hasPointerCapture(event.pointerId)) root._img.releasePointerCapture(event.pointerId);
      if (drag.kind === "pan") { root._dragged = event.button === 0; return; }
      if (!drag.moved || !root._dragWindow) return;
      root._dragged = event.button === 0;  // a left-button drag ends in a click event
      root._setTrigger("window", root._dragWindow);  // the preview stays until the new image arrives
    };
    root._img.addEventListener("pointerup", endDrag);
    root._img.addEventListener("pointercancel", endDrag);
    // Mouse wheel over the image steps through slices (one rerun per notch, at most every 60 ms).
    root._img.addEventListener("wheel", (event) => {
      if (!root._state) return;
      event.preventDefault();
      if (event.ctrlKey || event.metaKey) { zoomAt(root, event.clientX, event.clientY, Math.pow(1.0015, -event.deltaY)); return; }
      const now = performance.now();
      if (root._lastWheel && now - root._lastWheel < 60) return;
      root._lastWheel = now;
      root._setTrigger("scroll", { step: event.deltaY > 0 ? -1 : 1 });
    }, { passive: false });
    root._onCursor = () => drawCross(root);
    root._onValues = () => loadValues(root);
    root._resize = new ResizeObserver(() => { if (root._state) layout(root); });
  }
  // (Re)attach the page-level listeners; the returned cleanup detaches them when Streamlit
  // unmounts the view (or before it calls this function again), so nothing leaks.
  if (!root._listening) {
    window.addEventListener("tomoforge-cursor", root._onCursor);
    window.addEventListener("tomoforge-values", root._onValues);
    root._resize.observe(root);
    root._listening = true;
  }
  const cleanup = () => {
    window.removeEventListener("tomoforge-cursor", root._onCursor);
    window.removeEventListener("tomoforge-values", root._onValues);
    root._resize.disconnect();
    root._listening = false;
  };
  root._setTrigger = setTriggerValue;
  if (!(data instanceof Uint8Array)) return cleanup;
  const state = unpack(data);
  if (root._state && root._state.key === state.key) {  // the same view again: nothing to redraw
    drawCross(root);
    return cleanup;
  }
  if (root._state && root._state.series !== state.series) { root._zoom = { scale: 1, x: 0, y: 0 }; applyZoom(root); }
  root._state = state;
  root._dragWindow = null;
  root.querySelector(".tf-preview").style.display = "none";
  const img = root._img;
  const url = URL.createObjectURL(new Blob([state.png], { type: "image/png" }));
  const previous = root._url;
  root._url = url;
  img.onload = () => { if (previous) URL.revokeObjectURL(previous); };
  img.setAttribute("src", url);
  img.setAttribute("alt", state.label);
  img.dataset.slice = String(state.index);
  img.dataset.key = state.key;
  const data_ = state;
  for (const edge of ["left", "right", "top", "bottom"]) {
    root.querySelector(".tf-" + edge).textContent = data_.letters[edge];
  }
  root.querySelector(".tf-info").textContent = data_.info;
  root.querySelector(".tf-readout").textContent = data_.idle;
  layout(root);
  drawCross(root);
  loadValues(root);
  return cleanup;
}
"""

# Publishes the crosshair voxel to the views on the page (no DOM of its own).
CURSOR_JS = r"""
export default function (component) {
  window.__tomoforgeCursor = component.data;
  window.dispatchEvent(new CustomEvent("tomoforge-cursor"));
}
"""

# Keeps a view's values ("TFVV", a uint32 header length, {"key"}, the deflated values) where its
# view finds them, the last few only, and tells the views they arrived (no DOM of its own).
VALUES_JS = r"""
export default function (component) {
  const bytes = component.data;
  if (!(bytes instanceof Uint8Array) || bytes.length < 8) return;
  const length = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(4, true);
  const key = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + length))).key;
  const store = (window.__tomoforgeValues = window.__tomoforgeValues || {});
  delete store[key];
  store[key] = bytes.slice(8 + length);
  for (const old of Object.keys(store).slice(0, -6)) delete store[old];
  window.dispatchEvent(new CustomEvent("tomoforge-values"));
}
"""

slice_view = st.components.v2.component("tomoforge_slice_view", css=VIEW_CSS, js=VIEW_JS)
slice_values = st.components.v2.component("tomoforge_slice_values", js=VALUES_JS)
slice_cursor = st.components.v2.component("tomoforge_slice_cursor", js=CURSOR_JS)

PLANE_TITLES = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}
SLAB_MODES: dict[str, Literal["max", "min", "mean"] | None] = {
    "Off": None,
    "MIP (maximum)": "max",
    "MinIP (minimum)": "min",
    "Mean": "mean",
}
SLAB_NAMES = {"max": "MIP", "min": "MinIP", "mean": "Mean"}
CUSTOM = "Custom"
CACHE_SIZE = 12  # rendered views kept per session (three planes x a few recent settings)

POS = "viewer_pos"  # {"series": id, "axial": k, "coronal": j, "sagittal": i}: the crosshair voxel
CACHE = "viewer_cache"
FACTS = "viewer_facts"  # per-series things computed once: histogram, auto window
OVERLAY = "viewer_overlay"  # {"key": upload id, "volume": Volume | None, "error": str, "present": [label]}


series, volume = require_volume()
info = series.info
st.title("View")
spacing = ", ".join(f"{s:.3g}" for s in volume.spacing_mm)
st.caption(
    plain(
        f"{info.description or info.kind} · {volume.modality or 'unknown modality'} · "
        f"{' x '.join(str(n) for n in volume.shape)} voxels · {spacing} mm"
    )
)


def series_facts() -> dict[str, Any]:
    """Histogram and automatic window of the current series, computed once per series."""
    facts = st.session_state.get(FACTS)
    if not facts or facts.get("series") != info.id:
        counts, edges = histogram(volume)
        auto = None if volume.is_rgb else auto_window(volume)
        facts = {"series": info.id, "counts": counts, "edges": edges, "auto": auto}
        st.session_state[FACTS] = facts
        st.session_state[CACHE] = OrderedDict()
    return facts


def window_choices(facts: dict[str, Any]) -> dict[str, Window]:
    choices: dict[str, Window] = {}
    for window in file_windows(info.windows):
        choices[window.name] = window
    if facts["auto"] is not None:
        choices[facts["auto"].name] = facts["auto"]
    if volume.modality.upper() == "CT" or volume.unit == "HU":
        for preset in CT_PRESETS:
            choices[f"{preset.name} (W {preset.width:g} / L {preset.center:g})"] = preset.window
    return choices


# Widget values survive a visit to another page only through a plain copy: Streamlit drops the
# state of widgets a run does not draw. Defaults that depend on the series are set in init_state.
SETTINGS = "viewer_settings"
GENERAL_DEFAULTS: dict[str, Any] = {
    "viewer_layout": "Three views",
    "viewer_plane": "axial",
    "viewer_radiological": True,
    "viewer_invert": False,
    "viewer_colormap": "gray",
    "viewer_slab": "Off",
    "viewer_slab_mm": 10.0,
    "viewer_crosshair": True,
    "viewer_overlay_kind": "None",
    "viewer_opacity": 0.4,
}


def restore_settings() -> None:
    """Give every viewer widget its last value (or default) before it is drawn."""
    saved = st.session_state.setdefault(SETTINGS, {})
    for key, default in GENERAL_DEFAULTS.items():
        if key not in st.session_state:
            st.session_state[key] = saved.get(key, default)
    for key, value in saved.items():
        if key not in st.session_state:
            st.session_state[key] = value


def remember_settings() -> None:
    saved = st.session_state[SETTINGS]
    for key in list(GENERAL_DEFAULTS) + SERIES_SETTINGS:
        if key in st.session_state:
            saved[key] = st.session_state[key]


SERIES_SETTINGS = [
    "viewer_window_choice",
    "viewer_center",
    "viewer_width",
    "viewer_frame",
    "viewer_thr_lo",
    "viewer_thr_hi",
]


def init_state(choices: dict[str, Window], facts: dict[str, Any]) -> None:
    """Reset position, window, frame and threshold when the series changes."""
    pos = st.session_state.get(POS)
    if pos and pos.get("series") == info.id:
        return
    shape = volume.spatial_shape
    st.session_state[POS] = {
        "series": info.id,
        "sagittal": (shape[0] - 1) // 2,
        "coronal": (shape[1] - 1) // 2,
        "axial": (shape[2] - 1) // 2,
    }
    values: dict[str, Any] = {"viewer_frame": 0}
    if not volume.is_rgb:
        start = default_window(volume, info.windows)
        label = next((name for name, w in choices.items() if (w.center, w.width) == (start.center, start.width)), None)
        if label is None:
            label = next(iter(choices))
            start = choices[label]
        values.update(
            {
                "viewer_window_choice": label,
                "viewer_center": float(start.center),
                "viewer_width": float(start.width),
                "viewer_thr_lo": 300.0 if volume.unit == "HU" else float(facts["auto"].center),
                "viewer_thr_hi": float(facts["edges"][-1]),
            }
        )
    saved = st.session_state.setdefault(SETTINGS, {})
    for key in SERIES_SETTINGS:
        saved.pop(key, None)
        st.session_state.pop(key, None)
    saved.update(values)
    st.session_state.update(values)
    st.session_state[OVERLAY] = {"key": None, "volume": None, "error": ""}


def _choose_window(choices: dict[str, Window]) -> None:
    label = st.session_state["viewer_window_choice"]
    if label in choices:
        st.session_state["viewer_center"] = float(choices[label].center)
        st.session_state["viewer_width"] = float(choices[label].width)


def _edit_window() -> None:
    st.session_state["viewer_window_choice"] = CUSTOM


def _slider_moved(plane: str) -> None:
    st.session_state[POS][plane] = int(st.session_state[f"slice_{plane}"])


def _clicked(plane: str, radiological: bool) -> None:
    """A click in one view: move the other two planes to the clicked voxel."""
    state = st.session_state.get(f"view_{plane}")
    click = state.get("click") if state else None
    if not isinstance(click, dict):
        return
    pos = st.session_state[POS]
    geometry = view_geometry(volume, plane, radiological=radiological)
    ijk = screen_to_voxel(geometry, pos[plane], float(click["col"]), float(click["row"]))
    pos.update(linked_indices(ijk))


def _scrolled(plane: str) -> None:
    """Mouse wheel over a view: one slice up or down."""
    state = st.session_state.get(f"view_{plane}")
    scroll = state.get("scroll") if state else None
    if not isinstance(scroll, dict):
        return
    pos = st.session_state[POS]
    step = 1 if scroll.get("step", 0) > 0 else -1
    pos[plane] = int(np.clip(pos[plane] + step, 0, n_slices(volume, plane) - 1))


def _window_dragged(plane: str) -> None:
    """Window/level dragged in a view: that window, as a custom one, for every view."""
    state = st.session_state.get(f"view_{plane}")
    dragged = state.get("window") if state else None
    if not isinstance(dragged, dict):
        return
    try:
        center, width = float(dragged["center"]), float(dragged["width"])
    except (KeyError, TypeError, ValueError):
        return
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        return
    if np.dtype(info.dtype).kind in "iub":  # whole numbers, as the inputs step for integer data
        center, width = float(round(center)), float(max(1, round(width)))
    else:
        center, width = float(f"{center:.4g}"), max(float(f"{width:.4g}"), 1e-6)  # the Width input's minimum
    st.session_state["viewer_center"] = center
    st.session_state["viewer_width"] = width
    st.session_state["viewer_window_choice"] = CUSTOM


def _overlay_state() -> dict[str, Any]:
    # setdefault, not []: a fragment can rerun after the session state was rebuilt.
    return st.session_state.setdefault(OVERLAY, {"key": None, "volume": None, "error": ""})


def load_overlay(upload: Any) -> Volume | None:
    """Read an uploaded label map once per upload; keep the error message if it cannot be used.

    The upload is parsed and decoded in a worker process (:mod:`core.worker`), like every
    other upload: a file that crashes a reader ends the worker, not the server.
    """
    state = _overlay_state()
    if upload is None:
        state.update(key=None, volume=None, error="", present=[])
        return None
    if state.get("key") == upload.file_id:
        return state["volume"]
    state.update(key=upload.file_id, volume=None, error="", present=[])
    try:
        with st.spinner("Reading the label map (in a worker process)..."):
            labels, present = run_in_worker(
                read_label_map, Source(name=upload.name, data=upload.getvalue()), what=f"label map {upload.name}"
            )
    except CoreError as err:
        state["error"] = f"Label map not loaded. {err.message}"
        return None
    state["present"] = present  # the legend's values, found by the worker
    state["volume"] = labels
    return labels


def legend(values: list[int], colors: dict[int, tuple[int, int, int]]) -> None:
    shown = values[:40]
    # Every value put into HTML is escaped, even numbers: st.html renders markup as it is.
    chips = "".join(
        f'<span style="display:inline-block;margin:0 10px 4px 0;font-size:13px">'
        f'<span style="display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px;'
        f'background:rgb{html.escape(str(tuple(int(c) for c in colors[v])))}"></span>{html.escape(str(v))}</span>'
        for v in shown
    )
    more = f" and {len(values) - len(shown)} more" if len(values) > len(shown) else ""
    st.html(f"<div>Labels: {chips}{html.escape(more)}</div>")


def view_payload(plane: str, options: dict[str, Any], hover_values: bool) -> tuple[bytes, bytes]:
    """One view, rendered and packed for its browser side, and its values (cached per settings).

    The same bytes for an unchanged view let Streamlit send a cache reference
    instead of the image again when another view changes. The values (for the
    readout under the pointer) go in a second element, sent after every image.
    """
    pos = st.session_state[POS]
    index = pos[plane]
    cache: OrderedDict = st.session_state.setdefault(CACHE, OrderedDict())
    key = (info.id, plane, index, hover_values, options["token"], options["max_height"])
    payload = cache.get(key)
    if payload is not None:
        cache.move_to_end(key)
        return payload
    render = options["render"]
    image = render_view(volume, plane, index, options["window"], **render)
    png = encode_png(image)
    geometry = view_geometry(volume, plane, radiological=render["radiological"])
    count = n_slices(volume, plane)
    info_text = f"{PLANE_TITLES[plane]} {index}/{count - 1}"
    if render["slab"] is not None:
        info_text += f" · {SLAB_NAMES[render['slab'].mode]} {render['slab'].thickness_mm:g} mm"
    if geometry.obliquity_deg > 1.0:
        info_text += f" · oblique {geometry.obliquity_deg:.0f}°"
    packed_values = b""
    values_header = None
    if hover_values:
        values = view_values(
            volume, plane, index, frame=render["frame"], radiological=render["radiological"], slab=render["slab"]
        )
        if values.dtype.kind in "iu" and values.dtype.itemsize == 8:
            values = values.astype(np.float64)
        elif values.dtype.kind == "b":
            values = values.astype(np.uint8)
        values = np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"), copy=False))
        # Byte planes (all first bytes, then all second bytes...) deflate ~15% smaller.
        shuffled = values.reshape(-1).view(np.uint8).reshape(-1, values.dtype.itemsize).T.tobytes()
        packed_values = deflate(shuffled, 1)
        values_header = {
            "key": f"{info.id}:{plane}:{index}:{options['token']}",
            "dtype": values.dtype.name,
            "bytes": len(packed_values),
        }
    header = {
        "key": f"{info.id}:{plane}:{index}:{options['token']}:{options['max_height']}",
        "series": info.id,
        "plane": plane,
        "label": f"{PLANE_TITLES[plane]} view",
        "info": info_text,
        "idle": "Point at the image for value, RAS mm and voxel.",  # the other gestures: VIEW_HELP
        # The window a drag starts from (None: RGB, nothing to window) and whether grey is flipped.
        "window": None
        if volume.is_rgb
        else {"center": float(options["window"].center), "width": float(options["window"].width)},
        "inverted": bool(render["invert"]) != bool(volume.display_inverted),
        # The colour of each grey level for the drag preview (None: grey itself).
        "colors": None if render["colormap"] == "gray" else colormap_lut(render["colormap"]).reshape(-1).tolist(),
        "maxHeight": options["max_height"],
        "panelRatios": options["panel_ratios"],
        "width": geometry.shape[1],
        "height": geometry.shape[0],
        "colSrc": geometry.col_src.tolist(),
        "rowSrc": geometry.row_src.tolist(),
        "nCols": geometry.native_shape[1],
        "nRows": geometry.native_shape[0],
        "colDesc": geometry.col_descending,
        "rowDesc": geometry.row_descending,
        "sliceAxis": geometry.slice_axis,
        "colAxis": geometry.col_axis,
        "rowAxis": geometry.row_axis,
        "index": index,
        "affine": volume.affine.tolist(),
        "unit": volume.unit,
        "rgb": volume.is_rgb,
        "letters": geometry.letters,
        "pngBytes": len(png),
        "values": values_header,
    }
    head = json.dumps(header).encode()
    values_head = json.dumps({"key": values_header["key"] if values_header else ""}).encode()
    payload = (
        b"TFV1" + struct.pack("<I", len(head)) + head + png,
        b"TFVV" + struct.pack("<I", len(values_head)) + values_head + packed_values if values_header else b"",
    )
    cache[key] = payload
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    return payload


def histogram_figure(facts: dict[str, Any], window: Window | None) -> go.Figure:
    """The histogram with the window marked; rebuilt only when the window changes (a figure costs ~5 ms)."""
    key = (facts["series"], None if window is None else (window.center, window.width))
    cached = facts.get("figure")
    if cached is not None and cached[0] == key:
        return cached[1]
    figure = _histogram_figure(facts, window)
    facts["figure"] = (key, figure)
    return figure


def _histogram_figure(facts: dict[str, Any], window: Window | None) -> go.Figure:
    counts, edges = facts["counts"], facts["edges"]
    centres = (edges[:-1] + edges[1:]) / 2
    figure = go.Figure(go.Bar(x=centres, y=np.maximum(counts, 0), width=np.diff(edges), marker_color="#888"))
    if window is not None:
        figure.add_vrect(
            x0=window.center - window.width / 2,
            x1=window.center + window.width / 2,
            fillcolor="rgba(255, 214, 0, 0.25)",
            line_width=1,
            line_color="rgba(255, 214, 0, 0.9)",
        )
    figure.update_layout(
        height=200,
        margin=dict(l=10, r=10, t=10, b=10),
        bargap=0,
        yaxis=dict(type="log", title="voxels"),
        xaxis=dict(title=volume.unit or "value"),
        showlegend=False,
    )
    return figure


def download_buttons(plane: str, options: dict[str, Any]) -> None:
    index = st.session_state[POS][plane]
    window = options["window"]
    render_options = dict(options["render"])
    frame = render_options["frame"] if volume.n_frames > 1 else None
    # Streamlit serves media by a digest of size and samples: equal names across sessions could
    # hand one user another's file, so a per-session salt goes into every name.
    suffix = download_token(info.id, options["token"])
    target = volume

    def png() -> bytes:
        return encode_png(render_view(target, plane, index, window, **render_options), compress_level=6)

    def zipped() -> bytes:
        # Hundreds of renders and PNG encodes: seconds of CPU that would hold the server's interpreter lock.
        return run_in_worker(plane_zip, target, plane, window, what=f"all {plane} slices", **render_options)

    name = view_file_name(plane, index, window, frame=frame, slab=render_options["slab"], suffix=suffix)
    left, right = st.columns(2)
    with left:
        st.download_button(
            f"PNG of this {plane} view",
            data=png,
            file_name=name,
            mime="image/png",
            on_click="ignore",
            key=f"download_png_{plane}",
            icon=":material/image:",
            help="The view exactly as shown (window, orientation, proportions, overlay), without the crosshair.",
        )
    with right:
        zip_name = view_file_name(plane, 0, window, frame=frame, slab=render_options["slab"], suffix=suffix, ext="zip")
        st.download_button(
            f"All {n_slices(volume, plane)} {plane} slices (zip)",
            data=zipped,
            file_name=zip_name.replace("_s0000_", "_all_"),
            mime="application/zip",
            on_click="ignore",
            key=f"download_zip_{plane}",
            icon=":material/folder_zip:",
        )


def _callback(function: Callable[..., None], *args: Any) -> Callable[[], None]:
    """A no-argument callback (what components accept) calling ``function(*args)``."""

    def callback() -> None:
        function(*args)

    return callback


def window_controls(choices: dict[str, Window], columns: list[Any]) -> Window | None:
    """Preset menu and manual center/width; None for RGB volumes (shown as they are)."""
    if volume.is_rgb:
        return None
    columns[0].selectbox(
        "Window",
        list(choices) + [CUSTOM],
        key="viewer_window_choice",
        on_change=_choose_window,
        args=(choices,),
        help="CT presets cite their sources in core/windowing.py; 'File' windows are (0028,1050)/(0028,1051).",
    )
    integer = np.dtype(info.dtype).kind in "iub" if info.dtype else True
    step = 1.0 if integer else max(float(st.session_state["viewer_width"]) / 100.0, 1e-6)
    center = columns[1].number_input("Center", key="viewer_center", step=step, format="%g", on_change=_edit_window)
    width = columns[2].number_input(
        "Width", key="viewer_width", min_value=1e-6, step=step, format="%g", on_change=_edit_window
    )
    return Window(center=float(center), width=float(width), name=st.session_state["viewer_window_choice"])


def overlay_controls() -> list[LabelOverlay | ThresholdOverlay]:
    overlays: list[LabelOverlay | ThresholdOverlay] = []
    with st.expander("Overlay", expanded=False):
        kinds = ["None", "Label map"] + ([] if volume.is_rgb else ["Threshold"])
        kind = st.radio("Overlay", kinds, horizontal=True, key="viewer_overlay_kind")
        opacity = st.slider("Overlay opacity", 0.0, 1.0, step=0.05, key="viewer_opacity")
        if kind == "Label map":
            upload = st.file_uploader(
                "Label map (NIfTI or NRRD segmentation)",
                type=None,
                key="viewer_label_upload",
                help="Aligned through world coordinates; a different grid is resampled nearest-neighbour.",
            )
            labels_volume = load_overlay(upload)
            if _overlay_state()["error"]:
                show_error(_overlay_state()["error"])
            if labels_volume is not None:
                present = _overlay_state().get("present") or []
                if not present:
                    st.info("The label map is empty (all zero).")
                colors = label_colors(present)
                overlays.append(LabelOverlay(labels_volume, opacity=opacity, colors=colors))
                legend(present, colors)
        elif kind == "Threshold":
            cols = st.columns(2)
            lower = cols[0].number_input("Threshold from", key="viewer_thr_lo", format="%g")
            upper = cols[1].number_input("Threshold to", key="viewer_thr_hi", format="%g")
            overlays.append(ThresholdOverlay(float(lower), float(upper), opacity=opacity))
            st.html(
                '<div style="font-size:13px"><span style="display:inline-block;width:12px;height:12px;'
                'background:rgb(255,60,60);margin-right:4px;vertical-align:-1px"></span>'
                f"{html.escape(f'{lower:g} to {upper:g} {volume.unit}')}</div>"
            )
    return overlays


@st.fragment
def viewer() -> None:
    facts = series_facts()
    choices = window_choices(facts) if not volume.is_rgb else {}
    init_state(choices, facts)
    restore_settings()
    pos = st.session_state[POS]

    top = st.columns([1.2, 1.3, 2.2, 1.0, 1.0])
    layout_choice = top[0].radio("Layout", ["Three views", "One view"], horizontal=True, key="viewer_layout")
    planes = list(PLANES)
    if layout_choice == "One view":
        planes = [
            top[1].radio("Plane", list(PLANES), format_func=PLANE_TITLES.get, horizontal=True, key="viewer_plane")
        ]
    radiological = top[1].toggle(
        "Radiological",
        key="viewer_radiological",
        help="On: the patient's right is on the screen's left (axial, coronal). Off: neurological convention.",
    )
    window = window_controls(choices, top[2:])

    second = st.columns([1.0, 1.0, 1.4, 1.2, 1.0])
    invert = second[0].toggle("Invert", key="viewer_invert", disabled=volume.is_rgb)
    colormap = second[1].selectbox("Colormap", COLORMAPS, key="viewer_colormap", disabled=volume.is_rgb)
    slab_label = second[2].selectbox("Slab projection", list(SLAB_MODES), key="viewer_slab", disabled=volume.is_rgb)
    thickness = second[3].number_input(
        "Slab thickness (mm)",
        min_value=0.1,
        step=1.0,
        key="viewer_slab_mm",
        disabled=SLAB_MODES[slab_label] is None,
    )
    show_cross = second[4].toggle("Crosshair", key="viewer_crosshair")
    frame = 0
    if volume.n_frames > 1:
        frame = st.slider("Time point", 0, volume.n_frames - 1, key="viewer_frame")
    if volume.display_inverted:
        st.caption("MONOCHROME1: shown inverted (high values dark), as the file asks. 'Invert' reverses that.")
    slab_mode = SLAB_MODES[slab_label]
    slab = Slab(slab_mode, float(thickness)) if slab_mode else None
    overlays = overlay_controls()
    remember_settings()

    render_options = {
        "frame": frame,
        "radiological": radiological,
        "invert": invert,
        "colormap": colormap,
        "slab": slab,
        "overlays": tuple(overlays),
    }
    overlay_key = _overlay_state()["key"]  # the uploaded label map's file id
    overlay_token = tuple(
        (type(o).__name__, overlay_key, getattr(o, "lower", None), getattr(o, "upper", None), o.opacity)
        for o in overlays
    )
    window_key = (window.center, window.width) if window else None
    token = names.token(window_key, frame, radiological, invert, colormap, slab, overlay_token)
    shapes = [view_geometry(volume, plane, radiological=radiological).shape for plane in planes]
    options = {
        "window": window or Window(127.5, 256.0),  # RGB: unused for 8-bit, a full-range ramp otherwise
        "render": render_options,
        "token": token,
        "max_height": 0.78 if len(planes) == 1 else 0.55,
        # Height / width of every view shown side by side, so each sizes its panel to the tallest.
        "panel_ratios": [rows / columns for rows, columns in shapes] if len(planes) > 1 else [],
    }

    columns = st.columns(len(planes))
    values_payloads: dict[str, bytes] = {}
    for column, plane in zip(columns, planes):
        with column:
            count = n_slices(volume, plane)
            if count > 1:
                st.session_state[f"slice_{plane}"] = pos[plane]
                st.slider(
                    f"{PLANE_TITLES[plane]} slice",
                    0,
                    count - 1,
                    key=f"slice_{plane}",
                    on_change=_slider_moved,
                    args=(plane,),
                )
            else:
                st.caption(f"{PLANE_TITLES[plane]}: a single slice")
            try:
                payload, values_payloads[plane] = view_payload(plane, options, hover_values=True)
            except CoreError as err:
                show_error(err.message)
                continue
            slice_view(
                key=f"view_{plane}",
                data=payload,
                on_click_change=_callback(_clicked, plane, radiological),
                on_scroll_change=_callback(_scrolled, plane),
                on_window_change=_callback(_window_dragged, plane),
            )
    ijk = (pos["sagittal"], pos["coronal"], pos["axial"])
    # Elements without a view of their own, in one gapless container: one gap on the page, not four.
    with st.container(gap=None):
        slice_cursor(key="view_cursor", data={"series": info.id, "ijk": list(ijk), "show": bool(show_cross)}, height=0)
        for plane, values_payload in values_payloads.items():  # after every image: those paint first
            slice_values(key=f"values_{plane}", data=values_payload, height=0)
    st.caption(VIEW_HELP if volume.is_rgb else f"{VIEW_HELP} · right- or shift-drag: window and level")
    try:
        st.markdown(f"**Crosshair:** {plain(readout(volume, ijk, frame=frame).text())}")
    except CoreError as err:
        show_error(err.message)

    st.plotly_chart(histogram_figure(facts, window), key="viewer_histogram", config={"displayModeBar": False})
    st.caption("Histogram of all voxels (log scale); the shaded band is the current window.")
    for plane in planes:
        download_buttons(plane, options)


viewer()
