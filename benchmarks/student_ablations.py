"""Student ablations of the semi-supervised experiment: what takes the small organs, the labels or the noise?

Each ablation trains one more student (fold 0) and its fine-tune in a seed's work folder, beside ``nsn demo``'s
models and on the same labeled, unlabeled and test phantoms, and changes one thing:

- ``oracle``: the student learns from the unlabeled phantoms' *true* labels instead of the teachers' pseudo-labels
  (the upper bound of what any pseudo-label can give at this budget);
- ``teacher_augmentation``: the student trains under the teachers' augmentation (Table 4) instead of Table 5's
  stronger one, on the demo's pseudo-labels;
- ``pool96``: 96 unlabeled phantoms instead of 24 (the demo's 24 plus 72 more of the same seed and setting),
  pseudo-labeled by the demo's teacher folds;
- ``long_student``: one of the method's own levers (issue 19, item 6): the student trains twice as many epochs on
  the demo's pseudo-labels (its fine-tune unchanged); compare it with the demo's student and fine-tune, not with
  the teacher trained as long, which has fewer iterations.

Each lives in datasets of its own (a linked copy of the labeled phantoms, planned with the demo's recipe plus the
change, and its pseudo-labeled dataset), so that nnU-Net's results folders never collide with the demo's. The
experiment (``semi_supervised_experiment.py --ablations ...``) scores ``student_NAME`` and ``finetuned_NAME`` on the
seed's test phantoms and reports each against the demo's student and the teacher trained as long.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from noisy_student_nnunet.demo import (CONFIGURATION, PHANTOM_SIZE, PLANS, DemoModel, demo_environment,
                                       predict_and_score)
from noisy_student_nnunet.outputs import atomic_write_text
from noisy_student_nnunet.pseudolabel.dataset import link_or_copy
from noisy_student_nnunet.recipe import validate_recipe

#: name -> (labeled copy id, pseudo-labeled id or None for the demo's own)
ABLATIONS: dict[str, tuple[int, int | None]] = {"oracle": (994, 995), "teacher_augmentation": (996, None),
                                                 "pool96": (997, 998), "long_student": (989, None)}
DEMO_DATASET_ID, DEMO_PSEUDO_ID = 990, 991
POOL = 96


def _dataset(raw: Path, dataset_id: int) -> Path:
    return next(raw.glob(f"Dataset{dataset_id:03d}_*"))


def _run(cmd: list[str], env: dict[str, str], log: Path, what: str) -> None:
    with open(log, "a") as handle:
        if subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"{what}: `{' '.join(cmd)}` failed; see {log}")


def _linked_copy(source: Path, target: Path, ignore: tuple[str, ...] = ()) -> Path:
    """``target`` as hard links (or copies) of ``source``, complete or absent."""
    if not target.is_dir():
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial, copy_function=link_or_copy, ignore=shutil.ignore_patterns(*ignore))
        os.rename(partial, target)
    return target


def _oracle_raw(raw: Path, labeled: Path, truth: Path, dataset_id: int) -> Path:
    """A raw dataset of the unlabeled phantoms with their true labels: images linked, labels the truth."""
    target = raw / f"Dataset{dataset_id:03d}_DemoOracle"
    if target.is_dir():
        return target
    partial = raw / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "imagesTr").mkdir(parents=True)
    (partial / "labelsTr").mkdir()
    images = sorted((labeled / "imagesUnlabeled").glob("*_0000.nii.gz"))
    for image in images:
        case = image.name[: -len("_0000.nii.gz")]
        link_or_copy(image, partial / "imagesTr" / image.name)
        link_or_copy(truth / f"{case}.nii.gz", partial / "labelsTr" / f"{case}.nii.gz")
    meta = json.loads((labeled / "dataset.json").read_text())
    meta.update(numTraining=len(images), name="DemoOracle",
                description="the unlabeled demo phantoms with their true labels (oracle pseudo-labels)")
    (partial / "dataset.json").write_text(json.dumps(meta, indent=4) + "\n")
    os.rename(partial, target)
    return target


def _pool_images(seed_work: Path, demo_labeled: Path) -> Path:
    """The seed's first POOL unlabeled phantoms (the demo's 24 are the first 24: cases are drawn per index)."""
    from noisy_student_nnunet.phantoms import write_phantom_dataset
    from noisy_student_nnunet.phantoms.cohorts import SETTINGS

    pool_raw = seed_work / "pool_raw"
    found = sorted(pool_raw.glob("Dataset*"))
    if found:
        return found[0] / "imagesUnlabeled"
    manifest = json.loads((demo_labeled / "phantoms.json").read_text())
    sources = manifest.get("cohorts") or SETTINGS["iid"]
    seed, setting = manifest["seed"], next(name for name, value in SETTINGS.items() if value == sources)
    dataset = write_phantom_dataset(pool_raw, 1, name="DemoPhantoms", num_labeled=1, num_unlabeled=POOL, num_test=0,
                                    seed=seed, setting=setting, drop_probability=manifest["drop_probability"],
                                    **PHANTOM_SIZE)
    return dataset / "imagesUnlabeled"


def run_ablation(name: str, seed_work: Path, truth: Path, device: str) -> dict[str, Path]:
    """Train and predict one ablation's student and fine-tune (resumes); stage name -> test predictions."""
    labeled_id, pseudo_id = ABLATIONS[name]
    env = demo_environment(seed_work, device=device)
    raw, preprocessed = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
    demo_labeled = _dataset(raw, DEMO_DATASET_ID)
    labeled = _linked_copy(demo_labeled, raw / f"Dataset{labeled_id:03d}_Ablation{name.title().replace('_', '')}",
                           ignore=("imagesUnlabeled",))
    log = seed_work / f"ablation_{name}.log"
    plans_file = preprocessed / labeled.name / f"{PLANS}.json"
    demo_recipe = json.loads((preprocessed / demo_labeled.name / f"{PLANS}.json").read_text())["noisy_student_recipe"]
    recipe = json.loads(json.dumps(demo_recipe))
    if name == "teacher_augmentation":
        recipe["student_augmentation"] = recipe["teacher_augmentation"]
    elif name == "long_student":  # "training" is what the student trains by here (the fine-tune has its own)
        recipe["training"]["num_epochs"] *= 2
    recipe["name"] = f"{recipe['name']}+ablation-{name}"
    recipe["student"]["pseudo_dataset"] = None
    recipe = validate_recipe(recipe)
    if not plans_file.is_file():
        recipe_path = seed_work / f"ablation_{name}.json"
        recipe_path.write_text(json.dumps(recipe, indent=2) + "\n")
        _run(["nsn", "plan", "-d", str(labeled_id), "--recipe", str(recipe_path), "--plans-name", PLANS], env, log,
             name)
    if name == "oracle":
        oracle = _oracle_raw(raw, demo_labeled, truth, pseudo_id)
        if not (preprocessed / oracle.name / f"{PLANS}.json").is_file():
            # in a child: nnU-Net reads its folders from the environment when first imported
            _run([sys.executable, "-c", "from noisy_student_nnunet.plans_transfer import preprocess_with_plans; "
                  f"preprocess_with_plans({labeled_id}, {pseudo_id}, {PLANS!r})"], env, log, name)
        pseudo = oracle.name
    elif name == "pool96":
        pseudo = f"Dataset{pseudo_id:03d}_DemoPool{POOL}"
        if not (preprocessed / pseudo / f"{PLANS}.json").is_file():
            demo_plans = preprocessed / demo_labeled.name / f"{PLANS}.json"
            kept = demo_plans.read_text()
            try:
                images = _pool_images(seed_work, demo_labeled)
                _run(["nsn", "pseudolabel", "-d", str(DEMO_DATASET_ID), "-i", str(images), "-f", "0", "1", "-o", pseudo,
                      "-device", device], env, log, name)
            finally:  # nsn pseudolabel records its dataset in the demo's plans: they keep their own
                atomic_write_text(demo_plans, kept)
    else:
        pseudo = _dataset(raw, DEMO_PSEUDO_ID).name
    student_env = {**env, "NSN_PSEUDO_DATASET": pseudo}
    results = Path(env["nnUNet_results"]) / labeled.name
    for trainer in ("NoisyStudentTrainer", "NoisyStudentFinetuneTrainer"):
        if not (results / f"{trainer}__{PLANS}__{CONFIGURATION}" / "fold_0" / "checkpoint_final.pth").is_file():
            print(f"  ablation {name}: {trainer} fold 0", flush=True)
            _run(["nnUNetv2_train", str(labeled_id), CONFIGURATION, "0", "-tr", trainer, "-p", PLANS,
                  "-device", device], student_env, log, name)
    folders = {}
    for stage, trainer in ((f"student_{name}", "NoisyStudentTrainer"),
                           (f"finetuned_{name}", "NoisyStudentFinetuneTrainer")):
        out = seed_work / "ablations" / stage
        predict_and_score(DemoModel(stage, trainer, ("0",)), labeled_id, labeled / "imagesTs", labeled / "labelsTs",
                          labeled / "dataset.json", out, env, device)
        folders[stage] = out / "predictions"
    return folders
