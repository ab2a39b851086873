"""The CUDA paths: fp16 prediction against fp32, GPU memory between cases, an AMP training step.

Every test here is marked ``cuda`` and skipped without a CUDA device (``pytest -m cuda`` selects them;
``benchmarks/gpu_check.sh`` runs them on a lent GPU). They use the real predictor and the real trainer on CUDA:

- ``--precision auto`` is stock's fp16 autocast on CUDA; on a briefly trained model its labels must match strict
  fp32's (TF32 off) up to organ boundaries, and CUDA fp32 must give the CPU's torch fp32 labels;
- the predictor keeps a case's logits on the GPU and must give that memory back after each case, so that a long
  list of cases does not grow GPU memory (the paper's low-footprint claim is about the peak of one case);
- ``NoisyStudentTrainer.train_step`` under stock's AMP (fp16 autocast and GradScaler) must stay finite and learn.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import model_folders as mf  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TRAINED_DATASET = "Dataset986_CudaTrained"
TRAIN_ITERATIONS = 400
MiB = 2 ** 20


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 convolutions and matrix products without TF32 (torch lets cuDNN use TF32 by default)."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def make_predictor(model: Path, device: str, precision: str = "auto"):
    from noisy_student_nnunet.inference.predictor import LowFootprintPredictor

    predictor = LowFootprintPredictor(device=torch.device(device), precision=precision, backend="torch",
                                      allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (0,))
    return predictor


def predict(predictor, image: Path, out: Path) -> tuple[np.ndarray, set[torch.dtype]]:
    """(label map of ``image`` written by the predictor, dtypes the segmentation head produced meanwhile)."""
    import SimpleITK as sitk

    dtypes: set[torch.dtype] = set()
    head = predictor.network.decoder.seg_layers[-1]
    hook = head.register_forward_hook(lambda _module, _inputs, output: dtypes.add(output.dtype))
    try:
        predictor.predict_from_files([[str(image)]], [str(out / "case")], num_processes_preprocessing=0,
                                     num_processes_segmentation_export=0)
    finally:
        hook.remove()
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz"))), dtypes


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    p, q = a == label, b == label
    return float(2 * (p & q).sum() / max(1, p.sum() + q.sum()))


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """(model folder, phantom CT, its truth): a small U-Net trained on the GPU on phantoms at the plans' spacing
    (random weights give near-ties everywhere, where any rounding flips a label), an unseen phantom at a finer
    spacing (resampled on the way in and out)."""
    from noisy_student_nnunet.phantoms import make_phantom

    root = tmp_path_factory.mktemp("cuda_trained")
    plans = mf.make_plans([2.5, 1.6, 1.6], [16, 48, 48], mf.tiny_architecture((8, 16, 32)),
                          dataset_name=TRAINED_DATASET)
    folder = root / "results" / TRAINED_DATASET / f"nnUNetTrainer__nnUNetPlans__{mf.CONFIGURATION}"
    mf.train_phantom_model(folder, plans, iterations=TRAIN_ITERATIONS, case_shape=(16, 64, 64), num_cases=6,
                           device="cuda")
    phantom = make_phantom(12345, (32, 128, 128), (1.25, 0.8, 0.8))
    (root / "in").mkdir()
    phantom.write(root / "in" / "case_0000.nii.gz")
    return folder, root / "in" / "case_0000.nii.gz", phantom.label


def test_fp16_labels_match_strict_fp32(trained_model, tmp_path):
    """``auto`` on CUDA runs the network in fp16 (the head's output is fp16) and moves labels only at organ
    boundaries: per label Dice >= 0.99 against strict fp32, or less than 1e-3 of the voxels differ for it."""
    model, image, truth = trained_model
    auto = make_predictor(model, "cuda", "auto")
    assert auto.precision.name == "fp16" and auto.backend.name == "torch"
    fp16, fp16_dtypes = predict(auto, image, tmp_path / "auto")
    with strict_fp32():
        fp32, fp32_dtypes = predict(make_predictor(model, "cuda", "fp32"), image, tmp_path / "fp32")
    assert fp16_dtypes == {torch.float16} and fp32_dtypes == {torch.float32}
    assert fp16.shape == fp32.shape == truth.shape
    learned = [c for c in np.unique(truth) if c != 0 and dice(fp32, truth, c) >= 0.5]
    assert len(learned) >= 3, f"the model learned too little to test precision: {learned}"
    for label in sorted(set(np.unique(fp16)) | set(np.unique(fp32))):
        differing = float(((fp16 == label) != (fp32 == label)).mean())
        assert dice(fp16, fp32, label) >= 0.99 or differing < 1e-3, (int(label), dice(fp16, fp32, label), differing)
    assert (fp16 == fp32).mean() >= 0.999


def test_cuda_fp32_labels_equal_the_cpus(trained_model, tmp_path):
    """Preprocessing, sliding window, argmax and resizing on the device give the CPU's torch fp32 labels."""
    model, image, _ = trained_model
    with strict_fp32():
        cuda, _ = predict(make_predictor(model, "cuda", "fp32"), image, tmp_path / "cuda")
    cpu, _ = predict(make_predictor(model, "cpu", "fp32"), image, tmp_path / "cpu")
    assert (cuda == cpu).mean() >= 0.9999


def test_gpu_memory_is_given_back_between_cases(trained_model, tmp_path):
    """After each case the GPU holds what it held before it (the network), within 2 MiB; during a case it held
    at least that case's logits (fp16, classes x network grid), so the measurement saw them. The first case, as
    large as the largest measured, is a warm-up: the network moves to the GPU and CUDA's libraries take their
    workspaces then."""
    from noisy_student_nnunet.phantoms import make_phantom

    model, image, _ = trained_model
    spacing = (1.25, 0.8, 0.8)
    large = tmp_path / "large_0000.nii.gz"
    make_phantom(7, (96, 256, 256), spacing).write(large)
    predictor = make_predictor(model, "cuda")
    predict(predictor, large, tmp_path / "warm_up")
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    assert baseline > 0, "the network should be on the GPU"
    heads = predictor.label_manager.num_segmentation_heads
    plans_spacing = np.array(predictor.configuration_manager.spacing)
    for i, (case, shape) in enumerate(((image, (32, 128, 128)), (large, (96, 256, 256)))):
        torch.cuda.reset_peak_memory_stats()
        predict(predictor, case, tmp_path / f"case{i}")
        torch.cuda.synchronize()
        logits_bytes = heads * float(np.prod(np.round(np.array(shape) * np.array(spacing) / plans_spacing))) * 2
        grew = torch.cuda.max_memory_allocated() - baseline
        assert grew >= 0.5 * logits_bytes, (case.name, grew / MiB, logits_bytes / MiB)
        left = torch.cuda.memory_allocated() - baseline
        assert left <= 2 * MiB, f"{case.name}: {left / MiB:.1f} MiB still allocated after the case"


def test_student_amp_training_steps_stay_finite(tmp_path, monkeypatch):
    """Five ``train_step``s of NoisyStudentTrainer (tiny recipe, its plans as ``nsn plan`` derives them) on CUDA:
    fp16 autocast runs (the head's output is fp16), GradScaler keeps a finite scale, every loss and weight stays
    finite and the weights change (at least one step was not skipped for an overflow)."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

    from noisy_student_nnunet.plans import derive_lowfootprint_plans
    from noisy_student_nnunet.recipe import load_recipe
    from noisy_student_nnunet.trainers import NoisyStudentTrainer

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("nnUNet_compile", "0")
    monkeypatch.delenv("NSN_RECIPE", raising=False)
    recipe = load_recipe("tiny")
    stock = mf.make_plans([2.5, 1.6, 1.6], recipe["network"]["patch_size"], dataset_name="Dataset987_CudaStep",
                          plans_name="nnUNetPlans")
    plans = derive_lowfootprint_plans(stock, recipe)
    dataset_json = mf.make_dataset_json()
    # one preprocessed case: initialize() infers the dataset class from the files (no batch is read from it)
    data_folder = tmp_path / "nnUNet_preprocessed" / plans["dataset_name"] / \
        plans["configurations"][mf.CONFIGURATION]["data_identifier"]
    data_folder.mkdir(parents=True)
    nnUNetDatasetNumpy.save_case(np.zeros((1, 8, 8, 8), np.float32), np.zeros((1, 8, 8, 8), np.int8),
                                 {"spacing": [2.5, 1.6, 1.6], "class_locations": {}}, str(data_folder / "case_000"))
    (data_folder.parent / "dataset.json").write_text(json.dumps(dataset_json))

    trainer = NoisyStudentTrainer({**copy.deepcopy(plans), "continue_training": False}, mf.CONFIGURATION, 0,
                                  dataset_json, torch.device("cuda"))
    trainer.initialize()
    assert trainer.grad_scaler is not None and not trainer.cpu_bf16
    trainer.network.train()
    before = [p.detach().clone() for p in trainer.network.parameters()]
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    heads = trainer.label_manager.num_segmentation_heads
    generator = torch.Generator().manual_seed(0)
    dtypes: set[torch.dtype] = set()
    hook = trainer.network.decoder.seg_layers[-1].register_forward_hook(
        lambda _module, _inputs, output: dtypes.add(output.dtype))
    losses = []
    for _ in range(5):
        labels = torch.randint(0, heads, (trainer.batch_size, 1, *patch), generator=generator).float()
        target = [torch.nn.functional.interpolate(labels, size=[max(1, round(p * s)) for p, s in zip(patch, scale)],
                                                  mode="nearest-exact").to(torch.int16)
                  for scale in trainer._get_deep_supervision_scales()]
        batch = {"data": torch.randn((trainer.batch_size, 1, *patch), generator=generator), "target": target}
        losses.append(float(trainer.train_step(batch)["loss"]))
    hook.remove()
    assert dtypes == {torch.float16}
    assert all(np.isfinite(losses)), losses
    assert np.isfinite(trainer.grad_scaler.get_scale()) and trainer.grad_scaler.get_scale() > 0
    after = list(trainer.network.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "every step was skipped"
