#!/usr/bin/env bash
# Installs whatever is missing and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
source scripts/env.sh
start=$(date +%s)
cargo test --workspace --locked -- --test-threads 2
echo "test suite wall time: $(( $(date +%s) - start )) s"
