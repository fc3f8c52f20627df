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
# the desktop app: frontend build, app build (debug profile; dependencies are optimized), its unit
# tests, then the end-to-end suite driving the real app through WebDriver under Xvfb
echo "== desktop app: npm run build (ui/)"
(cd ui && npm run build --silent)
echo "== cargo build -p compactor-app"
cargo build --locked -p compactor-app
echo "== cargo test -p compactor-app"
cargo test --locked -p compactor-app -- --test-threads 2
echo "== end-to-end: tests/e2e/run.mjs"
node tests/e2e/run.mjs --app "$CARGO_TARGET_DIR/debug/compactor-app"
echo "test suite wall time: $(( $(date +%s) - start )) s"
