"""Recipes: every training choice of the method in one validated JSON document.

A recipe reaches a trainer started by stock ``nnUNetv2_train`` (whose arguments are fixed) through
the plans: ``nsn plan`` writes it under :data:`PLANS_KEY`, nnU-Net copies the plans into each
results folder, so a model folder records how it was trained. For experiments the environment
variable :data:`ENV_VAR` names a recipe file whose keys are laid over the planned recipe
(:func:`merge_recipe`): a file holding only ``{"training": {"num_epochs": 3}}`` changes the epochs and
keeps everything else, ``student.pseudo_dataset`` (recorded by ``nsn pseudolabel``) included.

Validation is strict: an unknown key, a missing key, a wrong type or an out-of-range value is an
:class:`~noisy_student_nnunet.errors.NsnError` naming the key (``training.initial_lr``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from noisy_student_nnunet.errors import NsnError

PLANS_KEY = "noisy_student_recipe"
ENV_VAR = "NSN_RECIPE"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

# --- schema ----------------------------------------------------------------------------------------
# A leaf is (type, low, high): numbers are checked against [low, high] (None = unbounded); a list of
# two numbers is a range (checked element-wise, low <= high); ``optional`` leaves may be null.


class _Leaf:
    def __init__(self, kind: str, low: float | None = None, high: float | None = None, optional: bool = False,
                 length: int | None = None, choices: tuple[str, ...] = ()):
        self.kind, self.low, self.high, self.optional, self.length = kind, low, high, optional, length
        self.choices = choices


def _p() -> _Leaf:
    return _Leaf("float", 0.0, 1.0)


def _range(low: float | None = None, high: float | None = None) -> _Leaf:
    return _Leaf("range", low, high)


AUGMENTATION_SCHEMA: dict[str, Any] = {
    "rotation": {"p_sample": _p(), "angle_deg": _range(-180, 180)},
    "scaling": {"p_sample": _p(), "range": _range(0.01, 100)},
    "gaussian_noise": {"p_sample": _p(), "variance": _range(0, None)},
    "gaussian_blur": {"p_sample": _p(), "p_channel": _p(), "sigma": _range(0, None)},
    "brightness": {"p_sample": _p(), "range": _range(0, None)},
    "contrast": {"p_sample": _p(), "range": _range(0, None)},
    "low_resolution": {"p_sample": _p(), "p_channel": _p(), "zoom": _range(0.01, 1.0)},
    "gamma": {"p_sample": _p(), "range": _range(0.01, None), "invert_image": _Leaf("bool")},
    "mirror": {"p_sample": _p(), "p_axis": _p()},
}

#: optimisers a schedule may name: "sgd" is the paper's (Table 3: SGD, Nesterov momentum 0.99);
#: "adamw" (momentum = beta1) learns many more organs per iteration at CPU budgets (configs/demo.json)
OPTIMIZERS = ("sgd", "adamw")

TRAINING_SCHEMA: dict[str, Any] = {
    "optimizer": _Leaf("choice", choices=OPTIMIZERS),
    "num_epochs": _Leaf("int", 1),
    "num_iterations_per_epoch": _Leaf("int", 1),
    "num_val_iterations_per_epoch": _Leaf("int", 1),
    "initial_lr": _Leaf("float", 0.0, 10.0),
    "weight_decay": _Leaf("float", 0.0, 1.0),
    "momentum": _Leaf("float", 0.0, 1.0),
    "nesterov": _Leaf("bool"),
    "poly_exponent": _Leaf("float", 0.0, 100.0),
    "mixed_precision": _Leaf("bool"),
    "deep_supervision": _Leaf("bool"),
    "oversample_foreground_percent": _p(),
    "save_every": _Leaf("int", 1),
}

SCHEMA: dict[str, Any] = {
    "name": _Leaf("str"),
    "description": _Leaf("str"),
    "network": {
        "base_num_features": _Leaf("int", 1, 1024),
        "max_num_features": _Leaf("int", 1, 4096),
        "batch_size": _Leaf("int", 1, 1024),
        # null: nnU-Net's planner heuristics choose the patch
        "patch_size": _Leaf("intlist", 1, None, optional=True, length=3),
    },
    "training": TRAINING_SCHEMA,
    "teacher_augmentation": AUGMENTATION_SCHEMA,
    "student_augmentation": AUGMENTATION_SCHEMA,
    "student": {
        "labeled_per_batch": _Leaf("int", 1, 1024),
        "pseudo_per_batch": _Leaf("int", 0, 1024),
        # dataset name or id of the pseudo-labeled dataset; null until `nsn pseudolabel` records it
        "pseudo_dataset": _Leaf("str", optional=True),
    },
    # the fine-tune schedule: a complete training block of its own
    "finetune": TRAINING_SCHEMA,
}


def _check_leaf(leaf: _Leaf, value: Any, key: str) -> None:
    if value is None:
        if leaf.optional:
            return
        raise NsnError(f"recipe key '{key}' must not be null")
    kind = leaf.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise NsnError(f"recipe key '{key}' must be true or false, got {value!r}")
        return
    if kind == "str":
        if not isinstance(value, str):
            raise NsnError(f"recipe key '{key}' must be a string, got {value!r}")
        return
    if kind == "choice":
        if value not in leaf.choices:
            raise NsnError(f"recipe key '{key}' must be one of {', '.join(leaf.choices)}, got {value!r}")
        return
    if kind in ("int", "float"):
        numbers = [value]
    elif kind == "intlist":
        if not isinstance(value, list) or (leaf.length is not None and len(value) != leaf.length):
            raise NsnError(f"recipe key '{key}' must be a list of {leaf.length} integers, got {value!r}")
        numbers = value
    else:  # range
        if not isinstance(value, list) or len(value) != 2:
            raise NsnError(f"recipe key '{key}' must be a range [low, high], got {value!r}")
        numbers = value
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise NsnError(f"recipe key '{key}' must be numeric, got {value!r}")
        if kind in ("int", "intlist") and not isinstance(number, int):
            raise NsnError(f"recipe key '{key}' must be an integer, got {value!r}")
        if (leaf.low is not None and number < leaf.low) or (leaf.high is not None and number > leaf.high):
            raise NsnError(f"recipe key '{key}' is out of range [{leaf.low}, {leaf.high}]: {value!r}")
    if kind == "range" and numbers[0] > numbers[1]:
        raise NsnError(f"recipe key '{key}' must be [low, high] with low <= high, got {value!r}")


def _validate(schema: dict[str, Any], document: Any, prefix: str) -> None:
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(document, dict):
        raise NsnError(f"recipe key '{where}' must be an object")
    unknown = sorted(set(document) - set(schema))
    if unknown:
        raise NsnError(f"unknown recipe key '{prefix}{unknown[0]}'")
    missing = sorted(set(schema) - set(document))
    if missing:
        raise NsnError(f"missing recipe key '{prefix}{missing[0]}'")
    for key, spec in schema.items():
        if isinstance(spec, dict):
            _validate(spec, document[key], f"{prefix}{key}.")
        else:
            _check_leaf(spec, document[key], f"{prefix}{key}")


def validate_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """Check ``recipe`` against the schema and return it; raise NsnError naming the first bad key."""
    _validate(SCHEMA, recipe, "")
    student = recipe["student"]
    if student["pseudo_per_batch"] > 0 and recipe["network"]["batch_size"] % (
            student["labeled_per_batch"] + student["pseudo_per_batch"]) != 0:
        raise NsnError("recipe key 'network.batch_size' must be a multiple of "
                       "student.labeled_per_batch + student.pseudo_per_batch")
    return recipe


def bundled_recipe_path(name: str) -> Path:
    """Path of a recipe shipped with the package (``flare22``, ``tiny``)."""
    return CONFIGS_DIR / f"{name}.json"


def _read_recipe_file(path_or_name: str | os.PathLike) -> tuple[Any, Path]:
    """The JSON document of a recipe file, or of a bundled recipe by name; not validated."""
    path = Path(path_or_name)
    if not path.suffix and not path.exists():
        path = bundled_recipe_path(str(path_or_name))
    if not path.is_file():
        raise NsnError(f"recipe file not found: {path_or_name}")
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as error:
        raise NsnError(f"recipe file {path} is not valid JSON: {error}") from None


def load_recipe(path_or_name: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a complete recipe from a JSON file, or a bundled recipe by name (``flare22``, ``tiny``)."""
    return validate_recipe(_read_recipe_file(path_or_name)[0])


#: the one key an override's null does not overwrite: null there means "not recorded yet" (every bundled
#: recipe says so), never "forget the dataset `nsn pseudolabel` recorded"; NSN_PSEUDO_DATASET names another
KEEP_WHEN_NULL = ("student.pseudo_dataset",)


def _merge_into(schema: dict[str, Any], target: dict[str, Any], override: Any, prefix: str) -> None:
    if not isinstance(override, dict):
        raise NsnError(f"recipe key '{prefix.rstrip('.') or 'recipe'}' must be an object, got {override!r}")
    for key, value in override.items():
        name = f"{prefix}{key}"
        if key not in schema:
            raise NsnError(f"unknown recipe key '{name}'")
        spec = schema[key]
        if isinstance(spec, dict):
            _merge_into(spec, target[key], value, f"{name}.")
        elif not (value is None and name in KEEP_WHEN_NULL):
            _check_leaf(spec, value, name)
            target[key] = copy.deepcopy(value)


def merge_recipe(base: dict[str, Any], override: Any) -> dict[str, Any]:
    """``override`` (a whole or partial recipe document) laid over the complete recipe ``base``; a new dict.

    A key the override does not name keeps its value in ``base``; so does ``student.pseudo_dataset`` when
    the override sets it to null (:data:`KEEP_WHEN_NULL`). An unknown key, a wrong type or an out-of-range
    value is an NsnError naming the key; the result is validated as a whole (the batch must still hold the
    student's ratio).
    """
    merged = copy.deepcopy(validate_recipe(base))
    _merge_into(SCHEMA, merged, override, "")
    return validate_recipe(merged)


def changed_keys(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the leaves whose value differs between two recipes (for logs: what an override changed)."""
    keys: list[str] = []
    for key, value in after.items():
        old = before.get(key) if isinstance(before, dict) else None
        if isinstance(value, dict) and isinstance(old, dict):
            keys += changed_keys(old, value, f"{prefix}{key}.")
        elif value != old:
            keys.append(f"{prefix}{key}")
    return keys


def override_recipe(base: dict[str, Any] | None, path_or_name: str | os.PathLike, origin: str) -> dict[str, Any]:
    """The recipe file ``path_or_name`` merged onto ``base`` (see :func:`merge_recipe`); errors name ``origin``.

    ``base`` None (nothing planned to merge onto): the file must be a complete recipe.
    """
    document, path = _read_recipe_file(path_or_name)
    try:
        if base is None:
            return validate_recipe(document)
        return merge_recipe(base, document)
    except NsnError as error:
        where = origin if str(path) == str(path_or_name) else f"{origin} ({path})"
        raise NsnError(f"{where}: {error}") from None


def recipe_from_plans(plans: dict[str, Any]) -> dict[str, Any]:
    """The recipe a trainer should use: the one ``nsn plan`` wrote into the plans, with ``$NSN_RECIPE`` laid over it.

    Plans without a recipe (stock plans) take ``$NSN_RECIPE`` alone, which must then be complete.
    """
    planned = plans.get(PLANS_KEY)
    if planned is not None:
        try:
            planned = validate_recipe(copy.deepcopy(planned))
        except NsnError as error:
            raise NsnError(f"plans '{plans.get('plans_name', '?')}': {error}") from None
    override = os.environ.get(ENV_VAR)
    if override:
        where = "complete recipe (the plans carry none to merge onto)" if planned is None else "override"
        return override_recipe(planned, override, f"{ENV_VAR}={override}, {where}")
    if planned is None:
        raise NsnError(f"plans '{plans.get('plans_name', '?')}' carry no recipe (key '{PLANS_KEY}'): "
                       f"derive them with `nsn plan` or set {ENV_VAR}")
    return planned
