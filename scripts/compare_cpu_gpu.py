"""CPU vs GPU agreement for issue 8 (run by scripts/gpu-run.sh D, step agree, on the GPU machine).
usage: compare_cpu_gpu.py DIR TAG:METHOD,METHOD... [TAG:...]
Reads, for each fixture TAG, DIR/ag-TAG-spectra-{cpu,cuda}.json (compactor spectra --json),
DIR/ag-TAG-dense-{cpu,cuda}-eval.json (the dense model evaluated on each device) and, per METHOD,
DIR/ag-TAG-METHOD-{cpu,cuda}/compactor.json (fits made on each device) with their eval JSON
(both fits evaluated on the same device). Prints the differences and PASS/FAIL against the
issue's bounds: same ranks, rel_error within 1e-3, perplexity within 0.5 %."""
import json, sys

d = sys.argv[1]
ok = True


def load(path):
    try:
        with open(f"{d}/{path}") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"{d}/{path}: {e} (a step before this one failed or timed out)\nFAIL")


for arg in sys.argv[2:]:
    tag, methods = arg.split(":")
    cpu = {e["name"]: e["spectrum"] for e in load(f"ag-{tag}-spectra-cpu.json")}
    gpu = {e["name"]: e["spectrum"] for e in load(f"ag-{tag}-spectra-cuda.json")}
    worst_top, worst_all, worst_stable = 0.0, 0.0, 0.0
    for name, c in cpu.items():
        g = gpu[name]
        sc, sg = c["singular_values"], g["singular_values"]
        diffs = [abs(a - b) / sc[0] for a, b in zip(sc, sg)]
        worst_all = max(worst_all, max(diffs))
        worst_top = max(worst_top, max(diffs[: max(1, len(diffs) // 2)]))
        worst_stable = max(worst_stable, abs(c["stable_rank"] - g["stable_rank"]) / c["stable_rank"])
    same_set = set(cpu) == set(gpu)
    print(f"{tag} spectra, {len(cpu)} matrices (same set: {same_set}): max |sigma_gpu - sigma_cpu| / sigma_max = "
          f"{worst_all:.2e} (top half {worst_top:.2e}); stable rank rel diff {worst_stable:.2e}")
    ok &= same_set and worst_all < 1e-3
    pa = load(f"ag-{tag}-dense-cpu-eval.json")["perplexity"]
    pb = load(f"ag-{tag}-dense-cuda-eval.json")["perplexity"]
    dp = 100 * (pb / pa - 1)
    print(f"{tag} dense model: perplexity cpu {pa:.4f} cuda {pb:.4f} ({dp:+.4f}%)")
    ok &= abs(dp) <= 0.5
    for m in methods.split(","):
        a = load(f"ag-{tag}-{m}-cpu/compactor.json")
        b = load(f"ag-{tag}-{m}-cuda/compactor.json")
        names_match = [x["name"] for x in a["layers"]] == [y["name"] for y in b["layers"]]
        same = names_match and all(x["ranks"] == y["ranks"] for x, y in zip(a["layers"], b["layers"]))
        derr = max(abs(x["rel_error"] - y["rel_error"]) for x, y in zip(a["layers"], b["layers"]))
        pa = load(f"ag-{tag}-{m}-cpu-eval.json")["perplexity"]
        pb = load(f"ag-{tag}-{m}-cuda-eval.json")["perplexity"]
        dp = 100 * (pb / pa - 1)
        print(f"{tag} {m}: {len(a['layers'])} layers, same ranks: {same}, max |rel_error gpu - cpu| = {derr:.2e}, "
              f"perplexity cpu-fit {pa:.4f} gpu-fit {pb:.4f} ({dp:+.3f}%), "
              f"compress {a['notes']['compress_seconds']:.1f} s cpu, {b['notes']['compress_seconds']:.1f} s gpu")
        ok &= same and derr <= 1e-3 and abs(dp) <= 0.5
print("PASS" if ok else "FAIL")
