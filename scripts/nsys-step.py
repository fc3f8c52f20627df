#!/usr/bin/env python3
"""Summarizes one decode step of an `nsys stats -r cuda_gpu_trace -f csv` export (graph nodes
traced): per kernel class (name, grid) the count, mean duration, and mean gap from the previous
kernel's end (negative: overlap through programmatic dependent launch), and the step's span."""
import csv, sys
from collections import OrderedDict

rows = list(csv.DictReader(open(sys.argv[1])))
col = lambda key: next(c for c in rows[0] if c.startswith(key))
start, dur, name, grid = col("Start"), col("Duration"), col("Name"), col("GrdX")
ks = [(int(r[start]), int(r[dur]), r[name].split("(")[0], r[grid]) for r in rows if ("gemv" in r[name] or "step_" in r[name])]
ks.sort()
embeds = [i for i, k in enumerate(ks) if k[2].startswith("step_embed")]
if len(embeds) < 3:
    sys.exit(f"{sys.argv[1]}: fewer than three steps traced")
# the second-to-last complete step
a, b = embeds[-3], embeds[-2]
step = ks[a:b]
span = step[-1][0] + step[-1][1] - step[0][0]
busy = sum(k[1] for k in step)
print(f"one step: {len(step)} kernels, span {span / 1e3:.1f} us, sum of durations {busy / 1e3:.1f} us")
cls = OrderedDict()
prev_end = None
for s, d, n, g in step:
    gap = 0 if prev_end is None else s - prev_end
    prev_end = s + d
    c = cls.setdefault((n, g), [0, 0, 0])
    c[0] += 1; c[1] += d; c[2] += gap
print(f"{'kernel':<16} {'grid':>6} {'count':>5} {'mean us':>8} {'gap us':>7} {'total us':>9}")
for (n, g), (c, d, gp) in cls.items():
    print(f"{n:<16} {g:>6} {c:>5} {d / c / 1e3:>8.2f} {gp / c / 1e3:>7.2f} {(d + gp) / 1e3:>9.1f}")
