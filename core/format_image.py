"""PNG, JPEG and TIFF reader (Pillow): one image is a volume with K == 1, a multi-page TIFF a stack.

These files carry no patient geometry. The pixels get 1 mm spacing and the
orientation ITK gives them (columns to the patient's left, rows to posterior,
i.e. an identity direction in LPS), so a picture of an axial slice appears
upright, as it was drawn, in the radiological axial view; pages of a TIFF
stack go up (superior) 1 mm apart.
"""

from __future__ import annotations

import io
import struct
import warnings as _warnings
from typing import Any

import numpy as np

from core.errors import LimitError, UnsupportedFileError
from core.format_common import check_declared_size, complete_affine, make_series
from core.series import Series
from core.sources import Limits, Source
from core.volume import LPS_TO_RAS

_MAGICS = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"II+\x00": "TIFF",
    b"MM\x00+": "TIFF",
}

# Pillow mode -> (mode to convert to or None, dtype of the values, RGB?, warning)
_MODES: dict[str, tuple[str | None, str, bool, str]] = {
    "1": ("L", "uint8", False, "1-bit image loaded as 0/255"),
    "L": (None, "uint8", False, ""),
    "LA": ("L", "uint8", False, "alpha channel dropped"),
    "P": ("RGB", "uint8", True, "palette colours converted to RGB"),
    "PA": ("RGB", "uint8", True, "palette colours converted to RGB, alpha dropped"),
    "RGB": (None, "uint8", True, ""),
    "RGBA": ("RGB", "uint8", True, "alpha channel dropped"),
    "RGBX": ("RGB", "uint8", True, ""),
    "CMYK": ("RGB", "uint8", True, "CMYK converted to RGB"),
    "YCbCr": ("RGB", "uint8", True, ""),
    "I;16": (None, "uint16", False, ""),
    "I;16L": (None, "uint16", False, ""),
    "I;16B": (None, "uint16", False, ""),
    "I;16N": (None, "uint16", False, ""),
    "I": (None, "int32", False, ""),
    "F": (None, "float32", False, ""),
}


# What Pillow raises on damaged files: besides OSError it lets TypeError/KeyError/struct.error
# escape from the TIFF tag parser (found by fuzzing).
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, TypeError, KeyError, IndexError, EOFError, struct.error, ZeroDivisionError,
)  # fmt: skip


def image_format(data: bytes) -> str | None:
    """ "PNG", "JPEG" or "TIFF" from the magic bytes, else None."""
    head = bytes(data[:8])
    for magic, name in _MAGICS.items():
        if head.startswith(magic):
            return name
    return None


def _open(source: Source, fmt: str) -> Any:
    """A lazily decoded Pillow image (only the header is read here)."""
    from PIL import Image

    try:
        with _warnings.catch_warnings():
            # Our own caps (Limits) decide; Pillow's bomb warning would only add noise.
            _warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(source.as_bytes()), formats=[fmt])
    except Image.DecompressionBombError as err:
        raise LimitError(
            f"{source.name}: {err} Downsample the picture before uploading it.", source=source.name
        ) from err
    except _PIL_ERRORS as err:  # UnidentifiedImageError is an OSError
        raise UnsupportedFileError(
            f"{source.name}: looks like {fmt} but cannot be opened ({err}). The file is damaged.", source=source.name
        ) from err


def read_image(source: Source, limits: Limits) -> Series:
    """A Series for a PNG, JPEG or (multi-page) TIFF; pixels are decoded on load.

    The volume has shape ``(columns, rows, pages)`` (``+ (3,)`` for colour)
    before reorientation; greyscale 16-bit stays uint16, colour stays RGB.

    Raises
    ------
    UnsupportedFileError
        Damaged file, unsupported pixel mode, TIFF pages of different sizes.
    LimitError
        More pixels than allowed.
    """
    fmt = image_format(source.as_bytes())
    if fmt is None:
        raise UnsupportedFileError(f"{source.name}: not a PNG, JPEG or TIFF file.", source=source.name)
    image = _open(source, fmt)
    try:
        n_pages = int(getattr(image, "n_frames", 1) or 1)
    except _PIL_ERRORS as err:
        raise UnsupportedFileError(
            f"{source.name}: the {fmt} page directory is damaged ({err}).", source=source.name
        ) from err
    size, mode = image.size, image.mode
    if mode not in _MODES:
        raise UnsupportedFileError(
            f"{source.name}: {fmt} pixel mode '{mode}' is not supported (greyscale 8/16-bit, 32-bit integer or "
            "float, RGB and palette images are). Convert the picture.",
            source=source.name,
        )
    convert, dtype, is_rgb, note = _MODES[mode]
    check_declared_size(source.name, (size[0], size[1], n_pages, 3 if is_rgb else 1), np.dtype(dtype).itemsize, limits)
    if n_pages > 1:
        for page in range(1, n_pages):
            try:
                image.seek(page)
            except _PIL_ERRORS as err:
                raise UnsupportedFileError(
                    f"{source.name}: page {page + 1} cannot be read ({err}).", source=source.name
                ) from err
            if image.size != size or image.mode != mode:
                raise UnsupportedFileError(
                    f"{source.name}: page {page + 1} is {image.size[0]}x{image.size[1]} {image.mode} but page 1 is "
                    f"{size[0]}x{size[1]} {mode}; a stack needs equal pages. Save each page as its own file.",
                    source=source.name,
                )
        image.seek(0)  # page 1 was read before: cannot fail
    notes = [note] if note else []
    notes.append("no physical pixel size in the file: 1 mm pixels assumed; distances are in pixels")
    if n_pages > 1:
        notes.append(f"{n_pages} TIFF pages stacked as slices 1 mm apart")
    shape = (size[0], size[1], n_pages) + ((3,) if is_rgb else ())
    flip = np.diag(LPS_TO_RAS)[:3]
    affine = complete_affine(np.diag(flip), flip * 0.0, shape[:3], name=source.name)
    info = {"format": fmt, "mode": mode, "width": size[0], "height": size[1], "pages": n_pages}
    info.update({str(k): str(v)[:200] for k, v in image.info.items() if isinstance(v, str | int | float | tuple)})
    data = source.as_bytes()
    name = source.name

    def decode() -> np.ndarray:
        picture = _open(Source(name=name, data=data), fmt)
        pages = []
        try:
            for page in range(n_pages):
                picture.seek(page)
                frame = picture.convert(convert) if convert else picture
                pixels = np.asarray(frame)
                pages.append(np.swapaxes(pixels, 0, 1).astype(dtype, copy=False))  # (rows, cols) -> (i=col, j=row)
        except _PIL_ERRORS as err:
            raise UnsupportedFileError(f"{name}: the {fmt} pixels cannot be decoded ({err}).", source=name) from err
        return np.stack(pages, axis=2)

    return make_series(
        source=source,
        kind="image",
        shape=shape,
        affine=affine,
        dtype=dtype,
        decode=decode,
        headers=(info,),
        warnings=notes,
        is_rgb=is_rgb,
    )
