#!/usr/bin/env python3
"""Reference spectra for tests/granite_spectra.rs.

Reads every q/k/v/o/gate/up/down projection of ../shared/fixtures/granite-tiny/model.safetensors
(bf16; the safetensors header is parsed by hand: 8-byte little-endian length + JSON + raw data;
bf16 -> f32 by shifting into the high 16 bits), computes the top-50 singular values with
numpy.linalg.svd in float64 and writes tests/data/granite_tiny_top50.json.

Usage (from the repo root):  python3 crates/decomp/tests/granite_spectra_reference.py
Needs numpy only.
"""
import json
import os
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "..", "..", "..", "shared", "fixtures", "granite-tiny", "model.safetensors")
OUT = os.path.join(HERE, "data", "granite_tiny_top50.json")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main():
    with open(FIXTURE, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
        base = 8 + hlen
        out = {}
        for name, info in sorted(header.items()):
            if name == "__metadata__" or not any(p in name for p in PROJ):
                continue
            assert info["dtype"] == "BF16", (name, info["dtype"])
            start, end = info["data_offsets"]
            f.seek(base + start)
            raw = np.frombuffer(f.read(end - start), dtype="<u2")
            w = (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"]).astype(np.float64)
            s = np.linalg.svd(w, compute_uv=False)
            out[name] = {"shape": info["shape"], "top50": [float(v) for v in s[:50]]}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"source": "granite-tiny/model.safetensors", "numpy": np.__version__, "spectra": out}, f, indent=1)
    print(f"wrote {len(out)} spectra to {OUT}")


if __name__ == "__main__":
    main()
