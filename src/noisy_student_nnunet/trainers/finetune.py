"""The final stage: fine-tune the student on the labeled cases alone (paper, sections 2.2 and 3.3).

It starts from the complete student network, segmentation head included; stock ``-pretrained_weights``
cannot serve because it drops every ``.seg_layers.`` key. The source checkpoint is by default the
``NoisyStudentTrainer`` checkpoint of the same dataset, plans, configuration and fold::

    $nnUNet_results/DatasetXXX/NoisyStudentTrainer__<plans>__<configuration>/fold_F/checkpoint_final.pth

``$NSN_FINETUNE_FROM`` names another one (stock ``nnUNetv2_train`` arguments are fixed): a checkpoint file,
a fold folder (its ``checkpoint_final.pth``) or another student fold (``fold_3``, ``3``, ``all``; the
paper fine-tunes the best student fold). The student weights are loaded only when a training starts
fresh; ``--c`` resumes from the fine-tune's own checkpoint; ``-pretrained_weights`` is refused. The
source path and its SHA-256 go to the training log, ``debug.json`` and ``finetune_source.json`` in the
fold folder.

Training is stock nnU-Net on the labeled split with the recipe's ``finetune`` schedule; the augmentation
stays the student's (Table 5).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch._dynamo import OptimizedModule

from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.model_files import load_checkpoint
from noisy_student_nnunet.trainers.base import RecipeTrainer

ENV_VAR = "NSN_FINETUNE_FROM"
STUDENT_TRAINER = "NoisyStudentTrainer"
CHECKPOINT = "checkpoint_final.pth"
SOURCE_RECORD = "finetune_source.json"
_FOLD = re.compile(r"^(?:fold_)?(\d+|all)$")


def student_fold_folder(results_root: str | os.PathLike, dataset_name: str, plans_name: str, configuration: str,
                        fold: int | str) -> Path:
    """``$nnUNet_results/<dataset>/NoisyStudentTrainer__<plans>__<configuration>/fold_<fold>``."""
    return Path(results_root) / dataset_name / f"{STUDENT_TRAINER}__{plans_name}__{configuration}" / f"fold_{fold}"


def resolve_finetune_source(setting: str | None, results_root: str | os.PathLike, dataset_name: str,
                            plans_name: str, configuration: str, fold: int | str) -> Path:
    """The checkpoint to fine-tune from.

    ``setting`` (the value of ``$NSN_FINETUNE_FROM``): empty or None = the student of the same fold; an
    existing file = that checkpoint; an existing folder = its ``checkpoint_final.pth``; ``fold_N``/``N``/
    ``all`` = the student of that fold. Raises NsnError naming the missing file.
    """
    setting = (setting or "").strip()
    if not setting:
        path = student_fold_folder(results_root, dataset_name, plans_name, configuration, fold) / CHECKPOINT
        origin = f"the {STUDENT_TRAINER} checkpoint of fold {fold} (set {ENV_VAR} to use another)"
    elif Path(setting).is_file():
        return Path(setting).resolve()
    elif Path(setting).is_dir():
        path, origin = Path(setting) / CHECKPOINT, f"{ENV_VAR}={setting}"
    elif _FOLD.match(setting):
        student_fold = _FOLD.match(setting).group(1)
        path = student_fold_folder(results_root, dataset_name, plans_name, configuration, student_fold) / CHECKPOINT
        origin = f"{ENV_VAR}={setting}"
    else:
        raise NsnError(f"{ENV_VAR}={setting}: no such checkpoint file or folder (or give a student fold: fold_N)")
    if not path.is_file():
        unfinished = path.parent / "checkpoint_latest.pth"
        hint = f" (its training is unfinished: {unfinished.name} exists)" if unfinished.is_file() else ""
        raise NsnError(f"student checkpoint not found: {path}{hint}; source: {origin}")
    return path.resolve()


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_full_weights(network: torch.nn.Module, checkpoint: dict[str, Any], source: str | os.PathLike) -> None:
    """Copy every tensor of ``checkpoint['network_weights']`` into ``network``, segmentation head included.

    Key sets and shapes must match exactly (the student and the fine-tune share plans); NsnError names the
    first mismatch. ``load_state_dict`` copies values, so the result equals the checkpoint bit for bit.
    """
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict):
        raise NsnError(f"{source} is not an nnU-Net checkpoint (no 'network_weights')")
    weights = {_strip_prefixes(k): v for k, v in weights.items()}
    own = network.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        key = missing[0] if missing else unexpected[0]
        raise NsnError(f"{source} does not fit this network (other plans?): key '{key}' is "
                       f"{'missing from the checkpoint' if missing else 'not in the network'}")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise NsnError(f"{source} does not fit this network (other plans?): '{key}' has shape "
                           f"{tuple(value.shape)}, the network {tuple(own[key].shape)}")
    network.load_state_dict(weights, strict=True)


class NoisyStudentFinetuneTrainer(RecipeTrainer):
    """Labeled-only fine-tune of the complete student network, with the recipe's ``finetune`` schedule."""

    schedule_key = "finetune"
    augmentation_key = "student_augmentation"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.finetune_source: str | None = None
        self.finetune_source_sha256: str | None = None
        self._resumed_from_checkpoint = False
        self._initial_weights_digest: float | None = None

    def initialize(self):
        super().initialize()
        self._initial_weights_digest = self._weights_digest()

    def _weights_digest(self) -> float:
        """A cheap fingerprint of the network weights: changes if anything loaded weights into it."""
        with torch.no_grad():
            # on the CPU in float64: deterministic, so equal weights give an equal digest
            return float(sum(t.detach().cpu().double().abs().sum() for t in
                             self._bare_network().state_dict().values() if t.is_floating_point()))

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # --c (and --val) land here before on_train_start: the fine-tune's own checkpoint wins
        self._resumed_from_checkpoint = True
        super().load_checkpoint(filename_or_checkpoint)

    def _bare_network(self) -> torch.nn.Module:
        network = self.network.module if self.is_ddp else self.network
        return network._orig_mod if isinstance(network, OptimizedModule) else network

    def load_student_weights(self) -> Path:
        """Load the source checkpoint's network into ours and record where it came from."""
        from nnunetv2.paths import nnUNet_results

        if not nnUNet_results.is_set():
            raise NsnError("environment variable nnUNet_results is not set")
        source = resolve_finetune_source(os.environ.get(ENV_VAR), nnUNet_results.get(),
                                         self.plans_manager.dataset_name, self.plans_manager.plans_name,
                                         self.configuration_name, self.fold)
        checkpoint = load_checkpoint(source)  # damaged or foreign: one line naming the file
        load_full_weights(self._bare_network(), checkpoint, source)
        self.finetune_source = str(source)
        self.finetune_source_sha256 = sha256_of(source)
        record = {
            "checkpoint": self.finetune_source,
            "sha256": self.finetune_source_sha256,
            "trainer_name": checkpoint.get("trainer_name"),
            "epoch": checkpoint.get("current_epoch"),
            ENV_VAR: os.environ.get(ENV_VAR),
        }
        if checkpoint.get("trainer_name") != STUDENT_TRAINER:
            self.print_to_log_file(f"WARNING: fine-tuning from a {checkpoint.get('trainer_name')} checkpoint, "
                                   f"not a {STUDENT_TRAINER} one")
        self.print_to_log_file(f"fine-tune starts from all weights (segmentation head included) of {source} "
                               f"(sha256 {self.finetune_source_sha256}, epoch {record['epoch']})")
        if self.local_rank == 0:
            out = Path(self.output_folder) / SOURCE_RECORD
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, out)
        return source

    def _log_resumed_source(self) -> None:
        record_file = Path(self.output_folder) / SOURCE_RECORD
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            self.finetune_source, self.finetune_source_sha256 = record.get("checkpoint"), record.get("sha256")
        self.print_to_log_file(f"resuming the fine-tune at epoch {self.current_epoch} from its own checkpoint; "
                               f"it started from {self.finetune_source} (sha256 {self.finetune_source_sha256})")

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.current_epoch == 0 and not self._resumed_from_checkpoint:
            if self._weights_digest() != self._initial_weights_digest:
                # stock -pretrained_weights loaded something (and dropped the segmentation head): refuse
                # rather than silently replace it
                raise NsnError(f"-pretrained_weights is not used by {type(self).__name__} (it drops the "
                               f"segmentation head); name the student checkpoint with {ENV_VAR}=<file> instead")
            self.load_student_weights()
        else:
            self._log_resumed_source()
        super().on_train_start()  # writes debug.json, which records finetune_source(_sha256)
