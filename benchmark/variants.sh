#!/usr/bin/env bash
# The field's policy-gradient variants (benchmark/forks/{grpo,dr_grpo,dapo,gspo,k3_kl_loss}.diff, each a diff of
# rloo.py applied to a copy of rloo_full.py) beside plain RLOO and PPO, on the tiny world over $SEEDS, all at one
# setting where they can differ: 2 epochs x 2 minibatches of 32 (the Pythia presets' structure, so 3 of every 4
# steps see a ratio other than 1), gradient clipping off (as TRL runs without DeepSpeed), 200 updates of 64; then
# one table of the gold win rate and the KL, and a plot. The variants' seams and math: docs/variants.md.
#   bash benchmark/variants.sh               # about 13 minutes on 2 CPU cores
#   DRY_RUN=1 bash benchmark/variants.sh     # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
EPISODES=${EPISODES:-12800}
tiny_defaults
RUNS=${RUNS:-runs/variants}
SETTING=(--num-ppo-epochs 2 --num-mini-batches 2 --per-device-train-batch-size 32 --max-grad-norm 1e9)

dirs=()
for name in rloo ppo grpo dr_grpo dapo gspo k3_kl_loss; do
  script=${name}_full.py
  if [ -f "benchmark/forks/$name.diff" ]; then script=$(forked_script "benchmark/forks/$name.diff" "$RUNS/src/$name"); fi
  extra=()
  if [ "$name" = gspo ]; then extra=(--cliprange 4e-4); fi  # the paper's range for its length-normalised ratio
  for seed in $SEEDS; do
    dirs+=("$RUNS/${name}_$seed")
    train "$RUNS/${name}_$seed" env PYTHONPATH=. "$PYTHON" "$script" --exp-name "$name" --seed "$seed" \
      --total-episodes "$EPISODES" --num-sample-generations 0 "${SETTING[@]}" ${extra[@]+"${extra[@]}"}
  done
done
run "$PYTHON" benchmark/compare_runs.py "${dirs[@]}" --gold --sft-baseline --label-args cliprange \
  --output "$RESULTS/variants.md" --plot "$RESULTS/variants.png" --columns "gold win rate" "gold win rate 95% CI" \
  "gold score" "scores, last 10%" "kl, last 10%" "clipfrac (mean)"
