"""A trained model folder that cannot be used is named in one line, not a 25-line torch traceback.

nnU-Net's ``initialize_from_trained_model_folder`` reads ``dataset.json``, ``plans.json`` and each fold's
checkpoint with ``torch.load``, builds the network from the plans and loads fold 0's weights; the other folds'
weights are loaded only when a case is predicted. A truncated checkpoint gives "PytorchStreamReader failed
reading zip archive", a foreign one a ``KeyError``, weights of other plans a ``size mismatch`` after the first
case was preprocessed. :func:`diagnose` runs only after such a failure (nothing is read twice on success) and
finds the file at fault; :func:`check_folds_fit` checks every fold against the network before any work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from noisy_student_nnunet.errors import NsnError, error_message

CHECKPOINT_KEYS = ("network_weights", "trainer_name", "init_args")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load`` of an nnU-Net checkpoint on the CPU; NsnError naming ``path`` if it is missing, damaged
    (truncated, not a PyTorch file) or not an nnU-Net checkpoint."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise NsnError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            AttributeError, ModuleNotFoundError) as error:  # a cut zip reads as EINVAL (OSError) or RuntimeError
        first = error_message(error).split(". ")[0][:160]
        raise NsnError(f"{path}: damaged checkpoint ({path.stat().st_size} bytes; truncated or not a PyTorch file: "
                       f"{first}); copy it again or retrain the fold") from None
    if not isinstance(checkpoint, Mapping) or any(key not in checkpoint for key in CHECKPOINT_KEYS):
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, Mapping) or k not in checkpoint]
        raise NsnError(f"{path}: not an nnU-Net checkpoint (no '{missing[0]}'); name a checkpoint that "
                       f"nnUNetv2_train wrote")
    return dict(checkpoint)


def weights_mismatch(network_state: Mapping[str, Any], weights: Mapping[str, Any]) -> str | None:
    """The first key or shape by which ``weights`` do not fit the network's state dict, or None."""
    own, theirs = set(network_state), set(weights)
    if own - theirs:
        return f"'{sorted(own - theirs)[0]}' is missing from the checkpoint"
    if theirs - own:
        return f"'{sorted(theirs - own)[0]}' is not in the network the plans build"
    for key, value in weights.items():
        if tuple(value.shape) != tuple(network_state[key].shape):
            return (f"'{key}' has shape {tuple(value.shape)}, "
                    f"the network the plans build {tuple(network_state[key].shape)}")
    return None


def _checkpoint_files(folder: Path, folds: Sequence[int | str], checkpoint_name: str) -> list[Path]:
    return [folder / f"fold_{fold}" / checkpoint_name for fold in folds]


def check_folds_fit(network, parameters: Sequence[Mapping[str, Any]], folder: str | os.PathLike,
                    folds: Sequence[int | str], checkpoint_name: str) -> None:
    """Every fold's weights fit the network built from ``plans.json`` (shapes only, nothing copied)."""
    folder = Path(folder)
    state = network.state_dict()
    for path, weights in zip(_checkpoint_files(folder, folds, checkpoint_name), parameters):
        problem = weights_mismatch(state, weights)
        if problem:
            raise NsnError(f"{path} does not match {folder / 'plans.json'} (other plans or another model?): "
                           f"{problem}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise NsnError(f"{path}: not found (not a trained nnU-Net model folder?)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NsnError(f"{path}: damaged JSON ({error_message(error)})") from None


def diagnose(folder: str | os.PathLike, folds: Sequence[int | str] | None, checkpoint_name: str,
             error: BaseException) -> NsnError:
    """After nnU-Net failed to load ``folder``: an NsnError naming the file at fault and why."""
    folder = Path(folder)
    try:
        _read_json(folder / "dataset.json")
        plans = _read_json(folder / "plans.json")
        if folds is None:
            folds = sorted(p.name[5:] for p in folder.glob("fold_*") if (p / checkpoint_name).is_file())
        elif isinstance(folds, (str, int)):
            folds = [folds]
        for path in _checkpoint_files(folder, folds, checkpoint_name):
            checkpoint = load_checkpoint(path)
            configuration = checkpoint["init_args"].get("configuration") if isinstance(
                checkpoint["init_args"], Mapping) else None
            if configuration not in plans.get("configurations", {}):
                return NsnError(f"{path} was trained with configuration '{configuration}', which "
                                f"{folder / 'plans.json'} does not have (a checkpoint of another model?)")
    except NsnError as found:
        return found
    text = str(error)
    if "state_dict" in text and folds:  # stock loads fold 0's weights into the network the plans build
        detail = next((line.strip() for line in text.splitlines() if "size mismatch" in line or "key(s)" in line),
                      error_message(error)[:200])
        return NsnError(f"{_checkpoint_files(folder, folds, checkpoint_name)[0]} does not match "
                        f"{folder / 'plans.json'} (other plans or another model?): {detail[:300]}")
    return NsnError(f"cannot load the model in {folder}: {error_message(error)[:300]}")
