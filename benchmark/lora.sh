#!/usr/bin/env bash
# LoRA against full fine-tuning on the tiny world (README, "LoRA"), at the tiny preset's settings (300 updates of 64):
# for each of $SCRIPTS, a learning-rate sweep of LoRA at rank $RANK over $RLOO_LRS or $PPO_LRS (seed 1, next to full
# fine-tuning at the preset's rate; table: lora_sweep_SCRIPT.md), then full fine-tuning and LoRA at the rate with
# the best gold win rate in the sweep, each over $SEEDS (table and plot: lora_tiny.{md,png}). Finished runs are kept
# and skipped on a rerun.
#   bash benchmark/lora.sh               # about an hour on 2 CPU cores (RLOO 20 minutes, PPO 40)
#   DRY_RUN=1 bash benchmark/lora.sh     # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
tiny_defaults
RUNS=${RUNS:-runs/lora}
SCRIPTS=${SCRIPTS:-rloo ppo}
RANK=${RANK:-8}
RLOO_LRS=${RLOO_LRS:-1e-4 3e-4 1e-3 3e-3 1e-2}
PPO_LRS=${PPO_LRS:-1e-3 3e-3 1e-2}  # (PPO's runs take 3x longer: the rates RLOO found best and around them)

# one SCRIPT TAG SEED FLAGS...: a run of SCRIPT with FLAGS in $RUNS/SCRIPT_TAG_SEED, named SCRIPT_full or SCRIPT_lora
one() {
  dirs+=("$RUNS/${1}_${2}_$3")
  train "$RUNS/${1}_${2}_$3" "$PYTHON" "${1}_full.py" --exp-name "${1}_${2%%_*}" --seed "$3" \
    --total-episodes "$EPISODES" --num-sample-generations 0 "${@:4}"
}

# best_lr TABLE_JSON RATE...: of the RATEs, the one whose LoRA run has the best gold win rate in compare_runs.py's JSON
best_lr() {
  if [ "${DRY_RUN:-0}" = 1 ]; then echo BEST && return; fi
  "$PYTHON" -c 'import json, sys
runs = [run for run in json.load(open(sys.argv[1])) if run["args"]["lora_r"]]
best = max(runs, key=lambda run: run["figures"]["gold win rate"])["args"]["learning_rate"]
print(next(lr for lr in sys.argv[2:] if float(lr) == best))' "$@"
}

final=()
for script in $SCRIPTS; do
  dirs=()
  rates=${script^^}_LRS
  one "$script" full 1
  for lr in ${!rates}; do one "$script" "lora_lr$lr" 1 --lora-r "$RANK" --learning-rate "$lr"; done
  run "$PYTHON" benchmark/compare_runs.py "${dirs[@]}" --gold --output "$RESULTS/lora_sweep_$script.md" \
    --label-args lora_r learning_rate --columns "gold win rate" "gold win rate 95% CI" "kl, last 10%"
  # shellcheck disable=SC2086  # the rates are a list
  lr=$(best_lr "$RESULTS/lora_sweep_$script.json" ${!rates})
  dirs=()
  for seed in $SEEDS; do
    one "$script" full "$seed"
    one "$script" "lora_lr$lr" "$seed" --lora-r "$RANK" --learning-rate "$lr"
  done
  final+=("${dirs[@]}")
done
run "$PYTHON" benchmark/compare_runs.py "${final[@]}" --gold --sft-baseline --output "$RESULTS/lora_tiny.md" \
  --label-args lora_r learning_rate --plot "$RESULTS/lora_tiny.png" \
  --columns "gold win rate" "gold win rate 95% CI" "rlhf_reward, last 10%" "kl, last 10%" \
  "peak memory (GB)"
