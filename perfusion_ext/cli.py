"""`perfusion` command line: inspect (and, as they land, train, generate, export)."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import PerfusionError


def cmd_inspect(args) -> int:
    from .concept import describe, format_description

    info = describe(args.file)
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_description(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perfusion", description="Perfusion concepts for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show a concept file's metadata, layers, shapes, dtypes and size")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PerfusionError as exc:
        print(f"perfusion: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("perfusion: interrupted", file=sys.stderr)
        return 130
