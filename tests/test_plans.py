"""``nsn plan``: half-width 3d_fullres plans derived from stock plans on phantoms; errors leave nothing behind."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.plans import (derive_lowfootprint_plans, features_per_stage, planner_patch_size,
                                        write_json_atomic)
from noisy_student_nnunet.recipe import PLANS_KEY, load_recipe


def _load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _network(plans: dict, num_classes: int, deep_supervision: bool = False) -> torch.nn.Module:
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  1, num_classes, allow_init=True, deep_supervision=deep_supervision)


@pytest.fixture()
def in_process_env(nnunet_env, monkeypatch):
    """nnU-Net's folders in this process (nnunetv2.paths reads the environment at each use)."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, nnunet_env[var])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # nnU-Net's planner alone would crash on this value


def _check_topology(config: dict) -> None:
    """Topology is nnU-Net's for the patch, with list lengths consistent with n_stages."""
    arch = config["architecture"]["arch_kwargs"]
    _, strides, kernels, padded, _ = get_pool_and_conv_props(config["spacing"], config["patch_size"], 4, 999999)
    assert arch["strides"] == [list(s) for s in strides]
    assert arch["kernel_sizes"] == [list(k) for k in kernels]
    assert list(padded) == config["patch_size"]  # the patch is usable as is
    n = arch["n_stages"]
    assert len(arch["strides"]) == len(arch["kernel_sizes"]) == len(arch["features_per_stage"]) == n
    assert len(arch["n_conv_per_stage"]) == n and len(arch["n_conv_per_stage_decoder"]) == n - 1


def test_tiny_plans_on_phantoms(lowfootprint_plans, phantom_dataset):
    plans = _load(lowfootprint_plans)
    stock = _load(lowfootprint_plans.with_name("nnUNetPlans.json"))
    tiny = load_recipe("tiny")
    assert plans["plans_name"] == "nnUNetLowFootprintPlans"
    assert list(plans["configurations"]) == ["3d_fullres"]
    config, stock_config = plans["configurations"]["3d_fullres"], stock["configurations"]["3d_fullres"]
    arch = config["architecture"]
    assert arch["network_class_name"] == "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    n = arch["arch_kwargs"]["n_stages"]
    assert arch["arch_kwargs"]["features_per_stage"] == [min(32, 4 * 2 ** i) for i in range(n)]
    assert config["batch_size"] == 4 and config["patch_size"] == [24, 64, 64]
    _check_topology(config)
    # preprocessing unchanged -> the stock data is reused
    for key in ("data_identifier", "spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                "resampling_fn_data_kwargs"):
        assert config[key] == stock_config[key], key
    for key in ("transpose_forward", "foreground_intensity_properties_per_channel"):
        assert plans[key] == stock[key], key
    assert (lowfootprint_plans.parent / config["data_identifier"]).is_dir()
    assert plans[PLANS_KEY] == tiny

    # the network builds from the plans and runs a forward pass on one patch (with deep supervision)
    net = _network(plans, num_classes=14, deep_supervision=True)
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, *config["patch_size"]))
    assert tuple(outputs[0].shape) == (1, 14, *config["patch_size"])
    assert len(outputs) == n - 1


def test_flare22_recipe_gives_half_width_capped_at_320(phantom_dataset, lowfootprint_plans, in_process_env,
                                                       capsys):
    """The paper's network (base 16, cap 320, batch 4, 40x224x192) on the phantoms' spacing."""
    from noisy_student_nnunet.cli import main

    dataset_id, _ = phantom_dataset
    assert main(["plan", "-d", str(dataset_id), "--recipe", "flare22", "--plans-name", "LowFootprintFlare22"]) == 0
    path = lowfootprint_plans.with_name("LowFootprintFlare22.json")
    out = capsys.readouterr().out
    assert str(path) in out and "[16, 32, 64, 128, 256, 320" in out
    plans, stock = _load(path), _load(lowfootprint_plans.with_name("nnUNetPlans.json"))
    config = plans["configurations"]["3d_fullres"]
    features = config["architecture"]["arch_kwargs"]["features_per_stage"]
    assert features == [min(320, 16 * 2 ** i) for i in range(len(features))]
    assert features[:6] == [16, 32, 64, 128, 256, 320]
    assert config["batch_size"] == 4 and config["patch_size"] == [40, 224, 192]
    _check_topology(config)
    assert config["data_identifier"] == stock["configurations"]["3d_fullres"]["data_identifier"]

    half = _network(plans, num_classes=14)
    stock_width = copy.deepcopy(plans)
    stock_width["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = \
        list(features_per_stage(len(features), 32, 320))
    full = _network(stock_width, num_classes=14)
    n_half, n_full = (sum(p.numel() for p in m.parameters()) for m in (half, full))
    assert n_half < 0.6 * n_full
    half.eval()
    with torch.no_grad():
        out = half(torch.zeros(1, 1, 40, 224, 192))
    assert tuple(out.shape) == (1, 14, 40, 224, 192)


def test_replanning_reuses_preprocessed_data(phantom_dataset, lowfootprint_plans, in_process_env, capsys):
    from noisy_student_nnunet.cli import main

    dataset_id, _ = phantom_dataset
    data = lowfootprint_plans.parent / _load(lowfootprint_plans)["configurations"]["3d_fullres"]["data_identifier"]
    before = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    folders_before = sorted(p.name for p in lowfootprint_plans.parent.iterdir() if p.is_dir())
    capsys.readouterr()
    assert main(["plan", "-d", f"Dataset{dataset_id:03d}_Phantoms", "--recipe", "tiny",
                 "--plans-name", "TinyAgain"]) == 0
    assert "preprocessing" not in capsys.readouterr().out.lower()
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == before
    assert sorted(p.name for p in lowfootprint_plans.parent.iterdir() if p.is_dir()) == folders_before
    again = _load(lowfootprint_plans.with_name("TinyAgain.json"))
    original = _load(lowfootprint_plans)
    assert again["plans_name"] == "TinyAgain"
    again["plans_name"] = original["plans_name"]
    assert again == original


def _bad_patch_recipe(tmp_path: Path) -> Path:
    recipe = load_recipe("tiny")
    recipe["network"]["patch_size"] = [25, 64, 64]
    path = tmp_path / "bad_patch.json"
    path.write_text(json.dumps(recipe))
    return path


def test_console_error_is_one_line_and_writes_nothing(phantom_dataset, lowfootprint_plans, run_cli, tmp_path):
    dataset_id, _ = phantom_dataset
    listing = sorted(p.name for p in lowfootprint_plans.parent.iterdir())
    done = run_cli(["nsn", "plan", "-d", dataset_id, "--recipe", _bad_patch_recipe(tmp_path),
                    "--plans-name", "NeverWritten"], check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "nsn plan: error: recipe key 'network.patch_size' [25, 64, 64] is not divisible by [4, 16, 16] "
        "(nnU-Net's pooling for spacing " + str(_load(lowfootprint_plans)["configurations"]["3d_fullres"]["spacing"])
        + "); nnU-Net would use [28, 64, 64]"]
    assert sorted(p.name for p in lowfootprint_plans.parent.iterdir()) == listing


@pytest.mark.parametrize("args, message", [
    (["--recipe", "nosuchrecipe"], "recipe file not found: nosuchrecipe"),
    (["-pl", "NoSuchPlanner"], "-pl NoSuchPlanner: no nnU-Net experiment planner"),
    (["--plans-name", "nnUNetPlans"], "would overwrite the stock plans"),
    (["-np", "0"], "-np must be at least 1"),
    (["-d", "987"], "dataset '987' not found"),
])
def test_errors_are_one_line_and_write_nothing(phantom_dataset, lowfootprint_plans, in_process_env, capsys, args,
                                               message):
    from noisy_student_nnunet.cli import main

    dataset_id, _ = phantom_dataset
    folder = lowfootprint_plans.parent
    stock_before = lowfootprint_plans.with_name("nnUNetPlans.json").read_bytes()
    listing = sorted(p.name for p in folder.iterdir())
    dataset = [] if "-d" in args else ["-d", str(dataset_id)]
    plans_name = [] if "--plans-name" in args else ["--plans-name", "NeverWritten"]
    capsys.readouterr()
    assert main(["plan", *dataset, *plans_name, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nsn plan: error:") and message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in folder.iterdir()) == listing
    assert lowfootprint_plans.with_name("nnUNetPlans.json").read_bytes() == stock_before


def test_planner_heuristics_when_the_recipe_leaves_the_patch_open(phantom_dataset, lowfootprint_plans,
                                                                   in_process_env):
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    dataset_id, _ = phantom_dataset
    stock = _load(lowfootprint_plans.with_name("nnUNetPlans.json"))
    stock_config = stock["configurations"]["3d_fullres"]

    # sanity: with stock width and stock's minimum batch of 2, our call reproduces stock's patch
    recipe = load_recipe("flare22")
    recipe["network"].update(patch_size=None, base_num_features=32, batch_size=2)
    recipe["student"]["pseudo_per_batch"] = 1
    assert planner_patch_size(ExperimentPlanner(dataset_id), stock, recipe) == stock_config["patch_size"]

    recipe = load_recipe("flare22")
    recipe["network"]["patch_size"] = None
    patch = planner_patch_size(ExperimentPlanner(dataset_id), stock, recipe)
    plans = derive_lowfootprint_plans(stock, recipe, "Heuristic", patch)
    config = plans["configurations"]["3d_fullres"]
    assert config["patch_size"] == patch and config["batch_size"] == 4
    _check_topology(config)
    # the patch never exceeds the (padded) median image the planner starts from
    divisible = 2 ** np.array([sum(1 for s in config["architecture"]["arch_kwargs"]["strides"] if s[a] == 2)
                               for a in range(3)])
    median = np.array(stock_config["median_image_size_in_voxels"])
    assert np.all(np.array(patch) <= np.ceil(median / divisible) * divisible)


def test_derive_is_pure_and_follows_the_width_rule():
    stock = {
        "plans_name": "nnUNetPlans", "dataset_name": "Dataset001_X",
        "configurations": {
            "2d": {"data_identifier": "nnUNetPlans_2d"},
            "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": [64, 64, 64],
                           "spacing": [1.0, 1.0, 1.0], "median_image_size_in_voxels": [300, 300, 300],
                           "architecture": {"network_class_name": "x"}},
        },
    }
    frozen = copy.deepcopy(stock)
    recipe = load_recipe("flare22")
    recipe["network"]["patch_size"] = [256, 256, 256]  # 7 stages on isotropic spacing
    plans = derive_lowfootprint_plans(stock, recipe)
    assert stock == frozen
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["features_per_stage"] == [16, 32, 64, 128, 256, 320, 320]
    assert arch["strides"][0] == [1, 1, 1] and all(s == [2, 2, 2] for s in arch["strides"][1:])
    assert list(plans["configurations"]) == ["3d_fullres"]

    with pytest.raises(NsnError, match="no '3d_fullres'"):
        derive_lowfootprint_plans({"plans_name": "p", "configurations": {"2d": {}}}, recipe)
    recipe["network"]["patch_size"] = [250, 256, 256]
    with pytest.raises(NsnError, match=r"network.patch_size' \[250, 256, 256\] is not divisible by \[64, 64, 64\]"):
        derive_lowfootprint_plans(stock, recipe)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "plans.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["plans.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_missing_preprocessed_cases_are_found_case_by_case(phantom_dataset, tmp_path):
    from noisy_student_nnunet.plans import missing_preprocessed_cases

    _, raw = phantom_dataset
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
    data = tmp_path / "nnUNetPlans_3d_fullres"
    assert missing_preprocessed_cases(data, raw) == cases  # no folder: everything
    data.mkdir()
    for case in cases:
        for suffix in (".pkl", ".b2nd", "_seg.b2nd"):
            (data / f"{case}{suffix}").touch()
    assert missing_preprocessed_cases(data, raw) == []
    (data / f"{cases[3]}_seg.b2nd").unlink()  # an interrupted preprocessing run
    assert missing_preprocessed_cases(data, raw) == [cases[3]]
    # preprocessed data without the raw dataset (cluster): an existing folder is trusted, none is an error
    assert missing_preprocessed_cases(data, None) == []
    with pytest.raises(NsnError, match="no preprocessed data"):
        missing_preprocessed_cases(tmp_path / "absent", tmp_path / "no_raw")
