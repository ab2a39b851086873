"""Does the noisy student help? The paper's claim, tested on phantoms, in two settings, with paired intervals.

Per seed: ``nsn demo --seed N --setting S --minutes 0`` in a work folder of its own (phantoms, two teacher folds,
pseudo-labels of their ensemble, the student on fold 0, its fine-tune, every stage scored on the seed's test phantoms
with FLARE22 DSC and NSD), then the controls (``--controls``; dataset 993 in the seed's folders, the demo's labeled
and test phantoms, the same recipe with as many training iterations as student and fine-tune together):

- ``all``: stage ``teacher_all_as_long``, one teacher on every labeled phantom (nnU-Net's fold ``all``): what a user
  without unlabeled scans would train, and the primary control;
- ``fold0``: stage ``teacher_as_long``, teacher fold 0 (the labeled phantoms of fold 0's split).

Then every stage's model predicts test phantoms of an unseen cohort (``UNSEEN_COHORT``, in neither the labeled nor
the unlabeled split of any setting; dataset 995), reported apart as ``unseen``, and the pseudo-labels are scored
against the unlabeled phantoms' true labels (made again from ``phantoms.json``).

Settings (``--setting``; see ``src/noisy_student_nnunet/phantoms/cohorts.py``):
- ``iid``: labeled, unlabeled and test phantoms of one distribution;
- ``shift``: labeled phantoms of one narrow cohort (portal-venous pancreas patients, one slice spacing, full
  coverage: FLARE22's labeled cases in kind), unlabeled and test phantoms from a broad mix (other phases, liver and
  kidney lesions, organ changes, slice spacings, kernels, scanner offsets, partial coverage).

Seeds: development seeds (default 100-107, files under ``docs/experiments/development``) for every choice;
``--evaluation`` runs the evaluation seeds of ``docs/experiments/evaluation/protocol.json`` (1000-1015) with the
protocol's demo arguments and controls, only on a clean checkout whose tree is the protocol commit's, and records
that commit in every file.

Each finished seed writes ``RESULTS/SETTING/seedN.json`` (commit, command, machine, recipe, minutes, every stage's
per-organ DSC and NSD on the test and the unseen phantoms, each stage's cost: the labeled cases it saw, its
training iterations and CPU minutes, teachers included; the inference backend and precision; the pseudo-labels'
quality; per-case scores and cohorts; see ``noisy_student_nnunet.experiment_records``). A rerun skips a seed whose
file has the same fingerprint (code version, recipe, cohorts, demo arguments, controls); ``--summarize`` only
recomputes the summary from the files (with ``--evaluation``: the protocol's endpoints first).

    python benchmarks/semi_supervised_experiment.py --setting shift --seeds 100 101 --work /tmp/exp
    python benchmarks/semi_supervised_experiment.py --setting shift --summarize
    python benchmarks/semi_supervised_experiment.py --setting shift --summarize --evaluation

``--ablations oracle teacher_augmentation pool96`` adds students that change one thing (true labels instead of
pseudo-labels, the teachers' augmentation, 96 unlabeled phantoms; see ``student_ablations.py``), each with its
fine-tune, as stages ``student_NAME`` and ``finetuned_NAME`` of the same seed's file.

Each seed file's ``minutes`` (wall) and ``costs`` (CPU minutes per stage) say what a seed took where it ran.
Extra arguments after ``--`` go to ``nsn demo`` (``-- -u 48``: more unlabeled
phantoms; ``-- --device cuda``).
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
from noisy_student_nnunet.experiment_records import (case_scores, endpoints, load_records, markdown_table,
                                                     organ_means, per_cohort, setting_difference, summary_table,
                                                     write_record)
from noisy_student_nnunet.experiment_plot import plot_differences
from noisy_student_nnunet.outputs import atomic_write_text
from noisy_student_nnunet.pseudolabel.dataset import link_or_copy

#: bump when the experiment's procedure changes what a seed's file means (old files are then rerun, not reused)
EXPERIMENT_VERSION = 3
DEMO_DATASET_ID = 990  # nsn demo's default -d
CONTROL_DATASET_ID = 993  # the demo uses 990 (labeled) and 991 (pseudo-labels)
UNSEEN_DATASET_ID = 995
#: test phantoms of a cohort that no setting labels or leaves unlabeled
UNSEEN_COHORT = "cirrhosis_screening"
UNSEEN_CASES = 8
#: added to a seed for its unseen cohort's phantoms: their anatomy is drawn afresh, not the test phantoms' own
UNSEEN_SEED_OFFSET = 500_000
REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPOSITORY / "docs" / "experiments" / "development"
EVALUATION_RESULTS = REPOSITORY / "docs" / "experiments" / "evaluation"
PROTOCOL = EVALUATION_RESULTS / "protocol.json"
DEVELOPMENT_SEEDS = list(range(100, 108))
#: --controls name -> (stage name, nnU-Net fold)
CONTROLS = {"all": ("teacher_all_as_long", "all"), "fold0": ("teacher_as_long", "0")}
TEACHER, STUDENT, FINETUNE = "NoisyStudentTeacherTrainer", "NoisyStudentTrainer", "NoisyStudentFinetuneTrainer"
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


def control_teacher(seed_work: Path, device: str, fold: str) -> Path:
    """Train and predict with one equal-iteration teacher of one seed (resumes what is done); its predictions.

    The labeled and test phantoms are the demo's own, linked into a dataset of their own so that its plans
    (the demo recipe with more epochs) and results sit beside the demo's without touching them. ``fold``: ``all``
    (every labeled phantom) or a fold of the demo's split."""
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
    print(f"  control: teacher fold {fold}, {recipe['training']['num_epochs']} epochs", flush=True)
    prefix = seed_work / ("control" if fold == "0" else f"control_{fold}")
    train_and_score_teacher(f"teacher fold {fold}, as long", CONTROL_DATASET_ID, control, recipe, prefix, env,
                            device, fold=fold)
    return prefix / "predictions"


def trainer_folder(seed_work: Path, dataset_id: int, trainer: str, fold: str) -> Path:
    from noisy_student_nnunet.demo import CONFIGURATION

    results = Path(demo_environment(seed_work)["nnUNet_results"])
    dataset = next(results.glob(f"Dataset{dataset_id:03d}_*"))
    return dataset / f"{trainer}__{PLANS}__{CONFIGURATION}" / f"fold_{fold}"


def stage_models(seed_work: Path, results: dict, controls: list[str]) -> dict[str, tuple[int, list]]:
    """Stage name -> (dataset id, [(trainer, fold), ...]): the trainings each stage's model rests on, its
    teachers included (a student's pseudo-labels come from every teacher fold); the last ones predict."""
    teachers = [(TEACHER, str(f)) for f in results["teacher_folds"]]
    stages: dict[str, tuple[int, list]] = {}
    for title, stage in zip(results["stages"], stage_predictions(seed_work)):
        folds = results["stages"][title]["folds"]
        if stage == "teacher":
            stages[stage] = (DEMO_DATASET_ID, [(TEACHER, folds[0])])
        elif stage == "teacher_ensemble":
            stages[stage] = (DEMO_DATASET_ID, teachers)
        elif stage == "student":
            stages[stage] = (DEMO_DATASET_ID, teachers + [(STUDENT, folds[0])])
        else:
            stages[stage] = (DEMO_DATASET_ID, teachers + [(STUDENT, folds[0]), (FINETUNE, folds[0])])
    for name in controls:
        stage, fold = CONTROLS[name]
        stages[stage] = (CONTROL_DATASET_ID, [(TEACHER, fold)])
    return stages


def predicting(stage: str, trainings: list) -> list:
    """The trainings whose models predict for ``stage``: the ensemble's every fold, else the last one."""
    return trainings if stage == "teacher_ensemble" else trainings[-1:]


def stage_costs(seed_work: Path, models: dict[str, tuple[int, list]]) -> dict:
    """Per stage: the labeled cases its trainings saw, their iterations and CPU minutes, teachers included (from
    each fold's ``training_cost.json``; None where a training wrote none, or was resumed and so counted in part)."""
    from noisy_student_nnunet.training_cost import read_cost

    costs = {}
    for stage, (dataset_id, trainings) in models.items():
        records = [read_cost(trainer_folder(seed_work, dataset_id, trainer, fold)) for trainer, fold in trainings]
        whole = all(r is not None and r["start_epoch"] == 0 for r in records)
        cases = sorted({c for r in records if r for c in r["training_cases"]})
        costs[stage] = {
            "trainings": [f"{trainer} fold {fold}" for trainer, fold in trainings],
            "labeled_cases": cases if whole else None, "num_labeled_cases": len(cases) if whole else None,
            "training_iterations": sum(r["iterations"] for r in records) if whole else None,
            "cpu_minutes": round(sum(r["cpu_minutes"] for r in records), 2) if whole else None,
        }
    return costs


def unseen_cohort_dataset(seed_work: Path, seed: int, setting: str) -> Path:
    """Test phantoms of :data:`UNSEEN_COHORT` for one seed (made once; fresh anatomy, the demo's size)."""
    from noisy_student_nnunet.phantoms import write_phantom_dataset

    raw = Path(demo_environment(seed_work)["nnUNet_raw"])
    existing = sorted(raw.glob(f"Dataset{UNSEEN_DATASET_ID:03d}_*"))
    if existing:
        return existing[0]
    return write_phantom_dataset(raw, UNSEEN_DATASET_ID, name="UnseenCohort", num_labeled=1, num_unlabeled=0,
                                 num_test=UNSEEN_CASES, seed=seed + UNSEEN_SEED_OFFSET, setting=setting,
                                 cohorts={"test": UNSEEN_COHORT}, **PHANTOM_SIZE)


def predict_unseen(seed_work: Path, stage: str, dataset_id: int, trainings: list, unseen: Path,
                   device: str) -> Path:
    """One stage's predictions of the unseen cohort's test phantoms (kept when done)."""
    from noisy_student_nnunet.demo import DemoModel, predict_and_score

    chosen = predicting(stage, trainings)
    model = DemoModel(stage, chosen[0][0], tuple(fold for _, fold in chosen))
    out = seed_work / "unseen" / stage
    predict_and_score(model, dataset_id, unseen / "imagesTs", unseen / "labelsTs", unseen / "dataset.json", out,
                      demo_environment(seed_work, device=device), device)
    return out / "predictions"


def inference_settings(device: str) -> dict:
    """The backend and precision the predictor and ``nsn pseudolabel`` choose with their defaults, as every
    stage and the pseudo-labels are predicted."""
    from noisy_student_nnunet.inference.backend import choose_backend
    from noisy_student_nnunet.inference.precision import choose_precision

    return {"backend": choose_backend("auto", device).name, "precision": choose_precision("auto", device).name}


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


def fingerprint(setting: str, demo_args: list[str], controls: list[str]) -> str:
    """What makes two seeds' files comparable: version, recipe, cohorts, phantom size, demo arguments, controls."""
    from noisy_student_nnunet.phantoms.cohorts import COHORTS, MIXES, split_sources
    from noisy_student_nnunet.recipe import load_recipe

    recipe_name = demo_args[demo_args.index("--recipe") + 1] if "--recipe" in demo_args else "demo"
    sources = split_sources(setting)
    used = {name for source in sources.values() for name in (MIXES.get(source) or {source: 1})} | {UNSEEN_COHORT}
    document = {"version": EXPERIMENT_VERSION, "setting": setting, "sources": sources,
                "cohorts": {name: repr(COHORTS[name]) for name in sorted(used)},
                "mixes": {s: MIXES[s] for s in sources.values() if s in MIXES},
                "recipe": load_recipe(recipe_name), "phantom_size": PHANTOM_SIZE, "demo_args": demo_args,
                "controls": sorted(controls), "unseen": [UNSEEN_CASES, UNSEEN_SEED_OFFSET]}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seed_folder(work: Path, setting: str, seed: int) -> Path:
    """Where one seed's ``nsn demo`` and ablations run (kept: ablations resume there)."""
    return (work / setting / f"seed{seed}").resolve()


def timed(minutes: dict, name: str):
    """A context that adds its wall minutes to ``minutes[name]``."""
    import contextlib

    @contextlib.contextmanager
    def clock():
        started = time.monotonic()
        try:
            yield
        finally:
            minutes[name] = round(minutes.get(name, 0.0) + (time.monotonic() - started) / 60, 2)

    return clock()


def run_seed(setting: str, seed: int, work: Path, demo_args: list[str], controls: list[str], print_id: str,
             ablations: list[str]) -> dict:
    """Everything of one seed (resumes a half-done work folder), ``ablations`` included; its result record."""
    from noisy_student_nnunet.evaluation import evaluate_folders

    seed_work = seed_folder(work, setting, seed)
    nsn = str(Path(sys.executable).parent / "nsn")
    minutes: dict[str, float] = {}
    # the whole recipe in every seed (nsn demo would size its epochs to this machine's load at the moment)
    budget = [] if "--minutes" in demo_args else ["--minutes", "0"]
    cmd = [nsn, "demo", "-w", str(seed_work), "--seed", str(seed), "--setting", setting, *demo_args, *budget]
    print(f"{setting} seed {seed}: {' '.join(cmd)}", flush=True)
    with timed(minutes, "demo"):
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"nsn demo failed for {setting} seed {seed}; see {seed_work / 'demo.log'}")
    results = json.loads((seed_work / RESULTS_JSON).read_text())
    device = results["device"]
    predictions = stage_predictions(seed_work)
    for name in controls:
        with timed(minutes, f"control_{name}"):
            predictions[CONTROLS[name][0]] = control_teacher(seed_work, device, CONTROLS[name][1])
    truth = unlabeled_truth(seed_work)
    for name in ablations:
        with timed(minutes, name):
            predictions.update(run_ablation(name, seed_work, truth, device))

    models = stage_models(seed_work, results, controls)
    unseen = unseen_cohort_dataset(seed_work, seed, setting)
    with timed(minutes, "unseen"):
        unseen_predictions = {stage: predict_unseen(seed_work, stage, *models[stage], unseen, device)
                              for stage in models}
    dataset = labeled_dataset(seed_work)
    manifest = json.loads((dataset / "phantoms.json").read_text())
    cohorts = {c["identifier"]: c.get("cohort", "iid") for c in manifest["cases"] if c["split"] == "test"}
    scores = {stage: case_scores(evaluate_folders(dataset / "labelsTs", folder, progress=False))
              for stage, folder in predictions.items()}
    unseen_scores = {stage: case_scores(evaluate_folders(unseen / "labelsTs", folder, progress=False))
                     for stage, folder in unseen_predictions.items()}
    pseudo_labels = next((seed_work / "nnUNet_raw").glob(f"Dataset{DEMO_DATASET_ID + 1:03d}_*")) / "labelsTr"
    pseudo = case_scores(evaluate_folders(truth, pseudo_labels, progress=False))
    plans = json.loads((Path(demo_environment(seed_work)["nnUNet_preprocessed"]) / dataset.name
                        / f"{PLANS}.json").read_text())
    return {
        "setting": setting, "seed": seed, "fingerprint": print_id, "experiment_version": EXPERIMENT_VERSION,
        "commit": commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(),
        "demo_command": " ".join(["nsn", *cmd[1:]]), "device": device, "inference": inference_settings(device),
        "minutes": minutes, "demo_wall_time_s": results.get("wall_time_s"), "cohorts": manifest.get("cohorts"),
        "recipe": plans["noisy_student_recipe"],
        "costs": stage_costs(seed_work, models),
        "stages": {stage: organ_means(case_scores_) for stage, case_scores_ in scores.items()},
        "unseen": {stage: organ_means(case_scores_) for stage, case_scores_ in unseen_scores.items()},
        "unseen_cohort": UNSEEN_COHORT,
        "pseudo_labels": organ_means(pseudo),
        "per_cohort": per_cohort(scores, cohorts),
        "cases": {case: {"cohort": cohorts[case], "stages": {stage: scores[stage][case] for stage in scores}}
                  for case in cohorts},
        "unseen_cases": {case: {stage: unseen_scores[stage][case] for stage in unseen_scores}
                         for case in next(iter(unseen_scores.values()), {})},
    }


def load_protocol() -> dict:
    """The evaluation protocol and the commit that last wrote it (git's answer, not the file's)."""
    if not PROTOCOL.is_file():
        sys.exit(f"--evaluation: no protocol at {PROTOCOL}; commit one before any evaluation seed runs")
    protocol = json.loads(PROTOCOL.read_text())
    found = subprocess.run(["git", "-C", str(REPOSITORY), "log", "-1", "--format=%h", "--", str(PROTOCOL)],
                           capture_output=True, text=True).stdout.strip()
    if not found:
        sys.exit(f"--evaluation: {PROTOCOL} is not committed; commit the protocol before any evaluation seed runs")
    protocol["commit"] = found
    return protocol


def check_evaluation_checkout(protocol: dict) -> None:
    """Evaluation seeds run only on a clean checkout whose tree is the protocol commit's."""
    head = commit()
    if head.endswith("+dirty"):
        sys.exit("--evaluation: the checkout has uncommitted changes; run the evaluation seeds from a clean "
                 f"`git worktree add DIR {protocol['commit']}`")
    same = subprocess.run(["git", "-C", str(REPOSITORY), "diff", "--quiet", protocol["commit"], "HEAD"])
    if same.returncode != 0:
        sys.exit(f"--evaluation: HEAD ({head}) differs from the protocol commit {protocol['commit']}; run the "
                 f"evaluation seeds from `git worktree add DIR {protocol['commit']}`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=("iid", "shift"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="default: the development seeds 100-107, or the protocol's with --evaluation")
    parser.add_argument("--evaluation", action="store_true",
                        help="the evaluation seeds of docs/experiments/evaluation/protocol.json, at its commit; with "
                             "--summarize: the protocol's endpoints from their files")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/semi_supervised"),
                        help="work folder (nnU-Net folders of every seed); a rerun resumes it")
    parser.add_argument("--results", type=Path,
                        help="where the per-seed files go (SETTING/seedN.json; default docs/experiments/development, "
                             "with --evaluation docs/experiments/evaluation)")
    parser.add_argument("--summarize", action="store_true",
                        help="only recompute the summary from the result files (every file of the setting)")
    parser.add_argument("--markdown", action="store_true",
                        help="with --summarize: also print the paired differences as a Markdown table")
    parser.add_argument("--controls", nargs="*", default=["all"], choices=sorted(CONTROLS),
                        help="equal-iteration teachers: all (fold all, the primary control; default), fold0")
    parser.add_argument("--ablations", nargs="+", default=[], choices=sorted(ABLATIONS),
                        help="students that change one thing (student_ablations.py); a seed whose file lacks them "
                             "is run again (its work folder resumes)")
    parser.add_argument("demo_args", nargs=argparse.REMAINDER,
                        help="after --: arguments for nsn demo (not -w, --seed, --setting)")
    args = parser.parse_args()
    demo_args = [a for a in args.demo_args if a != "--"]
    controls = sorted(set(args.controls))
    results_root = args.results or (EVALUATION_RESULTS if args.evaluation else DEFAULT_RESULTS)
    protocol = None
    if args.evaluation:
        protocol = load_protocol()
        if demo_args or args.ablations or args.controls != ["all"]:
            sys.exit("--evaluation: the protocol fixes the demo arguments and controls; give none")
        demo_args, controls = list(protocol["demo_args"]), sorted(protocol["controls"])
        seeds = args.seeds or protocol["seeds"]
        if not set(seeds) <= set(protocol["seeds"]):
            sys.exit(f"--evaluation: seeds {sorted(set(seeds) - set(protocol['seeds']))} are not the protocol's")
    else:
        seeds = args.seeds or DEVELOPMENT_SEEDS
    folder = results_root / args.setting
    print_id = fingerprint(args.setting, demo_args, controls)

    if not args.summarize:
        if protocol is not None:
            check_evaluation_checkout(protocol)
        for seed in seeds:
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
            record = run_seed(args.setting, seed, args.work, demo_args, controls, print_id, ablations)
            if protocol is not None:
                record["protocol_commit"] = protocol["commit"]
            if done.get("fingerprint") == print_id:  # a rerun for ablations: the first run's minutes and commit stay
                record["minutes"].update({k: v for k, v in done["minutes"].items() if k == "demo"
                                          or k.startswith("control")})
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
    if protocol is not None:
        records = [r for r in records if r.get("protocol_commit") == protocol["commit"]]
    other_setting = "iid" if args.setting == "shift" else "shift"
    other = load_records(results_root / other_setting)
    if not args.summarize:  # as for this setting: only files of this code and these settings
        other_id = fingerprint(other_setting, demo_args, controls)
        other = [r for r in other if r.get("fingerprint") == other_id]
    if protocol is not None:
        other = [r for r in other if r.get("protocol_commit") == protocol["commit"]]
        shifted, iid = (records, other) if args.setting == "shift" else (other, records)
        print(f"evaluation seeds at protocol commit {protocol['commit']}: shift {len(shifted)}, iid {len(iid)} "
              f"of {len(protocol['seeds'])} each\n")
        print(endpoints(shifted, iid))
    text = summary_table(records)
    print("\n" + text)
    if records:
        atomic_write_text(folder / "summary.txt", text + "\n")
        print(f"plot: {plot_differences(records, folder / 'summary.png')}")
        if args.markdown:
            print("\n" + markdown_table(records))
        if other:  # both settings have files: does the shift change the student's gain?
            shifted, iid = (records, other) if args.setting == "shift" else (other, records)
            print("\n" + setting_difference(shifted, iid))


if __name__ == "__main__":
    main()
