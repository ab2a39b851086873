"""The demo's training budget: fewer epochs on a CPU whose measured training step says 20 minutes would not do.

``nsn demo`` aims at its table within 20 minutes on 2 cores. Its training (two teacher folds side by side, the
student, the fine-tune) is most of that time, and a CPU without native bf16 trains in fp32 (a demo step: 0.27 s on
an AVX2-only EPYC, against 0.10 s in bf16 on an EPYC with AVX512-BF16). So the demo times a training step of its
recipe's network on this CPU first (:func:`~noisy_student_nnunet.step_time.measure_training_step`, a few seconds),
projects its own minutes from it, and where they exceed the budget trains the same recipe with every schedule's
epochs scaled down (the poly learning-rate schedule follows the epochs). It never goes below :data:`MIN_SCALE`, the
smallest share whose fine-tuned student was checked against the demo's targets (docs/experiments.md, "Time by
machine"). The projection is calibrated on measured demos (:data:`CALIBRATIONS`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

#: what ``nsn demo`` aims at on 2 CPU cores, from start to table
BUDGET_MINUTES = 20.0
#: the smallest share of the recipe's epochs the demo trains
MIN_SCALE = 0.5
#: the recipe blocks whose epochs are scaled: teachers and student, fine-tune
SCHEDULES = ("training", "finetune")


@dataclass(frozen=True)
class Calibration:
    """One measured ``nsn demo`` (whole recipe, 2 cores): its isolated one-thread step and where its minutes went.

    Everything is taken to grow with the step: the minutes outside the training iterations (phantoms, planning,
    pseudo-labels, start-ups, validations, the demo's predictions; all CPU work) with the one-thread step, a
    teacher iteration (two folds side by side, one thread each) with the one-thread step, a student or fine-tune
    iteration (every thread) with the every-thread step. Augmentation runs in the training process in both.
    """

    step_s: float  # the isolated one-thread step (:func:`~noisy_student_nnunet.step_time.measure_training_step`)
    fixed_minutes: float  # minutes outside the training iterations
    teacher_wall_per_step: float  # wall seconds of a teacher iteration per second of the one-thread step
    lone_wall_per_step: float  # wall seconds of a student or fine-tune iteration per second of the every-thread step


#: per precision of the trainers' step: ``benchmarks/bench_demo.py --seed 23 --minutes 0 --isa avx2`` (fp32, AVX2
#: kernels) and ``--seed 0`` (bf16, native), 2 cores of an AMD EPYC with AVX512-BF16: 16.8 and 14.9 minutes
#: (docs/experiments.md, "Time by machine"). The overheads per step differ between them (augmentation is a larger
#: share of a faster step), so each precision projects with its own run.
CALIBRATIONS = {"fp32": Calibration(step_s=0.149, fixed_minutes=1.62, teacher_wall_per_step=1.22,
                                    lone_wall_per_step=1.34),
                "bf16": Calibration(step_s=0.103, fixed_minutes=1.86, teacher_wall_per_step=1.43,
                                    lone_wall_per_step=1.67)}


@dataclass(frozen=True)
class Budget:
    """What the demo will train on this CPU and how long it expects to take."""

    step_s: float  # one isolated training step with one thread, seconds (each teacher's share of the cores)
    step_all_threads_s: float  # the same with every thread (the student and the fine-tune train alone)
    scale: float  # share of the recipe's epochs trained
    projected_minutes: float  # the demo at this scale
    full_minutes: float  # the demo with the whole recipe

    def describe(self) -> str:
        steps = f"a training step takes {self.step_s:.3f} s here ({self.step_all_threads_s:.3f} s with every thread)"
        if self.scale >= 1:
            return f"{steps}: the whole recipe, about {self.full_minutes:.0f} min"
        return (f"{steps}: {self.scale:.2f} of the recipe's epochs, about {self.projected_minutes:.0f} min (the "
                f"whole recipe: about {self.full_minutes:.0f}; --minutes 0 trains it)")


def projected_minutes(recipe: dict[str, Any], step_s: float, step_all_threads_s: float, precision: str,
                      scale: float = 1.0) -> float:
    """The demo's minutes on a CPU with these isolated steps in ``precision``, training ``scale`` of the epochs.

    The two teacher folds train side by side (one fold's iterations on the critical path), then the student and
    the fine-tune alone.
    """
    training, finetune = recipe["training"], recipe["finetune"]
    teacher = training["num_epochs"] * training["num_iterations_per_epoch"]
    lone = teacher + finetune["num_epochs"] * finetune["num_iterations_per_epoch"]
    c = CALIBRATIONS[precision]
    return c.fixed_minutes * step_s / c.step_s + scale * (teacher * c.teacher_wall_per_step * step_s
                                                          + lone * c.lone_wall_per_step * step_all_threads_s) / 60


def plan_budget(recipe: dict[str, Any], step_s: float, step_all_threads_s: float, precision: str,
                minutes: float = BUDGET_MINUTES) -> Budget:
    """The share of epochs that fits ``minutes`` (1 where the whole recipe fits, or where ``minutes`` is 0).

    A share whose epochs round to the recipe's own counts is the whole recipe.
    """
    steps = (recipe, step_s, step_all_threads_s, precision)
    full = projected_minutes(*steps)
    scale = 1.0
    if 0 < minutes < full:
        fixed = projected_minutes(*steps, 0.0)
        scale = min(1.0, max(MIN_SCALE, (minutes - fixed) / (full - fixed)))
        if all(_scaled_epochs(recipe[block], scale) == recipe[block]["num_epochs"] for block in SCHEDULES):
            scale = 1.0
    return Budget(step_s, step_all_threads_s, scale, projected_minutes(*steps, scale), full)


def _scaled_epochs(schedule: dict[str, Any], scale: float) -> int:
    return max(1, round(schedule["num_epochs"] * scale))


def scaled_recipe(recipe: dict[str, Any], scale: float, minutes: float = BUDGET_MINUTES) -> dict[str, Any]:
    """``recipe`` with the epochs of its training and fine-tune schedules scaled (unchanged at scale 1)."""
    if scale >= 1:
        return recipe
    scaled = copy.deepcopy(recipe)
    for block in SCHEDULES:
        schedule = scaled[block]
        epochs = _scaled_epochs(schedule, scale)
        schedule["num_epochs"] = epochs
        schedule["save_every"] = min(schedule["save_every"], epochs)
    scaled["description"] = (f"{recipe['description']} Scaled by nsn demo to {scale:.2f} of its epochs "
                             f"(training {scaled['training']['num_epochs']}, fine-tune "
                             f"{scaled['finetune']['num_epochs']}) to fit {minutes:g} minutes on this CPU.")
    return scaled
