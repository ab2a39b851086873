"""Per-case pieces of the predictor outside the network, each against the way it was done before (issue 20).

    python benchmarks/bench_case_overheads.py [--workdir DIR] [--repeats 3]

On one clinical-size phantom CT (523 x 433 x 269 voxels at 0.7 x 0.7 x 1.25 mm, written once as .nii.gz) and one
half-width patch (14 classes, 40 x 224 x 192), in this process with the OpenVINO predictor's heap setting
(``inference/heap.py``), 2 threads:

1. the input's gzip check (zlib against ISA-L) and SimpleITK's read: one after the other, side by side, and the
   stream decompressed once into a checked ``.nii`` that SimpleITK reads (``io_checks.read_checked``);
2. weighting a patch by the Gaussian map and adding it to the fp16 accumulators, one class at a time against in
   steps of ``ADD_STEP_ELEMENTS`` through two fp32 buffers (``LowFootprintPredictor._add_weighted_patch_``), checked
   equal;
3. the export's argmax over 14 classes of fp16 logits on the clinical CT's network grid: ``torch.argmax``, the
   numpy running maximum in float32 used before, and ``resize.argmax_channels`` (torch, in the logits' dtype);
4. the Gaussian importance map, stock's ``compute_gaussian`` against ``inference/gaussian.py``, checked equal;
5. writing the label map of that CT: a phantom's (smooth, as a trained model's) against noise (random weights').

Each figure is the median over ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, table  # noqa: E402

SHAPE, SPACING = (269, 433, 523), (1.25, 0.7, 0.7)
PATCH, CLASSES = (40, 224, 192), 14


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reading_rows(image: Path, repeats: int) -> list[dict]:
    import gzip

    import SimpleITK as sitk

    from noisy_student_nnunet.io_checks import check_gzip_stream, read_checked

    def read(paths=(str(image),)):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(paths[0])))

    def zlib_check():
        with gzip.open(image, "rb") as handle:
            while handle.read(1 << 20):
                pass

    zlib_s = median_seconds(zlib_check, repeats)
    check = median_seconds(lambda: check_gzip_stream(image), repeats)
    alone = median_seconds(read, repeats)
    serial = median_seconds(lambda: (check_gzip_stream(image), read()), repeats)
    beside = median_seconds(lambda: read_checked([image], 1, read), repeats)
    once = median_seconds(lambda: read_checked([image], 1, read, reads_plain_nifti=True), repeats)
    return [{"piece": "gzip check alone, zlib (Python's gzip)", "seconds": zlib_s},
            {"piece": "gzip check alone (check_gzip_stream: ISA-L where installed)", "seconds": check},
            {"piece": "SimpleITK read alone", "seconds": alone},
            {"piece": "check, then read", "seconds": serial},
            {"piece": "check beside read (read_checked, readers other than SimpleITKIO)", "seconds": beside},
            {"piece": "decompressed once, checked, read as .nii (read_checked, SimpleITKIO)", "seconds": once}]


def accumulation_rows(repeats: int) -> list[dict]:
    from noisy_student_nnunet.inference.predictor import LowFootprintPredictor

    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn((CLASSES, *PATCH), generator=generator) * 5
    weights = (torch.rand(PATCH, generator=generator) * 10).half()  # the predictor's Gaussian map is fp16
    sl = (slice(None), *[slice(5, 5 + p) for p in PATCH])
    accumulator = lambda: torch.zeros((CLASSES, *[p + 10 for p in PATCH]), dtype=torch.half)  # noqa: E731
    ours, ours_n = accumulator(), torch.zeros([p + 10 for p in PATCH], dtype=torch.half)
    before, before_n = ours.clone(), ours_n.clone()

    def stock_way():  # sliding_window_prediction's two lines, one class at a time (C x patch fp32 temporaries else)
        weighted = prediction * weights
        for c in range(CLASSES):
            before[(c, *sl[1:])] += weighted[c]
        before_n[sl[1:]] += weights

    per_class_s = median_seconds(stock_way, repeats)
    steps_s = median_seconds(
        lambda: LowFootprintPredictor._add_weighted_patch_(ours, ours_n, sl, prediction, weights), repeats)
    equal = torch.equal(ours, before) and torch.equal(ours_n, before_n)
    return [{"piece": "weight a patch, add it one class at a time", "seconds": per_class_s},
            {"piece": f"weight and add in steps (_add_weighted_patch_; equal: {equal})", "seconds": steps_s}]


def argmax_rows(repeats: int) -> list[dict]:
    """The export's argmax over the classes of the clinical CT's fp16 logits (network grid 134 x 224 x 229)."""
    from noisy_student_nnunet.inference.blocks import cpu_work_threads, in_blocks
    from noisy_student_nnunet.inference.resize import argmax_channels

    generator = torch.Generator().manual_seed(0)
    scores = (torch.randn((CLASSES, 134, 224, 229), generator=generator) * 3).half()

    def numpy_running_maximum() -> np.ndarray:  # until 3969c90: float32 buffers, blocks of rows in threads
        s, labels = scores.numpy(), np.empty(scores.shape[1:], dtype=np.uint8)

        def block(a: int, b: int) -> None:
            best = s[0, a:b].astype(np.float32)
            value, better = np.empty_like(best), np.empty(best.shape, dtype=bool)
            labels[a:b] = 0
            for c in range(1, s.shape[0]):
                value[...] = s[c, a:b]
                np.greater(value, best, out=better)
                np.copyto(labels[a:b], c, where=better)
                np.maximum(best, value, out=best)

        in_blocks(block, s.shape[1], cpu_work_threads())
        return labels

    reference = torch.argmax(scores, 0)
    torch_s = median_seconds(lambda: torch.argmax(scores, 0), repeats)
    numpy_s = median_seconds(numpy_running_maximum, repeats)
    ours_s = median_seconds(lambda: argmax_channels(scores), repeats)
    equal = np.array_equal(numpy_running_maximum(), reference.numpy()) and \
        torch.equal(argmax_channels(scores).long(), reference)
    return [{"piece": "argmax of fp16 logits, torch.argmax", "seconds": torch_s},
            {"piece": "argmax, numpy running maximum in float32, threads", "seconds": numpy_s},
            {"piece": f"argmax, torch running maximum in fp16 (argmax_channels; equal: {equal})", "seconds": ours_s}]


def gaussian_rows(repeats: int) -> list[dict]:
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian as stock_gaussian

    from noisy_student_nnunet.inference.gaussian import compute_gaussian

    cpu = torch.device("cpu")
    stock = median_seconds(lambda: stock_gaussian.__wrapped__(PATCH, 1. / 8, 10, torch.float16, cpu), repeats)
    ours = median_seconds(lambda: compute_gaussian.__wrapped__(PATCH, 1. / 8, 10, torch.float16, cpu), repeats)
    equal = torch.equal(stock_gaussian.__wrapped__(PATCH, 1. / 8, 10, torch.float16, cpu),
                        compute_gaussian.__wrapped__(PATCH, 1. / 8, 10, torch.float16, cpu))
    return [{"piece": "Gaussian map, stock's gaussian_filter", "seconds": stock},
            {"piece": f"Gaussian map, three 1-D filters (equal: {equal})", "seconds": ours}]


def writing_rows(label: np.ndarray, workdir: Path, repeats: int) -> list[dict]:
    import SimpleITK as sitk

    noise = np.random.default_rng(0).integers(0, CLASSES, label.shape).astype(np.uint8)
    rows = []
    for name, labels in (("phantom's label map", label.astype(np.uint8)), ("noise label map (random weights)", noise)):
        image = sitk.GetImageFromArray(labels)
        target = workdir / "labels.nii.gz"
        seconds = median_seconds(lambda: sitk.WriteImage(image, str(target), True), repeats)
        rows.append({"piece": f"write the {name}", "seconds": seconds,
                     "note": f"{os.path.getsize(target) / 1e6:.1f} MB"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nsn_bench_case_overheads"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from noisy_student_nnunet.inference.heap import map_large_allocations
    from noisy_student_nnunet.phantoms import make_phantom

    map_large_allocations()  # as the OpenVINO predictor runs
    torch.set_num_threads(2)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(7, SHAPE, SPACING)
    image = workdir / "case_0000.nii.gz"
    phantom.write(image)
    from noisy_student_nnunet.inference.precision import speed_flags

    print(f"Machine: {machine()}; CPU flags: {' '.join(speed_flags()) or 'none of avx2/avx512/amx'}")
    print(f"Command: python benchmarks/bench_case_overheads.py {' '.join(argv or sys.argv[1:])}")
    print(f"CT {SHAPE} at {SPACING} mm, {image.stat().st_size / 1e6:.0f} MB gzip; patch {PATCH}, {CLASSES} classes; "
          f"median of {args.repeats}")
    rows = (reading_rows(image, args.repeats) + accumulation_rows(args.repeats) + argmax_rows(args.repeats)
            + gaussian_rows(args.repeats) + writing_rows(phantom.label, workdir, args.repeats))
    print(table(rows, [("piece", "piece"), ("seconds", "seconds"), ("note", "note")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
