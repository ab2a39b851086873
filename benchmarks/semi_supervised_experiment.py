"""Does the noisy student help? The paper's claim, tested in kind on phantoms, on the CPU.

For each seed: a fresh phantom dataset with few labeled cases and many unlabeled ones, the whole chain
(``nsn demo``'s machinery: two teacher folds, pseudo-labels by their ensemble, two student folds, the
best student fine-tuned), every stage scored on held-out test phantoms (FLARE22 DSC/NSD). Prints
mean and std over seeds of the mean DSC/NSD of each stage and the student's gain over one teacher.

    python benchmarks/semi_supervised_experiment.py --seeds 0 1 2 --labeled 4 --unlabeled 32 --test 8
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from noisy_student_nnunet.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/semi_supervised"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labeled", type=int, default=4)
    parser.add_argument("--unlabeled", type=int, default=32)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--recipe", default="demo")
    args = parser.parse_args()

    per_stage: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        scores = run_demo(args.work / f"seed{seed}", dataset_id=700 + 2 * seed, recipe=args.recipe,
                          num_labeled=args.labeled, num_unlabeled=args.unlabeled, num_test=args.test,
                          folds=("0", "1"), seed=seed)
        for score in scores:
            stage = score.model.title.split(" fold")[0]  # "student fold 1" -> "student"
            entry = per_stage.setdefault(stage, {"DSC": [], "NSD": []})
            entry["DSC"].append(score.summary["overall"]["DSC"]["mean"])
            entry["NSD"].append(score.summary["overall"]["NSD"]["mean"])

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
    (args.work / "results.json").write_text(json.dumps(per_stage, indent=2))


if __name__ == "__main__":
    main()
