"""Do the teachers' pseudo-labels under- or over-segment each organ? Volume, recall and precision against the truth.

Reads a seed's work folder of ``semi_supervised_experiment.py`` (the demo's pseudo-labeled dataset 991 and the
unlabeled phantoms' true labels it regenerated) and prints, per organ and summed over the unlabeled cases, the
true and pseudo-labeled voxel counts, their ratio, recall (true voxels the pseudo-labels give the organ) and
precision. A ratio well below 1 with a fair precision means the averaged softmax's argmax shrinks the organ.
The last columns give the same volume ratio on the test phantoms for the predictions of teacher fold 0, the student
and the fine-tuned student: whether the student learns the shrunken organs.

    python benchmarks/pseudo_label_volumes.py --work DIR --setting shift --seeds 5 6 7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np


TEST_STAGES = {"teacher": "teacher_fold_0", "student": "student_fold_0", "finetuned": "fine-tuned_fold_0"}


def counts(truth_dir: Path, pseudo_dir: Path, num_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label: true voxels, predicted voxels, voxels both give that label (summed over the cases)."""
    true_total, pseudo_total, both = (np.zeros(num_labels, dtype=np.int64) for _ in range(3))
    truth_files = sorted(truth_dir.glob("*.nii.gz"))
    if not truth_files:
        raise SystemExit(f"{truth_dir}: no labels (run semi_supervised_experiment.py for this seed first)")
    for truth_file in truth_files:
        truth = np.asanyarray(nib.load(truth_file).dataobj).astype(np.int64)
        pseudo = np.asanyarray(nib.load(pseudo_dir / truth_file.name).dataobj).astype(np.int64)
        if truth.shape != pseudo.shape:
            raise SystemExit(f"{truth_file.name}: truth {truth.shape} and pseudo-label {pseudo.shape} differ")
        true_total += np.bincount(truth.ravel(), minlength=num_labels)[:num_labels]
        pseudo_total += np.bincount(pseudo.ravel(), minlength=num_labels)[:num_labels]
        both += np.bincount(truth[truth == pseudo].ravel(), minlength=num_labels)[:num_labels]
    return true_total, pseudo_total, both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the experiment's --work folder")
    parser.add_argument("--setting", choices=("iid", "shift"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    args = parser.parse_args()
    seed_works = [args.work / args.setting / f"seed{seed}" for seed in args.seeds]
    dataset_json = next((seed_works[0] / "nnUNet_raw").glob("Dataset990_*")) / "dataset.json"
    names = {int(v): k for k, v in json.loads(dataset_json.read_text())["labels"].items() if int(v) > 0}
    num_labels = max(names) + 1
    totals = [counts(w / "unlabeled_truth", next((w / "nnUNet_raw").glob("Dataset991_*")) / "labelsTr", num_labels)
              for w in seed_works]
    tests = {stage: [counts(next((w / "nnUNet_raw").glob("Dataset990_*")) / "labelsTs",
                            w / "compare" / folder / "predictions", num_labels) for w in seed_works]
             for stage, folder in TEST_STAGES.items()}
    test_ratio = {stage: sum(t[1] for t in found) / np.maximum(sum(t[0] for t in found), 1)
                  for stage, found in tests.items()}
    true_total, pseudo_total, both = (sum(t[i] for t in totals) for i in range(3))
    print(f"setting {args.setting}, seeds {' '.join(map(str, args.seeds))}: unlabeled phantoms, voxels summed over "
          f"cases and seeds")
    print(f"{'':<22}{'pseudo-labels of the unlabeled phantoms':^44}{'':<20}{'test: volume ratio':^30}")
    print(f"{'organ':<22}{'true':>9}{'pseudo':>9}{'ratio':>7}{'recall':>8}{'precision':>11}   {'ratio per seed':<17}"
          + "".join(f"{stage:>10}" for stage in TEST_STAGES))
    for label, name in sorted(names.items()):
        per_seed = " ".join(f"{t[1][label] / max(t[0][label], 1):.2f}" for t in totals)
        print(f"{name:<22}{true_total[label]:>9}{pseudo_total[label]:>9}"
              f"{pseudo_total[label] / max(true_total[label], 1):>7.2f}{both[label] / max(true_total[label], 1):>8.2f}"
              f"{both[label] / max(pseudo_total[label], 1):>11.2f}   {per_seed:<17}"
              + "".join(f"{test_ratio[stage][label]:>10.2f}" for stage in TEST_STAGES))


if __name__ == "__main__":
    main()
