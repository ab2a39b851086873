"""Named cohorts: where the cases of a phantom dataset come from, as FLARE's centres and diseases differ.

A :class:`Cohort` holds the distributions a case's pathology and acquisition are drawn from (contrast phase,
lesions, organ-level changes, slice spacing, noise and kernel, scanner offset, coverage); drawing from it gives
a :class:`Condition`, the concrete values of one case, which ``phantoms.json`` records so that the case can be
made again. A *mix* draws each case's cohort by weight. A *setting* says which cohort or mix each split uses:
``iid`` is the phantoms as they always were; ``shift`` labels one narrow cohort (FLARE22's labeled cases are
portal-venous scans of pancreas patients) and draws unlabeled and test cases from a broad mix of others.

Every draw comes from a random stream of its own (per case: seed, split, index), so the anatomy, size and
spacing of a case do not change when its cohort adds lesions or changes the phase.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from noisy_student_nnunet.errors import NsnError

PHASES = ("native", "arterial", "portal")
KERNELS = ("sharp", "standard", "soft")  # 0, 1, 2 passes of the in-plane [1, 2, 1] / 4 blur
#: reference-z windows (mm) a partial scan covers: it ends inside the liver, or starts inside the kidneys
COVERAGE_WINDOWS = {"ends_in_liver": ((0.0, 0.0), (150.0, 190.0)), "starts_in_kidneys": ((60.0, 100.0), (245.0, 245.0))}


@dataclass(frozen=True)
class Lesion:
    """One focal lesion: its organ, kind (a key of ``pathology.LESION_KINDS``) and diameter in reference mm."""

    organ: str
    kind: str
    diameter_mm: float


@dataclass(frozen=True)
class Condition:
    """The pathology and acquisition of one case; ``None`` keeps what the anatomy draws itself (as ``iid``)."""

    phase: str | None = None
    organ_scale: tuple[tuple[str, float], ...] = ()  # (organ, factor): hepatomegaly, splenomegaly, atrophy
    lesions: tuple[Lesion, ...] = ()
    noise_sd: float | None = None  # HU of the image noise after the kernel
    kernel: str = "standard"
    hu_offset: float = 0.0  # a scanner's calibration offset, added to every voxel
    coverage: tuple[float, float] | None = None  # reference z-window of a partial scan; None: the whole abdomen
    seed: int = 0  # stream of the lesions' placement

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> "Condition":
        if not data:
            return cls()
        data = dict(data)
        data["organ_scale"] = tuple((o, float(f)) for o, f in data.get("organ_scale", ()))
        data["lesions"] = tuple(Lesion(**lesion) for lesion in data.get("lesions", ()))
        if data.get("coverage") is not None:
            data["coverage"] = tuple(data["coverage"])
        return cls(**data)


@dataclass(frozen=True)
class LesionRule:
    """With probability ``p`` a case has ``count`` lesions of ``kinds`` (drawn uniformly) in ``organ``."""

    organ: str
    kinds: tuple[str, ...]
    p: float
    count: tuple[int, int]
    diameter_mm: tuple[float, float]


@dataclass(frozen=True)
class Cohort:
    """Distributions of one cohort's pathology and acquisition (see the module docstring)."""

    name: str
    description: str
    phase_weights: dict[str, float] | None = None  # None: the anatomy's draw (20/30/50 % native/arterial/portal)
    slice_spacing: tuple[float, float] | None = None  # None: the dataset's range
    lesions: tuple[LesionRule, ...] = ()
    organ_changes: tuple[tuple[str, float, tuple[float, float]], ...] = ()  # (organ, p, factor range)
    missing_kidney_p: float = 0.0
    noise_sd: tuple[float, float] | None = None
    kernel_weights: dict[str, float] = field(default_factory=lambda: {"standard": 1.0})
    hu_offset: tuple[float, float] = (0.0, 0.0)
    coverage_weights: dict[str, float] = field(default_factory=lambda: {"full": 1.0})


_LIVER_LESIONS = LesionRule("liver", ("liver_metastasis", "liver_hcc", "liver_cyst"), 0.9, (1, 4), (8.0, 60.0))

COHORTS: dict[str, Cohort] = {c.name: c for c in (
    Cohort("iid", "the phantoms as they always were: phases 20/30/50 % native/arterial/portal, no lesions"),
    Cohort("pancreas_portal",
           "FLARE22's labeled cases in kind: pancreas patients, portal-venous phase, one slice spacing, standard "
           "kernel, full coverage",
           phase_weights={"portal": 1.0}, slice_spacing=(2.5, 3.0),
           lesions=(LesionRule("pancreas", ("pancreas_adenocarcinoma", "pancreas_cyst"), 0.6, (1, 1), (10.0, 30.0)),),
           noise_sd=(9.0, 12.0)),
    Cohort("liver_tumour_arterial",
           "liver tumour centre: late-arterial and portal scans, hypo- and hyperdense liver lesions, hepatomegaly, "
           "thin slices, sharp kernel",
           phase_weights={"arterial": 0.7, "portal": 0.3}, slice_spacing=(1.5, 2.5), lesions=(_LIVER_LESIONS,),
           organ_changes=(("liver", 0.3, (1.12, 1.3)),), noise_sd=(10.0, 16.0),
           kernel_weights={"sharp": 0.7, "standard": 0.3}, hu_offset=(-10.0, 10.0)),
    Cohort("kidney_native",
           "urology centre: many native (non-contrast) scans, kidney cysts and tumours, atrophic or missing kidneys, "
           "thick slices, soft kernel",
           phase_weights={"native": 0.5, "arterial": 0.2, "portal": 0.3}, slice_spacing=(4.0, 5.0),
           lesions=(LesionRule("right_kidney", ("kidney_cyst", "kidney_tumour"), 0.5, (1, 2), (8.0, 35.0)),
                    LesionRule("left_kidney", ("kidney_cyst", "kidney_tumour"), 0.5, (1, 2), (8.0, 35.0))),
           organ_changes=(("right_kidney", 0.15, (0.6, 0.75)), ("left_kidney", 0.15, (0.6, 0.75))),
           missing_kidney_p=0.1, noise_sd=(12.0, 20.0), kernel_weights={"soft": 0.7, "standard": 0.3},
           hu_offset=(-15.0, 15.0)),
    Cohort("spleen_lowdose",
           "haematology and follow-up: splenomegaly and hepatomegaly, low-dose noise, scans ending inside the liver",
           phase_weights={"portal": 0.7, "native": 0.3}, slice_spacing=(2.0, 4.0),
           organ_changes=(("spleen", 0.8, (1.3, 1.7)), ("liver", 0.3, (1.1, 1.25))),
           noise_sd=(20.0, 30.0), kernel_weights={"standard": 0.5, "soft": 0.5}, hu_offset=(-10.0, 20.0),
           coverage_weights={"full": 0.5, "ends_in_liver": 0.5}),
    Cohort("oncology_mixed",
           "oncology staging from several scanners: every phase, liver metastases, pancreas and kidney lesions, "
           "scans starting inside the kidneys",
           phase_weights={"native": 0.2, "arterial": 0.3, "portal": 0.5}, slice_spacing=(1.5, 5.0),
           lesions=(LesionRule("liver", ("liver_metastasis", "liver_cyst"), 0.5, (1, 3), (8.0, 40.0)),
                    LesionRule("pancreas", ("pancreas_adenocarcinoma", "pancreas_cyst"), 0.2, (1, 1), (10.0, 25.0)),
                    LesionRule("left_kidney", ("kidney_cyst",), 0.2, (1, 1), (8.0, 25.0))),
           noise_sd=(8.0, 22.0), kernel_weights={"sharp": 0.3, "standard": 0.4, "soft": 0.3},
           hu_offset=(-20.0, 20.0), coverage_weights={"full": 0.6, "starts_in_kidneys": 0.2, "ends_in_liver": 0.2}),
    Cohort("cirrhosis_screening",
           "hepatology screening, in no setting's labeled or unlabeled split (an unseen cohort for testing): "
           "shrunken cirrhotic liver, splenomegaly, small HCCs, native and late-arterial scans, thin slices, sharp "
           "kernel, a scanner offset of its own",
           phase_weights={"native": 0.5, "arterial": 0.5}, slice_spacing=(1.25, 2.0),
           lesions=(LesionRule("liver", ("liver_hcc",), 0.7, (1, 2), (8.0, 25.0)),),
           organ_changes=(("liver", 0.8, (0.7, 0.88)), ("spleen", 0.7, (1.25, 1.6))),
           noise_sd=(14.0, 20.0), kernel_weights={"sharp": 1.0}, hu_offset=(15.0, 30.0)),
)}

#: mixes: each case's cohort drawn by weight
MIXES: dict[str, dict[str, float]] = {
    "flare_mix": {"pancreas_portal": 0.1, "liver_tumour_arterial": 0.25, "kidney_native": 0.25,
                  "spleen_lowdose": 0.2, "oncology_mixed": 0.2},
}

SPLITS = ("labeled", "unlabeled", "test")
#: settings: the cohort or mix of each split
SETTINGS: dict[str, dict[str, str]] = {
    "iid": {"labeled": "iid", "unlabeled": "iid", "test": "iid"},
    "shift": {"labeled": "pancreas_portal", "unlabeled": "flare_mix", "test": "flare_mix"},
}


def cohort_names() -> list[str]:
    """Every name ``--cohort`` accepts: cohorts and mixes."""
    return [*COHORTS, *MIXES]


def check_source(name: str, option: str = "--cohort") -> str:
    """A cohort or mix name, or a one-line error listing the choices."""
    if name not in COHORTS and name not in MIXES:
        raise NsnError(f"{option}: unknown cohort {name!r}; choose from {', '.join(cohort_names())}")
    return name


def split_sources(setting: str | None = None, cohorts: dict[str, str] | None = None) -> dict[str, str]:
    """The cohort or mix of each split: a setting's, then ``cohorts`` (split -> name) on top."""
    if setting is not None and setting not in SETTINGS:
        raise NsnError(f"--setting: unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
    sources = dict(SETTINGS[setting or "iid"])
    for split, name in (cohorts or {}).items():
        if split not in SPLITS:
            raise NsnError(f"--cohort: unknown split {split!r}; choose from {', '.join(SPLITS)}")
        sources[split] = check_source(name)
    return sources


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def pick_cohort(source: str, rng: np.random.Generator) -> Cohort:
    """The cohort of one case: ``source`` itself, or one drawn from the mix of that name."""
    return COHORTS[_choice(rng, MIXES[source]) if source in MIXES else source]


def draw_condition(cohort: Cohort, rng: np.random.Generator) -> tuple[Condition, tuple[str, ...]]:
    """One case's condition and the organs the cohort removes (a missing kidney), drawn from ``cohort``."""
    if cohort.name == "iid":
        return Condition(), ()
    phase = _choice(rng, cohort.phase_weights) if cohort.phase_weights else None
    scale = []
    for organ, p, (lo, hi) in cohort.organ_changes:
        if rng.random() < p:
            scale.append((organ, round(float(rng.uniform(lo, hi)), 3)))
    removed: tuple[str, ...] = ()
    if rng.random() < cohort.missing_kidney_p:
        removed = (("right_kidney", "left_kidney")[int(rng.integers(2))],)
    lesions = []
    for rule in cohort.lesions:
        if rule.organ in removed or rng.random() >= rule.p:
            continue
        for _ in range(int(rng.integers(rule.count[0], rule.count[1] + 1))):
            kind = rule.kinds[int(rng.integers(len(rule.kinds)))]
            lesions.append(Lesion(rule.organ, kind, round(float(rng.uniform(*rule.diameter_mm)), 1)))
    noise = round(float(rng.uniform(*cohort.noise_sd)), 2) if cohort.noise_sd else None
    kernel = _choice(rng, cohort.kernel_weights)
    offset = round(float(rng.uniform(*cohort.hu_offset)), 1)
    coverage_kind = _choice(rng, cohort.coverage_weights)
    coverage = None
    if coverage_kind != "full":
        (lo_a, lo_b), (hi_a, hi_b) = COVERAGE_WINDOWS[coverage_kind]
        coverage = (round(float(rng.uniform(lo_a, lo_b)), 1), round(float(rng.uniform(hi_a, hi_b)), 1))
    return Condition(phase, tuple(scale), tuple(lesions), noise, kernel, offset, coverage,
                     int(rng.integers(2**31))), removed
