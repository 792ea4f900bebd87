#!/usr/bin/env bash
# When the sampler is not the learner (README, "The bf16 ratio problem"): on the tiny world, RLOO at the tiny preset's
# settings with the sampler made to differ from the learner in each way of $SOURCES (a bf16 or fp16 copy, top-p 0.8
# with the learner on the full softmax or renormalised, a copy refreshed every 4 or 16 updates) and each rollout
# correction of $CORRECTIONS; PPO on the $PPO_ROWS. Every row runs with the seeds of $SEEDS; the $CLOSE_ROWS, whose
# gold win rates lie within each other's intervals at one seed, also with $CLOSE_SEEDS. Then one table and one plot:
# gold win rate, final KL, the mismatch KL, the largest ratio, the ratios' ESS, the share the correction truncated or
# masked, and the clip fraction. Finished runs are kept and skipped on a rerun.
#   bash benchmark/mismatch_study.sh            # about 75 minutes on 2 CPU cores (30 with CLOSE_SEEDS=)
#   DRY_RUN=1 bash benchmark/mismatch_study.sh  # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
SEEDS=${SEEDS:-1}  # (these two before tiny_defaults, whose defaults are 3 seeds and 300 updates)
EPISODES=${EPISODES:-12800}  # 200 updates of 64, to fit the study in about an hour here
tiny_defaults
CLOSE_SEEDS=${CLOSE_SEEDS-2 3}
RUNS=${RUNS:-runs/mismatch}
SOURCES=${SOURCES:-none bf16 fp16 topp0.8 topp0.8renorm stale4 stale16}
CORRECTIONS=${CORRECTIONS:-none seq-tis seq-mis token-tis}
PPO_ROWS=${PPO_ROWS:-none:none stale16:none stale16:seq-tis topp0.8:none topp0.8renorm:none}
# SCRIPT:SOURCE:CORRECTION patterns
CLOSE_ROWS=${CLOSE_ROWS:-rloo:none:none rloo:bf16:none rloo:fp16:none rloo:stale4:* rloo:stale16:* ppo:none:none ppo:stale16:*}

source_flags() {
  case $1 in
    none) echo "" ;;
    bf16 | fp16) echo "--sampler-dtype $1" ;;
    topp*renorm) local p=${1#topp} && echo "--top-p ${p%renorm} --top-p-logprobs renormalized" ;;
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
  train "$dir" "$PYTHON" "${1}_full.py" --exp-name "${1}_$2" --seed "$4" --total-episodes "$EPISODES" \
    --num-sample-generations 0 $(source_flags "$2") --rollout-correction "$3"
}

# row SCRIPT SOURCE CORRECTION: one run per seed of $SEEDS, and of $CLOSE_SEEDS when the row is one of $CLOSE_ROWS
row() {
  local seeds=$SEEDS pattern seed
  for pattern in $CLOSE_ROWS; do
    # shellcheck disable=SC2053  # the pattern is a glob on purpose
    if [[ "$1:$2:$3" == $pattern ]]; then seeds="$SEEDS $CLOSE_SEEDS" && break; fi
  done
  for seed in $seeds; do one "$1" "$2" "$3" "$seed"; done
}

dirs=()
for source in $SOURCES; do
  for correction in $CORRECTIONS; do row rloo "$source" "$correction"; done
done
for ppo_row in $PPO_ROWS; do row ppo "${ppo_row%%:*}" "${ppo_row#*:}"; done
run "$PYTHON" benchmark/compare_runs.py "${dirs[@]}" --gold --sft-baseline --output "$RESULTS/mismatch_study.md" \
  --label-args rollout_correction --plot "$RESULTS/mismatch_study.png" \
  --columns "gold win rate" "gold win rate 95% CI" "kl, last 10%" "mismatch kl (mean)" "is ratio max" "ess (mean)" \
  "corrected share (mean)" "clipfrac (mean)"
