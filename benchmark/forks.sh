#!/usr/bin/env bash
# README "Fork it": the everyday forks in benchmark/forks/ (an entropy bonus for each algorithm; the field's variants
# are benchmark/variants.sh's) applied to copies of the full scripts, and the rule reward of
# benchmark/forks/rule_reward.py given as --reward-fn, each trained on the
# tiny world over $SEEDS at the tiny preset's settings; then one table with the gold win rate beside the unforked
# scripts' runs of benchmark/tiny.sh (the same settings, in $BASELINE).
#   bash benchmark/forks.sh                  # about 15 minutes on 2 CPU cores (after benchmark/tiny.sh)
#   DRY_RUN=1 bash benchmark/forks.sh        # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
tiny_defaults
RUNS=${RUNS:-runs/forks}
BASELINE=${BASELINE:-runs/tiny}

dirs=()
for name in entropy_bonus_rloo entropy_bonus_ppo; do
  script=$(forked_script "benchmark/forks/$name.diff" "$RUNS/src/$name")
  for seed in $SEEDS; do
    dirs+=("$RUNS/${name}_$seed")
    # The fork imports the project's modules (tiny_world) from here.
    train "$RUNS/${name}_$seed" env PYTHONPATH=. "$PYTHON" "$script" --exp-name "$name" \
      --seed "$seed" --total-episodes "$EPISODES" --num-sample-generations 0
  done
done
# A rule in place of the reward model needs no diff: the script takes it as --reward-fn.
for seed in $SEEDS; do
  dirs+=("$RUNS/rule_reward_$seed")
  train "$RUNS/rule_reward_$seed" "$PYTHON" rloo_full.py --exp-name rule_reward --seed "$seed" \
    --total-episodes "$EPISODES" --num-sample-generations 0 --reward-fn benchmark/forks/rule_reward.py:rule_reward \
    --reward-model-path none
done
for seed in $SEEDS; do dirs+=("$BASELINE/rloo_k4_$seed" "$BASELINE/ppo_$seed"); done
run "$PYTHON" benchmark/compare_runs.py "${dirs[@]}" --gold --sft-baseline --output "$RESULTS/forks.md" \
  --columns "gold win rate" "gold win rate 95% CI" "gold score" "rlhf_reward, last 10%" "kl, last 10%"

