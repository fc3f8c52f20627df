#!/usr/bin/env python3
"""Aggregates an Nsight Compute CSV (`ncu --csv --page raw`) of one decode step's kernels: per
kernel name the launches, the summed isolated duration, DRAM bytes read and the bandwidth, the
registers and the achieved occupancy; then the step's summed duration. Usage: ncu-step.py CSV [N]
(a benchmark diagnostic for scripts/gpu-run.sh). With N, also the first N launches one by one.
ncu-step.py CSV --stalls: per launch of a CSV with the WarpStateStats section, its duration, issue
activity, occupancy and largest warp stall reasons (stalled cycles per issued instruction)."""
import csv, sys
from collections import defaultdict

rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
cols = rows[head]
data = [r for r in rows[head + 2:] if len(r) == len(cols)]
units = rows[head + 1]
ix = {c: i for i, c in enumerate(cols)}
# the row under the names gives each metric's unit: scale durations to ns and sizes to bytes
SCALE = {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9, "ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9,
         "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}
def num(r, c):
    try:
        return float(r[ix[c]].replace(",", "")) * SCALE.get(units[ix[c]], 1)
    except (KeyError, ValueError):
        return 0.0
if sys.argv[2:] == ["--stalls"]:
    keys = ["dram__throughput.avg.pct_of_peak_sustained_elapsed", "smsp__issue_active.avg.pct_of_peak_sustained_active",
            "sm__warps_active.avg.pct_of_peak_sustained_active", "smsp__warps_eligible.avg.per_cycle_active", "launch__registers_per_thread", "launch__grid_size"]
    stall = [c for c in cols if "average_warp_latency_issue_stalled" in c and c.endswith(".ratio") and "not_issued" not in c] or \
            [c for c in cols if "warps_issue_stalled" in c and c.endswith("per_issue_active.ratio")]
    for r in data:
        print(r[ix["Kernel Name"]], f"{num(r, 'gpu__time_duration.sum') / 1e3:.2f} us", " ".join(f"{k.split('__')[1].split('.')[0]}={num(r, k):.4g}" for k in keys))
        top = sorted(((num(r, c), c) for c in stall), reverse=True)[:7]
        print("   stalls/issue:", ", ".join(f"{c.split('stalled_')[1].split('.')[0].replace('_per_issue_active', '')}={v:.2f}" for v, c in top))
    sys.exit(0)
agg = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0, 0.0])
tot_t = tot_b = 0.0
for r in data:
    n = r[ix["Kernel Name"]]
    t = num(r, "gpu__time_duration.sum")  # ns
    b = num(r, "dram__bytes_read.sum")  # bytes
    g = agg[n]
    g[0] += 1; g[1] += t; g[2] += b; g[3] = num(r, "launch__registers_per_thread"); g[4] += num(r, "sm__warps_active.avg.pct_of_peak_sustained_active"); g[5] += num(r, "launch__grid_size")
    tot_t += t; tot_b += b
print(f"{len(data)} kernels, summed isolated duration {tot_t/1e3:.1f} us, DRAM read {tot_b/1e9:.3f} GB, {tot_b/max(tot_t,1):.0f} GB/s over that time")
print(f"{'kernel':<14}{'n':>5}{'total us':>10}{'mean us':>9}{'GB':>8}{'GB/s':>7}{'regs':>6}{'occ %':>7}{'blocks':>8}")
for n, (c, t, b, reg, occ, grid) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"{n:<14}{c:>5}{t/1e3:>10.1f}{t/c/1e3:>9.2f}{b/1e9:>8.3f}{b/max(t,1):>7.0f}{reg:>6.0f}{occ/c:>7.1f}{grid/c:>8.0f}")
if len(sys.argv) > 2:  # the first N launches one by one (a block's kernels in order)
    print(f"{'#':>3} {'kernel':<14}{'us':>8}{'MB':>9}{'GB/s':>7}{'regs':>6}{'occ %':>7}{'blocks':>8}")
    for i, r in enumerate(data[: int(sys.argv[2])]):
        t, b = num(r, "gpu__time_duration.sum"), num(r, "dram__bytes_read.sum")
        print(f"{i:>3} {r[ix['Kernel Name']]:<14}{t/1e3:>8.2f}{b/1e6:>9.2f}{b/max(t,1):>7.0f}{num(r, 'launch__registers_per_thread'):>6.0f}"
              f"{num(r, 'sm__warps_active.avg.pct_of_peak_sustained_active'):>7.1f}{num(r, 'launch__grid_size'):>8.0f}")
