"""The ``vfm-align`` command: argument parsing only; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from vfm_align.errors import VfmAlignError

# Subcommand modules, in the order --help lists them. Each has `register(subparsers)` which adds
# its parser and sets `func(args) -> int`.
_COMMANDS = (
    "vfm_align.cli.convert",
    "vfm_align.cli.evaluate",
    "vfm_align.cli.finetune",
    "vfm_align.cli.infer",
    "vfm_align.cli.phantom",
    "vfm_align.cli.score",
    "vfm_align.cli.rank",
    "vfm_align.cli.pretrain",
    "vfm_align.cli.study",
)


def accept_config_overrides(p: argparse.ArgumentParser) -> None:
    """Let subcommand ``p`` take free-form ``--config.KEY=VALUE`` flags (the ml_collections convention),
    collected as "KEY=VALUE" strings into ``args.overrides``; every subcommand with settings uses this.

    argparse cannot declare a family of flags, so the subparser's unknown arguments that belong to the
    family are moved into ``args.overrides``; anything else is still an error.
    """
    p.set_defaults(overrides=None)
    original = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extra = original(args, namespace)
        if ns.overrides is None:
            ns.overrides = []
        rest, i = [], 0
        while i < len(extra):
            a = extra[i]
            if a.startswith("--config."):
                key, eq, value = a[len("--config."):].partition("=")
                if not eq:  # "--config.KEY VALUE"; a trailing "--config.KEY" is left to argparse's error
                    if i + 1 >= len(extra):
                        rest.append(a)
                        break
                    value, i = extra[i + 1], i + 1
                ns.overrides.append(f"{key}={value}")
            else:
                rest.append(a)
            i += 1
        return ns, rest

    p.parse_known_args = parse_known_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfm-align",
        description="Port, fine-tune and score prostate-MRI foundation models (ProFound, ProViCNet) in JAX.",
    )
    from vfm_align import __version__

    parser.add_argument("--version", action="version", version=f"vfm-align {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except VfmAlignError as exc:
        print(f"vfm-align {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vfm-align {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
