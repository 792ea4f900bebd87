#!/usr/bin/env bash
# The source document's TL;DR results at full scale (GPU, hub access); run through tldr_rloo.sh or tldr_ppo.sh.
#   rloo: pythia-1b and pythia-6.9b x k=2 and k=4 x $SEEDS with TRL's RLOO TL;DR settings (rloo.py's presets:
#         kl_coef 0.03, lr 3e-6, 2 epochs x 2 minibatches, 53 tokens at temperature 0.7, EOS trick with penalty
#         1.0, 1M episodes, bf16). Reported: RLOO 1B 40.1% vs SFT 21.3%; 6.9B k=2 78.7% (GPT-4 judge).
#   ppo:  the same models x $SEEDS with Huang et al. 2024's settings (ppo.py's presets: kl_coef 0.05, lr 3e-6,
#         4 epochs, GAE gamma 1 lambda 0.95, value model from the reward model).
# Every run keeps its recipe's global batch, the completions per update, whatever the number of GPUs: 1024 for rloo
# (TRL v0.11's RLOO TL;DR command: 8 GPUs x 8 per device x 8 accumulation x 2 minibatches; the docs of v0.13 on say
# 16 x 16 for that run, 4096: GLOBAL_BATCH=4096) and 512 for ppo (Huang et al. and TRL's PPO TL;DR command: 8 GPUs x
# 16 x 4, one minibatch). The presets set the per-process sizes; this script sets --gradient-accumulation-steps
# to GLOBAL_BATCH / (per_device_train_batch_size x num_mini_batches x NUM_GPUS) and refuses a NUM_GPUS for which
# that is not a whole number. pythia-1b runs data parallel (`accelerate launch --num_processes $NUM_GPUS`; plain
# `python` on one GPU); the larger models run under DeepSpeed ZeRO-3 (benchmark/zero3.yaml) on the same processes.
# Then an LLM judge against the reference summaries on every policy (benchmark/judge.py, key in OPENAI_API_KEY)
# and one table in benchmark/results/tldr_{rloo,ppo}.md. Finished runs are skipped on a rerun; a run directory made
# by another command (say, another NUM_GPUS) is refused.
# Variables: NUM_GPUS (default: the GPUs `nvidia-smi -L` lists, else 8, so that a dry run on a CPU machine shows the
# 8-GPU recipe), MODELS (default pythia-1b pythia-6.9b), KS (rloo), SEEDS, GLOBAL_BATCH (default 1024 for rloo, 512
# for ppo), EXTRA_FLAGS (e.g. --track; they come after this script's flags, so they win), JUDGE_MODEL, JUDGE_PROMPTS,
# RUNS, DRY_RUN=1 (prints every command, runs none).
# LAUNCHER replaces the launcher of every training run (default as above); it must start NUM_GPUS processes (its
# --num_processes, if it has one, is NUM_GPUS's default). LAUNCHER and EXTRA_FLAGS are split on spaces: no quoted
# values in them. PYTHON (default python) must import the project's requirements: it reads the presets.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
ALGO=${1:?usage: tldr.sh rloo|ppo}
PYTHON=${PYTHON:-python}
MODELS=${MODELS:-pythia-1b pythia-6.9b}
SEEDS=${SEEDS:-1}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
JUDGE_MODEL=${JUDGE_MODEL:-gpt-4o}
JUDGE_PROMPTS=${JUDGE_PROMPTS:-1000}
RUNS=${RUNS:-runs/tldr}
RESULTS=${RESULTS:-benchmark/results}
SUMMARY=tldr_$ALGO
fail() { echo "error: $*" >&2 && exit 2; }
case $ALGO in
  rloo) KS=${KS:-2 4} GLOBAL_BATCH=${GLOBAL_BATCH:-1024} ;;
  ppo) KS=one GLOBAL_BATCH=${GLOBAL_BATCH:-512} ;;  # PPO samples one completion per prompt
  *) fail "unknown algorithm '$ALGO'; use rloo or ppo" ;;
esac

# The number of training processes: NUM_GPUS, else LAUNCHER's --num_processes, else the GPUs nvidia-smi lists, else 8.
launcher_processes=""
previous=""
for word in ${LAUNCHER:-}; do
  if [ "$previous" = --num_processes ]; then launcher_processes=$word; fi
  case $word in --num_processes=*) launcher_processes=${word#--num_processes=} ;; esac
  previous=$word
done
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$launcher_processes
  if [ -z "$NUM_GPUS" ] && command -v nvidia-smi >/dev/null 2>&1; then
    NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  if [ -z "$NUM_GPUS" ] || [ "$NUM_GPUS" = 0 ]; then NUM_GPUS=8; fi
fi
[[ $NUM_GPUS =~ ^[1-9][0-9]*$ ]] || fail "NUM_GPUS must be a positive whole number (got '$NUM_GPUS')"
[[ $GLOBAL_BATCH =~ ^[1-9][0-9]*$ ]] || fail "GLOBAL_BATCH must be a positive whole number (got '$GLOBAL_BATCH')"
if [ -n "$launcher_processes" ] && [ "$launcher_processes" != "$NUM_GPUS" ]; then
  fail "LAUNCHER starts $launcher_processes processes but NUM_GPUS is $NUM_GPUS; make them agree"
fi

# Each model's per-process sizes, as its command will parse them (its preset, then EXTRA_FLAGS), then the accumulation
# that makes its global batch GLOBAL_BATCH on NUM_GPUS processes; all checked before anything runs.
# shellcheck disable=SC2086  # MODELS is a list of words
sizes=$("$PYTHON" -c '
import sys
module, extra, models = __import__(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]
for model in models:
    args = module.parse_args(["--model", model, *extra])
    print(model, args.per_device_train_batch_size, args.num_mini_batches)
' "${ALGO}_full" "$EXTRA_FLAGS" $MODELS) ||
  fail "could not read ${ALGO}_full.py's presets with PYTHON=$PYTHON (see above)"
declare -A accumulation
while read -r model per_device minibatches; do
  [ -n "$model" ] || continue
  step=$((per_device * minibatches * NUM_GPUS))  # completions per update with one micro-batch per optimizer step
  if [ $((GLOBAL_BATCH % step)) != 0 ]; then
    fail "NUM_GPUS=$NUM_GPUS does not divide $ALGO's global batch of $GLOBAL_BATCH completions for $model" \
      "($per_device per device x $minibatches minibatches x $NUM_GPUS processes = $step per accumulation step)"
  fi
  accumulation[$model]=$((GLOBAL_BATCH / step))
  echo "$ALGO $model: $per_device per device x ${accumulation[$model]} accumulation x $minibatches minibatches" \
    "x $NUM_GPUS processes = $GLOBAL_BATCH completions per update"
done <<<"$sizes"

dirs=()
for model in $MODELS; do
  if [ -n "${LAUNCHER:-}" ]; then
    read -r -a launcher <<<"$LAUNCHER"
  elif [ "$model" = pythia-6.9b ] || [ "$model" = pythia-2.8b ]; then
    # Trained state alone (bf16 weight and gradient, fp32 master weight, two AdamW moments: 16 bytes a parameter)
    # is 110 GB for 6.9B and 45 GB for 2.8B (twice that for PPO's policy and value): sharded over the processes.
    launcher=(accelerate launch --config_file benchmark/zero3.yaml --num_processes "$NUM_GPUS")
  elif [ "$NUM_GPUS" -gt 1 ]; then
    launcher=(accelerate launch --num_processes "$NUM_GPUS")
  else
    launcher=("$PYTHON")
  fi
  for k in $KS; do
    for seed in $SEEDS; do
      name=${ALGO}_$model
      k_flags=()
      if [ "$k" != one ]; then name+=_k$k k_flags=(--rloo-k "$k"); fi
      dirs+=("$RUNS/${name}_$seed")
      # shellcheck disable=SC2086  # EXTRA_FLAGS is a list of words
      train "$RUNS/${name}_$seed" "${launcher[@]}" "${ALGO}_full.py" --model "$model" ${k_flags[@]+"${k_flags[@]}"} \
        --seed "$seed" --gradient-accumulation-steps "${accumulation[$model]}" $EXTRA_FLAGS
    done
  done
done
judge_and_summarise "${dirs[@]}"
