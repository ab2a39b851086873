"""The teacher ensemble: every fold's sliding window, softmax probabilities averaged on the fly.

The paper (section 2.2) averages the folds' *softmax outputs* before the argmax; stock nnU-Net
averages *logits* (``nnUNetPredictor.predict_logits_from_preprocessed_data``). A fold with large
logits dominates a logit average but not a probability average, so the two can disagree.

Everything stays in the preprocessed grid (the grid the network sees): one fold's logits at a time
(fp16, as nnU-Net's sliding window returns them) and a running sum of probabilities (fp32 on CPU,
fp16 on CUDA, C x preprocessed voxels; never C x original voxels). Each fold's argmax is kept as
uint8 for the fold-agreement statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.validation import parse_folds  # noqa: F401  (shared with the predictor's -f)

#: voxels per softmax slab: bounds the fp32 temporary of one softmax call
_SLAB_VOXELS = 1 << 22


@dataclass
class EnsemblePrediction:
    """The ensemble's hard label, its confidence and each fold's own label, all in the preprocessed grid."""

    labels: np.ndarray  #: uint8, argmax of the mean softmax
    max_prob: np.ndarray  #: float32, the mean softmax at the argmax (the ensemble's confidence)
    fold_labels: np.ndarray  #: uint8 (folds, *grid), each fold's own argmax


def fold_checkpoints(model_dir: Path, folds: Sequence[int | str], checkpoint_name: str) -> list[Path]:
    """The checkpoint file of each fold; NsnError naming the first missing one (before any work starts)."""
    if not (model_dir / "plans.json").is_file() or not (model_dir / "dataset.json").is_file():
        raise NsnError(f"no trained model in {model_dir} (plans.json/dataset.json missing): check -d, -tr, -p, -c")
    files = [model_dir / f"fold_{fold}" / checkpoint_name for fold in folds]
    for path in files:
        if not path.is_file():
            raise NsnError(f"missing teacher checkpoint {path} (fold not trained, or choose other -f/-chk)")
    return files


def _new_predictor(device: torch.device, use_mirroring: bool, tile_step_size: float, progress: bool,
                   precision: str = "auto", backend: str = "auto"):
    """The low-footprint predictor (its device handling, network precision and backend)."""
    from noisy_student_nnunet.inference import LowFootprintPredictor

    try:
        return LowFootprintPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                     perform_everything_on_device=device.type == "cuda", device=device,
                                     verbose=False, verbose_preprocessing=False, allow_tqdm=progress,
                                     precision=precision, backend=backend)
    except ValueError as error:
        raise NsnError(f"--precision {precision}: {error}") from None


class TeacherEnsemble:
    """The trained teacher folds of one model folder, predicting the mean-softmax pseudo-label.

    ``model_dir`` is ``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>``. Loading fails
    fast (NsnError naming the file) on a missing or unreadable checkpoint.
    """

    def __init__(self, model_dir: Path | str, folds: Sequence[int | str], checkpoint_name: str = "checkpoint_final.pth",
                 device: torch.device | str = "cpu", use_mirroring: bool = False, tile_step_size: float = 0.5,
                 progress: bool = False, precision: str = "auto", backend: str = "auto"):
        self.model_dir = Path(model_dir)
        self.folds = parse_folds(folds)
        self.checkpoint_files = fold_checkpoints(self.model_dir, self.folds, checkpoint_name)
        self.device = torch.device(device) if isinstance(device, str) else device
        self.predictor = _new_predictor(self.device, use_mirroring, tile_step_size, progress, precision, backend)
        # a damaged or foreign checkpoint is already an NsnError naming the file (LowFootprintPredictor)
        self.predictor.initialize_from_trained_model_folder(str(self.model_dir), self.folds, checkpoint_name)
        if self.label_manager.has_regions:
            raise NsnError(f"{self.model_dir}: region-based models are not supported (softmax averaging needs labels)")
        if self.num_classes > 255:
            raise NsnError(f"{self.model_dir}: more than 255 labels are not supported")
        # the accumulator: fp16 on CUDA (as nnU-Net's logits), fp32 on CPU (fp16 arithmetic is slow there)
        self.accumulate_dtype = torch.float16 if self.device.type == "cuda" else torch.float32

    # --- what nnU-Net's predictor holds -------------------------------------------------------------
    @property
    def plans_manager(self):
        return self.predictor.plans_manager

    @property
    def configuration_manager(self):
        return self.predictor.configuration_manager

    @property
    def label_manager(self):
        return self.predictor.label_manager

    @property
    def dataset_json(self) -> dict:
        return self.predictor.dataset_json

    @property
    def num_classes(self) -> int:
        return int(self.label_manager.num_segmentation_heads)

    def _load_fold(self, index: int) -> None:
        from noisy_student_nnunet.inference.lazy_dynamo import OptimizedModule  # no torch._dynamo import

        network = self.predictor.network
        params = self.predictor.list_of_parameters[index]
        if isinstance(network, OptimizedModule):
            network._orig_mod.load_state_dict(params)
        else:
            network.load_state_dict(params)

    def fold_logits(self, data: torch.Tensor, index: int) -> torch.Tensor:
        """One fold's sliding-window logits (C x grid, fp16), as nnU-Net computes them for that fold alone."""
        self._load_fold(index)
        return self.predictor.predict_sliding_window_return_logits(data)

    @torch.inference_mode()
    def predict(self, data: np.ndarray | torch.Tensor) -> EnsemblePrediction:
        """Run every fold on preprocessed ``data`` (channels x grid) and average their softmax probabilities."""
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(data)
        prob_sum: torch.Tensor | None = None
        fold_labels: list[np.ndarray] = []
        for index in range(len(self.predictor.list_of_parameters)):
            logits = self.fold_logits(data, index)
            if prob_sum is None:
                prob_sum = torch.zeros(logits.shape, dtype=self.accumulate_dtype, device=logits.device)
            logits = logits.to(prob_sum.device)
            fold_labels.append(logits.argmax(0).to(torch.uint8).cpu().numpy())
            add_softmax_(prob_sum, logits)
            del logits
        assert prob_sum is not None
        prob_sum /= len(fold_labels)
        max_prob, labels = prob_sum.max(0)
        del prob_sum
        return EnsemblePrediction(labels=labels.to(torch.uint8).cpu().numpy(),
                                  max_prob=max_prob.float().cpu().numpy(),
                                  fold_labels=np.stack(fold_labels))


def add_softmax_(prob_sum: torch.Tensor, logits: torch.Tensor) -> None:
    """``prob_sum += softmax(logits, dim=0)`` in slabs along the first spatial axis (bounded fp32 temporaries)."""
    per_slice = int(np.prod(logits.shape[2:])) * logits.shape[0] if logits.ndim > 2 else logits.shape[0]
    step = max(1, _SLAB_VOXELS // max(1, per_slice))
    for start in range(0, logits.shape[1], step):
        part = slice(start, start + step)
        prob_sum[:, part] += torch.softmax(logits[:, part].float(), dim=0).to(prob_sum.dtype)


def model_folder(results_root: Path, dataset_name: str, trainer: str, plans: str, configuration: str) -> Path:
    """nnU-Net's results folder of a trained model: ``<results>/<dataset>/<trainer>__<plans>__<configuration>``."""
    return results_root / dataset_name / f"{trainer}__{plans}__{configuration}"


def set_torch_threads(device: torch.device) -> None:
    """As ``nnUNetv2_predict``: one thread when a GPU does the work; on CPU, the cores this process may use
    (or OMP_NUM_THREADS), not the host's CPU count (:mod:`noisy_student_nnunet.cpu_threads`)."""
    from noisy_student_nnunet.cpu_threads import cpu_thread_count

    if device.type == "cuda":
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(cpu_thread_count())
