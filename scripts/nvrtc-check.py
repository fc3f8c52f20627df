#!/usr/bin/env python3
"""Compiles the decode kernels (GEMV_SRC in crates/core/src/gpu.rs + STEP_SRC in gpu_step.rs; GEMV_SRC with GEMV_W8) and the band kernels (BAND_SRC in
gpu_band.rs, a module of their own) with
NVRTC, as the CUDA binary does at run time on the GPU machine (decode: compute_90 on sm_90+ GPUs,
compute_80 on older ones), so that a kernel
that does not compile is caught here, before a GPU call. Usage: nvrtc-check.py LIBNVRTC"""
import ctypes, os, shutil, subprocess, sys, tempfile

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def raw(path, const):
    s = open(os.path.join(root, path)).read()
    head = f'{const}: &str = r#"'
    a = s.index(head) + len(head)
    return s[a:s.index('"#;', a)]


def check(src, name, arch):
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None) == 0
    opts = (ctypes.c_char_p * 1)(f"--gpu-architecture={arch}".encode())
    rc = lib.nvrtcCompileProgram(prog, 1, opts)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.exit(f"NVRTC could not compile {name}:\n{log.value.decode()}")
    print(f"{name} compiles with NVRTC ({arch})")
    # assemble the PTX as the driver will (inline asm is checked only here), when ptxas is on PATH
    ptxas = shutil.which("ptxas")
    if ptxas:
        size = ctypes.c_size_t()
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "k.ptx")
            open(f, "wb").write(ptx.value)
            sm = arch.replace("compute_", "sm_")
            r = subprocess.run([ptxas, f"--gpu-name={sm}", "-v", "-o", os.path.join(d, "k.cubin"), f], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"ptxas could not assemble {name} for {sm}:\n{r.stderr}")
            if os.environ.get("PTXAS_VERBOSE"):
                print(r.stderr)
            print(f"{name} assembles with ptxas ({sm})")


lib = ctypes.CDLL(sys.argv[1])
decode = os.environ.get("NVRTC_DEFINES", "") + raw("crates/core/src/gpu.rs", "const GEMV_SRC") + raw("crates/core/src/gpu_step.rs", "pub(crate) const STEP_SRC")
# the int8-weight module: GEMV_SRC alone with GEMV_W8 (gpu::gemv_ptx)
decode_w8 = os.environ.get("NVRTC_DEFINES", "") + "#define GEMV_W8 1\n" + raw("crates/core/src/gpu.rs", "const GEMV_SRC")
for arch in ("compute_90", "compute_80"):
    check(decode, "decode.cu", arch)
    check(decode_w8, "decode_w8.cu", arch)
    check("#define W8R 1\n" + decode_w8, "decode_w8_r1.cu", arch)  # COMPACTOR_W8_ROWS=1
    check("#define W8R 4\n" + decode_w8, "decode_w8_r4.cu", arch)  # COMPACTOR_W8_ROWS=4
check(raw("crates/core/src/gpu_band.rs", "pub(crate) const BAND_SRC"), "band.cu", "compute_80")
