#!/usr/bin/env python3
"""Compiles the decode kernels (GEMV_SRC in crates/core/src/gpu.rs + STEP_SRC in gpu_step.rs + BAND_SRC in gpu_band.rs) with
NVRTC for compute_90, as the CUDA binary does at run time on the GPU machine, so that a kernel
that does not compile is caught here, before a GPU call. Usage: nvrtc-check.py LIBNVRTC"""
import ctypes, os, sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def raw(path, const):
    s = open(os.path.join(root, path)).read()
    head = f'{const}: &str = r#"'
    a = s.index(head) + len(head)
    return s[a:s.index('"#;', a)]


src = (raw("crates/core/src/gpu.rs", "const GEMV_SRC") + raw("crates/core/src/gpu_step.rs", "pub(crate) const STEP_SRC")
       + raw("crates/core/src/gpu_band.rs", "pub(crate) const BAND_SRC")).encode()
lib = ctypes.CDLL(sys.argv[1])
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"decode.cu", 0, None, None) == 0
opts = (ctypes.c_char_p * 1)(b"--gpu-architecture=compute_90")
rc = lib.nvrtcCompileProgram(prog, 1, opts)
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
if rc != 0:
    sys.exit(f"NVRTC could not compile the decode kernels:\n{log.value.decode()}")
print("decode kernels compile with NVRTC (compute_90)")
