#!/usr/bin/env bash
# The noisy nnU-Net student, end to end, with stock nnU-Net commands and ours:
#   plan -> teacher folds -> pseudo-labels -> student folds -> best fold -> fine-tune -> predict -> evaluate.
#
# Usage: run_pipeline.sh -d DATASET_ID -u UNLABELED_IMAGES_DIR [options]
#   -d ID            labeled nnU-Net raw dataset (in $nnUNet_raw)
#   -u DIR           folder of unlabeled images (CASE_0000.nii.gz)
#   -t DIR           test images to predict (optional)
#   -l DIR           reference labels of the test images (optional; enables evaluation)
#   -r RECIPE        recipe name or file (default: flare22)
#   -f "0 1 2 3 4"   teacher folds (default: all five)
#   -s "0 1 2 3 4"   student folds, of which the best by cross-validation is fine-tuned (default: the teacher folds)
#   -o NAME_OR_ID    pseudo-labeled dataset (default: next free id)
#   -w DIR           work folder for predictions, logs, profiles (default: $nnUNet_results/noisy_student_pipeline/DatasetID)
#   -g "0 1"         GPU ids: folds and pseudo-label parts run one process per GPU (default: sequential)
#   -j N             CPU (-D cpu): train N folds at once, each with 1/N of the cores and of nnUNet_n_proc_DA
#                    (default 1). Small networks use several cores poorly: two demo teachers side by side finish
#                    sooner than one after the other
#   -D DEVICE        cuda | cpu (default: cuda)
#   -R N             rounds of pseudo-labeling (default 1; N > 1: the fine-tuned student becomes the next teacher)
#   -p PLANS         plans name (default nnUNetLowFootprintPlans)
#
# Every step skips when its outputs are complete, so a rerun resumes, also after a kill (training goes on from
# nnU-Net's checkpoint_latest.pth, pseudo-labels and predictions skip finished cases). Each step logs to
# WORK/logs/<step>.log; the first failure stops the run and names the step and its log.
#
# Pseudo-labeling thousands of scans on a SLURM cluster: run the parts as an array job, then finalize once:
#   #SBATCH --array=0-15 --gres=gpu:1
#   nsn pseudolabel -d ID -i UNLABELED -f 0 1 2 3 4 -o NAME --num-parts 16 --part-id $SLURM_ARRAY_TASK_ID
#   # after the array (sbatch --dependency=afterok:JOBID): nsn pseudolabel ... -o NAME --finalize
set -euo pipefail

# Everything runs inside main(), which bash parses completely before running it: editing this file while a
# pipeline runs (or pulling a new version) cannot change what the running pipeline does.
main() {

DATASET="" UNLABELED="" TEST_IMAGES="" TEST_LABELS="" RECIPE="flare22" FOLDS="0 1 2 3 4" STUDENT_FOLDS="" PSEUDO=""
WORK="" GPUS="" JOBS=1 DEVICE="cuda" ROUNDS=1 PLANS="nnUNetLowFootprintPlans" CONFIG="3d_fullres"
while getopts "d:u:t:l:r:f:s:o:w:g:j:D:R:p:h" opt; do
  case "$opt" in
    d) DATASET="$OPTARG" ;; u) UNLABELED="$OPTARG" ;; t) TEST_IMAGES="$OPTARG" ;; l) TEST_LABELS="$OPTARG" ;;
    r) RECIPE="$OPTARG" ;; f) FOLDS="$OPTARG" ;; s) STUDENT_FOLDS="$OPTARG" ;; o) PSEUDO="$OPTARG" ;; w) WORK="$OPTARG" ;;
    g) GPUS="$OPTARG" ;; j) JOBS="$OPTARG" ;; D) DEVICE="$OPTARG" ;; R) ROUNDS="$OPTARG" ;; p) PLANS="$OPTARG" ;;
    h) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "run_pipeline.sh: unknown option; see -h" >&2; exit 2 ;;
  esac
done
[ -n "$DATASET" ] || { echo "run_pipeline.sh: -d DATASET_ID is required" >&2; exit 2; }
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || { echo "run_pipeline.sh: -j must be a positive integer, got '$JOBS'" >&2; exit 2; }
read -r -a TEACHER_FOLD_LIST <<< "$FOLDS"
read -r -a STUDENT_FOLD_LIST <<< "${STUDENT_FOLDS:-$FOLDS}"
[ ${#TEACHER_FOLD_LIST[@]} -gt 0 ] && [ ${#STUDENT_FOLD_LIST[@]} -gt 0 ] || { echo "run_pipeline.sh: -f and -s need at least one fold" >&2; exit 2; }
[ -n "$UNLABELED" ] && [ -d "$UNLABELED" ] || { echo "run_pipeline.sh: -u must name a folder of unlabeled images, got '$UNLABELED'" >&2; exit 2; }
[ -z "$TEST_IMAGES" ] || [ -d "$TEST_IMAGES" ] || { echo "run_pipeline.sh: test image folder not found: $TEST_IMAGES" >&2; exit 2; }
for var in nnUNet_raw nnUNet_preprocessed nnUNet_results; do
  [ -n "${!var:-}" ] || { echo "run_pipeline.sh: environment variable $var is not set" >&2; exit 2; }
done
PYTHON="${NSN_PYTHON:-python}"
DATASET_NAME=$("$PYTHON" -c "
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name as m; print(m('$DATASET'))") \
  || { echo "run_pipeline.sh: dataset $DATASET not found in \$nnUNet_raw or \$nnUNet_preprocessed" >&2; exit 2; }
WORK="${WORK:-$nnUNet_results/noisy_student_pipeline/$DATASET_NAME}"
LOGS="$WORK/logs"; mkdir -p "$LOGS" "$nnUNet_preprocessed/$DATASET_NAME"
# One pipeline per work folder and per dataset + plans name: a second one is refused with one line naming the run
# that holds them (pid, host). The locks belong to descriptors 8 and 9 of this shell and of every step it starts;
# they vanish when all of those end, even by SIGKILL, so a rerun after a kill is never blocked by a stale lock.
exec 8<>"$WORK/.nsn.lock"
"$PYTHON" -m noisy_student_nnunet.locks 8 "$WORK/.nsn.lock" $$ "run_pipeline.sh -w $WORK" || exit 2
exec 9<>"$nnUNet_preprocessed/$DATASET_NAME/.nsn_pipeline_$PLANS.lock"
"$PYTHON" -m noisy_student_nnunet.locks 9 "$nnUNet_preprocessed/$DATASET_NAME/.nsn_pipeline_$PLANS.lock" $$ \
  "run_pipeline.sh -d $DATASET -p $PLANS" || exit 2
read -r -a GPU_LIST <<< "${GPUS:-}"
CPU_THREADS_PER_JOB=$(( $("$PYTHON" -c 'from noisy_student_nnunet.cpu_threads import cpu_thread_count as c; print(c())') / JOBS ))
[ "$CPU_THREADS_PER_JOB" -ge 1 ] || CPU_THREADS_PER_JOB=1
# ... and 1/N of the augmentation workers (nnU-Net's default 12 when unset); 0 = augmentation in the training
# process, which on a core of its own beats a worker competing with the other job for the cores
DA_WORKERS_PER_JOB=$(( ${nnUNet_n_proc_DA:-12} / JOBS ))

# step NAME CMD...: run CMD with its output in LOGS/NAME.log; stop the pipeline on failure.
step() {
  local name="$1"; shift
  echo "[$(date +%H:%M:%S)] $name: $*" | tee -a "$LOGS/pipeline.log"
  if ! "$@" > "$LOGS/$name.log" 2>&1; then
    echo "run_pipeline.sh: step '$name' failed; see $LOGS/$name.log:" >&2
    tail -n 15 "$LOGS/$name.log" >&2
    exit 1
  fi
}
skip() { echo "[$(date +%H:%M:%S)] $1: done already, skipped" | tee -a "$LOGS/pipeline.log"; }

# results_dir TRAINER [PLANS]
results_dir() { echo "$nnUNet_results/$DATASET_NAME/$1__${2:-$STUDENT_PLANS}__$CONFIG"; }

# train_folds TRAINER FOLD...: one nnUNetv2_train per fold, one process per GPU when -g is given.
train_folds() {
  local trainer="$1" fold i=0 pids=()
  shift
  for fold in "$@"; do
    if [ -f "$(results_dir "$trainer")/fold_$fold/validation/summary.json" ]; then skip "train_${trainer}_fold$fold"; continue; fi
    local cont; cont=$(resume_option "$(results_dir "$trainer")/fold_$fold")
    if [ ${#GPU_LIST[@]} -gt 0 ]; then
      CUDA_VISIBLE_DEVICES="${GPU_LIST[$((i % ${#GPU_LIST[@]}))]}" step "train_${trainer}_fold$fold" \
        nnUNetv2_train "$DATASET" "$CONFIG" "$fold" -tr "$trainer" -p "$STUDENT_PLANS" -device "$DEVICE" $cont &
      pids+=($!); i=$((i + 1))
      if [ ${#pids[@]} -ge ${#GPU_LIST[@]} ]; then wait_all "${pids[@]}"; pids=(); fi
    elif [ "$DEVICE" = cpu ] && [ "$JOBS" -gt 1 ] && [ $# -gt 1 ]; then
      NSN_NUM_THREADS="$CPU_THREADS_PER_JOB" nnUNet_n_proc_DA="$DA_WORKERS_PER_JOB" step "train_${trainer}_fold$fold" \
        nnUNetv2_train "$DATASET" "$CONFIG" "$fold" -tr "$trainer" -p "$STUDENT_PLANS" -device "$DEVICE" $cont &
      pids+=($!)
      if [ ${#pids[@]} -ge "$JOBS" ]; then wait_all "${pids[@]}"; pids=(); fi
    else
      step "train_${trainer}_fold$fold" nnUNetv2_train "$DATASET" "$CONFIG" "$fold" -tr "$trainer" -p "$STUDENT_PLANS" -device "$DEVICE" $cont
    fi
  done
  [ ${#pids[@]} -eq 0 ] || wait_all "${pids[@]}"
}

# resume_option FOLD_FOLDER: how nnUNetv2_train goes on after a kill. Trained but not validated: --val (validation
# only); a checkpoint_latest.pth: --c (nnU-Net resumes at the epoch after it); nothing: a fresh start.
resume_option() {
  if [ -f "$1/checkpoint_final.pth" ]; then echo "--val"
  elif [ -f "$1/checkpoint_latest.pth" ]; then echo "--c"; fi
}

# wait_all PID...: wait for every background step; exit 1 if any failed (each failing step named itself)
wait_all() {
  local pid failed=0
  for pid in "$@"; do wait "$pid" || failed=1; done
  [ "$failed" -eq 0 ] || exit 1
}

# best_fold TRAINER: the fold with the highest cross-validation foreground Dice.
best_fold() {
  "$PYTHON" -c 'import sys; from pathlib import Path; from noisy_student_nnunet.demo import best_fold
print(best_fold(Path(sys.argv[1]), tuple(sys.argv[2:])))' "$(results_dir "$1")" "${STUDENT_FOLD_LIST[@]}"
}

# --- 1. plans --------------------------------------------------------------------------------------
if [ -f "$nnUNet_preprocessed/$DATASET_NAME/$PLANS.json" ]; then skip plan
else step plan nsn plan -d "$DATASET" --recipe "$RECIPE" --plans-name "$PLANS"; fi

TEACHER=NoisyStudentTeacherTrainer TEACHER_PLANS="$PLANS" TEACHER_FOLDS=("${TEACHER_FOLD_LIST[@]}") STUDENT_PLANS="$PLANS"
for round in $(seq 1 "$ROUNDS"); do
  if [ "$round" -eq 1 ]; then
    # --- 2. teachers ----------------------------------------------------------------------------------
    train_folds "$TEACHER" "${TEACHER_FOLD_LIST[@]}"
  else
    # later rounds: the previous fine-tuned student teaches; the new student gets plans of its own
    # (same network and preprocessed data) so that its results folder does not collide
    STUDENT_PLANS="${PLANS}_round$round"
    [ -f "$nnUNet_preprocessed/$DATASET_NAME/$STUDENT_PLANS.json" ] || "$PYTHON" - "$nnUNet_preprocessed/$DATASET_NAME" "$PLANS" "$STUDENT_PLANS" <<'PY'
import json, os, sys
folder, source, target = sys.argv[1:]
plans = json.load(open(f"{folder}/{source}.json"))
plans["plans_name"] = target
with open(f"{folder}/{target}.json.tmp", "w") as f:
    json.dump(plans, f, indent=2)
os.replace(f"{folder}/{target}.json.tmp", f"{folder}/{target}.json")
PY
  fi

  # --- 3. pseudo-labels (recorded in the student's plans) ------------------------------------------------
  PSEUDO_NAME="$PSEUDO"; [ "$round" -gt 1 ] && [ -n "$PSEUDO" ] && PSEUDO_NAME="${PSEUDO}_round$round"
  pseudo_args=(-d "$DATASET" -i "$UNLABELED" -f "${TEACHER_FOLDS[@]}" -tr "$TEACHER" -p "$TEACHER_PLANS" -c "$CONFIG"
               --student-plans "$STUDENT_PLANS" -device "$DEVICE")
  [ -z "$PSEUDO_NAME" ] || pseudo_args+=(-o "$PSEUDO_NAME")
  if [ ${#GPU_LIST[@]} -gt 1 ]; then
    pids=(); n=${#GPU_LIST[@]}
    for k in $(seq 0 $((n - 1))); do
      CUDA_VISIBLE_DEVICES="${GPU_LIST[$k]}" step "pseudolabel_round${round}_part$k" \
        nsn pseudolabel "${pseudo_args[@]}" --num-parts "$n" --part-id "$k" & pids+=($!)
    done
    wait_all "${pids[@]}"
    step "pseudolabel_round${round}_finalize" nsn pseudolabel "${pseudo_args[@]}" --finalize
  else
    step "pseudolabel_round$round" nsn pseudolabel "${pseudo_args[@]}"
  fi

  # --- 4. student folds, best fold by cross-validation, fine-tune --------------------------------------
  train_folds NoisyStudentTrainer "${STUDENT_FOLD_LIST[@]}"
  BEST=$(best_fold NoisyStudentTrainer)
  echo "round $round: best student fold by cross-validation: $BEST" | tee -a "$LOGS/pipeline.log"
  if [ -f "$(results_dir NoisyStudentFinetuneTrainer)/fold_$BEST/validation/summary.json" ]; then skip "finetune_round${round}_fold$BEST"
  else
    NSN_FINETUNE_FROM="$(results_dir NoisyStudentTrainer)/fold_$BEST/checkpoint_final.pth" \
      step "finetune_round${round}_fold$BEST" nnUNetv2_train "$DATASET" "$CONFIG" "$BEST" -tr NoisyStudentFinetuneTrainer \
      -p "$STUDENT_PLANS" -device "$DEVICE" $(resume_option "$(results_dir NoisyStudentFinetuneTrainer)/fold_$BEST")
  fi
  TEACHER=NoisyStudentFinetuneTrainer TEACHER_PLANS="$STUDENT_PLANS" TEACHER_FOLDS=("$BEST")
done

# --- 5. predict and evaluate --------------------------------------------------------------------------
if [ -n "$TEST_IMAGES" ]; then
  PRED="$WORK/predictions_finetuned"
  if [ -f "$PRED/.complete" ]; then skip predict
  else
    step predict nsn profile -o "$WORK/profile_predict.json" --plot "$WORK/profile_predict.png" -- \
      nnUNetv2_predict_lowfootprint -i "$TEST_IMAGES" -o "$PRED" -d "$DATASET" -p "$STUDENT_PLANS" -c "$CONFIG" \
      -tr NoisyStudentFinetuneTrainer -f "$BEST" -device "$DEVICE" --continue_prediction
    touch "$PRED/.complete"
  fi
  if [ -n "$TEST_LABELS" ]; then
    step evaluate nsn evaluate "$TEST_LABELS" "$PRED" --labels "$nnUNet_raw/$DATASET_NAME/dataset.json" \
      -o "$WORK/evaluation.csv" --summary "$WORK/evaluation_summary.json"
    cat "$LOGS/evaluate.log"
  fi
fi
echo "[$(date +%H:%M:%S)] pipeline complete: $WORK" | tee -a "$LOGS/pipeline.log"
}

main "$@"
