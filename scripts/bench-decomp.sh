#!/usr/bin/env bash
# Benchmark compactor-decomp against numpy / tensorly on the same matrices.
# Usage: scripts/bench-decomp.sh            (BENCH_4096=1 adds 4096x4096 for SVD-trunc and TT)
# Writes the table to stdout and to $BENCH_DIR/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/compactor/target}"
VENV="$HOME/.cache/compactor/bench-venv"
BENCH_DIR="${BENCH_DIR:-$HOME/.cache/compactor/bench-data}"
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install -q numpy tensorly
# the benchmark may use all cores with OpenBLAS' own core detection
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
cargo build --release -q -p compactor-decomp --example bench_decomp
SHAPES=$("$VENV/bin/python" scripts/bench-decomp.py gen "$BENCH_DIR")
echo "ours: $SHAPES" >&2
"$CARGO_TARGET_DIR/release/examples/bench_decomp" "$BENCH_DIR" $SHAPES
echo "baselines" >&2
"$VENV/bin/python" scripts/bench-decomp.py compare "$BENCH_DIR" | tee "$BENCH_DIR/table.md"
