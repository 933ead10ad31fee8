"""``python -m core deidentify PATH... -o OUTDIR``: de-identified copies of DICOM files, one folder per series.

Applies DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile
(see :mod:`core.deidentify`). Output files are named by series and instance
number only (``series_001_CT/IM00001.dcm``); no input name, UID or text is
reused. Series whose pixels may show burned-in text are left out unless
``--allow-burned-in`` is given.

Exit codes: 0 at least one file written; 2 usage error (including an OUTDIR
that already holds files); 3 nothing could be de-identified.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from core.deidentify import DeidentifiedExport, deidentify_sources
from core.errors import EXIT_NOTHING_PROCESSED, EXIT_OK, EXIT_USAGE, CoreError
from core.outputs import write_file
from core.series import Problem
from core.sources import Source, expand_sources, read_paths


def add_parser(subparsers: Any) -> None:
    """Register the ``deidentify`` subcommand on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "deidentify",
        help="write de-identified copies of DICOM files (PS3.15 basic profile), one folder per series",
        description=(
            "Write de-identified copies of DICOM files: DICOM PS3.15 Annex E Basic Application Level "
            "Confidentiality Profile, private tags removed, UIDs replaced consistently within this run, "
            "preamble zeroed. One folder per series in OUTDIR."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files, folders or zips, pooled as one upload")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="new or empty folder for the output")
    parser.add_argument(
        "--date-shift-days",
        type=int,
        default=None,
        metavar="N",
        help="move every study date by N days (keeps intervals and times of day) instead of removing dates",
    )
    parser.add_argument(
        "--allow-burned-in",
        action="store_true",
        help="also write series whose pixels may show text such as the patient's name "
        "(BurnedInAnnotation=YES, or absent for US, SC and secondary captures); check them yourself",
    )
    parser.set_defaults(run=run)


def _read(paths: list[str]) -> tuple[list[Source], list[Problem]]:
    sources: list[Source] = []
    problems: list[Problem] = []
    for path in paths:
        try:
            for source in read_paths([path]):
                try:
                    sources.extend(expand_sources([source]))
                except CoreError as err:
                    problems.append(Problem(source=source.name, message=err.message))
        except (CoreError, OSError) as err:
            message = err.message if isinstance(err, CoreError) else f"{path}: cannot be read ({err.strerror})"
            problems.append(Problem(source=path, message=message))
    return sources, problems


def write_export(export: DeidentifiedExport, outdir: Path) -> None:
    """Write the files of an export below ``outdir`` (names are ours: relative, no ``..``)."""
    for item in export.files:
        target = outdir / item.name
        target.parent.mkdir(parents=True, exist_ok=True)
        write_file(target, item.data)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit code."""
    outdir = Path(args.output)
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        print(
            f"error: {outdir} exists and is not an empty folder; choose a new folder so de-identified "
            "files are not mixed with others",
            file=sys.stderr,
        )
        return EXIT_USAGE
    sources, problems = _read(list(args.paths))
    export = deidentify_sources(sources, date_shift_days=args.date_shift_days, allow_burned_in=args.allow_burned_in)
    problems.extend(export.problems)
    for problem in problems:
        print(f"error: {problem.source}: {problem.message}", file=sys.stderr)
    if not export.files:
        print("error: nothing could be de-identified from the given paths (no readable DICOM image)", file=sys.stderr)
        return EXIT_NOTHING_PROCESSED
    outdir.mkdir(parents=True, exist_ok=True)
    write_export(export, outdir)
    counts: dict[str, int] = {}
    for item in export.files:
        folder = item.name.split("/")[0]
        counts[folder] = counts.get(folder, 0) + 1
    for folder, count in counts.items():
        print(f"{outdir / folder}\t{count} files")
    return EXIT_OK
