"""Does the noisy student help? The paper's claim, tested in kind on phantoms, on the CPU.

For each seed: a fresh phantom dataset with few labeled cases and many unlabeled ones, the whole chain
(``nsn demo``'s machinery: two teacher folds, pseudo-labels by their ensemble, the student on fold 0
(``--student-folds``: more, of which the best by cross-validation is fine-tuned), then fine-tuned), every
stage scored on held-out test phantoms (FLARE22 DSC/NSD). Prints
mean and std over seeds of the mean DSC/NSD of each stage and the student's gain over one teacher.

    python benchmarks/semi_supervised_experiment.py --seeds 0 1 2 --labeled 6 --unlabeled 24 --test 8

At least 5 labeled cases: nnU-Net's 5-fold split (sklearn KFold) refuses fewer.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from noisy_student_nnunet.demo import run_demo


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
                               drop=case["dropped"])
        phantom.write(truth / "image_0000.nii.gz", target)
    (truth / "image_0000.nii.gz").unlink(missing_ok=True)
    return evaluate_folders(truth, pseudo_labels, progress=False).summary()


def dsc_per_organ(summary: dict) -> dict[str, float]:
    """organ -> mean DSC over cases, from an evaluation summary."""
    return {organ: entry["DSC"]["mean"] for organ, entry in summary["per_structure"].items()}


def record(per_stage: dict, organs: dict, stage: str, summary: dict) -> None:
    """Append one seed's overall DSC/NSD and per-organ DSC of ``stage``."""
    entry = per_stage.setdefault(stage, {"DSC": [], "NSD": []})
    entry["DSC"].append(summary["overall"]["DSC"]["mean"])
    entry["NSD"].append(summary["overall"]["NSD"]["mean"])
    organs.setdefault(stage, []).append(dsc_per_organ(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/semi_supervised"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labeled", type=int, default=6)
    parser.add_argument("--unlabeled", type=int, default=24)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--student-folds", nargs="+", default=["0"],
                        help="student folds (default 0, the fold of the teacher it is compared with)")
    args = parser.parse_args()
    if args.labeled < 5:
        parser.error("--labeled must be at least 5: nnU-Net splits the labeled cases into 5 folds")

    per_stage: dict[str, dict[str, list[float]]] = {}
    organs: dict[str, list[dict[str, float]]] = {}  # stage -> per seed: organ -> mean DSC
    for seed in args.seeds:
        scores = run_demo(args.work / f"seed{seed}", dataset_id=700 + 2 * seed, recipe=args.recipe,
                          num_labeled=args.labeled, num_unlabeled=args.unlabeled, num_test=args.test,
                          folds=("0", "1"), seed=seed, student_folds=tuple(args.student_folds))
        record(per_stage, organs, "pseudo-labels", pseudo_label_quality(args.work / f"seed{seed}", 700 + 2 * seed))
        for score in scores:
            # "student fold 1" -> "student"
            record(per_stage, organs, score.model.title.split(" fold")[0], score.summary)

    def mean_std(values: list[float]) -> str:
        std = statistics.pstdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):6.2f} ± {100 * std:5.2f}"

    print(f"\n{len(args.seeds)} seeds, {args.labeled} labeled / {args.unlabeled} unlabeled / {args.test} test "
          f"phantoms, recipe {args.recipe}; mean over organs and test cases, then mean ± std over seeds")
    print(f"{'stage':<18} {'DSC (%)':>15} {'NSD (%)':>15}")
    for stage, entry in per_stage.items():
        print(f"{stage:<18} {mean_std(entry['DSC']):>15} {mean_std(entry['NSD']):>15}")
    teacher, student = per_stage.get("teacher"), per_stage.get("student")
    if teacher and student:
        gains = [100 * (s - t) for s, t in zip(student["DSC"], teacher["DSC"])]
        print(f"student - teacher fold 0, DSC points per seed: {', '.join(f'{g:+.2f}' for g in gains)}")
    print("\nDSC (%) per organ, mean over seeds (organs no stage segments left out):")
    names = list(organs[next(iter(organs))][0])
    shown = [o for o in names if any(statistics.mean(r[o] or 0.0 for r in rows) > 0.005 for rows in organs.values())]
    print(f"{'stage':<18}" + "".join(f" {o:>12}" for o in shown))
    for stage, rows in organs.items():
        print(f"{stage:<18}" + "".join(f" {100 * statistics.mean(r[o] or 0.0 for r in rows):12.2f}" for o in shown))
    (args.work / "results.json").write_text(json.dumps({"overall": per_stage, "per_organ": organs}, indent=2))


if __name__ == "__main__":
    main()
