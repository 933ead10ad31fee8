"""Everything but DICOM: recognise each file of an upload and hand it to its reader.

Files are recognised by their first bytes (magic) first and by their name
second. Headers are read first, so the data files they name (an ``.img``, a
``.raw``) are claimed before anything else looks at them; what is left is
either a picture (PNG, JPEG, TIFF) or an error that says what is supported.
Every input file ends up in exactly one place: a series' sources, the errors
or the skipped list.

Readers live in ``format_nifti`` (NIfTI-1/2, Analyze), ``format_nrrd``,
``format_metaimage`` and ``format_image`` (Pillow); shared caps, inflation,
data-file lookup and geometry in ``format_common``.
"""

from __future__ import annotations

from collections.abc import Callable

from core.errors import CoreError
from core.format_common import SUPPORTED, inflate_prefix, is_gzip
from core.format_image import image_format, read_image
from core.format_metaimage import looks_like_metaimage, read_metaimage
from core.format_nifti import NIFTI2_SIZE, find_pair_image, read_nifti_single, read_pair, sniff_header
from core.format_nrrd import is_nrrd, read_nrrd
from core.series import Problem, ScanResult, Series, Skipped
from core.sources import DEFAULT_LIMITS, Limits, Source

# Operating-system litter that comes along when a folder is uploaded.
_LITTER = {".ds_store", "thumbs.db", "desktop.ini"}
# Names that are data files of a header format; left over, they mean the header is missing.
_DATA_SUFFIXES = (".img", ".img.gz", ".raw", ".raw.gz", ".zraw", ".dat", ".bin")

__all__ = ["scan_other", "SUPPORTED"]


def _sniff(source: Source) -> str:
    """What a file is: "nifti", "pair", "nrrd", "metaimage", "image", "litter" or "" (unknown).

    Magic bytes decide; the name only helps for the MetaImage text header
    (which has no magic) and is otherwise used in messages.
    """
    data = source.as_bytes()
    if source.basename.lower() in _LITTER:
        return "litter"
    if is_nrrd(data):
        return "nrrd"
    if image_format(data):
        return "image"
    head = bytes(data[:NIFTI2_SIZE])
    if is_gzip(data):
        try:
            head = inflate_prefix(data, NIFTI2_SIZE, name=source.name)
        except CoreError:
            return ""
    kind = sniff_header(head)
    if kind is not None:
        if kind.single:
            return "nifti"
        # An Analyze header is only recognisable by its size; demand a .hdr name for it so a
        # random 348-byte-prefixed data file is not mistaken for one.
        if kind.family != "analyze" or source.suffix in (".hdr", ".hdr.gz"):
            return "pair"
        return ""
    if looks_like_metaimage(data):
        return "metaimage"
    return ""


def _unknown_message(source: Source) -> str:
    suffix = source.suffix
    if source.basename.lower().endswith(_DATA_SUFFIXES):
        return (
            f"{source.name}: a data file that no uploaded header uses (or whose header could not be read). "
            "Upload it together with its header (.hdr, .mhd or .nhdr). " + SUPPORTED + "."
        )
    if suffix in (".nii", ".nii.gz"):
        what = "named like NIfTI but its header has neither sizeof_hdr 348/540 nor the n+1/n+2 magic"
    elif suffix in (".hdr", ".hdr.gz"):
        what = "named like an Analyze/NIfTI header but sizeof_hdr is not 348 or 540"
    elif suffix in (".mha", ".mhd"):
        what = "named like MetaImage but has no 'NDims = ...' / 'ElementDataFile = ...' header"
    elif suffix in (".nrrd", ".nhdr"):
        what = "named like NRRD but does not start with NRRD000x"
    elif suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        what = "named like a picture but its bytes are not PNG, JPEG or TIFF"
    else:
        what = "not a recognised medical image or picture"
    return f"{source.name}: {what}. {SUPPORTED}."


def scan_other(sources: list[Source], limits: Limits = DEFAULT_LIMITS) -> ScanResult:
    """Find the series in the non-DICOM files of one upload (headers read, pixels not decoded).

    Parameters
    ----------
    sources : list of Source
        The upload's files with zips already expanded and DICOM files removed.
    limits : Limits
        Caps checked before anything is allocated.

    Returns
    -------
    ScanResult
        One series per image (a header and its data file make one series; the
        data file is listed in its sources), an error per file that could not
        be read, and OS litter (``.DS_Store``) in ``skipped``.
    """
    result = ScanResult()
    kinds = [_sniff(s) for s in sources]
    found: list[tuple[int, Series]] = []
    claimed: dict[int, str] = {}  # id(data source) -> header name

    readers: dict[str, Callable[[Source], tuple[Series, list[Source]]]] = {
        "nifti": lambda s: (read_nifti_single(s, limits), []),
        "nrrd": lambda s: read_nrrd(s, sources, limits),
        "metaimage": lambda s: read_metaimage(s, sources, limits),
        "pair": lambda s: _read_pair(s, sources, limits),
    }
    # Headers first: they claim their data files before anything else looks at them.
    for index, (source, kind) in enumerate(zip(sources, kinds, strict=True)):
        if kind not in readers:
            continue
        try:
            series, data_sources = readers[kind](source)
        except CoreError as err:
            result.errors.append(Problem(source=source.name, message=err.message))
            continue
        found.append((index, series))
        for data_source in data_sources:
            claimed[id(data_source)] = source.name

    for index, (source, kind) in enumerate(zip(sources, kinds, strict=True)):
        if kind in readers or id(source) in claimed:
            continue
        if kind == "litter":
            result.skipped.append(Skipped(source=source.name, reason="operating-system file, not an image"))
            continue
        if kind == "image":
            try:
                found.append((index, read_image(source, limits)))
            except CoreError as err:
                result.errors.append(Problem(source=source.name, message=err.message))
            continue
        result.errors.append(Problem(source=source.name, message=_unknown_message(source)))

    result.series.extend(series for _, series in sorted(found, key=lambda item: item[0]))
    return result


def _read_pair(header: Source, upload: list[Source], limits: Limits) -> tuple[Series, list[Source]]:
    image = find_pair_image(header, upload)
    return read_pair(header, image, limits), [image]
