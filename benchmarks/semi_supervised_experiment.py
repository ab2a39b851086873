"""Does the noisy student help? The paper's claim, tested in kind on phantoms.

For each seed, ``nsn demo --seed N`` in a work folder of its own (a fresh phantom set, the whole chain:
two teacher folds, pseudo-labels of their ensemble, the student on fold 0, its fine-tune; every stage
scored on held-out test phantoms with FLARE22 DSC/NSD); then the pseudo-labels themselves are scored
against the unlabeled phantoms' true labels (regenerated from ``phantoms.json``). Printed: per seed and as
mean +- std over seeds, student - teacher fold 0 and fine-tuned - teacher fold 0 in DSC points, overall
and per organ, next to each stage's DSC and the pseudo-labels' quality per organ. The paper's claim is
+2 DSC (FLARE22 validation) for the student over a single low-footprint model.

    python benchmarks/semi_supervised_experiment.py --seeds 0 1 2 --work /tmp/experiment

The control (``--no-control`` skips it): the fine-tuned model has trained as many iterations as the student and
its fine-tune together, the teacher fewer; so per seed a teacher fold 0 is trained that many iterations (same
labeled phantoms, recipe and trainer, more epochs; dataset id 993 in the seed's folders) and scored on the same
test phantoms, and fine-tuned - that teacher is printed too. It adds about half a demo per seed.

A rerun resumes (``nsn demo`` skips what is done, so does the control; a finished ``nsn demo -w DIR --seed N``
run can be linked in as ``WORK/seedN``). Extra arguments after ``--`` go to ``nsn demo``
(``-- -n 6 -u 48``: fewer labeled, more unlabeled; ``-- --device cuda``). Writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from noisy_student_nnunet.demo import (CONFIGURATION, PLANS, RESULTS_JSON, DemoModel, demo_environment,
                                       predict_and_score)

TEACHER, STUDENT, FINETUNED = "teacher", "student", "fine-tuned"
CONTROL = "teacher, as long"  # teacher fold 0 trained as many iterations as student + fine-tune
DEMO_DATASET_ID = 990  # nsn demo's default -d
CONTROL_DATASET_ID = 993  # the demo uses 990 (labeled) and 991 (pseudo-labels)
TEACHER_TRAINER = "NoisyStudentTeacherTrainer"


def as_long_recipe(recipe: dict) -> dict:
    """The teacher's recipe with as many training iterations as the student's training and fine-tune together."""
    training, finetune = recipe["training"], recipe["finetune"]
    iterations = (training["num_epochs"] * training["num_iterations_per_epoch"]
                  + finetune["num_epochs"] * finetune["num_iterations_per_epoch"])
    control = json.loads(json.dumps(recipe))
    control["training"]["num_epochs"] = math.ceil(iterations / training["num_iterations_per_epoch"])
    control["name"] = f"{recipe['name']}+as-long"
    return control


def control_teacher(seed_work: Path, device: str) -> dict:
    """Train and score the equal-iteration teacher of one seed (resumes what is done); its evaluation summary.

    The labeled and test phantoms are the demo's own, hard-linked into a dataset of their own so that its plans
    (the demo recipe with more epochs) and results sit beside the demo's without touching them."""
    env = demo_environment(seed_work, device=device)
    raw = Path(env["nnUNet_raw"])
    labeled = next(raw.glob(f"Dataset{DEMO_DATASET_ID:03d}_*"))
    control = raw / f"Dataset{CONTROL_DATASET_ID:03d}_DemoControl"
    if not control.is_dir():
        partial = raw / f".{control.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(labeled, partial, copy_function=os.link, ignore=shutil.ignore_patterns("imagesUnlabeled"))
        os.rename(partial, control)
    plans = Path(env["nnUNet_preprocessed"]) / labeled.name / f"{PLANS}.json"
    recipe = as_long_recipe(json.loads(plans.read_text())["noisy_student_recipe"])
    recipe_path = seed_work / "control_recipe.json"
    recipe_path.write_text(json.dumps(recipe, indent=2) + "\n")
    results = (Path(env["nnUNet_results"]) / control.name / f"{TEACHER_TRAINER}__{PLANS}__{CONFIGURATION}"
               / "fold_0")
    if not (results / "checkpoint_final.pth").is_file():
        print(f"  control: {TEACHER_TRAINER} fold 0, {recipe['training']['num_epochs']} epochs", flush=True)
        with open(seed_work / "control.log", "a") as log:
            for cmd in (["nsn", "plan", "-d", str(CONTROL_DATASET_ID), "--recipe", str(recipe_path),
                         "--plans-name", PLANS],
                        ["nnUNetv2_train", str(CONTROL_DATASET_ID), CONFIGURATION, "0", "-tr", TEACHER_TRAINER,
                         "-p", PLANS, "-device", device]):
                if subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                    sys.exit(f"control teacher of {seed_work.name} failed: {' '.join(cmd)}; see {log.name}")
    score = predict_and_score(DemoModel(CONTROL, TEACHER_TRAINER, ("0",)), CONTROL_DATASET_ID, control / "imagesTs",
                              control / "labelsTs", control / "dataset.json", seed_work / "compare" / "control",
                              env, device)
    return score.summary


def pseudo_label_quality(seed_work: Path, dataset_id: int) -> dict:
    """FLARE DSC/NSD of the teacher ensemble's pseudo-labels against the phantoms' true labels.

    The unlabeled phantoms have no labels on disk; they are regenerated from ``phantoms.json`` (same seed,
    shape, spacing, body scale and dropped organs give the same phantom)."""
    from noisy_student_nnunet.evaluation import evaluate_folders
    from noisy_student_nnunet.phantoms import make_phantom

    raw = seed_work / "nnUNet_raw"
    labeled = next(raw.glob(f"Dataset{dataset_id:03d}_*"))
    pseudo_labels = next(raw.glob(f"Dataset{dataset_id + 1:03d}_*")) / "labelsTr"
    truth = seed_work / "unlabeled_truth"
    truth.mkdir(exist_ok=True)
    manifest = json.loads((labeled / "phantoms.json").read_text())
    for case in manifest["cases"]:
        target = truth / f"{case['identifier']}.nii.gz"
        if case["split"] != "unlabeled" or target.is_file() or not (pseudo_labels / target.name).is_file():
            continue
        phantom = make_phantom(case["seed"], case["shape_zyx"], case["spacing_zyx"], body_scale=case["body_scale"],
                               drop=case["dropped"], direction=case.get("direction"))
        phantom.write(truth / "image_0000.nii.gz", target)
    (truth / "image_0000.nii.gz").unlink(missing_ok=True)
    return evaluate_folders(truth, pseudo_labels, progress=False).summary()


def stage_kind(title: str) -> str:
    """``"student fold 0"`` -> ``"student"``; ``"teacher fold 0"`` -> ``"teacher"``."""
    return title.split(" fold")[0]


def summary_record(summary: dict) -> dict:
    """An evaluation summary as overall DSC and organ -> DSC (fractions)."""
    return {"DSC": summary["overall"]["DSC"]["mean"],
            "organs": {o: e["DSC"]["mean"] for o, e in summary["per_structure"].items()}}


def seed_record(results: dict, pseudo: dict, control: dict | None = None) -> dict:
    """One seed: stage kind -> overall DSC and organ -> DSC (fractions), pseudo-labels (and control) included."""
    record = {"pseudo-labels": summary_record(pseudo)}
    for title, stage in results["stages"].items():
        record[stage_kind(title)] = {"DSC": stage["mean"]["DSC"],
                                     "organs": {o: e["DSC"] for o, e in stage["organs"].items()}}
    if control is not None:
        record[CONTROL] = summary_record(control)
    return record


def gains(records: list[dict], stage: str, baseline: str = TEACHER) -> dict:
    """Per seed, ``stage`` - ``baseline`` in DSC points: overall and per organ (None where undefined)."""
    def diff(a, b):
        return None if a is None or b is None else 100 * (a - b)

    return {"overall": [diff(r[stage]["DSC"], r[baseline]["DSC"]) for r in records],
            "organs": {organ: [diff(r[stage]["organs"][organ], r[baseline]["organs"][organ]) for r in records]
                       for organ in records[0][baseline]["organs"]}}


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.2f} ± {std:.2f}"


def report(records: list[dict], seeds: list[int], minutes: list[float], demo_args: list[str]) -> str:
    lines = [f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), `{' '.join(['nsn demo', *demo_args])}` per seed; "
             f"minutes of this run per seed, demo and control (a resumed seed counts what it redid): {', '.join(f'{m:.1f}' for m in minutes)}",
             "", "mean DSC over 13 organs and the test phantoms (%), per seed; pseudo-labels: against the unlabeled "
             "phantoms' truth"]
    stages = list(records[0])
    lines.append(f"{'stage':<16}" + "".join(f" {'seed ' + str(s):>9}" for s in seeds) + f" {'mean ± std':>15}")
    for stage in stages:
        values = [100 * r[stage]["DSC"] for r in records]
        std = statistics.pstdev(values) if len(values) > 1 else 0.0
        lines.append(f"{stage:<16}" + "".join(f" {v:9.2f}" for v in values)
                     + f" {statistics.mean(values):8.2f} ± {std:4.2f}")
    organs = list(records[0][TEACHER]["organs"])
    compared = {"student-T": gains(records, STUDENT), "fine-tuned-T": gains(records, FINETUNED)}
    if CONTROL in records[0]:
        compared["fine-tuned-L"] = gains(records, FINETUNED, CONTROL)
    lines += ["", "gain in DSC points over teacher fold 0 (T) and over the teacher trained as long (L: as many "
                  "iterations as student + fine-tune)"]
    lines.append(f"{'':<16}" + "".join(f" {'seed ' + str(s):>9}" for s in seeds) + f" {'mean ± std':>15}")
    for name, g in compared.items():
        lines.append(f"{name:<16}" + "".join(f" {v:+9.2f}" for v in g["overall"]) + f" {mean_std(g['overall']):>15}")
    lines += ["", "per organ, mean over seeds: DSC (%) of each stage, then the gains above "
                  "(mean ± std over seeds, DSC points)"]
    short = {"pseudo-labels": "pseudo", "teacher ensemble": "ensemble", CONTROL: "as long"}
    header = (f"{'organ':<12}" + "".join(f" {short.get(s, s):>10}" for s in stages)
              + "".join(f" {name:>14}" for name in compared))
    lines.append(header)
    for organ in organs:
        cells = []
        for stage in stages:
            values = [r[stage]["organs"].get(organ) for r in records]
            values = [v for v in values if v is not None]
            cells.append(f" {100 * statistics.mean(values):10.1f}" if values else f" {'n/a':>10}")
        lines.append(f"{organ:<12}" + "".join(cells) + "".join(f" {mean_std(g['organs'][organ]):>14}"
                                                              for g in compared.values()))
    carried = [o for o in organs
               if statistics.mean(r["pseudo-labels"]["organs"][o] or 0.0 for r in records) >= 0.6]
    lines += ["", f"organs the pseudo-labels carry at DSC >= 0.6 (mean over seeds): {len(carried)} "
                  f"({', '.join(carried)})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/semi_supervised"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the teacher trained as many iterations as student + fine-tune")
    parser.add_argument("demo_args", nargs=argparse.REMAINDER,
                        help="after --: arguments for nsn demo (not -w, --seed)")
    args = parser.parse_args()
    demo_args = [a for a in args.demo_args if a != "--"]
    nsn = str(Path(sys.executable).parent / "nsn")

    records, minutes = [], []
    for seed in args.seeds:
        seed_work = (args.work / f"seed{seed}").resolve()
        dataset_id = DEMO_DATASET_ID  # each seed has nnU-Net folders of its own: the demo's id everywhere
        started = time.monotonic()
        cmd = [nsn, "demo", "-w", str(seed_work), "--seed", str(seed), *demo_args]
        print(f"seed {seed}: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"nsn demo failed for seed {seed}; see {seed_work / 'demo.log'}")
        results = json.loads((seed_work / RESULTS_JSON).read_text())
        control = control_teacher(seed_work, results["device"]) if args.control else None
        minutes.append((time.monotonic() - started) / 60)
        records.append(seed_record(results, pseudo_label_quality(seed_work, dataset_id), control))

    text = report(records, args.seeds, minutes, demo_args)
    print("\n" + text)
    (args.work / "results.json").write_text(json.dumps(
        {"seeds": args.seeds, "demo_args": demo_args, "minutes": minutes, "records": records,
         "student_gain": gains(records, STUDENT), "finetuned_gain": gains(records, FINETUNED),
         "finetuned_gain_over_control": gains(records, FINETUNED, CONTROL) if args.control else None}, indent=2))
    (args.work / "results.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
