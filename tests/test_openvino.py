"""``--backend openvino``: the network converted once, cached beside the model, rebuilt when damaged.

The labels are checked against torch on a real NIfTI file through the real console script; the cache's rules
(damaged, stale, where it goes) with :class:`OpenVinoRunner` on a tiny network, each a real conversion.
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

from noisy_student_nnunet.errors import NsnError  # noqa: E402
from noisy_student_nnunet.inference import LowFootprintPredictor  # noqa: E402
from noisy_student_nnunet.inference.backend import choose_backend  # noqa: E402
from noisy_student_nnunet.inference.openvino_backend import CACHE_FOLDER, ENV_CACHE, OpenVinoRunner  # noqa: E402

pytest.importorskip("openvino")

BIN = Path(sys.executable).parent
DATASET = "Dataset987_OpenVino"
MODEL = f"nnUNetTrainer__nnUNetPlans__{mf.CONFIGURATION}"


def dice_per_organ(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    return {int(c): float(2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()))
            for c in np.union1d(np.unique(a), np.unique(b)) if c != 0}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """A tiny random-weight model (confident heads: several organs win somewhere) and one CT-like NIfTI."""
    root = tmp_path_factory.mktemp("openvino")
    plans = mf.make_plans([3.0, 1.6, 1.6], [32, 64, 64], dataset_name=DATASET)
    folder = mf.results_model_folder(root / "results", plans, head_scale=5.0, head_bias_std=1.0)
    image = mf.write_ct_image(root / "in" / "case_0000.nii.gz", (30, 80, 72), (0.8, 0.8, 1.5), seed=3)
    env = {k: v for k, v in os.environ.items() if k not in ("NSN_CPU_BF16", ENV_CACHE)}
    env.update(nnUNet_results=str(root / "results"), nnUNet_raw=str(root / "raw"),
               nnUNet_preprocessed=str(root / "preprocessed"), nnUNet_compile="0", OMP_NUM_THREADS="1")
    return {"root": root, "folder": folder, "image": image, "env": env}


def _predict(model: dict, out: Path, *extra: str) -> tuple[str, np.ndarray]:
    done = subprocess.run([str(BIN / "nnUNetv2_predict_lowfootprint"), "-i", str(model["image"].parent), "-o",
                           str(out), "-d", DATASET, "-c", mf.CONFIGURATION, "-f", "0", "-device", "cpu",
                           "--disable_progress_bar", *extra], env=model["env"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz")))


def test_openvino_labels_match_torch_and_a_second_run_reuses_the_cache(model, tmp_path):
    log, first = _predict(model, tmp_path / "first", "--backend", "openvino", "--precision", "fp32")
    assert "backend openvino: asked for" in log
    assert "converting the network for input 1x1x32x64x64, precision fp32" in log and "conversion took" in log
    entries = list((model["folder"] / CACHE_FOLDER).iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file(), entries
    made = {p.name: p.stat().st_mtime_ns for p in entries[0].iterdir()}

    log, second = _predict(model, tmp_path / "second", "--backend", "openvino", "--precision", "fp32")
    assert "converting" not in log and "compiled in" in log  # read from the cache, only compiled
    assert {p.name: p.stat().st_mtime_ns for p in entries[0].iterdir()} == made
    np.testing.assert_array_equal(second, first)

    # torch fp32 on the same file, in this process (the reference, not the thing tested): the same logits up to
    # fp32 rounding, so the same labels but at near-ties, which random weights have everywhere (the Dice >= 0.997
    # per organ guard is on a trained model: test_precision.py)
    predictors = {}
    for backend in ("torch", "openvino"):
        predictors[backend] = LowFootprintPredictor(device=torch.device("cpu"), allow_tqdm=False, precision="fp32",
                                                    backend=backend)
        predictors[backend].initialize_from_trained_model_folder(str(model["folder"]), (0,))
    reference = predictors["torch"].predict_from_files([[str(model["image"])]], None, num_processes_preprocessing=0,
                                                       num_processes_segmentation_export=0)[0]
    dice = dice_per_organ(first, reference)
    assert len(dice) >= 5, dice
    assert min(dice.values()) >= 0.99, dice
    assert (first == reference).mean() >= 0.999
    data = torch.randn(1, 40, 70, 66)  # 2 x 2 x 2 patches, overlapping
    logits = {name: p.predict_logits_from_preprocessed_data(data).float() for name, p in predictors.items()}
    assert (logits["openvino"] - logits["torch"]).abs().max() <= 0.02 * logits["torch"].abs().max()  # fp16 sums


# --- the cache, on a tiny network ------------------------------------------------------------------------------


def _tiny_network() -> torch.nn.Module:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = mf.make_plans([2.0, 1.0, 1.0], [8, 16, 16], mf.tiny_architecture((2, 4)))
    pm = PlansManager(plans)
    torch.manual_seed(7)
    return nnUNetTrainer.build_network_architecture(pm, pm.get_configuration(mf.CONFIGURATION), 1, 3,
                                                    enable_deep_supervision=False).eval()


SHAPE = (1, 1, 8, 16, 16)


def _run(folder: Path | None, network: torch.nn.Module, x: torch.Tensor, capsys) -> tuple[torch.Tensor, str]:
    out = OpenVinoRunner(SHAPE, "fp32", folder, threads=1)(network, x)
    return out, capsys.readouterr().out


def test_a_damaged_or_stale_cache_is_rebuilt(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ENV_CACHE, raising=False)
    network, x = _tiny_network(), torch.randn(SHAPE)
    with torch.no_grad():
        reference = network(x)
    out, log = _run(tmp_path, network, x, capsys)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    assert "conversion took" in log
    (entry,) = (tmp_path / CACHE_FOLDER).iterdir()

    # bytes flipped in the weights: detected by the checksum, rebuilt, same result
    data = bytearray((entry / "model.bin").read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8
    (entry / "model.bin").write_bytes(bytes(data))
    out, log = _run(tmp_path, network, x, capsys)
    assert "model.bin does not match its recorded checksum; rebuilding" in log and "conversion took" in log
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)

    # a truncated description and a lost meta.json: rebuilt
    (entry / "model.xml").write_text((entry / "model.xml").read_text()[:100])
    _, log = _run(tmp_path, network, x, capsys)
    assert "model.xml does not match" in log and "conversion took" in log
    (entry / "meta.json").unlink()
    _, log = _run(tmp_path, network, x, capsys)
    assert "meta.json unreadable" in log and "conversion took" in log

    # stale: made by another OpenVINO version
    meta = json.loads((entry / "meta.json").read_text())
    meta["key"]["openvino"] = "0.0.0"
    (entry / "meta.json").write_text(json.dumps(meta))
    _, log = _run(tmp_path, network, x, capsys)
    assert "stale" in log and "conversion took" in log

    # intact: used as it is
    _, log = _run(tmp_path, network, x, capsys)
    assert "conversion" not in log and "not usable" not in log
    assert [p.name for p in (tmp_path / CACHE_FOLDER).iterdir()] == [entry.name]  # no temporary left behind

    # other weights (another fold or checkpoint): another entry
    with torch.no_grad():
        next(network.parameters()).mul_(2)
    _, log = _run(tmp_path, network, x, capsys)
    assert "conversion took" in log and len(list((tmp_path / CACHE_FOLDER).iterdir())) == 2


def test_cache_folder_from_the_environment_or_the_user_cache_when_the_model_folder_is_not_writable(
        tmp_path, capsys, monkeypatch):
    network, x = _tiny_network(), torch.randn(SHAPE)
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "shared"))
    _run(tmp_path / "model", network, x, capsys)
    assert len(list((tmp_path / "shared").iterdir())) == 1 and not (tmp_path / "model").exists()

    monkeypatch.delenv(ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "a_file").write_text("")
    _, log = _run(tmp_path / "a_file" / "model", network, x, capsys)  # cannot be created: below a file
    assert len(list((tmp_path / "xdg" / "noisy_student_nnunet" / "openvino").iterdir())) == 1, log


def test_auto_is_openvino_on_the_cpu_and_torch_on_cuda():
    assert choose_backend("auto", "cpu").name == "openvino"
    assert choose_backend("auto", "cuda").name == "torch"
    assert choose_backend("torch", "cpu").name == "torch"
    with pytest.raises(NsnError, match="CPU only"):
        choose_backend("openvino", "cuda")


def test_pseudolabel_ensemble_takes_the_backend(model):
    from noisy_student_nnunet.pseudolabel.ensemble import TeacherEnsemble

    assert TeacherEnsemble(model["folder"], (0,)).predictor.backend.name == "openvino"
    assert TeacherEnsemble(model["folder"], (0,), backend="torch").predictor.backend.name == "torch"


def test_nsn_env_names_the_backend_the_precision_and_the_cpu_flags(capsys, monkeypatch):
    from noisy_student_nnunet.cli import main

    monkeypatch.setenv("NSN_CPU_BF16", "0")
    main(["env"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("# inference on cpu:"))
    assert "backend openvino" in line and "precision fp32 (auto: NSN_CPU_BF16=0 set)" in line and "CPU flags" in line


def test_each_fold_is_hashed_once_however_many_cases(tmp_path, monkeypatch):
    """Two folds, three cases: the weights are hashed once per fold (not per fold and case, as a fold switch's
    in-place copy would make the runner do), and each case still gets both folds' models (two cache entries)."""
    from noisy_student_nnunet.inference import openvino_backend

    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "cache"))
    plans = mf.make_plans([2.0, 1.0, 1.0], [8, 16, 16], mf.tiny_architecture((2, 4)), dataset_name=DATASET)
    folder = mf.build_model_folder(tmp_path / "model", plans, folds=(0, 1))
    hashed = []
    real_digest = openvino_backend.network_digest
    monkeypatch.setattr(openvino_backend, "network_digest", lambda net: hashed.append(1) or real_digest(net))
    predictor = LowFootprintPredictor(device=torch.device("cpu"), allow_tqdm=False, precision="fp32",
                                      backend="openvino")
    predictor.initialize_from_trained_model_folder(str(folder), (0, 1))
    torch.manual_seed(0)
    outputs = [predictor.predict_logits_from_preprocessed_data(torch.randn(1, 10, 20, 18)) for _ in range(3)]
    assert len(hashed) == 2, len(hashed)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    # the fold average is right: the torch backend on the last case gives the same logits (fp16 sums)
    reference = LowFootprintPredictor(device=torch.device("cpu"), allow_tqdm=False, precision="fp32")
    reference.initialize_from_trained_model_folder(str(folder), (0, 1))
    torch.manual_seed(0)
    for _ in range(3):
        data = torch.randn(1, 10, 20, 18)
    expected = reference.predict_logits_from_preprocessed_data(data).float()
    assert (outputs[-1].float() - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_compiled_precision_names_what_openvino_runs(asked, monkeypatch):
    """The compiled model's INFERENCE_PRECISION_HINT is an ``ov.Type`` (its str is "<Type: 'bfloat16'>"): read back
    as our names, fp32 runs fp32 on every CPU, and bf16 runs bf16 exactly where the CPU has it natively (OpenVINO
    drops the hint elsewhere), so the runner warns only where the precision really changed."""
    import openvino as ov
    from openvino import opset13 as ops

    from noisy_student_nnunet.inference.openvino_backend import compile_config, compiled_precision
    from noisy_student_nnunet.inference.precision import ENV_CPU_BF16, cpu_native_bf16

    monkeypatch.delenv(ENV_CPU_BF16, raising=False)  # the CPU itself, not the NSN_CPU_BF16 imitation
    x = ops.parameter([1, 4, 8, 8], ov.Type.f32)
    weights = ops.constant(np.ones((4, 4, 3, 3), np.float32))
    model = ov.Model([ops.relu(ops.convolution(x, weights, [1, 1], [1, 1], [1, 1], [1, 1]))], [x])
    compiled = ov.Core().compile_model(model, "CPU", compile_config(asked, 1))
    expected = asked if asked == "fp32" or cpu_native_bf16()[0] else "fp32"
    assert compiled_precision(compiled) == expected
