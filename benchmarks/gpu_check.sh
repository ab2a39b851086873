#!/usr/bin/env bash
# The CUDA paths, checked in one run on a lent GPU machine (within 8 minutes on one H100), or rehearsed on a CPU.
#
# Usage: bash benchmarks/gpu_check.sh OUTDIR [--cpu] [--wheels] [--steps a,b,c,d] [--budget SECONDS]
#
#   a  the CUDA tests: pytest -m cuda tests/test_cuda.py, and the CUDA export test of tests/test_inference.py
#   b  the whole chain, scripts/run_pipeline.sh with the tiny recipe on -D cuda: phantoms, stock
#      nnUNetv2_plan_and_preprocess, nsn plan, two teacher folds, pseudo-labels, a student, the fine-tune,
#      prediction under nsn profile, evaluation
#   c  benchmarks/bench_training_gpu.py: teacher, student and fine-tune of the FLARE22 recipe at full size against
#      stock nnUNetTrainer on the same plans, iterations per second, peak GPU memory, labeled:pseudo per batch
#   d  benchmarks/bench_gpu.py: a 512 x 512 x 300 phantom at 0.8 x 0.8 x 2.5 mm through the FLARE22 half-width
#      model with random weights, ours against stock nnUNetv2_predict with and without mirroring: wall time, peak
#      GPU memory (NVML through nsn profile), peak RSS, Dice of our labels against stock's
#
# Everything printed goes to OUTDIR/gpu_check.log too; OUTDIR/gpu_check.json holds the figures (benchmark, commit,
# machine, each step's status, seconds and figures; rewritten after every step), OUTDIR/*.json the benchmarks' own
# records.
#
# On the GPU machine (the default) the packages are not installed: the wheels of benchmarks/gpu_wheels.sh (.whl/,
# carried along) go into /tmp/site with pip --target, PYTHONPATH is /tmp/site:src, nnUNet_extTrainer names our
# trainer shim (the start-up hook that registers it comes only with an installed package), and the console scripts
# are small wrappers on PATH. The commit comes from git, else from $GPU_CHECK_COMMIT (the device copy of the work
# tree may have no .git). --cpu: this machine's .venv, -device cpu and sizes for 2 cores, no NVML figures.
# --wheels with --cpu: the GPU machine's wheel mode on this machine (gpu_wheels.sh prints the variables that point
# it at an emulation of the GPU image: GPU_CHECK_PYTHON, GPU_CHECK_WHEELS, GPU_CHECK_SITE). A step starts only if
# the time left of --budget (default 470 s on the GPU, 1200 s with --cpu) covers its least time, and is stopped at
# its own limit; --steps runs some of them again (in that order). The benchmarks write their records after every
# run, so a step stopped at its limit keeps what it measured (d runs ours first, then stock).
#
# With a lent GPU machine: `bash benchmarks/gpu_wheels.sh` on the CPU machine first, .whl/ carried along with the
# work tree, then `GPU_CHECK_COMMIT=<commit> bash benchmarks/gpu_check.sh OUTDIR` there; keep OUTDIR under
# docs/results/gpu_check/.
# On 2 CPU cores shared with other work --cpu takes 12 to 18 minutes (b the most); the GPU figures are not measured
# yet, and four steps at these sizes may want more than 470 s: then `--steps d` (or c) in a second call.
set -uo pipefail  # no -e: a failing step is recorded and the next one runs

# Everything runs inside main(), which bash reads whole before running it: editing this file during a run (or
# pulling another version) cannot change what the running check does.
main() {

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="" CPU=0 WHEELS_MODE="" STEPS="a,b,c,d" BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --wheels) WHEELS_MODE=1 ;;
    --steps) STEPS="${2:?--steps needs a list such as a,d}"; shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option '$1'; see -h" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_check.sh: one OUTDIR only" >&2; exit 2; }; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "usage: gpu_check.sh OUTDIR [--cpu] [--wheels] [--steps a,b,c,d]" >&2; exit 2; }
[[ "$STEPS" =~ ^[abcd](,[abcd])*$ ]] || { echo "gpu_check.sh: --steps takes letters a-d, e.g. a,d" >&2; exit 2; }
[ -n "$WHEELS_MODE" ] || WHEELS_MODE=$(( 1 - CPU ))
[ -n "$BUDGET" ] || BUDGET=$([ "$CPU" -eq 1 ] && echo 1200 || echo 470)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
START=$(date +%s)
DEADLINE=$(( START + BUDGET ))
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/nsn_gpu_check.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
STEPS_DIR="$SCRATCH/steps"  # each step's entry; gpu_check.json is assembled from them after every step
mkdir -p "$STEPS_DIR"
rm -f "$OUT/gpu_check.json"
MODE=$([ "$CPU" -eq 1 ] && echo cpu || echo gpu)
[ "$CPU" -eq 0 ] || [ "$WHEELS_MODE" -eq 0 ] || MODE="cpu (wheel mode)"
echo "[gpu_check] $(date -u +%FT%TZ) mode: $MODE, steps $STEPS, budget ${BUDGET} s, scratch $SCRATCH"

if [ "$CPU" -eq 0 ] && ! command -v nvidia-smi > /dev/null; then
  echo "gpu_check.sh: no nvidia-smi: not a GPU machine (use --cpu)" >&2
  exit 2
fi

# --- the runtime: .venv, or the wheels on PYTHONPATH with wrapper console scripts ------------------------------
if [ "$WHEELS_MODE" -eq 1 ]; then
  PY="${GPU_CHECK_PYTHON:-python3}"
  WHEELS="${GPU_CHECK_WHEELS:-$REPO/.whl}"
  SITE="${GPU_CHECK_SITE:-/tmp/site}"
  ls "$WHEELS"/*.whl > /dev/null 2>&1 \
    || { echo "gpu_check.sh: no wheels in $WHEELS (run benchmarks/gpu_wheels.sh, carry .whl)" >&2; exit 2; }
  t0=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "gpu_check.sh: installing the wheels into $SITE failed" >&2; exit 1; }
  WHEELS_S=$(( $(date +%s) - t0 ))
  echo "[gpu_check] $(ls "$WHEELS"/*.whl | wc -l) wheels installed into $SITE in ${WHEELS_S} s"
  export PYTHONPATH="$SITE:$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
  export nnUNet_extTrainer="$REPO/src/noisy_student_nnunet/nnunet_ext"
  WRAPPERS="$SCRATCH/bin"
  mkdir -p "$WRAPPERS"
  # the console scripts: nnU-Net's from its installed entry_points.txt, ours from pyproject.toml
  "$PY" - "$SITE" "$REPO/pyproject.toml" "$WRAPPERS" "$PY" <<'PY' || exit 1
import configparser, glob, os, shlex, sys, tomllib
site, pyproject, bin_dir, python = sys.argv[1:]
wanted = {"nnUNetv2_train", "nnUNetv2_predict", "nnUNetv2_plan_and_preprocess", "nnUNetv2_evaluate_folder", "nsn",
          "nnUNetv2_predict_lowfootprint"}
scripts = {}
for path in glob.glob(os.path.join(site, "*.dist-info", "entry_points.txt")):
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(path)
    if parser.has_section("console_scripts"):
        scripts.update(parser.items("console_scripts"))
scripts.update(tomllib.load(open(pyproject, "rb"))["project"]["scripts"])
missing = sorted(wanted - set(scripts))
assert not missing, f"no entry point for {missing}"
for name in sorted(wanted):
    module, _, function = scripts[name].partition(":")
    code = f"import sys; from {module} import {function} as main; sys.argv[0] = {name!r}; sys.exit(main())"
    with open(os.path.join(bin_dir, name), "w") as handle:
        handle.write(f"#!/bin/sh\nexec {shlex.quote(python)} -c {shlex.quote(code)} \"$@\"\n")
    os.chmod(os.path.join(bin_dir, name), 0o755)
print(f"[gpu_check] wrappers in {bin_dir}: {', '.join(sorted(wanted))}")
PY
  export PATH="$WRAPPERS:$PATH"
else
  PY="$REPO/.venv/bin/python"
  WHEELS_S=null
  export PATH="$REPO/.venv/bin:$PATH"
fi
export NSN_PYTHON="$PY"
for var in NSN_RECIPE NSN_PSEUDO_DATASET NSN_FINETUNE_FROM; do unset "$var"; done

if [ "$CPU" -eq 1 ]; then
  DEVICE=cpu
  export OMP_NUM_THREADS=1 nnUNet_def_n_proc=2  # 2 busy cores: no oversubscription
  DA_WORKERS=0
  # least and most seconds of each step (the budget decides between them)
  LEAST_A=20 LIMIT_A=120 LEAST_B=240 LIMIT_B=720 LEAST_C=120 LIMIT_C=400 LEAST_D=90 LIMIT_D=400
  PHANTOMS=(-n 5 -u 2 -t 2)  # labeled (nnU-Net's 5 folds need 5), unlabeled, test
else
  DEVICE=cuda
  export nnUNet_def_n_proc=8
  DA_WORKERS=12  # nnU-Net's default where its host table does not know the machine
  LEAST_A=20 LIMIT_A=90 LEAST_B=90 LIMIT_B=200 LEAST_C=60 LIMIT_C=200 LEAST_D=60 LIMIT_D=220
  PHANTOMS=(-n 8 -u 4 -t 2)
fi

# --- the machine ---------------------------------------------------------------------------------------------
COMMIT="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "${GPU_CHECK_COMMIT:-unknown}")"
DIRTY="$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | wc -l | tr -d ' ')"
git -C "$REPO" rev-parse HEAD > /dev/null 2>&1 || DIRTY=null
SMI_L="$(nvidia-smi -L 2>/dev/null || echo "no nvidia-smi")"
SMI_Q="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "no nvidia-smi")"
"$PY" - "$STEPS_DIR/machine.json" "$SMI_L" "$SMI_Q" <<'PY'
import json, os, platform, sys
import psutil, torch
path, smi_l, smi_q = sys.argv[1:]
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
json.dump({"nvidia_smi_L": smi_l, "nvidia_smi_query": smi_q, "python": platform.python_version(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1)},
          open(path, "w"), indent=1)
print(f"[gpu_check] machine: {smi_q}; python {platform.python_version()}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}), {cpu}, {os.cpu_count()} cores")
PY

# record NAME STATUS SECONDS [FIGURES_JSON_FILE]: the step's entry of gpu_check.json
record() {
  "$PY" - "$STEPS_DIR/$1.json" "$1" "$2" "$3" "${4:-}" <<'PY'
import json, sys
path, name, status, seconds, figures = sys.argv[1:]
entry = {"step": name, "status": status, "seconds": float(seconds)}
if figures:
    try:
        entry["figures"] = json.load(open(figures))
    except (OSError, ValueError) as error:
        entry["figures"] = None
        entry["figures_error"] = str(error)
json.dump(entry, open(path, "w"), indent=1)
PY
  echo "[gpu_check] step $1: $2 ($3 s)"
  assemble 0 || true
}

# assemble FINISHED: OUTDIR/gpu_check.json from the steps so far (after every step: a run stopped from outside
# keeps a record of what it did); exit status 1 unless every step is ok (and, FINISHED=1, the run is over)
assemble() {
  "$PY" - "$OUT" "$STEPS_DIR" "$COMMIT" "$DIRTY" "$CPU" "$WHEELS_MODE" "$WHEELS_S" "$(( $(date +%s) - START ))" \
    "$BUDGET" "$STEPS" "$1" <<'PY'
import glob, json, os, sys
out, steps_dir, commit, dirty, cpu, wheels_mode, wheels_s, total, budget, steps, finished = sys.argv[1:]
order = {"tests": 0, "pipeline": 1, "training": 2, "inference": 3}
entries = sorted((json.load(open(p)) for p in glob.glob(os.path.join(steps_dir, "*.json"))
                  if not p.endswith("machine.json")), key=lambda e: order.get(e["step"], 9))
record = {
    "benchmark": "gpu_check",
    "mode": "cpu" if cpu == "1" else "gpu",
    "wheel_mode": wheels_mode == "1",
    "commit": commit,
    "uncommitted_changes_to_tracked_files": None if dirty == "null" else int(dirty),
    "machine": json.load(open(os.path.join(steps_dir, "machine.json"))),
    "wheels_install_s": None if wheels_s == "null" else float(wheels_s),
    "budget_s": int(budget),
    "steps_requested": steps,
    "finished": finished == "1",
    "total_s": int(total),
    "steps": entries,
    "ok": finished == "1" and all(e["status"].startswith("ok") for e in entries),
}
json.dump(record, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
if finished == "1":
    print(f"[gpu_check] {out}/gpu_check.json: " + ", ".join(f"{e['step']} {e['status']} ({e['seconds']:.0f} s)"
                                                         for e in entries) + f"; total {total} s")
sys.exit(0 if record["ok"] else 1)
PY
}

# run_limited SECONDS CMD...: CMD stopped after SECONDS (exit 124)
run_limited() { local limit="$1"; shift; timeout --kill-after=15 "$limit" "$@"; }

# begin NAME LEAST LIMIT: 0 and the step's limit (what is left of the budget, at most LIMIT) in $LIMIT when the
# step can start, 1 (recorded as skipped) when less than LEAST seconds are left
begin() {
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt "$2" ]; then
    record "$1" "skipped: ${left} s of the budget left, the step needs at least $2 s" 0
    return 1
  fi
  LIMIT=$(( left < $3 ? left : $3 ))
  STEP_START=$(date +%s)
  echo "[gpu_check] === step $1 (limit ${LIMIT} s) ==="
  return 0
}
elapsed() { echo $(( $(date +%s) - STEP_START )); }
status_of() { case "$1" in 0) echo ok ;; 124|137) echo "timed out" ;; *) echo "failed (exit $1)" ;; esac; }

# --- a: the CUDA tests ---------------------------------------------------------------------------------------
step_a() {
  begin tests "$LEAST_A" "$LIMIT_A" || return 0
  local code=0 code_export=0
  (cd "$REPO" && run_limited "$LIMIT" "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py) \
    | tee "$SCRATCH/tests.txt"
  code=${PIPESTATUS[0]}
  (cd "$REPO" && run_limited "$LIMIT" "$PY" -m pytest -q -rs -p no:cacheprovider \
    "tests/test_inference.py::test_cuda_export_equals_cpu_export") | tee "$SCRATCH/tests_export.txt"
  code_export=${PIPESTATUS[0]}
  "$PY" - "$SCRATCH/tests.txt" "$SCRATCH/tests_export.txt" "$SCRATCH/tests.json" <<'PY'
import json, re, sys
def counts(path):
    text = open(path).read()
    found = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    return {"passed": found.get("passed", 0), "failed": found.get("failed", 0), "skipped": found.get("skipped", 0),
            "errors": found.get("error", 0) + found.get("errors", 0),
            "skip_reasons": sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", text)))}
json.dump({"pytest -m cuda tests/test_cuda.py": counts(sys.argv[1]),
           "tests/test_inference.py::test_cuda_export_equals_cpu_export": counts(sys.argv[2])},
          open(sys.argv[3], "w"), indent=1)
PY
  local status
  status=$(status_of $(( code != 0 ? code : code_export )))
  if [ "$status" = ok ] && ! grep -q " passed" "$SCRATCH/tests.txt"; then status="ok: all skipped (no CUDA device)"; fi
  record tests "$status" "$(elapsed)" "$SCRATCH/tests.json"
}

# --- b: the whole chain --------------------------------------------------------------------------------------
step_b() {
  begin pipeline "$LEAST_B" "$LIMIT_B" || return 0
  local work="$SCRATCH/pipeline" id=921 code=0 t_stage
  export nnUNet_raw="$work/raw" nnUNet_preprocessed="$work/preprocessed" nnUNet_results="$work/results"
  mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
  local da=$(( DA_WORKERS < 4 ? DA_WORKERS : 4 ))  # the tiny recipe's batches are small: 4 workers keep up
  local raw="$nnUNet_raw/Dataset${id}_GpuCheck" stages="$SCRATCH/pipeline_stages.txt"
  : > "$stages"
  stage() {  # stage NAME CMD...: timed, in the step's limit
    local name="$1" t
    shift
    t=$(date +%s)
    echo "[gpu_check] pipeline: $name: $*"
    local left=$(( DEADLINE - $(date +%s) ))
    nnUNet_compile=0 nnUNet_n_proc_DA="${STAGE_DA:-$da}" run_limited $(( left > 10 ? left : 10 )) "$@"
    local rc=$?
    echo "$name $(( $(date +%s) - t )) $rc" >> "$stages"
    return $rc
  }
  # stock planning sets torch's threads to nnUNet_n_proc_DA, and 0 is an error there (nsn plan guards against it)
  local deadline_b=$(( STEP_START + LIMIT ))
  local saved_deadline=$DEADLINE
  DEADLINE=$deadline_b
  stage phantoms nsn phantoms -d "$id" --name GpuCheck "${PHANTOMS[@]}" --slices 24 40 --inplane-voxels 64 80 \
      --slice-spacing 2.0 3.0 -o "$nnUNet_raw" \
    && STAGE_DA=$(( da > 0 ? da : 1 )) stage plan_and_preprocess nnUNetv2_plan_and_preprocess -d "$id" \
         -c 3d_fullres -np "$nnUNet_def_n_proc" \
    && stage run_pipeline bash "$REPO/scripts/run_pipeline.sh" -d "$id" -u "$raw/imagesUnlabeled" -t "$raw/imagesTs" \
         -l "$raw/labelsTs" -r tiny -f "0 1" -s "0" -D "$DEVICE" -w "$work/run" $([ "$CPU" -eq 1 ] && echo "-j 2")
  code=$?
  DEADLINE=$saved_deadline
  "$PY" - "$work" "$stages" "$SCRATCH/pipeline.json" "$raw" <<'PY'
import glob, json, os, re, sys
from datetime import datetime
work, stages, out, raw = sys.argv[1:]
figures = {"stages": {}, "pipeline_steps_s": {}}
for line in open(stages):
    name, seconds, code = line.split()
    figures["stages"][name] = {"seconds": int(seconds), "exit": int(code)}
logs = os.path.join(work, "run", "logs")
if os.path.isfile(os.path.join(logs, "pipeline.log")):
    # "[HH:MM:SS] step: command" starts a step; it ends with the last write to its own log (folds run side by side)
    for line in open(os.path.join(logs, "pipeline.log")):
        m = re.match(r"^\[(\d\d:\d\d:\d\d)\] ([^:]+): (?!done already)", line)
        step_log = os.path.join(logs, f"{m.group(2)}.log") if m else ""
        if m and os.path.isfile(step_log):
            end = datetime.fromtimestamp(os.path.getmtime(step_log))
            start = datetime.combine(end.date(), datetime.strptime(m.group(1), "%H:%M:%S").time())
            seconds = (end - start).total_seconds() % 86400  # past midnight too
            figures["pipeline_steps_s"][m.group(2)] = round(seconds, 1)
summary = os.path.join(work, "run", "evaluation_summary.json")
if os.path.isfile(summary):
    figures["test_dsc_mean"] = json.load(open(summary))["overall"]["DSC"]["mean"]
profile = os.path.join(work, "run", "profile_predict.json")
if os.path.isfile(profile):
    p = json.load(open(profile))
    figures["predict_profile"] = {k: p.get(k) for k in ("exit_code", "wall_time_s", "peak_rss_tree_mb",
                                                        "gpu_memory_peak_mb", "gpu_name")}
figures["folds"] = {}
for fold in sorted(glob.glob(os.path.join(work, "results", "*", "*__*__3d_fullres", "fold_*"))):
    name = f"{os.path.basename(os.path.dirname(fold)).split('__')[0]}/{os.path.basename(fold)}"
    entry = {"checkpoint_final": os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))}
    cost = os.path.join(fold, "training_cost.json")
    if os.path.isfile(cost):
        c = json.load(open(cost))
        entry.update(iterations=c.get("iterations"), cpu_minutes=c.get("cpu_minutes"))
    validation = os.path.join(fold, "validation", "summary.json")
    if os.path.isfile(validation):
        entry["validation_dice"] = json.load(open(validation))["foreground_mean"]["Dice"]
    figures["folds"][name] = entry
tests = sorted(glob.glob(os.path.join(raw, "imagesTs", "*.nii.gz")))
predicted = glob.glob(os.path.join(work, "run", "predictions_finetuned", "*.nii.gz"))
figures["test_images"], figures["predictions"] = len(tests), len(predicted)
figures["complete"] = bool(tests) and len(predicted) == len(tests) and "test_dsc_mean" in figures
json.dump(figures, open(out, "w"), indent=1)
print(f"[gpu_check] pipeline figures: {json.dumps({k: v for k, v in figures.items() if k != 'folds'})}")
PY
  local status; status=$(status_of "$code")
  if [ "$status" = ok ] && ! grep -q '"complete": true' "$SCRATCH/pipeline.json"; then
    status="failed: outputs incomplete"
  fi
  record pipeline "$status" "$(elapsed)" "$SCRATCH/pipeline.json"
  if [ "$status" != ok ]; then  # the step logs, for what went wrong
    mkdir -p "$OUT/pipeline_logs" && cp "$work"/run/logs/*.log "$OUT/pipeline_logs/" 2>/dev/null
    tail -n 5 "$work"/run/logs/*.log 2>/dev/null | tail -n 40
  fi
  unset nnUNet_raw nnUNet_preprocessed nnUNet_results
}

# --- c: training speed of the FLARE22 recipe -----------------------------------------------------------------
step_c() {
  begin training "$LEAST_C" "$LIMIT_C" || return 0
  rm -f "$OUT/bench_training_gpu.json"
  local args=(--device "$DEVICE" --work "$SCRATCH/training" --output "$OUT/bench_training_gpu.json")
  if [ "$CPU" -eq 1 ]; then
    args+=(--iterations 2 --warmup 1 --small --cases 5 --processes 2 --override 'network.patch_size=[16,64,64]')
  else
    args+=(--iterations 50 --warmup 3 --processes 8)
  fi
  (cd "$REPO/benchmarks" && run_limited "$LIMIT" "$PY" bench_training_gpu.py "${args[@]}" --da_workers "$DA_WORKERS" \
    --timeout "$LIMIT")
  local code=$?
  record training "$(status_of "$code")" "$(elapsed)" "$OUT/bench_training_gpu.json"
  if [ "$code" -ne 0 ]; then  # the trainers' logs, for what went wrong
    mkdir -p "$OUT/training_logs" && cp "$SCRATCH"/training/logs/*.log "$OUT/training_logs/"
  fi
}

# --- d: the predictor on a clinical-size CT against stock ---------------------------------------------------
step_d() {
  begin inference "$LEAST_D" "$LIMIT_D" || return 0
  rm -f "$OUT/bench_gpu.json"
  local args=(--device "$DEVICE" --workdir "$SCRATCH/inference" --output "$OUT/bench_gpu.json"
              --runs ours stock_notta stock ours_linear)  # what matters most first, should the time run out
  if [ "$CPU" -eq 1 ]; then
    args+=(--shape 48 96 96 --spacing 2.5 0.8 0.8 --patch 32 48 48)
  else
    args+=(--shape 300 512 512 --spacing 2.5 0.8 0.8)
  fi
  (cd "$REPO/benchmarks" && nnUNet_compile=0 run_limited "$LIMIT" "$PY" bench_gpu.py "${args[@]}")
  local code=$?
  record inference "$(status_of "$code")" "$(elapsed)" "$OUT/bench_gpu.json"
  if [ "$code" -ne 0 ]; then  # the predictions' logs
    mkdir -p "$OUT/inference_logs" && cp "$SCRATCH"/inference/*/log_*.txt "$OUT/inference_logs/"
  fi
}

IFS=, read -r -a STEP_LIST <<< "$STEPS"
for s in "${STEP_LIST[@]}"; do "step_$s"; done

assemble 1
RC=$?
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log is complete when the script returns
exit $RC
}

main "$@"
