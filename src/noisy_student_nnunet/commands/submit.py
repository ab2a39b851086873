"""``nsn submit``: the whole chain as SLURM jobs with dependencies (``sbatch``), resumable by a rerun."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Submit the chain of scripts/run_pipeline.sh to SLURM: the plan (where missing), teacher folds as one job
array, pseudo-label parts as one array (afterok on the teachers), the finalize, student folds as an array,
the fine-tune of the best student fold, prediction parts as an array and the evaluation, each step afterok
on the one before. Only the steps whose outputs are incomplete are submitted, so a rerun after a failure or
an scancel resumes; a rerun is refused while jobs of this chain are still queued. Every task logs to
WORK/logs/STEP[_foldN|_partK].log and a failing task names its fold, part or case there; the steps after a
failed one are cancelled (--kill-on-invalid-dep=yes), never started on a broken input. The jobs inherit this
shell's environment (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) and run this Python.
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("submit", help="submit the chain to SLURM as jobs with dependencies",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", dest="dataset", required=True, metavar="DATASET", help="labeled dataset (id or name)")
    parser.add_argument("-u", dest="unlabeled", required=True, metavar="DIR", help="folder of unlabeled images")
    parser.add_argument("-t", dest="test_images", default=None, metavar="DIR", help="test images to predict")
    parser.add_argument("-l", dest="test_labels", default=None, metavar="DIR",
                        help="reference labels of the test images (enables the evaluation)")
    parser.add_argument("-r", dest="recipe", default="flare22", help="recipe name or file (default: flare22)")
    parser.add_argument("-f", dest="folds", default="0 1 2 3 4", help='teacher folds (default: "0 1 2 3 4")')
    parser.add_argument("-s", dest="student_folds", default=None, help="student folds (default: the teacher folds)")
    parser.add_argument("-o", dest="pseudo", default=None, metavar="NAME_OR_ID",
                        help="pseudo-labeled dataset (default: the one recorded in the plans, else the next free id)")
    parser.add_argument("-w", dest="work", default=None, metavar="DIR",
                        help="work folder: logs, batch scripts, predictions (default: "
                             "$nnUNet_results/noisy_student_pipeline/DatasetXXX_Name)")
    parser.add_argument("-D", dest="device", default="cuda", choices=["cuda", "cpu"], help="default: cuda")
    parser.add_argument("-p", dest="plans", default="nnUNetLowFootprintPlans", help="plans name")
    parser.add_argument("--parts", type=int, default=1, help="pseudo-label parts, one array task each (default 1)")
    parser.add_argument("--predict-parts", dest="predict_parts", type=int, default=1,
                        help="prediction parts, one array task each (default 1)")
    parser.add_argument("--partition", default=None, help="SLURM partition of every job")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs per job (--gres=gpu:N; default 1 with -D cuda, 0 with -D cpu)")
    parser.add_argument("--cpus", type=int, default=None,
                        help="CPUs per job (--cpus-per-task; default 8 with -D cuda, 1 with -D cpu); the jobs' "
                             "trainers and predictors use that many threads")
    parser.add_argument("--time", default=None, help="time limit of every job (sbatch --time)")
    parser.add_argument("--mem", default=None, help="memory of every job (sbatch --mem)")
    parser.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[], metavar="ARG",
                        help="a further sbatch argument for every job (repeatable), e.g. --sbatch-arg=--account=X")
    parser.add_argument("--until", default=None,
                        choices=["plan", "teachers", "pseudolabel", "students", "finetune", "predict"],
                        help="submit the chain up to this step only (pseudolabel: with its finalize)")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true",
                        help="print the sbatch lines and submit nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noisy_student_nnunet.cluster.slurm import SlurmOptions, dry_run_lines, plan_jobs, submit

    chain = _chain(args)
    gpus = args.gpus if args.gpus is not None else (1 if args.device == "cuda" else 0)
    cpus = args.cpus if args.cpus is not None else (8 if args.device == "cuda" else 1)
    from noisy_student_nnunet import validation

    validation.at_least(gpus, "--gpus", 0)
    validation.at_least(cpus, "--cpus", 1)
    options = SlurmOptions(args.partition, gpus, cpus, args.time, args.mem, tuple(args.sbatch_args))
    jobs = plan_jobs(chain, args.until)
    if not jobs:
        print(f"nsn submit: every step of the chain in {chain.work} is done; nothing submitted")
        return 0
    if args.dry_run:
        print("\n".join(dry_run_lines(chain, jobs, options)))
        return 0
    chain.write()
    ids = submit(chain, jobs, options)
    for job in jobs:
        print(f"{job.describe():<28} job {ids[job.step]}" + (f"  afterok {', '.join(job.after)}" if job.after
                                                               else ""))
    print(f"logs: {chain.work}/logs; state: squeue, sacct; resume: run this command again")
    return 0


def _chain(args: argparse.Namespace):
    """The chain's settings: those of an earlier submission of this work folder, else from the arguments."""
    import os
    from pathlib import Path

    from noisy_student_nnunet import validation
    from noisy_student_nnunet.cluster.chain import Chain, chain_file
    from noisy_student_nnunet.errors import NsnError
    from noisy_student_nnunet.pseudolabel import dataset as ds

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(var):
            raise NsnError(f"environment variable {var} is not set")
    validation.at_least(args.parts, "--parts", 1)
    validation.at_least(args.predict_parts, "--predict-parts", 1)
    dataset = ds.resolve_dataset(args.dataset, "-d")
    unlabeled = Path(args.unlabeled).resolve()
    if not unlabeled.is_dir():
        raise NsnError(f"-u: not a folder: {args.unlabeled}")
    for option, folder in (("-t", args.test_images), ("-l", args.test_labels)):
        if folder is not None and not Path(folder).is_dir():
            raise NsnError(f"{option}: not a folder: {folder}")
    work = Path(args.work or Path(os.environ["nnUNet_results"]) / "noisy_student_pipeline" / dataset).resolve()
    folds = tuple(args.folds.split())
    student_folds = tuple((args.student_folds or args.folds).split())
    if not folds or not student_folds:
        raise NsnError("-f and -s need at least one fold")
    wanted = Chain(dataset=dataset, unlabeled=str(unlabeled), work=str(work),
                   pseudo_dataset=_pseudo_name(args.pseudo, dataset, args.plans), recipe=args.recipe,
                   plans=args.plans, teacher_folds=folds, student_folds=student_folds, device=args.device,
                   pseudo_parts=args.parts, test_images=_absolute(args.test_images),
                   test_labels=_absolute(args.test_labels), predict_parts=args.predict_parts, python=sys.executable)
    existing = chain_file(work)
    if existing.is_file():
        before = Chain.read(existing)
        if args.pseudo is None:  # the name chosen at the first submission stays
            wanted = Chain(**{**wanted.__dict__, "pseudo_dataset": before.pseudo_dataset})
        if before != wanted:
            changed = [k for k in wanted.__dict__ if k != "python" and getattr(before, k) != getattr(wanted, k)]
            raise NsnError(f"{existing} was submitted with other settings ({', '.join(changed)}): use another -w, "
                           f"or the same arguments to resume")
    return wanted


def _absolute(folder: str | None) -> str | None:
    from pathlib import Path

    return None if folder is None else str(Path(folder).resolve())


def _pseudo_name(requested: str | None, dataset: str, plans: str) -> str:
    """-o as a dataset name: a given one (a name, or an id made a name), the plans' recorded one, or the next
    free id, chosen now so that every part writes to the same dataset."""
    import json
    import os
    from pathlib import Path

    from noisy_student_nnunet.pseudolabel import dataset as ds

    if requested is not None:
        if requested.isdigit():
            taken = ds.datasets_with_id(int(requested))
            return taken[0] if taken else ds.default_output_name(int(requested), dataset)
        return requested
    plans_file = Path(os.environ["nnUNet_preprocessed"]) / dataset / f"{plans}.json"
    if plans_file.is_file():
        recorded = ((json.loads(plans_file.read_text()).get("noisy_student_recipe") or {}).get("student") or {}).get(
            "pseudo_dataset")
        if recorded:
            return recorded
    return ds.default_output_name(ds.next_free_id(int(dataset[7:10]) + 1), dataset)
