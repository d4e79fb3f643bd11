"""The ``presso`` command line."""
from __future__ import annotations

import argparse
import sys
import traceback

from presso.errors import PressoError


def cmd_passes(args: argparse.Namespace) -> int:
    from presso.pass_api import describe_options
    from presso.plugins.registry import get_registry

    registry = get_registry()
    for name in sorted(registry.passes):
        cls = registry.passes[name]
        print(f"{name}  [{registry.source_of('pass', name)}]\n    {cls.summary}\n"
              f"    options: {describe_options(cls.Config) or '(none)'}")
    for failure in registry.failures:
        print(f"warning: {failure}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from presso.demo import run_demo

    run_demo(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="presso", description="Compress PyTorch models: trace, rewrite, lower.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list registered passes with their options").set_defaults(func=cmd_passes)
    demo = sub.add_parser("demo", help="compile, export and run a small built-in model")
    demo.add_argument("--out", default="out/demo", help="export folder (default: out/demo)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PressoError as exc:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
