"""What one SLURM job of the chain runs: ``python -m noisy_student_nnunet.cluster.task CHAIN_JSON STEP [INDEX]``.

Each step runs the same stock and ``nsn`` commands as the local chain, skips what is done (a requeued or rerun job
resumes), and on failure prints one line naming its step and its fold, part or case, then exits non-zero so that
SLURM's ``afterok`` holds back every step that depends on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from noisy_student_nnunet.cluster.chain import CONFIGURATION, FINETUNE, STUDENT, TEACHER, Chain
from noisy_student_nnunet.errors import NsnError

STEPS = ("plan", "teachers", "pseudolabel", "finalize", "students", "finetune", "predict", "evaluate")


def _tool(name: str) -> str:
    """A console script of this interpreter's environment (also when it is not activated)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else name


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    print(f"[nsn {what}] {' '.join(cmd)}", flush=True)
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise NsnError(f"{what} failed (exit {code}): {' '.join(cmd[:2])} ...; its messages are above")


def _resume_option(fold_folder: Path) -> list[str]:
    """As the local chain: trained but not validated -> --val; a latest checkpoint -> --c; else a fresh start."""
    if (fold_folder / "checkpoint_final.pth").is_file():
        return ["--val"]
    return ["--c"] if (fold_folder / "checkpoint_latest.pth").is_file() else []


def _train(chain: Chain, trainer: str, fold: str, what: str, env: dict[str, str] | None = None) -> None:
    if chain.fold_done(trainer, fold):
        print(f"[nsn {what}] done already", flush=True)
        return
    _run([_tool("nnUNetv2_train"), chain.dataset, CONFIGURATION, fold, "-tr", trainer, "-p", chain.plans,
          "-device", chain.device, *_resume_option(chain.results_dir(trainer) / f"fold_{fold}")], what, env)


def pseudolabel_command(chain: Chain) -> list[str]:
    """`nsn pseudolabel` for this chain's teachers, unlabeled folder and dataset (parts and finalize add theirs)."""
    return [_tool("nsn"), "pseudolabel", "-d", chain.dataset, "-i", chain.unlabeled, "-f", *chain.teacher_folds,
            "-tr", TEACHER, "-p", chain.plans, "-c", CONFIGURATION, "--student-plans", chain.plans,
            "-device", chain.device, "-o", chain.pseudo_dataset, "--disable_progress_bar"]


def _fold_of(folds: tuple[str, ...], index: int) -> str:
    """Array index -> fold: the fold's own number where every fold is a number, else its position."""
    if all(f.isdigit() for f in folds):
        if str(index) not in folds:
            raise NsnError(f"array index {index} is none of the folds {' '.join(folds)}")
        return str(index)
    return folds[index]


def _best(chain: Chain) -> str:
    best = chain.best_student_fold()
    if best is None:
        raise NsnError(f"student folds not all trained: {' '.join(chain.folds_to_train(STUDENT))}")
    return best


def run_step(chain: Chain, step: str, index: int = 0) -> None:
    """Run one job's work (see the module docstring)."""
    if step == "plan":
        if not chain.plans_done():
            _run([_tool("nsn"), "plan", "-d", chain.dataset, "--recipe", chain.recipe, "--plans-name", chain.plans],
                 "plan")
    elif step in ("teachers", "students"):
        trainer = TEACHER if step == "teachers" else STUDENT
        fold = _fold_of(chain.teacher_folds if trainer == TEACHER else chain.student_folds, index)
        _train(chain, trainer, fold, f"{step} fold {fold}")
    elif step == "pseudolabel":
        what = f"pseudolabel part {index} of {chain.pseudo_parts}"
        _run([*pseudolabel_command(chain), "--num-parts", str(chain.pseudo_parts), "--part-id", str(index)], what)
    elif step == "finalize":
        if not chain.pseudo_labels_done():  # the last part to finish finalizes by itself
            _run([*pseudolabel_command(chain), "--finalize"], "pseudolabel finalize")
    elif step == "finetune":
        best = _best(chain)
        source = chain.results_dir(STUDENT) / f"fold_{best}" / "checkpoint_final.pth"
        _train(chain, FINETUNE, best, f"finetune of student fold {best}", {**os.environ, "NSN_FINETUNE_FROM":
                                                                           str(source)})
    elif step == "predict":
        if chain.test_images is None or chain.predictions_done():
            return
        _run([_tool("nnUNetv2_predict_lowfootprint"), "-i", chain.test_images, "-o", str(chain.predictions),
              "-d", chain.dataset, "-p", chain.plans, "-c", CONFIGURATION, "-tr", FINETUNE, "-f", _best(chain),
              "-device", chain.device, "--continue_prediction", "--disable_progress_bar",
              "-num_parts", str(chain.predict_parts), "-part_id", str(index)],
             f"predict part {index} of {chain.predict_parts}")
    elif step == "evaluate":
        if chain.test_images is None:
            return
        _check_predictions(chain)
        (chain.predictions / ".complete").touch()
        if chain.test_labels is not None:
            dataset_json = Path(os.environ["nnUNet_raw"]) / chain.dataset / "dataset.json"
            _run([_tool("nsn"), "evaluate", chain.test_labels, str(chain.predictions), "--labels", str(dataset_json),
                  "-o", str(Path(chain.work) / "evaluation.csv"), "--summary", str(chain.evaluation_summary)],
                 "evaluate")
    else:
        raise NsnError(f"unknown step {step!r}; one of {', '.join(STEPS)}")


def _check_predictions(chain: Chain) -> None:
    """Every test image has its prediction: a part that was cancelled before writing its cases is named."""
    import json

    ending = json.loads((Path(os.environ["nnUNet_raw"]) / chain.dataset / "dataset.json").read_text())["file_ending"]
    cases = sorted({p.name[: -len(ending)].rsplit("_", 1)[0] for p in Path(chain.test_images).glob(f"*{ending}")})
    missing = [c for c in cases if not (chain.predictions / f"{c}{ending}").is_file()]
    if missing:
        raise NsnError(f"{len(missing)} test case(s) have no prediction (first: {missing[0]}): rerun nsn submit")


def main(argv: list[str] | None = None) -> int:
    from noisy_student_nnunet.errors import run_guarded

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m noisy_student_nnunet.cluster.task CHAIN_JSON STEP [INDEX]", file=sys.stderr)
        return 2
    chain = Chain.read(args[0])
    if os.environ.get("SLURM_CPUS_PER_TASK"):  # the trainers' and predictors' thread count: this job's CPUs
        os.environ.setdefault("NSN_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
    index = int(args[2]) if len(args) == 3 else 0
    return run_guarded(f"nsn submit, step {args[1]}", lambda: run_step(chain, args[1], index))


if __name__ == "__main__":
    sys.exit(main())
