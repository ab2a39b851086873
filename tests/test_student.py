"""NoisyStudentTrainer: minibatch composition, ranks, pseudo-labeled dataset checks, Table 5, stock training.

The batch tests run on hand-written preprocessed datasets whose voxels encode source and case (labeled
case i holds 1000 + i, pseudo-labeled case i holds 2000 + i, identifiers collide on purpose), so each
sample of a batch proves where it was loaded from. The trainer tests use the phantom fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from noisy_student_nnunet.data import (LABELED, PSEUDO, MixedBatchLoader, MixedDataset, build_mixed_loader,
                                       global_slots, rank_batch_sizes, rank_composition, split_key)
from noisy_student_nnunet.errors import NsnError

from conftest import STUDENT_IGNORE_ID, STUDENT_PSEUDO_ID

SHAPE = (12, 40, 40)
PATCH = (8, 16, 16)
FG = (slice(5, 7), slice(30, 33), slice(30, 33))  # small foreground: random patches often miss it
VALUE = {LABELED: 1000, PSEUDO: 2000}


# --- hand-written preprocessed datasets ---------------------------------------------------------------


def write_cases(folder: Path, source: str, n: int, dataset_class=nnUNetDatasetNumpy) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        data = np.full((1, *SHAPE), VALUE[source] + i, dtype=np.float32)
        seg = np.zeros((1, *SHAPE), dtype=np.int8)
        seg[(0, *FG)] = 1
        properties = {"class_locations": {1: np.argwhere(seg == 1)}, "spacing": [1.0, 1.0, 1.0]}
        kwargs = {}
        if dataset_class is nnUNetDatasetBlosc2:
            kwargs = {"chunks": (1, *SHAPE), "blocks": (1, *SHAPE), "chunks_seg": (1, *SHAPE),
                      "blocks_seg": (1, *SHAPE)}
        dataset_class.save_case(data, seg, properties, str(folder / f"case_{i:03d}"), **kwargs)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """A labeled (numpy) and a pseudo-labeled (blosc2) dataset with colliding identifiers."""
    root = tmp_path_factory.mktemp("mixed")
    write_cases(root / "labeled", LABELED, 4, nnUNetDatasetNumpy)
    write_cases(root / "pseudo", PSEUDO, 6, nnUNetDatasetBlosc2)
    labeled = nnUNetDatasetNumpy(str(root / "labeled"))
    pseudo = nnUNetDatasetBlosc2(str(root / "pseudo"))
    assert set(labeled.identifiers) < set(pseudo.identifiers)  # collisions
    return labeled, pseudo


def label_manager() -> LabelManager:
    return LabelManager({"background": 0, "organ": 1}, regions_class_order=None)


def val_transforms():
    # not augmentation: RemoveLabel and deep-supervision targets (a list), voxel values untouched
    return nnUNetTrainer.get_validation_transforms([[1, 1, 1], [0.5, 0.5, 0.5]])


def loader_for(composition, datasets) -> MixedBatchLoader:
    labeled, pseudo = datasets
    return build_mixed_loader(composition, labeled, pseudo, PATCH, PATCH, label_manager(), val_transforms(),
                              oversample_foreground_percent=0.33)


def check_batch(batch, expected_sources, forced) -> list[str]:
    """Every sample comes from the dataset its key names; forced slots hold foreground. Returns the sources."""
    assert batch["sources"] == expected_sources
    assert batch["data"].shape[0] == len(expected_sources)
    assert isinstance(batch["target"], list) and all(t.shape[0] == len(expected_sources) for t in batch["target"])
    for j, key in enumerate(batch["keys"]):
        source, identifier = split_key(key)
        assert source == expected_sources[j]
        value = VALUE[source] + int(identifier.split("_")[1])
        assert float(batch["data"][j].max()) == value, (key, float(batch["data"][j].max()))
        if forced[j]:
            assert bool((batch["target"][0][j] == 1).any()), f"slot {j} must hold foreground"
    return list(batch["sources"])


# --- pure composition ---------------------------------------------------------------------------------


def test_global_slots_paper_ratio_and_stock_oversampling():
    slots = global_slots(4, 1, 3, 0.33)
    assert [s.source for s in slots] == [LABELED, PSEUDO, PSEUDO, PSEUDO]
    # stock: sample j forced iff not j < round(4 * 0.67) = 3
    assert [s.force_fg for s in slots] == [False, False, False, True]
    slots = global_slots(8, 1, 3, 0.33)
    assert "".join(s.source[0] for s in slots) == "lppplppp"
    assert [s.force_fg for s in slots] == [i >= round(8 * 0.67) for i in range(8)]
    assert [s.source for s in global_slots(3, 1, 0, 0.33)] == [LABELED] * 3


@pytest.mark.parametrize("batch,labeled,pseudo", [(5, 1, 3), (4, 1, 2), (0, 1, 3)])
def test_batch_must_hold_the_exact_ratio(batch, labeled, pseudo):
    with pytest.raises(NsnError, match="multiple"):
        global_slots(batch, labeled, pseudo, 0.33)


def test_rank_batch_sizes_are_stocks_split():
    # nnUNetTrainer._set_batch_size_and_oversample: the first ranks get one more
    assert rank_batch_sizes(4, 1) == [4]
    assert rank_batch_sizes(4, 2) == [2, 2]
    assert rank_batch_sizes(4, 3) == [2, 1, 1]
    assert rank_batch_sizes(10, 4) == [3, 3, 2, 2]
    with pytest.raises(NsnError):
        rank_batch_sizes(2, 4)


@pytest.mark.parametrize("batch", [4, 8, 12])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("oversample", [0.0, 0.33, 0.5, 1.0])
def test_ranks_together_hold_the_global_batch(batch, world_size, oversample):
    glob = global_slots(batch, 1, 3, oversample)
    parts = [rank_composition(batch, 1, 3, oversample, world_size, r) for r in range(world_size)]
    assert [p.batch_size for p in parts] == rank_batch_sizes(batch, world_size)
    joined = [slot for p in parts for slot in p.slots]
    assert joined == glob  # contiguous slices, in rank order
    assert sum(p.n_labeled for p in parts) == batch // 4
    assert sum(p.n_pseudo for p in parts) == 3 * batch // 4
    assert sum(sum(p.force_fg(LABELED)) + sum(p.force_fg(PSEUDO)) for p in parts) == \
        batch - round(batch * (1 - oversample))


def test_two_rank_split_of_the_papers_batch():
    r0, r1 = (rank_composition(4, 1, 3, 0.33, 2, r) for r in (0, 1))
    assert (r0.n_labeled, r0.n_pseudo, r1.n_labeled, r1.n_pseudo) == (1, 1, 0, 2)
    assert r0.force_fg(LABELED) == (False,) and r0.force_fg(PSEUDO) == (False,)
    assert r1.force_fg(PSEUDO) == (False, True)


# --- loaders on hand-written data -----------------------------------------------------------------------


def test_every_batch_has_the_exact_composition(two_datasets):
    composition = rank_composition(4, 1, 3, 0.33)
    loader = loader_for(composition, two_datasets)
    seen = {LABELED: set(), PSEUDO: set()}
    unforced_pseudo_fg = []
    for _ in range(150):
        batch = next(loader)
        check_batch(batch, [LABELED, PSEUDO, PSEUDO, PSEUDO], [False, False, False, True])
        for key in batch["keys"]:
            source, identifier = split_key(key)
            seen[source].add(identifier)
        unforced_pseudo_fg.append(bool((batch["target"][0][1] == 1).any()))
    # all cases of both datasets are drawn, colliding identifiers included
    assert seen[LABELED] == set(two_datasets[0].identifiers)
    assert seen[PSEUDO] == set(two_datasets[1].identifiers)
    # an unforced slot is a random crop: sometimes foreground, mostly not
    assert 0 < sum(unforced_pseudo_fg) < len(unforced_pseudo_fg)


def test_two_rank_simulation_keeps_the_global_ratio(two_datasets):
    loaders = [loader_for(rank_composition(4, 1, 3, 0.33, 2, r), two_datasets) for r in (0, 1)]
    for _ in range(60):
        s0 = check_batch(next(loaders[0]), [LABELED, PSEUDO], [False, False])
        s1 = check_batch(next(loaders[1]), [PSEUDO, PSEUDO], [False, True])
        assert (s0 + s1).count(LABELED) == 1 and (s0 + s1).count(PSEUDO) == 3


def test_eight_per_batch_on_two_ranks(two_datasets):
    loaders = [loader_for(rank_composition(8, 1, 3, 0.33, 2, r), two_datasets) for r in (0, 1)]
    for _ in range(20):
        check_batch(next(loaders[0]), [LABELED] + [PSEUDO] * 3, [False, False, False, False])
        check_batch(next(loaders[1]), [LABELED] + [PSEUDO] * 3, [False, True, True, True])


def test_mixed_loader_runs_in_nnunets_background_workers(two_datasets):
    loader = loader_for(rank_composition(4, 1, 3, 0.33), two_datasets)
    augmenter = NonDetMultiThreadedAugmenter(loader, None, num_processes=2, num_cached=2, seeds=None,
                                             pin_memory=False, wait_time=0.002)
    try:
        for _ in range(8):
            check_batch(next(augmenter), [LABELED, PSEUDO, PSEUDO, PSEUDO], [False, False, False, True])
    finally:
        augmenter._finish()


def test_colliding_identifiers_stay_apart(two_datasets):
    mixed = MixedDataset({LABELED: two_datasets[0], PSEUDO: two_datasets[1]})
    assert len(mixed.identifiers) == len(set(mixed.identifiers)) == 4 + 6
    assert float(mixed.load_case("labeled:case_001")[0].max()) == 1001
    assert float(mixed.load_case("pseudo:case_001")[0].max()) == 2001


def test_ignore_label_of_the_pseudo_labels(tmp_path):
    """Pseudo-labels with nnU-Net's ignore label (nsn pseudolabel --ignore-below): labeled cases still load."""
    manager = LabelManager({"background": 0, "organ": 1, "ignore": 2}, regions_class_order=None)
    write_cases(tmp_path / "labeled", LABELED, 2)
    folder = tmp_path / "pseudo"
    folder.mkdir()
    annotated = tuple([-1] + manager.all_labels)
    for i in range(3):
        data = np.full((1, *SHAPE), VALUE[PSEUDO] + i, dtype=np.float32)
        seg = np.zeros((1, *SHAPE), dtype=np.int8)
        seg[(0, *FG)] = 1
        seg[0, :, :4] = 2  # low-confidence voxels
        properties = {"class_locations": {1: np.argwhere(seg == 1), annotated: np.argwhere(seg != 2)}}
        nnUNetDatasetNumpy.save_case(data, seg, properties, str(folder / f"case_{i:03d}"))
    loader = build_mixed_loader(rank_composition(4, 1, 3, 0.0), nnUNetDatasetNumpy(str(tmp_path / "labeled")),
                                nnUNetDatasetNumpy(str(folder)), PATCH, PATCH, manager, None,
                                oversample_foreground_percent=0.0)
    for _ in range(40):
        batch = next(loader)
        assert batch["sources"] == [LABELED, PSEUDO, PSEUDO, PSEUDO]
        for j, key in enumerate(batch["keys"]):
            source, identifier = split_key(key)
            assert float(batch["data"][j].max()) == VALUE[source] + int(identifier.split("_")[1])


def test_split_key_rejects_foreign_keys():
    assert split_key("pseudo:case_001") == (PSEUDO, "case_001")
    assert split_key("labeled:a:b") == (LABELED, "a:b")
    with pytest.raises(ValueError):
        split_key("case_001")


# --- locating and checking the pseudo-labeled dataset ----------------------------------------------------

PLANS_NAME = "nnUNetLowFootprintPlans"


def _plans(dataset_name: str) -> dict:
    return {
        "dataset_name": dataset_name, "plans_name": PLANS_NAME,
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {"0": {"mean": 60.0, "std": 180.0, "percentile_00_5": -980.0,
                                                              "percentile_99_5": 1100.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 4, "patch_size": [8, 16, 16], "spacing": [2.5, 1.5, 1.5],
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {"order": 3},
            "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_seg_kwargs": {"order": 1},
            "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": {"features_per_stage": [4, 8]},
                             "_kw_requires_import": []},
        }},
    }


DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
                "file_ending": ".nii.gz"}


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    """nnU-Net folders with a labeled and a matching pseudo-labeled preprocessed dataset (hand-written)."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv("NSN_PSEUDO_DATASET", raising=False)
    pre = tmp_path / "nnUNet_preprocessed"
    for name, source in (("Dataset901_Lab", LABELED), ("Dataset902_Pseudo", PSEUDO)):
        (pre / name).mkdir()
        (pre / name / f"{PLANS_NAME}.json").write_text(json.dumps(_plans(name)))
        (pre / name / "dataset.json").write_text(json.dumps(DATASET_JSON))
        write_cases(pre / name / "nnUNetPlans_3d_fullres", source, 2)
    return pre


def _recipe(pseudo_dataset):
    from noisy_student_nnunet.recipe import load_recipe

    recipe = load_recipe("tiny")
    recipe["student"]["pseudo_dataset"] = pseudo_dataset
    return recipe


def _locate(recipe):
    from noisy_student_nnunet.trainers.pseudo_source import locate_pseudo_dataset

    return locate_pseudo_dataset(_plans("Dataset901_Lab"), "3d_fullres", DATASET_JSON, recipe)


def test_pseudo_dataset_found_from_recipe_or_env(nnunet_dirs, monkeypatch):
    found = _locate(_recipe("Dataset902_Pseudo"))
    assert found.name == "Dataset902_Pseudo"
    assert found.folder == nnunet_dirs / "Dataset902_Pseudo" / "nnUNetPlans_3d_fullres"
    assert found.identifiers == ["case_000", "case_001"]
    assert _locate(_recipe("902")).name == "Dataset902_Pseudo"  # an id works too
    monkeypatch.setenv("NSN_PSEUDO_DATASET", "902")
    assert _locate(_recipe(None)).name == "Dataset902_Pseudo"  # the environment wins over the recipe


def test_pseudo_labels_may_add_an_ignore_label(nnunet_dirs):
    dataset_json = nnunet_dirs / "Dataset902_Pseudo" / "dataset.json"
    _mutate(dataset_json, lambda d: d["labels"].update(ignore=2))  # nsn pseudolabel --ignore-below
    found = _locate(_recipe("Dataset902_Pseudo"))
    assert found.ignore_label == 2 and "2 pseudo-labeled cases" in str(found)


def _mutate(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("break_it,message", [
    (None, "student.pseudo_dataset' is null"),
    ("unknown", "'999' not found"),
    ("itself", "labeled dataset itself"),
    ("no_plans", "not preprocessed with plans 'nnUNetLowFootprintPlans'"),
    ("no_data", "not preprocessed for '3d_fullres'"),
    ("empty_data", "no preprocessed cases"),
    ("spacing", "'configurations.3d_fullres.spacing' differs"),
    ("patch", "'configurations.3d_fullres.patch_size' differs"),
    ("architecture", "'configurations.3d_fullres.architecture' differs"),
    ("normalisation", "'foreground_intensity_properties_per_channel' differs"),
    ("labels", "other 'labels'"),
    ("ignore_not_highest", "other 'labels'"),
    ("channels", "other 'channel_names'"),
])
def test_pseudo_dataset_errors_name_the_problem(nnunet_dirs, monkeypatch, break_it, message):
    import shutil

    base = nnunet_dirs / "Dataset902_Pseudo"
    plans, dataset_json, data = base / f"{PLANS_NAME}.json", base / "dataset.json", base / "nnUNetPlans_3d_fullres"
    recipe = _recipe(None if break_it is None else "Dataset902_Pseudo")
    if break_it == "unknown":
        monkeypatch.setenv("NSN_PSEUDO_DATASET", "999")
    elif break_it == "itself":
        monkeypatch.setenv("NSN_PSEUDO_DATASET", "901")
    elif break_it == "no_plans":
        plans.unlink()
    elif break_it == "no_data":
        shutil.rmtree(data)
    elif break_it == "empty_data":
        shutil.rmtree(data)
        data.mkdir()
    elif break_it == "spacing":
        _mutate(plans, lambda p: p["configurations"]["3d_fullres"].update(spacing=[2.0, 1.5, 1.5]))
    elif break_it == "patch":
        _mutate(plans, lambda p: p["configurations"]["3d_fullres"].update(patch_size=[16, 16, 16]))
    elif break_it == "architecture":
        _mutate(plans, lambda p: p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].update(
            features_per_stage=[8, 16]))
    elif break_it == "normalisation":
        _mutate(plans, lambda p: p["foreground_intensity_properties_per_channel"]["0"].update(mean=0.0))
    elif break_it == "ignore_not_highest":
        _mutate(dataset_json, lambda d: d["labels"].update(ignore=5))
    elif break_it == "labels":
        _mutate(dataset_json, lambda d: d["labels"].update(organ=2))
    elif break_it == "channels":
        _mutate(dataset_json, lambda d: d["channel_names"].update({"0": "MRI"}))
    with pytest.raises(NsnError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _locate(recipe)


# --- the trainer on phantoms ------------------------------------------------------------------------------

TRAINER = "NoisyStudentTrainer"
# a second phantom dataset named "Phantoms" too: its case identifiers equal the labeled ones
PSEUDO_ID = STUDENT_PSEUDO_ID

#: paper, Table 5 (rotation/scaling p_sample 0.2: stock nnU-Net's, the tables give none)
TABLE_5 = {
    "rotation": {"p_sample": 0.2, "angle_deg": [-30.0, 30.0]},
    "scaling": {"p_sample": 0.2, "range": [0.7, 1.4]},
    "gaussian_noise": {"p_sample": 0.15, "variance": [0.0, 0.1]},
    "gaussian_blur": {"p_sample": 0.2, "p_channel": 0.5, "sigma": [0.5, 1.5]},
    "brightness": {"p_sample": 0.15, "range": [0.7, 1.3]},
    "contrast": {"p_sample": 0.15, "range": [0.65, 1.5]},
    "low_resolution": {"p_sample": 0.25, "p_channel": 0.5, "zoom": [0.5, 1.0]},
    "gamma": {"p_sample": 0.15, "range": [0.7, 1.5], "invert_image": True},
    "mirror": {"p_sample": 1.0, "p_axis": 0.5},
}


def ensure_pseudo_phantoms(nnunet_env: dict, lowfootprint_plans: Path) -> str:
    """A pseudo-labeled dataset for the phantoms, preprocessed with their low-footprint plans (idempotent).

    Stands in for ``nsn pseudolabel``'s output: a second phantom dataset (other seed, same labels and
    identifiers) preprocessed with :func:`preprocess_with_plans`, in a subprocess (this process's
    environment stays untouched). Returns the dataset name.
    """
    name = f"Dataset{PSEUDO_ID:03d}_Phantoms"
    if (Path(nnunet_env["nnUNet_preprocessed"]) / name / lowfootprint_plans.name).is_file():
        return name
    labeled = lowfootprint_plans.parent.name
    code = (
        "from noisy_student_nnunet.phantoms import write_phantom_dataset\n"
        "from noisy_student_nnunet.plans_transfer import preprocess_with_plans\n"
        "import os\n"
        "if __name__ == '__main__':\n"
        f"    write_phantom_dataset(os.environ['nnUNet_raw'], {PSEUDO_ID}, name='Phantoms', num_labeled=6,\n"
        "        num_unlabeled=0, num_test=0, seed=1, inplane_voxels=(64, 80), slices=(24, 40),\n"
        "        slice_spacing=(2.0, 3.0))\n"
        f"    preprocess_with_plans('{labeled}', {PSEUDO_ID}, '{lowfootprint_plans.stem}', num_processes=2)\n"
    )
    from conftest import subprocess_env

    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(nnunet_env), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return name


@pytest.fixture(scope="module")
def pseudo_phantoms(nnunet_env, lowfootprint_plans) -> str:
    return ensure_pseudo_phantoms(nnunet_env, lowfootprint_plans)


@pytest.fixture
def student_env(nnunet_env, pseudo_phantoms, monkeypatch):
    """This process set up like ``nnUNetv2_train`` in CI (restored after the test)."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, nnunet_env[var])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_compile", "0")
    monkeypatch.setenv("NSN_PSEUDO_DATASET", str(PSEUDO_ID))
    monkeypatch.delenv("NSN_RECIPE", raising=False)
    return pseudo_phantoms


def make_trainer(trainer_class, plans_file: Path, fold, continue_training: bool = False):
    plans = json.loads(plans_file.read_text())
    plans["continue_training"] = continue_training
    dataset_json = json.loads((plans_file.parent / "dataset.json").read_text())
    return trainer_class(plans, "3d_fullres", fold, dataset_json, torch.device("cpu"))


def test_trainer_batches_validation_and_table_5(student_env, lowfootprint_plans):
    from noisy_student_nnunet.augmentation import describe_training_transforms
    from noisy_student_nnunet.trainers import NoisyStudentTrainer

    pseudo_folder = Path(os.environ["nnUNet_preprocessed"]) / student_env / "nnUNetPlans_3d_fullres"
    pseudo_ids = set(nnUNetDatasetBlosc2.get_identifiers(str(pseudo_folder)))
    trainer = make_trainer(NoisyStudentTrainer, lowfootprint_plans, 2)
    trainer.initialize()
    train_gen, val_gen = trainer.get_dataloaders()
    tr_keys, val_keys = trainer.do_split()
    assert pseudo_ids & set(tr_keys), "the phantom datasets should share identifiers"

    loader = train_gen.data_loader  # SingleThreadedAugmenter (nnUNet_n_proc_DA=0)
    assert trainer.batch_composition.describe().startswith("rank 0/1: 1 labeled + 3 pseudo-labeled")
    datasets = loader._data.datasets
    assert datasets[LABELED].source_folder == trainer.preprocessed_dataset_folder
    assert datasets[PSEUDO].source_folder == str(pseudo_folder)
    assert sorted(datasets[LABELED].identifiers) == sorted(tr_keys)
    assert sorted(datasets[PSEUDO].identifiers) == sorted(pseudo_ids)  # all of them, in every fold
    drawn = {LABELED: set(), PSEUDO: set()}
    for _ in range(25):
        batch = next(train_gen)
        assert batch["sources"] == [LABELED, PSEUDO, PSEUDO, PSEUDO]
        assert batch["data"].shape[0] == 4 and all(t.shape[0] == 4 for t in batch["target"])
        for key in batch["keys"]:
            source, identifier = split_key(key)
            drawn[source].add(identifier)
    assert drawn[LABELED] <= set(tr_keys) and drawn[PSEUDO] <= pseudo_ids
    assert len(drawn[PSEUDO]) > 1

    for _ in range(10):  # validation: the labeled fold's validation cases only
        assert set(next(val_gen)["keys"]) <= set(val_keys)
    assert val_gen.data_loader._data.source_folder == trainer.preprocessed_dataset_folder

    assert describe_training_transforms(loader.transforms) == TABLE_5


def _ddp_rank(rank: int, world_size: int, port: int, plans_file: str, queue) -> None:
    """One rank of a real torch.distributed group (gloo, CPU) running the trainer's DDP code paths."""
    import torch.distributed as dist

    from noisy_student_nnunet.trainers import NoisyStudentTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        trainer = make_trainer(NoisyStudentTrainer, Path(plans_file), 2)
        assert trainer.is_ddp
        trainer._set_batch_size_and_oversample()  # stock: splits the global batch across the ranks
        train_gen, _ = trainer.get_dataloaders()
        batches = [next(train_gen)["sources"] for _ in range(10)]
        queue.put((rank, trainer.batch_size, str(trainer.batch_composition), batches))
    except BaseException as error:  # report instead of hanging the parent
        queue.put((rank, None, repr(error), []))
        raise
    finally:
        dist.destroy_process_group()


def test_two_ranks_of_torch_distributed_hold_the_global_ratio(student_env, lowfootprint_plans):
    """``-num_gpus 2`` in miniature: two processes in a gloo group, stock's batch split, our slots."""
    import multiprocessing
    import socket

    from noisy_student_nnunet.trainers import NoisyStudentTrainer

    make_trainer(NoisyStudentTrainer, lowfootprint_plans, 2).do_split()  # splits file exists before the ranks
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    ranks = [context.Process(target=_ddp_rank, args=(r, 2, port, str(lowfootprint_plans), queue)) for r in (0, 1)]
    for process in ranks:
        process.start()
    results = sorted(queue.get(timeout=600) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
    assert [r[1] for r in results] == [2, 2], results
    assert results[0][2].startswith("rank 0/2: 1 labeled + 1 pseudo-labeled")
    assert results[1][2].startswith("rank 1/2: 0 labeled + 2 pseudo-labeled")
    assert "foreground forced: ..)" in results[0][2] and "foreground forced: .f)" in results[1][2]
    for step in range(10):
        assert results[0][3][step] == [LABELED, PSEUDO] and results[1][3][step] == [PSEUDO, PSEUDO]
        assert (results[0][3][step] + results[1][3][step]).count(LABELED) == 1


def test_trainer_uses_an_ignore_label_of_the_pseudo_labels(student_env, lowfootprint_plans, monkeypatch):
    """``nsn pseudolabel --ignore-below`` adds "ignore" above all labels: the loss must skip those voxels."""
    import shutil

    from noisy_student_nnunet.trainers import NoisyStudentTrainer

    pre = Path(os.environ["nnUNet_preprocessed"])
    ignored = pre / f"Dataset{STUDENT_IGNORE_ID:03d}_PhantomsIgnore"
    if not ignored.exists():
        shutil.copytree(pre / student_env, ignored)
        dataset_json = json.loads((ignored / "dataset.json").read_text())
        dataset_json["labels"]["ignore"] = max(dataset_json["labels"].values()) + 1
        (ignored / "dataset.json").write_text(json.dumps(dataset_json))
    monkeypatch.setenv("NSN_PSEUDO_DATASET", str(STUDENT_IGNORE_ID))
    trainer = make_trainer(NoisyStudentTrainer, lowfootprint_plans, 2)
    trainer.initialize()
    assert trainer.label_manager.ignore_label is None
    train_gen, _ = trainer.get_dataloaders()
    ignore = json.loads((ignored / "dataset.json").read_text())["labels"]["ignore"]
    assert trainer.label_manager.ignore_label == ignore
    assert trainer.loss.loss.ignore_label == ignore  # deep supervision wraps DC_and_CE_loss
    assert "ignore" not in trainer.dataset_json["labels"]  # the results folder keeps the labeled labels
    for _ in range(5):
        assert next(train_gen)["sources"] == [LABELED, PSEUDO, PSEUDO, PSEUDO]
    assert np.isfinite(trainer.train_step(next(train_gen))["loss"])


def test_stock_nnunetv2_train_runs_the_student(student_env, lowfootprint_plans, nnunet_env, run_cli):
    dataset_id = lowfootprint_plans.parent.name
    run_cli(["nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", TRAINER, "-p", lowfootprint_plans.stem,
             "-device", "cpu"], env_extra={"NSN_PSEUDO_DATASET": str(PSEUDO_ID)}, timeout=1500)
    fold = (Path(nnunet_env["nnUNet_results"]) / dataset_id / f"{TRAINER}__{lowfootprint_plans.stem}__3d_fullres"
            / "fold_0")
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER and checkpoint["current_epoch"] == 2
    log = "\n".join(p.read_text() for p in sorted(fold.glob("training_log_*.txt")))
    assert f"pseudo-labeled dataset: {student_env}, 6 cases" in log
    assert "minibatch: rank 0/1: 1 labeled + 3 pseudo-labeled" in log
    assert "augmentation 'student_augmentation'" in log
    debug = json.loads((fold / "debug.json").read_text())
    assert student_env in debug["pseudo_dataset"] and "LPPP" in debug["batch_composition"]
    assert (fold / "validation" / "summary.json").is_file()
