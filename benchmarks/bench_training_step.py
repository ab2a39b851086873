"""One training step of a recipe's network on the CPU: fp32 against bf16 autocast, per thread count.

    python benchmarks/bench_training_step.py [--recipe demo] [--threads 1 2] [--steps 20] [--isa avx2] [--profile]

The network is built as our trainers build it (nnU-Net's PlainConvUNet, planned by ``nsn plan``'s
architecture function for the recipe's width and patch at 2.5 x 0.75 x 0.75 mm), with deep supervision, AdamW,
a random batch of the recipe's batch size and nnU-Net's own loss (Dice + cross-entropy on every deep-supervision
output, random 14-class targets; ``--loss mean`` takes the mean of the outputs instead, the network alone). Each
mode runs in this process after 3 warm-up steps; the table reports seconds per step and the speed-up of bf16. On a
CPU without native bf16 the bf16 row is emulated (slower); the trainers use it only where
:func:`~noisy_student_nnunet.inference.precision.cpu_native_bf16` says yes. ``--profile`` prints where an fp32 step
spends its CPU time (torch profiler, the first thread count), grouped by kind of operation. ``--isa avx2`` runs
the kernels an AVX2-only CPU runs (see ``_common.ISA_CAPS``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

from _common import ISA_CAPS, apply_isa_cap, machine
from noisy_student_nnunet.recipe import load_recipe

#: (kind of work, substrings of the profiler's lower-cased op names): the first kind that matches wins
OP_KINDS = (("convolution backward", ("convolutionbackward", "convolution_backward", "conv3d_backward",
                                      "conv_transpose3d_backward")),
            ("convolution forward", ("conv",)),
            ("instance norm", ("norm",)),
            ("LeakyReLU", ("leaky",)),
            ("loss (softmax, Dice, CE)", ("softmax", "nll", "cross_entropy", "one_hot", "scatter", "gather")),
            ("optimizer (AdamW)", ("foreach", "adam", "optimizer")),
            ("copies and layout", ("copy", "contiguous", "clone", "cat", "empty", "zero", "fill", "slice", "view",
                                   "reshape", "expand", "permute", "transpose")),
            ("other elementwise and reductions", ("add", "mul", "div", "sub", "sum", "mean", "pow", "sqrt", "neg",
                                                  "threshold", "where", "max", "argmax", "exp", "log")))


def kind_of(op_name: str) -> str:
    name = op_name.lower()
    return next((kind for kind, keys in OP_KINDS if any(key in name for key in keys)), "other")


def profile_step(step, steps: int) -> tuple[list[tuple[str, float, float]], list[tuple[str, float, float]]]:
    """Where a step's self CPU time goes: (kind, ms per step, share) by :data:`OP_KINDS`, and the same per op."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    by_kind: dict[str, float] = defaultdict(float)
    by_op = {event.key: event.self_cpu_time_total for event in prof.key_averages()}
    for op, microseconds in by_op.items():
        by_kind[kind_of(op)] += microseconds
    total = sum(by_op.values())

    def rows(times: dict[str, float]) -> list[tuple[str, float, float]]:
        return sorted(((k, us / steps / 1000, us / total) for k, us in times.items()), key=lambda r: -r[1])

    return rows(by_kind), rows(by_op)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss", choices=["nnunet", "mean"], default="nnunet")
    parser.add_argument("--isa", choices=list(ISA_CAPS), default=None,
                        help="cap every library's kernels at this instruction set "
                             "(the fp32 row is what such a CPU runs)")
    parser.add_argument("--profile", action="store_true", help="where an fp32 step's CPU time goes")
    args = parser.parse_args()
    if args.isa and any(os.environ.get(k) != v for k, v in ISA_CAPS[args.isa].items()):
        # the caps are read when torch loads its kernels: start again with them in the environment
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ISA_CAPS[args.isa]})
    isa_line = apply_isa_cap(args.isa)
    import torch

    from noisy_student_nnunet.step_time import build_recipe_network, make_training_step, seconds_per_step

    recipe = load_recipe(args.recipe)
    network, patch = build_recipe_network(recipe)
    batch = torch.randn(recipe["network"]["batch_size"], 1, *patch)
    print(f"machine: {machine()}\n{isa_line}\nrecipe {recipe['name']}: batch {batch.shape[0]} x {list(patch)}, "
          f"loss {args.loss}; command: python benchmarks/bench_training_step.py {' '.join(sys.argv[1:])}")
    print("\n| threads | fp32 s/step | bf16 s/step | bf16 speed-up |\n|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        fp32 = seconds_per_step(make_training_step(network, batch, False, args.loss), args.steps)
        bf16 = seconds_per_step(make_training_step(network, batch, True, args.loss), args.steps)
        print(f"| {threads} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.2f}x |", flush=True)
    if args.profile:
        torch.set_num_threads(args.threads[0])
        kinds, ops = profile_step(make_training_step(network, batch, False, args.loss), args.steps)
        print(f"\nwhere an fp32 step goes ({args.threads[0]} thread(s), self CPU time of the torch profiler):\n"
              f"\n| kind | ms per step | share |\n|---|---|---|")
        for kind, ms, share in kinds:
            print(f"| {kind} | {ms:.1f} | {share:.0%} |")
        print("\n| op (the 12 largest) | ms per step | share |\n|---|---|---|")
        for op, ms, share in ops[:12]:
            print(f"| `{op}` | {ms:.1f} | {share:.0%} |")


if __name__ == "__main__":
    main()
