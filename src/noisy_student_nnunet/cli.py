"""The ``nsn`` command: one entry point, one module per subcommand under ``commands/``.

Each command module defines ``add_parser(subparsers)`` (which sets ``func=run``) and
``run(args) -> int``. Command modules import heavy libraries inside ``run`` so that
``nsn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from noisy_student_nnunet import __version__
from noisy_student_nnunet.errors import run_guarded

# Order is the order shown in ``nsn --help``.
COMMANDS: tuple[str, ...] = (
    "env",
    "phantoms",
    "plan",
    "pseudolabel",
    "evaluate",
    "profile",
    "demo",
    "submit",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsn",
        description="Noisy nnU-Net student: semi-supervised training and low-footprint inference for nnU-Net v2.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"noisy_student_nnunet.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_guarded(f"nsn {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
