# Shared by the benchmark scripts (sourced, not run): DRY_RUN=1 prints the commands instead of running them.

run() {
  echo "+ $(printf '%q ' "$@")"
  if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

# train DIR COMMAND...: COMMAND --output-dir DIR, unless DIR holds a finished run already; a rerun resumes the
# benchmark, and a run cut short is started again from scratch.
train() {
  local dir=$1
  shift
  if [ -f "$dir/FINISHED" ]; then
    echo "skip $dir (finished)"
    return
  fi
  run rm -rf "$dir"
  run "$@" --output-dir "$dir"
  if [ -z "${DRY_RUN:-}" ]; then touch "$dir/FINISHED"; fi  # only once the command has exited 0
}

# judge_and_summarise RUN_DIR...: the LLM judge (benchmark/judge.py) on every run's policy, then one table.
# Needs the key in the environment variable the judge reads (OPENAI_API_KEY by default); judge.py resumes itself.
judge_and_summarise() {
  local dir
  for dir in "$@"; do
    run "$PYTHON" benchmark/judge.py --policy "$dir" --judge-model "$JUDGE_MODEL" --num-prompts "$JUDGE_PROMPTS" \
      --output-dir "$dir/judge_$JUDGE_MODEL"
  done
  run "$PYTHON" benchmark/compare_runs.py "$@" --output "$RESULTS/$SUMMARY.md" --columns "judge win rate" \
    "judge win rate 95% CI" "judge mean length" "rlhf_reward, last 10%" "kl, last 10%" "training minutes" \
    "peak memory (GB)"
}
