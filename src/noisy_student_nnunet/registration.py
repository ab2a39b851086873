"""Make stock nnU-Net find our trainers, with no step from the user.

nnU-Net 2.8.1 searches the folders listed in ``nnUNet_extTrainer`` (os.pathsep-separated) when a
trainer is not one of its own. The installed ``noisy_student_nnunet.pth`` runs
:func:`register` at every interpreter start, which appends our shim folder to that variable and keeps
whatever the user set. Child processes inherit the variable. ``nsn env`` prints the same setting for
shells where start-up hooks are disabled (``python -S``, some embedded interpreters).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "nnUNet_extTrainer"
SHIM_DIR = Path(__file__).resolve().parent / "nnunet_ext"


def with_shim(value: str | None) -> str:
    """Return ``value`` (a path list) with our shim folder appended once."""
    parts = [p for p in (value or "").split(os.pathsep) if p.strip()]
    if str(SHIM_DIR) not in parts:
        parts.append(str(SHIM_DIR))
    return os.pathsep.join(parts)


def register() -> None:
    """Append the shim folder to ``nnUNet_extTrainer`` in this process's environment. Never raises."""
    try:
        os.environ[ENV_VAR] = with_shim(os.environ.get(ENV_VAR))
    except Exception:  # an interpreter start-up hook must never break Python
        pass
