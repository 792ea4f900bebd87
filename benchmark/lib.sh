# Shared by the benchmark scripts (sourced, not run): DRY_RUN=1 prints the commands instead of running them.

run() {
  echo "+ $*"
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
