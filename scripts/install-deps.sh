#!/usr/bin/env bash
# Installs what Compactor needs on a fresh Debian/Ubuntu machine: system packages and a Rust
# toolchain. Safe to run again: it only installs what is missing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# apt_install WHAT PKG…: installs the packages that are not installed yet.
apt_install() {
  local what=$1 p
  shift
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing system packages$what: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  fi
}

apt_install "" build-essential pkg-config curl ca-certificates git python3 \
  mesa-vulkan-drivers libvulkan1 poppler-utils

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "installing the Rust toolchain (rustup)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

# The desktop app (Tauri v2 on WebKitGTK) and its end-to-end tests: WebKitWebDriver, Xvfb,
# Node.js for the frontend build, tauri-driver.
APP_PKGS=(libwebkit2gtk-4.1-dev libssl-dev libayatana-appindicator3-dev librsvg2-dev webkit2gtk-driver xvfb)
if ! command -v npm >/dev/null 2>&1; then APP_PKGS+=(nodejs npm); fi
apt_install " for the desktop app" "${APP_PKGS[@]}"

if ! command -v tauri-driver >/dev/null 2>&1; then
  echo "installing tauri-driver (cargo install)"
  cargo install tauri-driver --locked --version ^2
fi

# the frontend's packages, exactly as locked (skipped when they are already in place)
UI_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/ui"
if [ ! -f "$UI_DIR/node_modules/.package-lock.json" ] || ! cmp -s "$UI_DIR/package-lock.json" "$UI_DIR/node_modules/.compactor-lock"; then
  echo "installing the frontend's npm packages (npm ci in ui/)"
  (cd "$UI_DIR" && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.compactor-lock)
fi
