"""``nsn demo``: the whole noisy-student chain on synthetic CT phantoms, on the CPU, with a results table."""

from __future__ import annotations

import argparse
from pathlib import Path

from noisy_student_nnunet.demo_budget import BUDGET_MINUTES, MIN_SCALE


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole chain on synthetic phantoms on the CPU and print DSC/NSD per organ",
        description="Makes phantoms (labeled, unlabeled, test), runs scripts/run_pipeline.sh with a small recipe on "
                    "the CPU or a GPU (teachers, pseudo-labels, student, fine-tune), predicts the test phantoms "
                    "with one teacher fold, the teacher ensemble, the student and the fine-tuned student, and "
                    "prints FLARE22 DSC and NSD per organ with prediction time and peak RAM. Rerunning resumes.",
    )
    parser.add_argument("-w", "--work", type=Path, default=Path("nsn_demo"),
                        help="work folder (nnU-Net folders, logs, predictions); default ./nsn_demo")
    parser.add_argument("-d", "--dataset-id", type=int, default=990, help="id of the phantom dataset (default 990)")
    parser.add_argument("--recipe", default=None,
                        help="recipe name or file (default: demo on the CPU, demo_gpu on a GPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): train and predict on a CUDA GPU when torch sees one, else the CPU")
    parser.add_argument("-n", "--num-labeled", type=int, default=8)
    parser.add_argument("-u", "--num-unlabeled", type=int, default=24)
    parser.add_argument("-t", "--num-test", type=int, default=8)
    parser.add_argument("-f", "--folds", nargs="+", default=["0", "1"],
                        help="teacher folds, two at least for the ensemble (default 0 1)")
    parser.add_argument("-s", "--student-folds", nargs="+", default=["0"],
                        help="student folds; the best by cross-validation is fine-tuned (default 0: one student "
                             "fold keeps the demo within 20 minutes on 2 cores)")
    parser.add_argument("--seed", type=int, default=0,
                        help="phantom set (default 0); another seed makes other phantoms. A work folder keeps the "
                             "phantoms it was made with: use another -w for another seed")
    parser.add_argument("--setting", choices=("iid", "shift"), default="iid",
                        help="where the phantoms come from: iid (default; labeled, unlabeled and test cases of one "
                             "distribution) or shift (labeled: one narrow cohort, portal-venous pancreas patients; "
                             "unlabeled and test: a broad mix of phases, lesions, organ changes, scanners and "
                             "coverage, as FLARE's). A work folder keeps the phantoms it was made with")
    parser.add_argument("--minutes", type=float, default=BUDGET_MINUTES,
                        help=f"on the CPU with the default recipe: time a training step first and, where the whole "
                             f"recipe would take longer than this, train fewer epochs (down to {MIN_SCALE:g} of "
                             f"them; default {BUDGET_MINUTES:g}; 0 trains the whole recipe)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noisy_student_nnunet.demo import resolve_device, run_demo
    from noisy_student_nnunet.errors import NsnError

    if min(args.num_labeled, args.num_unlabeled, args.num_test) < 1:
        raise NsnError("--num-labeled, --num-unlabeled and --num-test must be >= 1")
    if args.num_labeled < 5:
        raise NsnError(f"--num-labeled must be at least 5 (nnU-Net splits the labeled cases into 5 folds), "
                       f"got {args.num_labeled}")
    if args.minutes < 0:
        raise NsnError(f"--minutes must be >= 0 (0 trains the whole recipe), got {args.minutes:g}")
    if len(args.folds) < 2:
        raise NsnError("--folds needs two teacher folds at least: the demo compares one fold with their ensemble")
    device = resolve_device(args.device)
    run_demo(args.work, args.dataset_id, args.recipe, args.num_labeled, args.num_unlabeled, args.num_test,
             tuple(args.folds), args.seed, tuple(args.student_folds), device=device, setting=args.setting,
             minutes=args.minutes)
    return 0
