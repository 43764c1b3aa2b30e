"""The ``specfuse`` command line: one entry point, subcommands registered per package.

Each module in ``COMMAND_MODULES`` defines ``register_cli(subparsers)``, which adds its
subcommands with ``set_defaults(func=handler)``; a handler takes the parsed args and
returns the exit code. Heavy imports (torch, transformers) happen inside handlers so
``specfuse --help`` stays fast. Every failure specfuse raises on purpose is one line on
stderr and a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = [
    "adapters_zoo.cli",  # zoo build, base, basis, train, count-params, inspect, analyze
    "adapters_zoo.registry.cli",  # registry add | list | show | rm | verify | gc | bases
    "fusion.cli",  # fuse, merge, export-lora, import-lora
    "serving.serve_cli",  # serve, demo, vllm-args
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specfuse", description="Train, fuse and serve spectral adapters in a shared singular basis."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in COMMAND_MODULES:
        importlib.import_module(module).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Spinning OpenMP threads starve each other on a shared few-core machine (a training
    # step 10× slower); must be set before torch is imported. Users can still override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from adapters_zoo.errors import SpecfuseError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecfuseError as err:
        print(f"specfuse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"specfuse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
