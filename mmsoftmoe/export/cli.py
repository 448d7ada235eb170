"""`mmsoftmoe export`: the command line of `export_checkpoint`."""

from __future__ import annotations

import argparse

from mmsoftmoe.arguments import check_arguments
from mmsoftmoe.console import quiet
from mmsoftmoe.export.core import export_checkpoint
from mmsoftmoe.export.formats import ALIASES, ALL, FORMATS, parse_formats


def format_list(value: str) -> list[str]:
    try:
        return parse_formats(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmsoftmoe export",
        description="Export a checkpoint's image encoder; each folder is written atomically, checked against "
                    "the eager model and described by a model card (README.md) and export_report.json.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint or open_clip folder (open_clip_config.json)")
    names = ", ".join(f"{name} ({fmt.summary})" for name, fmt in FORMATS.items())
    aliases = "; ".join(f"{alias}: alias of {name}" for alias, name in ALIASES.items())
    parser.add_argument("--format", required=True, type=format_list, dest="formats",
                        help=f"comma-separated formats or {ALL!r}: {names}; {aliases}")
    parser.add_argument("--out", required=True, help="export folder (one format) or parent of one per format")
    parser.add_argument("--overwrite", action="store_true", help="replace existing export folders")
    parser.add_argument("--no-proj", dest="proj", action="store_false",
                        help="export pooled trunk features, without the CLIP projection (open_clip: ignored)")
    parser.add_argument("--batch-size", type=int, default=8, help="parity-check batch size (>= 2)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the exporters' own output (ONNX steps, weight loading/saving bars)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="read a checkpoint that has no manifest.json (or fails it) without verifying it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args, {"--batch-size": (2, False)})
    # A user error becomes one `error:` line in the `mmsoftmoe` command; a parity failure keeps its traceback.
    with quiet(not args.verbose):
        reports = export_checkpoint(args.checkpoint, args.formats, args.out, overwrite=args.overwrite,
                                    proj=args.proj, batch_size=args.batch_size, verify=args.verify)
    print(f"{'format':<13} {'max abs diff':>12} {'time (s)':>9} {'size (MiB)':>10}  folder")
    for name, report in reports.items():
        print(f"{name:<13} {report['parity']['max_abs_diff']:>12.3g} {report['export_seconds']:>9.2f} "
              f"{report['size_bytes'] / 2**20:>10.2f}  {report['folder']}")
    return 0
