"""``python -m core mesh``: threshold (or a label) to a surface file, with its figures as JSON.

Public interface (extend, never change)::

    python -m core mesh PATH... -o OUT.stl --lower L [--upper U] [--largest] [--fill-holes]
                        [--smooth N] [--reduce F] [--label N] [--ras]

The format follows the suffix of OUT (.stl binary, .obj, .ply; ``--ascii`` for ASCII
STL). Without options the raw surface is written: no clean-up, smoothing or
decimation (the surface is closed where the mask meets the volume border unless
``--no-cap``). One JSON object goes to stdout with at least ``triangles``,
``volume_ml``, ``area_cm2``, ``bounds_mm`` and ``watertight``; messages go to stderr.

Exit codes: 0 written; 2 usage error; 3 nothing could be meshed (no series loaded,
empty surface, missing label, over a limit, output not writable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from core.errors import EXIT_NOTHING_PROCESSED, EXIT_OK, CoreError, UnsupportedFileError
from core.outputs import replacing

_SUFFIXES = (".stl", ".obj", ".ply")


def _output_path(text: str) -> str:
    if Path(text).suffix.lower() not in _SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text}: the output suffix sets the format; use .stl, .obj or .ply")
    return text


def _lower(text: str) -> float | str:
    if text.lower() == "otsu":
        return "otsu"
    try:
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--lower takes a number or 'otsu', got {text!r}") from err


def _at_least_one(text: str) -> int:
    value = _positive_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``mesh`` subcommand on ``python -m core``'s subparsers."""
    parser = subparsers.add_parser(
        "mesh",
        help="threshold a scan (or take a label) and write an STL/OBJ/PLY surface in mm",
        description=(
            "Threshold a scan (or take one label of a label map) and write its surface in scanner "
            "millimetres (LPS, what 3D Slicer assumes; --ras for RAS). Prints one JSON object with the "
            "mesh figures. Without options the raw surface is written."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files, folders or zips, pooled as one upload")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        type=_output_path,
        metavar="OUT",
        help="output file; the suffix sets the format: .stl (binary), .obj, .ply",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--lower",
        type=_lower,
        metavar="L",
        help="lower threshold in the scan's unit (HU for CT), inclusive; 'otsu' for Otsu's method",
    )
    what.add_argument(
        "--label",
        type=_positive_int,
        metavar="N",
        help="mesh label N of a label map (the scan is a segmentation) instead of a threshold",
    )
    parser.add_argument("--upper", type=float, metavar="U", help="upper threshold, inclusive (default: none)")
    parser.add_argument(
        "--series", metavar="ID", help="series id to mesh (see `python -m core info`); default: the first"
    )
    parser.add_argument(
        "--frame", type=_positive_int, default=0, metavar="T", help="time point of a 4D series (default 0)"
    )
    clean = parser.add_argument_group("clean-up (applied in this order)")
    clean.add_argument(
        "--closing-mm",
        type=_non_negative_float,
        default=0.0,
        metavar="R",
        help="morphological closing with a ball of R mm",
    )
    clean.add_argument(
        "--drop-border",
        action="store_true",
        help="remove components touching the volume border (e.g. air around the patient)",
    )
    clean.add_argument(
        "--min-island-ml",
        type=_non_negative_float,
        default=0.0,
        metavar="X",
        help="remove components smaller than X mL",
    )
    clean.add_argument("--largest", action="store_true", help="keep only the largest connected component")
    clean.add_argument("--keep", type=_positive_int, default=0, metavar="N", help="keep the N largest components")
    clean.add_argument("--fill-holes", action="store_true", help="fill enclosed cavities (e.g. marrow)")
    surface = parser.add_argument_group("surface")
    surface.add_argument(
        "--downsample",
        type=_at_least_one,
        default=1,
        metavar="N",
        help="use every N-th voxel along each axis first (very large volumes)",
    )
    surface.add_argument(
        "--no-cap", action="store_true", help="leave the surface open where the mask meets the volume border"
    )
    surface.add_argument(
        "--smooth",
        type=_positive_int,
        default=0,
        metavar="N",
        help="windowed-sinc smoothing with N iterations (volume-preserving; 10-20 is typical)",
    )
    surface.add_argument(
        "--reduce",
        type=_positive_float,
        metavar="F",
        help="quadric decimation: keep this fraction of the triangles (0 < F <= 1), "
        "or decimate to F triangles when F > 1",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--ras", action="store_true", help="write RAS coordinates instead of LPS")
    output.add_argument("--ascii", action="store_true", help="ASCII instead of binary STL")
    output.add_argument(
        "--scale",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="multiply coordinates by S (e.g. 0.5 prints at half size); figures stay in mm",
    )
    parser.set_defaults(run=run, mesh_parser=parser)


def run(args: argparse.Namespace) -> int:
    """Run ``python -m core mesh`` with parsed arguments; returns the exit code.

    Raises
    ------
    CoreError
        Anything that prevents meshing (``core.cli.main`` prints it and exits 3).
    """
    parser: argparse.ArgumentParser | None = getattr(args, "mesh_parser", None)
    if args.label is not None and args.upper is not None and parser is not None:
        parser.error("--upper applies to thresholds; it cannot be combined with --label")
    if args.largest and args.keep and parser is not None:
        parser.error("--largest and --keep N both choose components; give one")
    if isinstance(args.lower, float) and args.upper is not None and args.upper < args.lower and parser is not None:
        parser.error(f"--upper {args.upper:g} is below --lower {args.lower:g}")

    # Heavy imports here, not at module level: `python -m core info` must stay quick.
    from core.cli import scan_paths
    from core.mask import MaskCleanup, guess_label_scheme, label_counts, otsu_threshold
    from core.mesh import MeshRequest, build_meshes, volume_frame
    from core.mesh_export import FORMATS, format_from_suffix, write_mesh

    started = time.perf_counter()
    result = scan_paths(args.paths)
    for problem in result.errors:
        print(f"error: {problem.source}: {problem.message}", file=sys.stderr)
    if not result.series:
        print("error: no series could be loaded from the given paths", file=sys.stderr)
        return EXIT_NOTHING_PROCESSED
    if args.series is None:
        series = result.series[0]
        if len(result.series) > 1:
            others = ", ".join(s.info.id for s in result.series[1:])
            print(f"note: meshing series {series.info.id}; also found {others} (choose with --series)", file=sys.stderr)
    else:
        matches = [s for s in result.series if s.info.id == args.series]
        if not matches:
            known = ", ".join(s.info.id for s in result.series)
            print(f"error: no series {args.series!r} in the given paths; found: {known}", file=sys.stderr)
            return EXIT_NOTHING_PROCESSED
        series = matches[0]
    volume = series.load()
    load_s = time.perf_counter() - started

    cleanup = MaskCleanup(
        closing_mm=args.closing_mm,
        drop_border_components=args.drop_border,
        min_island_ml=args.min_island_ml,
        keep_largest=1 if args.largest else args.keep,
        fill_cavities=args.fill_holes,
    )
    common: dict[str, Any] = {
        "cleanup": cleanup,
        "cap_borders": not args.no_cap,
        "downsample": args.downsample,
        "frame": args.frame,
        "smooth_iterations": args.smooth,
    }
    if args.reduce is not None:
        if args.reduce <= 1:
            common["keep_fraction"] = args.reduce
        else:
            common["target_triangles"] = int(args.reduce)
    record: dict[str, Any] = {}
    if args.label is not None:
        values = volume_frame(volume, args.frame)
        try:
            scheme = guess_label_scheme(label_counts(values))
        except ValueError as err:
            raise UnsupportedFileError(
                f"series {series.info.id} is not a label map ({err}); use --lower for a threshold",
                source=series.info.id,
            ) from err
        request = MeshRequest(labels=(args.label,), label_scheme=scheme, **common)
        record["label"] = args.label
    else:
        lower = args.lower
        if lower == "otsu":
            lower = otsu_threshold(volume_frame(volume, args.frame))
            print(f"note: Otsu threshold {lower:g} {volume.unit}".rstrip(), file=sys.stderr)
        if args.upper is not None and args.upper < lower:
            raise CoreError(f"--upper {args.upper:g} is below the Otsu threshold {lower:g}; nothing can be selected")
        request = MeshRequest(lower=lower, upper=args.upper, **common)
        record.update({"lower": lower, "upper": args.upper, "unit": volume.unit})
    built = build_meshes(volume, request)
    mesh, figures = built.meshes[0], built.figures[0]
    record["name"] = mesh.name

    fmt = format_from_suffix(args.output, ascii_stl=args.ascii)
    space = "RAS" if args.ras else "LPS"
    written = time.perf_counter()
    try:
        with replacing(args.output) as handle:
            write_mesh(mesh, handle, fmt, space=space, scale=args.scale)
    except OSError as err:
        print(f"error: cannot write {args.output}: {err.strerror or err}", file=sys.stderr)
        return EXIT_NOTHING_PROCESSED
    timings = {"load": round(load_s, 4), **built.timings_s, "write": round(time.perf_counter() - written, 4)}

    for warning in built.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    payload: dict[str, Any] = figures.to_json(space)
    payload.update(
        {
            "output": str(args.output),
            "format": FORMATS[fmt][1],
            "scale": args.scale,
            "series": series.info.id,
            "modality": volume.modality,
            **record,
            "warnings": list(built.warnings),
            "timings_s": timings,
        }
    )
    print(json.dumps(payload))
    return EXIT_OK


__all__ = ["add_parser", "run"]
