"""One training step of a recipe's network on the CPU: fp32 against bf16 autocast, per thread count.

    python benchmarks/bench_training_step.py [--recipe demo] [--threads 1 2] [--steps 20]

The network is built as our trainers build it (nnU-Net's PlainConvUNet, planned by ``nsn plan``'s
architecture function for the recipe's width and patch at 2.5 x 0.75 x 0.75 mm), with deep supervision, AdamW, a random batch of the
recipe's batch size; the loss is a stand-in (mean of the outputs), so the step is the network's forward
and backward pass and the optimiser. Each mode runs in this process after 3 warm-up steps; the table
reports seconds per step and the speed-up of bf16. On a CPU without native bf16 the bf16 row is
emulated (slower); the trainers use it only where :func:`~noisy_student_nnunet.inference.precision.cpu_native_bf16` says yes.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import machine
from noisy_student_nnunet.recipe import load_recipe


def build_network(recipe: dict) -> tuple[torch.nn.Module, list[int]]:
    """The recipe's network as ``nsn plan`` plans it for a demo-like spacing, built as nnU-Net builds it."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from noisy_student_nnunet.plans import plain_unet_architecture

    net = recipe["network"]
    patch = net["patch_size"] or [16, 32, 32]
    architecture = plain_unet_architecture([2.5, 0.75, 0.75], patch, net["base_num_features"],
                                           net["max_num_features"])
    network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], 1, 14, deep_supervision=True)
    return network, patch


def seconds_per_step(network: torch.nn.Module, batch: torch.Tensor, bf16: bool, steps: int) -> float:
    optimizer = torch.optim.AdamW(network.parameters(), 3e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sum(output.float().mean() for output in network(batch))
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    network, patch = build_network(recipe)
    batch = torch.randn(recipe["network"]["batch_size"], 1, *patch)
    print(f"machine: {machine()}; recipe {recipe['name']}: batch {batch.shape[0]} x {list(patch)}")
    print(f"{'threads':>7} {'fp32 s/step':>12} {'bf16 s/step':>12} {'bf16 speed-up':>14}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        fp32 = seconds_per_step(network, batch, False, args.steps)
        bf16 = seconds_per_step(network, batch, True, args.steps)
        print(f"{threads:>7} {fp32:12.3f} {bf16:12.3f} {fp32 / bf16:13.2f}x")


if __name__ == "__main__":
    main()
