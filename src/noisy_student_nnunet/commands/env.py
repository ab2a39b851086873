"""``nsn env``: show (or export) the environment that makes stock nnU-Net find our trainers, and say which
backend and precision inference will use on this machine, and why.

Normally nothing is needed: the installed start-up hook registers the trainers in every Python
process. ``eval "$(nsn env)"`` is the fallback for interpreters started without site hooks (the
inference lines are shell comments there).
"""

from __future__ import annotations

import argparse
import os
import shlex

from noisy_student_nnunet.registration import ENV_VAR, SHIM_DIR, with_shim

NNUNET_PATH_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "env",
        help="print the nnU-Net environment and the nnUNet_extTrainer export for our trainers",
        description="Print shell exports that register our trainers with nnU-Net (eval \"$(nsn env)\"), the "
                    "backend and precision nnUNetv2_predict_lowfootprint and nsn pseudolabel will use on the CPU "
                    "and on CUDA (and why), and, with --check, whether nnU-Net's path variables are set.",
    )
    parser.add_argument("--check", action="store_true",
                        help="report nnUNet_raw/_preprocessed/_results and whether nnU-Net finds our trainers")
    parser.set_defaults(func=run)


def _inference_lines() -> list[tuple[str, str]]:
    from noisy_student_nnunet.inference.backend import run_plan

    return [(f"inference on {device}", run_plan(device)) for device in ("cpu", "cuda")]


def run(args: argparse.Namespace) -> int:
    if not args.check:
        print(f"export {ENV_VAR}={shlex.quote(with_shim(os.environ.get(ENV_VAR)))}")
        for name, line in _inference_lines():
            print(f"# {name}: {line}")
        return 0
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    import contextlib
    import io

    missing = 0
    for name in NNUNET_PATH_VARS:
        value = os.environ.get(name)
        missing += value is None
        print(f"{name:20s} {value if value is not None else '(not set)'}")
    print(f"{ENV_VAR:20s} {os.environ.get(ENV_VAR, '(not set)')}")
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = recursive_find_trainer_class_by_name("NoisyStudentTrainer")
    found = trainer.__module__.startswith("noisy_student_nnunet")
    print(f"{'trainer discovery':20s} {'ok' if found else 'FAILED'} (shim: {SHIM_DIR})")
    for name, line in _inference_lines():
        print(f"{name:20s} {line}")
    return 0 if found and not missing else 1
