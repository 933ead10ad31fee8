"""Header inspection: what a file says about itself, as plain-text rows.

* DICOM: :func:`flatten_dataset` turns a pydicom Dataset into one
  :class:`HeaderRow` per element (sequence items included, with their depth),
  values rendered as plain text (long values truncated, binary values shown as
  a length and a few hex bytes, pixel data never decoded); private tags carry
  their private creator. :func:`search_rows`, :func:`differing_attributes`
  (what varies across the instances of a series, with its range) and
  :func:`summary_card` build the views of the header page. Exports:
  :func:`datasets_to_json` (DICOM JSON Model, PS3.18 Annex F) and
  :func:`rows_to_csv`.
* NIfTI / Analyze (nibabel headers), NRRD and MetaImage (dicts of fields):
  :func:`header_fields` lists every field plus derived ones (qform/sform codes
  and matrices, orientation codes, voxel size and units, data type and
  scaling); :func:`header_warnings` says when qform and sform disagree.

Nothing here de-identifies: callers pass datasets through
:mod:`core.deidentify` first when the export must not identify anyone. Rows
carry an ``identifying`` flag (:func:`core.deidentify.is_identifying_element`)
for the header view's "hide identifying data" switch.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from nibabel.orientations import aff2axcodes
from pydicom.datadict import private_dictionary_description
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from core.deidentify import deidentify_datasets, is_identifying_element, safe_description
from core.dicom_headers import read_header
from core.format_nifti import form_gap_mm
from core.sources import Source

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"})
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]+")
_NEWLINES = re.compile(r"[\r\n\t]+")


@dataclass(frozen=True)
class HeaderRow:
    """One DICOM element as plain text.

    ``depth`` is 0 for top-level elements and grows by one per sequence level;
    ``path`` names the element with its enclosing items
    ("ReferencedImageSequence[0].ReferencedSOPInstanceUID").
    """

    tag: str
    keyword: str
    name: str
    vr: str
    vm: int
    value: str
    depth: int
    private_creator: str = ""
    path: str = ""
    identifying: bool = False

    @property
    def is_private(self) -> bool:
        return int(self.tag[1:5], 16) % 2 == 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_tag(tag: int | BaseTag) -> str:
    """``(GGGG,EEEE)`` in upper-case hex, as the standard writes tags."""
    tag = Tag(tag)
    return f"({tag.group:04X},{tag.element:04X})"


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}… ({len(text)} characters)"


def _plain(text: str) -> str:
    # Line breaks and control characters would break the table view (and can hide text).
    return _CONTROL.sub(" ", _NEWLINES.sub(" ", text))


def _one_value(value: Any, vr: str) -> str:
    if vr == "AT":
        return format_tag(value)
    if vr == "UI":
        uid = str(value)
        name = UID(uid).name if uid else ""
        return f"{uid} ({name})" if name and name != uid else uid
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def value_text(elem: DataElement, *, max_chars: int = 256) -> str:
    """An element's value as one line of plain text.

    Sequences give their item count, pixel data its size only (never decoded),
    other binary values their size and first 16 bytes in hex; text longer than
    ``max_chars`` is cut with a note of the full length.
    """
    vr = elem.VR
    if vr == "SQ":
        n = len(elem.value or [])
        return f"{n} item" if n == 1 else f"{n} items"
    value = elem.value
    if int(elem.tag) in PIXEL_TAGS or (int(elem.tag) & 0xFF00FFFF) == 0x60003000:
        size = len(value) if isinstance(value, (bytes, bytearray)) else 0
        return f"pixel data, {size} bytes (not shown)" if size else "pixel data (not shown)"
    if value is None or value == "":
        return ""
    if vr in BINARY_VRS or isinstance(value, (bytes, bytearray)):
        data = bytes(value) if isinstance(value, (bytes, bytearray)) else b""
        head = " ".join(f"{b:02x}" for b in data[:16])
        more = " …" if len(data) > 16 else ""
        return f"{len(data)} bytes: {head}{more}"
    if isinstance(value, (list, tuple, MultiValue)):
        text = "\\".join(_one_value(v, vr) for v in value)
    else:
        text = _one_value(value, vr)
    return _truncate(_plain(text), max_chars)


def _vm(elem: DataElement) -> int:
    if elem.VR == "SQ":
        return 1
    try:
        return int(elem.VM)
    except (TypeError, ValueError):
        return 1


def _private_creators(ds: Dataset) -> dict[tuple[int, int], str]:
    creators: dict[tuple[int, int], str] = {}
    for elem in ds:
        tag = elem.tag
        if tag.is_private and 0x0010 <= tag.element <= 0x00FF:
            creators[(tag.group, tag.element)] = _plain(str(elem.value or "")).strip()
    return creators


def _private_info(tag: BaseTag, creators: Mapping[tuple[int, int], str], elem: DataElement) -> tuple[str, str]:
    """(private creator, name) of a private element."""
    if 0x0010 <= tag.element <= 0x00FF:
        return _plain(str(elem.value or "")).strip(), "Private Creator"
    creator = creators.get((tag.group, tag.element >> 8), "")
    name = ""
    if creator:
        try:
            name = private_dictionary_description(tag, creator)
        except KeyError:
            name = ""
    return creator, name or "Private tag"


def flatten_dataset(
    ds: Dataset,
    *,
    max_chars: int = 256,
    max_depth: int = 16,
    max_rows: int = 100_000,
) -> list[HeaderRow]:
    """Every element of a dataset, sequence items included, in file order.

    Parameters
    ----------
    ds : Dataset
        A dataset (file meta elements are not included; see ``ds.file_meta``).
    max_chars : int
        Values longer than this are truncated.
    max_depth : int
        Deeper sequence levels are summarised in one row (hostile files nest
        sequences thousands deep).
    max_rows : int
        At most this many rows; a last row says how many were left out.

    Returns
    -------
    list of HeaderRow
    """
    rows: list[HeaderRow] = []
    left_out = 0

    def walk(level: Dataset, depth: int, prefix: str, inherited: bool) -> None:
        nonlocal left_out
        creators = _private_creators(level)
        for elem in level:
            if len(rows) >= max_rows:
                left_out += 1
                continue
            tag = elem.tag
            keyword = elem.keyword or ""
            if tag.is_private:
                creator, name = _private_info(tag, creators, elem)
            else:
                creator, name = "", elem.name
            identifying = inherited or (
                int(tag) not in PIXEL_TAGS  # only its size is shown
                and is_identifying_element(tag, elem.VR, keyword, elem.value if elem.VR != "SQ" else None)
            )
            label = keyword or format_tag(tag)
            path = f"{prefix}.{label}" if prefix else label
            rows.append(
                HeaderRow(
                    tag=format_tag(tag),
                    keyword=keyword,
                    name=_plain(name),
                    vr=elem.VR,
                    vm=_vm(elem),
                    value=value_text(elem, max_chars=max_chars),
                    depth=depth,
                    private_creator=creator,
                    path=path,
                    identifying=identifying,
                )
            )
            if elem.VR == "SQ" and elem.value:
                if depth + 1 > max_depth:
                    rows.append(
                        HeaderRow(
                            tag=format_tag(tag),
                            keyword=keyword,
                            name="(nested deeper than shown)",
                            vr="",
                            vm=0,
                            value=f"{len(elem.value)} item(s) below depth {max_depth} not shown",
                            depth=depth + 1,
                            path=path,
                            identifying=identifying,
                        )
                    )
                    continue
                for index, item in enumerate(elem.value):
                    walk(item, depth + 1, f"{path}[{index}]", identifying)

    walk(ds, 0, "", False)
    if left_out:
        rows.append(
            HeaderRow(
                tag="",
                keyword="",
                name="(rows left out)",
                vr="",
                vm=0,
                value=f"{left_out} more elements not listed",
                depth=0,
            )
        )
    return rows


def _compact(text: str) -> str:
    return re.sub(r"[\s(),]", "", text).lower()


def search_rows(rows: Iterable[HeaderRow], query: str) -> list[HeaderRow]:
    """Rows whose tag, keyword, name, VR, value or private creator contain ``query`` (case-insensitive).

    Tags match with or without punctuation: "0010,0010", "(0010,0010)" and
    "00100010" all find Patient's Name.
    """
    needle = query.strip().lower()
    if not needle:
        return list(rows)
    compact = _compact(needle)
    found = []
    for row in rows:
        haystack = " ".join((row.tag, row.keyword, row.name, row.vr, row.value, row.private_creator, row.path)).lower()
        if needle in haystack or (compact and compact in _compact(row.tag)):
            found.append(row)
    return found


def private_rows(rows: Iterable[HeaderRow]) -> list[HeaderRow]:
    """The private elements (odd groups), each with its private creator."""
    return [row for row in rows if row.tag and row.is_private]


# --- across instances ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DifferingAttribute:
    """A top-level attribute whose value is not the same in every instance of a series.

    ``range`` is "min … max" for numbers (per component for multi-valued
    ones), else the count of distinct values.
    """

    tag: str
    keyword: str
    name: str
    vr: str
    distinct: int
    missing: int
    first: str
    last: str
    range: str
    identifying: bool


def _numbers(text: str) -> list[float] | None:
    parts = text.split("\\")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        return None
    return values if values and all(np.isfinite(values)) else None


def _format_numbers(values: Sequence[float]) -> str:
    texts = [f"{v:.6g}" for v in values]
    return texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"


def _range_text(texts: Sequence[str], distinct: int) -> str:
    parsed = [_numbers(t) for t in texts]
    if parsed and all(p is not None for p in parsed) and len({len(p) for p in parsed if p is not None}) == 1:
        matrix = np.array(parsed, dtype=float)
        return f"{_format_numbers(matrix.min(axis=0))} … {_format_numbers(matrix.max(axis=0))}"
    return f"{distinct} distinct values"


def differing_attributes(datasets: Sequence[Dataset], *, max_chars: int = 256) -> list[DifferingAttribute]:
    """Top-level attributes (sequences and pixel data excluded) that differ across instances.

    Parameters
    ----------
    datasets : sequence of Dataset
        The instances of one series, in slice order.

    Returns
    -------
    list of DifferingAttribute
        In tag order; ``first``/``last`` are the values in the first and last
        instance ("" when absent there).
    """
    if len(datasets) < 2:
        return []
    tags: dict[int, DataElement] = {}
    for ds in datasets:
        for elem in ds:
            if elem.VR != "SQ" and int(elem.tag) not in PIXEL_TAGS and int(elem.tag) not in tags:
                tags[int(elem.tag)] = elem
    out = []
    for tag in sorted(tags):
        texts: list[str | None] = [value_text(ds[tag], max_chars=max_chars) if tag in ds else None for ds in datasets]
        present = [t for t in texts if t is not None]
        distinct = len(set(present))
        missing = len(texts) - len(present)
        if distinct <= 1 and missing == 0:
            continue
        elem = tags[tag]
        out.append(
            DifferingAttribute(
                tag=format_tag(tag),
                keyword=elem.keyword or "",
                name=_plain(elem.name) if not elem.tag.is_private else "Private tag",
                vr=elem.VR,
                distinct=distinct,
                missing=missing,
                first=texts[0] or "",
                last=texts[-1] or "",
                range=_range_text(present, distinct),
                identifying=is_identifying_element(elem.tag, elem.VR, elem.keyword or "", elem.value),
            )
        )
    return out


# --- summary -------------------------------------------------------------------------------------

SUMMARY_FIELDS: tuple[tuple[str, str], ...] = (
    ("Patient name", "PatientName"),
    ("Patient ID", "PatientID"),
    ("Birth date", "PatientBirthDate"),
    ("Sex", "PatientSex"),
    ("Study date", "StudyDate"),
    ("Study ID", "StudyID"),
    ("Modality", "Modality"),
    ("Series description", "SeriesDescription"),
    ("Manufacturer", "Manufacturer"),
    ("Model", "ManufacturerModelName"),
    ("Institution", "InstitutionName"),
)


@dataclass(frozen=True)
class SummaryField:
    label: str
    value: str
    identifying: bool


def summary_card(ds: Dataset) -> list[SummaryField]:
    """The summary card fields of one instance, in display order ("" when absent)."""
    out = []
    for label, keyword in SUMMARY_FIELDS:
        elem = ds.data_element(keyword) if keyword in ds else None
        value = value_text(elem, max_chars=128) if elem is not None else ""
        vr = elem.VR if elem is not None else ""
        out.append(SummaryField(label, value, is_identifying_element(Tag(keyword), vr or "LO", keyword, value)))
    return out


# --- exports -------------------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    # A spreadsheet runs cells that start like a formula; a header value is data, never code.
    return "'" + text if text.startswith(_FORMULA_START) else text


def rows_to_csv(rows: Iterable[HeaderRow]) -> bytes:
    """CSV (UTF-8, header line) of rows: tag, keyword, name, VR, VM, value, depth, private creator, path."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["tag", "keyword", "name", "vr", "vm", "value", "depth", "private_creator", "path"])
    for r in rows:
        writer.writerow(
            [_csv_cell(v) for v in (r.tag, r.keyword, r.name, r.vr, r.vm, r.value, r.depth, r.private_creator, r.path)]
        )
    return buffer.getvalue().encode("utf-8")


def _bulk_data_uri(elem: DataElement) -> str:
    # The JSON model references large binary values by URI; we do not serve
    # them, so the URI says the value was left out.
    return f"urn:tomoforge:bulkdata-omitted:{int(elem.tag):08X}"


def dataset_to_json_model(ds: Dataset, *, bulk_data_threshold: int = 1024) -> dict[str, Any]:
    """One dataset in the DICOM JSON Model (PS3.18 Annex F), pixel data and large binaries by BulkDataURI.

    Elements pydicom cannot encode (invalid values in a damaged file) are left out.
    """
    return ds.to_json_dict(
        bulk_data_threshold=bulk_data_threshold,
        bulk_data_element_handler=_bulk_data_uri,
        suppress_invalid_tags=True,
    )


def datasets_to_json(datasets: Sequence[Dataset], *, bulk_data_threshold: int = 1024) -> bytes:
    """A JSON array of datasets (PS3.18 F.2: the model of a set of instances), UTF-8."""
    models = [dataset_to_json_model(ds, bulk_data_threshold=bulk_data_threshold) for ds in datasets]
    return json.dumps(models, indent=1, ensure_ascii=False).encode("utf-8")


def files_headers_json(files: Sequence[Source], *, deidentify: bool) -> bytes:
    """:func:`datasets_to_json` of each DICOM file's header (no pixel data), de-identified when asked.

    Read from the files rather than taken as parsed Datasets so that a worker process
    can do it from the bytes alone (the Headers page runs it in one).
    """
    headers = [read_header(item) for item in files]
    return datasets_to_json(deidentify_datasets(headers) if deidentify else headers)


# --- NIfTI, Analyze, NRRD, MetaImage -------------------------------------------------------------


@dataclass(frozen=True)
class HeaderField:
    """One field of a non-DICOM header, as plain text. ``derived`` fields are computed, not stored."""

    name: str
    value: str
    derived: bool = False
    identifying: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Free-text NIfTI/Analyze fields; SimpleITK and converters copy names into them.
NIFTI_TEXT_FIELDS = frozenset(
    {
        "descrip",
        "aux_file",
        "intent_name",
        "db_name",
        "data_type",
        "generated",
        "scannum",
        "patient_id",
        "exp_date",
        "exp_time",
        "hist_un0",
        "views",
        "vols_added",
        "start_field",
        "field_skip",
        "omax",
        "omin",
        "smax",
        "smin",
        "originator",
    }
)

# NRRD and MetaImage fields that describe the grid and encoding only.
STRUCTURAL_KEYS = frozenset(
    k.lower()
    for k in (
        "type",
        "dimension",
        "space",
        "space dimension",
        "sizes",
        "space directions",
        "space origin",
        "kinds",
        "endian",
        "encoding",
        "spacings",
        "thicknesses",
        "axis mins",
        "axis maxs",
        "axismins",
        "axismaxs",
        "centers",
        "centerings",
        "units",
        "space units",
        "measurement frame",
        "byte skip",
        "byteskip",
        "line skip",
        "lineskip",
        "block size",
        "blocksize",
        "min",
        "max",
        "oldmin",
        "oldmax",
        "ObjectType",
        "NDims",
        "BinaryData",
        "BinaryDataByteOrderMSB",
        "ElementByteOrderMSB",
        "CompressedData",
        "CompressedDataSize",
        "TransformMatrix",
        "Offset",
        "Position",
        "Origin",
        "CenterOfRotation",
        "AnatomicalOrientation",
        "ElementSpacing",
        "ElementSize",
        "DimSize",
        "ElementType",
        "ElementNumberOfChannels",
        "HeaderSize",
        "ElementMin",
        "ElementMax",
        "Rotation",
        "Orientation",
        "Color",
        "ElementDataFile_kind",
    )
)


def header_kind(header: Any) -> str:
    """ "dicom", "nifti" (nibabel NIfTI/Analyze header), "mapping" (NRRD/MetaImage dict) or "other"."""
    if isinstance(header, Dataset):
        return "dicom"
    if hasattr(header, "get_data_shape") and hasattr(header, "get_zooms") and hasattr(header, "keys"):
        return "nifti"
    if isinstance(header, Mapping):
        return "mapping"
    return "other"


def _array_text(value: Any, max_chars: int = 512) -> str:
    if isinstance(value, (bytes, bytearray)):
        return _plain(bytes(value).split(b"\x00", 1)[0].decode("latin-1")).strip()
    array = np.asarray(value)
    if array.dtype.kind in "SU":
        items = [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in array.ravel()]
        return _truncate(_plain(" ".join(i.split("\x00", 1)[0] for i in items)).strip(), max_chars)
    if array.ndim == 0:
        item = array.item()
        return f"{item:.6g}" if isinstance(item, float) else str(item)
    if array.dtype.kind == "f":
        return _truncate(" ".join(f"{v:.6g}" for v in array.ravel()), max_chars)
    return _truncate(" ".join(str(v) for v in array.ravel()), max_chars)


def _matrix_text(matrix: np.ndarray) -> str:
    return " ; ".join(" ".join(f"{v:.6g}" for v in row) for row in np.asarray(matrix, dtype=float))


def _spatial_shape(header: Any) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in header.get_data_shape()[:3])
    return tuple((shape + (1, 1, 1))[:3])  # type: ignore[return-value]


def qform_sform_disagreement_mm(header: Any) -> float | None:
    """Largest distance (mm) between where qform and sform put the corners of the grid.

    None when the header has no qform/sform or one of the codes is 0 (unset),
    in which case there is nothing to compare.
    """
    if not (hasattr(header, "get_qform") and hasattr(header, "get_sform")):
        return None
    _q, qcode = header.get_qform(coded=True)
    _s, scode = header.get_sform(coded=True)
    if not qcode or not scode:
        return None
    return form_gap_mm(header.get_qform(), header.get_sform(), _spatial_shape(header))


def header_warnings(header: Any, *, tolerance_mm: float = 1e-3) -> list[str]:
    """Warnings about a non-DICOM header (today: qform and sform that disagree by more than ``tolerance_mm``)."""
    if header_kind(header) != "nifti":
        return []
    distance = qform_sform_disagreement_mm(header)
    if distance is None or distance <= tolerance_mm:
        return []
    qcode = int(header["qform_code"])
    scode = int(header["sform_code"])
    return [
        f"qform (code {qcode}) and sform (code {scode}) disagree by up to {distance:.3g} mm at the corners "
        "of the volume. Tools that prefer the sform (nibabel, FSL) and those that prefer the qform "
        "(ITK, SimpleITK) place this image differently; check which one the file's author meant."
    ]


def nifti_fields(header: Any) -> list[HeaderField]:
    """Every stored field of a nibabel NIfTI/Analyze header, then derived fields.

    Derived: qform and sform codes (with their labels) and matrices, their
    disagreement in mm, orientation codes of the best affine (e.g. "LAS"),
    voxel sizes with units, data type and scaling (slope, intercept).
    """
    fields = []
    for key in header.keys():
        fields.append(HeaderField(key, _array_text(header[key]), identifying=key in NIFTI_TEXT_FIELDS))
    derived: list[tuple[str, str]] = []
    if hasattr(header, "get_qform"):
        for which in ("qform", "sform"):
            code = int(header[f"{which}_code"])
            try:
                label = str(header.get_value_label(f"{which}_code"))
            except (KeyError, ValueError):
                label = "unknown"
            derived.append((f"{which} code", f"{code} ({label})"))
            derived.append(
                (f"{which} matrix", _matrix_text(header.get_qform() if which == "qform" else header.get_sform()))
            )
        distance = qform_sform_disagreement_mm(header)
        derived.append(
            (
                "qform vs sform",
                "not compared (a code is 0)" if distance is None else f"{distance:.4g} mm at the corners",
            )
        )
    best = header.get_best_affine()
    derived.append(("orientation", "".join(str(c) for c in aff2axcodes(best))))
    derived.append(("best affine", _matrix_text(best)))
    zooms = header.get_zooms()
    units = header.get_xyzt_units() if hasattr(header, "get_xyzt_units") else ("unknown", "unknown")
    derived.append(("voxel size", " x ".join(f"{z:.6g}" for z in zooms[:3]) + f" {units[0]}"))
    if len(zooms) > 3:
        derived.append(("time step", f"{zooms[3]:.6g} {units[1]}"))
    derived.append(("shape", " x ".join(str(n) for n in header.get_data_shape())))
    derived.append(("data type", str(header.get_data_dtype())))
    slope, inter = header.get_slope_inter() if hasattr(header, "get_slope_inter") else (None, None)
    derived.append(
        (
            "scaling",
            "none"
            if slope is None and inter is None
            else f"value = {slope if slope is not None else 1:.6g} x stored + {inter if inter is not None else 0:.6g}",
        )
    )
    fields.extend(HeaderField(name, value, derived=True) for name, value in derived)
    return fields


def mapping_fields(header: Mapping[Any, Any]) -> list[HeaderField]:
    """The key/value fields of an NRRD or MetaImage header, values as plain text.

    Keys outside the grid/encoding vocabulary (:data:`STRUCTURAL_KEYS`) are
    flagged identifying: NRRD "content", comments, custom keys and data file
    names can carry names.
    """
    out = []
    for key, value in header.items():
        name = _plain(str(key))
        if isinstance(value, (str, bytes, bytearray, np.ndarray, int, float, np.generic)):
            text = _array_text(value) if not isinstance(value, str) else _truncate(_plain(value), 512)
        elif isinstance(value, (list, tuple)):
            text = _truncate(_plain(" ".join(_array_text(v) if not isinstance(v, str) else v for v in value)), 512)
        else:
            text = _truncate(_plain(str(value)), 512)
        out.append(HeaderField(name, text, identifying=name.strip().lower() not in STRUCTURAL_KEYS))
    return out


def header_fields(header: Any) -> list[HeaderField]:
    """Fields of any non-DICOM header object a reader keeps (see :func:`header_kind`)."""
    kind = header_kind(header)
    if kind == "nifti":
        return nifti_fields(header)
    if kind == "mapping":
        return mapping_fields(header)
    if kind == "dicom":
        return [HeaderField(r.path, r.value, identifying=r.identifying) for r in flatten_dataset(header)]
    return [HeaderField("header", f"{type(header).__name__} (no field view for this header type)")]


def deidentify_fields(fields: Iterable[HeaderField]) -> list[HeaderField]:
    """Fields for an export: identifying values reduced by :func:`core.deidentify.safe_description`.

    Field names stay (they are fixed by the format, or keys a writer chose).
    """
    return [HeaderField(f.name, safe_description(f.value), f.derived, False) if f.identifying else f for f in fields]


def fields_to_csv(fields: Iterable[HeaderField]) -> bytes:
    """CSV (UTF-8) of non-DICOM header fields: name, value, derived."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["name", "value", "derived"])
    for f in fields:
        writer.writerow([_csv_cell(f.name), _csv_cell(f.value), "yes" if f.derived else "no"])
    return buffer.getvalue().encode("utf-8")


def fields_to_json(fields: Iterable[HeaderField]) -> bytes:
    """JSON object {"fields": [{"name", "value", "derived"}, ...]} (UTF-8)."""
    items = [{"name": f.name, "value": f.value, "derived": f.derived} for f in fields]
    return json.dumps({"fields": items}, indent=1, ensure_ascii=False).encode("utf-8")
