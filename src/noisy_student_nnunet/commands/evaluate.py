"""``nsn evaluate``: FLARE22 DSC and NSD of a prediction folder against a reference folder."""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Score predictions against references exactly as the FLARE22 challenge does: DSC and NSD per case and
organ, per-organ NSD tolerances in mm (surface Dice from DeepMind's surface-distance package), both
empty -> 1, one empty -> 0, NSD = 0 when DSC < 0.2, aorta/IVC/esophagus scored only on the reference's
labelled z-range (upper bound exclusive), spacing from the NIfTI header, values rounded to 4 decimals.
Cases are matched by file name (*.nii.gz). A missing prediction counts as empty and is reported.
Label values are read exactly: a value outside the label set (--labels) is an error naming the file and
the values (--unknown-labels-as-background counts them as background, with a warning); non-integer
values, a truncated file or prediction and reference with different shape, spacing or affine are errors.
A case with an error is named and left out; the others are scored and written; the exit status is then 1.
"""


def _default_processes() -> int:
    # nnU-Net's default (nnUNet_def_n_proc), without importing nnunetv2
    return int(os.environ.get("nnUNet_def_n_proc", 8))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="FLARE22 DSC/NSD of predictions against references",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("gt_dir", metavar="GT_DIR", help="folder of reference label maps (*.nii.gz)")
    parser.add_argument("pred_dir", metavar="PRED_DIR", help="folder of predicted label maps, same file names")
    parser.add_argument(
        "--labels",
        default="flare22",
        help="'flare22' (default: the 13 FLARE22 organs, official columns) or an nnU-Net dataset.json "
        "whose 'labels' name the structures (FLARE22 organs in it keep FLARE's tolerance and rules)",
    )
    parser.add_argument("-o", "--output", default=None, help="CSV with one row per case (official FLARE columns)")
    parser.add_argument("--summary", default=None, help="JSON with mean and std per structure and overall")
    parser.add_argument(
        "-np", dest="num_processes", type=int, default=_default_processes(),
        help="worker processes over cases (default: nnUNet_def_n_proc or 8)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=1.0,
        help="NSD tolerance in mm for labels that are not FLARE22 organs (default: 1.0, FLARE21's value)",
    )
    parser.add_argument(
        "--nsd-dsc-threshold", type=float, default=0.2,
        help="NSD is set to 0 when DSC is below this (default 0.2, the FLARE22 rule; the published FLARE22 "
        "script applies none, i.e. 0; FLARE23's applies 0.1)",
    )
    parser.add_argument(
        "--unknown-labels-as-background", dest="unknown_labels_as_background", action="store_true",
        help="count label values outside the label set as background, with a warning naming the file "
        "(default: such a case is an error and is not scored)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noisy_student_nnunet import validation
    from noisy_student_nnunet.errors import EXIT_FAILED_CASES
    from noisy_student_nnunet.evaluation import evaluate_folders, resolve_labels, write_csv, write_summary
    from noisy_student_nnunet.outputs import check_output_file

    validation.at_least(args.num_processes, "-np", 1, "worker processes")
    validation.positive(args.tolerance, "--tolerance")
    validation.number_in(args.nsd_dsc_threshold, "--nsd-dsc-threshold (a DSC)", 0.0, 1.0)
    for option, path in (("-o", args.output), ("--summary", args.summary)):
        if path:
            check_output_file(path, option)
    specs = resolve_labels(args.labels, args.tolerance)
    result = evaluate_folders(
        args.gt_dir, args.pred_dir, specs, args.num_processes, args.nsd_dsc_threshold, progress=True,
        unknown_labels_as_background=args.unknown_labels_as_background, skip_failed=True,
    )
    if args.output:
        write_csv(result, args.output)
    if args.summary:
        write_summary(result, args.summary)
    print(result.table())
    if result.missing_predictions:
        print(
            f"{len(result.missing_predictions)} case(s) without prediction, scored as empty: "
            + ", ".join(result.missing_predictions),
            file=sys.stderr,
        )
    if result.unmatched_predictions:
        print(
            f"{len(result.unmatched_predictions)} prediction(s) without reference, ignored: "
            + ", ".join(result.unmatched_predictions),
            file=sys.stderr,
        )
    undefined = result.nan_entries()
    if undefined:
        print(
            "undefined (reference labels the structure on one slice only, so its z-range [min, max) is empty; "
            "left out of the means): " + ", ".join(undefined),
            file=sys.stderr,
        )
    if result.failed:
        print(
            f"nsn evaluate: {len(result.failed)} of {len(result.failed) + len(result.cases)} case(s) failed and are "
            "not scored (left out of the table, the CSV and the means"
            + (f"; listed in {args.summary} under failed_cases" if args.summary else "") + "):",
            file=sys.stderr,
        )
        for name, reason in result.failed.items():
            print(f"  {name}: {reason}", file=sys.stderr)
        return EXIT_FAILED_CASES
    return 0
