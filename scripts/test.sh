#!/usr/bin/env bash
# Installs whatever is missing and runs the whole test suite.
# Crates are tested one by one (each with its own feature set), which keeps the cargo cache in
# ~/.cache/compactor/target warm between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
source scripts/env.sh
start=$(date +%s)
for pkg in compactor-decomp compactor-core compactor-viz compactor-report compactor-cli; do
  echo "== cargo test -p $pkg"
  cargo test --locked -p "$pkg" -- --test-threads 2
done
echo "test suite wall time: $(( $(date +%s) - start )) s"
