"""What one training cost: iterations, CPU and wall time, and the labeled cases it trained on.

Written by every trainer of this package at the end of training as ``training_cost.json`` in its fold folder, so that
an experiment can say what each arm was given (a student's cost includes its teachers') without parsing logs.
CPU time is the training process's own plus that of its finished children (augmentation workers), from
``getrusage``: it does not grow when another job shares the machine, as wall time does.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from noisy_student_nnunet.outputs import atomic_write_text

COST_FILE = "training_cost.json"


def cpu_seconds() -> float:
    """User and system CPU seconds of this process and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class CostClock:
    """CPU and wall clock at the start of training (epoch ``start_epoch``: above 0 when resumed with ``--c``)."""

    start_epoch: int
    cpu_s: float
    wall_s: float

    @classmethod
    def start(cls, start_epoch: int) -> "CostClock":
        return cls(start_epoch, cpu_seconds(), time.monotonic())


@dataclass(frozen=True)
class TrainingCost:
    trainer: str
    fold: str
    iterations: int  # the whole schedule's: epochs x iterations per epoch
    cpu_minutes: float  # of this process's training, from its start epoch on
    wall_minutes: float
    start_epoch: int
    training_cases: tuple[str, ...]  # labeled cases of the fold's split

    def write(self, fold_folder: str | os.PathLike) -> Path:
        path = Path(fold_folder) / COST_FILE
        atomic_write_text(path, json.dumps({**asdict(self), "training_cases": list(self.training_cases)},
                                           indent=1) + "\n")
        return path


def finish(clock: CostClock, trainer: str, fold: str, num_epochs: int, iterations_per_epoch: int,
           training_cases: list[str]) -> TrainingCost:
    """The cost of the training that ``clock`` started."""
    return TrainingCost(trainer, str(fold), num_epochs * iterations_per_epoch,
                        round((cpu_seconds() - clock.cpu_s) / 60, 3), round((time.monotonic() - clock.wall_s) / 60, 3),
                        clock.start_epoch, tuple(sorted(training_cases)))


def read_cost(fold_folder: str | os.PathLike) -> dict | None:
    """A fold folder's ``training_cost.json``, or None where the training predates it or has not finished."""
    path = Path(fold_folder) / COST_FILE
    return json.loads(path.read_text()) if path.is_file() else None
