#!/usr/bin/env bash
# When the sampler is not the learner (README, "The bf16 ratio problem"): on the tiny world, RLOO at the tiny preset's
# settings with the sampler made to differ from the learner in each way of $SOURCES (a bf16 or fp16 copy, top-p 0.8,
# a copy refreshed every 4 or 16 updates) and each rollout correction of $CORRECTIONS, over $SEEDS; PPO on the
# $PPO_ROWS; then one table: gold win rate, final KL, the mismatch KL, the ratios' ESS and the share the correction
# truncated or masked, and the clip fraction. Finished runs are kept and skipped on a rerun.
#   bash benchmark/mismatch_study.sh            # about 40 minutes on 2 CPU cores
#   DRY_RUN=1 bash benchmark/mismatch_study.sh  # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
SEEDS=${SEEDS:-1}  # (before tiny_defaults, whose default is 3 seeds)
tiny_defaults
RUNS=${RUNS:-runs/mismatch}
SOURCES=${SOURCES:-none bf16 fp16 topp0.8 stale4 stale16}
CORRECTIONS=${CORRECTIONS:-none seq-tis seq-mis token-tis}
PPO_ROWS=${PPO_ROWS:-stale16:none stale16:seq-tis topp0.8:none}

source_flags() {
  case $1 in
    none) echo "" ;;
    bf16 | fp16) echo "--sampler-dtype $1" ;;
    topp*) echo "--top-p ${1#topp}" ;;
    stale*) echo "--sampler-sync-every ${1#stale}" ;;
    *) echo "error: unknown source $1" >&2; exit 1 ;;
  esac
}

# one SCRIPT SOURCE CORRECTION SEED: a run of rloo or ppo with that source of mismatch and that correction
one() {
  local dir="$RUNS/${1}_${2}_${3}_$4"
  dirs+=("$dir")
  # shellcheck disable=SC2046  # the source's flags are a list
  train "$dir" "$PYTHON" "$1.py" --exp-name "${1}_$2" --seed "$4" --total-episodes "$EPISODES" \
    --num-sample-generations 0 $(source_flags "$2") --rollout-correction "$3"
}

dirs=()
for seed in $SEEDS; do
  for source in $SOURCES; do
    for correction in $CORRECTIONS; do one rloo "$source" "$correction" "$seed"; done
  done
  for row in $PPO_ROWS; do one ppo "${row%%:*}" "${row#*:}" "$seed"; done
done
run "$PYTHON" benchmark/compare_runs.py "${dirs[@]}" --gold --sft-baseline --output "$RESULTS/mismatch_study.md" \
  --columns "gold win rate" "gold win rate 95% CI" "kl, last 10%" "mismatch kl (mean)" "is ratio max" "ess (mean)" \
  "corrected share (mean)" "clipfrac (mean)"
