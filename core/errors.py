"""Errors a user can act on.

Every error raised by ``core`` is a :class:`CoreError`. The message says what
failed, which file or series, the values involved and what to do next. Pages
show the message as is; the CLI prints it on stderr and exits with the code
below.

======  ==========================  ==================================================
 exit    error                       what to do
======  ==========================  ==================================================
 0       (none)                      at least one series loaded / written
 2       usage error                 fix the command line (``python -m core --help``)
 3       nothing could be processed  read the messages: every input was refused
 3       UnsupportedFileError        upload a DICOM, NIfTI, NRRD, MetaImage, Analyze,
                                     PNG, JPEG or TIFF file
 3       MissingCodecError           install the codec named in the message
 3       SeriesGeometryError         upload the complete series, or one orientation
 3       LimitError                  the input exceeds a configured cap; split it
 3       EmptySurfaceError           lower the threshold or pick another label
======  ==========================  ==================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOTHING_PROCESSED = 3


class CoreError(Exception):
    """Base of every error raised on purpose by ``core``.

    ``source`` names the file or series the error is about (never patient data).
    """

    def __init__(self, message: str, *, source: str = "") -> None:
        super().__init__(message)
        self.source = source

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedFileError(CoreError):
    """The bytes are not a format we read, or the file is damaged."""


class MissingCodecError(CoreError):
    """Pixel data is compressed with a transfer syntax no installed decoder handles."""


class SeriesGeometryError(CoreError):
    """A correct volume cannot be built from these images (e.g. mixed orientations)."""


class LimitError(CoreError):
    """The input exceeds a configured cap (bytes, voxels, members, ratio, triangles)."""


class EmptySurfaceError(CoreError):
    """Thresholding selected no voxels, so there is no surface to extract."""
