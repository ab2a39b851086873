"""The prediction process imports neither torch._dynamo nor every nnU-Net trainer (RAM and start-up).

Stock's predictor module imports ``torch._dynamo`` (158 MB, 2.7 s with triton and sympy) and its model loading
imports every trainer module to find one class (198 MB, 3.3 s). :mod:`noisy_student_nnunet.inference.lazy_dynamo`
and :mod:`noisy_student_nnunet.inference.model_loading` keep both out; these tests check that they do, that
compiling still works, and that the networks are stock's. Each import check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).parent))
import model_folders as mf  # noqa: E402

from noisy_student_nnunet.inference.model_loading import PLANS_NETWORK_TRAINERS, build_network  # noqa: E402


def _python(code: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last, returned parsed."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_stock_predictor_module_loads_without_torch_dynamo_and_compiling_still_works():
    result = _python("""
import json, sys, torch
import noisy_student_nnunet.inference
import nnunetv2.inference.predict_from_raw_data as stock
before = "torch._dynamo.eval_frame" in sys.modules
net = torch.nn.Conv3d(1, 2, 3)
plain = isinstance(net, stock.OptimizedModule)
compiled = torch.compile(net, backend="eager")
x = torch.randn(1, 1, 6, 6, 6)
same = bool(torch.equal(compiled(x), net(x)))
import torch._dynamo.eval_frame as eval_frame, torch._dynamo.utils as utils
print(json.dumps({"before": before, "plain": plain, "compiled": isinstance(compiled, stock.OptimizedModule),
                  "same": same, "real_class": type(compiled) is eval_frame.OptimizedModule,
                  "one_package": sys.modules["torch._dynamo"] is torch._dynamo and torch._dynamo.utils is utils,
                  "reset": callable(torch._dynamo.reset)}))
""")
    assert result == {"before": False, "plain": False, "compiled": True, "same": True, "real_class": True,
                      "one_package": True, "reset": True}


def test_a_process_that_imported_torch_dynamo_keeps_the_real_one():
    result = _python("""
import json, torch._dynamo
from noisy_student_nnunet.inference.lazy_dynamo import defer_dynamo_import
import nnunetv2.inference.predict_from_raw_data as stock
print(json.dumps({"installed": defer_dynamo_import(), "real": stock.OptimizedModule is torch._dynamo.OptimizedModule}))
""")
    assert result == {"installed": False, "real": True}


@pytest.mark.parametrize("trainer", sorted(PLANS_NETWORK_TRAINERS))
def test_trainers_built_from_the_plans_keep_nnunet_trainers_network(trainer):
    """The fast path builds nnUNetTrainer's network for these names: each must not override its builder."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import noisy_student_nnunet.trainers as ours

    cls = nnUNetTrainer if trainer == "nnUNetTrainer" else getattr(ours, trainer)
    assert cls.build_network_architecture is nnUNetTrainer.build_network_architecture


def test_built_networks_equal_the_trainer_classes_networks():
    from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerBN import nnUNetTrainerBN
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    def configuration():  # fresh each time: nnUNetTrainerBN edits the configuration it is given
        plans = PlansManager(mf.make_plans([3.0, 1.6, 1.6], [32, 64, 64], dataset_name="Dataset986_Lean"))
        return plans, plans.get_configuration(mf.CONFIGURATION)

    dataset_json = mf.make_dataset_json()
    ours = build_network("NoisyStudentTrainer", *configuration(), dataset_json)
    trainer_class = nnUNetTrainer_network(*configuration())
    assert repr(ours) == repr(trainer_class) and not ours.decoder.deep_supervision
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in trainer_class.state_dict().items()]
    searched = build_network("nnUNetTrainerBN", *configuration(), dataset_json)  # through stock's search
    assert repr(searched) == repr(nnUNetTrainerBN.build_network_architecture(*configuration(), 1, mf.NUM_CLASSES,
                                                                              False))
    assert "BatchNorm3d" in repr(searched) and "InstanceNorm3d" in repr(ours)


def nnUNetTrainer_network(plans, configuration) -> torch.nn.Module:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer.build_network_architecture(plans, configuration, 1, mf.NUM_CLASSES, False)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """One random-weight model folder per trainer name: ours (fast path) and a stock variant (stock's search)."""
    root = tmp_path_factory.mktemp("lean")
    plans = mf.make_plans([3.0, 1.6, 1.6], [32, 64, 64], dataset_name="Dataset986_Lean")
    for trainer in ("NoisyStudentFinetuneTrainer", "nnUNetTrainerNoMirroring"):
        mf.results_model_folder(root / "results", plans, trainer_name=trainer, head_scale=5.0, head_bias_std=1.0)
    image = mf.write_ct_image(root / "in" / "case_0000.nii.gz", (30, 80, 72), (0.8, 0.8, 1.5), seed=3)
    env = {"nnUNet_results": str(root / "results"), "nnUNet_raw": str(root / "raw"),
           "nnUNet_preprocessed": str(root / "preprocessed"), "nnUNet_compile": "0", "OMP_NUM_THREADS": "1",
           "NSN_OPENVINO_CACHE": str(root / "ov_cache")}
    return {"root": root, "image": image, "env": env}


def test_prediction_imports_no_trainer_module_and_labels_match_stocks_search(models):
    """The CLI in a fresh process: our trainer's model loads without importing nnU-Net's trainers or
    torch._dynamo; the same weights under a stock trainer name (stock's search) give the same labels."""
    labels = {}
    for trainer in ("NoisyStudentFinetuneTrainer", "nnUNetTrainerNoMirroring"):
        out = models["root"] / f"out_{trainer}"
        result = _python(f"""
import json, sys
from noisy_student_nnunet import predict_cli
try:
    predict_cli.main(["-i", {str(models['image'].parent)!r}, "-o", {str(out)!r}, "-d", "Dataset986_Lean",
                      "-c", "3d_fullres", "-f", "0", "-tr", {trainer!r}, "-device", "cpu", "--backend", "torch",
                      "--disable_progress_bar"])
except SystemExit as stop:
    assert not stop.code, stop.code
print(json.dumps({{"trainers": sorted(m for m in sys.modules if m.startswith("nnunetv2.training.nnUNetTrainer")),
                  "dynamo": "torch._dynamo.eval_frame" in sys.modules}}))
""", models["env"])
        if trainer == "NoisyStudentFinetuneTrainer":
            assert result == {"trainers": [], "dynamo": False}
        else:
            assert "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs" in \
                result["trainers"] or len(result["trainers"]) > 10
        labels[trainer] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz")))
    ours, stock = labels.values()
    assert len(np.unique(ours)) > 2 and np.array_equal(ours, stock)
