#!/usr/bin/env bash
# The paper's comparison in miniature (README, "Results in miniature"): on the tiny world, RLOO k=2, RLOO k=4
# and PPO, each over $SEEDS at the tiny preset's settings (300 updates of 64 completions), then one table:
# the gold judge's win rate against the reference summaries (with a 95% interval) next to the SFT policy's, the
# KL to the reference policy, training time and peak memory. Finished runs are kept and skipped on a rerun.
#   bash benchmark/tiny.sh                                   # about 10 minutes on 2 CPU cores
#   SEEDS=1 EPISODES=640 bash benchmark/tiny.sh              # a smoke test
#   DRY_RUN=1 bash benchmark/tiny.sh                         # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
tiny_defaults
RUNS=${RUNS:-runs/tiny}

configs=("rloo_k2 rloo_full.py --rloo-k 2" "rloo_k4 rloo_full.py --rloo-k 4" "ppo ppo_full.py")
dirs=()
for seed in $SEEDS; do
  for config in "${configs[@]}"; do
    read -r name script flags <<<"$config"
    dirs+=("$RUNS/${name}_$seed")
    # shellcheck disable=SC2086  # $flags is a list of flags
    train "$RUNS/${name}_$seed" "$PYTHON" "$script" --seed "$seed" --total-episodes "$EPISODES" \
      --num-sample-generations 0 $flags
  done
done
run "$PYTHON" benchmark/compare_runs.py "${dirs[@]}" --gold --sft-baseline --output "$RESULTS/tiny.md" \
  --plot "$RESULTS/tiny.png" \
  --columns "gold win rate" "gold win rate 95% CI" "gold score" "rlhf_reward, last 10%" "kl, last 10%" \
  "training minutes" "s/update (median)" "peak memory (GB)"
