"""The ``kvwire-bench`` command line."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from kvwire.bench import codec_report
from kvwire.bench.report import table, write_json


def _cmd_codec(args: argparse.Namespace) -> int:
    print(
        f"codec report: {args.tokens} tokens x {args.heads} heads x {args.head_dim} ({args.dtype}), "
        f"synthetic keys with outlier channels, on the CPU reference"
    )
    results = codec_report.measure(args)
    print(table(codec_report.HEADERS, codec_report.rows(results)))
    print("GB/s counts logical (uncompressed) bytes, 1 GB = 1e9 bytes; best of", args.repeat)
    if args.json:
        write_json(
            args.json, {"kind": "codec", "machine": _machine(), "args": vars(args) | {"func": None}, "results": results}
        )
    return 0


def _machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvwire-bench", description="kvwire benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("codec", help="compression ratio, error and speed per codec")
    codec_report.add_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-' for stdout)")
    p.set_defaults(func=_cmd_codec)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        parser.exit(2, f"kvwire-bench {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
