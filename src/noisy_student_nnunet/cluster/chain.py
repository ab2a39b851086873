"""One chain's settings and the state of its outputs: which steps, folds and parts are still to run.

The settings are written once to ``WORK/slurm/chain.json`` when the chain is first submitted, so that every job and
every rerun works on the same pseudo-labeled dataset name, folds and parts. Each ``*_done`` check reads the same
files that the local chain (``run_pipeline.sh``) skips on, so both agree on what is finished.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.outputs import atomic_write_text

CONFIGURATION = "3d_fullres"
TEACHER, STUDENT, FINETUNE = "NoisyStudentTeacherTrainer", "NoisyStudentTrainer", "NoisyStudentFinetuneTrainer"
PREDICTIONS = "predictions_finetuned"


@dataclass(frozen=True)
class Chain:
    """Everything a job of the chain needs to know; folds as nnU-Net names them (``0``..``4`` or ``all``)."""

    dataset: str  # DatasetXXX_Name
    unlabeled: str
    work: str
    pseudo_dataset: str
    recipe: str = "flare22"
    plans: str = "nnUNetLowFootprintPlans"
    teacher_folds: tuple[str, ...] = ("0", "1", "2", "3", "4")
    student_folds: tuple[str, ...] = ("0", "1", "2", "3", "4")
    device: str = "cuda"
    pseudo_parts: int = 1
    test_images: str | None = None
    test_labels: str | None = None
    predict_parts: int = 1
    python: str = field(default="", compare=False)  # the interpreter the jobs run with

    @property
    def state_file(self) -> Path:
        return chain_file(Path(self.work))

    def write(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.state_file, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Chain":
        data = json.loads(Path(path).read_text())
        for key in ("teacher_folds", "student_folds"):
            data[key] = tuple(data[key])
        return cls(**data)

    # --- where things are --------------------------------------------------------------------------------
    def results_dir(self, trainer: str) -> Path:
        return _root("nnUNet_results") / self.dataset / f"{trainer}__{self.plans}__{CONFIGURATION}"

    @property
    def plans_file(self) -> Path:
        return _root("nnUNet_preprocessed") / self.dataset / f"{self.plans}.json"

    @property
    def predictions(self) -> Path:
        return Path(self.work) / PREDICTIONS

    @property
    def evaluation_summary(self) -> Path:
        return Path(self.work) / "evaluation_summary.json"

    # --- what is done ------------------------------------------------------------------------------------
    def plans_done(self) -> bool:
        return self.plans_file.is_file()

    def fold_done(self, trainer: str, fold: str) -> bool:
        """Trained and validated, as the local chain's skip test."""
        return (self.results_dir(trainer) / f"fold_{fold}" / "validation" / "summary.json").is_file()

    def folds_to_train(self, trainer: str) -> list[str]:
        folds = self.teacher_folds if trainer == TEACHER else self.student_folds
        return [fold for fold in folds if not self.fold_done(trainer, fold)]

    def pseudo_labels_done(self) -> bool:
        """Finalized (``pseudolabel.json`` says so) and recorded in the student's plans."""
        from noisy_student_nnunet.pseudolabel.dataset import MANIFEST

        manifest = _root("nnUNet_raw") / self.pseudo_dataset / MANIFEST
        if not manifest.is_file() or "finalized" not in json.loads(manifest.read_text()):
            return False
        recipe = json.loads(self.plans_file.read_text()).get("noisy_student_recipe") if self.plans_done() else None
        return recipe is None or (recipe.get("student") or {}).get("pseudo_dataset") == self.pseudo_dataset

    def best_student_fold(self) -> str | None:
        """The student fold the fine-tune starts from (best cross-validation Dice); None until every fold is done."""
        if self.folds_to_train(STUDENT):
            return None
        from noisy_student_nnunet.demo import best_fold

        return best_fold(self.results_dir(STUDENT), self.student_folds)

    def finetune_done(self) -> bool:
        best = self.best_student_fold()
        return best is not None and self.fold_done(FINETUNE, best)

    def predictions_done(self) -> bool:
        return (self.predictions / ".complete").is_file()

    def evaluation_done(self) -> bool:
        return self.test_labels is None or (self.predictions_done() and self.evaluation_summary.is_file())


def chain_file(work: Path) -> Path:
    return work / "slurm" / "chain.json"


def _root(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        raise NsnError(f"environment variable {variable} is not set")
    return Path(value)
