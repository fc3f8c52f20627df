"""PyTorch baseline for issue 8 (benchmark only, never part of the product): the same linear
matrices of a safetensors checkpoint, timed with torch.linalg.svd, torch.linalg.eigvalsh of the
Gram matrix and torch.svd_lowrank(q=1024) on the GPU.

usage: python3 bench_torch_spectra.py MODEL_DIR [--methods gram,lowrank,svd] [--limit N] [--json OUT]
Reads safetensors headers itself (no `safetensors` package needed on the GPU machine).
"""
import collections, json, os, re, struct, sys, time

import torch

DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")


def tensors(model_dir):
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    for f in files:
        path = os.path.join(model_dir, f)
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__" or not LINEAR.search(name):
                continue
            yield path, base, name, info


def load(path, base, info):
    a, b = info["data_offsets"]
    with open(path, "rb") as fh:
        fh.seek(base + a)
        buf = bytearray(fh.read(b - a))
    return torch.frombuffer(buf, dtype=DT[info["dtype"]]).reshape(info["shape"])


def main():
    model = sys.argv[1]
    methods = "gram,lowrank,svd"
    limit = None
    out_json = None
    args = sys.argv[2:]
    for i, a in enumerate(args):
        if a == "--methods":
            methods = args[i + 1]
        if a == "--limit":
            limit = int(args[i + 1])
        if a == "--json":
            out_json = args[i + 1]
    methods = methods.split(",")
    every = list(tensors(model))
    mats = every[:limit]
    dev = torch.device("cuda")
    print(f"{len(mats)} linear matrices from {model} on {torch.cuda.get_device_name(0)}")
    total = {m: 0.0 for m in methods}
    by_shape = {}
    t_load = 0.0
    for path, base, name, info in mats:
        t = time.perf_counter()
        w = load(path, base, info).to(dev).float()
        torch.cuda.synchronize()
        t_load += time.perf_counter() - t
        for m in methods:
            torch.cuda.synchronize()
            t = time.perf_counter()
            if m == "gram":
                g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
                torch.linalg.eigvalsh(g)
            elif m == "lowrank":
                torch.svd_lowrank(w, q=1024)
            elif m == "svd":
                torch.linalg.svd(w, full_matrices=False)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            total[m] += dt
            k = (m, tuple(info["shape"]))
            c, tt = by_shape.get(k, (0, 0.0))
            by_shape[k] = (c + 1, tt + dt)
    print(f"load+upload {t_load:.1f} s")
    for m in methods:
        label = {"gram": "Gram + torch.linalg.eigvalsh", "lowrank": "torch.svd_lowrank(q=1024)", "svd": "torch.linalg.svd"}[m]
        print(f"{label:32} {total[m]:8.1f} s over {len(mats)} matrices")
        for (mm, shape), (c, tt) in sorted(by_shape.items()):
            if mm == m:
                print(f"    {str(shape):16} {c:4d} matrices, {1000 * tt / c:8.1f} ms each")
    if out_json:
        # per-shape means and how many matrices of each shape the whole model has, so that a run
        # over the first N matrices can be extrapolated to all of them
        full = collections.Counter(str(tuple(info["shape"])) for _, _, _, info in every)
        per = {m: {str(shape): tt / c for (mm, shape), (c, tt) in by_shape.items() if mm == m} for m in methods}
        with open(out_json, "w") as fh:
            json.dump({"matrices": len(mats), "load_s": t_load, "totals_s": total, "per_shape_s": per, "model_counts": full}, fh)


if __name__ == "__main__":
    main()
