#!/usr/bin/env bash
# Installs whatever is missing, builds Compactor and runs the main job on the bundled model.
#   scripts/demo.sh            headless run, results under out/demo
#   scripts/demo.sh --gui      opens the desktop app on the bundled model instead
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
source scripts/env.sh
cargo build --release --locked -p compactor-cli
exec "$CARGO_TARGET_DIR/release/compactor" demo "$@"
