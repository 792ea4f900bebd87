#!/usr/bin/env bash
# Reward-model overoptimization in miniature (README, "Reward functions"; Gao et al. 2023): on the tiny world,
# RLOO (and PPO) trained against the learned reward model (the proxy) at several KL coefficients, and RLOO trained
# on the gold judge itself (the oracle, --reward-fn tiny_world:gold_reward), each for $UPDATES updates of 64
# completions with a checkpoint kept every $EVERY; then every checkpoint's gold score, proxy score and KL to the
# SFT policy on held-out prompts: a table and the plot of both scores against KL.
#   bash benchmark/overoptimization.sh            # about 25 minutes on 2 CPU cores
#   DRY_RUN=1 bash benchmark/overoptimization.sh  # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
tiny_defaults
RUNS=${RUNS:-runs/overoptimization}
UPDATES=${UPDATES:-600}
EVERY=${EVERY:-25}
RLOO_KL=${RLOO_KL:-0 0.01 0.05 0.2}
PPO_KL=${PPO_KL:-0 0.05}
SEED=${SEED:-1}

common=(--seed "$SEED" --total-episodes $((UPDATES * 64)) --save-every "$EVERY" --keep-checkpoints 1000
  --num-sample-generations 0)
dirs=()
for kl in $RLOO_KL; do
  dirs+=("$RUNS/rloo_kl${kl}_$SEED")
  train "$RUNS/rloo_kl${kl}_$SEED" "$PYTHON" rloo_full.py --kl-coef "$kl" "${common[@]}"
done
dirs+=("$RUNS/rloo_gold_$SEED")
train "$RUNS/rloo_gold_$SEED" "$PYTHON" rloo_full.py --reward-fn tiny_world:gold_reward --reward-model-path none \
  "${common[@]}"
for kl in $PPO_KL; do
  dirs+=("$RUNS/ppo_kl${kl}_$SEED")
  train "$RUNS/ppo_kl${kl}_$SEED" "$PYTHON" ppo_full.py --kl-coef "$kl" "${common[@]}"
done
run "$PYTHON" benchmark/overoptimization.py "${dirs[@]}" --output "$RESULTS/overoptimization" \
  --command "UPDATES=$UPDATES EVERY=$EVERY RLOO_KL='$RLOO_KL' PPO_KL='$PPO_KL' SEED=$SEED bash benchmark/overoptimization.sh"
