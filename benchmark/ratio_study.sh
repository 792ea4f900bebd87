#!/usr/bin/env bash
# The bf16 ratio study (README, "The bf16 ratio problem"):
#   1. benchmark/ratio_diagnostics.py: the first-minibatch ratio per precision and old-logprob source, and its causes;
#   2. short training runs of rloo.py (the tiny preset, and the paper's 2 epochs x 2 minibatches) and ppo.py in
#      $DTYPE with each --old-logprobs source, over $SEEDS;
#   3. benchmark/compare_runs.py: one table of clipped data, KL, reward and gold win rate.
# On 2 CPU cores with the defaults: about 8 minutes. Finished runs are kept and skipped, so a rerun resumes;
# an unfinished one goes on from its newest checkpoint. PYTHON picks the interpreter (e.g. PYTHON=.venv/bin/python).
#   bash benchmark/ratio_study.sh                         # tiny world, bf16 autocast on the CPU
#   MODEL=pythia-1b SEEDS=1 EPISODES=64000 bash benchmark/ratio_study.sh   # on a GPU, the real checkpoints
#   DRY_RUN=1 bash benchmark/ratio_study.sh               # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-tiny}
DTYPE=${DTYPE:-bf16}
SEEDS=${SEEDS:-1 2 3}
EPISODES=${EPISODES:-6400}
RUNS=${RUNS:-runs/ratio_study_${MODEL}_${DTYPE}}
RESULTS=${RESULTS:-benchmark/results}

run "$PYTHON" benchmark/ratio_diagnostics.py --model "$MODEL" --output "$RESULTS/ratio_diagnostics_$MODEL.json"
configs=("rloo" "rloo_2x2 --num-ppo-epochs 2 --num-mini-batches 2" "ppo")
dirs=()
for seed in $SEEDS; do
  for config in "${configs[@]}"; do
    read -r name flags <<<"$config"
    for source in generate forward; do
      dir="$RUNS/${name}_${source}_$seed"
      dirs+=("$dir")
      # shellcheck disable=SC2086  # $flags is a list of flags
      train "$dir" "$PYTHON" "${name%_2x2}_full.py" --model "$MODEL" --dtype "$DTYPE" --old-logprobs "$source" \
        --seed "$seed" --total-episodes "$EPISODES" --num-sample-generations 0 $flags
    done
  done
done
gold=()
if [ "$MODEL" = tiny ]; then gold=(--gold); fi
run "$PYTHON" benchmark/compare_runs.py "${dirs[@]}" ${gold[@]+"${gold[@]}"} --output "$RESULTS/ratio_study_${MODEL}_${DTYPE}.md"
