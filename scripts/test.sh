#!/usr/bin/env bash
# Sets up everything and runs every test: Rust (unit, layer, property, doc), lints, formatting,
# the Python stub check, and the Python suites against the real openai SDK.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export PROPTEST_CASES="${PROPTEST_CASES:-512}"

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets --all-features -D warnings"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "cargo test --workspace --all-features (unit, layer, property, simulator and doc tests)"
cargo test --workspace --all-features

step "cargo doc (broken intra-doc links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features

step "python environment and pip install ."
bash scripts/setup.sh

step "stub check (mypy.stubtest)"
.venv/bin/python -m mypy.stubtest tower_aoai._core

step "simulator binary for the Python suites"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
export AOAI_SIM_BIN="$target_dir/debug/aoai-sim"
# `cargo test --workspace` built it for the simulator's own tests; build it only if it is missing.
[ -x "$AOAI_SIM_BIN" ] || cargo build -p aoai-sim --bin aoai-sim

step "pytest"
.venv/bin/python -m pytest python-tests -q
