# The runner the grid scripts share (source it): one evaluation process per job line, PARALLEL at a time, TIMEOUT
# stopping the rest, then one merged report per task with Wilson intervals (confidence.py).
#
# A job line: TASK LABEL BUDGETS METHOD [ARG ...]. TASK is needle, synthetic or needle_context_only (the needle
# grid under the protocol context-only); its evaluation flags come from NEEDLE_ARGS, SYNTHETIC_ARGS or
# CONTEXT_ARGS. An ARG KEY=VALUE is a method option (--option KEY=VALUE), any other ARG is passed as it is
# (--prefill-chunk 2048). The job writes OUT/runs/TASK/LABEL@BUDGETS and OUT/logs/TASK-LABEL@BUDGETS.log.
export PY=${PYTHON:-python3} OMP_NUM_THREADS=1

run_one() {
  local task=$1 label=$2 budgets=$3 method=$4 args script=$1 extra=() start=$SECONDS
  shift 4
  for a in "$@"; do
    if [[ $a == *=* && $a != --* ]]; then extra+=(--option "$a"); else extra+=("$a"); fi
  done
  case $task in
    needle) args=$NEEDLE_ARGS ;;
    synthetic) args=$SYNTHETIC_ARGS ;;
    needle_context_only) args=$CONTEXT_ARGS script=needle ;;
  esac
  # shellcheck disable=SC2086
  "$PY" "experiments/run_$script.py" --methods "$method" --budgets "$budgets" --no-progress $args "${extra[@]}" \
    --out "$OUT/runs/$task/$label@$budgets" > "$OUT/logs/$task-$label@$budgets.log" 2>&1
  echo "$task $label $budgets: exit $? in $((SECONDS - start))s"
}
export -f run_one

run_jobs() {  # the job lines on stdin (saved as OUT/logs/jobs.txt), in order, within TIMEOUT seconds (default $1)
  mkdir -p "$OUT/logs" "$OUT/runs"
  cat > "$OUT/logs/jobs.txt"
  timeout "${TIMEOUT:-$1}" xargs -P "$PARALLEL" -L 1 bash -c 'run_one "$@"' _ < "$OUT/logs/jobs.txt" \
    | tee "$OUT/logs/progress.log"
  echo "grid: ${SECONDS}s; $(grep -c 'exit 0' "$OUT/logs/progress.log") of $(wc -l < "$OUT/logs/jobs.txt") jobs finished"
}

merge_tasks() {  # TASK ...: the finished runs of each task merged into OUT/TASK (runs renamed by their label)
  local task kind d name dirs
  for task in "$@"; do
    kind=${task%_context_only}
    dirs=()
    for d in "$OUT/runs/$task"/*/; do [ -d "$d" ] && { name=$(basename "$d"); dirs+=("$d=${name%@*}"); }; done
    [ ${#dirs[@]} -gt 0 ] || continue
    "$PY" experiments/merge_results.py "$kind" "$OUT/$task" "${dirs[@]}" > "$OUT/logs/merge-$task.log" 2>&1 \
      && "$PY" experiments/confidence.py "$kind" "$OUT/$task" >> "$OUT/logs/merge-$task.log" 2>&1
  done
}
