"""Which floating-point precision the network runs in, and why (``--precision auto|fp32|bf16``).

On the CPU, ``auto`` is fp32, stock nnU-Net's arithmetic: the labels of torch fp32. bf16 roughly halves the time
per patch where the CPU executes it natively (AMX-BF16 tiles or AVX512_BF16 dot products; elsewhere torch emulates
it, slower than fp32, and OpenVINO runs fp32), but it moves labels at organ boundaries: against fp32, the demo's
fine-tuned student fell to Dice 0.993 on the pancreas, an organ it learned, and 0.969 on the gallbladder
(docs/benchmarks.md#bf16-an-explicit-choice), below the guard of 0.997 for a default. So bf16 is an explicit
choice, ``--precision bf16``, and ``auto`` says in the log when the CPU would run it natively. On CUDA, ``auto``
keeps stock nnU-Net's fp16 autocast; ``bf16`` and ``fp32`` are honoured there too.

``NSN_CPU_BF16=0`` makes the detection answer "no native bf16" (``=1``: "native bf16"), so that a test, or a
user whose CPU misreports, can force what the trainers' bf16 autocast and the log see. An explicit
``--precision`` is never overridden.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ContextManager

import torch

PRECISIONS = ("auto", "fp32", "bf16")
ENV_CPU_BF16 = "NSN_CPU_BF16"
#: /proc/cpuinfo flags of native bf16 arithmetic (x86: AMX tiles, AVX512 dot products; Arm: BF16 extension)
_CPUINFO_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


@dataclass(frozen=True)
class Precision:
    """What the network runs in: ``name`` is 'fp32', 'bf16' or 'fp16'; ``reason`` is the line for the log."""

    name: str
    device_type: str
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> ContextManager:
        """The context the network's forward pass runs in (a no-op for fp32 on CPU and MPS)."""
        if self.autocast_dtype is not None:
            return torch.autocast(self.device_type, dtype=self.autocast_dtype)
        if self.device_type == "cuda":  # stock wraps the sliding window in fp16 autocast: switch it off
            return torch.autocast("cuda", enabled=False)
        return contextlib.nullcontext()

    def describe(self) -> str:
        return f"precision {self.name} on {self.device_type}: {self.reason}"


def _cpuinfo_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


#: the /proc/cpuinfo flags that decide the speed of each backend and precision (named with every figure)
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def speed_flags() -> list[str]:
    """Which of :data:`SPEED_FLAGS` this CPU has (empty where /proc/cpuinfo is not readable)."""
    flags = _cpuinfo_flags()
    return [flag for flag in SPEED_FLAGS if flag in flags]


def _torch_check(name: str) -> bool:
    """torch's private CPU capability checks (present in torch 2.x); False where missing or failing."""
    check = getattr(torch.cpu, name, None)
    try:
        return bool(check()) if callable(check) else False
    except Exception:
        return False


def cpu_native_bf16() -> tuple[bool, str]:
    """(does this CPU execute bf16 natively, why we think so)."""
    forced = os.environ.get(ENV_CPU_BF16, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"{ENV_CPU_BF16}={forced} set"
    found = []
    if _torch_check("_is_amx_tile_supported"):
        found.append("AMX tiles (torch)")
    if _torch_check("_is_avx512_bf16_supported"):
        found.append("AVX512_BF16 (torch)")
    if not found:
        flags = _cpuinfo_flags()
        found = [f"{flag} (/proc/cpuinfo)" for flag in _CPUINFO_BF16_FLAGS if flag in flags]
    if found:
        return True, "CPU executes bf16 natively: " + ", ".join(found)
    return False, "CPU has no native bf16 (no AMX-BF16 or AVX512_BF16 found); bf16 would be emulated, slower"


def choose_precision(requested: str, device: torch.device | str) -> Precision:
    """Resolve ``auto`` for this device; check an explicit choice is possible there."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    device_type = torch.device(device).type
    if device_type == "cuda":
        if requested == "auto":
            return Precision("fp16", "cuda", "auto on CUDA: stock nnU-Net's fp16 autocast")
        return Precision(requested, "cuda", "asked for")
    if device_type != "cpu":
        if requested == "bf16":
            raise ValueError(f"precision bf16 is only supported on cpu and cuda, not {device_type}")
        return Precision("fp32", device_type, "asked for" if requested == "fp32" else f"auto on {device_type}")
    native, why = cpu_native_bf16()
    if requested == "auto":
        if native:
            why += "; fp32 all the same, for fp32's labels (--precision bf16: faster, labels move at organ boundaries)"
        return Precision("fp32", "cpu", f"auto: {why}")
    if requested == "bf16" and not native:
        return Precision("bf16", "cpu", f"asked for, although {why}")
    return Precision(requested, "cpu", "asked for")
