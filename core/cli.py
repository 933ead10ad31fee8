"""Command-line interface: ``python -m core <command> ...``.

The arguments, JSON fields and exit codes are a public interface that scripts
depend on: extend them, never change them. Exit codes: 0 success, 2 usage
error, 3 nothing could be processed (see core/errors.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from core.errors import EXIT_NOTHING_PROCESSED, EXIT_OK, CoreError
from core.io import scan
from core.series import Problem, ScanResult
from core.sources import Source, read_paths


def read_inputs(paths: Sequence[str]) -> tuple[list[Source], list[Problem]]:
    """Read every PATH, keeping going past the ones that cannot be read."""
    sources: list[Source] = []
    problems: list[Problem] = []
    for path in paths:
        try:
            sources.extend(read_paths([path]))
        except (CoreError, OSError) as err:
            message = err.message if isinstance(err, CoreError) else f"{path}: cannot be read ({err.strerror})"
            problems.append(Problem(source=path, message=message))
    return sources, problems


def scan_paths(paths: Sequence[str]) -> ScanResult:
    sources, problems = read_inputs(paths)
    result = scan(sources)
    result.errors[:0] = problems
    return result


def _info(args: argparse.Namespace) -> int:
    result = scan_paths(args.paths)
    if args.json:
        print(
            json.dumps(
                {
                    "series": [s.info.to_json() for s in result.series],
                    "errors": [e.to_json() for e in result.errors],
                    "skipped": [s.to_json() for s in result.skipped],
                }
            )
        )
    else:
        for item in result.series:
            info = item.info
            spacing = " x ".join(f"{s:.4g}" for s in info.spacing_mm)
            print(
                f"{info.id}\t{info.modality or '-'}\t{info.description}\t{'x'.join(map(str, info.shape))}\t{spacing} mm\t{info.dtype}"
            )
            for warning in info.warnings:
                print(f"  warning: {warning}")
        for skipped in result.skipped:
            print(f"skipped {skipped.source}: {skipped.reason}")
    for error in result.errors:
        print(f"error: {error.message}", file=sys.stderr)
    if not result.series:
        print("error: no series could be loaded from the given paths", file=sys.stderr)
        return EXIT_NOTHING_PROCESSED
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core",
        description="TomoForge command line: inspect, convert and mesh medical scans.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser("info", help="list the series found in files, folders and zips")
    info.add_argument("paths", nargs="+", metavar="PATH", help="files, folders or zips, pooled as one upload")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=_info)

    # Imported here so `python -m core info` does not pay for meshing/conversion imports.
    from core import cli_convert, cli_deidentify, cli_mesh

    cli_convert.add_parser(commands)
    cli_mesh.add_parser(commands)
    cli_deidentify.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    try:
        return int(args.run(args))
    except CoreError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return EXIT_NOTHING_PROCESSED
    except MemoryError:
        print("error: not enough memory for this input; try a smaller series or --downsample", file=sys.stderr)
        return EXIT_NOTHING_PROCESSED
    except Exception as err:  # noqa: BLE001 - last resort: scripts get a message and exit 3, never a traceback
        print(
            f"error: internal error ({type(err).__name__}); nothing more was written. Please report it.",
            file=sys.stderr,
        )
        return EXIT_NOTHING_PROCESSED
