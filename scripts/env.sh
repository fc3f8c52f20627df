# Sourced by the scripts: a fixed cargo target directory outside the clone, so that rebuilds
# (and CI runs on the same machine) are incremental.
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/compactor/target}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$HOME/.cache/compactor/xdg}"
mkdir -p "$CARGO_TARGET_DIR" "$XDG_RUNTIME_DIR"
chmod 700 "$XDG_RUNTIME_DIR"
