# Shared by the benchmark scripts (sourced, not run): DRY_RUN=1 prints the commands instead of running them.

# The tiny world's benchmark defaults (tiny.sh, forks.sh): the tiny preset's 300 updates of 64, over three seeds.
tiny_defaults() {
  PYTHON=${PYTHON:-python}
  SEEDS=${SEEDS:-1 2 3}
  EPISODES=${EPISODES:-19200}
  RESULTS=${RESULTS:-benchmark/results}
}

run() {
  echo "+ $(printf '%q ' "$@")"
  if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi
}

# train DIR COMMAND...: COMMAND --output-dir DIR, unless DIR holds a run that COMMAND finished already: a rerun
# resumes the benchmark, a run cut short is started again from scratch, and a run made by another command (other
# EPISODES, other flags) is refused rather than mixed into the table.
train() {
  local dir=$1
  shift
  local command
  command=$(printf '%q ' "$@")
  if [ -f "$dir/FINISHED" ]; then
    if [ "$(cat "$dir/FINISHED")" != "$command" ]; then
      echo "error: $dir was made by another command ($(cat "$dir/FINISHED")); remove it or set RUNS" >&2
      exit 1
    fi
    echo "skip $dir (finished)"
    return
  fi
  run rm -rf "$dir"
  run "$@" --output-dir "$dir"
  if [ "${DRY_RUN:-0}" != 1 ]; then echo "$command" >"$dir/FINISHED"; fi  # only once the command has exited 0
}

# judge_and_summarise RUN_DIR...: the LLM judge (benchmark/judge.py) on every run's policy, then one table.
# Needs the key in the environment variable the judge reads (OPENAI_API_KEY by default); judge.py resumes itself.
judge_and_summarise() {
  local dir
  for dir in "$@"; do
    run "$PYTHON" benchmark/judge.py --policy "$dir" --judge-model "$JUDGE_MODEL" --num-prompts "$JUDGE_PROMPTS" \
      --output-dir "$dir/judge_${JUDGE_MODEL//\//_}"
  done
  run "$PYTHON" benchmark/compare_runs.py "$@" --judge-model "$JUDGE_MODEL" --output "$RESULTS/$SUMMARY.md" \
    --columns "judge win rate" "judge win rate 95% CI" "judge mean length" "rlhf_reward, last 10%" "kl, last 10%" \
    "training minutes" "peak memory (GB)"
}
