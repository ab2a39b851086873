"""Which runtime executes the network on a patch, and why (``--backend auto|torch|openvino``).

On the CPU, OpenVINO runs nnU-Net's 3D U-Net faster than torch eager (one half-width FLARE22 patch, 2 threads of an
AVX512-BF16 EPYC under load: fp32 6.8 s -> 3.4-3.6 s, bf16 3.24 s -> 2.14 s; docs/benchmarks.md, "OpenVINO
backend"). On CUDA torch is
the runtime (stock's fp16 autocast). So ``auto`` is OpenVINO on the CPU and torch elsewhere; if OpenVINO is not
installed, ``auto`` says so and uses torch, an explicit ``openvino`` is an error.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from noisy_student_nnunet.errors import NsnError

BACKENDS = ("auto", "torch", "openvino")


@dataclass(frozen=True)
class Backend:
    """``name`` is 'torch' or 'openvino'; ``reason`` is the line for the log."""

    name: str
    reason: str

    def describe(self) -> str:
        return f"backend {self.name}: {self.reason}"


def run_plan(device: str) -> str:
    """One line for ``nsn env``: the backend and precision a run with the defaults would use on ``device``, why,
    and the CPU's flags."""
    from noisy_student_nnunet.inference.precision import choose_precision, speed_flags

    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    backend = choose_backend("auto", device)
    precision = choose_precision("auto", device)
    line = f"backend {backend.name} ({backend.reason}); precision {precision.name} ({precision.reason})"
    if device == "cpu":
        line += f"; CPU flags: {' '.join(speed_flags()) or 'no AVX2, AVX512 or AMX'}"
    return line


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def choose_backend(requested: str, device: torch.device | str) -> Backend:
    """Resolve ``auto`` for ``device``; an explicit choice that cannot run there is an NsnError."""
    if requested not in BACKENDS:
        raise NsnError(f"--backend {requested}: must be one of {', '.join(BACKENDS)}")
    device_type = torch.device(device).type
    if requested == "torch":
        return Backend("torch", "asked for")
    if requested == "openvino":
        if device_type != "cpu":
            raise NsnError(f"--backend openvino: runs on the CPU only, not -device {device_type}")
        if not openvino_installed():
            raise NsnError("--backend openvino: the openvino package is not installed (pip install openvino)")
        return Backend("openvino", "asked for")
    if device_type != "cpu":
        return Backend("torch", f"auto on {device_type}")
    if not openvino_installed():
        return Backend("torch", "auto on cpu, but the openvino package is not installed (pip install openvino)")
    return Backend("openvino", "auto on cpu: OpenVINO runs the U-Net faster than torch there "
                               "(docs/benchmarks.md#openvino-backend)")
