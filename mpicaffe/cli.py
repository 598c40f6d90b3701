"""The `mpicaffe` command: subcommands named and flagged as Caffe's `caffe` tool names them.

Caffe's single-dash gflags spellings (`-solver S`, `-weights=W`) are accepted too. User errors
print one clear message and exit with status 1, without a traceback.
"""
from __future__ import annotations

import argparse
import re
import sys

from mpicaffe import __version__
from mpicaffe.errors import UserError
from mpicaffe.logs import setup_logging

_GFLAG = re.compile(r"^-([A-Za-z][A-Za-z0-9_]+)(=.*)?$")


def normalize_argv(argv: list[str]) -> list[str]:
    """Turn gflags-style `-name[=value]` into `--name[=value]` (underscores become dashes),
    leaving everything after a bare `--` untouched."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        m = _GFLAG.match(arg)
        if m:
            arg = "--" + m.group(1).replace("_", "-") + (m.group(2) or "")
        elif arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def _cmd_info(args: argparse.Namespace) -> int:
    from mpicaffe import info

    print(info.describe(args.net, args.phase, args.level, args.stage), end="")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from mpicaffe.data import convert

    return convert.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpicaffe",
        description="Train unmodified Caffe models data-parallel under mpirun.",
    )
    parser.add_argument("--version", action="version", version=f"mpicaffe {__version__}")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="print a net's layers as Caffe builds them for a phase")
    p.add_argument("net", help="net prototxt (text) or .caffemodel (binary)")
    p.add_argument("--phase", default="TRAIN", help="TRAIN or TEST (default TRAIN)")
    p.add_argument("--level", type=int, default=0, help="NetState level (default 0)")
    p.add_argument("--stage", action="append", default=[], help="NetState stage (repeatable)")
    p.set_defaults(func=_cmd_info)

    from mpicaffe.data import convert

    p = sub.add_parser("convert", help="write Caffe LMDB datasets and mean files")
    convert.add_arguments(p)
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except UserError as e:
        print(f"mpicaffe {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mpicaffe {args.command}: interrupted", file=sys.stderr)
        return 130
