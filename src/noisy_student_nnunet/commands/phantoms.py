"""``nsn phantoms``: write a synthetic abdominal CT dataset (13 FLARE22 organs) for nnU-Net.

Numbers are parsed here rather than by argparse so that every bad value gives the one-line
``nsn phantoms: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import time

from noisy_student_nnunet.errors import NsnError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "phantoms",
        help="write synthetic abdominal CT phantoms as an nnU-Net raw dataset",
        description="Write $nnUNet_raw/DatasetXXX_NAME with imagesTr/labelsTr (labeled), imagesUnlabeled "
                    "(unlabeled images), optionally imagesTs/labelsTs, dataset.json (13 FLARE22 organs) and "
                    "phantoms.json (per-case seed, size, spacing, dropped organs, scanner orientation). Cases are "
                    "stored as LPS, LPI or RAS; --setting / --cohort draw them from named cohorts (contrast phase, "
                    "lesions, organ changes, slice spacing, noise, kernel, scanner offset, coverage); dataset.json "
                    "has nnU-Net read them with its reorienting reader "
                    "(NibabelIOWithReorient). Deterministic for a seed. "
                    "Small cases by default (in-plane 96-128 voxels, 24-64 slices); --clinical gives "
                    "512x512xN volumes at real anatomical size.",
    )
    parser.add_argument("-d", dest="dataset_id", required=True, metavar="DATASET_ID",
                        help="nnU-Net dataset id (1-999): the folder is DatasetXXX_NAME")
    parser.add_argument("--name", default="Phantoms", help="dataset name and case prefix (default: Phantoms)")
    parser.add_argument("-n", "--num-labeled", default="8", metavar="N",
                        help="labeled cases in imagesTr/labelsTr (default: 8)")
    parser.add_argument("-u", "--num-unlabeled", default="24", metavar="N",
                        help="unlabeled cases in imagesUnlabeled (default: 24)")
    parser.add_argument("-t", "--num-test", default="0", metavar="N",
                        help="labeled test cases in imagesTs/labelsTs (default: 0)")
    parser.add_argument("--seed", default="0", help="random seed (default: 0)")
    parser.add_argument("--clinical", action="store_true",
                        help="clinical volumes: 512x512 in-plane, 200-320 slices of 1-2 mm, real anatomical size")
    parser.add_argument("--slices", nargs=2, metavar=("MIN", "MAX"),
                        help="number of slices (default: 24 64; clinical 200 320)")
    parser.add_argument("--inplane-voxels", nargs=2, metavar=("MIN", "MAX"),
                        help="in-plane matrix size, square (default: 96 128; clinical 512 512)")
    parser.add_argument("--inplane-spacing", nargs=2, metavar=("MIN", "MAX"),
                        help="in-plane spacing in mm (default: 0.6 1.0)")
    parser.add_argument("--slice-spacing", nargs=2, metavar=("MIN", "MAX"),
                        help="slice spacing in mm (default: 1 5; clinical 1 2)")
    parser.add_argument("--drop-probability", default="0.2", metavar="P",
                        help="chance that a case lacks one organ, mostly the gallbladder (default: 0.2)")
    parser.add_argument("--setting", choices=("iid", "shift"), default=None,
                        help="where each split's cases come from: iid (default: one distribution, as always) or shift "
                             "(labeled: the narrow pancreas_portal cohort; unlabeled and test: the broad flare_mix)")
    parser.add_argument("--cohort", action="append", default=[], metavar="[SPLIT=]NAME",
                        help="a cohort or mix for every split, or for one (labeled=, unlabeled=, test=); repeatable, "
                             "applied after --setting. Cohorts: " + ", ".join(_cohort_names()))
    parser.add_argument("-o", "--output", metavar="RAW_ROOT",
                        help="nnU-Net raw folder to write into (default: $nnUNet_raw)")
    parser.set_defaults(func=run)


def _cohort_names() -> list[str]:
    from noisy_student_nnunet.phantoms.cohorts import cohort_names

    return cohort_names()


def parse_cohorts(values: list[str]) -> dict[str, str]:
    """``--cohort NAME`` (every split) and ``--cohort SPLIT=NAME`` as split -> name; names checked later."""
    from noisy_student_nnunet.phantoms.cohorts import SPLITS

    cohorts: dict[str, str] = {}
    for value in values:
        split, _, name = value.rpartition("=")
        for one in (split,) if split else SPLITS:
            cohorts[one] = name
    return cohorts


def _integer(value: str, option: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise NsnError(f"{option} must be a whole number, got {value!r}") from None


def _numbers(values: list[str] | None, option: str, kind: type) -> tuple | None:
    if values is None:
        return None
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise NsnError(f"{option} needs two {'whole ' if kind is int else ''}numbers, got {' '.join(values)}") from None


def run(args: argparse.Namespace) -> int:
    from noisy_student_nnunet.phantoms import write_phantom_dataset

    raw_root = args.output or os.environ.get("nnUNet_raw")
    if not raw_root:
        raise NsnError("no output folder: pass -o RAW_ROOT or set nnUNet_raw")
    try:
        drop_probability = float(args.drop_probability)
    except ValueError:
        raise NsnError(f"--drop-probability must be a number from 0 to 1, got {args.drop_probability!r}") from None
    counts = {key: _integer(getattr(args, key), option) for key, option in (
        ("num_labeled", "-n/--num-labeled"), ("num_unlabeled", "-u/--num-unlabeled"), ("num_test", "-t/--num-test"))}
    started = time.perf_counter()
    target = write_phantom_dataset(
        raw_root, _integer(args.dataset_id, "-d"), name=args.name, seed=_integer(args.seed, "--seed"),
        clinical=args.clinical, slices=_numbers(args.slices, "--slices", int),
        inplane_voxels=_numbers(args.inplane_voxels, "--inplane-voxels", int),
        inplane_spacing=_numbers(args.inplane_spacing, "--inplane-spacing", float),
        slice_spacing=_numbers(args.slice_spacing, "--slice-spacing", float),
        drop_probability=drop_probability, setting=args.setting, cohorts=parse_cohorts(args.cohort), progress=True,
        **counts)
    print(f"wrote {target}: {counts['num_labeled']} labeled, {counts['num_unlabeled']} unlabeled, "
          f"{counts['num_test']} test cases in {time.perf_counter() - started:.1f} s")
    return 0
