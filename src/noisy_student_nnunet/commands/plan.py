"""``nsn plan``: derive the low-footprint plans (half-width 3d_fullres U-Net) from a dataset's stock plans."""

from __future__ import annotations

import argparse
import os

DESCRIPTION = """\
Write $nnUNet_preprocessed/DatasetXXX_Name/<plans-name>.json: nnU-Net's 3d_fullres configuration with
the recipe's base width (features min(cap, base*2**i) per stage), batch size and patch (or nnU-Net's
planner heuristics where the recipe leaves the patch open), the topology recomputed for that patch with
nnU-Net's get_pool_and_conv_props, and the recipe stored in the plans for the trainers. The stock plans
are produced first (fingerprint, planning, 3d_fullres preprocessing) when missing. Spacing and
normalisation are unchanged, so the preprocessed data of the stock plans is reused; it is preprocessed
only when missing. Train with: nnUNetv2_train DATASET 3d_fullres FOLD -tr NoisyStudentTeacherTrainer
-p nnUNetLowFootprintPlans
"""


#: the recipe `nsn plan` writes when told nothing, and the base a partial --recipe file is laid over
#: when the dataset has no plans yet
DEFAULT_RECIPE = "flare22"


def _default_processes() -> int:
    # nnU-Net's default (nnUNet_def_n_proc), without importing nnunetv2
    return int(os.environ.get("nnUNet_def_n_proc", 8))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="derive nnUNetLowFootprintPlans (half-width 3d_fullres) from the stock plans",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-d", dest="dataset", required=True, metavar="DATASET",
                        help="dataset id or name (DatasetXXX_Name)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help="bundled recipe name (flare22, tiny, demo) or path to a recipe JSON, whole or partial "
                             "(default: flare22). Its keys are laid over the recipe already in the plans (a "
                             "re-plan keeps what the file does not name, the recorded pseudo-labeled dataset "
                             "included), or over flare22 when there are no plans yet")
    parser.add_argument("-pl", dest="planner", default="ExperimentPlanner",
                        help="nnU-Net experiment planner for the stock plans and the patch heuristics "
                             "(default: ExperimentPlanner)")
    parser.add_argument("--plans-name", dest="plans_name", default="nnUNetLowFootprintPlans",
                        help="name of the plans written (default: nnUNetLowFootprintPlans)")
    parser.add_argument("-np", dest="num_processes", type=int, default=_default_processes(),
                        help="processes for fingerprinting/preprocessing when needed (default: nnUNet_def_n_proc or 8)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noisy_student_nnunet.errors import NsnError
    from noisy_student_nnunet.plans import CONFIGURATION, plan_dataset
    from noisy_student_nnunet.plans import planned_recipe
    from noisy_student_nnunet.recipe import changed_keys, load_recipe, override_recipe
    import json

    if args.num_processes < 1:
        raise NsnError(f"-np must be at least 1, got {args.num_processes}")
    base, plans_file = planned_recipe(args.dataset, args.plans_name)
    base_origin = f"the recipe in {plans_file}"
    if base is None:  # first plan: the default recipe is the base, as `nsn plan` alone would write it
        base, base_origin = load_recipe(DEFAULT_RECIPE), f"bundled {DEFAULT_RECIPE}"
    recipe = override_recipe(base, args.recipe, f"--recipe {args.recipe}")
    out_file = plan_dataset(args.dataset, recipe, planner_name=args.planner, plans_name=args.plans_name,
                            num_processes=args.num_processes)
    config = json.loads(out_file.read_text())["configurations"][CONFIGURATION]
    arch = config["architecture"]["arch_kwargs"]
    changed = changed_keys(base, recipe)
    print(f"wrote {out_file}")
    print(f"  recipe             {recipe['name']} (--recipe {args.recipe} over {base_origin}: "
          f"{len(changed)} key(s) changed)")
    print(f"  configuration      {CONFIGURATION} (data: {config['data_identifier']})")
    print(f"  patch size         {config['patch_size']}")
    print(f"  batch size         {config['batch_size']}")
    print(f"  features per stage {arch['features_per_stage']}")
    print(f"  strides            {arch['strides']}")
    return 0
