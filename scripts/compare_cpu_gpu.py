"""CPU vs GPU agreement for issue 8 (run by scripts/gpu-run.sh D on the GPU machine).
Reads /tmp/sp-{cpu,cuda}.json (compactor spectra --json) and /tmp/gt-{svd,tt}-{cpu,cuda}/
(compactor compress manifests) with their eval JSON, prints the differences and PASS/FAIL."""
import json, sys
d = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
ok = True
cpu = {e["name"]: e["spectrum"] for e in json.load(open(f"{d}/sp-cpu.json"))}
gpu = {e["name"]: e["spectrum"] for e in json.load(open(f"{d}/sp-cuda.json"))}
worst_top, worst_all, worst_stable = 0.0, 0.0, 0.0
for name, c in cpu.items():
    g = gpu[name]
    sc, sg = c["singular_values"], g["singular_values"]
    smax = sc[0]
    diffs = [abs(a - b) / smax for a, b in zip(sc, sg)]
    worst_all = max(worst_all, max(diffs))
    worst_top = max(worst_top, max(diffs[: max(1, len(diffs) // 2)]))
    worst_stable = max(worst_stable, abs(c["stable_rank"] - g["stable_rank"]) / c["stable_rank"])
print(f"spectra, {len(cpu)} matrices: max |sigma_gpu - sigma_cpu| / sigma_max = {worst_all:.2e} (top half {worst_top:.2e}); stable rank rel diff {worst_stable:.2e}")
ok &= worst_all < 1e-3
for m in ("svd", "tt"):
    a = json.load(open(f"{d}/gt-{m}-cpu/compactor.json"))
    b = json.load(open(f"{d}/gt-{m}-cuda/compactor.json"))
    same = all(x["ranks"] == y["ranks"] for x, y in zip(a["layers"], b["layers"]))
    derr = max(abs(x["rel_error"] - y["rel_error"]) for x, y in zip(a["layers"], b["layers"]))
    pa = json.load(open(f"{d}/gt-{m}-cpu-eval.json"))["perplexity"]
    pb = json.load(open(f"{d}/gt-{m}-cuda-eval.json"))["perplexity"]
    dp = 100 * (pb / pa - 1)
    print(f"{m}: {len(a['layers'])} layers, same ranks: {same}, max |rel_error gpu - cpu| = {derr:.2e}, "
          f"perplexity cpu-fit {pa:.4f} gpu-fit {pb:.4f} ({dp:+.3f}%), compress {a['notes']['compress_seconds']:.1f} s cpu, {b['notes']['compress_seconds']:.1f} s gpu")
    ok &= same and derr <= 1e-3 and abs(dp) <= 0.5
print("PASS" if ok else "FAIL")
