"""What each case of a phantom dataset is: size, spacing, dropped organ, orientation and cohort, drawn per case."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.phantoms.acquisition import SCANNER_ORIENTATIONS
from noisy_student_nnunet.phantoms.cohorts import Condition, draw_condition, pick_cohort, split_sources

# Which organ a case lacks when it drops one (cholecystectomy is by far the most common).
DROP_WEIGHTS: dict[str, float] = {"gallbladder": 0.7, "right_kidney": 0.1, "left_kidney": 0.1, "spleen": 0.1}

SMALL_DEFAULTS: dict[str, tuple[float, float]] = {
    "inplane_voxels": (96, 128), "inplane_spacing": (0.6, 1.0), "slice_spacing": (1.0, 5.0), "slices": (24, 64)}
CLINICAL_DEFAULTS: dict[str, tuple[float, float]] = {
    "inplane_voxels": (512, 512), "inplane_spacing": (0.6, 1.0), "slice_spacing": (1.0, 2.0), "slices": (200, 320)}
# What the generator can still draw every organ into (checked by the tests at these extremes).
MIN_INPLANE_VOXELS, MIN_SLICES, MAX_VOXELS_PER_AXIS = 48, 16, 2048
#: fewest slices of a cohort case whose slice spacing keeps the field of view of the dataset's own spacing
#: (thick slices: fewer of them); small organs may then fall between slices, as they do in such scans
MIN_COHORT_SLICES = 10

SPLIT_CODES = {"labeled": 0, "unlabeled": 1, "test": 2}


@dataclass(frozen=True)
class CaseSpec:
    """What one case of a phantom dataset is made of (also written to ``phantoms.json``)."""

    identifier: str
    split: str  # "labeled", "unlabeled" or "test"
    seed: int  # make_phantom(seed, shape_zyx, spacing_zyx, body_scale=..., drop=..., direction=...) reproduces the case
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    body_scale: float | None
    dropped: tuple[str, ...]
    orientation: str  # a key of SCANNER_ORIENTATIONS: make_phantom(..., direction=...) stores it so
    cohort: str = "iid"  # a key of cohorts.COHORTS
    condition: Condition = field(default_factory=Condition)  # make_phantom(..., condition=...)

    @property
    def direction(self) -> tuple[float, ...]:
        return SCANNER_ORIENTATIONS[self.orientation][0]


def _draw_orientation(seed: int, split: str, index: int) -> str:
    """A case's scanner orientation, from a stream of its own: sizes, spacings, drops and anatomy stay what
    they were before orientations were drawn."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLIT_CODES[split], index, 1)))
    names = list(SCANNER_ORIENTATIONS)
    weights = np.array([SCANNER_ORIENTATIONS[n][1] for n in names])
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def check_range(name: str, value, low: float, high: float, integer: bool) -> tuple:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise NsnError(f"{name} needs two numbers MIN MAX, got {value!r}") from None
    if integer and (lo != int(lo) or hi != int(hi)):
        raise NsnError(f"{name} needs whole numbers, got {lo:g} {hi:g}")
    if not (low <= lo <= hi <= high):
        raise NsnError(f"{name} must satisfy {low:g} <= MIN <= MAX <= {high:g}, got {lo:g} {hi:g}")
    return (int(lo), int(hi)) if integer else (lo, hi)


def check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise NsnError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def plan_cases(num_labeled: int = 8, num_unlabeled: int = 24, num_test: int = 0, seed: int = 0,
               clinical: bool = False, *, name: str = "Phantoms", slices=None, inplane_voxels=None,
               inplane_spacing=None, slice_spacing=None, drop_probability: float = 0.2, setting: str | None = None,
               cohorts: dict[str, str] | None = None) -> list[CaseSpec]:
    """Draw every case's size, spacing, dropped organ, scanner orientation and cohort; cheap, deterministic, validated.

    Each case draws from SeedSequence(seed, spawn_key=(split, index)), so changing one split's
    count leaves the other splits' cases unchanged. ``setting`` (``iid``, ``shift``) and ``cohorts`` (split ->
    cohort or mix) say where each split's cases come from (see cohorts.py); a cohort's draws have streams of
    their own, so an ``iid`` case is what it always was.
    """
    sources = split_sources(setting, cohorts)
    defaults = CLINICAL_DEFAULTS if clinical else SMALL_DEFAULTS
    num_labeled = check_int("--num-labeled", num_labeled, 1, 100_000)
    num_unlabeled = check_int("--num-unlabeled", num_unlabeled, 0, 100_000)
    num_test = check_int("--num-test", num_test, 0, 100_000)
    seed = check_int("--seed", seed, 0, 2**63 - 1)
    slices = check_range("--slices", defaults["slices"] if slices is None else slices,
                          MIN_SLICES, MAX_VOXELS_PER_AXIS, True)
    voxels = check_range("--inplane-voxels", defaults["inplane_voxels"] if inplane_voxels is None else inplane_voxels,
                          MIN_INPLANE_VOXELS, MAX_VOXELS_PER_AXIS, True)
    inplane = check_range("--inplane-spacing", defaults["inplane_spacing"] if inplane_spacing is None
                           else inplane_spacing, 0.05, 10.0, False)
    thick = check_range("--slice-spacing", defaults["slice_spacing"] if slice_spacing is None else slice_spacing,
                         0.1, 20.0, False)
    try:
        drop_probability = float(drop_probability)
    except (TypeError, ValueError):
        raise NsnError(f"--drop-probability must be a number from 0 to 1, got {drop_probability!r}") from None
    if not 0.0 <= drop_probability <= 1.0:
        raise NsnError(f"--drop-probability must be from 0 to 1, got {drop_probability:g}")
    drop_names, drop_p = list(DROP_WEIGHTS), np.array(list(DROP_WEIGHTS.values()))
    drop_p = drop_p / drop_p.sum()

    cases = []
    for split, count, prefix in (("labeled", num_labeled, f"{name}_"), ("unlabeled", num_unlabeled, f"{name}_unl_"),
                                 ("test", num_test, f"{name}_ts_")):
        for index in range(count):
            sequence = np.random.SeedSequence(seed, spawn_key=(SPLIT_CODES[split], index))
            draw_seed, case_seed = (int(v) for v in sequence.generate_state(2, np.uint64))
            rng = np.random.default_rng(draw_seed)
            n_xy = int(rng.integers(voxels[0], voxels[1] + 1))
            sp_xy = round(float(rng.uniform(*inplane)), 3)
            sp_z = round(float(rng.uniform(*thick)), 3)
            if clinical:
                body_scale = round(float(rng.uniform(0.9, 1.1)), 3)
                target = body_scale * float(rng.uniform(300, 450))  # z field of view in mm
            else:
                body_scale = None
                target = 0.875 * n_xy * sp_xy / 340.0 * float(rng.uniform(260, 330))
            n_z = int(np.clip(round(target / sp_z), slices[0], slices[1]))
            dropped = ()
            if rng.random() < drop_probability:
                dropped = (drop_names[int(rng.choice(len(drop_names), p=drop_p))],)
            cohort_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLIT_CODES[split], index, 2)))
            cohort = pick_cohort(sources[split], cohort_rng)
            condition, removed = draw_condition(cohort, cohort_rng)
            if any(organ.endswith("kidney") for organ in dropped):
                removed = ()  # never both kidneys
            if cohort.slice_spacing is not None:  # the same field of view in the cohort's slices
                field_of_view = n_z * sp_z
                sp_z = round(float(cohort_rng.uniform(*cohort.slice_spacing)), 3)
                n_z = max(MIN_COHORT_SLICES, round(field_of_view / sp_z))
            dropped = tuple(sorted(set(dropped) | set(removed)))
            cases.append(CaseSpec(f"{prefix}{index:04d}", split, case_seed, (n_z, n_xy, n_xy), (sp_z, sp_xy, sp_xy),
                                  body_scale, dropped, _draw_orientation(seed, split, index), cohort.name, condition))
    return cases
