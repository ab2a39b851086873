"""Recipes: the bundled FLARE22 recipe carries the paper's protocol; validation names the bad key."""

from __future__ import annotations

import copy
import json

import pytest

from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.recipe import ENV_VAR, PLANS_KEY, load_recipe, recipe_from_plans, validate_recipe


@pytest.fixture()
def flare22():
    return load_recipe("flare22")


def test_bundled_recipes_load():
    for name in ("flare22", "tiny"):
        recipe = load_recipe(name)
        assert recipe["name"] == name


def test_flare22_recipe_is_the_papers_protocol(flare22):
    # Table 3 and section 2.2, typed in from the paper
    net, train = flare22["network"], flare22["training"]
    assert net["base_num_features"] == 16 and net["max_num_features"] == 320
    assert net["batch_size"] == 4 and net["patch_size"] == [40, 224, 192]
    assert train["num_epochs"] == 1000
    assert train["initial_lr"] == 0.01 and train["poly_exponent"] == 0.9
    assert train["momentum"] == 0.99 and train["nesterov"] is True
    assert train["mixed_precision"] is True and train["deep_supervision"] is True
    assert flare22["student"]["labeled_per_batch"] == 1 and flare22["student"]["pseudo_per_batch"] == 3


def test_load_recipe_from_path(tmp_path, flare22):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(flare22))
    assert load_recipe(path) == flare22
    assert load_recipe(str(path)) == flare22


@pytest.mark.parametrize("mutate, key", [
    (lambda r: r["training"].__setitem__("learning_rate", 0.1), "training.learning_rate"),
    (lambda r: r.__setitem__("extra", 1), "extra"),
    (lambda r: r["teacher_augmentation"]["gamma"].__setitem__("p", 0.1), "teacher_augmentation.gamma.p"),
])
def test_unknown_key_is_named(flare22, mutate, key):
    mutate(flare22)
    with pytest.raises(NsnError, match=f"unknown recipe key '{key}'"):
        validate_recipe(flare22)


@pytest.mark.parametrize("path, value", [
    ("teacher_augmentation.gaussian_noise.p_sample", 1.5),
    ("student_augmentation.mirror.p_axis", -0.1),
    ("teacher_augmentation.rotation.angle_deg", [-200, 30]),
    ("student_augmentation.low_resolution.zoom", [0.5, 2.0]),
    ("network.batch_size", 0),
    ("training.num_epochs", 0),
    ("finetune.initial_lr", 11.0),
])
def test_out_of_range_value_is_named(flare22, path, value):
    *parents, leaf = path.split(".")
    node = flare22
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(NsnError, match=f"recipe key '{path}' is out of range"):
        validate_recipe(flare22)


@pytest.mark.parametrize("path, value, words", [
    ("network.batch_size", "4", "must be numeric"),
    ("network.batch_size", 4.0, "must be an integer"),
    ("training.nesterov", 1, "must be true or false"),
    ("network.patch_size", [40, 224], "must be a list of 3 integers"),
    ("teacher_augmentation.scaling.range", 0.7, "must be a range"),
    ("teacher_augmentation.contrast.range", [1.25, 0.75], "low <= high"),
    ("name", 3, "must be a string"),
    ("training.initial_lr", None, "must not be null"),
])
def test_wrong_type_is_named(flare22, path, value, words):
    *parents, leaf = path.split(".")
    node = flare22
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(NsnError, match=f"recipe key '{path}'.*{words}"):
        validate_recipe(flare22)


def test_missing_key_is_named(flare22):
    del flare22["student_augmentation"]["gaussian_blur"]["sigma"]
    with pytest.raises(NsnError, match="missing recipe key 'student_augmentation.gaussian_blur.sigma'"):
        validate_recipe(flare22)


def test_null_patch_means_planner_heuristics(flare22):
    flare22["network"]["patch_size"] = None
    assert validate_recipe(flare22)["network"]["patch_size"] is None


def test_batch_must_hold_the_labeled_pseudo_ratio(flare22):
    flare22["network"]["batch_size"] = 6  # 1 labeled : 3 pseudo needs a multiple of 4
    with pytest.raises(NsnError, match="network.batch_size"):
        validate_recipe(flare22)


def test_bad_files_are_errors(tmp_path):
    with pytest.raises(NsnError, match="not found: nosuchrecipe"):
        load_recipe("nosuchrecipe")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(NsnError, match="broken.json is not valid JSON"):
        load_recipe(broken)


def test_recipe_from_plans_and_env_override(tmp_path, monkeypatch, flare22):
    monkeypatch.delenv(ENV_VAR, raising=False)
    plans = {"plans_name": "nnUNetLowFootprintPlans", PLANS_KEY: copy.deepcopy(flare22)}
    assert recipe_from_plans(plans) == flare22
    with pytest.raises(NsnError, match=PLANS_KEY):
        recipe_from_plans({"plans_name": "nnUNetPlans"})

    tiny = load_recipe("tiny")
    override = tmp_path / "override.json"
    override.write_text(json.dumps(tiny))
    monkeypatch.setenv(ENV_VAR, str(override))
    assert recipe_from_plans(plans) == tiny
    monkeypatch.setenv(ENV_VAR, "tiny")
    assert recipe_from_plans({"plans_name": "nnUNetPlans"})["name"] == "tiny"

    bad = copy.deepcopy(flare22)
    bad["training"]["momentum"] = 2
    with pytest.raises(NsnError, match="training.momentum"):
        monkeypatch.delenv(ENV_VAR)
        recipe_from_plans({PLANS_KEY: bad})


# --- overrides: NSN_RECIPE and `nsn plan --recipe` lay a file's keys over the planned recipe -----------------


def test_partial_override_keeps_every_key_it_does_not_name(tmp_path, monkeypatch, flare22):
    from noisy_student_nnunet.recipe import changed_keys

    planned = copy.deepcopy(flare22)
    planned["student"]["pseudo_dataset"] = "Dataset502_Pseudo"  # as `nsn pseudolabel` records it
    override = tmp_path / "epochs.json"
    override.write_text(json.dumps({"training": {"num_epochs": 3}}))  # the file, which failed at once
    monkeypatch.setenv(ENV_VAR, str(override))
    recipe = recipe_from_plans({"plans_name": "nnUNetLowFootprintPlans", PLANS_KEY: planned})
    assert recipe["training"]["num_epochs"] == 3
    assert changed_keys(planned, recipe) == ["training.num_epochs"]
    assert recipe["student"]["pseudo_dataset"] == "Dataset502_Pseudo"


def test_a_whole_recipe_override_keeps_the_recorded_pseudo_dataset(monkeypatch, flare22):
    planned = dict(flare22, student=dict(flare22["student"], pseudo_dataset="Dataset502_Pseudo"))
    monkeypatch.setenv(ENV_VAR, "tiny")  # every bundled recipe says pseudo_dataset: null ("not recorded yet")
    recipe = recipe_from_plans({PLANS_KEY: planned})
    assert recipe == dict(load_recipe("tiny"), student=dict(load_recipe("tiny")["student"],
                                                            pseudo_dataset="Dataset502_Pseudo"))


@pytest.mark.parametrize("document, message", [
    ({"training": {"num_epoch": 3}}, "unknown recipe key 'training.num_epoch'"),
    ({"trainig": {"num_epochs": 3}}, "unknown recipe key 'trainig'"),
    ({"training": {"num_epochs": "3"}}, "recipe key 'training.num_epochs' must be numeric"),
    ({"training": {"num_epochs": 2.5}}, "recipe key 'training.num_epochs' must be an integer"),
    ({"training": 3}, "recipe key 'training' must be an object"),
    ({"training": {"optimizer": "adam"}}, "recipe key 'training.optimizer' must be one of sgd, adamw"),
    ({"network": {"patch_size": [16, 32]}}, "recipe key 'network.patch_size' must be a list of 3 integers"),
    ({"network": {"batch_size": 6}}, "recipe key 'network.batch_size' must be a multiple"),
    ([1, 2], "recipe key 'recipe' must be an object"),
])
def test_bad_override_is_one_line_naming_the_key(tmp_path, monkeypatch, flare22, document, message):
    override = tmp_path / "bad.json"
    override.write_text(json.dumps(document))
    monkeypatch.setenv(ENV_VAR, str(override))
    with pytest.raises(NsnError) as error:
        recipe_from_plans({PLANS_KEY: flare22})
    text = str(error.value)
    assert message in text and f"{ENV_VAR}={override}" in text and "\n" not in text


def test_without_a_planned_recipe_the_override_must_be_complete(tmp_path, monkeypatch):
    override = tmp_path / "epochs.json"
    override.write_text(json.dumps({"training": {"num_epochs": 3}}))
    monkeypatch.setenv(ENV_VAR, str(override))
    with pytest.raises(NsnError, match="complete recipe .*missing recipe key 'description'"):
        recipe_from_plans({"plans_name": "nnUNetPlans"})
