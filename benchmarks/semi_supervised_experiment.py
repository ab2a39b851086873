"""Does the noisy student help? The paper's claim, tested on phantoms, in two settings, with paired intervals.

Per seed: ``nsn demo --seed N --setting S`` in a work folder of its own (phantoms, two teacher folds, pseudo-labels
of their ensemble, the student on fold 0, its fine-tune, every stage scored on the seed's test phantoms with
FLARE22 DSC and NSD), then the control: teacher fold 0 trained as many iterations as student and fine-tune together
(same labeled phantoms and recipe, more epochs; dataset 993 in the seed's folders), and the pseudo-labels scored
against the unlabeled phantoms' true labels (made again from ``phantoms.json``).

Settings (``--setting``; see ``src/noisy_student_nnunet/phantoms/cohorts.py``):
- ``iid``: labeled, unlabeled and test phantoms of one distribution (the phantoms as they always were);
- ``shift``: labeled phantoms of one narrow cohort (portal-venous pancreas patients, one slice spacing, full
  coverage: FLARE22's labeled cases in kind), unlabeled and test phantoms from a broad mix (other phases, liver and
  kidney lesions, organ changes, slice spacings, kernels, scanner offsets, partial coverage).

Each finished seed writes ``RESULTS/SETTING/seedN.json`` (commit, command, machine, recipe, minutes, every stage's
per-organ DSC and NSD, the pseudo-labels' quality, per-case scores and cohorts; see
``noisy_student_nnunet.experiment_records``). A rerun skips a seed whose file has the same fingerprint (code
version, recipe, cohorts, demo arguments); ``--summarize`` only recomputes the summary from the files: each
stage's mean, and fine-tuned minus teacher fold 0, minus the teacher ensemble and minus the teacher trained as long
(paired by seed, mean with its 95 % Student-t interval), overall, per organ and per cohort of the test set.

    python benchmarks/semi_supervised_experiment.py --setting shift --seeds 0 1 2 3 4 5 6 7 --work /tmp/exp
    python benchmarks/semi_supervised_experiment.py --setting shift --summarize

``--ablations oracle teacher_augmentation pool96`` adds students that change one thing (true labels instead of
pseudo-labels, the teachers' augmentation, 96 unlabeled phantoms; see ``student_ablations.py``), each with its
fine-tune, as stages ``student_NAME`` and ``finetuned_NAME`` of the same seed's file.

One seed takes about 15 minutes on 2 CPU cores with native bf16 (demo about 10, control about 5). Extra
arguments after ``--`` go to ``nsn demo`` (``-- -u 48``: more unlabeled phantoms; ``-- --device cuda``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

# a sibling script: running a script puts benchmarks/ on sys.path
from recipe_ablation import apply_overrides, train_and_score_teacher
from student_ablations import ABLATIONS, run_ablation

from noisy_student_nnunet.demo import PHANTOM_SIZE, PLANS, RESULTS_JSON, demo_environment
from noisy_student_nnunet.experiment_records import (case_scores, load_records, markdown_table, organ_means,
                                                     per_cohort, setting_difference, summary_table, write_record)
from noisy_student_nnunet.experiment_plot import plot_differences
from noisy_student_nnunet.outputs import atomic_write_text
from noisy_student_nnunet.pseudolabel.dataset import link_or_copy

#: bump when the experiment's procedure changes what a seed's file means (old files are then rerun, not reused)
EXPERIMENT_VERSION = 2
DEMO_DATASET_ID = 990  # nsn demo's default -d
CONTROL_DATASET_ID = 993  # the demo uses 990 (labeled) and 991 (pseudo-labels)
REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPOSITORY / "docs" / "experiments"
#: demo table title -> stage name of the result files
DEMO_STAGES = {"teacher fold": "teacher", "teacher ensemble": "teacher_ensemble", "student fold": "student",
               "fine-tuned fold": "finetuned"}


def as_long_recipe(recipe: dict) -> dict:
    """The teacher's recipe with as many training iterations as the student's training and fine-tune together."""
    training, finetune = recipe["training"], recipe["finetune"]
    iterations = (training["num_epochs"] * training["num_iterations_per_epoch"]
                  + finetune["num_epochs"] * finetune["num_iterations_per_epoch"])
    epochs = math.ceil(iterations / training["num_iterations_per_epoch"])
    return apply_overrides(recipe, [f"training.num_epochs={epochs}"])


def labeled_dataset(seed_work: Path) -> Path:
    return next((seed_work / "nnUNet_raw").glob(f"Dataset{DEMO_DATASET_ID:03d}_*"))


def control_teacher(seed_work: Path, device: str) -> Path:
    """Train and predict with the equal-iteration teacher of one seed (resumes what is done); its predictions.

    The labeled and test phantoms are the demo's own, linked into a dataset of their own so that its plans
    (the demo recipe with more epochs) and results sit beside the demo's without touching them."""
    env = demo_environment(seed_work, device=device)
    raw = Path(env["nnUNet_raw"])
    labeled = labeled_dataset(seed_work)
    control = raw / f"Dataset{CONTROL_DATASET_ID:03d}_DemoControl"
    if not control.is_dir():
        partial = raw / f".{control.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(labeled, partial, copy_function=link_or_copy,
                        ignore=shutil.ignore_patterns("imagesUnlabeled"))
        os.rename(partial, control)
    plans = Path(env["nnUNet_preprocessed"]) / labeled.name / f"{PLANS}.json"
    recipe = as_long_recipe(json.loads(plans.read_text())["noisy_student_recipe"])
    print(f"  control: teacher fold 0, {recipe['training']['num_epochs']} epochs", flush=True)
    train_and_score_teacher("teacher, as long", CONTROL_DATASET_ID, control, recipe, seed_work / "control", env,
                            device)
    return seed_work / "control" / "predictions"


def unlabeled_truth(seed_work: Path) -> Path:
    """The unlabeled phantoms' true labels, made again from ``phantoms.json`` (same seed and condition: same case)."""
    from noisy_student_nnunet.phantoms import remake_case

    manifest = json.loads((labeled_dataset(seed_work) / "phantoms.json").read_text())
    truth = seed_work / "unlabeled_truth"
    truth.mkdir(exist_ok=True)
    for case in manifest["cases"]:
        target = truth / f"{case['identifier']}.nii.gz"
        if case["split"] == "unlabeled" and not target.is_file():
            remake_case(case).write(truth / "image_0000.nii.gz", target)
    (truth / "image_0000.nii.gz").unlink(missing_ok=True)
    return truth


def stage_predictions(seed_work: Path) -> dict[str, Path]:
    """Stage name -> the folder of its test predictions, as ``nsn demo`` wrote them."""
    results = json.loads((seed_work / RESULTS_JSON).read_text())
    folders = {}
    for title in results["stages"]:
        kind = next(stage for prefix, stage in DEMO_STAGES.items() if title.startswith(prefix))
        folders[kind] = seed_work / "compare" / title.replace(" ", "_") / "predictions"
    return folders


def machine() -> dict:
    """CPU model, the flags that decide the speed of this code (native bf16), and cores."""
    from noisy_student_nnunet.cpu_threads import available_cores

    model, flags = platform.processor(), set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == platform.processor():
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"cpu": model, "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
            "cores": available_cores()}


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def fingerprint(setting: str, demo_args: list[str], control: bool) -> str:
    """What makes two seeds' files comparable: version, recipe, cohorts, phantom size, demo arguments, control."""
    from noisy_student_nnunet.phantoms.cohorts import COHORTS, MIXES, split_sources
    from noisy_student_nnunet.recipe import load_recipe

    recipe_name = demo_args[demo_args.index("--recipe") + 1] if "--recipe" in demo_args else "demo"
    sources = split_sources(setting)
    used = {name for source in sources.values() for name in (MIXES.get(source) or {source: 1})}
    document = {"version": EXPERIMENT_VERSION, "setting": setting, "sources": sources,
                "cohorts": {name: repr(COHORTS[name]) for name in sorted(used)},
                "mixes": {s: MIXES[s] for s in sources.values() if s in MIXES},
                "recipe": load_recipe(recipe_name), "phantom_size": PHANTOM_SIZE, "demo_args": demo_args,
                "control": control}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seed_folder(work: Path, setting: str, seed: int) -> Path:
    """Where one seed's ``nsn demo`` and ablations run (kept: ablations resume there)."""
    return (work / setting / f"seed{seed}").resolve()


def run_seed(setting: str, seed: int, work: Path, demo_args: list[str], control: bool, print_id: str,
             ablations: list[str]) -> dict:
    """Everything of one seed (resumes a half-done work folder), ``ablations`` included; its result record."""
    from noisy_student_nnunet.evaluation import evaluate_folders

    seed_work = seed_folder(work, setting, seed)
    nsn = str(Path(sys.executable).parent / "nsn")
    started = time.monotonic()
    # the whole recipe in every seed (nsn demo would size its epochs to this machine's load at the moment)
    budget = [] if "--minutes" in demo_args else ["--minutes", "0"]
    cmd = [nsn, "demo", "-w", str(seed_work), "--seed", str(seed), "--setting", setting, *demo_args, *budget]
    print(f"{setting} seed {seed}: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"nsn demo failed for {setting} seed {seed}; see {seed_work / 'demo.log'}")
    demo_minutes = (time.monotonic() - started) / 60
    results = json.loads((seed_work / RESULTS_JSON).read_text())
    predictions = stage_predictions(seed_work)
    control_minutes = None
    if control:
        started = time.monotonic()
        predictions["teacher_as_long"] = control_teacher(seed_work, results["device"])
        control_minutes = (time.monotonic() - started) / 60
    truth = unlabeled_truth(seed_work)
    ablation_minutes = {}
    for name in ablations:
        started = time.monotonic()
        predictions.update(run_ablation(name, seed_work, truth, results["device"]))
        ablation_minutes[name] = round((time.monotonic() - started) / 60, 2)

    dataset = labeled_dataset(seed_work)
    manifest = json.loads((dataset / "phantoms.json").read_text())
    cohorts = {c["identifier"]: c.get("cohort", "iid") for c in manifest["cases"] if c["split"] == "test"}
    scores = {stage: case_scores(evaluate_folders(dataset / "labelsTs", folder, progress=False))
              for stage, folder in predictions.items()}
    pseudo_labels = next((seed_work / "nnUNet_raw").glob(f"Dataset{DEMO_DATASET_ID + 1:03d}_*")) / "labelsTr"
    pseudo = case_scores(evaluate_folders(truth, pseudo_labels, progress=False))
    plans = json.loads((Path(demo_environment(seed_work)["nnUNet_preprocessed"]) / dataset.name
                        / f"{PLANS}.json").read_text())
    return {
        "setting": setting, "seed": seed, "fingerprint": print_id, "experiment_version": EXPERIMENT_VERSION,
        "commit": commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(),
        "demo_command": " ".join(["nsn", *cmd[1:]]), "device": results["device"],
        "minutes": {"demo": round(demo_minutes, 2), "control": None if control_minutes is None
                    else round(control_minutes, 2), **ablation_minutes},
        "demo_wall_time_s": results.get("wall_time_s"), "cohorts": manifest.get("cohorts"),
        "recipe": plans["noisy_student_recipe"],
        "stages": {stage: organ_means(case_scores_) for stage, case_scores_ in scores.items()},
        "pseudo_labels": organ_means(pseudo),
        "per_cohort": per_cohort(scores, cohorts),
        "cases": {case: {"cohort": cohorts[case], "stages": {stage: scores[stage][case] for stage in scores}}
                  for case in cohorts},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=("iid", "shift"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/semi_supervised"),
                        help="work folder (nnU-Net folders of every seed); a rerun resumes it")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="where the per-seed files go (SETTING/seedN.json; default docs/experiments)")
    parser.add_argument("--summarize", action="store_true",
                        help="only recompute the summary from the result files (every file of the setting)")
    parser.add_argument("--markdown", action="store_true",
                        help="with --summarize: also print the paired differences as a Markdown table")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the teacher trained as many iterations as student + fine-tune")
    parser.add_argument("--ablations", nargs="+", default=[], choices=sorted(ABLATIONS),
                        help="students that change one thing (student_ablations.py); a seed whose file lacks them "
                             "is run again (its work folder resumes)")
    parser.add_argument("demo_args", nargs=argparse.REMAINDER,
                        help="after --: arguments for nsn demo (not -w, --seed, --setting)")
    args = parser.parse_args()
    demo_args = [a for a in args.demo_args if a != "--"]
    folder = args.results / args.setting
    print_id = fingerprint(args.setting, demo_args, args.control)

    if not args.summarize:
        for seed in args.seeds:
            path = folder / f"seed{seed}.json"
            done = json.loads(path.read_text()) if path.is_file() else {}
            wanted = {f"{kind}_{name}" for name in args.ablations for kind in ("student", "finetuned")}
            if done.get("fingerprint") == print_id and wanted <= set(done["stages"]):
                print(f"{args.setting} seed {seed}: done ({path}), skipped", flush=True)
                continue
            seed_work = seed_folder(args.work, args.setting, seed)
            if done.get("fingerprint") == print_id and not (seed_work / RESULTS_JSON).is_file():
                # its main stages would be trained again, and their new scores would replace the committed ones
                sys.exit(f"{args.setting} seed {seed}: {path} exists but its work folder {seed_work} does not hold "
                         f"the finished demo; ablations run in the work folder of the run that wrote the file "
                         f"(give --work), or move the file away to run the whole seed again")
            # ablations the file already has stay in it (their models resume from the work folder)
            kept = {stage.split("_", 1)[1] for stage in done.get("stages", {}) if stage.startswith("student_")}
            ablations = sorted(set(args.ablations) | (kept & set(ABLATIONS)) if done.get("fingerprint") == print_id
                               else set(args.ablations))
            record = run_seed(args.setting, seed, args.work, demo_args, args.control, print_id, ablations)
            if done.get("fingerprint") == print_id:  # a rerun for ablations: the first run's minutes and commit stay
                record["minutes"].update({k: v for k, v in done["minutes"].items() if k in ("demo", "control")})
                record["ablation_commits"] = {**done.get("ablation_commits", {}),
                                              **{name: record["commit"] for name in args.ablations}}
                record["commit"] = done["commit"]
            write_record(path, record)
            print(f"{args.setting} seed {seed}: wrote {path}", flush=True)

    records = load_records(folder)
    stale = [r["seed"] for r in records if r.get("fingerprint") != print_id]
    if stale and not args.summarize:
        print(f"(files of seeds {stale} have another fingerprint: other code or settings; summarized with the rest "
              f"only under --summarize)")
        records = [r for r in records if r.get("fingerprint") == print_id]
    text = summary_table(records)
    print("\n" + text)
    if records:
        atomic_write_text(folder / "summary.txt", text + "\n")
        print(f"plot: {plot_differences(records, folder / 'summary.png')}")
        if args.markdown:
            print("\n" + markdown_table(records))
        other_setting = "iid" if args.setting == "shift" else "shift"
        other = load_records(args.results / other_setting)
        if not args.summarize:  # as for this setting: only files of this code and these settings
            other_id = fingerprint(other_setting, demo_args, args.control)
            other = [r for r in other if r.get("fingerprint") == other_id]
        if other:  # both settings have files: does the shift change the student's gain?
            shifted, iid = (records, other) if args.setting == "shift" else (other, records)
            print("\n" + setting_difference(shifted, iid))


if __name__ == "__main__":
    main()
