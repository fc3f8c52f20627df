#!/usr/bin/env bash
# Benchmarks the compactor-viz heatmap path (12800 x 4096 error matrix): wgpu compute
# reduction + color map against a plain CPU loop (`compactor bench heatmap`).
# Extra arguments go to it: --rows --cols --width --height --runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/compactor/target}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
exec cargo run --release -p compactor-cli -- bench heatmap "$@"
