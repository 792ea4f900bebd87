# Shared by the benchmark scripts (sourced, not run): DRY_RUN=1 prints the commands instead of running them.

# The tiny world's benchmark defaults (tiny.sh, forks.sh): the tiny preset's 300 updates of 64, over three seeds.
tiny_defaults() {
  PYTHON=${PYTHON:-python}
  SEEDS=${SEEDS:-1 2 3}
  EPISODES=${EPISODES:-19200}
  RESULTS=${RESULTS:-benchmark/results}
}

# forked_script DIFF DIR: a copy of DIFF's full script in DIR with DIFF applied (made against the core, the diff applies
# to the full script, whose runs resume: the same lines, insertions aside; patch fails loudly if a seam has moved).
forked_script() {
  local script
  script=$(sed -n 's|^--- a/||p' "$1" | head -n 1)
  script=${script%.py}_full.py
  run mkdir -p "$2" >&2
  run cp "$script" "$2/$script" >&2
  run patch --forward --quiet --reject-file=- "$2/$script" "$1" >&2
  echo "$2/$script"
}

run() {
  echo "+ $(printf '%q ' "$@")"
  if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi
}

# train DIR COMMAND...: COMMAND --output-dir DIR, unless DIR holds a run that COMMAND finished already: a rerun
# resumes the benchmark. A run of COMMAND cut short (preempted, killed) goes on from its newest checkpoint with
# --resume (so COMMAND must take it: rloo_full.py, ppo_full.py) rather than losing days of training; a run made by
# another command (other EPISODES, other flags) is refused rather than mixed into the table.
train() {
  local dir=$1
  shift
  local command record
  command=$(printf '%q ' "$@")
  # The command is recorded in DIR.COMMAND before it starts, not in DIR: the scripts refuse to start or resume in a
  # directory that holds anything but their own run. Once the command has exited 0 the record becomes DIR/FINISHED.
  for record in "$dir/FINISHED" "$dir.COMMAND"; do
    if [ -f "$record" ] && [ "$(cat "$record")" != "$command" ]; then
      echo "error: $dir was made by another command ($record: $(cat "$record")); remove it or set RUNS" >&2
      exit 1
    fi
  done
  if [ -f "$dir/FINISHED" ]; then
    echo "skip $dir (finished)"
    return
  fi
  local resume=()
  if [ -f "$dir.COMMAND" ]; then
    resume=(--resume)  # (a run cut short before its first checkpoint starts again from the beginning)
  elif [ -e "$dir" ]; then  # e.g. cut short before train() kept records: which command made it is unknown
    echo "error: $dir holds a run without $dir.COMMAND, the command that made it; remove it or set RUNS" >&2
    exit 1
  fi
  if [ "${DRY_RUN:-0}" != 1 ]; then mkdir -p "$(dirname "$dir")" && echo "$command" >"$dir.COMMAND"; fi
  run "$@" --output-dir "$dir" ${resume[@]+"${resume[@]}"} || exit  # (cut short: no FINISHED, a rerun resumes)
  if [ "${DRY_RUN:-0}" != 1 ]; then mv "$dir.COMMAND" "$dir/FINISHED"; fi
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
