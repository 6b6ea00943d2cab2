#!/usr/bin/env bash
# Builds what it needs and runs the demonstration on the built-in Azure simulator (no account).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
bash scripts/setup.sh
cargo build -q --release -p aoai-sim --bin aoai-sim -p aoai-bench --bin aoai-bench
target_dir="${CARGO_TARGET_DIR:-$root/target}"
export AOAI_SIM_BIN="$target_dir/release/aoai-sim"
export AOAI_BENCH_BIN="$target_dir/release/aoai-bench"
exec .venv/bin/python scripts/demo.py "$@"
