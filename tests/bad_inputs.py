"""A corpus of hostile and broken uploads, generated in memory (nothing is downloaded).

Every class of bad input named in issue 9 has at least one entry: files that are not
scans, truncated files, headers that declare more than they hold or giant sizes,
decompression bombs, element lengths past the end, deep nesting, damaged codec
streams, inconsistent lookup tables, references to other files on the server, hostile
zips, broken geometry, odd character sets and markup in header values and file names,
and a noise volume that would mesh into millions of triangles.

Each :class:`BadInput` says what a correct reader does with it (``expect``):

``"refused"``
    The scan lists every file of the entry in ``errors`` (or ``skipped``) and finds no
    series; ``error`` names the CoreError class the reader raised (when known).
``"load_fails"``
    The header is fine, the pixels are not: the scan finds series, ``Series.load()``
    raises ``error``.
``"loads"``
    Odd but legitimate (markup in a description, an unknown character set, a zip
    member named ``../../x``): it loads, with names made harmless.
``"clean"``
    Any of the above is acceptable as long as it is clean: a CoreError with a
    message, or a valid Volume.
``"skipped"``
    Left out on purpose (a DICOMDIR that points outside the upload): no series, the
    file is listed in ``skipped``.

Free-text header values of every generated file hold :data:`MARKER`; no message may
repeat it (messages name files and attributes, never header text).

Run ``python -m tests.bad_inputs FOLDER`` to write the corpus to disk (one folder per
entry) for manual checks with ``python -m core info``.
"""

from __future__ import annotations

import io
import struct
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from core.errors import CoreError, LimitError, SeriesGeometryError, UnsupportedFileError
from core.sources import Source
from tests.dicom_factory import make_series, to_bytes

MARKER = "ZQXMARKER"
# Free-text attributes that carry the marker in every generated DICOM file.
MARKED_ATTRIBUTES = {
    "PatientName": f"{MARKER}^Hostile",
    "PatientID": f"{MARKER}-ID",
    "InstitutionName": f"{MARKER} Hospital",
    "StudyDescription": f"{MARKER} study",
    "ReferringPhysicianName": f"{MARKER}^Doctor",
    "ImageComments": f"{MARKER} comment",
    "OperatorsName": f"{MARKER}^Operator",
}
# Size of the bombs once inflated: far above what their headers declare, small enough for CI.
BOMB_BYTES = 64 * 1024**2
# A content no correct reader may ever show: the server's password file.
SERVER_FILE = "/etc/passwd"


@dataclass(frozen=True)
class BadInput:
    """One entry of the corpus: the files uploaded together and what must happen."""

    name: str
    category: str
    sources: tuple[Source, ...]
    expect: str
    error: type[CoreError] | None = None
    note: str = ""
    # Extra checks on the loaded volume / the scan, for entries that load.
    tags: frozenset[str] = field(default_factory=frozenset)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]


# --------------------------------------------------------------------------- DICOM helpers


def _dicom_dataset(
    shape: tuple[int, int] = (16, 16), *, dtype: str = "int16", extra: dict | None = None, description: str = "bad"
) -> Dataset:
    """A valid single CT slice (as a Dataset) with the marker in its free-text attributes."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 1000, size=(1, *shape)).astype(dtype)
    source = make_series(
        pixels, rescale=(1.0, -1024.0), description=description, extra={**MARKED_ATTRIBUTES, **(extra or {})}
    )[0]
    return pydicom.dcmread(io.BytesIO(source.data))


def _dicom(name: str, ds: Dataset | None = None, **kwargs) -> Source:  # type: ignore[no-untyped-def]
    return Source(name=name, data=to_bytes(ds if ds is not None else _dicom_dataset(**kwargs)))


def _with(ds: Dataset, **values: object) -> Dataset:
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _explicit_element(group: int, element: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    """One explicit-VR little-endian element, with an optional lying length."""
    size = len(value) if length is None else length
    head = struct.pack("<HH", group, element) + vr
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
        return head + b"\x00\x00" + struct.pack("<I", size) + value
    return head + struct.pack("<H", size) + value


def _pixel_element_offset(data: bytes) -> int:
    """Byte offset of the (7FE0,0010) element (explicit VR LE) in a file we wrote."""
    index = data.rfind(b"\xe0\x7f\x10\x00")
    assert index > 0
    return index


def _testdata(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:  # pragma: no cover - pydicom ships these files
        raise FileNotFoundError(name)
    return Path(str(path)).read_bytes()


def _marked_testdata(name: str) -> Dataset:
    ds = pydicom.dcmread(io.BytesIO(_testdata(name)))
    for keyword, value in MARKED_ATTRIBUTES.items():
        setattr(ds, keyword, value)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _corrupt_fragments(ds: Dataset, damage: Callable[[bytes], bytes]) -> bytes:
    """The file with each encapsulated frame's bytes replaced by ``damage(frame)``."""
    from pydicom.encaps import encapsulate, generate_frames

    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    ds.PixelData = encapsulate([damage(frame) for frame in frames])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def _scramble(frame: bytes) -> bytes:
    """Keep the first 40 bytes (codec headers), replace the rest with noise."""
    rng = np.random.default_rng(3)
    body = rng.integers(0, 256, size=max(len(frame) - 40, 8), dtype=np.uint8).tobytes()
    out = frame[:40] + body
    return out + (b"\x00" if len(out) % 2 else b"")


def _truncate_half(frame: bytes) -> bytes:
    out = frame[: len(frame) // 2]
    return out + (b"\x00" if len(out) % 2 else b"")


def _deflated_bomb() -> bytes:
    """A Deflated Explicit VR Little Endian file whose dataset inflates to more than :data:`BOMB_BYTES`."""
    ds = _dicom_dataset()
    plain = to_bytes(ds)
    # (0002,0000) File Meta Information Group Length: its UL value sits at bytes 140-143.
    group_length = struct.unpack("<I", plain[140:144])[0]
    dataset = plain[144 + group_length :]
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    at = _pixel_element_offset(dataset)
    # A private (7FDF,1010) OB value of zeros just before the pixel data: deflates 1000:1.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [
        compressor.compress(dataset[:at]),
        compressor.compress(_explicit_element(0x7FDF, 0x1010, b"OB", b"", length=BOMB_BYTES)),
    ]
    zeros = bytes(1024**2)
    for _ in range(BOMB_BYTES // len(zeros)):
        chunks.append(compressor.compress(zeros))
    chunks.append(compressor.compress(dataset[at:]))
    chunks.append(compressor.flush())
    return b"\x00" * 128 + b"DICM" + meta.getvalue() + b"".join(chunks)


def _nested_sequences(depth: int) -> bytes:
    """A file whose (0040,0275) Request Attributes Sequence nests ``depth`` levels deep (undefined lengths)."""
    ds = _dicom_dataset()
    data = to_bytes(ds)
    at = _pixel_element_offset(data)
    # Undefined-length sequence + item, repeated, then the delimiters in reverse.
    # A private tag in group 0009 would sort earlier; what matters is the nesting, not the order.
    opening = (struct.pack("<HH", 0x0040, 0x0275) + b"SQ\x00\x00" + b"\xff\xff\xff\xff") + (
        struct.pack("<HH", 0xFFFE, 0xE000) + b"\xff\xff\xff\xff"
    )
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return data[:at] + opening * depth + closing * depth + data[at:]


def _meta_invalid_vr() -> bytes:
    data = to_bytes(_dicom_dataset())
    # (0002,0013) Implementation Version Name: give it the VR "ZZ".
    index = data.find(b"\x02\x00\x13\x00")
    assert index > 0
    return data[: index + 4] + b"ZZ" + data[index + 6 :]


def _length_past_end(vr: bytes = b"UT") -> bytes:
    """A private (0027,1010) element claiming far more bytes than the file has left.

    With ``vr`` UT (4-byte length) it claims 2 GB; with LO (2-byte length) 65534 bytes.
    Either way its value would swallow group 0028 and the pixels.
    """
    data = to_bytes(_dicom_dataset())
    at = _first_tag_at_or_after(data, 0x0028)
    length = 0x7FFFFFF0 if vr == b"UT" else 0xFFFE
    bad = _explicit_element(0x0027, 0x1010, vr, f"{MARKER} ".encode() * 4, length=length)
    return data[:at] + bad + data[at:]


def _first_tag_at_or_after(data: bytes, group: int) -> int:
    """Offset of the first dataset element of ``group`` or later (walks explicit VR LE elements)."""
    pos = 132
    while pos + 8 <= len(data):
        g, _e = struct.unpack("<HH", data[pos : pos + 4])
        vr = data[pos + 4 : pos + 6]
        if g >= group and g != 0x0002:
            return pos
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            length = struct.unpack("<I", data[pos + 8 : pos + 12])[0]
            pos += 12 + length
        else:
            length = struct.unpack("<H", data[pos + 6 : pos + 8])[0]
            pos += 8 + length
    raise ValueError("group not found")


def _pixel_length_past_end() -> bytes:
    data = to_bytes(_dicom_dataset())
    at = _pixel_element_offset(data)
    return data[: at + 8] + struct.pack("<I", 0x7FFFFFF0) + data[at + 12 : at + 12 + 100]


def _declares_more_than_it_holds() -> bytes:
    """Rows x Columns 512 x 512 (512 kB of int16) with 6 kB of pixel data (the GDCM heap-leak case)."""
    ds = _dicom_dataset((16, 16))
    ds.Rows, ds.Columns = 512, 512
    ds.PixelData = bytes(6 * 1024)
    return to_bytes(ds)


def _dicomdir_outside() -> Source:
    """A DICOMDIR whose records point at ../../etc/passwd and an absolute path."""
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = MARKER
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    records = []
    for path in (["..", "..", "etc", "passwd"], ["", "etc", "shadow"]):
        record = Dataset()
        record.OffsetOfTheNextDirectoryRecord = 0
        record.RecordInUseFlag = 0xFFFF
        record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
        record.DirectoryRecordType = "IMAGE"
        record.ReferencedFileID = path
        record.ReferencedSOPClassUIDInFile = "1.2.840.10008.5.1.4.1.1.2"
        record.ReferencedSOPInstanceUIDInFile = generate_uid()
        record.ReferencedTransferSyntaxUIDInFile = ExplicitVRLittleEndian
        records.append(record)
    ds.DirectoryRecordSequence = DicomSequence(records)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return Source("DICOMDIR", buffer.getvalue())


def _modality_lut_inconsistent() -> bytes:
    ds = _dicom_dataset(dtype="uint16")
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        delattr(ds, keyword)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # (0028,3002) LUT Descriptor: 4096 entries
    item.ModalityLUTType = "HU"
    item.add_new(0x00283006, "US", [0, 1, 2, 3])  # (0028,3006) LUT Data: 4 entries present
    ds.ModalityLUTSequence = DicomSequence([item])
    return to_bytes(ds)


def _palette_inconsistent() -> bytes:
    ds = _dicom_dataset(dtype="uint8")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for n, colour in enumerate(("Red", "Green", "Blue")):
        ds.add_new(0x00281101 + n, "US", [256, 0, 16])  # (0028,110x) descriptor: 256 entries
        setattr(ds, f"{colour}PaletteColorLookupTableData", bytes(6))  # 3 entries present
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        delattr(ds, keyword)
    return to_bytes(ds)


def _overlay_inconsistent() -> bytes:
    ds = _dicom_dataset()
    ds.add_new(0x60000010, "US", 4096)  # Overlay Rows
    ds.add_new(0x60000011, "US", 4096)  # Overlay Columns
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", bytes(8))  # 4096 x 4096 bits declared, 64 present
    return to_bytes(ds)


def _voi_lut_inconsistent() -> bytes:
    ds = _dicom_dataset()
    item = Dataset()
    item.add_new(0x00283002, "US", [65535, 0, 16])
    item.add_new(0x00283006, "US", [0, 1])
    ds.VOILUTSequence = DicomSequence([item])
    return to_bytes(ds)


# --------------------------------------------------------------------------- NIfTI helpers


def _nifti(
    shape: tuple[int, ...] = (8, 8, 8),
    dtype: str = "int16",
    *,
    gz: bool = False,
    codes: tuple[int, int] | None = None,
    **header: object,
) -> bytes:
    """A NIfTI-1 file with the marker in its text fields; ``codes`` = (qform_code, sform_code) forced after writing."""
    import nibabel as nib

    data = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    image = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    hdr = image.header
    hdr["descrip"] = f"{MARKER} descrip".encode()
    hdr["aux_file"] = f"{MARKER}aux".encode()[:24]
    hdr["intent_name"] = MARKER.encode()[:16]
    for key, value in header.items():
        hdr[key] = value
    raw = image.to_bytes()
    if codes is not None:  # nibabel rewrites the codes from the affine when writing
        raw = _patch_nifti(raw, "<2h", _QFORM_CODE, *codes)
    return zlib_gzip(raw) if gz else raw


def zlib_gzip(raw: bytes, level: int = 6) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    return compressor.compress(raw) + compressor.flush()


def _patch_nifti(raw: bytes, fmt: str, offset: int, *values: object) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


# NIfTI-1 header offsets (little endian).
_DIM, _PIXDIM, _VOX_OFFSET, _SCL_SLOPE, _QFORM_CODE, _SFORM_CODE, _SROW_X = 40, 76, 108, 112, 252, 254, 280


def _nifti_gz_bomb() -> bytes:
    """An 8 x 8 x 8 int16 .nii.gz whose gzip stream goes on for :data:`BOMB_BYTES` of zeros."""
    raw = _nifti()
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunks = [compressor.compress(raw)]
    zeros = bytes(1024**2)
    for _ in range(BOMB_BYTES // len(zeros)):
        chunks.append(compressor.compress(zeros))
    chunks.append(compressor.flush())
    return b"".join(chunks)


def _bomb_stream(prefix: bytes, wbits: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    chunks = [compressor.compress(prefix)]
    zeros = bytes(1024**2)
    for _ in range(BOMB_BYTES // len(zeros)):
        chunks.append(compressor.compress(zeros))
    chunks.append(compressor.flush())
    return b"".join(chunks)


# --------------------------------------------------------------------------- NRRD / MetaImage helpers


def _nrrd(fields: dict[str, str], data: bytes = b"", *, detached: bool = False) -> bytes:
    lines = ["NRRD0004", f"# {MARKER} comment", f"content: {MARKER} content"]
    lines += [f"{key}: {value}" for key, value in fields.items()]
    lines.append(f"patient:={MARKER}")
    text = "\n".join(lines) + "\n"
    return text.encode() if detached else text.encode() + b"\n" + data


def _nrrd_list(files: list[str]) -> bytes:
    """A detached NRRD header whose ``data file: LIST`` names ``files`` (LIST must come last)."""
    lines = ["NRRD0004", f"content: {MARKER} content", *[f"{k}: {v}" for k, v in _NRRD_OK.items()], "data file: LIST"]
    return ("\n".join(lines + files) + "\n").encode()


_NRRD_OK = {
    "type": "short",
    "dimension": "3",
    "sizes": "8 8 8",
    "endian": "little",
    "encoding": "raw",
    "space": "left-posterior-superior",
    "space directions": "(1,0,0) (0,1,0) (0,0,1)",
    "space origin": "(0,0,0)",
}


def _mha(fields: dict[str, str], data: bytes = b"") -> bytes:
    lines = ["ObjectType = Image", f"Comment = {MARKER}"]
    lines += [f"{key} = {value}" for key, value in fields.items()]
    return ("\n".join(lines) + "\n").encode() + data


_MHA_OK = {
    "NDims": "3",
    "DimSize": "8 8 8",
    "ElementType": "MET_SHORT",
    "ElementSpacing": "1 1 1",
    "Offset": "0 0 0",
    "TransformMatrix": "1 0 0 0 1 0 0 0 1",
    "ElementDataFile": "LOCAL",
}


def _mha_with(**changes: str) -> dict[str, str]:
    fields = dict(_MHA_OK)
    data_file = changes.pop("ElementDataFile", fields.pop("ElementDataFile"))
    fields.pop("ElementDataFile", None)
    fields.update(changes)
    fields["ElementDataFile"] = data_file  # must be the last field
    return fields


# --------------------------------------------------------------------------- zip helpers


def _zip(members: list[tuple[str | zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def _zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("bomb.dcm", "w", force_zip64=True) as handle:
            zeros = bytes(1024**2)
            for _ in range(BOMB_BYTES // len(zeros)):
                handle.write(zeros)
    return buffer.getvalue()


def _zip_lying_sizes() -> bytes:
    """A member whose headers declare 1 kB but whose deflate stream inflates to :data:`BOMB_BYTES`."""
    data = bytearray(_zip_bomb_plain())
    # Patch the uncompressed size in the local header (offset 22) and central directory (offset 24).
    struct.pack_into("<I", data, 22, 1024)
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 1024)
    return bytes(data)


def _zip_bomb_plain() -> bytes:
    """Like :func:`_zip_bomb` without zip64 extras, so the sizes live in the classic header fields."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("liar.dcm", bytes(BOMB_BYTES))
    return buffer.getvalue()


def _zip_encrypted() -> bytes:
    data = bytearray(_zip([("secret.dcm", to_bytes(_dicom_dataset()))], zipfile.ZIP_STORED))
    # Set "encrypted" (bit 0 of the general purpose flags) in the local and central headers.
    struct.pack_into("<H", data, 6, struct.unpack_from("<H", data, 6)[0] | 1)
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<H", data, central + 8, struct.unpack_from("<H", data, central + 8)[0] | 1)
    return bytes(data)


def _zip_symlink() -> bytes:
    info = zipfile.ZipInfo("link.dcm")
    info.create_system = 3  # unix
    info.external_attr = (0o120777 << 16) | 0  # S_IFLNK
    return _zip([(info, SERVER_FILE.encode())], zipfile.ZIP_STORED)


def _nested_zip(depth: int) -> bytes:
    data = _zip([("inner.dcm", to_bytes(_dicom_dataset()))])
    for level in range(depth - 1):
        data = _zip([(f"level{level}.zip", data)])
    return data


def _zip_many_members(count: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for n in range(count):
            archive.writestr(f"m/{n}.dcm", b"x")
    return buffer.getvalue()


# --------------------------------------------------------------------------- pictures


def _png(width: int = 16, height: int = 16) -> bytes:
    """A noisy greyscale PNG (noise: so it does not compress to a few bytes)."""
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(5).integers(0, 256, size=(height, width), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _png_giant() -> bytes:
    """A PNG whose IHDR declares 100000 x 100000 pixels, followed by a tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- the corpus


def _entry(name: str, category: str, files: list[tuple[str, bytes]] | list[Source], expect: str, error=None, note=""):  # type: ignore[no-untyped-def]
    sources = tuple(f if isinstance(f, Source) else Source(name=f[0], data=f[1]) for f in files)
    return BadInput(name=name, category=category, sources=sources, expect=expect, error=error, note=note)


def corpus() -> list[BadInput]:
    """Every bad input, freshly generated (a few MB in memory; bombs are stored compressed)."""
    with warnings.catch_warnings():
        # pydicom warns about the invalid values we write on purpose.
        warnings.simplefilter("ignore")
        return _corpus()


def _corpus() -> list[BadInput]:
    U, L, G = UnsupportedFileError, LimitError, SeriesGeometryError
    raw8 = np.arange(512, dtype="<i2").tobytes()

    def ct() -> bytes:  # a fresh valid slice (new UIDs) for each use: pooled uploads must not see copies
        return to_bytes(_dicom_dataset())

    entries = [
        # Not a medical file, wrong extension, empty.
        _entry("text-file", "not medical", [("notes.txt", b"hello, not a scan\n")], "refused", U),
        _entry(
            "html-named-dcm", "wrong extension", [("scan.dcm", b"<html><script>alert(1)</script></html>")], "refused", U
        ),
        _entry("text-named-niigz", "wrong extension", [("brain.nii.gz", b"plain text, not gzip")], "refused", U),
        _entry("empty-file", "empty", [("empty.dcm", b"")], "refused", U),
        _entry("random-bytes", "not medical", [("blob.bin", np.random.default_rng(1).bytes(4096))], "refused", U),
        _entry(
            "png-named-dcm",
            "wrong extension",
            [("picture.dcm", _png())],
            "loads",
            note="the bytes decide, not the name",
        ),
        # Truncated in the header / in the pixels.
        _entry("dicom-truncated-header", "truncated header", [("cut_header.dcm", ct()[:300])], "refused", U),
        _entry("dicom-truncated-pixels", "truncated pixels", [("cut_pixels.dcm", ct()[:-200])], "clean", U),
        _entry("nifti-truncated-header", "truncated header", [("cut.nii", _nifti()[:200])], "refused", U),
        _entry("nifti-truncated-pixels", "truncated pixels", [("short.nii", _nifti()[:-300])], "refused", U),
        _entry("niigz-truncated", "truncated pixels", [("short.nii.gz", _nifti(gz=True)[:-40])], "clean", U),
        _entry(
            "nrrd-truncated-pixels", "truncated pixels", [("short.nrrd", _nrrd(_NRRD_OK, raw8[:-100]))], "refused", U
        ),
        _entry("mha-truncated-pixels", "truncated pixels", [("short.mha", _mha(_MHA_OK, raw8[:-100]))], "refused", U),
        _entry("png-truncated", "truncated pixels", [("half.png", _png(64, 64)[:-200])], "clean", U),
        # Declared image size larger than the pixel data.
        _entry(
            "dicom-declares-512x512-holds-6kb",
            "declared > data",
            [("small_pixels.dcm", _declares_more_than_it_holds())],
            "clean",
            U,
        ),
        # Header-declared giant dimensions.
        _entry(
            "dicom-giant-dimensions",
            "giant dimensions",
            [("giant.dcm", to_bytes(_with(_dicom_dataset(), Rows=65535, Columns=65535, NumberOfFrames=100000)))],
            "refused",
            L,
        ),
        _entry(
            "nifti-giant-dimensions",
            "giant dimensions",
            [("giant.nii", _patch_nifti(_nifti(), "<8h", _DIM, 3, 32767, 32767, 32767, 1, 1, 1, 1))],
            "refused",
            L,
        ),
        _entry(
            "nrrd-giant-dimensions",
            "giant dimensions",
            [("giant.nrrd", _nrrd({**_NRRD_OK, "sizes": "100000 100000 100000"}, raw8))],
            "refused",
            L,
        ),
        _entry(
            "mha-giant-dimensions",
            "giant dimensions",
            [("giant.mha", _mha(_mha_with(DimSize="100000 100000 100000"), raw8))],
            "refused",
            L,
        ),
        _entry("png-giant-dimensions", "giant dimensions", [("giant.png", _png_giant())], "refused", L),
        # Decompression bombs.
        _entry("dicom-deflate-bomb", "decompression bomb", [("deflated.dcm", _deflated_bomb())], "refused", L),
        _entry("niigz-bomb", "decompression bomb", [("bomb.nii.gz", _nifti_gz_bomb())], "load_fails", L),
        _entry(
            "nrrd-gzip-bomb",
            "decompression bomb",
            [("bomb.nrrd", _nrrd({**_NRRD_OK, "encoding": "gzip"}, _bomb_stream(raw8, 31)))],
            "load_fails",
            L,
        ),
        _entry(
            "mha-zlib-bomb",
            "decompression bomb",
            [("bomb.mha", _mha(_mha_with(CompressedData="True"), _bomb_stream(raw8, 15)))],
            "load_fails",
            L,
        ),
        _entry("zip-bomb", "decompression bomb", [("bomb.zip", _zip_bomb())], "refused", L),
        _entry("zip-lying-sizes", "decompression bomb", [("liar.zip", _zip_lying_sizes())], "refused"),
        # Element lengths past the end of the file.
        _entry(
            "dicom-element-length-past-end", "length past end", [("long_element.dcm", _length_past_end())], "refused"
        ),
        _entry(
            "dicom-short-element-past-end", "length past end", [("long_lo.dcm", _length_past_end(b"LO"))], "refused"
        ),
        _entry(
            "dicom-pixel-length-past-end",
            "length past end",
            [("long_pixels.dcm", _pixel_length_past_end())],
            "clean",
            U,
        ),
        # Deeply nested sequences.
        _entry(
            "dicom-nested-sequences", "nested sequences", [("nested.dcm", _nested_sequences(100_000))], "refused", U
        ),
        # Invalid VR in the file meta.
        _entry("dicom-meta-invalid-vr", "invalid VR in meta", [("bad_vr.dcm", _meta_invalid_vr())], "clean"),
        # Corrupt JPEG / JPEG 2000 / RLE fragments.
        _entry(
            "dicom-jpeg-scrambled",
            "corrupt codec stream",
            [("jpeg_bad.dcm", _corrupt_fragments(_marked_testdata("SC_rgb_jpeg_gdcm.dcm"), _scramble))],
            "clean",
        ),
        _entry(
            "dicom-jpeg-truncated",
            "corrupt codec stream",
            [("jpeg_cut.dcm", _corrupt_fragments(_marked_testdata("JPEG-lossy.dcm"), _truncate_half))],
            "clean",
        ),
        _entry(
            "dicom-j2k-scrambled",
            "corrupt codec stream",
            [("j2k_bad.dcm", _corrupt_fragments(_marked_testdata("JPEG2000.dcm"), _scramble))],
            "clean",
        ),
        _entry(
            "dicom-j2k-truncated",
            "corrupt codec stream",
            [("j2k_cut.dcm", _corrupt_fragments(_marked_testdata("MR_small_jp2klossless.dcm"), _truncate_half))],
            "clean",
        ),
        _entry(
            "dicom-rle-scrambled",
            "corrupt codec stream",
            [("rle_bad.dcm", _corrupt_fragments(_marked_testdata("MR_small_RLE.dcm"), _scramble))],
            "clean",
        ),
        _entry(
            "dicom-rle-truncated",
            "corrupt codec stream",
            [("rle_cut.dcm", _corrupt_fragments(_marked_testdata("MR_small_RLE.dcm"), _truncate_half))],
            "clean",
        ),
        # LUT or overlay descriptors inconsistent with their data.
        _entry("dicom-modality-lut-short", "inconsistent LUT", [("lut.dcm", _modality_lut_inconsistent())], "clean"),
        _entry("dicom-palette-short", "inconsistent LUT", [("palette.dcm", _palette_inconsistent())], "clean"),
        _entry("dicom-overlay-short", "inconsistent overlay", [("overlay.dcm", _overlay_inconsistent())], "clean"),
        _entry("dicom-voi-lut-short", "inconsistent LUT", [("voi.dcm", _voi_lut_inconsistent())], "clean"),
        # References to other files.
        _entry(
            "mhd-etc-passwd",
            "file reference",
            [("passwd.mhd", _mha(_mha_with(ElementDataFile=SERVER_FILE)))],
            "refused",
            U,
        ),
        _entry(
            "mhd-dotdot",
            "file reference",
            [("up.mhd", _mha(_mha_with(ElementDataFile="../../../../etc/passwd")))],
            "refused",
            U,
        ),
        _entry(
            "mhd-url",
            "file reference",
            [("url.mhd", _mha(_mha_with(ElementDataFile="file:///etc/passwd")))],
            "refused",
            U,
        ),
        _entry(
            "nhdr-etc-passwd",
            "file reference",
            [("passwd.nhdr", _nrrd({**_NRRD_OK, "data file": SERVER_FILE}, detached=True))],
            "refused",
            U,
        ),
        _entry(
            "nhdr-dotdot",
            "file reference",
            [
                ("up.nhdr", _nrrd({**_NRRD_OK, "data file": "../../etc/passwd"}, detached=True)),
                ("data/passwd", b"root:x:0:0:root:/root:/bin/bash\n"),
            ],
            "clean",
            note="the uploaded file named passwd is not read through '..'",
        ),
        _entry(
            "nhdr-list-traversal",
            "file reference",
            [("list.nhdr", _nrrd_list(["../a.raw", SERVER_FILE]))],
            "refused",
            U,
        ),
        _entry("dicomdir-outside-paths", "file reference", [_dicomdir_outside()], "skipped"),
        # Zip slip, absolute names, symlinks, nested zips, many members, encrypted and truncated zips.
        _entry(
            "zip-slip", "hostile zip", [("slip.zip", _zip([("../../../../tmp/tomoforge_slip.dcm", ct())]))], "loads"
        ),
        _entry("zip-absolute-name", "hostile zip", [("abs.zip", _zip([("/etc/cron.d/tomoforge.dcm", ct())]))], "loads"),
        _entry("zip-symlink", "hostile zip", [("link.zip", _zip_symlink())], "refused", U),
        _entry("zip-nested", "hostile zip", [("nested.zip", _nested_zip(4))], "refused", L),
        _entry("zip-many-members", "hostile zip", [("many.zip", _zip_many_members(20_001))], "refused", L),
        _entry("zip-encrypted", "hostile zip", [("locked.zip", _zip_encrypted())], "refused", U),
        _entry(
            "zip-truncated", "hostile zip", [("cut.zip", _zip([("a.dcm", ct()), ("b.dcm", ct())])[:700])], "refused", U
        ),
        # NaN / Inf / zero affines, negative dimensions, vox_offset past the end.
        _entry(
            "nifti-nan-sform",
            "broken geometry",
            [("nan.nii", _patch_nifti(_nifti(codes=(0, 1)), "<4f", _SROW_X, *[float("nan")] * 4))],
            "clean",
        ),
        _entry(
            "nifti-zero-pixdim",
            "broken geometry",
            [("zero.nii", _patch_nifti(_nifti(codes=(0, 0)), "<8f", _PIXDIM, *[0.0] * 8))],
            "refused",
            G,
        ),
        _entry(
            "nifti-inf-pixdim",
            "broken geometry",
            [("inf.nii", _patch_nifti(_nifti(codes=(0, 0)), "<4f", _PIXDIM, 1.0, *[float("inf")] * 3))],
            "refused",
            G,
        ),
        _entry(
            "nifti-negative-dim",
            "negative dimensions",
            [("neg.nii", _patch_nifti(_nifti(), "<4h", _DIM, 3, -8, 8, 8))],
            "refused",
            U,
        ),
        _entry(
            "nifti-vox-offset-past-end",
            "vox_offset past the end",
            [("far.nii", _patch_nifti(_nifti(), "<f", _VOX_OFFSET, 1_000_000.0))],
            "refused",
            U,
        ),
        _entry(
            "nifti-vox-offset-huge",
            "vox_offset past the end",
            [("huge_offset.nii", _patch_nifti(_nifti(), "<f", _VOX_OFFSET, 1e15))],
            "refused",
            U,
        ),
        _entry(
            "nifti-slope-nan",
            "slope 0 or NaN",
            [("nan_slope.nii", _patch_nifti(_nifti(), "<f", _SCL_SLOPE, float("nan")))],
            "loads",
        ),
        _entry(
            "dicom-nan-orientation",
            "broken geometry",
            [("nan_iop.dcm", to_bytes(_with(_dicom_dataset(), ImageOrientationPatient=["NaN"] * 6)))],
            "refused",
            U,
        ),
        _entry(
            "dicom-zero-orientation",
            "broken geometry",
            [("zero_iop.dcm", to_bytes(_with(_dicom_dataset(), ImageOrientationPatient=[0] * 6)))],
            "refused",
        ),
        _entry(
            "dicom-zero-spacing",
            "broken geometry",
            [("zero_spacing.dcm", to_bytes(_with(_dicom_dataset(), PixelSpacing=[0, 0])))],
            "clean",
        ),
        _entry(
            "dicom-non-numeric-spacing", "broken geometry", [("text_spacing.dcm", _text_in_numbers())], "refused", U
        ),
        _entry(
            "nrrd-inf-directions",
            "broken geometry",
            [("inf.nrrd", _nrrd({**_NRRD_OK, "space directions": "(inf,0,0) (0,1,0) (0,0,1)"}, raw8))],
            "refused",
            G,
        ),
        _entry(
            "nrrd-negative-size",
            "negative dimensions",
            [("neg.nrrd", _nrrd({**_NRRD_OK, "sizes": "-8 8 8"}, raw8))],
            "refused",
            U,
        ),
        _entry(
            "mha-zero-spacing",
            "broken geometry",
            [("zero.mha", _mha(_mha_with(ElementSpacing="0 0 0"), raw8))],
            "refused",
            G,
        ),
        _entry(
            "mha-negative-dim",
            "negative dimensions",
            [("neg.mha", _mha(_mha_with(DimSize="-8 8 8"), raw8))],
            "refused",
            U,
        ),
        _entry(
            "mha-nan-offset", "broken geometry", [("nan.mha", _mha(_mha_with(Offset="nan 0 0"), raw8))], "refused", G
        ),
        # BitsStored > BitsAllocated, slope 0 or NaN.
        _entry(
            "dicom-bits-stored-above-allocated",
            "bits stored",
            [("bits.dcm", to_bytes(_with(_dicom_dataset(), BitsStored=32, HighBit=31)))],
            "clean",
        ),
        _entry(
            "dicom-slope-zero",
            "slope 0 or NaN",
            [("slope0.dcm", to_bytes(_with(_dicom_dataset(), RescaleSlope="0")))],
            "loads",
        ),
        _entry(
            "dicom-slope-nan",
            "slope 0 or NaN",
            [("slope_nan.dcm", to_bytes(_with(_dicom_dataset(), RescaleSlope="NaN")))],
            "refused",
            U,
        ),
        # Odd character sets; HTML / Markdown / formula text in header values and file names.
        _entry(
            "dicom-unknown-charset",
            "character set",
            [("charset.dcm", to_bytes(_with(_dicom_dataset(), SpecificCharacterSet="ISO_IR 999")))],
            "loads",
        ),
        _entry("dicom-broken-utf8", "character set", [("utf8.dcm", _broken_utf8())], "loads"),
        _entry(
            "dicom-markup-everywhere",
            "markup in values and names",
            [
                (
                    '=HYPERLINK("http://x")<b>[x](y)</b>.dcm',
                    to_bytes(_dicom_dataset(description="<script>alert(1)</script> **bold** =1+1 @SUM(A1)")),
                )
            ],
            "loads",
        ),
        _entry(
            "nifti-markup-descrip",
            "markup in values and names",
            [("<img src=x onerror=alert(1)>.nii", _nifti(descrip=b"<script>alert(1)</script>"))],
            "loads",
        ),
        # A noise volume: harmless to load, millions of triangles at any threshold.
        _entry(
            "noise-volume",
            "noise volume",
            [("noise.nii", _noise_nifti(64))],
            "loads",
            note="meshing it must stop at the triangle cap",
        ),
    ]
    return [_tagged(entry) for entry in entries]


def _tagged(entry: BadInput) -> BadInput:
    tags = {"noise"} if entry.name == "noise-volume" else set()
    if entry.category == "markup in values and names":
        tags.add("markup")
    return BadInput(**{**entry.__dict__, "tags": frozenset(tags)})


def _text_in_numbers() -> bytes:
    """(0028,0030) Pixel Spacing (DS) holding the marker text instead of a number."""
    placeholder = "1.2345678"  # as long as the marker: no length field changes
    assert len(placeholder) == len(MARKER)
    data = to_bytes(_with(_dicom_dataset(), PixelSpacing=[placeholder, "1"]))
    return data.replace(placeholder.encode(), MARKER.encode(), 1)


def _broken_utf8() -> bytes:
    ds = _dicom_dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    data = to_bytes(ds)
    # Replace the marker in (0010,0010) with bytes that are not UTF-8 (same length: no length fields change).
    start = data.find(f"{MARKER}^Hostile".encode())
    assert start > 0
    return data[:start] + b"\xff\xfe\xc3" + data[start + 3 :]


def _noise_nifti(size: int) -> bytes:
    import nibabel as nib

    values = np.random.default_rng(11).integers(0, 1000, size=(size, size, size)).astype(np.int16)
    return nib.Nifti1Image(values, np.eye(4)).to_bytes()


def write_corpus(folder: Path) -> list[Path]:
    """Write every entry to ``folder/<entry name>/`` (file names made safe for the disk)."""
    written = []
    for entry in corpus():
        target = folder / entry.name
        target.mkdir(parents=True, exist_ok=True)
        for n, source in enumerate(entry.sources):
            safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in source.name) or f"file{n}"
            path = target / safe
            path.write_bytes(source.data)
            written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - manual use
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bad_inputs")
    for path in write_corpus(out):
        print(path)
