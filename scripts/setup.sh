#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: Debian packages, a Python 3.11 venv, torch 2.13.0 (CPU),
# every other dependency from the verified constraints file, and trustcase itself (editable).
#   scripts/setup.sh          what `make demo` needs
#   scripts/setup.sh --test   plus what the tests need (Chromium and its WebDriver, poppler; PostgreSQL for the
#                             slow server tests, which start their own throwaway cluster)
set -euo pipefail
cd "$(dirname "$0")/.."

want=(graphviz libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core)
[ "${1:-}" = "--test" ] && want+=(poppler-utils chromium chromium-driver postgresql)
missing=()
for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 is required" >&2; exit 1; }

stamp=.venv/.trustcase-setup
digest=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/pip install -q --upgrade pip setuptools wheel
# exactly this torch: a looser requirement pulls a multi-GB CUDA build
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -c constraints.txt -e ".[dev,scale,demo,server]"
echo "$digest" > "$stamp"
echo "setup: environment ready in .venv"
