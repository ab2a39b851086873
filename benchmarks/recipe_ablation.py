"""Which recipe key matters? One teacher fold per recipe variant, side by side, on the same demo phantoms.

Each variant is the base recipe (``--recipe``, a bundled name or a JSON path) with ``KEY=VALUE`` overrides
(dotted keys, JSON values); the first variant is the base itself. Every variant plans its own copy of the
phantoms (``nsn demo``'s size, labeled and test counts, ``--seed``), trains fold 0 of
``NoisyStudentTeacherTrainer`` (one core and one thread each, as the demo's teachers), predicts the test
phantoms with ``nnUNetv2_predict_lowfootprint`` and is scored with FLARE22 DSC. Printed: DSC per organ and
the 13-organ mean, one column per variant.

    python benchmarks/recipe_ablation.py --work /tmp/ablation --seed 1 \\
        --variant teacher_augmentation.mirror.p_sample=1.0

(the demo recipe with Table 4's mirroring back on, against the demo recipe as it is). Two variants take
about 7 minutes on 2 cores. A rerun resumes: finished training and predictions are kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from noisy_student_nnunet.demo import (CONFIGURATION, PHANTOM_SIZE, PLANS, DemoModel, demo_environment,
                                       predict_and_score)
from noisy_student_nnunet.phantoms import write_phantom_dataset
from noisy_student_nnunet.recipe import load_recipe, validate_recipe

TRAINER = "NoisyStudentTeacherTrainer"
FIRST_DATASET_ID = 970


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """``a.b.c=VALUE`` (VALUE as JSON) on a copy of ``recipe``; unknown keys are an error."""
    recipe = json.loads(json.dumps(recipe))
    for override in overrides:
        key, _, value = override.partition("=")
        *parents, leaf = key.split(".")
        node = recipe
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise SystemExit(f"--variant {override}: the recipe has no key {key!r}")
        node[leaf] = json.loads(value)
    recipe["name"] = f"{recipe['name']}+{'+'.join(overrides)}" if overrides else recipe["name"]
    return validate_recipe(recipe)


def train_and_score_teacher(title: str, dataset_id: int, dataset: Path, recipe: dict, prefix: Path,
                            env: dict[str, str], device: str = "cpu", fold: str = "0") -> dict:
    """Plan ``dataset`` with ``recipe``, train one teacher fold (kept when done; ``all``: every labeled case, as
    nnU-Net's fold ``all``), predict and score its test phantoms.

    Writes ``PREFIX.json`` (the recipe), ``PREFIX.log`` (planning and training) and ``PREFIX/`` (predictions,
    profile); returns the evaluation summary."""
    recipe_path, log = prefix.with_name(f"{prefix.name}.json"), prefix.with_name(f"{prefix.name}.log")
    recipe_path.write_text(json.dumps(recipe, indent=2) + "\n")
    results = Path(env["nnUNet_results"]) / dataset.name / f"{TRAINER}__{PLANS}__{CONFIGURATION}" / f"fold_{fold}"
    if not (results / "checkpoint_final.pth").is_file():
        with open(log, "a") as handle:
            for cmd in (["nsn", "plan", "-d", str(dataset_id), "--recipe", str(recipe_path), "--plans-name", PLANS],
                        ["nnUNetv2_train", str(dataset_id), CONFIGURATION, fold, "-tr", TRAINER, "-p", PLANS,
                         "-device", device]):
                if subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode != 0:
                    sys.exit(f"{title}: `{' '.join(cmd)}` failed; see {log}")
    score = predict_and_score(DemoModel(title, TRAINER, (fold,)), dataset_id, dataset / "imagesTs",
                              dataset / "labelsTs", dataset / "dataset.json", prefix, env, device)
    return score.summary


def train_variant(index: int, recipe: dict, work: Path, seed: int, env: dict[str, str]) -> dict:
    """Phantoms, plan, fold 0, test predictions and scores of one variant (resumes what is done)."""
    dataset_id = FIRST_DATASET_ID + index
    raw = Path(env["nnUNet_raw"])
    dataset = next(iter(sorted(raw.glob(f"Dataset{dataset_id:03d}_*"))), None)
    if dataset is None:
        dataset = write_phantom_dataset(raw, dataset_id, name=f"Ablation{index}", num_labeled=8, num_unlabeled=0,
                                        num_test=8, seed=seed, **PHANTOM_SIZE)
    # variants train side by side, one core each: augmentation in the training process
    return train_and_score_teacher(recipe["name"], dataset_id, dataset, recipe, work / f"variant{index}",
                                   {**env, "nnUNet_n_proc_DA": "0"})


def format_columns(names: list[str], summaries: list[dict]) -> str:
    organs = list(summaries[0]["per_structure"])
    lines = ["variants:"] + [f"  [{i}] {name}" for i, name in enumerate(names)]
    lines.append(f"{'organ (test DSC)':<18}" + "".join(f"{f'[{i}]':>8}" for i in range(len(names))))
    for organ in organs:
        lines.append(f"{organ:<18}" + "".join(f"{s['per_structure'][organ]['DSC']['mean']:8.3f}" for s in summaries))
    lines.append(f"{'mean':<18}" + "".join(f"{s['overall']['DSC']['mean']:8.3f}" for s in summaries))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="work folder (nnU-Net folders, logs, predictions)")
    parser.add_argument("--recipe", default="demo", help="base recipe: bundled name or JSON path (default demo)")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="a variant of the base recipe (repeatable); the base itself is always variant 0")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (as nsn demo --seed)")
    args = parser.parse_args()

    base = load_recipe(args.recipe)
    variants = [apply_overrides(base, [])] + [apply_overrides(base, v.split(",")) for v in args.variant]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = demo_environment(work)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=len(variants)) as pool:
        summaries = list(pool.map(lambda item: train_variant(item[0], item[1], work, args.seed, env),
                                  enumerate(variants)))
    table = format_columns([v["name"] for v in variants], summaries)
    (work / "ablation.txt").write_text(f"seed {args.seed}\n{table}\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
