"""``nsn submit`` on a real SLURM: a one-node cluster started on this machine (``slurm_local.py``), the tiny recipe's
chain submitted and run to its evaluation, a corrupt unlabeled scan, and an ``scancel`` followed by a rerun.

The cluster needs root and Debian's slurm-wlm and munge (``.ci/run`` installs them). Without them the SLURM tests
skip and say why; with ``NSN_REQUIRE_SLURM=1`` (set by CI) they fail instead. The dry run needs no cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slurm_local
from conftest import console_script, subprocess_env

DATASET_ID = 611
PSEUDO = "Dataset612_SlurmPseudo"


def _cluster_or_skip(folder: Path):
    why = slurm_local.unavailable()
    if why is None:
        try:
            return slurm_local.start(folder)
        except RuntimeError as error:
            why = f"the local SLURM cluster did not start: {error}"
    if os.environ.get("NSN_REQUIRE_SLURM") == "1":
        pytest.fail(f"NSN_REQUIRE_SLURM=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A cluster, nnU-Net folders of their own and a phantom dataset (8 labeled, 12 unlabeled, 2 test)."""
    root = tmp_path_factory.mktemp("slurm")
    cluster = _cluster_or_skip(root / "cluster")
    folders = {var: root / var for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in folders.values():
        folder.mkdir()
    env = subprocess_env({**{k: str(v) for k, v in folders.items()}, **cluster.env, "nnUNet_n_proc_DA": "0",
                          "nnUNet_compile": "0", "nnUNet_def_n_proc": "1", "NSN_NUM_THREADS": "1"})
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    subprocess.run([console_script("nsn"), "phantoms", "-d", str(DATASET_ID), "--name", "Slurm", "-n", "8", "-u", "12",
                    "-t", "2", "--slices", "16", "20", "--inplane-voxels", "48", "56"], env=env, check=True,
                   capture_output=True)
    yield cluster, env, folders["nnUNet_raw"] / f"Dataset{DATASET_ID}_Slurm", root
    cluster.stop()


def submit(env: dict, raw: Path, unlabeled: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("nsn"), "submit", "-d", str(DATASET_ID), "-u", str(unlabeled),
                           "-t", str(raw / "imagesTs"), "-l", str(raw / "labelsTs"), "-r", "tiny", "-f", "0 1",
                           "-s", "0", "-o", PSEUDO, "-D", "cpu", "--parts", "2", "--predict-parts", "2",
                           "-w", str(work), *extra], env=env, capture_output=True, text=True, timeout=120)


def job_ids(done: subprocess.CompletedProcess) -> dict[str, str]:
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"$ nsn submit ...\n{done.stdout}", flush=True)  # the record of a run with -s
    return dict(re.findall(r"^(\w+)(?: \[[\d,]+\])?\s+job (\d+)", done.stdout, re.M))


def report(cluster, title: str, ids: dict[str, str]) -> None:
    """Print each submitted step's task states (with pytest -s: the test's log)."""
    print(f"--- {title}")
    for step, job in ids.items():
        print(f"{step:<12} job {job:<5} " + " ".join(f"{task}:{state}" for task, state in states(cluster, job).items()))


def wait_idle(cluster, timeout: float = 1500) -> None:
    """Until SLURM holds no job (finished, failed or cancelled)."""
    deadline = time.monotonic() + timeout
    while cluster.command("squeue", "-h", "-o", "%i").strip():
        assert time.monotonic() < deadline, cluster.command("squeue")
        time.sleep(2)


def states(cluster, job: str) -> dict[str, str]:
    """Task (JOBID, or JOBID_INDEX of an array) -> its state, from slurmctld (which keeps finished jobs an hour).
    sacct's completion log loses the array index of each task, so it serves for the printed record only."""
    found = {}
    for line in cluster.command("scontrol", "-o", "show", "job", job).splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "JobState" in fields:
            task = fields.get("ArrayTaskId")
            found[f"{job}_{task}" if task else job] = fields["JobState"]
    return found


def test_dry_run_prints_the_job_graph_of_the_flare22_recipe(world, tmp_path):
    _, env, raw, _ = world
    done = subprocess.run([console_script("nsn"), "submit", "-d", str(DATASET_ID), "-u", str(raw / "imagesUnlabeled"),
                           "-t", str(raw / "imagesTs"), "-r", "flare22", "--parts", "16", "--partition", "gpu",
                           "--time", "12:00:00", "--mem", "32G", "--sbatch-arg=--account=lab", "-w", str(tmp_path),
                           "--dry-run"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    print(f"$ nsn submit -d {DATASET_ID} -u ... -r flare22 --parts 16 --partition gpu --time 12:00:00 --mem 32G "
          f"--sbatch-arg=--account=lab --dry-run\n{done.stdout}")
    lines = done.stdout.splitlines()
    assert [line.split("=", 1)[0] for line in lines] == ["plan", "teachers", "pseudolabel", "finalize", "students",
                                                         "finetune", "predict", "evaluate"][:len(lines)]
    steps = dict(line.split("=", 1) for line in lines)
    assert "--array=0,1,2,3,4" in steps["teachers"] and "--dependency=afterok:$plan" in steps["teachers"]
    assert f"--array={','.join(map(str, range(16)))}" in steps["pseudolabel"]
    assert "--dependency=afterok:$pseudolabel" in steps["finalize"]
    assert "--dependency=afterok:$finalize" in steps["students"] and "--gres=gpu:1" in steps["students"]
    for line in lines:
        assert all(a in line for a in ("--partition=gpu", "--time=12:00:00", "--mem=32G", "--account=lab",
                                       "--kill-on-invalid-dep=yes"))
    assert not (tmp_path / "slurm").exists()  # a dry run writes nothing


def test_the_chain_runs_on_slurm_names_a_corrupt_scan_and_resumes_after_scancel(world):
    cluster, env, raw, root = world
    unlabeled = root / "unlabeled"
    unlabeled.mkdir()
    scans = sorted((raw / "imagesUnlabeled").glob("*_0000.nii.gz"))
    for scan in scans[:4]:  # the first submission sees 4 scans; the other 8 arrive before the second
        shutil.copy(scan, unlabeled)
    corrupt = unlabeled / scans[1].name  # part 1 of 2 (cases[1::2])
    corrupt.write_bytes(corrupt.read_bytes()[:2000])
    work = root / "work"
    labels = Path(env["nnUNet_raw"]) / PSEUDO / "labelsTr"

    # 1. a corrupt unlabeled scan: its part fails and names it, the other part finishes, nothing after runs
    first = job_ids(submit(env, raw, unlabeled, work))
    assert list(first) == ["plan", "teachers", "pseudolabel", "finalize", "students", "finetune", "predict",
                           "evaluate"]
    wait_idle(cluster)
    report(cluster, "1. a corrupt unlabeled scan", first)
    pseudo = states(cluster, first["pseudolabel"])
    assert pseudo == {f"{first['pseudolabel']}_0": "COMPLETED", f"{first['pseudolabel']}_1": "FAILED"}, pseudo
    assert set(states(cluster, first["teachers"]).values()) == {"COMPLETED"}
    case = corrupt.name[: -len("_0000.nii.gz")]
    failure = [line for line in (work / "logs" / "pseudolabel_part1.log").read_text().splitlines() if case in line]
    print("pseudolabel_part1.log:", *failure, sep="\n  ")
    assert failure
    assert not (work / "logs" / "pseudolabel_finalize.log").exists()  # cancelled before it started
    for step in ("finalize", "students", "finetune", "evaluate"):
        assert set(states(cluster, first[step]).values()) <= {"CANCELLED"}, (step, states(cluster, first[step]))

    # 2. the scan mended and 8 more: a rerun submits only what is incomplete; the parts are cancelled mid-way
    for scan in scans[1:]:
        shutil.copy(scan, unlabeled)
    labeled_before = len(list(labels.glob("*.nii.gz")))
    second = job_ids(submit(env, raw, unlabeled, work))
    assert "plan" not in second and "teachers" not in second and "pseudolabel" in second
    deadline = time.monotonic() + 600
    while len(list(labels.glob("*.nii.gz"))) <= labeled_before:  # the first new case is written
        assert time.monotonic() < deadline, cluster.command("squeue")
        time.sleep(0.2)
    cluster.command("scancel", second["pseudolabel"])
    print(f"$ scancel {second['pseudolabel']}  (after {len(list(labels.glob('*.nii.gz')))} of {len(scans)} "
          f"cases were pseudo-labeled)")
    wait_idle(cluster)
    report(cluster, "2. the scan mended, 8 more, the pseudo-label parts cancelled while running", second)
    assert "CANCELLED" in set(states(cluster, second["pseudolabel"]).values())
    assert len(list(labels.glob("*.nii.gz"))) < len(scans)
    assert not (work / "evaluation_summary.json").exists()

    # 3. a rerun completes the chain, every unlabeled case pseudo-labeled once
    third = job_ids(submit(env, raw, unlabeled, work))
    assert "teachers" not in third
    wait_idle(cluster)
    report(cluster, "3. rerun: the chain completes", third)
    print((work / "logs" / "evaluate.log").read_text())
    for step, job in third.items():
        assert set(states(cluster, job).values()) == {"COMPLETED"}, (step, states(cluster, job))
    # every unlabeled case once in the student's dataset: its labels and its preprocessed cases
    expected = sorted(p.name.replace("_0000.nii.gz", "") for p in unlabeled.glob("*_0000.nii.gz"))
    assert len(expected) == len(scans)
    assert sorted(p.name[: -len(".nii.gz")] for p in labels.glob("*.nii.gz")) == expected
    dataset_json = json.loads((labels.parent / "dataset.json").read_text())
    assert dataset_json["numTraining"] == len(expected)
    summary = json.loads((work / "evaluation_summary.json").read_text())
    assert len(summary["per_structure"]) == 13 and 0 <= summary["overall"]["DSC"]["mean"] <= 1
    assert json.loads((work / "slurm" / "chain.json").read_text())["pseudo_dataset"] == PSEUDO
    # nothing left to do: a fourth submission submits nothing
    fourth = submit(env, raw, unlabeled, work)
    assert fourth.returncode == 0 and "nothing submitted" in fourth.stdout
    print(fourth.stdout)
    # sacct reads the job completion log (no accounting database here), which keeps no array indices
    sacct = cluster.command("sacct", "-c", "-o", "jobid,jobname%24,state,elapsed,start,end").splitlines()
    print("$ sacct -c", *[line for line in sacct if not line.startswith("sacct: error: Unknown type Array")],
          sep="\n")
