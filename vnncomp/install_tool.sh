#!/usr/bin/env bash
# VNN-COMP install_tool.sh: one argument, the version string "v1". Installs trustcase (a Python 3.11 venv, torch
# CPU, the pinned dependencies) into the repository's .venv, once; nothing else is downloaded at run time.
set -euo pipefail
[ "${1:-}" = "v1" ] || { echo "expected the version string 'v1', got '${1:-}'" >&2; exit 1; }
cd "$(dirname "$(realpath "$0")")/.."
scripts/setup.sh
.venv/bin/trustcase --help >/dev/null
echo "trustcase installed in $(pwd)/.venv"
