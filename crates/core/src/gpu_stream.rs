//! The streamed decode step (feature `cuda`, sm_90+, batch 1): every run of products between two
//! attentions as one persistent launch whose weights never wait for its activations.
//!
//! The fused step graph ([`crate::gpu_step`]) launches each product on its own; every launch
//! boundary costs a ramp-up and a tail (~2 µs), and a low-rank block has 9 launches against a
//! dense block's 5, so the low-rank model streams its (half as many) bytes at a lower rate. Here
//! one launch of one block per SM runs a list of *stages* (products that read the same finished
//! inputs), e.g. for a low-rank block after its attention: B_o; A_o (+ residual); B_gate, B_up
//! (norm in); A_gate·A_up pairs (silu·up out); B_down; A_down (+ residual); the next block's
//! B_q, B_k, B_v (norm in); A_q, A_k, A_v. Each block:
//!
//! - a **producer** thread streams the block's share of every stage's weight rows (a contiguous
//!   byte range per product: the rows are split over the SMs by bytes) into a ring of shared
//!   memory slots with bulk copies (`cp.async.bulk`, completion on an mbarrier). Weights do not
//!   depend on activations, so it runs ahead across stage boundaries as far as the ring allows
//!   (5 × 32 KiB per SM, ~21 MB over an H200's 132 SMs);
//! - 8 **consumer** warps wait until every block has finished the stage before (a counter per
//!   stage in global memory), copy the stage's inputs into shared memory (f32, normalized with
//!   the stage's norm weights where it has them, Σx² summed on the way), then take the slots as
//!   they fill: dot products of the slot's rows with the input, written out as the fused kinds
//!   write them (store, residual add, silu(g)·u pairs; see `store` in `GEMV_SRC`).
//!
//! A stage boundary thus stalls the consumers for a barrier, while the producer keeps the
//! memory busy with the next stage's weights. The last block to finish resets the counters, so
//! the launch replays inside the step's CUDA graph.

use crate::gpu::{ce, kernel, launch_raw, Out};
use candle_core::{DType, Tensor};

/// The kernel (compiled with the GEMV kernels, whose helpers it uses).
pub(crate) const STREAM_SRC: &str = r#"
#ifndef SS_SLOT
#define SS_SLOT 28672
#endif
// one consumer warp per slot
#ifndef SS_SLOTS
#define SS_SLOTS 6
#endif
#define SS_XMAX 13312
#define SS_RMAX 32
#define SS_CONS (32 * SS_SLOTS)
#define SS_MAXST 10
#define SS_MAXSEG 24
// one product of a stage: rows of w (bf16, cols each) times the stage input at xoff (f32 in
// shared memory); with w2, output j pairs row j of w (input at xoff) with row j of w2 (x2off)
struct SSeg { const unsigned short* w; const unsigned short* w2; unsigned short* y; int rows; int cols; int out; int xoff; int x2off; float s; };
struct SIn { const unsigned short* p; int len; int off; };
// nw: norm weights of input 0 (the only input then), or null; bytes: the stage's weight bytes
struct SStage { SIn in[4]; const unsigned short* nw; float eps; int nin; int seg0; int nseg; unsigned long long bytes; };
struct SPlan { int nstage; int pad; SStage st[SS_MAXST]; SSeg seg[SS_MAXSEG]; };
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned ss_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(unsigned long long* b, unsigned n) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(ss_addr(b)), "r"(n) : "memory");
}
__device__ __forceinline__ void mbar_expect(unsigned long long* b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(ss_addr(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(ss_addr(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* b, unsigned parity) {
    unsigned ok = 0;
    while (!ok)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}" : "=r"(ok) : "r"(ss_addr(b)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned bytes, unsigned long long* b, unsigned long long policy) {
#ifdef SS_NOHINT
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(ss_addr(dst)), "l"(src), "r"(bytes), "r"(ss_addr(b)) : "memory");
    return;
#endif
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                 ::"r"(ss_addr(dst)), "l"(src), "r"(bytes), "r"(ss_addr(b)), "l"(policy) : "memory");
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ unsigned gtime() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return (unsigned)t;
}
__device__ __forceinline__ void cons_bar() { asm volatile("bar.sync 1, %0;" ::"n"(SS_CONS) : "memory"); }
// The rows [r0, r1) of segment `g` that SM `sm` of `nsm` owns: those whose first byte lies in
// its share of the stage's bytes. `base`: the stage's bytes before `g` (advanced past it).
__device__ __forceinline__ void ss_rows(const SSeg& g, unsigned long long total, unsigned long long& base, int sm, int nsm, int& r0, int& r1) {
    const unsigned long long rb = (unsigned long long)g.cols * (g.w2 ? 4 : 2);
    const unsigned long long lo = total * sm / nsm, hi = total * (sm + 1) / nsm;
    const unsigned long long a = lo <= base ? 0 : (lo - base + rb - 1) / rb, b = hi <= base ? 0 : (hi - base + rb - 1) / rb;
    r0 = (int)min(a, (unsigned long long)g.rows);
    r1 = (int)min(b, (unsigned long long)g.rows);
    base += (unsigned long long)g.rows * rb;
}
__device__ __forceinline__ int ss_slot_rows(const SSeg& g) { return min(SS_RMAX, SS_SLOT / (g.cols * (g.w2 ? 4 : 2))); }
// Σ over the consumer threads (every one gets it); `red` holds SS_SLOTS floats
__device__ float cons_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    cons_bar();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    cons_bar();
    v = 0.f;
#pragma unroll
    for (int w = 0; w < SS_SLOTS; w++) v += red[w];
    return v;
}
// Σ_k w[k] x[k] over a row by one warp (x split in halves: lo[4v..4v+3], hi[4v..]); every lane
// gets the sum
__device__ __forceinline__ float ss_dot(const uint4* w, const float* lo, const float* hi, int c8, int lane) {
    float a = 0.f, b = 0.f;
#pragma unroll 4
    for (int v = lane; v < c8; v += 32) {
        float f[8];
        unpack8(w[v], f);
        const float4 l = *(const float4*)(lo + 4 * v), h = *(const float4*)(hi + 4 * v);
        a = fmaf(f[0], l.x, a); a = fmaf(f[1], l.y, a); a = fmaf(f[2], l.z, a); a = fmaf(f[3], l.w, a);
        b = fmaf(f[4], h.x, b); b = fmaf(f[5], h.y, b); b = fmaf(f[6], h.z, b); b = fmaf(f[7], h.w, b);
    }
    a += b;
    for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
    return a;
}
#endif
// Grid: one block per SM (nsm), 32·(SS_SLOTS + 1) threads: consumer warp w takes the slots
// it ≡ w (mod SS_SLOTS), i.e. ring slot w, alone (no block barrier per slot); the last warp is
// the producer. Dynamic shared memory: SS_SLOTS·SS_SLOT + 4·(SS_XMAX + 8) + 16·SS_SLOTS bytes.
// cnt: nstage + 1 counters, zero at launch and left zero. trace (null: off): per SM 1 + 2·SS_MAXST
// globaltimer stamps (low 32 bits, ns): entry, then each stage's start (inputs ready) and end.
// Timing-only switches (wrong outputs): SS_NOBARRIER (no stage waits), SS_NOCOMPUTE (no dot
// products); SS_NOHINT: bulk copies without the L2 evict-first hint.
extern "C" __global__ void __launch_bounds__(32 * (SS_SLOTS + 1), 1) step_stream(const SPlan* plan, unsigned* cnt, int nsm, unsigned* trace) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* ring = smem;
    float* xs = (float*)(smem + SS_SLOTS * SS_SLOT);
    float* sred = xs + SS_XMAX;
    unsigned long long* full = (unsigned long long*)(sred + 8);
    unsigned long long* empty = full + SS_SLOTS;
    const SPlan& P = *plan;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sm = blockIdx.x;
    unsigned* tr = trace ? trace + sm * (1 + 2 * SS_MAXST) : 0;
    if (tr && threadIdx.x == 0) tr[0] = gtime();
    pdl_launch_next();
    if (threadIdx.x == 0) {
        for (int s = 0; s < SS_SLOTS; s++) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 1);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (warp == SS_SLOTS) {
        // the producer: weights only, so it starts before the previous kernel has finished
        if (lane != 0) return;
        unsigned long long policy;
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
        unsigned it = 0;
        for (int k = 0; k < P.nstage; k++) {
            const SStage& st = P.st[k];
            unsigned long long base = 0;
            for (int j = st.seg0; j < st.seg0 + st.nseg; j++) {
                const SSeg& g = P.seg[j];
                int r0, r1;
                ss_rows(g, st.bytes, base, sm, nsm, r0, r1);
                const int nr = ss_slot_rows(g);
                for (int r = r0; r < r1; r += nr, it++) {
                    const unsigned n = min(nr, r1 - r), bytes = n * g.cols * 2;
                    const unsigned s = it % SS_SLOTS;
                    if (it >= SS_SLOTS) mbar_wait(&empty[s], ((it / SS_SLOTS) - 1) & 1);
                    unsigned char* dst = ring + s * SS_SLOT;
                    mbar_expect(&full[s], g.w2 ? 2 * bytes : bytes);
                    bulk_load(dst, g.w + (size_t)r * g.cols, bytes, &full[s], policy);
                    if (g.w2) bulk_load(dst + bytes, g.w2 + (size_t)r * g.cols, bytes, &full[s], policy);
                }
            }
        }
        return;
    }
    const int tid = threadIdx.x;
    unsigned it = 0;
    for (int k = 0; k < P.nstage; k++) {
        const SStage& st = P.st[k];
        if (k == 0) {
            pdl_wait();
        } else if (tid == 0) {
#ifndef SS_NOBARRIER
            while (ld_acquire(&cnt[k - 1]) < (unsigned)nsm) __nanosleep(20);
#endif
        }
        cons_bar();
        if (tr && tid == 0) tr[1 + 2 * k] = gtime();
        // the stage's inputs (written by other blocks or the kernel before): through L2 only
        float ss = 0.f;
        for (int i = 0; i < st.nin; i++) {
            const SIn in = st.in[i];
            float* lo = xs + in.off;
            float* hi = lo + (in.len >> 1);
            const bool norm = i == 0 && st.nw;
            for (int v = tid; v < (in.len >> 3); v += SS_CONS) {
                float f[8];
                unpack8(__ldcg((const uint4*)in.p + v), f);
                if (norm) {
                    float nf[8];
                    unpack8(__ldg((const uint4*)st.nw + v), nf);
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        ss = fmaf(f[e], f[e], ss);
                        f[e] *= nf[e];
                    }
                }
                *(float4*)(lo + 4 * v) = make_float4(f[0], f[1], f[2], f[3]);
                *(float4*)(hi + 4 * v) = make_float4(f[4], f[5], f[6], f[7]);
            }
        }
        const float scale = st.nw ? rsqrtf(cons_sum(ss, sred) / st.in[0].len + st.eps) : 1.f;
        cons_bar();
        unsigned long long base = 0;
        for (int j = st.seg0; j < st.seg0 + st.nseg; j++) {
            const SSeg& g = P.seg[j];
            int r0, r1;
            ss_rows(g, st.bytes, base, sm, nsm, r0, r1);
            const int nr = ss_slot_rows(g), c8 = g.cols >> 3;
            const float* xl = xs + g.xoff;
            const float* xh = xl + (g.cols >> 1);
            const float* x2l = xs + g.x2off;
            const float* x2h = x2l + (g.cols >> 1);
            for (int r = r0; r < r1; r += nr, it++) {
                const unsigned s = it % SS_SLOTS;
                if (s != (unsigned)warp) continue;  // another warp's slot
                const int n = min(nr, r1 - r);
                mbar_wait(&full[s], (it / SS_SLOTS) & 1);
                const uint4* sl = (const uint4*)(ring + s * SS_SLOT);
                // lane i keeps row i's dot products, then writes output r + i
                float m0 = 0.f, m1 = 0.f;
#ifndef SS_NOCOMPUTE
                for (int row = 0; row < n; row++) {
                    const float a0 = ss_dot(sl + (size_t)row * c8, xl, xh, c8, lane);
                    const float a1 = g.w2 ? ss_dot(sl + (size_t)(n + row) * c8, x2l, x2h, c8, lane) : 0.f;
                    if (lane == row) {
                        m0 = a0;
                        m1 = a1;
                    }
                }
#endif
                __syncwarp();
                if (lane == 0) mbar_arrive(&empty[s]);
                if (lane < n) {
                    const float a0 = m0 * scale, a1 = m1 * scale;
                    unsigned short* y = g.y + r + lane;
                    if (g.out == 0) {
                        *y = to_bf16(a0);
                    } else if (g.out == 1) {
                        float d = rbf(a0);
                        if (g.s != 1.f) d = rbf(d * g.s);
                        *y = to_bf16(bf(__ldcg(y)) + d);
                    } else {
                        const float gg = rbf(a0), u = rbf(a1);
                        *y = to_bf16(rbf(gg / (1.f + expf(-gg))) * u);
                    }
                }
            }
        }
        cons_bar();
        if (tr && tid == 0) tr[2 + 2 * k] = gtime();
        if (tid == 0) {
            __threadfence();
            atomicAdd(&cnt[k], 1u);
        }
    }
    if (tid == 0 && atomicAdd(&cnt[P.nstage], 1u) == (unsigned)nsm - 1) {
        // every block is past every wait: reset for the next replay
        for (int k = 0; k <= P.nstage; k++) cnt[k] = 0;
        __threadfence();
    }
#endif
}
"#;

/// Staged input floats, stages and products per launch (must match STREAM_SRC).
const XMAX: usize = 13312;
const MAXST: usize = 10;
const MAXSEG: usize = 24;

/// The ring: bytes per slot and slots, one consumer warp each (`SS_SLOT`, `SS_SLOTS` in
/// `COMPACTOR_GEMV_DEFINES`, as the kernel is compiled; 28 KiB × 6 unless set).
fn ring() -> (usize, usize) {
    let def = |name: &str, or: usize| crate::gpu::gemv_define(name).and_then(|v| v.parse().ok()).unwrap_or(or);
    (def("SS_SLOT", 28672), def("SS_SLOTS", 6))
}

/// Dynamic shared memory of a launch.
fn smem() -> usize {
    let (slot, slots) = ring();
    slots * slot + 4 * (XMAX + 8) + 16 * slots
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SSeg {
    w: u64,
    w2: u64,
    y: u64,
    rows: i32,
    cols: i32,
    out: i32,
    xoff: i32,
    x2off: i32,
    s: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SIn {
    p: u64,
    len: i32,
    off: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SStage {
    inputs: [SIn; 4],
    nw: u64,
    eps: f32,
    nin: i32,
    seg0: i32,
    nseg: i32,
    bytes: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SPlan {
    nstage: i32,
    pad: i32,
    st: [SStage; MAXST],
    seg: [SSeg; MAXSEG],
}

const _: () = assert!(std::mem::size_of::<SSeg>() == 48 && std::mem::size_of::<SStage>() == 96 && std::mem::size_of::<SPlan>() == 8 + 96 * MAXST + 48 * MAXSEG);

/// One product of a stage (batch 1): `rows` outputs of `cols` inputs; with `pair` = (W₂, x₂),
/// output j is silu(row j of W · x) · (row j of W₂ · x₂) (x₂ = x in a normalized stage).
pub(crate) struct Prod {
    pub w: u64,
    pub x: u64,
    pub y: u64,
    pub rows: usize,
    pub cols: usize,
    pub pair: Option<(u64, u64)>,
    pub out: Out,
}

/// Products that read finished inputs; `norm` = (weights, eps): their one input is normalized.
pub(crate) struct Stage {
    pub prods: Vec<Prod>,
    pub norm: Option<(u64, f32)>,
}

/// The kernel-side plan of one launch, or why these stages do not fit the kernel.
fn encode(stages: &[Stage]) -> Result<SPlan, String> {
    let mut plan = SPlan { nstage: stages.len() as i32, pad: 0, st: [SStage::default(); MAXST], seg: [SSeg::default(); MAXSEG] };
    if stages.is_empty() || stages.len() > MAXST {
        return Err(format!("{} stages (1 to {MAXST})", stages.len()));
    }
    let mut nseg = 0usize;
    for (st, stage) in plan.st.iter_mut().zip(stages) {
        let mut ins: Vec<(u64, usize, usize)> = Vec::new();
        let mut input = |p: u64, len: usize| -> Result<usize, String> {
            if let Some(&(_, l, off)) = ins.iter().find(|i| i.0 == p) {
                return if l == len { Ok(off) } else { Err("one input read with two lengths".into()) };
            }
            let off = ins.last().map_or(0, |i| i.1 + i.2);
            if ins.len() == 4 || off + len > XMAX {
                return Err(format!("a stage's inputs exceed 4 or {XMAX} values"));
            }
            ins.push((p, len, off));
            Ok(off)
        };
        st.seg0 = nseg as i32;
        for p in &stage.prods {
            if nseg == MAXSEG {
                return Err(format!("more than {MAXSEG} products"));
            }
            let unit = p.cols * if p.pair.is_some() { 4 } else { 2 };
            if p.cols % 8 != 0 || p.cols == 0 || unit > ring().0 || p.rows == 0 {
                return Err(format!("a product of {} × {} does not fit a slot", p.rows, p.cols));
            }
            let xoff = input(p.x, p.cols)?;
            let (w2, x2off) = match p.pair {
                Some((w2, x2)) => (w2, input(if stage.norm.is_some() { p.x } else { x2 }, p.cols)?),
                None => (0, xoff),
            };
            let (out, s) = match p.out {
                Out::Store => (0, 1.0),
                Out::Residual(s) => (1, s),
                Out::Glu => (2, 1.0),
            };
            if (out == 2) != p.pair.is_some() {
                return Err("pairs go with silu·up outputs".into());
            }
            plan.seg[nseg] = SSeg { w: p.w, w2, y: p.y, rows: p.rows as i32, cols: p.cols as i32, out, xoff: xoff as i32, x2off: x2off as i32, s };
            st.bytes += (p.rows * unit) as u64;
            nseg += 1;
        }
        st.nseg = nseg as i32 - st.seg0;
        if let Some((nw, eps)) = stage.norm {
            if ins.len() != 1 {
                return Err("a normalized stage reads one input".into());
            }
            (st.nw, st.eps) = (nw, eps);
        }
        st.nin = ins.len() as i32;
        for (s, &(p, len, off)) in st.inputs.iter_mut().zip(&ins) {
            *s = SIn { p, len: len as i32, off: off as i32 };
        }
    }
    Ok(plan)
}

/// The launches of one step: their plans in device memory and their counters.
pub(crate) struct Streamer {
    dev: candle_core::cuda::CudaDevice,
    /// u32: the plans, one after the other
    plans: Tensor,
    /// u32: MAXST + 1 counters per launch
    cnt: Tensor,
    launches: usize,
    nsm: i32,
    /// u32: per launch and SM the kernel's globaltimer stamps (`COMPACTOR_STREAM_TRACE=1`)
    trace: Option<Tensor>,
    /// stages per launch
    stages: Vec<usize>,
}

impl Streamer {
    /// The launches `runs` (each a list of stages), or `Ok(None)` with the reason logged where the
    /// kernel does not apply (before sm_90, or stages that do not fit it).
    pub(crate) fn new(dev: &candle_core::cuda::CudaDevice, runs: &[Vec<Stage>]) -> crate::Result<Option<Streamer>> {
        if !crate::gpu::sm90(dev) {
            return Ok(None);
        }
        let ctx = dev.cuda_stream().context().clone();
        let mut words: Vec<u32> = Vec::new();
        for run in runs {
            let plan = match encode(run) {
                Ok(p) => p,
                Err(why) => {
                    eprintln!("streamed step: not used ({why})");
                    return Ok(None);
                }
            };
            // SAFETY: SPlan is repr(C), all u32/i32/f32/u64 fields, no implicit padding (the
            // size assertion above), so its bytes are 4-byte words.
            let w = unsafe { std::slice::from_raw_parts(&plan as *const SPlan as *const u32, std::mem::size_of::<SPlan>() / 4) };
            words.extend_from_slice(w);
        }
        let nsm = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(ce("device attribute"))?;
        let func = kernel(dev, "step_stream")?;
        func.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem() as i32).map_err(ce("shared memory of step_stream"))?;
        let device = candle_core::Device::Cuda(dev.clone());
        let per = nsm as usize * (1 + 2 * MAXST);
        let trace = if std::env::var("COMPACTOR_STREAM_TRACE").is_ok_and(|v| v == "1") { Some(Tensor::zeros(runs.len() * per, DType::U32, &device)?) } else { None };
        Ok(Some(Streamer {
            dev: dev.clone(),
            plans: Tensor::from_vec(words, std::mem::size_of::<SPlan>() / 4 * runs.len(), &device)?,
            cnt: Tensor::zeros(runs.len() * (MAXST + 1), DType::U32, &device)?,
            launches: runs.len(),
            nsm,
            trace,
            stages: runs.iter().map(|r| r.len()).collect(),
        }))
    }

    /// Issues launch `i` on the stream (a programmatic dependent launch).
    pub(crate) fn launch(&self, i: usize) -> crate::Result<()> {
        if i >= self.launches {
            return Err(crate::Error::Invalid(format!("streamed step: launch {i} of {}", self.launches)));
        }
        let plan = crate::gpu::tensor_addr(&self.plans)? + (i * std::mem::size_of::<SPlan>()) as u64;
        let cnt = crate::gpu::tensor_addr(&self.cnt)? + (i * (MAXST + 1) * 4) as u64;
        let nsm = self.nsm;
        let trace = match &self.trace {
            Some(t) => crate::gpu::tensor_addr(t)? + (i * nsm as usize * (1 + 2 * MAXST) * 4) as u64,
            None => 0,
        };
        let func = kernel(&self.dev, "step_stream")?;
        let mut params = [
            &plan as *const u64 as *mut std::ffi::c_void,
            &cnt as *const u64 as *mut std::ffi::c_void,
            &nsm as *const i32 as *mut std::ffi::c_void,
            &trace as *const u64 as *mut std::ffi::c_void,
        ];
        // SAFETY: the arguments are step_stream's (plan, counters, SM count); the plan's
        // pointers are the decoder's weights and buffers, which it keeps alive.
        unsafe { launch_raw(&self.dev, &func, (nsm as u32, 1), 32 * (ring().1 as u32 + 1), smem() as u32, &mut params, true) }?;
        Ok(())
    }

    /// With `COMPACTOR_STREAM_TRACE=1`: where the last step's time went, from the kernels'
    /// stamps (a diagnostic for benchmarks): per launch the gap before its first block started
    /// and its span; per stage (means over the launches) the wait for inputs after the previous
    /// stage's last block ended, the spread of its blocks' ends, and its span.
    pub(crate) fn trace_summary(&self) -> crate::Result<Option<String>> {
        let Some(t) = &self.trace else { return Ok(None) };
        let v = t.to_vec1::<u32>()?;
        let (nsm, per) = (self.nsm as usize, self.nsm as usize * (1 + 2 * MAXST));
        let d = |a: u32, b: u32| b.wrapping_sub(a) as i32 as f64 / 1e3;
        let mut out = String::new();
        let (mut gaps, mut spans) = (0.0, 0.0);
        let mut prev_end: Option<u32> = None;
        let mut per_stage = [[0f64; 4]; MAXST];
        for (l, &ns) in self.stages.iter().enumerate() {
            let at = |sm: usize, e: usize| v[l * per + sm * (1 + 2 * MAXST) + e];
            let first = |e: usize| (0..nsm).map(|sm| at(sm, e)).min_by(|&a, &b| (a.wrapping_sub(b) as i32).cmp(&0)).unwrap_or(0);
            let last = |e: usize| (0..nsm).map(|sm| at(sm, e)).max_by(|&a, &b| (a.wrapping_sub(b) as i32).cmp(&0)).unwrap_or(0);
            let entry = first(0);
            if let Some(p) = prev_end {
                gaps += d(p, entry);
            }
            let mut before = entry;
            for k in 0..ns {
                let (s0, e0, e1) = (first(1 + 2 * k), first(2 + 2 * k), last(2 + 2 * k));
                let ps = &mut per_stage[k];
                ps[0] += d(before, s0);
                ps[1] += d(e0, e1);
                ps[2] += d(before, e1);
                ps[3] += 1.0;
                before = e1;
            }
            spans += d(entry, before);
            prev_end = Some(before);
        }
        let n = self.stages.len() as f64;
        out += &format!("streamed step trace: {} launches, summed gaps between launches {:.1} us, summed spans {:.1} us\n", self.stages.len(), gaps, spans);
        for (k, ps) in per_stage.iter().enumerate().filter(|(_, p)| p[3] > 0.0) {
            out += &format!("  stage {k}: {:.0} launches, mean wait for inputs {:.2} us, spread of ends {:.2} us, span {:.2} us\n", ps[3], ps[0] / ps[3], ps[1] / ps[3], ps[2] / ps[3]);
        }
        let _ = n;
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prod(x: u64, rows: usize, cols: usize) -> Prod {
        Prod { w: 0x1000, x, y: 0x2000, rows, cols, pair: None, out: Out::Store }
    }

    #[test]
    fn plans_place_inputs_and_reject_what_does_not_fit() {
        // q/k/v A factors: three inputs, one after the other
        let st = Stage { prods: vec![prod(1, 4096, 1024), prod(2, 1024, 408), prod(3, 1024, 408)], norm: None };
        let p = encode(&[st]).unwrap();
        assert_eq!((p.nstage, p.st[0].nin, p.st[0].nseg), (1, 3, 3));
        assert_eq!([p.seg[0].xoff, p.seg[1].xoff, p.seg[2].xoff], [0, 1024, 1432]);
        assert_eq!(p.st[0].bytes, 2 * (4096 * 1024 + 2 * 1024 * 408));
        // a normalized pair reads x twice
        let pair = Prod { pair: Some((0x3000, 9)), out: Out::Glu, ..prod(1, 12800, 4096) };
        let p = encode(&[Stage { prods: vec![pair], norm: Some((0x4000, 1e-5)) }]).unwrap();
        assert_eq!((p.st[0].nin, p.seg[0].x2off, p.st[0].bytes), (1, 0, 12800 * 4096 * 4));
        // rows longer than a slot, inputs beyond the staging space, pairs without silu·up
        assert!(encode(&[Stage { prods: vec![prod(1, 8, 16392)], norm: None }]).is_err());
        assert!(encode(&[Stage { prods: vec![prod(1, 8, 8192), prod(2, 8, 8192)], norm: None }]).is_err());
        assert!(encode(&[Stage { prods: vec![Prod { pair: Some((1, 2)), ..prod(1, 8, 64) }], norm: None }]).is_err());
        assert!(encode(&[]).is_err());
    }
}
