"""``nsn profile``: run a command and record FLARE's resource figures (time, RAM, CPU, GPU memory)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Run COMMAND and sample, every --interval seconds, what FLARE22 ranks on: wall time; RAM (summed RSS of
the command's process tree, and system used RAM as FLARE measures it); CPU utilisation (FLARE's
system-wide figure from cpu_times deltas, and the tree's own CPU %); GPU memory (whole device through
NVML as FLARE, and the tree's processes where NVML reports them). Reports FLARE's areas under the
GPU-memory-time and CPU-utilisation-time curves and GPU memory with the 2 GB tolerance. Without a GPU
the GPU fields are null. Exits with COMMAND's exit code; Ctrl-C ends COMMAND's whole process tree.

example: nsn profile -o prof.json --plot prof.png -- nnUNetv2_predict -i in -o out -d 22 -c 3d_fullres
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile",
        usage="nsn profile [-o prof.json] [--plot prof.png] [--interval S] [--gpu N | --no-gpu] -- COMMAND ARGS...",
        help="run a command and record time, RAM, CPU and GPU memory as FLARE measures them",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-o", "--output", default=None, help="JSON with the figures and all samples")
    parser.add_argument("--plot", default=None, help="PNG of RAM, CPU and GPU memory over time")
    parser.add_argument("--interval", type=float, default=0.1, help="sampling interval in seconds (FLARE: 0.1)")
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument(
        "--gpu", default=None,
        help="GPU index or UUID to measure (default: first of CUDA_VISIBLE_DEVICES, else 0)",
    )
    gpu.add_argument("--no-gpu", action="store_true", help="do not measure GPU memory (fields null)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS", help="the command to run")
    parser.set_defaults(func=run)


def _fmt(value, unit: str, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} {unit}"


def run(args: argparse.Namespace) -> int:
    from noisy_student_nnunet import validation
    from noisy_student_nnunet.errors import NsnError
    from noisy_student_nnunet.outputs import check_output_file
    from noisy_student_nnunet.profiling import profile_command

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise NsnError("no command to profile; usage: nsn profile [options] -- COMMAND ARGS...")
    # before the command runs: a result that cannot be written would waste the whole run
    validation.positive(args.interval, "--interval")
    for option, path in (("-o", args.output), ("--plot", args.plot)):
        if path:
            check_output_file(path, option)
    gpu: int | str | bool | None = False if args.no_gpu else args.gpu
    if isinstance(gpu, str) and gpu.isdigit():
        gpu = int(gpu)

    result = profile_command(command, interval=args.interval, gpu=gpu)
    if args.output:
        result.write_json(args.output)
    if args.plot:
        result.plot(args.plot)

    s = result.summary()
    lines = [
        f"wall time            {s['wall_time_s']:.2f} s, exit code {s['exit_code']}"
        + (f" (interrupted by {s['interrupted']})" if s["interrupted"] else ""),
        f"peak RSS (tree)      {_fmt(s['peak_rss_tree_mb'], 'MB')}"
        f"   largest process {_fmt(s['peak_rss_largest_process_mb'], 'MB')}",
        f"system RAM used      peak {_fmt(s['system_ram_used_peak_mb'], 'MB')}"
        f"   baseline {_fmt(s['system_ram_used_baseline_mb'], 'MB')}",
        f"CPU (FLARE, system)  peak {_fmt(s['cpu_utilisation_peak_percent'], '%', 1)}"
        f"   area {_fmt(s['cpu_utilisation_area_percent_s'], '%*s', 1)}",
        f"CPU (tree)           mean {_fmt(s['tree_cpu_percent_mean'], '%', 1)}"
        f"   CPU time {_fmt(s['tree_cpu_time_s'], 's', 2)}",
    ]
    if s["gpu_backend"] is None:
        lines.append("GPU                  none measured (null)")
    else:
        lines += [
            f"GPU {s['gpu_index']} ({s['gpu_name']})",
            f"  device memory      peak {_fmt(s['gpu_memory_peak_mb'], 'MB')}"
            f"   FLARE {_fmt(s['gpu_memory_flare_max_mb'], 'MB')}"
            f"   -2 GB {_fmt(s['gpu_memory_flare_tolerated_mb'], 'MB')}",
            f"  memory-time area   {_fmt(s['gpu_memory_area_mb_s'], 'MB*s')}"
            f"   -2 GB {_fmt(s['gpu_memory_area_tolerated_mb_s'], 'MB*s')}",
            f"  tree peak          {_fmt(s['gpu_tree_memory_peak_mb'], 'MB')}",
        ]
    print("\n".join(f"nsn profile: {line}" for line in lines), file=sys.stderr)
    if result.interrupted:
        import signal

        return 128 + int(signal.Signals[result.interrupted])
    return result.exit_code
