"""(i) Preprocessing of one case (issue 20, item 3): stock ``DefaultPreprocessor.run_case`` against ours in one
thread and in several, in one process, alternating, every output compared with stock's.

    python benchmarks/bench_preprocessing.py [--shape 269 433 523 --spacing 1.25 0.7 0.7] [--repeats 2]
        [--workdir DIR]

The case is ``_inference_case.py``'s (default: the 523 x 433 x 269 phantom CT at 0.7 x 0.7 x 1.25 mm, planned at
2.5 x 1.6 x 1.6 mm: the 3D resampling path). Also timed on their own: stock's crop (which fills the nonzero mask's
holes) against the crop ours runs where no normalizer reads the mask.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from _common import machine, table
from _inference_case import add_case_arguments, half_width_case

import model_folders as mf  # noqa: E402  (on sys.path through _common)


def seconds(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def _as_before(run, flush_denormals: bool = False, axis_by_axis: bool = False):
    """``run()`` with the resampling as it was before 2026-12-06: without flushing denormals in its worker
    threads and/or with scipy's 64-tap cubic kernel instead of the axis-by-axis spline; for comparison in the same
    process."""
    from noisy_student_nnunet.inference import blocks, preprocessing

    flush, cubic = blocks.flush_denormals_in_this_thread, preprocessing.CUBIC_AXIS_BY_AXIS
    if not flush_denormals:
        blocks.flush_denormals_in_this_thread = lambda: False
    preprocessing.CUBIC_AXIS_BY_AXIS = axis_by_axis
    try:
        return run()
    finally:
        blocks.flush_denormals_in_this_thread, preprocessing.CUBIC_AXIS_BY_AXIS = flush, cubic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nsn_bench_preprocessing"))
    parser.add_argument("--repeats", type=int, default=2)
    add_case_arguments(parser)
    args = parser.parse_args(argv)
    case = half_width_case(args, "preprocessing", "Dataset983_BenchPreprocessing")

    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from noisy_student_nnunet.cpu_threads import available_cores
    from noisy_student_nnunet.inference.preprocessing import crop_to_nonzero_lean, preprocess_case

    plans = PlansManager(json.loads((case.model / "plans.json").read_text()))
    configuration = plans.get_configuration(mf.CONFIGURATION)
    dataset_json = json.loads((case.model / "dataset.json").read_text())
    files = [str(next(case.inputs.glob("*.nii.gz")))]
    threads = available_cores()
    runs = {"stock DefaultPreprocessor.run_case": lambda: DefaultPreprocessor(verbose=False).run_case(
                files, None, plans, configuration, dataset_json)[0],
            "ours, 1 thread": lambda: preprocess_case(files, None, plans, configuration, dataset_json, threads=1)[0],
            f"ours, {threads} threads": lambda: preprocess_case(files, None, plans, configuration, dataset_json,
                                                                 threads=threads)[0],
            f"ours, {threads} threads, 64-tap kernel": lambda: _as_before(
                lambda: preprocess_case(files, None, plans, configuration, dataset_json, threads=threads)[0],
                flush_denormals=True),
            f"ours, {threads} threads, 64-tap kernel, denormals kept (0744e11)": lambda: _as_before(
                lambda: preprocess_case(files, None, plans, configuration, dataset_json, threads=threads)[0])}
    times: dict[str, list[float]] = {name: [] for name in runs}
    differences: dict[str, tuple[int, float]] = {}
    reference = None
    for _ in range(args.repeats):
        for name, run in runs.items():
            data, took = seconds(run)
            times[name].append(took)
            if reference is None:
                reference = data
                continue
            if data.shape != reference.shape or data.dtype != reference.dtype:
                sys.exit(f"{name}: output {data.shape} {data.dtype} differs from stock's")
            if not np.array_equal(np.isnan(data), np.isnan(reference)):
                sys.exit(f"{name}: NaN where stock's output has none, or the other way round")
            differing = (data != reference) & ~np.isnan(reference)
            differences[name] = (int(differing.sum()), float(np.nanmax(np.abs(data - reference))))
            if differences[name][1] > 1e-13 * max(1.0, float(np.nanmax(np.abs(reference)))):
                sys.exit(f"{name}: output differs from stock's by {differences[name][1]:.3g}, more than float64 "
                         "rounding")
    image, _ = plans.image_reader_writer_class().read_images(files)
    crops = {"stock crop_to_nonzero (fills holes)": lambda: crop_to_nonzero(image.astype(np.float32), None)[2],
             "ours crop_to_nonzero_lean": lambda: crop_to_nonzero_lean(image.astype(np.float32))[1]}
    boxes = {name: seconds(crop) for name, crop in crops.items()}
    if len({str(box) for box, _ in boxes.values()}) != 1:
        sys.exit("the crops' bounding boxes differ")

    print(f"\nMachine: {machine()}; load {os.getloadavg()[0]:.1f}")
    print(f"Command: python benchmarks/bench_preprocessing.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"\n(i) one case {case.shape} (z, y, x) at {case.spacing} mm -> plans {case.plans_spacing} mm, network grid "
          f"{tuple(reference.shape[1:])}; each output against stock's (the axis-by-axis cubic spline may differ "
          f"by float64 rounding):")
    stock = min(times["stock DefaultPreprocessor.run_case"])
    print(table([{"run": name, "s": ", ".join(f"{t:.2f}" for t in values), "best": min(values),
                  "x": stock / min(values), "n": differences.get(name, (0, 0.0))[0],
                  "d": differences.get(name, (0, 0.0))[1]} for name, values in times.items()],
                [("run", "run"), ("s", "seconds, each repeat"), ("best", "best (s)"), ("x", "x faster than stock"),
                 ("n", "voxels unlike stock's"), ("d", "max abs difference")]))
    print("\ncrop alone (the same bounding box):")
    print(table([{"run": name, "s": took} for name, (_, took) in boxes.items()], [("run", "run"), ("s", "seconds")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
