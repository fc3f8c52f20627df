#!/usr/bin/env python3
"""One decode step's kernels on the timeline, from an Nsight Systems trace (`nsys stats --report
cuda_gpu_trace --format csv`, profiled with --cuda-graph-trace=node): the last N kernels (one
step), each with its start, duration and the gap after the previous kernel's end; then per kernel
name the count, summed duration and summed gaps before it. Usage: nsys-step.py CSV N [SHOW]
(a benchmark diagnostic for scripts/gpu-run.sh)."""
import csv, sys
from collections import defaultdict

rows = list(csv.DictReader(open(sys.argv[1])))
n, show = int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 12
key = lambda r, *names: next(r[k] for k in names if k in r)
ks = [(float(key(r, "Start (ns)", "Start")), float(key(r, "Duration (ns)", "Duration")), key(r, "Name")) for r in rows]
ks = [k for k in ks if "memcpy" not in k[2].lower() and "memset" not in k[2].lower()]
ks.sort()
step = ks[-n:]
t0 = step[0][0]
agg = defaultdict(lambda: [0, 0.0, 0.0])
prev_end = None
for i, (s, d, name) in enumerate(step):
    gap = 0.0 if prev_end is None else s - prev_end
    a = agg[name.split("(")[0]]
    a[0] += 1; a[1] += d; a[2] += gap
    if i < show:
        print(f"{i:>3} {name.split('(')[0]:<14} start {(s - t0)/1e3:9.2f} us  dur {d/1e3:8.2f} us  gap {gap/1e3:7.2f} us")
    prev_end = max(prev_end or 0, s + d)
span = step[-1][0] + step[-1][1] - t0
print(f"{len(step)} kernels, span {span/1e3:.1f} us; per name: count, summed duration, summed gap before")
for name, (c, d, g) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"  {name:<14}{c:>5}{d/1e3:>10.1f} us{g/1e3:>10.1f} us")
