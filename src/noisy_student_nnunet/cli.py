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
from noisy_student_nnunet.errors import NsnError

# Order is the order shown in ``nsn --help``.
COMMANDS: tuple[str, ...] = (
    "env",
    "phantoms",
    "plan",
    "pseudolabel",
    "evaluate",
    "profile",
    "demo",
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
    try:
        return int(args.func(args) or 0)
    except NsnError as error:
        print(f"nsn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nsn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
