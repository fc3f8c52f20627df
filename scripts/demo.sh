#!/usr/bin/env bash
# Installs whatever is missing, builds Compactor and runs the main job on the bundled model.
#   scripts/demo.sh            headless run, results under out/demo
#   scripts/demo.sh --gui      opens the desktop app on the bundled model instead
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
source scripts/env.sh
cargo build --release --locked -p compactor-cli
for a in "$@"; do
  if [ "$a" = "--gui" ]; then
    # the desktop app: frontend, then the app (debug profile, shared with the test suite's build)
    (cd ui && npm run build --silent)
    cargo build --locked -p compactor-app
    export COMPACTOR_APP="$CARGO_TARGET_DIR/debug/compactor-app"
  fi
done
exec "$CARGO_TARGET_DIR/release/compactor" demo "$@"
