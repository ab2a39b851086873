"""The chain as a graph of SLURM jobs with ``afterok`` dependencies, and its submission with ``sbatch``.

teachers (array over folds) -> pseudo-label parts (array) -> finalize -> students (array over folds) -> fine-tune
-> prediction parts (array) -> evaluation; the plan first where the plans are missing. Only the steps whose outputs
are incomplete are submitted, and a step depends only on the submitted steps before it. Every job carries
``--kill-on-invalid-dep=yes``: when a step fails, what depends on it is cancelled instead of waiting forever, and
never starts on a broken input.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from noisy_student_nnunet.cluster.chain import STUDENT, TEACHER, Chain
from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.outputs import atomic_write_text


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of every job; ``extra``: further ``sbatch`` arguments, as given."""

    partition: str | None = None
    gpus: int = 0
    cpus: int = 1
    time: str | None = None
    mem: str | None = None
    extra: tuple[str, ...] = ()

    def arguments(self) -> list[str]:
        args = [f"--cpus-per-task={self.cpus}"]
        args += [f"--partition={self.partition}"] if self.partition else []
        args += [f"--gres=gpu:{self.gpus}"] if self.gpus else []
        args += [f"--time={self.time}"] if self.time else []
        args += [f"--mem={self.mem}"] if self.mem else []
        return args + list(self.extra)


@dataclass(frozen=True)
class Job:
    """One ``sbatch`` of the chain: a step, its array indices (None: a single job) and the steps it waits for."""

    step: str
    indices: tuple[int, ...] | None
    after: tuple[str, ...]
    log: str  # file name under WORK/logs, with %a for the array index

    def describe(self) -> str:
        return self.step + (f" [{','.join(map(str, self.indices))}]" if self.indices is not None else "")


def _fold_indices(folds: list[str], all_folds: tuple[str, ...]) -> tuple[int, ...]:
    """Array indices of ``folds``: their numbers where every fold is a number (logs name the fold), else positions."""
    if all(f.isdigit() for f in all_folds):
        return tuple(int(f) for f in folds)
    return tuple(all_folds.index(f) for f in folds)


#: the steps in chain order; ``--until`` names one of the first six (``pseudolabel`` includes its finalize)
STEP_ORDER = ("plan", "teachers", "pseudolabel", "finalize", "students", "finetune", "predict", "evaluate")


def plan_jobs(chain: Chain, until: str | None = None) -> list[Job]:
    """The jobs still to run, in order, each waiting for the submitted jobs it needs; none after ``until``."""
    jobs: list[Job] = []
    submitted: set[str] = set()

    def add(step: str, indices: tuple[int, ...] | None, needs: tuple[str, ...], log: str) -> None:
        if indices is not None and not indices:
            return
        jobs.append(Job(step, indices, tuple(s for s in needs if s in submitted), log))
        submitted.add(step)

    if not chain.plans_done():
        add("plan", None, (), "plan.log")
    add("teachers", _fold_indices(chain.folds_to_train(TEACHER), chain.teacher_folds), ("plan",),
        "teachers_fold%a.log")
    if not chain.pseudo_labels_done():
        add("pseudolabel", tuple(range(chain.pseudo_parts)), ("teachers",), "pseudolabel_part%a.log")
        add("finalize", None, ("pseudolabel",), "pseudolabel_finalize.log")
    add("students", _fold_indices(chain.folds_to_train(STUDENT), chain.student_folds), ("finalize",),
        "students_fold%a.log")
    if not chain.finetune_done():
        add("finetune", None, ("students",), "finetune.log")
    if chain.test_images is not None and not chain.predictions_done():
        add("predict", tuple(range(chain.predict_parts)), ("finetune",), "predict_part%a.log")
    if chain.test_images is not None and not chain.evaluation_done():
        add("evaluate", None, ("predict",), "evaluate.log")
    if until is not None:
        last = STEP_ORDER.index("finalize" if until == "pseudolabel" else until)
        jobs = [job for job in jobs if STEP_ORDER.index(job.step) <= last]
    return jobs


def chain_tag(work: Path) -> str:
    """A short tag of the work folder: every job name of this chain starts with ``nsn-TAG-``."""
    return hashlib.sha1(str(work.resolve()).encode()).hexdigest()[:6]


def job_script(chain: Chain, step: str) -> str:
    """The batch script of one step: the task runner with this chain's settings file."""
    python = shlex.quote(chain.python)
    index = ' "${SLURM_ARRAY_TASK_ID:-0}"'
    return ("#!/bin/bash\n# one step of the noisy-student chain, written by nsn submit\nset -eo pipefail\n"
            f"exec {python} -m noisy_student_nnunet.cluster.task {shlex.quote(str(chain.state_file))} {step}{index}\n")


def sbatch_arguments(chain: Chain, job: Job, options: SlurmOptions, dependencies: list[str]) -> list[str]:
    work = Path(chain.work)
    args = ["sbatch", "--parsable", f"--job-name=nsn-{chain_tag(work)}-{job.step}",
            f"--output={work / 'logs' / job.log}", "--kill-on-invalid-dep=yes", *options.arguments()]
    if job.indices is not None:
        args.append(f"--array={','.join(map(str, job.indices))}")
    if dependencies:
        args.append(f"--dependency=afterok:{':'.join(dependencies)}")
    return args + [str(work / "slurm" / f"{job.step}.sbatch")]


def active_jobs(work: Path) -> list[str]:
    """Names of this chain's jobs that SLURM still holds (pending or running)."""
    result = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True)
    if result.returncode != 0:
        raise NsnError(f"squeue failed: {result.stderr.strip() or 'exit ' + str(result.returncode)}")
    prefix = f"nsn-{chain_tag(work)}-"
    return [line for line in result.stdout.splitlines() if len(line.split()) > 1 and line.split()[1].startswith(prefix)]


def dry_run_lines(chain: Chain, jobs: list[Job], options: SlurmOptions) -> list[str]:
    """Shell lines that would submit ``jobs``: each job id in a variable named after its step."""
    lines = []
    for job in jobs:
        args = sbatch_arguments(chain, job, options, [f"${var}" for var in job.after])
        lines.append(f"{job.step}=$({' '.join(_quote(a) for a in args)})")
    return lines


def _quote(argument: str) -> str:
    return argument if argument.startswith("--dependency=") else shlex.quote(argument)


def submit(chain: Chain, jobs: list[Job], options: SlurmOptions) -> dict[str, str]:
    """Write the batch scripts and submit ``jobs`` in order; step -> job id."""
    if shutil.which("sbatch") is None:
        raise NsnError("sbatch not found: nsn submit needs SLURM's client commands on PATH (or use --dry-run)")
    work = Path(chain.work)
    busy = active_jobs(work)
    if busy:
        raise NsnError(f"{len(busy)} job(s) of this chain are still queued or running (first: {busy[0]}): wait "
                       f"for them or scancel them before submitting again")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    for job in jobs:
        atomic_write_text(work / "slurm" / f"{job.step}.sbatch", job_script(chain, job.step))
        args = sbatch_arguments(chain, job, options, [ids[step] for step in job.after])
        result = subprocess.run(args, capture_output=True, text=True)
        if result.returncode != 0:
            submitted = ", ".join(f"{s} {i}" for s, i in ids.items()) or "none"
            raise NsnError(f"sbatch of step {job.step} failed: {result.stderr.strip()} (submitted before it: "
                           f"{submitted})")
        ids[job.step] = result.stdout.strip().split(";")[0]
    return ids
