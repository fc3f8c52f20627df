#!/usr/bin/env bash
# Builds the CUDA binary of `compactor` on this CPU-only machine, for the GPU machine
# (driver 580 / CUDA 13.0, sm_90). Recipe: ../shared/docs/GPU.md. Output: .gpu/compactor
# (`scripts/build-cuda.sh --unit-tests` runs the cuda-feature unit tests here instead)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export CARGO_TARGET_DIR="$HOME/.cache/compactor/target-cuda"
VENV="$HOME/.cache/compactor/cuda-venv"
if [ ! -x "$VENV/bin/nvcc-ok" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.96" \
    "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl<13.1" "nvidia-cuda-nvrtc==13.0.88" "nvidia-nvvm<13.1" \
    "nvidia-cublas==13.0.2.14" "nvidia-curand<10.4.1"
  touch "$VENV/bin/nvcc-ok"; chmod +x "$VENV/bin/nvcc-ok"
fi
CU=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)
LINK="$HOME/.cache/compactor/cuda-link"
mkdir -p "$LINK"
for lib in cublas cublasLt nvrtc cudart; do
  f=$(ls "$CU"/lib/lib$lib.so.* | head -1); ln -sf "$f" "$LINK/lib$lib.so"
done
f=$(ls "$VENV"/lib/python3*/site-packages/nvidia/*/lib/libcurand.so.* "$CU"/lib/libcurand.so.* 2>/dev/null | head -1); ln -sf "$f" "$LINK/libcurand.so"
# libcuda.so belongs to the driver, and cuSOLVER/cuSPARSE are only needed at run time (the GPU
# machine's CUDA 13.0 toolkit has them): link against stubs that define every symbol cudarc
# declares, with the real libraries' sonames.
cargo fetch --locked >/dev/null 2>&1 || cargo fetch
CUDARC=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.10 | tail -1)
stub() { # stub LIB SONAME SYS_DIR PREFIX
  if [ ! -f "$LINK/$2" ]; then
    grep -ho "pub unsafe fn $4[A-Za-z0-9_]*" "$CUDARC/src/$3"/*.rs | sed 's/pub unsafe fn //' | sort -u \
      | awk '{print "void " $1 "(void){}"}' > "$LINK/stub-$1.c"
    gcc -shared -fPIC -Wl,-soname,"$2" -o "$LINK/$2" "$LINK/stub-$1.c"
    ln -sf "$2" "$LINK/lib$1.so"
  fi
}
stub cuda libcuda.so.1 driver/sys cu
stub cusolver libcusolver.so.12 cusolver/sys cusolver
stub cusparse libcusparse.so.12 cusparse/sys cusparse
export PATH=$CU/bin:$PATH CUDA_HOME=$CU CUDA_PATH=$CU CUDA_ROOT=$CU
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$LINK RUSTFLAGS="-L $LINK"
# --unit-tests: the core crate's unit tests with the cuda feature instead of the build (the GPU
# modules' host-side logic: launch splits, settings, int8 codes on the CPU), run here against the
# stub libraries; nothing in them touches a GPU
if [ "${1:-}" = --unit-tests ]; then
  LD_LIBRARY_PATH="$LINK:$CU/lib" cargo test --release -p compactor-core --features cuda --lib
  exit
fi
# the decode kernels are compiled by NVRTC at run time: compile them here first
LD_LIBRARY_PATH="$CU/lib" python3 scripts/nvrtc-check.py "$(ls "$CU"/lib/libnvrtc.so.* | head -1)"
cargo build --release -p compactor-cli --features cuda --bin compactor
mkdir -p .gpu
cp "$CARGO_TARGET_DIR/release/compactor" .gpu/compactor
strip .gpu/compactor
# the working tree sent to the GPU machine is limited to 64 MiB: send it compressed
xz -T2 -6 -f .gpu/compactor
ls -la .gpu/compactor.xz
# gpu-run.sh's stories260K steps (the CPU/GPU agreement) read the fixture and its text from .gpu/
SH=../shared
if [ -d "$SH/fixtures/stories260K" ]; then
  rm -rf .gpu/stories260K && cp -r "$SH/fixtures/stories260K" .gpu/ && chmod -R u+w .gpu/stories260K
  cp "$SH/corpora/tinystories_val.txt" .gpu/
fi
