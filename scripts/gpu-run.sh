#!/usr/bin/env bash
# One call on the lent GPU machine (../shared/docs/GPU.md): the CUDA binary built by
# scripts/build-cuda.sh (.gpu/compactor), the stories260K fixture and its text copied to .gpu/,
# the Vulkan loader .debs in .gl/. Results go to $OUT (log.txt and JSON files).
#   carry: .gpu .gl        usage: scripts/gpu-run.sh A|B|C|D|E|F   (each call must fit 10 minutes)
#   F: issue 8's whole benchmark in one call (Compactor and PyTorch on the same matrices, ratios, decode)
#   D runs the issue-8 steps named in STEPS (default: agree tokens linear g8b plans decode_full;
#     also: svd_only, aware (the decode-aware plan), tt_decode (MPO layers in the step graph vs candle ops), mpo_fused (the fused batch-1 MPO kernel vs two cuBLAS GEMMs; MPO_ENVS), mpo_prof (Nsight Compute on it, timing-only variants), int8 (int8 factors decoded from their codes), int8_ref (the dense model in int8 against the int8 decode-aware plan), ncu_w8 (Nsight Compute on the bf16 and int8 svd plans' step kernels: bandwidth, occupancy, warp stalls), graph_tiny (step graph vs candle ops on granite-tiny), decode_parts (what each
#     kernel kind of the step graph costs), decode_split (column-split sweep), decode_pdl,
#     spectra_streams (spectra on 8 and 16 streams), eigen (syevd against syevBatched and two-stage),
#     spectra2 (spectra: two-stage band 8 / 16 against syevd), decode_env (batch-1 decode of DECODE_MODELS under each of
#     DECODE_ENVS), decode_same (the step graph against candle ops for DECODE_MODELS under each of DECODE_ENVS), spectra_env / plan_env (spectra
#     and a plan under each environment of ENVS), decode_mlp (svd everywhere vs MLPs only), decode_curve (decode
#     against the share of parameters kept), warm (one small GPU run first), ncu_step
#     (Nsight Compute on one decode step's kernels), plan_cold (the svd plan after emptying the driver's JIT cache, with and
#     without the prewarm of candle's modules, then cached))
set -uo pipefail
PART=${1:-A}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log-$PART.txt") 2>&1
[ -x .gpu/compactor ] || xz -d -k .gpu/compactor.xz
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export XDG_RUNTIME_DIR=/tmp/xdg; mkdir -p $XDG_RUNTIME_DIR
B=.gpu/compactor
chmod +x $B
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nproc
step() { echo; echo "=== $* ($(date +%T))"; }
G=assets/models/granite-tiny; GT=assets/gutenberg-heldout.txt
S=.gpu/stories260K; ST=.gpu/tinystories_val.txt

if [ "$PART" = A ]; then
step "issue 2: eval, CUDA vs CPU, f32, ctx 256 x 200 windows"
for dev in cuda cpu; do
  timeout 100 $B eval $G --text $GT --device $dev --json > "$OUT/eval-granite-$dev.json"; echo "granite $dev rc $?"
  timeout 40 $B eval $S --text $ST --device $dev --json > "$OUT/eval-stories-$dev.json"; echo "stories $dev rc $?"
done
python3 - "$OUT" <<'EOF'
import json, sys, os
o = sys.argv[1]
for m, ref in [("granite", 60.78280796747698), ("stories", 4.100727070593168)]:
    r = {d: json.load(open(f"{o}/eval-{m}-{d}.json")) for d in ("cuda", "cpu") if os.path.getsize(f"{o}/eval-{m}-{d}.json")}
    for d, v in r.items():
        print(f"{m:8} {d:4} ppl {v['perplexity']:.4f} (ref {ref}, {100*(v['perplexity']/ref-1):+.3f}%) prefill {v.get('prefill_tokens_per_s',0):.0f} tok/s decode {v.get('decode_tokens_per_s',0):.1f} tok/s")
    if len(r) == 2:
        print(f"{m:8} cuda vs cpu ppl: {100*(r['cuda']['perplexity']/r['cpu']['perplexity']-1):+.4f}%")
EOF

step "issue 4: the demo on CUDA (compress, heal, evaluate, report)"
timeout 330 $B demo --device cuda --out /tmp/demo-cuda; echo "demo rc $?"
cp /tmp/demo-cuda/run.json "$OUT/demo-cuda-run.json" 2>/dev/null
cp /tmp/demo-cuda/report.html /tmp/demo-cuda/report.pdf "$OUT/" 2>/dev/null

step "issue 4: decode tokens/s, compressed vs dense, same run (CUDA f32, then CPU f32)"
V=$(for v in svd tt tucker cp aa-svd aa-tt aa-svd-healed; do [ -d /tmp/demo-cuda/$v ] && echo /tmp/demo-cuda/$v; done)
timeout 60 $B bench decode $G $V --device cuda --tokens 128 --repeats 3
timeout 60 $B bench decode $G $V --device cpu --tokens 64 --repeats 2

step "issue 5: error heatmap 12800 x 4096 on the NVIDIA Vulkan adapter vs the CPU loop"
timeout 60 $B bench heatmap --runs 5

fi
if [ "$PART" = B ]; then
step "issue 8 (partial): Granite-8B shapes, 4 of 40 layers, bf16: dense vs svd at half the linear parameters"
timeout 300 $B synth --preset granite-8b --layers 4 --device cuda --tokenizer $G/tokenizer.json --out /tmp/g8b; echo "synth rc $?"
du -sh /tmp/g8b
/usr/bin/time -v timeout 400 $B compress /tmp/g8b --method svd --ratio 0.5 --out /tmp/g8b-svd 2>&1 | grep -E "wrote|linear|bytes|error|Elapsed|Maximum resident"
timeout 240 $B bench decode /tmp/g8b /tmp/g8b-svd --device cuda --dtype bf16 --prompt-tokens 64 --tokens 64 --repeats 3
step "the demo again with what time is left (variants timed by their manifests)"
timeout 380 $B demo --device cuda --out /tmp/demo-cuda2; echo "demo rc $?"
for d in /tmp/demo-cuda2/*/; do python3 -c "import json,sys; m=json.load(open(sys.argv[1]+'compactor.json')); print(sys.argv[1], round(m['notes'].get('compress_seconds',0),1), 's')" $d 2>/dev/null; done
cp /tmp/demo-cuda2/run.json "$OUT/demo-cuda-run.json" 2>/dev/null
cp /tmp/demo-cuda2/report.html /tmp/demo-cuda2/report.pdf "$OUT/" 2>/dev/null
fi
if [ "$PART" = C ]; then
step "issue 4: the demo on CUDA, then decode tokens/s of every variant against the dense model (CUDA, then CPU)"
timeout 400 $B demo --device cuda --out /tmp/demo-c; echo "demo rc $?"
cp /tmp/demo-c/run.json "$OUT/demo-cuda-run.json"; cp /tmp/demo-c/report.html /tmp/demo-c/report.pdf "$OUT/" 2>/dev/null
V=$(for v in svd tt tucker cp aa-svd aa-tt int8 aa-svd-healed; do [ -d /tmp/demo-c/$v ] && echo /tmp/demo-c/$v; done)
timeout 60 $B bench decode $G $V --device cuda --tokens 128 --repeats 3
timeout 70 $B bench decode $G $V --device cpu --tokens 64 --repeats 2
fi
agree() {
step "issue 8: CPU and GPU agree on both fixtures: spectra, svd/tt/tucker/cp plans at 0.5 (ranks, errors), perplexity"
# granite-tiny's cp fit runs > 300 s on the 16-core host's CPU (32.6 s on the H200): cp is compared on stories260K
# AGREE_G / AGREE_S: the methods compared on each fixture (default: all that fit the call)
AG=${AGREE_G:-svd tt tucker}; AS=${AGREE_S:-svd tt tucker cp}
for fx in "granite-tiny $G $GT $AG" "stories260K $S $ST $AS"; do
  set -- $fx; tag=$1 m=$2 t=$3; shift 3
  for d in cpu cuda; do
    $B spectra $m --json --device $d > /tmp/ag-$tag-spectra-$d.json
    timeout 100 $B eval $m --text $t --device $d --json > /tmp/ag-$tag-dense-$d-eval.json
  done
  for me in "$@"; do for d in cpu cuda; do
    /usr/bin/time -f "$tag: compress $me on $d: %e s wall" timeout 300 $B compress $m --method $me --ratio 0.5 --device $d --out /tmp/ag-$tag-$me-$d > /dev/null 2>/tmp/ag-err; echo "rc $?"; tail -2 /tmp/ag-err
    timeout 100 $B eval /tmp/ag-$tag-$me-$d --text $t --device cuda --json > /tmp/ag-$tag-$me-$d-eval.json
  done; done
done
python3 scripts/compare_cpu_gpu.py /tmp "granite-tiny:${AG// /,}" "stories260K:${AS// /,}" | tee "$OUT/agreement.txt"
}
tokens() {
[ -d /tmp/gt-svd-cuda ] || timeout 100 $B compress $G --method svd --ratio 0.5 --device cuda --out /tmp/gt-svd-cuda > /dev/null
step "decode kernels give the same tokens: greedy bf16 generation, cuBLAS vs CUDA-core vs tensor-core vs auto"
for k in 0 1 2 3; do for v in $G /tmp/gt-svd-cuda; do
  COMPACTOR_GEMV=$k timeout 60 $B generate $v --prompt "It was a dark and stormy night" --max-tokens 24 --device cuda --dtype bf16 2>/dev/null | tail -1 | sed "s|^|kernel $k $(basename $v): |"
done; done
}
linear() {
step "issue 8: decode-shaped products over a Granite-8B-shaped linear stack (40 layers): kernels x schedules, dense vs low rank"
timeout ${LINEAR_TIMEOUT:-240} $B bench linear --layers 40 --batch 1,16 --repeats 20
}
g8b() {
L=${L:-40}
step "issue 8: synthetic Granite-8B shapes, $L layers, bf16, on local disk"
[ -f /tmp/g8b/config.json ] || timeout 400 $B synth --preset granite-8b --layers $L --device cuda --tokenizer $G/tokenizer.json --out /tmp/g8b; du -sh /tmp/g8b
cat /tmp/g8b/*.safetensors > /dev/null   # page cache, as for the PyTorch run
# flush the generator's 16 GB of dirty pages now, so that their writeback does not throttle the
# timed plans' own writes
/usr/bin/time -f "sync (the generator's writes): %e s" sync
}
# plans: spectra, then the svd and tt plans at 0.5; each wall time also goes to /tmp/t-{spectra,svd,tt}
# (part F reads them). PLANS_TIMING=0 leaves out the per-phase timing (its stream syncs).
plans() {
step "Compactor spectra of every linear matrix on the GPU (phase times summed over streams)"
[ "${PLANS_TIMING:-1}" = 0 ] || export COMPACTOR_GPU_TIMING=1
timed() { # timed KEY LABEL COMMAND...: runs it, prints its wall time and peak RSS (stderr, as time does), keeps them
  local k=$1 label=$2; shift 2
  /usr/bin/time -o /tmp/t-$k -f "%e %M" "$@"; read -r secs rss < /tmp/t-$k; echo "$label: $secs s wall, $rss KiB peak RSS" >&2
}
timed spectra "compactor spectra" timeout 300 $B spectra /tmp/g8b --device cuda --json > /tmp/g8b-spectra.json
for m in svd tt; do
  step "Compactor $m plan at 0.5, load -> compress -> save, on the GPU"
  rm -rf /tmp/g8b-$m
  timed $m "compress $m 0.5" timeout 400 $B compress /tmp/g8b --method $m --ratio 0.5 --device cuda --out /tmp/g8b-$m > /dev/null
  python3 -c "import json; m=json.load(open('/tmp/g8b-$m/compactor.json')); e=[l['rel_error'] for l in m['layers']]; n=m['notes']; print('$m', len(e), 'matrices, compress_seconds', round(n['compress_seconds'],1), 'write_seconds', round(n.get('write_seconds',0),1), 'linear_param_ratio', round(m['totals']['linear_param_ratio'],4), 'rel_error mean', round(sum(e)/len(e),6))"
done
unset COMPACTOR_GPU_TIMING
}
decode_full() {
step "decode on the GPU, bf16, dense vs compressed, batch 1 and 16 (COMPACTOR_PDL=${COMPACTOR_PDL:-1})"
timeout 300 $B bench decode /tmp/g8b /tmp/g8b-svd ${DECODE_EXTRA:-} --device cuda --dtype bf16 --prompt-tokens 32 --tokens 64 --repeats 3 --batch 1,16 --paths ${PATHS:-ops,graph,fused}
}
# compress_once DIR ARGS...: the synthetic Granite-8B compressed on the GPU into DIR with ARGS
# (--method/--ratio or --plan), unless DIR already holds a compressed model
compress_once() {
local d=$1; shift
[ -f $d/compactor.json ] || timeout 200 $B compress /tmp/g8b "$@" --device cuda --out $d > /dev/null
}
# plan_model FILE: the synthetic Granite-8B compressed with plan FILE into /tmp/g8b-plan-NAME (NAME:
# the file's, without .json), unless there already; prints that directory. Every step that
# needs a plan file's model shares it, so no call compresses a plan twice.
plan_model() {
local d=/tmp/g8b-plan-$(basename "$1" .json)
compress_once $d --plan "$1"
echo $d
}
svd_only() {
step "Compactor svd plan at 0.5 (for decode)"
compress_once /tmp/g8b-svd --method svd --ratio 0.5
}
# tt_decode: MPO decode in the step graph (each layer cut into two halves, two cuBLAS GEMMs)
# against candle ops' site-by-site contraction: agreement and speed on granite-tiny's tt plan
# (trained weights) and on the synthetic Granite-8B's tt plan at 0.5, with the dense and svd
# models in the same process
tt_decode() {
step "MPO decode: granite-tiny tt 0.5, step graph vs candle ops (agreement, speed)"
[ -d /tmp/gt-tt-cuda ] || timeout 100 $B compress $G --method tt --ratio 0.5 --device cuda --out /tmp/gt-tt-cuda > /dev/null
timeout 120 $B bench decode $G /tmp/gt-tt-cuda --device cuda --dtype bf16 --prompt-tokens 32 --tokens 64 --repeats 2 --batch 1,16 --paths ops,graph 2>&1 | grep -vE "^loaded"
for v in $G /tmp/gt-tt-cuda; do for g in 0 1; do
  COMPACTOR_STEP_GRAPH=$g timeout 60 $B generate $v --prompt "It was a dark and stormy night" --max-tokens 24 --device cuda --dtype bf16 2>/dev/null | tail -1 | sed "s|^|graph $g $(basename $v): |"
done; done
step "MPO decode: synthetic Granite-8B, tt plan at 0.5"
compress_once /tmp/g8b-tt --method tt --ratio 0.5
timeout 300 $B bench decode /tmp/g8b /tmp/g8b-svd /tmp/g8b-tt --device cuda --dtype bf16 --prompt-tokens 32 --tokens 32 --repeats 2 --batch ${TT_BATCH:-1,16} --paths ops,graph 2>&1 | grep -vE "^loaded"
}
# mpo_fused: MPO layers at batch 1 in the fused kernel (step_mpof + step_mpo_sum) against the two
# cuBLAS GEMMs (COMPACTOR_MPO_FUSED=0): granite-tiny's tt plan (agreement with candle ops, greedy
# tokens), then the synthetic Granite-8B's tt plan at 0.5 with the dense model in the same process
mpo_fused() {
step "fused MPO kernel: granite-tiny tt 0.5, step graph vs candle ops (agreement, speed)"
[ -d /tmp/gt-tt-cuda ] || timeout 100 $B compress $G --method tt --ratio 0.5 --device cuda --out /tmp/gt-tt-cuda > /dev/null
timeout 120 $B bench decode $G /tmp/gt-tt-cuda --device cuda --dtype bf16 --prompt-tokens 32 --tokens 64 --repeats 2 --batch 1 --paths ops,graph 2>&1 | grep -vE "^loaded"
for f in 1 0; do
  COMPACTOR_MPO_FUSED=$f timeout 60 $B generate /tmp/gt-tt-cuda --prompt "It was a dark and stormy night" --max-tokens 24 --device cuda --dtype bf16 2>/dev/null | tail -1 | sed "s|^|mpo fused $f gt-tt: |"
done
step "fused MPO kernel: synthetic Granite-8B, tt plan at 0.5"
compress_once /tmp/g8b-tt --method tt --ratio 0.5
timeout 200 $B bench decode /tmp/g8b /tmp/g8b-tt --device cuda --dtype bf16 --prompt-tokens 32 --tokens 32 --repeats 2 --batch 1 --paths ops,graph 2>&1 | grep -vE "^loaded"
# MPO_ENVS: the environments compared, "/" joining two settings (default: the cuBLAS path; the
# partials added by the launch's last 16 / 32 blocks instead of step_mpo_sum; the same with rings
# of 2 slots, small enough for two launches' blocks to share an SM); MPO_PATHS=ops,graph adds the
# agreement
for e in ${MPO_ENVS:-COMPACTOR_MPO_FUSED=0 COMPACTOR_MPO_TAIL=16 COMPACTOR_MPO_TAIL=32 COMPACTOR_MPO_TAIL=16/COMPACTOR_MPO_SLOTS=2}; do
  step "g8b tt, step graph, under $e"
  env ${e//\// } timeout 150 $B bench decode /tmp/g8b /tmp/g8b-tt --device cuda --dtype bf16 --prompt-tokens 32 --tokens 32 --repeats 2 --batch 1 --paths ${MPO_PATHS:-graph} 2>&1 | grep -vE "^loaded"
done
}
# mpo_prof: Nsight Compute's detailed sections on two step_mpof launches of a decode step (the
# second step's q and k of layer 0; run with L=4 for a quick synthetic model), then timing-only
# variants (MPO_PARTS; COMPACTOR_GEMV_DEFINES=MF_SKIP=1 leaves out the tensor-core phases, 2 the
# copies too, 3 phase 2, 4 phase 1)
# ncu_w8: the bf16 and int8 svd plans' step kernels under Nsight Compute: each kernel's isolated
# duration and DRAM bandwidth (a whole step), then for the kernels of one layer the issue
# activity, occupancy and the largest warp stall reasons (why the int8 kernels stream slower)
ncu_w8() {
NCU_MODELS="g8b-svd:363 g8b-svd-i8:363" NCU_LIST=12 ncu_step
NCU=/usr/local/cuda-13.0/bin/ncu
for m in g8b-svd g8b-svd-i8; do
  step "ncu: $m, layer 10's kernels, warp states"
  timeout 150 $NCU --graph-profiling node --clock-control none --kernel-name regex:"gemv|step_" --launch-skip $((363 * 3 + 9 * 10)) --launch-count 9 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
    -o /tmp/ncud-$m -f $B bench decode /tmp/$m --device cuda --dtype bf16 --prompt-tokens 32 --tokens 8 --repeats 1 --batch 1 --paths fused > /tmp/ncud-$m.log 2>&1
  echo "ncu rc $?"; grep -E "==ERROR" /tmp/ncud-$m.log | head -5
  $NCU --import /tmp/ncud-$m.ncu-rep --csv --page raw > /tmp/ncud-$m.csv 2>/dev/null && python3 scripts/ncu-step.py /tmp/ncud-$m.csv --stalls
done
}
mpo_prof() {
compress_once /tmp/g8b-tt --method tt --ratio 0.5
step "ncu --set detailed: step_mpof, g8b ($L layers) tt"
NCU=/usr/local/cuda-13.0/bin/ncu
timeout 300 $NCU --graph-profiling node --kernel-name regex:"step_mpof_" --launch-skip $((7 * L)) --launch-count 2 --set detailed --section WarpStateStats --section SourceCounters \
  -o /tmp/ncu-prof -f $B bench decode /tmp/g8b-tt --device cuda --dtype bf16 --prompt-tokens 32 --tokens 4 --repeats 1 --batch 1 --paths graph > /tmp/ncu-prof.log 2>&1
echo "ncu rc $?"; grep -E "==ERROR" /tmp/ncu-prof.log | head -5
$NCU --import /tmp/ncu-prof.ncu-rep --page details --print-details all 2>/dev/null | grep -vE "^\s*-+\s*$" | head -400
for e in - ${MPO_PARTS:-COMPACTOR_GEMV_DEFINES=MF_SKIP=1 COMPACTOR_GEMV_DEFINES=MF_SKIP=3 COMPACTOR_GEMV_DEFINES=MF_SKIP=4 COMPACTOR_GEMV_DEFINES=MF_SKIP=2}; do
  step "g8b ($L layers) tt, fused MPO kernel, $e"
  env ${e#-} timeout 150 $B bench decode /tmp/g8b /tmp/g8b-tt --device cuda --dtype bf16 --prompt-tokens 32 --tokens 32 --repeats 2 --batch 1 --paths graph 2>&1 | grep -E "g8b|error"
done
}
# int8: symmetric int8 factors (group 64) decoded from their codes by the GEMV_W8 kernels, against
# candle ops (which dequantize them at every call: an independent reference) and against the same
# factors dequantized to bf16 on load (COMPACTOR_INT8_DECODE=0). granite-tiny (trained weights):
# agreement and greedy tokens; then the synthetic Granite-8B's svd plan at 0.5 with int8 factors
# beside the dense and bf16 svd models (agreement, batch 1 and 16); INT8_DENSE=1 adds the dense
# model quantized to int8 (a host fit, minutes)
int8() {
step "int8 decode: granite-tiny, svd 0.5 with int8 factors and the dense model in int8"
[ -d /tmp/gt-svd-i8 ] || timeout 100 $B compress $G --method svd --ratio 0.5 --quant int8 --device cuda --out /tmp/gt-svd-i8 > /dev/null
[ -d /tmp/gt-i8 ] || timeout 100 $B compress $G --method dense --quant int8 --device cuda --out /tmp/gt-i8 > /dev/null
timeout 150 $B bench decode $G /tmp/gt-svd-i8 /tmp/gt-i8 --device cuda --dtype bf16 --prompt-tokens 32 --tokens 32 --repeats 2 --batch 1,16 --paths ops,fused 2>&1 | grep -vE "^loaded"
for v in /tmp/gt-svd-i8 /tmp/gt-i8; do for e in COMPACTOR_STEP_GRAPH=0 COMPACTOR_INT8_DECODE=0 COMPACTOR_INT8_DECODE=1; do
  env $e timeout 60 $B generate $v --prompt "It was a dark and stormy night" --max-tokens 24 --device cuda --dtype bf16 2>/dev/null | tail -1 | sed "s|^|$e $(basename $v): |"
done; done
step "int8 decode: synthetic Granite-8B, svd 0.5 with int8 factors"
[ -f /tmp/g8b-svd-i8/compactor.json ] || /usr/bin/time -f "svd 0.5 int8 plan, load -> compress -> save: %e s" timeout 200 $B compress /tmp/g8b --method svd --ratio 0.5 --quant int8 --device cuda --out /tmp/g8b-svd-i8
compress_once /tmp/g8b-svd --method svd --ratio 0.5
I8=/tmp/g8b-svd-i8
if [ "${INT8_DENSE:-0}" = 1 ]; then [ -f /tmp/g8b-i8/compactor.json ] || /usr/bin/time -f "dense int8, load -> quantize -> save: %e s" timeout 300 $B compress /tmp/g8b --method dense --quant int8 --device cuda --out /tmp/g8b-i8; I8="$I8 /tmp/g8b-i8"; fi
timeout 400 $B bench decode /tmp/g8b /tmp/g8b-svd $I8 --device cuda --dtype bf16 --prompt-tokens 32 --tokens 64 --repeats 3 --batch ${INT8_BATCH:-1,16} --paths ${INT8_PATHS:-ops,fused} 2>&1 | grep -vE "^loaded"
}
# svd_i8: the svd plan at 0.5 with int8 factors (for decode_env / decode_same)
svd_i8() {
step "Compactor svd plan at 0.5, int8 factors (for decode)"
compress_once /tmp/g8b-svd-i8 --method svd --ratio 0.5 --quant int8
}
# aware: the decode-aware plan at half the parameters (scripts/plans/granite-8b-decode-50.json)
aware() {
step "Compactor decode-aware plan (for decode)"
echo "decode-aware model: $(plan_model scripts/plans/granite-8b-decode-50.json)"
}
# int8_ref: the dense model with every weight in int8, against the dense one and the int8
# decode-aware plan (what int8 alone buys at batch 1 and 16)
int8_ref() {
step "the dense model in int8, for reference"
compress_once /tmp/g8b-i8 --method dense --quant int8
timeout 300 $B bench decode /tmp/g8b $(plan_model scripts/plans/granite-8b-decode-50-int8.json) /tmp/g8b-i8 --device cuda --dtype bf16 --prompt-tokens 32 --tokens 64 --repeats 3 --batch 1,16 --paths fused
}
# the decode step as one CUDA graph on granite-tiny: same tokens as candle ops, logits agree
graph_tiny() {
[ -d /tmp/gt-svd-cuda ] || timeout 100 $B compress $G --method svd --ratio 0.5 --device cuda --out /tmp/gt-svd-cuda > /dev/null
step "step graph vs candle ops on granite-tiny (dense, svd 0.5): greedy tokens, then bench decode (agreement + speed)"
for g in "0 0" "1 0" "1 1"; do set -- $g; for v in $G /tmp/gt-svd-cuda; do
  COMPACTOR_STEP_GRAPH=$1 COMPACTOR_STEP_FUSE=$2 timeout 60 $B generate $v --prompt "It was a dark and stormy night" --max-tokens 24 --device cuda --dtype bf16 2>/dev/null | tail -1 | sed "s|^|graph $1 fused $2 $(basename $v): |"
done; done
timeout 120 $B bench decode $G /tmp/gt-svd-cuda --device cuda --dtype bf16 --prompt-tokens 32 --tokens 64 --repeats 2 --batch 1,16
}
# what each kind of kernel costs in the step graph (left out in turn: the logits are then wrong)
decode_parts() {
step "decode step graph, batch 1: time with kernel kinds left out (timing only)"
for sk in none attend norm silu attend,norm,silu head products; do
  echo "left out: $sk"; COMPACTOR_STEP_SKIP=$sk timeout 120 $B bench decode /tmp/g8b /tmp/g8b-svd --device cuda --dtype bf16 --prompt-tokens 32 --tokens 64 --repeats 2 --batch ${PARTS_BATCH:-1} --paths graph 2>/dev/null | grep -E "^/tmp"
done
}
# the step graph with the CUDA-core kernel's column split aimed at fewer or more warps per launch
decode_split() {
DECODE_ENVS="$(printf 'COMPACTOR_SPLIT_WARPS=%s ' ${SPLITS:-2048 4096 8192 16384})" PATHS=${PATHS:-graph,fused} decode_env
}
# spectra on more CUDA streams (more concurrent eigensolves)
spectra_streams() {
for st in ${STREAMS:-8 16}; do
  step "spectra on $st streams"
  COMPACTOR_GPU_TIMING=1 COMPACTOR_GPU_STREAMS=$st /usr/bin/time -f "compactor spectra ($st streams): %e s wall" timeout 300 $B spectra /tmp/g8b --device cuda --json > /dev/null
done
}
# spectra with the two-stage eigensolver (band 8 and 16) against syevd, same matrices, same run
spectra2() {
for cfg in COMPACTOR_BAND=8 COMPACTOR_BAND=16 COMPACTOR_EIGH=syevd; do
  step "spectra of all linear matrices, $cfg"
  env $cfg COMPACTOR_GPU_TIMING=1 /usr/bin/time -f "compactor spectra ($cfg): %e s wall, %M KiB peak RSS" timeout 300 $B spectra /tmp/g8b --device cuda --json > /tmp/g8b-sp-${cfg#*=}.json
done
python3 - <<'PY'
import json
ref = {e["name"]: e["spectrum"]["singular_values"] for e in json.load(open("/tmp/g8b-sp-syevd.json"))}
for tag in ("8", "16"):
    worst, top = 0.0, 0.0
    for e in json.load(open(f"/tmp/g8b-sp-{tag}.json")):
        s, r = e["spectrum"]["singular_values"], ref[e["name"]]
        d = max(abs(a - b) for a, b in zip(s, r)) / r[0]
        h = len(r) // 2
        worst, top = max(worst, d), max(top, max(abs(a - b) for a, b in zip(s[:h], r[:h])) / r[0])
    print(f"two-stage band {tag} vs syevd over {len(ref)} matrices: max |dsigma|/sigma_max {worst:.2e} (top half {top:.2e})")
PY
}
# spectra_env: the spectra under each environment of ENVS (space-separated configs, each a
# comma-separated list of VAR=value; "-" for none; so a value itself takes no comma: write
# COMPACTOR_SPLIT_FIT's tiers as 70:4/30:8), e.g. ENVS="COMPACTOR_GPU_SCHED=spin,COMPACTOR_GPU_STREAMS=16 -";
# plan_env: the plan PLAN (default svd) at 0.5 under each of PLAN_ENVS (default ENVS)
vars() { [ "$1" = - ] || echo "${1//,/ }"; }
spectra_env() {
for cfg in ${ENVS:--}; do
  step "spectra with ${cfg}"
  env $(vars "$cfg") COMPACTOR_GPU_TIMING=1 /usr/bin/time -f "compactor spectra ($cfg): %e s wall, %U s user" timeout 300 $B spectra /tmp/g8b --device cuda --json > /dev/null
done
}
plan_env() {
i=0
for cfg in ${PLAN_ENVS:-${ENVS:--}}; do
  step "${PLAN:-svd} plan at 0.5 with ${cfg}"
  rm -rf /tmp/g8b-plan-env
  env $(vars "$cfg") COMPACTOR_GPU_TIMING=1 /usr/bin/time -f "compress ${PLAN:-svd} 0.5 ($cfg): %e s wall, %U s user" timeout 300 $B compress /tmp/g8b --method ${PLAN:-svd} --ratio 0.5 --device cuda --out /tmp/g8b-plan-env > /dev/null
  cp /tmp/g8b-plan-env/compactor.json "$OUT/plan-${PLAN:-svd}-$i.json" 2>/dev/null; i=$((i + 1))
done
# every config's per-layer relative errors against the first's (same ranks?)
python3 - "$OUT" "${PLAN:-svd}" <<'PY'
import json, sys, glob
runs = [json.load(open(f)) for f in sorted(glob.glob(f"{sys.argv[1]}/plan-{sys.argv[2]}-*.json"))]
if runs:
    base = {l["name"]: l for l in runs[0]["layers"]}
    for i, m in enumerate(runs):
        e = [l["rel_error"] for l in m["layers"]]
        d = [l["rel_error"] - base[l["name"]]["rel_error"] for l in m["layers"]]
        same = all(l["ranks"] == base[l["name"]]["ranks"] for l in m["layers"])
        print(f"{sys.argv[2]} config {i}: {len(e)} matrices, mean rel_error {sum(e)/len(e):.6f}, vs config 0: max {max(d):+.2e} min {min(d):+.2e}, same ranks {same}, compress {m['notes']['compress_seconds']:.1f} s")
PY
}
# decode_env: batch-1 decode (fused step graph) of the dense model and DECODE_MODELS (default: the
# svd plan) under each of DECODE_ENVS (as ENVS), interleaved, e.g. DECODE_ENVS="- COMPACTOR_GEMV_DEFINES=GEMV_MINB=6 -"
decode_env() {
for cfg in ${DECODE_ENVS:--}; do
  echo "decode with ${cfg}"
  env $(vars "$cfg") timeout 120 $B bench decode /tmp/g8b ${DECODE_MODELS:-/tmp/g8b-svd} --device cuda --dtype bf16 --prompt-tokens 32 --tokens 64 --repeats 3 --batch ${DECODE_BATCH:-1} --paths ${PATHS:-fused} 2>/dev/null | grep -E "^/tmp"
done
}
# decode_same: the fused step graph against candle ops (max |dlogit|/max|logit|, same argmax, 16
# steps, batch 1) for the dense model and DECODE_MODELS under each of SAME_ENVS (default DECODE_ENVS)
decode_same() {
step "decode: the step graph agrees with candle ops under each of SAME_ENVS (default DECODE_ENVS)"
for cfg in ${SAME_ENVS:-${DECODE_ENVS:--}}; do
  echo "agreement with ${cfg}"
  env $(vars "$cfg") timeout 200 $B bench decode /tmp/g8b ${DECODE_MODELS:-/tmp/g8b-svd} --device cuda --dtype bf16 --prompt-tokens 32 --tokens 4 --repeats 1 --batch 1 --paths ops,fused > /tmp/same.txt 2>&1
  echo "rc $?"; grep -E "vs candle ops|does not apply|rror" /tmp/same.txt
done
}
# the first GPU process on a fresh machine is slower (driver JIT cache): one small run first
warm() {
step "warm-up: spectra of granite-tiny on the GPU"
/usr/bin/time -f "warm-up: %e s" $B spectra $G --device cuda --json > /dev/null
}
# the eigensolver behind the spectra: syevd per matrix against the batched syevBatched
eigen() {
step "eigenvalues of Gram matrices: syevd one at a time vs syevBatched vs two-stage"
timeout 120 $B bench eigen --n 4096 --batch 2,4,8,16
timeout 60 $B bench eigen --n 1024 --batch 8,32
}
# Nsight Compute on one decode step's kernels (each replayed alone: no overlap between them)
ncu_step() {
step "ncu: one decode step's kernels at batch 1, isolated durations and DRAM bandwidth"
NCU=/usr/local/cuda-13.0/bin/ncu
# NCU_MODELS: model:kernels-a-step pairs; NCU_LIST: also list that many launches one by one
for m in ${NCU_MODELS:-g8b:203 g8b-svd:363}; do n=${m#*:}; m=${m%%:*}; for p in ${PROFILE_PATHS:-fused}; do
  echo "--- $m, $p"
  timeout 200 $NCU --graph-profiling node --clock-control none --kernel-name regex:"gemv|step_" --launch-skip $((n * 3)) --launch-count $n \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size \
    --csv --page raw -o /tmp/ncu-$m-$p -f $B bench decode /tmp/$m --device cuda --dtype bf16 --prompt-tokens 32 --tokens 8 --repeats 1 --batch 1 --paths $p > /tmp/ncu-$m-$p.log 2>&1
  echo "ncu rc $?"; grep -E "==ERROR|==WARNING" /tmp/ncu-$m-$p.log | head -5
  $NCU --import /tmp/ncu-$m-$p.ncu-rep --csv --page raw > /tmp/ncu-$m-$p.csv 2>/dev/null && python3 scripts/ncu-step.py /tmp/ncu-$m-$p.csv ${NCU_LIST:-}
done; done
}
# decode of two plans with half the linear parameters: svd everywhere, and attention kept dense
# with the MLPs at 36.67 % (scripts/plans/granite-8b-mlp-half.json: fewer, larger launches)
decode_mlp() {
CURVE_RATIOS=0.5 CURVE_MLP="" CURVE_PLANS=scripts/plans/granite-8b-mlp-half.json PATHS=${PATHS:-graph,fused} decode_curve
}
# batch-1 (and 16) decode against the share of linear parameters kept: svd everywhere at each of
# CURVE_RATIOS, and attention kept dense with the MLPs compressed to a total of each of
# CURVE_MLP (the MLP ratio is solved from the Granite-8B shapes: attention 41.94 M, MLPs 157.29 M
# parameters per layer), and each plan file of CURVE_PLANS; where does the low-rank model reach
# 1.7x the dense tokens/s?
decode_curve() {
step "decode vs linear parameters kept: svd everywhere at ${CURVE_RATIOS=0.5 0.45 0.4 0.35}, attention dense + MLP svd at totals ${CURVE_MLP=0.5 0.4}, plans ${CURVE_PLANS:=}"
local dirs=""
for r in $CURVE_RATIOS; do
  compress_once /tmp/g8b-svd-$r --method svd --ratio $r
  dirs="$dirs /tmp/g8b-svd-$r"
done
for t in $CURVE_MLP; do
  m=$(python3 -c "print(round(($t * 199229440 - 41943040) / 157286400, 4))")
  echo "{\"version\": 1, \"default\": {\"method\": \"svd\", \"ratio\": $m}, \"rules\": [{\"match\": \"model.layers.*.self_attn.*\", \"method\": \"dense\"}], \"allocation\": \"uniform\"}" > /tmp/plan-mlp-$t.json
  compress_once /tmp/g8b-mlp-$t --plan /tmp/plan-mlp-$t.json
  dirs="$dirs /tmp/g8b-mlp-$t"
done
for p in $CURVE_PLANS; do
  dirs="$dirs $(plan_model $p)"
done
for d in $dirs; do python3 -c "import json,sys; t=json.load(open(sys.argv[1]))['totals']; print(sys.argv[1], 'linear_param_ratio', round(t['linear_param_ratio'], 4), 'bytes', t['bytes'])" $d/compactor.json; done
timeout 400 $B bench decode /tmp/g8b $dirs --device cuda --dtype bf16 --prompt-tokens 32 --tokens 64 --repeats 3 --batch ${CURVE_BATCH:-1,16} --paths ${PATHS:-fused}
}
# the svd plan with the driver's JIT cache emptied first (candle's PTX compiled in the plan's own
# process), with the background prewarm of candle's modules and without it, then cached
plan_cold() {
CACHE=${CUDA_CACHE_PATH:-$HOME/.nv/ComputeCache}
for cfg in ${COLD_CFGS:-COMPACTOR_PREWARM=1 COMPACTOR_PREWARM=0 cached}; do
  [ $cfg = cached ] || rm -rf "$CACHE"
  rm -rf /tmp/g8b-cold
  step "svd plan at 0.5, $cfg (JIT cache $(ls "$CACHE" 2>/dev/null | wc -l) entries before)"
  env $([ $cfg = cached ] || echo $cfg) /usr/bin/time -f "compress svd 0.5 ($cfg): %e s wall, %U s user" timeout 300 $B compress /tmp/g8b --method svd --ratio 0.5 --device cuda --out /tmp/g8b-cold > /dev/null
done
}
# whole-model decode with and without programmatic dependent launches
decode_pdl() {
for pdl in 1 0; do COMPACTOR_PDL=$pdl decode_full; done
}
# D: everything of issue 8 but the PyTorch baseline (two calls' worth: set STEPS to split it)
if [ "$PART" = D ]; then
for s in ${STEPS:-agree tokens linear g8b plans decode_full}; do $s; done
fi
if [ "$PART" = E ]; then
L=${L:-40}
step "issue 8: PyTorch on the same matrices, and Compactor's spectra in the same call"
[ -f /tmp/g8b/config.json ] || timeout 400 $B synth --preset granite-8b --layers $L --device cuda --tokenizer $G/tokenizer.json --out /tmp/g8b; du -sh /tmp/g8b
cat /tmp/g8b/*.safetensors > /dev/null
/usr/bin/time -f "compactor spectra: %e s wall" timeout 200 $B spectra /tmp/g8b --device cuda --json > /dev/null
timeout 300 python3 scripts/bench_torch_spectra.py /tmp/g8b --methods gram,lowrank
# torch.linalg.svd on a tenth of the matrices (every layer kind, layers 0-3): its full run does not fit the call
timeout 200 python3 scripts/bench_torch_spectra.py /tmp/g8b --methods svd --limit ${SVD_LIMIT:-28}
fi
# F: issue 8's benchmark in one call: the synthetic Granite-8B, Compactor's spectra and both plans
# (load -> compress -> save), PyTorch on the same matrices (torch.linalg.svd on the first SVD_LIMIT
# matrices, extrapolated by shape), the ratios, then dense vs compressed decode (the svd plan, the
# decode-aware plan scripts/plans/granite-8b-decode-50.json, the same plan in int8
# (granite-8b-decode-50-int8.json) and the tt plan).
# Its models take ~46 GB of /tmp (a fresh machine has ~66 GB free): run it on a fresh machine or
# remove earlier calls' models first.
if [ "$PART" = F ]; then
g8b; warm
PLANS_TIMING=0 plans
step "PyTorch on the same matrices"
timeout 240 python3 scripts/bench_torch_spectra.py /tmp/g8b --methods gram,lowrank --json /tmp/torch.json
timeout 150 python3 scripts/bench_torch_spectra.py /tmp/g8b --methods svd --limit ${SVD_LIMIT:-28} --json /tmp/torch-svd.json
python3 - <<'PY' | tee "$OUT/summary.txt"
import json
t = {k: float(open(f"/tmp/t-{k}").read().split()[0]) for k in ("spectra", "svd", "tt")}
a, b = json.load(open("/tmp/torch.json")), json.load(open("/tmp/torch-svd.json"))
full = sum(b["per_shape_s"]["svd"][s] * c for s, c in b["model_counts"].items())
rows = [("Gram + torch.linalg.eigvalsh (values)", a["totals_s"]["gram"], "spectra"),
        ("torch.svd_lowrank(q=1024)", a["totals_s"]["lowrank"], "svd"),
        (f"torch.linalg.svd (from {b['matrices']} matrices, by shape)", full, "svd")]
n = sum(a["model_counts"].values())
print(f"{n} matrices. Compactor (wall, whole process): spectra {t['spectra']:.1f} s, svd plan {t['svd']:.1f} s, tt plan {t['tt']:.1f} s (goals 10 / 20 s)")
for label, secs, ours in rows:
    print(f"{label:48} {secs:7.1f} s (compute only, weights already on the GPU): Compactor's {ours} {secs / t[ours]:.2f}x faster")
PY
step "Compactor decode-aware plan, 50.2 % of the linear parameters kept (scripts/plans/granite-8b-decode-50.json)"
DEC=$(plan_model scripts/plans/granite-8b-decode-50.json)
step "the same plan with every weight in int8 (scripts/plans/granite-8b-decode-50-int8.json)"
DEC8=$(plan_model scripts/plans/granite-8b-decode-50-int8.json)
# the tt plan's model decodes too (MPO layers: fused at batch 1, two cuBLAS GEMMs above); int8_ref
# (a D step) adds the dense model in int8, which F leaves out to fit one call
DECODE_EXTRA="$DEC $DEC8 /tmp/g8b-tt" PATHS=${PATHS:-fused} decode_full
fi
echo; echo "=== done $(date +%T)"
