"""Pseudo-labels on a SLURM cluster: cases per hour against the number of parts, and what the finalize costs.

    python benchmarks/bench_slurm_pseudolabel.py --work /tmp/bench_slurm --unlabeled 64 --parts 1 2 4 \\
        --output docs/results/bench_slurm_pseudolabel/MACHINE/COMMIT.json

Starts a one-node SLURM cluster on this machine (``tests/slurm_local.py``: root, Debian's slurm-wlm and munge),
makes ``nsn demo``-sized phantoms (8 labeled, ``--unlabeled`` unlabeled), plans them with the demo recipe's
network and trains its two teacher folds briefly through ``nsn submit --until teachers`` (the weights do not
change the time of a prediction). Then, for each ``--parts`` P, ``nsn submit --until pseudolabel --parts P``
into a pseudo-labeled dataset of its own, one CPU per part: each part's wall time from its start to its end
(slurmctld's StartTime and EndTime), the makespan from the first part's start to the finalize's end, and the
finalize's own time. The model fitted from the runs: a part costs ``startup + cases x per_case`` seconds, the
finalize ``finalize`` seconds, so N parts on N devices take ``startup + cases/N x per_case + finalize``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from _common import BIN, machine

import slurm_local  # noqa: E402  (tests/ is on sys.path through _common)

DATASET_ID = 621


def _json_recipe(work: Path, iterations: int) -> Path:
    from noisy_student_nnunet.recipe import load_recipe

    recipe = load_recipe("demo")
    recipe["name"] = "demo+brief"
    recipe["training"].update(num_epochs=1, num_iterations_per_epoch=iterations, num_val_iterations_per_epoch=1)
    path = work / "brief_recipe.json"
    path.write_text(json.dumps(recipe, indent=1))
    return path


def _submit(env: dict, raw: Path, work: Path, recipe: Path, *extra: str) -> dict[str, str]:
    done = subprocess.run([str(BIN / "nsn"), "submit", "-d", str(DATASET_ID), "-u", str(raw / "imagesUnlabeled"),
                           "-r", str(recipe), "-f", "0 1", "-s", "0", "-D", "cpu", "-w", str(work), *extra],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"nsn submit failed: {done.stderr.strip()}")
    print(done.stdout, end="", flush=True)
    return dict(re.findall(r"^(\w+)(?: \[[\d,]+\])?\s+job (\d+)", done.stdout, re.M))


def _wait(cluster, timeout: float = 7200) -> None:
    deadline = time.monotonic() + timeout
    while cluster.command("squeue", "-h", "-o", "%i").strip():
        if time.monotonic() > deadline:
            sys.exit(f"jobs still queued after {timeout:.0f} s:\n{cluster.command('squeue')}")
        time.sleep(2)


def _times(cluster, job: str) -> list[dict]:
    """Each task's state, start and end (seconds since the epoch) from slurmctld."""
    tasks = []
    for line in cluster.command("scontrol", "-o", "show", "job", job).splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "JobState" in fields:
            tasks.append({"task": fields.get("ArrayTaskId"), "state": fields["JobState"],
                          "start": datetime.fromisoformat(fields["StartTime"]).timestamp(),
                          "end": datetime.fromisoformat(fields["EndTime"]).timestamp()})
    return tasks


def _finalize_seconds(env: dict, raw: Path, work: Path) -> float:
    """Wall seconds of ``nsn pseudolabel --finalize`` run again on a finished dataset (it redoes the whole step:
    dataset.json, the confidence table, the preprocessed cases, the plans)."""
    from noisy_student_nnunet.cluster.chain import Chain, chain_file
    from noisy_student_nnunet.cluster.task import pseudolabel_command

    chain = Chain.read(chain_file(work))
    started = time.monotonic()
    done = subprocess.run([*pseudolabel_command(chain), "--finalize"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"finalize failed: {done.stderr.strip()}")
    return round(time.monotonic() - started, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--unlabeled", type=int, default=16)
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--output", type=Path, help="the JSON record")
    args = parser.parse_args()
    why = slurm_local.unavailable()
    if why:
        sys.exit(why)
    from noisy_student_nnunet.demo import PHANTOM_SIZE
    from noisy_student_nnunet.phantoms import write_phantom_dataset

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cluster = slurm_local.start(work / "cluster")
    try:
        env = {**os.environ, **cluster.env, "nnUNet_n_proc_DA": "0", "nnUNet_compile": "0", "nnUNet_def_n_proc": "1",
               "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            env[var] = str(work / var)
            (work / var).mkdir(exist_ok=True)
        os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
        raw = work / "nnUNet_raw" / f"Dataset{DATASET_ID}_BenchSlurm"
        if not raw.is_dir():
            write_phantom_dataset(work / "nnUNet_raw", DATASET_ID, name="BenchSlurm", num_labeled=8,
                                  num_unlabeled=args.unlabeled, seed=7, **PHANTOM_SIZE)
        recipe = _json_recipe(work, iterations=5)
        _submit(env, raw, work / "teachers", recipe, "--until", "teachers")
        _wait(cluster)
        runs = []
        for parts in args.parts:
            ids = _submit(env, raw, work / f"parts{parts}", recipe, "--until", "pseudolabel", "--parts", str(parts),
                          "-o", f"Dataset{DATASET_ID + parts:03d}_BenchPseudo{parts}")
            _wait(cluster)
            part_tasks, finalize = _times(cluster, ids["pseudolabel"]), _times(cluster, ids["finalize"])
            if any(t["state"] != "COMPLETED" for t in part_tasks + finalize):
                sys.exit(f"{parts} parts: a task did not complete: {part_tasks + finalize}")
            makespan = max(t["end"] for t in finalize) - min(t["start"] for t in part_tasks)
            # the last part finalized by itself (the finalize job found it done): time a finalize on its own
            refinalize = _finalize_seconds(env, raw, work / f"parts{parts}")
            runs.append({"parts": parts, "cases": args.unlabeled, "part_s": [t["end"] - t["start"] for t in part_tasks],
                         "finalize_job_s": finalize[0]["end"] - finalize[0]["start"], "finalize_s": refinalize,
                         "makespan_s": makespan,
                         "cases_per_hour": round(args.unlabeled / makespan * 3600, 1),
                         "cases_per_hour_per_part": round(args.unlabeled / parts / statistics.fmean(
                             [t["end"] - t["start"] for t in part_tasks]) * 3600, 1)})
            print(json.dumps(runs[-1]), flush=True)
    finally:
        cluster.stop()
    # the model: part time = startup + cases_per_part x per_case, least squares over every part of every run
    points = [(r["cases"] / r["parts"], seconds) for r in runs for seconds in r["part_s"]]
    if len({x for x, _ in points}) > 1:
        slope, intercept = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    else:
        slope, intercept = statistics.fmean(y for _, y in points) / points[0][0], 0.0
    model = {"startup_s": round(intercept, 1), "per_case_s": round(slope, 2),
             "finalize_s": round(statistics.fmean(r["finalize_s"] for r in runs), 1),
             "fit": "part seconds = startup_s + cases per part x per_case_s (least squares over all parts)"}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"benchmark": "bench_slurm_pseudolabel", "commit": commit, "machine": machine(),
              "parameters": {"unlabeled": args.unlabeled, "parts": args.parts, "cpus_per_part": 1,
                             "phantom_size": PHANTOM_SIZE, "network": "demo recipe (width 8, patch 16x32x32)"},
              "runs": runs, "model": model}
    print(json.dumps(record, indent=1))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
