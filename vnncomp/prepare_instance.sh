#!/usr/bin/env bash
# VNN-COMP prepare_instance.sh: "v1", the benchmark category, the .onnx file, the .vnnlib file. No analysis:
# the files must exist (a non-zero exit tells the harness to skip the instance). Settings are the same for
# every category.
set -uo pipefail
[ "${1:-}" = "v1" ] || { echo "expected the version string 'v1', got '${1:-}'" >&2; exit 1; }
[ $# -eq 4 ] || { echo "usage: prepare_instance.sh v1 CATEGORY NETWORK.onnx PROPERTY.vnnlib" >&2; exit 1; }
for f in "$3" "$4"; do
  [ -r "$f" ] || { echo "cannot read $f" >&2; exit 1; }
done
exit 0
