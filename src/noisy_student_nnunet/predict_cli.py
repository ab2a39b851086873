"""``nnUNetv2_predict_lowfootprint``: stock ``nnUNetv2_predict`` (2.8.1) arguments, low-footprint predictor.

Stock ``nnUNetv2_predict`` hard-codes ``nnUNetPredictor``, so a different predictor needs its own command. Every
stock argument keeps its name, default and meaning, except:

- mirroring is off by default (paper section 2.3); ``--enable_tta`` turns it on, ``--disable_tta`` is accepted
  and changes nothing;
- ``-npp`` / ``-nps`` count threads in this process, not processes (no copies of volumes between processes);
  ``-nps`` > 0 lets one export overlap the next case's prediction;
- ``-npp`` defaults to ``$nnUNet_npp``, else stock's 3 capped at the usable cores minus one (1 on 2 cores, where
  more workers cost RAM and no time: :func:`default_preprocessing_workers`);
- ``-num_parts`` / ``-part_id`` also apply with ``-npp 0 -nps 0``;
- a case with unusable input (no ``_0000`` suffix, wrong channel count, truncated or unreadable file) is named
  and skipped, the others are predicted, ``OUTPUT/.failed.json`` lists the failed cases and why, and the exit
  status is 1; ``--continue_prediction`` then retries only what has no output yet. Stock stops at the first
  such case with a traceback (and predicts a truncated ``.nii.gz`` silently).

Added: ``--export nearest|linear`` (nearest: the paper's argmax then nearest neighbour; linear: stock's labels
at low memory), ``--combine logits|softmax`` (how folds are averaged), ``--precision auto|fp32|bf16`` and
``--backend auto|torch|openvino`` (auto: OpenVINO on the CPU, converted once per model and cached beside it).
On CPU the network gets the cores this process may use (stock: the host's CPU count, capped at 8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from noisy_student_nnunet import validation
from noisy_student_nnunet.errors import EXIT_FAILED_CASES, NsnError, run_guarded
from noisy_student_nnunet.outputs import atomic_write_text, check_output_folder
from noisy_student_nnunet.written import WriteFailed

PROG = "nnUNetv2_predict_lowfootprint"


def _default_int(env: str, default: int) -> int:
    try:
        return int(os.environ.get(env) or default)
    except ValueError:
        return default


def default_preprocessing_workers(stock_default: int = 3) -> int:
    """``$nnUNet_npp``, else stock's 3 capped at the usable cores minus one (at least 1).

    Each worker preprocesses one case ahead while the network runs, holding that case's resampling buffers (its
    float32 image and padded float64 copy: 0.73 GB for a 523x433x269 CT); on 2 cores one worker already keeps the
    network fed, and a second or third worker costs RAM and no time."""
    if os.environ.get("nnUNet_npp"):
        return _default_int("nnUNet_npp", stock_default)
    from noisy_student_nnunet.cpu_threads import available_cores

    return max(1, min(stock_default, available_cores() - 1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="nnU-Net v2 inference with a low memory and time footprint (Koehler et al., FLARE 2022, "
                    "section 2.3): no test-time mirroring, fp16 on CUDA, argmax at network resolution, "
                    "nearest-neighbour resampling of the label map. Takes every nnUNetv2_predict argument.",
    )
    # --- stock nnUNetv2_predict arguments (nnunetv2 2.8.1 predict_entry_point), same names and defaults
    parser.add_argument("-i", type=str, required=True,
                        help="input folder. Remember to use the correct channel numberings for your files (_0000 "
                             "etc). File endings must be the same as the training dataset!")
    parser.add_argument("-o", type=str, required=True,
                        help="Output folder. If it does not exist it will be created. Predicted segmentations will "
                             "have the same name as their source images.")
    parser.add_argument("-d", type=str, required=True,
                        help="Dataset with which you would like to predict. You can specify either dataset name "
                             "or id")
    parser.add_argument("-p", type=str, required=False, default="nnUNetPlans",
                        help="Plans identifier. Default: nnUNetPlans")
    parser.add_argument("-tr", type=str, required=False, default="nnUNetTrainer",
                        help="What nnU-Net trainer class was used for training? Default: nnUNetTrainer")
    parser.add_argument("-c", type=str, required=True,
                        help="nnU-Net configuration that should be used for prediction.")
    parser.add_argument("-f", nargs="+", type=str, required=False, default=(0, 1, 2, 3, 4),
                        help="Folds of the trained model to use. Default: (0, 1, 2, 3, 4)")
    parser.add_argument("-step_size", type=float, required=False, default=0.5,
                        help="Step size for sliding window prediction. Default: 0.5. Cannot be larger than 1.")
    parser.add_argument("--disable_tta", action="store_true", required=False, default=False,
                        help="Accepted for compatibility with nnUNetv2_predict; mirroring is already off here "
                             "(see --enable_tta).")
    parser.add_argument("--verbose", action="store_true", help="Print more.")
    parser.add_argument("--save_probabilities", action="store_true",
                        help='Also export class "probabilities" (.npz + .pkl), with stock nnU-Net\'s export '
                             "(and its memory use).")
    parser.add_argument("--continue_prediction", action="store_true",
                        help="Continue an aborted previous prediction (will not overwrite existing files)")
    parser.add_argument("-chk", type=str, required=False, default="checkpoint_final.pth",
                        help="Name of the checkpoint you want to use. Default: checkpoint_final.pth")
    parser.add_argument("-npp", type=int, required=False, default=None,
                        help="Number of preprocessing workers (threads here, each preprocessing one case ahead; "
                             "0 = inline). Default: $nnUNet_npp, else 3 capped at the cores this process may use "
                             "minus one (at least 1): on 2 cores each further worker costs RAM, not time")
    parser.add_argument("-nps", type=int, required=False, default=_default_int("nnUNet_nps", 3),
                        help="Segmentation export: 0 = inline, > 0 = one background thread that overlaps the next "
                             "case's prediction. Default: 3")
    parser.add_argument("-prev_stage_predictions", type=str, required=False, default=None,
                        help="Folder containing the predictions of the previous stage. Required for cascaded "
                             "models.")
    parser.add_argument("-num_parts", type=int, required=False, default=1,
                        help="Number of separate calls that share the input folder. Default: 1")
    parser.add_argument("-part_id", type=int, required=False, default=0,
                        help="Which of the -num_parts calls this is (0 .. num_parts - 1).")
    parser.add_argument("-device", type=str, default="cuda", required=False,
                        help="'cuda' (GPU), 'cpu' or 'mps'. Use CUDA_VISIBLE_DEVICES to pick a GPU. Default: cuda")
    parser.add_argument("--disable_progress_bar", action="store_true", required=False, default=False,
                        help="Disable progress bars.")
    parser.add_argument("--not_on_device", action="store_true", required=False, default=False,
                        help="Keep the sliding-window results on the CPU even with a GPU (for cases too large for "
                             "its memory).")
    # --- additions
    parser.add_argument("--enable_tta", action="store_true", default=False,
                        help="Turn test-time mirroring on (stock nnU-Net's default; 2^3 = 8 network passes per "
                             "patch in 3D).")
    parser.add_argument("--export", choices=("nearest", "linear"), default="nearest",
                        help="nearest: argmax at network resolution, then nearest-neighbour resampling of the label "
                             "map (paper, fastest). linear: stock nnU-Net's labels (linear resampling of class "
                             "scores, then argmax), computed slab by slab at low memory. Default: nearest")
    parser.add_argument("--combine", choices=("logits", "softmax"), default="logits",
                        help="How folds are averaged: logits (stock) or softmax probabilities. Default: logits")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="Network precision. auto: fp32 on the CPU (torch fp32's labels; the log says whether "
                             "this CPU runs bf16 natively), stock's fp16 autocast on CUDA. bf16: faster on a CPU "
                             "with AMX-BF16 or AVX512_BF16, labels move at organ boundaries. fp32 / bf16: as named, "
                             "on CPU or CUDA. Default: auto")
    parser.add_argument("--backend", choices=("auto", "torch", "openvino"), default="auto",
                        help="What runs the network. auto: OpenVINO on the CPU (the network is converted once and "
                             "cached in openvino_cache/ beside the model, or in $NSN_OPENVINO_CACHE), torch on "
                             "CUDA. Default: auto")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Every argument, before the model is loaded or anything is written."""
    if not os.path.isdir(args.i):
        raise NsnError(f"-i {args.i}: input folder not found")
    check_output_folder(args.o, "-o")
    args.f = validation.parse_folds(args.f, "-f")
    if args.enable_tta and args.disable_tta:
        raise NsnError("--enable_tta and --disable_tta contradict each other; give one")
    if not 0 < args.step_size <= 1:
        raise NsnError(f"-step_size {args.step_size}: must be in (0, 1]")
    validation.parts(args.num_parts, args.part_id, "-num_parts", "-part_id")
    if args.device not in ("cpu", "cuda", "mps"):
        raise NsnError(f"-device {args.device}: must be cpu, cuda or mps")
    # 0 is a meaningful value here, not a mistake: stock nnUNetv2_predict runs sequentially (no worker
    # processes) with -npp 0 -nps 0, and this command keeps that meaning for each on its own (0 preprocessing
    # threads: preprocess inline; 0 export threads: export inline). Only negative counts are refused.
    if args.npp is None:
        args.npp = default_preprocessing_workers()
    validation.at_least(args.npp, "-npp", 0, "preprocessing threads; 0 = inline")
    validation.at_least(args.nps, "-nps", 0, "export threads; 0 = inline")
    if args.prev_stage_predictions is not None and not os.path.isdir(args.prev_stage_predictions):
        raise NsnError(f"-prev_stage_predictions {args.prev_stage_predictions}: folder not found")


def _model_folder(args: argparse.Namespace) -> str:
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    if not os.environ.get("nnUNet_results"):
        raise NsnError("environment variable nnUNet_results is not set (it locates the model for -d/-tr/-p/-c)")
    try:
        folder = get_output_folder(args.d, args.tr, args.p, args.c)
    except (RuntimeError, ValueError) as error:
        raise NsnError(f"-d {args.d}: {str(error).splitlines()[0]}") from None
    if not os.path.isdir(folder):
        raise NsnError(f"model folder not found: {folder} (check -d, -tr, -p, -c)")
    for fold in args.f:
        checkpoint = os.path.join(folder, f"fold_{fold}", args.chk)
        if not os.path.isfile(checkpoint):
            raise NsnError(f"-f {fold}: checkpoint not found: {checkpoint}")
    return folder


def failed_file(output_folder: str, num_parts: int, part_id: int) -> str:
    """Where a run lists its failed cases: one file per part, so that parts sharing a folder do not collide."""
    name = ".failed.json" if num_parts == 1 else f".failed.part{part_id}of{num_parts}.json"
    return os.path.join(output_folder, name)


def _record_failures(args: argparse.Namespace, failures: dict[str, str]) -> str | None:
    """Write (or, after a clean run, remove) this part's list of failed cases; returns its path if written."""
    path = failed_file(args.o, args.num_parts, args.part_id)
    if not failures:
        if os.path.isfile(path):
            os.remove(path)
        return None
    document = {"failed": dict(sorted(failures.items())),
                "rerun": "fix or remove these inputs and rerun with --continue_prediction: only cases without an "
                         "output are predicted"}
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    return path


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    model_folder = _model_folder(args)

    import torch

    from noisy_student_nnunet.inference import LowFootprintPredictor
    from noisy_student_nnunet.cpu_threads import cpu_thread_count

    if args.device == "cpu":
        torch.set_num_threads(cpu_thread_count())
        device = torch.device("cpu")
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            raise NsnError("-device cuda: no CUDA device is available; use -device cpu")
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        device = torch.device("cuda")
    else:
        device = torch.device("mps")

    if args.precision == "bf16" and device.type not in ("cpu", "cuda"):
        raise NsnError(f"--precision bf16: supported on cpu and cuda, not {device.type}")
    from noisy_student_nnunet.inference.backend import choose_backend

    choose_backend(args.backend, device)  # an impossible choice fails before the model is loaded
    os.makedirs(args.o, exist_ok=True)
    predictor = LowFootprintPredictor(
        tile_step_size=args.step_size,
        use_gaussian=True,
        use_mirroring=args.enable_tta,
        perform_everything_on_device=not args.not_on_device,
        device=device,
        verbose=args.verbose,
        verbose_preprocessing=args.verbose,
        allow_tqdm=not args.disable_progress_bar,
        export_mode=args.export,
        fold_combination=args.combine,
        precision=args.precision,
        backend=args.backend,
    )
    predictor.initialize_from_trained_model_folder(model_folder, args.f, checkpoint_name=args.chk)
    from noisy_student_nnunet.inference import FailedCases

    try:
        predictor.predict_from_files(
            args.i, args.o,
            save_probabilities=args.save_probabilities,
            overwrite=not args.continue_prediction,
            num_processes_preprocessing=args.npp,
            num_processes_segmentation_export=args.nps,
            folder_with_segs_from_prev_stage=args.prev_stage_predictions,
            num_parts=args.num_parts,
            part_id=args.part_id,
        )
    except WriteFailed as error:  # disk full: the next cases would fail alike; stop, --continue_prediction resumes
        ending = predictor.dataset_json["file_ending"]
        name = error.path.name
        case = next((name[:-len(s)] for s in (ending, ".npz", ".pkl") if name.endswith(s)), None)
        if case is not None:  # not a case's file (the folder's dataset.json or plans.json): no case to list
            try:
                _record_failures(args, {**predictor.failed_cases, case: error.cause + "; free space and rerun with "
                                        "--continue_prediction"})
            except (WriteFailed, OSError):
                pass  # the list is a courtesy; the error line below names the file either way
        raise
    except FailedCases as failed:
        listed = _record_failures(args, failed.failures)
        print(f"{PROG}: {len(failed.failures)} case(s) failed and were skipped (no output written for them; "
              f"listed in {listed}); the other cases are done. Fix or remove the inputs and rerun with "
              f"--continue_prediction to retry only these:", file=sys.stderr)
        for case, why in sorted(failed.failures.items()):
            print(f"  {case}: {why}", file=sys.stderr)
        return EXIT_FAILED_CASES
    _record_failures(args, {})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
