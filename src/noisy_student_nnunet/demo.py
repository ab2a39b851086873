"""``nsn demo``: the whole chain on synthetic phantoms on the CPU, then a table comparing its models.

The chain itself is ``pipeline/run_pipeline.sh`` (the same script users run); the demo adds the
phantoms, predictions of the intermediate models (one teacher fold, the teacher ensemble, the
student) and a table of FLARE DSC/NSD per organ with prediction time and peak RAM.
Everything lives under one work folder; a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from noisy_student_nnunet.demo_budget import BUDGET_MINUTES
from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.outputs import atomic_file, atomic_write_text

PIPELINE_SCRIPT = Path(__file__).resolve().parent / "pipeline" / "run_pipeline.sh"
PLANS = "nnUNetLowFootprintPlans"
CONFIGURATION = "3d_fullres"
#: phantom size of the demo: small enough for 2 CPU cores, large enough for the big organs' shapes and for small
#: organs (the aorta) to be more than boundary (training costs the same, its patch is fixed; only preprocessing and
#: predictions grow)
PHANTOM_SIZE = dict(inplane_voxels=(72, 80), slices=(16, 24), slice_spacing=(2.5, 3.5))


@dataclass(frozen=True)
class DemoModel:
    """One row group of the demo table: a trained model and the folds it predicts with."""

    title: str
    trainer: str
    folds: tuple[str, ...]


@dataclass
class ModelScore:
    model: DemoModel
    summary: dict  # evaluation summary (per_structure, overall)
    wall_time_s: float
    peak_rss_mb: float | None
    predictions: Path | None = None


#: the recipe ``nsn demo`` trains with on each device when none is named
DEFAULT_RECIPES = {"cpu": "demo", "cuda": "demo_gpu"}
RESULTS_JSON = "demo_results.json"
#: the recipe the demo trains with on the CPU, its epochs sized to this CPU (see :func:`budgeted_recipe`)
BUDGETED_RECIPE = "demo_recipe.json"
SLICES_PNG = "demo_slices.png"


def resolve_device(device: str) -> str:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise NsnError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise NsnError("--device cuda: torch sees no CUDA GPU (use --device cpu or auto)")
    return device


def demo_environment(work: Path, base: dict[str, str] | None = None, device: str = "cpu") -> dict[str, str]:
    """The environment for every child: nnU-Net folders inside the work folder, defaults for the device."""
    env = dict(os.environ if base is None else base)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(work / var)
    if device == "cpu":
        # augmentation in the training process and every core's thread for a lone training (student, fine-tune;
        # the pipeline gives each of the two teachers side by side one thread): on 2 cores a student epoch took
        # 6.1 s against 8.5 s with a background augmentation worker competing with the 2 threads, and 8.8 s
        # with 1 thread and the worker (fp32; docs/experiments.md, "Time by machine"). A GPU needs workers to keep
        # it fed; nnU-Net's default of 12 oversubscribes a small CPU.
        from noisy_student_nnunet.cpu_threads import available_cores

        env.setdefault("nnUNet_n_proc_DA", "0" if available_cores() <= 2 else "1")
    else:
        env.setdefault("nnUNet_n_proc_DA", str(max(2, min(8, (os.cpu_count() or 2) - 1))))
    env.setdefault("nnUNet_compile", "0")
    # nnU-Net's end-of-training validation spawns this many export workers, each importing torch: on 2 cores
    # the default 8 took 50 s per fold for 2 small cases, 1 took 11 s
    env.setdefault("nnUNet_def_n_proc", "1")
    env.pop("NSN_RECIPE", None)
    # the console scripts of this interpreter's environment first, also when it is not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["NSN_PYTHON"] = sys.executable
    return env


def parallel_folds(device: str, num_folds: int) -> list[str]:
    """``-j N`` for the pipeline: on the CPU the teacher folds train side by side, one core each.

    The demo's network is too small to use two cores fully: two folds side by side, one thread each, took 10.5 s
    per epoch (fp32, 2 cores), one after the other with 2 threads each 2 x 6.1 s.
    """
    from noisy_student_nnunet.cpu_threads import available_cores

    jobs = min(num_folds, available_cores()) if device == "cpu" else 1
    return ["-j", str(jobs)] if jobs > 1 else []


def best_fold(results_dir: Path, folds: tuple[str, ...]) -> str:
    """The fold whose cross-validation foreground Dice is highest (nnU-Net's validation/summary.json)."""
    scores = {}
    for fold in folds:
        summary = results_dir / f"fold_{fold}" / "validation" / "summary.json"
        if not summary.is_file():
            raise NsnError(f"no validation summary for fold {fold}: {summary}")
        scores[fold] = json.loads(summary.read_text())["foreground_mean"]["Dice"]
    return max(scores, key=scores.get)


def _stream(cmd: list[str], env: dict[str, str], log: Path) -> None:
    """Run ``cmd`` showing its lines as progress; raise NsnError naming the log on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            handle.write(line)
            print(f"  {line.rstrip()}", flush=True)
        if process.wait() != 0:
            raise NsnError(f"`{' '.join(cmd[:2])} ...` failed (exit {process.returncode}); see {log}")


def budgeted_recipe(work: Path, name: str, minutes: float, planned: Path | None = None,
                    calibrated_layout: bool = True, threads: int | None = None) -> tuple[str, str]:
    """The recipe file the demo trains with on this CPU, sized from a measured step; (its path, a note on it).

    Written once per work folder (``demo_recipe.json``): a rerun resumes with the epochs the first run chose. A work
    folder whose ``planned`` plans exist from before (an older version wrote no such file) keeps their recipe, as the
    pipeline does. The budget is calibrated for the demo's layout (two teacher folds side by side, one student fold);
    with another (``calibrated_layout`` false) the whole recipe is trained. ``threads``: those a lone training gets
    (default: :func:`~noisy_student_nnunet.cpu_threads.cpu_thread_count` of this process).
    """
    from noisy_student_nnunet.cpu_threads import cpu_thread_count
    from noisy_student_nnunet.demo_budget import plan_budget, scaled_recipe
    from noisy_student_nnunet.inference.precision import cpu_native_bf16
    from noisy_student_nnunet.recipe import PLANS_KEY, load_recipe, validate_recipe
    from noisy_student_nnunet.step_time import measure_training_step

    path = work / BUDGETED_RECIPE
    if path.is_file():
        chosen = load_recipe(path)
        return str(path), (f"{name} ({chosen['training']['num_epochs']} training epochs, as this work folder chose "
                           f"in {path.name}; --minutes applies to a new work folder)")
    if planned is not None and planned.is_file():
        recipe = validate_recipe(json.loads(planned.read_text())[PLANS_KEY])
        note = f"{name} ({recipe['training']['num_epochs']} training epochs, as planned in {planned})"
    elif not calibrated_layout:
        recipe = load_recipe(name)
        note = (f"{name} (the whole recipe: the time budget is calibrated for two teacher folds side by side and one "
                f"student fold)")
    else:
        base = load_recipe(name)
        bf16 = cpu_native_bf16()[0]
        print("  timing a training step of the recipe's network on this CPU", flush=True)
        one_thread = measure_training_step(base, bf16=bf16, threads=1)
        threads = threads or cpu_thread_count()
        every_thread = measure_training_step(base, bf16=bf16, threads=threads) if threads > 1 else one_thread
        budget = plan_budget(base, one_thread, every_thread, "bf16" if bf16 else "fp32", minutes)
        recipe = scaled_recipe(base, budget.scale, minutes)
        note = f"{name} ({'bf16' if bf16 else 'fp32'}; {budget.describe()})"
    atomic_write_text(path, json.dumps(recipe, indent=2) + "\n")
    return str(path), note


def predict_and_score(model: DemoModel, dataset_id: int, images: Path, labels: Path, dataset_json: Path,
                      out: Path, env: dict[str, str], device: str = "cpu") -> ModelScore:
    """Predict the test images with the low-footprint predictor under the profiler, then score them."""
    from noisy_student_nnunet.evaluation import evaluate_folders, resolve_labels
    from noisy_student_nnunet.profiling import profile_command

    predictions = out / "predictions"
    profile_json = out / "profile.json"
    if not profile_json.is_file():
        if predictions.exists():
            shutil.rmtree(predictions)
        cmd = ["nnUNetv2_predict_lowfootprint", "-i", str(images), "-o", str(predictions), "-d", str(dataset_id),
               "-p", PLANS, "-c", CONFIGURATION, "-tr", model.trainer, "-f", *model.folds, "-device", device,
               "--disable_progress_bar"]
        result = profile_command(cmd, interval=0.1, env=env)
        if result.exit_code != 0:
            raise NsnError(f"prediction with {model.title} failed (exit {result.exit_code}): {' '.join(cmd)}")
        result.write_json(profile_json)
        result.plot(out / "profile.png")
    profile = json.loads(profile_json.read_text())
    evaluation = evaluate_folders(labels, predictions, resolve_labels(str(dataset_json), 1.0), progress=False)
    return ModelScore(model, evaluation.summary(), profile["wall_time_s"], profile["peak_rss_tree_mb"],
                      predictions)


def results_document(scores: list[ModelScore], **facts) -> dict:
    """``demo_results.json``: per stage (the table's titles) organ -> DSC and NSD, the mean, time and RAM."""
    stages = {}
    for score in scores:
        organs = {organ: {"DSC": entry["DSC"]["mean"], "NSD": entry["NSD"]["mean"]}
                  for organ, entry in score.summary["per_structure"].items()}
        overall = score.summary["overall"]
        stages[score.model.title] = {
            "trainer": score.model.trainer, "folds": list(score.model.folds), "organs": organs,
            "mean": {"DSC": overall["DSC"]["mean"], "NSD": overall["NSD"]["mean"]},
            "prediction_time_s": score.wall_time_s, "peak_ram_mb": score.peak_rss_mb}
    return {**facts, "stages": stages}


def format_table(scores: list[ModelScore]) -> str:
    """Organs as rows, models as DSC/NSD column pairs; then mean, prediction time and peak RAM."""
    structures = list(scores[0].summary["per_structure"])
    width = max(len(s) for s in structures + ["prediction time (s)"])
    head1 = f"{'':<{width}}" + "".join(f"  {s.model.title:>17}" for s in scores)
    head2 = f"{'organ':<{width}}" + "".join(f"  {'DSC':>8} {'NSD':>8}" for _ in scores)
    lines = [head1, head2]

    def pair(entry: dict) -> str:
        d, n = entry["DSC"]["mean"], entry["NSD"]["mean"]
        return "  " + (f"{d:8.4f}" if d is not None else f"{'n/a':>8}") + " " + (
            f"{n:8.4f}" if n is not None else f"{'n/a':>8}")

    for structure in structures:
        lines.append(f"{structure:<{width}}" + "".join(pair(s.summary["per_structure"][structure]) for s in scores))
    lines.append(f"{'mean':<{width}}" + "".join(pair(s.summary["overall"]) for s in scores))
    lines.append(f"{'prediction time (s)':<{width}}" + "".join(f"  {s.wall_time_s:17.1f}" for s in scores))
    lines.append(f"{'peak RAM (MB)':<{width}}" + "".join(
        f"  {s.peak_rss_mb:17.0f}" if s.peak_rss_mb is not None else f"  {'n/a':>17}" for s in scores))
    return "\n".join(lines)


def run_demo(work: Path, dataset_id: int = 990, recipe: str | None = None, num_labeled: int = 8,
             num_unlabeled: int = 24, num_test: int = 8, folds: tuple[str, ...] = ("0", "1"), seed: int = 0,
             student_folds: tuple[str, ...] | None = None, device: str = "cpu",
             setting: str = "iid", minutes: float = BUDGET_MINUTES) -> list[ModelScore]:
    """Make phantoms, run the pipeline, predict with every stage's model; print and write the results.

    ``folds`` are the teacher folds (two at least, for the ensemble); ``student_folds`` default to them.
    ``device`` is ``cpu`` or ``cuda`` (see :func:`resolve_device`); ``recipe`` defaults to the device's.
    ``setting`` is where the phantoms come from (``iid``: one distribution; ``shift``: labeled cases from one narrow
    cohort, unlabeled and test cases from a broad mix; see ``phantoms/cohorts.py``).
    ``minutes``: on the CPU with the default recipe, the budget the training's epochs are sized to from a measured
    step (see :mod:`noisy_student_nnunet.demo_budget`; 0 trains the whole recipe).
    Writes ``demo_table.txt``, ``demo_results.json``, ``demo_slices.png`` and ``demo_resources.png`` to ``work``.
    """
    from noisy_student_nnunet.locks import folder_lock

    with folder_lock(work, "nsn demo"):  # a second demo on this folder is refused, naming this one
        return _run_demo(work, dataset_id, recipe, num_labeled, num_unlabeled, num_test, folds, seed, student_folds,
                         device, setting, minutes)


def _run_demo(work: Path, dataset_id: int, recipe: str | None, num_labeled: int, num_unlabeled: int, num_test: int,
              folds: tuple[str, ...], seed: int, student_folds: tuple[str, ...] | None, device: str,
              setting: str, minutes: float) -> list[ModelScore]:
    started = time.monotonic()
    student_folds = tuple(student_folds or folds)
    sized_to_cpu = recipe is None and device == "cpu"
    recipe = recipe or DEFAULT_RECIPES[device]
    from noisy_student_nnunet.phantoms import write_phantom_dataset
    from noisy_student_nnunet.phantoms.cohorts import split_sources

    work = work.resolve()
    env = demo_environment(work, device=device)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    raw = Path(env["nnUNet_raw"])
    existing = sorted(raw.glob(f"Dataset{dataset_id:03d}_*"))
    print(f"[1/4] phantoms: {num_labeled} labeled, {num_unlabeled} unlabeled, {num_test} test (seed {seed}, "
          f"setting {setting})", flush=True)
    if existing:
        dataset = existing[0]
        manifest = json.loads((dataset / "phantoms.json").read_text())
        made_with = (manifest.get("seed"), manifest.get("cohorts", split_sources("iid")))
        if made_with != (seed, split_sources(setting)):
            raise NsnError(f"{work} holds the phantoms of seed {made_with[0]} with cohorts {made_with[1]}, not seed "
                           f"{seed} of setting {setting}: use another work folder (-w)")
        print(f"  using {dataset}", flush=True)
    else:
        dataset = write_phantom_dataset(raw, dataset_id, name="DemoPhantoms", num_labeled=num_labeled,
                                        num_unlabeled=num_unlabeled, num_test=num_test, seed=seed,
                                        setting=setting, progress=True, **PHANTOM_SIZE)
    pipeline_work = work / "pipeline"
    recipe_note = recipe
    if sized_to_cpu:
        planned = Path(env["nnUNet_preprocessed"]) / dataset.name / f"{PLANS}.json"
        layout = len(folds) == 2 and len(student_folds) == 1 and parallel_folds(device, len(folds)) == ["-j", "2"]
        from noisy_student_nnunet.cpu_threads import cpu_thread_count

        recipe, recipe_note = budgeted_recipe(work, recipe, minutes, planned, layout, cpu_thread_count(env))
    print(f"[2/4] pipeline on {device}, recipe {recipe_note}: plan, teachers, pseudo-labels, student, fine-tune",
          flush=True)
    # the test phantoms are predicted and scored below with every stage's model (the fine-tuned one
    # included), so the pipeline is not asked to do it once more
    _stream(["bash", str(PIPELINE_SCRIPT), "-d", str(dataset_id), "-u", str(dataset / "imagesUnlabeled"),
             "-r", recipe, "-f", " ".join(folds), "-s", " ".join(student_folds),
             "-D", device, "-w", str(pipeline_work), "-o", f"Dataset{dataset_id + 1:03d}_DemoPseudo",
             *parallel_folds(device, len(folds))],
            env, work / "demo.log")

    results = Path(env["nnUNet_results"]) / dataset.name
    best = best_fold(results / f"NoisyStudentTrainer__{PLANS}__{CONFIGURATION}", student_folds)
    models = [
        DemoModel(f"teacher fold {folds[0]}", "NoisyStudentTeacherTrainer", (folds[0],)),
        DemoModel("teacher ensemble", "NoisyStudentTeacherTrainer", folds),
        DemoModel(f"student fold {best}", "NoisyStudentTrainer", (best,)),
        DemoModel(f"fine-tuned fold {best}", "NoisyStudentFinetuneTrainer", (best,)),
    ]
    print("[3/4] predicting the test phantoms with each stage's model", flush=True)
    scores = []
    for model in models:
        print(f"  {model.title}", flush=True)
        out = work / "compare" / model.title.replace(" ", "_")
        scores.append(predict_and_score(model, dataset_id, dataset / "imagesTs", dataset / "labelsTs",
                                        dataset / "dataset.json", out, env, device))
    print("[4/4] results on the test phantoms (FLARE22 DSC and NSD, mean over cases)", flush=True)
    table = format_table(scores)
    atomic_write_text(work / "demo_table.txt", table + "\n")
    plot = work / "demo_resources.png"
    with atomic_file(plot) as partial:
        shutil.copyfile(work / "compare" / models[-1].title.replace(" ", "_") / "profile.png", partial)
    slices = plot_test_case(dataset, scores, work / SLICES_PNG)
    elapsed = time.monotonic() - started
    atomic_write_text(work / RESULTS_JSON, json.dumps(results_document(
        scores, seed=seed, setting=setting, device=device, recipe=recipe_note, num_labeled=num_labeled,
        num_unlabeled=num_unlabeled, num_test=num_test, teacher_folds=list(folds), student_folds=list(student_folds),
        wall_time_s=round(elapsed, 1)), indent=2) + "\n")
    print(table)
    print(f"\n{elapsed / 60:.1f} min (this run). table: {work / 'demo_table.txt'}; results: {work / RESULTS_JSON}"
          f"\nslices of a test phantom: {slices}\nresource plot of the fine-tuned model's prediction: {plot}")
    return scores


def plot_test_case(dataset: Path, scores: list[ModelScore], output: Path) -> Path:
    """``demo_slices.png``: the first test phantom, its reference and every stage's labels."""
    from noisy_student_nnunet.visualization import plot_segmentation_slices

    reference = sorted((dataset / "labelsTs").glob("*.nii.gz"))[0]
    case = reference.name[: -len(".nii.gz")]
    return plot_segmentation_slices(dataset / "imagesTs" / f"{case}_0000.nii.gz", reference,
                                    {s.model.title: s.predictions / reference.name for s in scores}, output,
                                    title=f"test phantom {case}")
