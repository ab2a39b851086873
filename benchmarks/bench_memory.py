"""(e) Where ours' peak RSS goes: one case through the low-footprint predictor, stage by stage.

    python benchmarks/bench_memory.py [--precision auto|fp32|bf16] [case options of bench_e2e.py]

One fresh process runs the steps ``nnUNetv2_predict_lowfootprint`` runs for a single case (imports, model,
read and preprocess, sliding window, export) and reads the kernel's high-water mark after each, resetting it
between stages. The case is ``bench_e2e.py``'s (same folder under ``--workdir``, reused). Also run as
``python benchmarks/bench_inference.py memory``; ``bench_e2e.py`` prints it after its table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import GB, reset_peak_rss, rss_status, run_worker, table
from _inference_case import add_case_arguments, half_width_case

#: the dataset of bench_e2e.py's case, whose folder this benchmark reuses
E2E_DATASET = "Dataset980_BenchHalfWidth"


def memory_worker(model: Path, image: Path, precision: str, out: Path) -> dict:
    """Ours' steps for one case in this fresh process, with the peak RSS of each."""
    stages = []
    t0 = time.perf_counter()

    def mark(stage: str, **arrays) -> None:
        rss, hwm = rss_status()
        stages.append({"stage": stage, "rss_after_gb": rss / GB, "peak_gb": hwm / GB,
                       "s": time.perf_counter() - t0, **{k: v / GB for k, v in arrays.items()}})
        reset_peak_rss()

    mark("interpreter, numpy")
    import torch

    mark("import torch")
    from noisy_student_nnunet.cpu_threads import cpu_thread_count
    from noisy_student_nnunet.inference import LowFootprintPredictor
    from noisy_student_nnunet.inference.preprocessing import preprocess_case

    mark("import nnU-Net's predictor and ours (nnunetv2, torch._dynamo, SimpleITK, scipy, skimage)")
    torch.set_num_threads(cpu_thread_count())
    predictor = LowFootprintPredictor(device=torch.device("cpu"), allow_tqdm=False, precision=precision)
    predictor.initialize_from_trained_model_folder(str(model), (0,))
    weights = sum(v.numel() * v.element_size() for v in predictor.list_of_parameters[0].values())
    mark("model loaded (checkpoint, network)", weights_gb=2 * weights)
    data, properties = preprocess_case([str(image)], None, predictor.plans_manager, predictor.configuration_manager,
                                       predictor.dataset_json)
    voxels = int(np.prod(properties["shape_before_cropping"]))
    mark("read + preprocess (crop, normalise, resample)", input_int16_gb=2 * voxels, input_float32_gb=4 * voxels,
         resampled_gb=data.nbytes)
    data = torch.from_numpy(data)
    logits = predictor.predict_logits_from_preprocessed_data(data)
    del data
    mark("network, sliding window", logits_gb=logits.numel() * logits.element_size())
    out.parent.mkdir(parents=True, exist_ok=True)
    predictor.export_case(logits, properties, str(out))
    mark("export (argmax, nearest resize, write)", labels_gb=voxels)
    return {"stages": stages, "precision": predictor.precision.name}


def memory_breakdown(model: Path, root: Path, precision: str) -> dict:
    """The stages of :func:`memory_worker` on ``root``'s input case, measured in a fresh process."""
    return run_worker(__file__, ["_worker", model, root / "in" / "case_0000.nii.gz", precision,
                                 root / "out_memory" / "case"])


def print_breakdown(breakdown: dict) -> None:
    print(f"\nPeak RSS of ours stage by stage ({breakdown['precision']}; one process, the kernel's high-water mark "
          f"reset after each stage; the arrays' sizes for reference):")
    rows = []
    for st in breakdown["stages"]:
        arrays = ", ".join(f"{k[:-3].replace('_', ' ')} {v:.3f}" for k, v in st.items() if k.endswith("_gb")
                           and k not in ("rss_after_gb", "peak_gb"))
        rows.append({**st, "arrays": arrays})
    print(table(rows, [("stage", "stage"), ("peak_gb", "peak RSS during (GB)"), ("rss_after_gb", "RSS after (GB)"),
                       ("arrays", "arrays (GB)"), ("s", "time since start (s)")]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        print(json.dumps(memory_worker(Path(argv[1]), Path(argv[2]), argv[3], Path(argv[4]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nsn_bench_inference"))
    add_case_arguments(parser)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args(argv)
    case = half_width_case(args, "e2e", E2E_DATASET)  # the same folder as bench_e2e.py: model and input reused
    print_breakdown(memory_breakdown(case.model, case.root, args.precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
