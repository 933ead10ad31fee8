"""``python -m core convert PATH... --to nifti|dicom|nrrd|mha -o OUTDIR``.

Public contract (scripts depend on it; extend, never change):

* every series found in the PATHs (pooled as one upload) is converted to one
  output: a file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``) or, for ``--to dicom``,
  a folder of ``IM*.dcm`` files;
* the path of each output is printed on stdout, one per line, nothing else;
* warnings (``warning: ...``) and errors (``error: ...``) go to stderr;
* exit 0 when at least one series was converted, 3 with a message when none
  could be, 2 on usage errors.

Outputs are named like dcm2niix (``<series number>_<description>``, with ``_Tilt``
or ``_Eq`` when the geometry was resampled) and overwrite files of the same name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.errors import EXIT_NOTHING_PROCESSED, EXIT_OK, CoreError
from core.outputs import write_file


def add_parser(subparsers: Any) -> None:
    """Register the ``convert`` subcommand on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "convert",
        help="convert every series to NIfTI, DICOM, NRRD or MetaImage",
        description=(
            "Convert every series found in the PATHs (files, folders, zips, pooled as one upload). "
            "Prints one output path per series on stdout; warnings and errors go to stderr. "
            "Tilted series are resampled to an orthogonal grid (_Tilt) and unevenly spaced ones to equal "
            "spacing (_Eq), with a warning."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files, folders or zips, pooled as one upload")
    parser.add_argument(
        "--to",
        choices=("nifti", "dicom", "nrrd", "mha"),
        default="nifti",
        help="output format (default nifti: .nii.gz); dicom writes a folder of files per series",
    )
    parser.add_argument("-o", "--output", dest="outdir", required=True, metavar="OUTDIR", help="folder for the outputs")
    parser.add_argument("--uncompressed", action="store_true", help="NIfTI: write .nii instead of .nii.gz")
    parser.add_argument(
        "--sidecar",
        action="store_true",
        help="NIfTI from DICOM: also write <name>.json with acquisition parameters (no patient data)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse series with uneven slice spacing or missing slices instead of resampling them",
    )
    parser.add_argument(
        "--reference",
        metavar="DICOM",
        help="DICOM output: copy patient and study attributes from this DICOM file",
    )
    parser.add_argument("--qa", action="store_true", help="also write <name>_qa.json, the geometry QA report")
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Run ``convert`` with parsed arguments; returns the exit code."""
    # Imported here so ``python -m core --help`` stays fast.
    from core.cli import scan_paths
    from core.convert import ConvertOptions, convert_series, unique_stems
    from core.dicom_export import read_reference

    reference = None
    if args.reference:
        path = Path(args.reference)
        try:
            reference = read_reference(path.read_bytes(), path.name)
        except OSError as err:
            print(f"error: {args.reference}: cannot be read ({err.strerror})", file=sys.stderr)
            return EXIT_NOTHING_PROCESSED
    options = ConvertOptions(
        to=args.to, compress=not args.uncompressed, sidecar=args.sidecar, strict=args.strict, reference=reference
    )
    outdir = Path(args.outdir)
    result = scan_paths(args.paths)
    for error in result.errors:
        print(f"error: {error.message}", file=sys.stderr)  # messages name their file
    converted = 0
    for series, stem in zip(result.series, unique_stems(result.series), strict=True):
        try:
            conversion = convert_series(series, options, stem=stem)
        except CoreError as err:
            print(f"error: {series.info.id}: {err.message}", file=sys.stderr)
            continue
        try:
            conversion.write(outdir)
            if args.qa:
                report = json.dumps(conversion.report.to_json(), indent=2) + "\n"
                write_file(outdir / f"{conversion.stem}_qa.json", report)
        except CoreError as err:
            print(f"error: {series.info.id}: {err.message}", file=sys.stderr)
            continue
        except OSError as err:
            # The folder is unusable for every later series too: stop here.
            print(f"error: {outdir}: cannot write ({err.strerror}); choose another -o folder", file=sys.stderr)
            break
        for warning in conversion.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(outdir / conversion.primary, flush=True)
        converted += 1
    if not converted:
        found = len(result.series)
        reason = f"all {found} series failed (see above)" if found else "no series found in the given paths"
        print(f"error: nothing could be converted: {reason}", file=sys.stderr)
        return EXIT_NOTHING_PROCESSED
    return EXIT_OK
