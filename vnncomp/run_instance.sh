#!/usr/bin/env bash
# VNN-COMP run_instance.sh: "v1", the benchmark category, the .onnx file, the .vnnlib file (or .vnnlib.gz),
# the result file, the timeout in seconds. Writes the result file: "sat" and the counterexample
# ((X_0 v) ... (Y_0 v)) re-checked with onnxruntime, "unsat", "unknown", "timeout" (the budget ran out), or
# "error" with the reason on the next line (a file trustcase cannot read, named with the node or line).
# The budget left for deciding is the timeout less the start-up (Python, torch, reading the files), so the
# script ends before the harness kills it.
set -uo pipefail
[ "${1:-}" = "v1" ] || { echo "expected the version string 'v1', got '${1:-}'" >&2; exit 1; }
[ $# -eq 6 ] || { echo "usage: run_instance.sh v1 CATEGORY NETWORK.onnx PROPERTY.vnnlib RESULT_FILE TIMEOUT" >&2; exit 1; }
root="$(dirname "$(realpath "$0")")/.."
result="$5"
budget=$(python3 -c "import sys; t = float(sys.argv[1]); print(max(1.0, 0.9 * t - 5.0))" "$6")
rm -f "$result"
export OMP_NUM_THREADS=1
"$root/.venv/bin/trustcase" check-property "$3" "$4" --timeout "$budget" --result-file "$result" 2>"$result.err"
if [ ! -s "$result" ]; then  # refused (exit 2) or crashed: the harness still gets a result file
  printf 'error\n%s\n' "$(tail -n 1 "$result.err")" > "$result"
fi
rm -f "$result.err"
exit 0
