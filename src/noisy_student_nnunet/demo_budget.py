"""The demo's training budget: fewer epochs on a CPU whose measured training step says 20 minutes would not do.

``nsn demo`` promises its table within 20 minutes on 2 cores. Its training (two teacher folds side by side, the
student, the fine-tune) is most of that time, and a training step costs 1.5 to 2.5 times more on a CPU without
native bf16 (fp32) than on one with it. So the demo times a training step of its recipe's network on this CPU
first (:func:`~noisy_student_nnunet.step_time.measure_training_step`, a few seconds), projects its own minutes
from it, and where they exceed the budget trains the same recipe with every schedule's epochs scaled down (the
poly learning-rate schedule follows the epochs). It never goes below :data:`MIN_SCALE`, the smallest share whose
fine-tuned student was checked against the demo's targets (docs/experiments.md, "Time by machine").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

#: what ``nsn demo`` promises on 2 CPU cores, from start to table
BUDGET_MINUTES = 20.0
#: the smallest share of the recipe's epochs the demo trains
MIN_SCALE = 0.5
#: the calibration run: ``nsn demo --seed 23 --minutes 0`` under ``benchmarks/bench_demo.py --isa avx2`` (fp32, 2
#: cores of an AMD EPYC; 16.8 minutes, docs/experiments.md "Time by machine"): its isolated training step (:func:`~noisy_student_nnunet.step_time.measure_training_step`)
#: took this many seconds with one thread ...
REFERENCE_STEP_S = 0.149
#: ... it spent this many minutes outside the training iterations (phantoms, planning, pseudo-labels, start-ups,
#: validations, the demo's predictions; all CPU work, so taken to grow with the one-thread step) ...
REFERENCE_FIXED_MINUTES = 1.62
#: ... a teacher iteration (two folds side by side, one thread each, augmentation in the process) took this many
#: one-thread steps of wall time ...
TEACHER_WALL_PER_STEP = 1.22
#: ... and a lone iteration (student, fine-tune: every thread, augmentation in the process) this many steps with
#: every thread
LONE_WALL_PER_STEP = 1.34


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


def projected_minutes(recipe: dict[str, Any], step_s: float, step_all_threads_s: float, scale: float = 1.0) -> float:
    """The demo's minutes on a CPU with these isolated steps, training ``scale`` of the recipe's epochs.

    The two teacher folds train side by side (one fold's iterations on the critical path), then the student and
    the fine-tune alone.
    """
    training, finetune = recipe["training"], recipe["finetune"]
    teacher = training["num_epochs"] * training["num_iterations_per_epoch"]
    lone = teacher + finetune["num_epochs"] * finetune["num_iterations_per_epoch"]
    fixed = REFERENCE_FIXED_MINUTES * step_s / REFERENCE_STEP_S
    return fixed + scale * (teacher * TEACHER_WALL_PER_STEP * step_s
                            + lone * LONE_WALL_PER_STEP * step_all_threads_s) / 60


def plan_budget(recipe: dict[str, Any], step_s: float, step_all_threads_s: float,
                minutes: float = BUDGET_MINUTES) -> Budget:
    """The share of epochs that fits ``minutes`` (1 where the whole recipe fits, or where ``minutes`` is 0)."""
    full = projected_minutes(recipe, step_s, step_all_threads_s)
    scale = 1.0
    if 0 < minutes < full:
        fixed = projected_minutes(recipe, step_s, step_all_threads_s, 0.0)
        scale = min(1.0, max(MIN_SCALE, (minutes - fixed) / (full - fixed)))
    return Budget(step_s, step_all_threads_s, scale, projected_minutes(recipe, step_s, step_all_threads_s, scale),
                  full)


def scaled_recipe(recipe: dict[str, Any], scale: float, minutes: float = BUDGET_MINUTES) -> dict[str, Any]:
    """``recipe`` with the epochs of its training and fine-tune schedules scaled (unchanged at scale 1)."""
    if scale >= 1:
        return recipe
    scaled = copy.deepcopy(recipe)
    for block in ("training", "finetune"):
        schedule = scaled[block]
        epochs = max(1, round(schedule["num_epochs"] * scale))
        schedule["num_epochs"] = epochs
        schedule["save_every"] = min(schedule["save_every"], epochs)
    scaled["description"] = (f"{recipe['description']} Scaled by nsn demo to {scale:.2f} of its epochs "
                             f"(training {scaled['training']['num_epochs']}, fine-tune "
                             f"{scaled['finetune']['num_epochs']}) to fit {minutes:g} minutes on this CPU.")
    return scaled
