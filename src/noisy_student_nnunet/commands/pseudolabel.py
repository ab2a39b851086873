"""``nsn pseudolabel``: pseudo-labels for the unlabeled images from the teacher ensemble (mean softmax, argmax)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Run every teacher fold on each unlabeled image, average the folds' softmax probabilities (the paper;
stock nnU-Net averages logits) and take the argmax as the hard pseudo-label. The result is an nnU-Net
raw dataset (dataset.json with the labeled dataset's labels and channels, mapping each case to its
original images; labelsTr/ with the pseudo-labels; pseudolabel_confidence.csv with per-case confidence,
fold agreement and organ volumes) and its preprocessed data made with the labeled dataset's plans. The
dataset is recorded in the labeled dataset's plans (recipe key student.pseudo_dataset), so
`nnUNetv2_train -tr NoisyStudentTrainer` finds it.

Scale out with --num-parts N --part-id K (cases[K::N], one process per GPU or node); a rerun skips
finished cases. When the last case of all parts is done, the final step runs by itself (dataset.json,
preprocessed data, filter, plans); run it explicitly with --finalize (for example to change the filter).
Exit status: 0 when every case succeeded, 1 when some failed (named on stderr), 2 on a usage error.
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pseudolabel",
        help="pseudo-label unlabeled images with the teacher ensemble (sharded, resumable)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-d", dest="dataset", required=True, metavar="DATASET",
                        help="labeled dataset the teachers were trained on (id or DatasetXXX_Name)")
    parser.add_argument("-i", dest="images", required=True, metavar="FOLDER",
                        help="unlabeled images, nnU-Net naming (CASE_0000.nii.gz, ...)")
    parser.add_argument("-o", dest="output", default=None, metavar="NAME_OR_ID",
                        help="output dataset (id or DatasetYYY_Name; default: continue the dataset made before "
                             "with the same settings, else the next free id)")
    parser.add_argument("-f", dest="folds", nargs="+", default=["0", "1", "2", "3", "4"],
                        help="teacher folds (default: 0 1 2 3 4)")
    parser.add_argument("-tr", dest="trainer", default="NoisyStudentTeacherTrainer",
                        help="teacher trainer (default: NoisyStudentTeacherTrainer)")
    parser.add_argument("-p", dest="plans", default="nnUNetLowFootprintPlans",
                        help="plans identifier (default: nnUNetLowFootprintPlans)")
    parser.add_argument("--student-plans", default=None,
                        help="plans of the student in which to record the dataset (default: -p); later rounds of "
                             "iterated pseudo-labeling give the student plans of its own name")
    parser.add_argument("-c", dest="configuration", default="3d_fullres", help="configuration (default: 3d_fullres)")
    parser.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth",
                        help="checkpoint name (default: checkpoint_final.pth)")
    parser.add_argument("--num-parts", "-num_parts", dest="num_parts", type=int, default=1,
                        help="split the cases into this many parts (default: 1)")
    parser.add_argument("--part-id", "-part_id", dest="part_id", type=int, default=0,
                        help="which part this process does, 0-based (default: 0)")
    parser.add_argument("--finalize", action="store_true",
                        help="only run the final step (all parts must be done; failed cases are left out)")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--keep-top", dest="keep_top", type=float, default=None, metavar="FRACTION",
                        help="keep only this fraction of most confident cases (default: all, as the paper)")
    choice.add_argument("--min-confidence", dest="min_confidence", type=float, default=None, metavar="X",
                        help="keep only cases whose confidence (mean max-probability over predicted "
                             "foreground) is at least X")
    parser.add_argument("--ignore-below", dest="ignore_below", type=float, default=None, metavar="T",
                        help="mark voxels whose ensemble max-probability is below T with nnU-Net's ignore label")
    parser.add_argument("--stock-preprocessing", dest="stock_preprocessing", action="store_true",
                        help="preprocess the exported pseudo-labels with nnU-Net's preprocessor instead of writing "
                             "the student's preprocessed data directly from the teacher's grid")
    parser.add_argument("-device", dest="device", default=None, choices=["cuda", "cpu"],
                        help="device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="network precision: auto = fp32 on the CPU, fp16 on CUDA; bf16 is faster on a CPU "
                             "with native bf16 (AMX-BF16/AVX512_BF16) (default: auto)")
    parser.add_argument("--backend", choices=["auto", "torch", "openvino"], default="auto",
                        help="what runs the network: auto = OpenVINO on the CPU (converted once per teacher fold and "
                             "cached beside the model or in $NSN_OPENVINO_CACHE), torch on CUDA (default: auto)")
    parser.add_argument("--enable-tta", dest="enable_tta", action="store_true",
                        help="mirroring test-time augmentation (off by default: low-footprint inference)")
    parser.add_argument("-step_size", dest="step_size", type=float, default=0.5,
                        help="sliding-window step as a fraction of the patch (default: 0.5)")
    parser.add_argument("-np", dest="num_processes", type=int, default=2,
                        help="processes for --stock-preprocessing (default: 2)")
    parser.add_argument("--disable_progress_bar", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noisy_student_nnunet.errors import NsnError
    from noisy_student_nnunet import validation
    from noisy_student_nnunet.pseudolabel.run import PseudolabelSettings, check_filter, finalize, run_part

    # every option before any work: the filter is applied only after the whole ensemble has run
    if not 0.0 < args.step_size <= 1.0:
        raise NsnError(f"-step_size must be in (0, 1], got {args.step_size}")
    validation.parts(args.num_parts, args.part_id, "--num-parts", "--part-id")
    validation.at_least(args.num_processes, "-np", 1, "processes for --stock-preprocessing")
    check_filter(args.keep_top, args.min_confidence)
    settings = PseudolabelSettings(
        labeled_dataset=args.dataset, images_dir=args.images, folds=args.folds, trainer=args.trainer,
        plans=args.plans, student_plans=args.student_plans, configuration=args.configuration,
        checkpoint=args.checkpoint,
        enable_tta=args.enable_tta, ignore_below=args.ignore_below,
        direct_preprocessed=not args.stock_preprocessing, tile_step_size=args.step_size, precision=args.precision,
        backend=args.backend)
    if args.finalize:
        result = finalize(settings, output=args.output, keep_top=args.keep_top, min_confidence=args.min_confidence,
                          num_processes=args.num_processes)
        _print_finalized(result)
        return 1 if result.excluded_failed else 0

    import torch

    from noisy_student_nnunet.pseudolabel.ensemble import set_torch_threads

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise NsnError("-device cuda: no CUDA device available (use -device cpu)")
    from noisy_student_nnunet.inference.backend import choose_backend

    choose_backend(args.backend, device)  # an impossible choice fails before any work
    set_torch_threads(torch.device(device))
    part = run_part(settings, output=args.output, num_parts=args.num_parts, part_id=args.part_id, device=device,
                    progress=not args.disable_progress_bar, keep_top=args.keep_top,
                    min_confidence=args.min_confidence, num_processes=args.num_processes)
    print(f"{part.dataset}: part {args.part_id}/{args.num_parts}: {len(part.done)} pseudo-labeled, "
          f"{len(part.skipped)} already done, {len(part.failed)} failed")
    for case, message in sorted(part.failed.items()):
        print(f"  failed {case}: {message}", file=sys.stderr)
    if part.finalized is not None:
        _print_finalized(part.finalized)
    elif not part.failed:
        print("  other parts still running or to run: the last one to finish writes the dataset "
              "(or run with --finalize)")
    else:
        print("  not finalized: fix or remove the failed cases and rerun, or run with --finalize to leave them out")
    return 1 if part.failed else 0


def _print_finalized(result) -> None:
    print(f"finalized {result.dataset}: {len(result.kept)} of {result.cases} cases kept"
          + (f", {len(result.excluded_failed)} failed left out" if result.excluded_failed else ""))
    print(f"  preprocessed: {result.preprocessed}")
    if result.recorded_in is not None:
        print(f"  recorded as student.pseudo_dataset in {result.recorded_in}")
