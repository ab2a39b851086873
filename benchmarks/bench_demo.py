"""``nsn demo`` timed stage by stage, optionally with the kernels of an AVX2-only CPU (issue 20 item 6).

    python benchmarks/bench_demo.py --workdir /tmp/nsn_bench_demo [--seed 23] [--isa avx2] [--setting iid] [--minutes M]

Runs the demo as users run it (``nsn demo`` in a subprocess, a fresh work folder unless ``--resume``), then prints
the minutes of each stage (from the pipeline's own log: phantoms, plan, teachers, pseudo-labels, student,
fine-tune, the demo's predictions of each stage's model) and the fine-tuned student's DSC against the demo's
targets (0.70 on liver, kidneys, stomach, spleen and aorta; a 13-organ mean of 0.45). ``--isa avx2`` caps every
library at AVX2 and takes the fp32 path (see ``_common.ISA_CAPS``): the code an AVX2-only CPU runs, at this
CPU's clock. ``--minutes`` is passed to ``nsn demo`` (the budget its epochs are sized to from a measured step; 0
trains the whole recipe; a budget no CPU meets, such as 1, trains the smallest share); the recipe line printed
says what the demo chose.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from _common import BIN, ISA_CAPS, apply_isa_cap, machine, table

#: the demo's targets for the fine-tuned student (docs/experiments.md, "The demo")
TARGET_ORGANS = ("Liver", "RK", "LK", "Stomach", "Spleen", "Aorta")
TARGET_DSC, TARGET_MEAN = 0.70, 0.45
_LINE = re.compile(r"^\[(\d\d:\d\d:\d\d)\] ([^:]+):")


def stage_starts(pipeline_log: Path) -> list[tuple[str, datetime]]:
    """(step name, start) of each pipeline step, in order; steps started together (side-by-side folds) merge."""
    starts: list[tuple[str, datetime]] = []
    for line in pipeline_log.read_text().splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        name = re.sub(r"_fold\d+$", "", match.group(2))
        when = datetime.strptime(match.group(1), "%H:%M:%S")
        if starts and when < starts[-1][1]:  # past midnight
            when += timedelta(days=1)
        if not starts or starts[-1][0] != name:
            starts.append((name, when))
    return starts


def stage_minutes(pipeline_log: Path, demo_seconds: float, pipeline_offset_s: float) -> list[dict]:
    """Minutes per stage: phantoms until the pipeline's first step, each step until the next, the demo's rest."""
    starts = stage_starts(pipeline_log)
    rows = [{"stage": "phantoms and start-up", "minutes": pipeline_offset_s / 60}]
    for (name, began), (_, ended) in zip(starts, starts[1:]):
        rows.append({"stage": name, "minutes": (ended - began).total_seconds() / 60})
    pipeline_s = (starts[-1][1] - starts[0][1]).total_seconds()
    rows.append({"stage": "predictions of each stage's model, table",
                 "minutes": (demo_seconds - pipeline_offset_s - pipeline_s) / 60})
    rows.append({"stage": "total", "minutes": demo_seconds / 60})
    return rows


def target_check(results: dict) -> tuple[list[dict], bool]:
    """The fine-tuned student's DSC on the target organs and the mean; whether every target holds."""
    fine_tuned = next(v for k, v in results["stages"].items() if k.startswith("fine-tuned"))
    rows = [{"organ": organ, "DSC": fine_tuned["organs"][organ]["DSC"], "target": TARGET_DSC}
            for organ in TARGET_ORGANS]
    rows.append({"organ": "mean (13)", "DSC": fine_tuned["mean"]["DSC"], "target": TARGET_MEAN})
    for row in rows:
        row["met"] = "yes" if row["DSC"] >= row["target"] else "NO"
    return rows, all(row["met"] == "yes" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="the demo's work folder (emptied unless --resume)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setting", choices=("iid", "shift"), default="iid")
    parser.add_argument("--isa", choices=list(ISA_CAPS), default=None,
                        help="cap every library's kernels at this instruction set and take the fp32 path")
    parser.add_argument("--resume", action="store_true", help="keep the work folder: time only what is left")
    parser.add_argument("--minutes", type=float, default=None,
                        help="nsn demo --minutes: the budget its epochs are sized to (default: the demo's; 0: all)")
    args = parser.parse_args(argv)
    isa_line = apply_isa_cap(args.isa)
    print(f"Machine: {machine()}\n{isa_line}", flush=True)
    if args.workdir.exists() and not args.resume:
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    command = [str(BIN / "nsn"), "demo", "-w", str(args.workdir), "--seed", str(args.seed), "--setting",
               args.setting, "--device", "cpu",
               *(["--minutes", f"{args.minutes:g}"] if args.minutes is not None else [])]
    started = time.time()
    with open(args.workdir / "bench_demo.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - started
    if code != 0:
        print(f"nsn demo failed (exit {code}); see {args.workdir / 'bench_demo.log'}")
        return 1
    pipeline_log = args.workdir / "pipeline" / "logs" / "pipeline.log"
    first_step = stage_starts(pipeline_log)[0][1]
    offset = (first_step - datetime.strptime(time.strftime("%H:%M:%S", time.localtime(started)), "%H:%M:%S"))
    stages = stage_minutes(pipeline_log, seconds, max(0.0, offset.total_seconds()))
    results = json.loads((args.workdir / "demo_results.json").read_text())
    targets, met = target_check(results)
    print(f"\nMachine: {machine()}\n{isa_line}\n"
          f"Command: python benchmarks/bench_demo.py {' '.join(argv or sys.argv[1:])}")
    recipe_line = next((line.strip() for line in (args.workdir / "bench_demo.log").read_text().splitlines()
                        if line.startswith("[2/4]")), "?")
    print(f"\n`{' '.join(command[1:])}`: {recipe_line}\n\nstage by stage:")
    print(table(stages, [("stage", "stage"), ("minutes", "minutes")]))
    print(f"\nfine-tuned student against the demo's targets: {'all met' if met else 'NOT all met'}")
    print(table(targets, [("organ", "organ"), ("DSC", "DSC"), ("target", "target"), ("met", "met")]))
    (args.workdir / "bench_demo.json").write_text(json.dumps(
        {"machine": machine(), "isa": isa_line, "command": command, "recipe": recipe_line, "stages": stages,
         "targets": targets, "targets_met": met}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
