#!/usr/bin/env bash
# Creates .venv (Python >= 3.10) with the test and demo requirements, and installs tower-aoai into
# it from this checkout (`pip install .`, the same path users take). Idempotent; sourced by
# scripts/test.sh and scripts/demo.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r python-tests/requirements.txt
# Build and install the package exactly as a user would.
.venv/bin/python -m pip install -q --force-reinstall --no-deps .
