"""NoisyStudentFinetuneTrainer: complete student weights (head included), labeled data only, --c, stock CLI.

The student checkpoint is written by a real NoisyStudentTrainer (``save_checkpoint``) for fold 1 with its
weights shifted away from any fresh initialisation, so "starts from the student" is a visible, exact
property. A pseudo-labeled dataset is present and named by NSN_PSEUDO_DATASET throughout: the fine-tune
must ignore it, which an audit hook on file opens checks.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.trainers.finetune import (ENV_VAR, SOURCE_RECORD, load_full_weights,
                                                    resolve_finetune_source, student_fold_folder)
from test_student import PSEUDO_ID, ensure_pseudo_phantoms, make_trainer

FOLD = 1
TRAINER = "NoisyStudentFinetuneTrainer"

# --- file opens seen by this process (audit hooks cannot be removed: record only while asked) --------------
_OPENED: list[str] | None = None


def _audit(event: str, args) -> None:
    if event == "open" and _OPENED is not None and args and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


def _set_env(mp: pytest.MonkeyPatch, nnunet_env: dict) -> None:
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        mp.setenv(var, nnunet_env[var])
    mp.setenv("nnUNet_n_proc_DA", "0")
    mp.setenv("nnUNet_compile", "0")
    mp.setenv("NSN_PSEUDO_DATASET", str(PSEUDO_ID))  # present and named: the fine-tune must not touch it
    mp.delenv(ENV_VAR, raising=False)
    mp.delenv("NSN_RECIPE", raising=False)


@pytest.fixture
def finetune_env(nnunet_env, monkeypatch):
    _set_env(monkeypatch, nnunet_env)


def _network_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer._bare_network().state_dict().items()}


@pytest.fixture(scope="module")
def student_checkpoint(nnunet_env, lowfootprint_plans) -> Path:
    """fold_1/checkpoint_final.pth of NoisyStudentTrainer, saved by the trainer itself, weights shifted."""
    from noisy_student_nnunet.trainers import NoisyStudentTrainer

    ensure_pseudo_phantoms(nnunet_env, lowfootprint_plans)
    with pytest.MonkeyPatch.context() as mp:
        _set_env(mp, nnunet_env)
        student = make_trainer(NoisyStudentTrainer, lowfootprint_plans, FOLD)
        student.initialize()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for tensor in student.network.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(0.25 + 0.1 * torch.randn(tensor.shape, generator=generator))
        path = Path(student.output_folder) / "checkpoint_final.pth"
        student.save_checkpoint(str(path))
    return path


@pytest.fixture(scope="module")
def finetuned(student_checkpoint, lowfootprint_plans, nnunet_env, run_cli) -> Path:
    """fold_1 of the fine-tune trained by stock nnUNetv2_train (tiny recipe: 1 epoch x 4 iterations)."""
    dataset = lowfootprint_plans.parent.name
    run_cli(["nnUNetv2_train", dataset, "3d_fullres", str(FOLD), "-tr", TRAINER, "-p", lowfootprint_plans.stem,
             "-device", "cpu"], env_extra={"NSN_PSEUDO_DATASET": str(PSEUDO_ID)}, timeout=1500)
    return Path(nnunet_env["nnUNet_results"]) / dataset / f"{TRAINER}__{lowfootprint_plans.stem}__3d_fullres" / \
        f"fold_{FOLD}"


def test_finetune_starts_from_every_student_tensor_and_never_loads_pseudo_cases(
        finetune_env, student_checkpoint, lowfootprint_plans, nnunet_env):
    global _OPENED
    from noisy_student_nnunet.trainers import NoisyStudentFinetuneTrainer

    student = torch.load(student_checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    trainer = make_trainer(NoisyStudentFinetuneTrainer, lowfootprint_plans, FOLD)
    trainer.initialize()
    fresh = _network_state(trainer)
    assert fresh.keys() == student.keys()
    head = [k for k in student if ".seg_layers." in k]
    assert head, "the checkpoint has a segmentation head"
    assert not any(torch.equal(fresh[k], student[k]) for k in head)  # a fresh head is not the student's

    trainer.on_train_start()
    loaded = _network_state(trainer)
    for key, tensor in student.items():  # every tensor, bit for bit
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key

    record = json.loads((Path(trainer.output_folder) / SOURCE_RECORD).read_text())
    assert record["checkpoint"] == str(student_checkpoint.resolve())
    assert record["sha256"] == hashlib.sha256(student_checkpoint.read_bytes()).hexdigest()
    assert record["trainer_name"] == "NoisyStudentTrainer"
    debug = json.loads((Path(trainer.output_folder) / "debug.json").read_text())
    assert debug["finetune_source"] == record["checkpoint"] and debug["finetune_source_sha256"] == record["sha256"]

    # labeled data only: the loaders read the labeled folder, and no file of the pseudo-labeled dataset opens
    tr_keys, val_keys = trainer.do_split()
    labeled_folder = Path(trainer.preprocessed_dataset_folder)
    pseudo_root = Path(nnunet_env["nnUNet_preprocessed"]) / f"Dataset{PSEUDO_ID:03d}_Phantoms"
    assert trainer.dataloader_train.data_loader._data.source_folder == str(labeled_folder)
    _OPENED = []
    try:
        for _ in range(trainer.num_epochs * trainer.num_iterations_per_epoch + 20):
            assert set(next(trainer.dataloader_train)["keys"]) <= set(tr_keys)
        for _ in range(10):
            assert set(next(trainer.dataloader_val)["keys"]) <= set(val_keys)
        opened = list(_OPENED)
    finally:
        _OPENED = None
    assert any(Path(p).parent == labeled_folder for p in opened), "the hook sees case loads"
    assert not [p for p in opened if Path(p).is_relative_to(pseudo_root)]


def test_stock_nnunetv2_train_runs_the_finetune(finetuned, student_checkpoint):
    checkpoint = torch.load(finetuned / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER and checkpoint["current_epoch"] == 1  # tiny finetune: 1 epoch
    log = "\n".join(p.read_text() for p in sorted(finetuned.glob("training_log_*.txt")))
    assert "recipe 'tiny': schedule 'finetune', augmentation 'student_augmentation'" in log
    digest = hashlib.sha256(student_checkpoint.read_bytes()).hexdigest()
    assert f"fine-tune starts from all weights (segmentation head included) of {student_checkpoint.resolve()}" in log
    assert digest in log
    assert "pseudo-labeled" not in log
    assert json.loads((finetuned / SOURCE_RECORD).read_text())["sha256"] == digest
    # it trained: the weights moved away from the student's
    student = torch.load(student_checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    assert any(not torch.equal(v, student[k]) for k, v in checkpoint["network_weights"].items())


def test_continue_resumes_from_the_finetune_checkpoint_not_the_student(finetune_env, finetuned,
                                                                       student_checkpoint, lowfootprint_plans):
    from nnunetv2.run.run_training import maybe_load_checkpoint

    from noisy_student_nnunet.trainers import NoisyStudentFinetuneTrainer

    final = torch.load(finetuned / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # what `nnUNetv2_train ... --c` does: build with continue_training, load the checkpoint, run_training
    trainer = make_trainer(NoisyStudentFinetuneTrainer, lowfootprint_plans, FOLD, continue_training=True)
    maybe_load_checkpoint(trainer, True, False)
    trainer.on_train_start()
    assert trainer.current_epoch == 1
    loaded = _network_state(trainer)
    assert all(torch.equal(loaded[k], v) for k, v in final["network_weights"].items())
    log = Path(trainer.log_file).read_text()
    assert "resuming the fine-tune at epoch 1" in log and "fine-tune starts from" not in log
    assert trainer.finetune_source == str(student_checkpoint.resolve())  # still recorded


def test_stock_pretrained_weights_are_refused(finetune_env, lowfootprint_plans, student_checkpoint):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from noisy_student_nnunet.trainers import NoisyStudentFinetuneTrainer

    trainer = make_trainer(NoisyStudentFinetuneTrainer, lowfootprint_plans, 3)
    trainer.initialize()
    load_pretrained_weights(trainer.network, str(student_checkpoint), verbose=False)  # -pretrained_weights
    with pytest.raises(NsnError, match="NSN_FINETUNE_FROM"):
        trainer.on_train_start()


def test_missing_student_checkpoint_is_a_clear_error(finetune_env, lowfootprint_plans, student_checkpoint):
    from noisy_student_nnunet.trainers import NoisyStudentFinetuneTrainer

    trainer = make_trainer(NoisyStudentFinetuneTrainer, lowfootprint_plans, 3)
    trainer.initialize()
    with pytest.raises(NsnError, match=r"student checkpoint not found: .*fold_3/checkpoint_final.pth"):
        trainer.load_student_weights()


def test_a_damaged_source_checkpoint_is_one_line_naming_it(finetune_env, lowfootprint_plans, student_checkpoint,
                                                            tmp_path, monkeypatch):
    from noisy_student_nnunet.trainers import NoisyStudentFinetuneTrainer

    cut = tmp_path / "cut.pth"
    cut.write_bytes(student_checkpoint.read_bytes()[:5000])  # a copy that stopped early
    monkeypatch.setenv(ENV_VAR, str(cut))
    trainer = make_trainer(NoisyStudentFinetuneTrainer, lowfootprint_plans, 0)
    trainer.initialize()
    with pytest.raises(NsnError, match=rf"{cut}: damaged checkpoint \(5000 bytes"):
        trainer.load_student_weights()


# --- choosing the source -------------------------------------------------------------------------------------


@pytest.fixture
def results(tmp_path) -> Path:
    for fold in (0, 2):
        folder = student_fold_folder(tmp_path, "Dataset001_X", "P", "3d_fullres", fold)
        folder.mkdir(parents=True)
        (folder / "checkpoint_final.pth").write_bytes(b"x")
    unfinished = student_fold_folder(tmp_path, "Dataset001_X", "P", "3d_fullres", 4)
    unfinished.mkdir(parents=True)
    (unfinished / "checkpoint_latest.pth").write_bytes(b"x")
    return tmp_path


def _resolve(setting, results, fold=0):
    return resolve_finetune_source(setting, results, "Dataset001_X", "P", "3d_fullres", fold)


def test_source_default_is_the_student_of_the_same_fold(results):
    expected = results / "Dataset001_X" / "NoisyStudentTrainer__P__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    assert _resolve(None, results) == expected.resolve()
    assert _resolve("  ", results) == expected.resolve()


def test_source_can_be_another_fold_a_folder_or_a_file(results, tmp_path):
    fold2 = student_fold_folder(results, "Dataset001_X", "P", "3d_fullres", 2)
    assert _resolve("fold_2", results) == (fold2 / "checkpoint_final.pth").resolve()
    assert _resolve("2", results) == (fold2 / "checkpoint_final.pth").resolve()
    assert _resolve(str(fold2), results) == (fold2 / "checkpoint_final.pth").resolve()
    other = tmp_path / "elsewhere.pth"
    other.write_bytes(b"y")
    assert _resolve(str(other), results) == other.resolve()


@pytest.mark.parametrize("setting,fold,message", [
    (None, 1, r"student checkpoint not found: .*fold_1/checkpoint_final.pth"),
    ("fold_4", 0, r"training is unfinished: checkpoint_latest.pth exists"),
    ("no/such/file.pth", 0, r"NSN_FINETUNE_FROM=no/such/file.pth: no such checkpoint"),
])
def test_source_errors_name_the_file(results, setting, fold, message):
    with pytest.raises(NsnError, match=message):
        _resolve(setting, results, fold)


def test_weights_of_other_plans_are_refused():
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.Conv3d(4, 2, 1))
    good = {k: torch.randn_like(v) for k, v in network.state_dict().items()}
    load_full_weights(network, {"network_weights": {f"module.{k}": v for k, v in good.items()}}, "ok.pth")
    assert all(torch.equal(network.state_dict()[k], v) for k, v in good.items())
    wrong_shape = dict(good, **{"1.weight": torch.zeros(3, 4, 1, 1, 1)})
    with pytest.raises(NsnError, match=r"'1.weight' has shape \(3, 4, 1, 1, 1\)"):
        load_full_weights(network, {"network_weights": wrong_shape}, "bad.pth")
    missing = {k: v for k, v in good.items() if k != "1.bias"}
    with pytest.raises(NsnError, match="key '1.bias' is missing"):
        load_full_weights(network, {"network_weights": missing}, "bad.pth")
    with pytest.raises(NsnError, match="not an nnU-Net checkpoint"):
        load_full_weights(network, {"state_dict": good}, "bad.pth")
