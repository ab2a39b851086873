"""Writing a phantom dataset: nnU-Net's raw layout, dataset.json and phantoms.json, all or nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from noisy_student_nnunet import __version__
from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.flare import flare22_dataset_labels
from noisy_student_nnunet.outputs import check_output_folder
from noisy_student_nnunet.phantoms.acquisition import PHANTOM_READER_WRITER
from noisy_student_nnunet.phantoms.cases import CaseSpec, check_int, plan_cases
from noisy_student_nnunet.phantoms.cohorts import Condition, split_sources
from noisy_student_nnunet.phantoms.generator import Phantom, make_phantom


def _manifest_text(manifest: dict) -> str:
    """JSON with one line per case: readable and diffable."""
    head = {k: v for k, v in manifest.items() if k != "cases"}
    lines = [json.dumps(head, indent=1)[:-2] + ',\n "cases": [']
    lines.append(",\n".join("  " + json.dumps(case) for case in manifest["cases"]))
    return "\n".join(lines) + "\n ]\n}\n"


#: peak bytes per voxel of making and writing one case (float32 canvas, uint8 labels, int16 image, the
#: reoriented copies and SimpleITK's): 12-16 measured on 6.5 M and 29 M voxel cases, plus a fixed margin
BYTES_PER_VOXEL = 16
FIXED_BYTES = 256 * 1024**2


def _address_space_left() -> int:
    """What ``ulimit -v`` (RLIMIT_AS, common on clusters) still allows this process; unlimited is huge."""
    import resource

    import psutil

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return 2**63 - 1
    return max(0, soft - psutil.Process().memory_info().vms)


def check_memory(cases: Sequence[CaseSpec]) -> None:
    """Refuse sizes whose largest case cannot fit in the available memory, before allocating anything
    (otherwise numpy fails with MemoryError halfway, or the kernel's OOM killer ends the process)."""
    import psutil

    if not cases:
        return
    largest = max(cases, key=lambda c: int(np.prod(c.shape_zyx, dtype=np.int64)))
    voxels = int(np.prod(largest.shape_zyx, dtype=np.int64))
    needed = voxels * BYTES_PER_VOXEL + FIXED_BYTES
    available = min(int(psutil.virtual_memory().available), _address_space_left())
    if needed > available:
        shape = "x".join(str(v) for v in largest.shape_zyx)
        raise NsnError(f"the largest case ({largest.identifier}, {shape} voxels) needs about {needed / 1024**3:.1f} GB "
                       f"of memory to generate, {available / 1024**3:.1f} GB are available; choose smaller "
                       f"--slices / --inplane-voxels")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def _check_target(raw_root: Path, dataset_id: int, name: str) -> Path:
    """Refuse an existing non-empty target or another dataset with the same id (nnU-Net would find two)."""
    target = raw_root / dataset_folder_name(dataset_id, name)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise NsnError(f"{target} already exists and is not empty; remove it or choose another -d/--name")
    prefix = f"Dataset{dataset_id:03d}_"
    roots = [("nnUNet_raw", raw_root)] + [(var, Path(os.environ[var]))
                                           for var in ("nnUNet_preprocessed", "nnUNet_results") if os.environ.get(var)]
    for var, root in roots:
        if not root.is_dir():
            continue
        for other in sorted(root.iterdir()):
            if other.name.startswith(prefix) and other.name != target.name and other.is_dir():
                raise NsnError(f"dataset id {dataset_id} is taken by {other} ({var}); choose another -d")
    return target


def write_phantom_dataset(raw_root: str | os.PathLike, dataset_id: int, name: str = "Phantoms", num_labeled: int = 8,
                          num_unlabeled: int = 24, num_test: int = 0, seed: int = 0, clinical: bool = False, *,
                          slices=None, inplane_voxels=None, inplane_spacing=None, slice_spacing=None,
                          drop_probability: float = 0.2, setting: str | None = None,
                          cohorts: dict[str, str] | None = None, progress: bool = False) -> Path:
    """Write ``raw_root/DatasetXXX_name`` as an nnU-Net raw dataset and return its path.

    Layout: dataset.json, imagesTr + labelsTr (labeled), imagesUnlabeled (no labels anywhere),
    imagesTs + labelsTs (only when num_test > 0) and phantoms.json (per-case seed, shape, spacing,
    dropped organs, scanner orientation, cohort and its condition, phase, organ voxel counts); ``setting`` and
    ``cohorts`` choose each split's cohort (see cohorts.py; default ``iid``). The cases come in the scanner
    orientations of SCANNER_ORIENTATIONS, and dataset.json names nnU-Net's reorienting reader
    (PHANTOM_READER_WRITER), as a user of nnU-Net does for data of mixed orientation. Built in a hidden
    sibling folder and renamed at the end: on any error nothing is left behind. Invalid arguments raise NsnError.
    """
    dataset_id = check_int("-d (dataset id)", dataset_id, 1, 999)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise NsnError(f"--name must be letters, digits, '_' or '-', got {name!r}")
    cases = plan_cases(num_labeled, num_unlabeled, num_test, seed, clinical, name=name, slices=slices,
                       inplane_voxels=inplane_voxels, inplane_spacing=inplane_spacing, slice_spacing=slice_spacing,
                       drop_probability=drop_probability, setting=setting, cohorts=cohorts)
    sources = split_sources(setting, cohorts)
    raw_root = check_output_folder(Path(raw_root).expanduser().absolute(), "nnUNet_raw (-o)")
    target = _check_target(raw_root, dataset_id, name)
    check_memory(cases)
    raw_root.mkdir(parents=True, exist_ok=True)
    partial = raw_root / f".{target.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    folders = {"labeled": ("imagesTr", "labelsTr"), "unlabeled": ("imagesUnlabeled", None),
               "test": ("imagesTs", "labelsTs")}
    try:
        from tqdm import tqdm

        partial.mkdir()
        for split, (images, labels) in folders.items():
            if split == "test" and num_test == 0:
                continue
            (partial / images).mkdir()
            if labels:
                (partial / labels).mkdir()
        records = []
        for case in tqdm(cases, desc=f"phantoms {target.name}", unit="case", disable=not progress):
            phantom = make_phantom(case.seed, case.shape_zyx, case.spacing_zyx, body_scale=case.body_scale,
                                   drop=case.dropped, direction=case.direction, condition=case.condition)
            images, labels = folders[case.split]
            image_path = f"{images}/{case.identifier}_0000.nii.gz"
            label_path = f"{labels}/{case.identifier}.nii.gz" if labels else None
            phantom.write(partial / image_path, partial / label_path if label_path else None)
            records.append({
                "identifier": case.identifier, "split": case.split, "image": image_path, "label": label_path,
                "seed": case.seed, "shape_zyx": list(case.shape_zyx), "spacing_zyx": list(case.spacing_zyx),
                "body_scale": case.body_scale, "dropped": list(case.dropped), "orientation": case.orientation,
                "direction": list(case.direction), "cohort": case.cohort, "condition": case.condition.to_json(),
                "phase": phantom.info["phase"],
                "noise_sd": phantom.info["noise_sd"], "organ_voxels": phantom.organ_voxels()})
        counts = f"{num_labeled} labeled (imagesTr/labelsTr), {num_unlabeled} unlabeled (imagesUnlabeled)" + (
            f", {num_test} test (imagesTs/labelsTs)" if num_test else "")
        dataset = {
            "channel_names": {"0": "CT"},
            "labels": flare22_dataset_labels(),
            "numTraining": num_labeled,
            "file_ending": ".nii.gz",
            "overwrite_image_reader_writer": PHANTOM_READER_WRITER,
            "name": name,
            "description": f"Synthetic abdominal CT phantoms with the 13 FLARE22 organs (noisy_student_nnunet "
                           f"{__version__}, seed {seed}{', clinical size' if clinical else ''}): {counts}. "
                           f"Cohorts: {', '.join(f'{s} {c}' for s, c in sources.items())}. Not patient data.",
        }
        manifest = {"generator": f"noisy_student_nnunet.phantoms {__version__}", "seed": seed, "clinical": clinical,
                    "drop_probability": float(drop_probability), "cohorts": sources, "cases": records}
        (partial / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")
        (partial / "phantoms.json").write_text(_manifest_text(manifest))
        if target.exists():
            target.rmdir()  # checked empty above
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def remake_case(record: dict) -> Phantom:
    """The phantom of one ``phantoms.json`` case record, made again (labels of unlabeled cases, for scoring)."""
    return make_phantom(record["seed"], record["shape_zyx"], record["spacing_zyx"], body_scale=record["body_scale"],
                        drop=record["dropped"], direction=record.get("direction"),
                        condition=Condition.from_json(record.get("condition")))
