"""CPU training choices of the trainers: thread count, bf16 autocast where native, the recipe's optimiser."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from noisy_student_nnunet.cpu_threads import available_cores, cpu_thread_count
from noisy_student_nnunet.inference.precision import cpu_native_bf16
from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.recipe import load_recipe, validate_recipe
from noisy_student_nnunet.trainers.base import Fp32Loss, build_optimizer


def test_thread_count_prefers_our_variable_then_omp_then_the_affinity():
    assert cpu_thread_count({"NSN_NUM_THREADS": "3", "OMP_NUM_THREADS": "1"}) == 3
    assert cpu_thread_count({"OMP_NUM_THREADS": "1"}) == 1
    assert cpu_thread_count({}) == available_cores()
    for bad in ("0", "two", "-1"):
        with pytest.raises(NsnError, match="NSN_NUM_THREADS must be a positive integer"):
            cpu_thread_count({"NSN_NUM_THREADS": bad})


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity")
def test_a_process_pinned_to_one_core_counts_one_core():
    code = "import os; os.sched_setaffinity(0, {0}); from noisy_student_nnunet.cpu_threads import available_cores; " \
           "print(available_cores())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_optimiser_from_the_schedule():
    net = torch.nn.Conv3d(1, 2, 3)
    sgd = load_recipe("flare22")["training"]
    assert sgd["optimizer"] == "sgd"
    optimizer = build_optimizer(net.parameters(), sgd)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["nesterov"] is True
    demo = load_recipe("demo")["training"]
    optimizer = build_optimizer(net.parameters(), demo)
    assert isinstance(optimizer, type(torch.optim.AdamW(net.parameters()))) == (demo["optimizer"] == "adamw")
    adamw = {**sgd, "optimizer": "adamw", "initial_lr": 3e-3, "momentum": 0.9}
    group = build_optimizer(net.parameters(), adamw).param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["lr"] == 3e-3 and group["weight_decay"] == sgd["weight_decay"]


def test_unknown_optimiser_is_named():
    recipe = load_recipe("flare22")
    recipe["finetune"]["optimizer"] = "rmsprop"
    with pytest.raises(NsnError, match="recipe key 'finetune.optimizer' must be one of sgd, adamw"):
        validate_recipe(recipe)


def test_fp32_loss_under_bf16_autocast_equals_the_fp32_loss():
    torch.manual_seed(0)
    output = torch.randn(2, 3, 4, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4, 4))
    loss = torch.nn.CrossEntropyLoss()
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, out, tgt):
            seen.append(out.dtype)
            return loss(out, tgt)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = Fp32Loss(Recording())(output.bfloat16(), target)
    assert seen == [torch.float32]
    assert value.item() == pytest.approx(loss(output.bfloat16().float(), target).item(), rel=1e-6)


def test_native_bf16_detection_answers_and_env_forces_it(monkeypatch):
    native, why = cpu_native_bf16()
    assert isinstance(native, bool) and why
    monkeypatch.setenv("NSN_CPU_BF16", "0")
    assert cpu_native_bf16()[0] is False
