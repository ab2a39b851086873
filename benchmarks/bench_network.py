"""Half-width (low-footprint) U-Net against stock nnU-Net plans on the FLARE22 patch: parameters and memory.

Both networks are nnU-Net's PlainConvUNet with the topology nnU-Net computes for the patch
(get_pool_and_conv_props, as in noisy_student_nnunet.plans); they differ only in the base width
(16 vs stock 32, cap 320). Each network runs one inference forward pass (torch.no_grad, eval mode,
no deep supervision, batch 1) in its own subprocess so that peak RSS is clean:

    python benchmarks/bench_network.py                      # CPU, fp32: peak RSS
    python benchmarks/bench_network.py --device cuda        # GPU, fp16 autocast: peak allocated memory

Spacing defaults to nnU-Net's FLARE22 3d_fullres target spacing (2.5, 0.8027, 0.8027) mm; only the
ratio matters for the topology (any z/in-plane ratio between 2 and 4 gives the same network).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import machine

FLARE22_PATCH = (40, 224, 192)
FLARE22_SPACING = (2.5, 0.8027, 0.8027)
FLARE22_CLASSES = 14  # background + 13 organs


def _measure(args: argparse.Namespace) -> dict:
    """Runs in the child: build one network, one forward pass, report numbers as JSON."""
    import resource
    import time

    import torch

    from noisy_student_nnunet.plans import plain_unet_architecture
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.set_num_threads(args.threads)
    arch = plain_unet_architecture(args.spacing, args.patch, args.base, 320)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 1, args.classes, allow_init=True, deep_supervision=False)
    net.eval()
    n_params = sum(p.numel() for p in net.parameters())
    device = torch.device(args.device)
    net = net.to(device)
    x = torch.zeros((1, 1, *args.patch), dtype=torch.float32, device=device)
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.no_grad():
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                out = net(x)
            torch.cuda.synchronize()
        else:
            out = net(x)
    seconds = time.perf_counter() - start
    result = {
        "base": args.base,
        "features": arch["arch_kwargs"]["features_per_stage"],
        "strides": arch["arch_kwargs"]["strides"],
        "params": n_params,
        "output_shape": list(out.shape),
        "forward_s": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_forward_mb": rss_before_kb / 1024,
    }
    if device.type == "cuda":
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        result["gpu_forward_extra_mb"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2 ** 20
        result["gpu_name"] = torch.cuda.get_device_name(0)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=3, default=list(FLARE22_PATCH))
    parser.add_argument("--spacing", type=float, nargs=3, default=list(FLARE22_SPACING))
    parser.add_argument("--classes", type=int, default=FLARE22_CLASSES)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child (default 2)")
    parser.add_argument("--child-base", dest="base", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.base is not None:  # child
        print(json.dumps(_measure(args)))
        return 0

    rows = []
    for label, base in (("stock nnU-Net (base 32)", 32), ("low-footprint (base 16)", 16)):
        cmd = [sys.executable, __file__, "--child-base", str(base), "--device", args.device,
               "--threads", str(args.threads), "--classes", str(args.classes),
               "--patch", *map(str, args.patch), "--spacing", *map(str, args.spacing)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append((label, json.loads(done.stdout.strip().splitlines()[-1])))

    stock = rows[0][1]
    patch = "x".join(map(str, args.patch))
    print(f"PlainConvUNet, patch {patch}, spacing {args.spacing}, {args.classes} classes, 1 input channel, "
          f"batch 1, one forward pass, torch.no_grad, {args.device} "
          f"({'fp16 autocast' if args.device == 'cuda' else f'fp32, {args.threads} threads'})")
    print(f"strides {stock['strides']}")
    print(f"machine: {machine()}")
    print()
    if args.device == "cuda":
        print(f"GPU: {stock.get('gpu_name')}")
        print("| network | features per stage | parameters | peak GPU allocated (MB) | forward (s) |")
        print("|---|---|---:|---:|---:|")
        for label, r in rows:
            print(f"| {label} | {r['features']} | {r['params']:,} | {r['gpu_peak_mb']:.0f} | {r['forward_s']:.2f} |")
    else:
        print("| network | features per stage | parameters | peak RSS (MB) | RSS before forward (MB) "
              "| added by forward (MB) | forward (s) |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for label, r in rows:
            print(f"| {label} | {r['features']} | {r['params']:,} | {r['peak_rss_mb']:.0f} | "
                  f"{r['rss_before_forward_mb']:.0f} | {r['peak_rss_mb'] - r['rss_before_forward_mb']:.0f} | "
                  f"{r['forward_s']:.2f} |")
    low = rows[1][1]
    print()
    key = "gpu_peak_mb" if args.device == "cuda" else "peak_rss_mb"
    print(f"ratio low-footprint / stock: parameters {low['params'] / stock['params']:.3f}, "
          f"peak memory {low[key] / stock[key]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
