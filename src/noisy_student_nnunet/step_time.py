"""How long one training step of a recipe's network takes on this CPU.

``nsn demo`` sizes its training budget from it (a CPU without native bf16 runs a step in fp32, 1.5 to 2.5 times
slower), and ``benchmarks/bench_training_step.py`` reports and profiles it. The step is the trainers' step on a
random batch: nnU-Net's PlainConvUNet as ``nsn plan`` plans it for the recipe, deep supervision, nnU-Net's Dice +
cross-entropy on every deep-supervision output, AdamW; bf16 autocast where the trainers use it.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

#: FLARE22's 13 organs and the background
NUM_CLASSES = 14
#: a demo-like spacing (mm, z y x) for the recipe's network topology
SPACING = (2.5, 0.75, 0.75)


def build_recipe_network(recipe: dict[str, Any], num_classes: int = NUM_CLASSES) -> tuple[torch.nn.Module, list[int]]:
    """The recipe's network with deep supervision, built as nnU-Net builds it, and its patch size."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from noisy_student_nnunet.plans import plain_unet_architecture

    net = recipe["network"]
    patch = list(net["patch_size"] or [16, 32, 32])
    architecture = plain_unet_architecture(SPACING, patch, net["base_num_features"], net["max_num_features"])
    network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], 1, num_classes, deep_supervision=True)
    return network, patch


def nnunet_loss(network: torch.nn.Module, batch: torch.Tensor,
                num_classes: int = NUM_CLASSES) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """nnU-Net's deep-supervised Dice + CE (as ``nnUNetTrainer._build_loss``) against random targets at every scale."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    with torch.no_grad():
        shapes = [output.shape[2:] for output in network(batch)]
    weights = np.array([1 / 2 ** i for i in range(len(shapes))])
    weights[-1] = 0
    loss = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                       weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss),
        weights / weights.sum())
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randint(0, num_classes, (batch.shape[0], 1, *shape), generator=generator).float()
               for shape in shapes]
    return lambda outputs: loss(outputs, targets)


def make_training_step(network: torch.nn.Module, batch: torch.Tensor, bf16: bool,
                       loss: str = "nnunet") -> Callable[[], None]:
    """One optimiser step as the trainers take it (``loss="mean"``: the mean of the outputs, the network alone)."""
    optimizer = torch.optim.AdamW(network.parameters(), 3e-3)
    loss_of = nnunet_loss(network, batch) if loss == "nnunet" else (
        lambda outputs: sum(output.mean() for output in outputs))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = network(batch)
        loss_of([output.float() for output in outputs]).backward()
        optimizer.step()

    return step


def seconds_per_step(step: Callable[[], None], steps: int, warmup: int = 3) -> float:
    """Mean wall seconds of ``steps`` calls after ``warmup`` calls (the first allocate and pick kernels)."""
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def measure_training_step(recipe: dict[str, Any], bf16: bool, threads: int = 1, steps: int = 10) -> float:
    """Seconds per training step of ``recipe``'s network on this CPU with ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        network, patch = build_recipe_network(recipe)
        batch = torch.randn(recipe["network"]["batch_size"], 1, *patch)
        return seconds_per_step(make_training_step(network, batch, bf16), steps)
    finally:
        torch.set_num_threads(previous)
