"""(h) int8 on the CPU (issue 20, item 2): post-training quantization of the OpenVINO model, measured against fp32.

    python benchmarks/bench_int8.py RESULTS DATASET MODEL_DIR TEST_IMAGES CALIBRATION_IMAGES
        [--calibration_patches 300] [--workdir DIR]

e.g. a demo's fine-tuned student: ``RESULTS=WORK/nnUNet_results DATASET=Dataset990_DemoPhantoms
MODEL_DIR=NoisyStudentFinetuneTrainer__nnUNetLowFootprintPlans__3d_fullres``, its ``imagesTs`` and ``imagesTr``.

1. The fold's network as an fp32 OpenVINO model (the backend's own conversion).
2. Calibration: the training images (``CALIBRATION_IMAGES``, never the test images) through nnU-Net's preprocessing,
   cut into the patches the sliding window feeds, at most ``--calibration_patches`` of them drawn at random.
3. ``nncf.quantize`` (int8 weights and activations; ``--preset``; NNCF is not a dependency of the project:
   ``pip install nncf``).
4. Labels of the test images from ``nnUNetv2_predict_lowfootprint``: torch fp32 (the reference), OpenVINO fp32,
   OpenVINO ``--precision bf16``, and OpenVINO int8. int8 has no option of its own: the quantized model is
   written into a cache folder of its own under the fp32 model's key, so the unchanged predictor runs it (the run
   fails here if it converted the network instead).
5. Per organ Dice against torch fp32 (pooled over the test images) and the network's time per patch.

The guard of issue 20: int8 is kept as an option only if every organ holds Dice >= 0.99 against fp32.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import machine, table
from bench_backends import TRAINED_VARIANTS, machine_line, trained_labels

GUARD = 0.99  #: issue 20: every organ's Dice against fp32 at least this, or int8 is not kept


def load_fold(results: Path, dataset: str, model_dir: str, fold: int):
    """Our predictor with the fold's weights in its network (fp32, CPU), as the CLI loads them."""
    os.environ["nnUNet_results"] = str(results)
    from noisy_student_nnunet.inference.predictor import LowFootprintPredictor

    predictor = LowFootprintPredictor(device=torch.device("cpu"), precision="fp32", backend="openvino",
                                      allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(results / dataset / model_dir), (fold,))
    predictor.network.load_state_dict(predictor.list_of_parameters[0])
    predictor.network.eval()
    return predictor


def calibration_patches(predictor, images: Path, limit: int, seed: int = 0) -> list[np.ndarray]:
    """Patches (1, C, *patch) of the images at the sliding window's positions, preprocessed as for inference."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    patch = [int(p) for p in predictor.configuration_manager.patch_size]
    cases = create_lists_from_splitted_dataset_folder(str(images), predictor.dataset_json["file_ending"])
    if not cases:
        sys.exit(f"no images in {images}")
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []  # a uniform sample of every patch seen so far (reservoir sampling): bounded memory
    seen = 0
    for files in cases:
        data, _, _ = preprocessor.run_case(files, None, predictor.plans_manager, predictor.configuration_manager,
                                           predictor.dataset_json)
        data, _ = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
        for slicer in predictor._internal_get_sliding_window_slicers(data.shape[1:]):
            slot = seen if seen < limit else int(rng.integers(0, seen + 1))
            seen += 1
            if slot < limit:
                cut = np.ascontiguousarray(data[slicer][None], dtype=np.float32)
                if slot == len(kept):
                    kept.append(cut)
                else:
                    kept[slot] = cut
    print(f"calibration: {len(kept)} of {seen} patches of {len(cases)} training images", flush=True)
    return kept


def quantize(model, patches: list[np.ndarray], preset: str):
    """``preset``: NNCF's 'performance' (symmetric activations, its default) or 'mixed' (asymmetric activations:
    LeakyReLU's outputs are mostly non-negative, so a symmetric grid wastes half its levels)."""
    import nncf

    started = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(patches), subset_size=len(patches),
                              preset=nncf.QuantizationPreset(preset))
    print(f"nncf.quantize: {time.perf_counter() - started:.1f} s", flush=True)
    return quantized


def seconds_per_patch(core, model, precision: str, patch: np.ndarray, repeats: int) -> float:
    """The network alone, compiled as the predictor compiles it (``precision`` 'fp32' or 'bf16' is the hint)."""
    from noisy_student_nnunet.inference.openvino_backend import compile_config

    compiled = core.compile_model(model, "CPU", compile_config(precision, torch.get_num_threads()))
    request = compiled.create_infer_request()
    request.infer({0: patch})  # first call allocates
    started = time.perf_counter()
    for _ in range(repeats):
        request.infer({0: patch})
    return (time.perf_counter() - started) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("dataset")
    parser.add_argument("model_dir")
    parser.add_argument("test_images", type=Path)
    parser.add_argument("calibration_images", type=Path)
    parser.add_argument("--calibration_patches", type=int, default=300)
    parser.add_argument("--preset", choices=("performance", "mixed"), default="mixed",
                        help="NNCF's quantization preset")
    parser.add_argument("--repeats", type=int, default=20, help="patches timed per precision")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nsn_bench_int8")
    args = parser.parse_args(argv)
    try:
        import nncf  # noqa: F401
    except ImportError:
        sys.exit("bench_int8.py needs NNCF, which the project does not install: pip install nncf")
    import openvino

    from noisy_student_nnunet.inference.openvino_backend import CacheEntry, OpenVinoRunner, convert, network_digest
    from noisy_student_nnunet.inference.precision import cpu_native_bf16

    print(f"Machine: {machine_line()}", flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    predictor = load_fold(args.results.resolve(), args.dataset, args.model_dir, 0)  # fold 0, as trained_labels
    channels = len(predictor.dataset_json["channel_names"])
    shape = (1, channels, *[int(p) for p in predictor.configuration_manager.patch_size])
    fp32_model = convert(predictor.network, shape)
    patches = calibration_patches(predictor, args.calibration_images, args.calibration_patches)
    int8_model = quantize(fp32_model, patches, args.preset)

    int8_cache = args.workdir / "ov_cache_int8"
    key = OpenVinoRunner(shape, "fp32").key(network_digest(predictor.network))
    CacheEntry(int8_cache, key).build(lambda xml: openvino.save_model(int8_model, str(xml), compress_to_fp16=False))

    core = openvino.Core()
    timing_patch = patches[len(patches) // 2]
    native_bf16 = cpu_native_bf16()[0]
    speed = {"fp32": seconds_per_patch(core, fp32_model, "fp32", timing_patch, args.repeats),
             "int8": seconds_per_patch(core, int8_model, "fp32", timing_patch, args.repeats)}
    if native_bf16:
        speed["bf16"] = seconds_per_patch(core, fp32_model, "bf16", timing_patch, args.repeats)
        speed["int8 (bf16 hint)"] = seconds_per_patch(core, int8_model, "bf16", timing_patch, args.repeats)

    variants = {name: TRAINED_VARIANTS[name] for name in ("openvino_fp32", "openvino_bf16")}
    variants["openvino_int8"] = (["--backend", "openvino", "--precision", "fp32"],
                                 {"NSN_OPENVINO_CACHE": str(int8_cache)})
    labels = trained_labels(args.results.resolve(), args.dataset, args.model_dir, args.test_images.resolve(),
                            args.workdir, variants)
    int8_row = next(r for r in labels["rows"] if r["run"] == "openvino_int8")
    if "converting the network" in labels["stdout"]["openvino_int8"]:
        sys.exit("the int8 run converted the network instead of reading the quantized model: its key did not match")

    print(f"\nMachine: {machine_line()}\nCommand: python benchmarks/bench_int8.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"\n(h.1) network alone, one {'x'.join(map(str, shape))} patch, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats, load {os.getloadavg()[0]:.1f}:")
    print(table([{"model": name, "ms": 1000 * s, "x fp32": speed["fp32"] / s} for name, s in speed.items()],
                [("model", "model / hint"), ("ms", "ms per patch"), ("x fp32", "x faster than fp32")]))
    print(f"\n(h.2) labels of {args.test_images} against torch fp32 (pooled Dice per organ; guard >= {GUARD}):")
    print(table(labels["rows"], [("run", "run"), ("cases", "cases"), ("min_dice", "min Dice over organs"),
                                 ("worst_organ", "worst organ"), ("voxels_equal", "voxels equal"),
                                 ("wall_s", "wall (s; the first OpenVINO run converts)")]))
    organs = list(int8_row["dice"])
    print("\nper organ (Dice against torch fp32):")
    print(table([{"organ": o, **{r["run"]: r["dice"][o] for r in labels["rows"]}} for o in organs],
                [("organ", "organ"), *[(r["run"], r["run"]) for r in labels["rows"]]]))
    held = int8_row["min_dice"] >= GUARD
    print(f"\nint8: min Dice {int8_row['min_dice']:.4f} ({int8_row['worst_organ']}) "
          f"{'>=' if held else '<'} {GUARD}: {'holds the guard' if held else 'fails the guard: not kept'}; "
          f"network {speed['fp32'] / speed['int8']:.2f}x fp32's speed. {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
