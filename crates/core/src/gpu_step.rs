//! The whole decode step of a Llama-family model as one CUDA graph (feature `cuda`, bf16).
//!
//! candle runs a decode step as ~30 ops per block besides the products (norms, RoPE, attention,
//! KV-cache concatenation), each a host launch with its own allocation; at batch 1 on an H100
//! those cost as much as the dense model's weights take to stream, so halving the weights cannot
//! halve the step. A [`Decoder`] instead owns static buffers — the residual stream, every
//! intermediate, a KV cache of fixed length per layer — and issues one step as
//!
//! ```text
//! embed ─► per block: add+norm ─► q/k/v (grouped) ─► attention (RoPE, cache write) ─► o
//!                     add+norm ─► gate/up (grouped) ─► silu·up ─► down
//!        ─► add+norm ─► lm_head ─► logits (f32, ÷ logits_scaling)
//! ```
//!
//! with the decode product kernels of [`crate::gpu`] (dense: one product per matrix, q/k/v and
//! gate/up in one launch; low rank: the B factors of a group in one launch, then their A factors
//! in one; MPO: the layer cut into two halves at one bond, then two cuBLAS GEMMs, see
//! `linear::MpoHalves`) and a handful of small kernels ([`STEP_SRC`]). The step is captured once as a CUDA
//! graph; the position and the token ids live in device memory (`meta`), so the same graph
//! replays every step. Every kernel is a programmatic dependent launch on sm_90+.
//!
//! The prompt is prefilled by the candle model (one forward pass), whose KV cache is then copied
//! into the static one. Numerics follow the candle path (bf16 storage, f32 arithmetic, the same
//! roundings where candle rounds), so the logits agree to bf16 precision, not bit for bit.

use crate::gpu::{ce, gemv_mode, kernel, launch_fused, launch_products, launch_raw, tensor_addr, Out, Product, FUSED_MAX_BATCH};
use crate::linear::{Linear, MpoHalves};
use crate::model::{KvCache, Model, Role};
use candle_core::{DType, Tensor};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use std::ffi::c_void;

/// Kernels of the decode step (compiled with the GEMV kernels, whose helpers they use).
pub(crate) const STEP_SRC: &str = r#"
// sum (max) over the block; every thread gets the result; `red` holds 32 floats
__device__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ float block_max(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : __int_as_float(0xff800000u);
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 u;
    u.x = to_bf16(f[0]) | ((unsigned)to_bf16(f[1]) << 16);
    u.y = to_bf16(f[2]) | ((unsigned)to_bf16(f[3]) << 16);
    u.z = to_bf16(f[4]) | ((unsigned)to_bf16(f[5]) << 16);
    u.w = to_bf16(f[6]) | ((unsigned)to_bf16(f[7]) << 16);
    return u;
}
// meta[0]: the position of this step's tokens; meta[1 + b]: the token of sequence b.
// x (b × h) = embed[id_b] · mult. Grid: b.
extern "C" __global__ void step_embed(const unsigned* meta, const unsigned short* table, unsigned short* x, int h, float mult) {
    pdl_launch_next(); pdl_wait();
    const int b = blockIdx.x;
    const unsigned short* row = table + (size_t)meta[1 + b] * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) x[(size_t)b * h + i] = mult == 1.f ? row[i] : to_bf16(bf(row[i]) * mult);
}
// x += s·d (when d is given; rounded as candle rounds: s·d, then the sum), then
// y = x / sqrt(mean(x²) + eps) ⊙ w. Grid: b; each thread keeps up to 4 chunks of 8 in registers
// (h % 8 == 0, h ≤ 32 · blockDim); the norm weights are loaded before waiting for x.
extern "C" __global__ void step_add_norm(unsigned short* x, const unsigned short* d, float s, const unsigned short* w, unsigned short* y, int h, float eps) {
    __shared__ float red[32];
    pdl_launch_next();
    const size_t off8 = (size_t)blockIdx.x * (h >> 3);
    const int n8 = h >> 3;
    uint4 wraw[4];
#pragma unroll
    for (int c = 0; c < 4; c++) {
        const int i8 = threadIdx.x + c * blockDim.x;
        wraw[c] = i8 < n8 ? ((const uint4*)w)[i8] : make_uint4(0, 0, 0, 0);
    }
    pdl_wait();
    uint4* xr = (uint4*)x + off8;
    float v[4][8];
    float ss = 0.f;
#pragma unroll
    for (int c = 0; c < 4; c++) {
        const int i8 = threadIdx.x + c * blockDim.x;
        if (i8 < n8) {
            unpack8(xr[i8], v[c]);
            if (d) {
                float dv[8];
                unpack8(((const uint4*)d)[off8 + i8], dv);
#pragma unroll
                for (int j = 0; j < 8; j++) v[c][j] = rbf(v[c][j] + (s == 1.f ? dv[j] : rbf(dv[j] * s)));
                xr[i8] = pack8(v[c]);
            }
#pragma unroll
            for (int j = 0; j < 8; j++) ss += v[c][j] * v[c][j];
        }
    }
    const float r = rsqrtf(block_sum(ss, red) / h + eps);
#pragma unroll
    for (int c = 0; c < 4; c++) {
        const int i8 = threadIdx.x + c * blockDim.x;
        if (i8 < n8) {
            float wv[8];
            unpack8(wraw[c], wv);
#pragma unroll
            for (int j = 0; j < 8; j++) wv[j] = v[c][j] * r * wv[j];
            ((uint4*)y)[off8 + i8] = pack8(wv);
        }
    }
}
// Attention of query head h of sequence b at position pos = meta[0], rotary embedding included:
// q (b × nh·hd) and this position's k, v (b × nkv·hd) as the products left them. The block
// rotates q and k (rotate-half), scores the cached positions 0..pos-1 and the new one,
// softmax(q·kᵀ·scale) with the probabilities rounded to bf16 as candle's path does, times v.
// The first query head of each kv group writes the rotated k and v into the caches (b, nkv,
// max_t, hd) at pos, for the steps after this one. What earlier steps wrote — the position, the
// cached keys and values — and the rotation angles are loaded before waiting for the products
// (thread t holds cached key t when hd ≤ 128; each thread its first 8 value chunks).
// Grid: (nh, b); 256 threads; dynamic shared memory: max_t floats; hd % 8 == 0, hd ≤ 256.
#ifdef ATTN_MINB
#define ATTN_LB __launch_bounds__(256, ATTN_MINB)
#else
#define ATTN_LB
#endif
extern "C" __global__ void ATTN_LB step_attend(const unsigned* meta, const unsigned short* q, const unsigned short* k, const unsigned short* v,
                                       unsigned short* kc, unsigned short* vc, const float* inv_freq, unsigned short* y,
                                       int nh, int nkv, int hd, int max_t, float scale) {
    extern __shared__ float sc[];
    __shared__ float qs[256];
    __shared__ float kn[256];
    __shared__ float part[8 * 256];
    __shared__ float red[32];
    pdl_launch_next();
    const int h = blockIdx.x, b = blockIdx.y, group = nh / nkv, kvh = h / group;
    const int pos = meta[0], t_len = pos + 1, half = hd >> 1, c8 = hd >> 3;
    unsigned short* kb = kc + ((size_t)b * nkv + kvh) * max_t * hd;
    unsigned short* vb = vc + ((size_t)b * nkv + kvh) * max_t * hd;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    float cs = 0.f, sn = 0.f;
    if (threadIdx.x < half) {
        sincosf((float)pos * inv_freq[threadIdx.x], &sn, &cs);
        cs = rbf(cs);
        sn = rbf(sn);
    }
    const bool kpre = hd <= 128 && threadIdx.x < pos;
    uint4 kreg[16];
#pragma unroll
    for (int c = 0; c < 16; c++) kreg[c] = (kpre && c < c8) ? ((const uint4*)(kb + (size_t)threadIdx.x * hd))[c] : zero;
    const int groups = blockDim.x / c8, g = threadIdx.x / c8, cc = threadIdx.x - g * c8;
    uint4 vreg[8];
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int t = g + j * groups;
        vreg[j] = (g < groups && t < pos) ? ((const uint4*)(vb + (size_t)t * hd))[cc] : zero;
    }
    pdl_wait();
    const unsigned short* qr = q + ((size_t)b * nh + h) * hd;
    const unsigned short* kr = k + ((size_t)b * nkv + kvh) * hd;
    const unsigned short* vr = v + ((size_t)b * nkv + kvh) * hd;
    const bool writer = h % group == 0;
    float self_dot = 0.f;  // this thread's share of the new position's score q·k
    if (threadIdx.x < half) {
        const int i = threadIdx.x;
        float a1 = bf(qr[i]), a2 = bf(qr[i + half]);
        qs[i] = rbf(rbf(a1 * cs) - rbf(a2 * sn));
        qs[i + half] = rbf(rbf(a2 * cs) + rbf(a1 * sn));
        a1 = bf(kr[i]);
        a2 = bf(kr[i + half]);
        const unsigned short k1 = to_bf16(rbf(a1 * cs) - rbf(a2 * sn)), k2 = to_bf16(rbf(a2 * cs) + rbf(a1 * sn));
        kn[i] = bf(k1);
        kn[i + half] = bf(k2);
        self_dot = qs[i] * kn[i] + qs[i + half] * kn[i + half];
        if (writer) {
            kb[(size_t)pos * hd + i] = k1;
            kb[(size_t)pos * hd + i + half] = k2;
        }
    }
    if (writer)
        for (int e = threadIdx.x; e < hd; e += blockDim.x) vb[(size_t)pos * hd + e] = vr[e];
    const float s_new = block_sum(self_dot, red);  // also makes qs visible to every thread
    // scores: one position per thread, 8 columns per load
    float mx = __int_as_float(0xff800000u);
    for (int t = threadIdx.x; t < t_len; t += blockDim.x) {
        float s = 0.f;
        if (t == pos) {
            s = s_new;
        } else if (kpre && t == threadIdx.x) {
            float s4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int c = 0; c < 16; c++) {
                if (c < c8) {
                    float f[8];
                    unpack8(kreg[c], f);
#pragma unroll
                    for (int j = 0; j < 8; j++) s4[c & 3] = fmaf(qs[c * 8 + j], f[j], s4[c & 3]);
                }
            }
            s = (s4[0] + s4[1]) + (s4[2] + s4[3]);
        } else {
            const uint4* kt = (const uint4*)(kb + (size_t)t * hd);
#pragma unroll 16
            for (int c = 0; c < c8; c++) {
                float f[8];
                unpack8(kt[c], f);
#pragma unroll
                for (int j = 0; j < 8; j++) s = fmaf(qs[c * 8 + j], f[j], s);
            }
        }
        s *= scale;
        sc[t] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_max(mx, red);
    float sum = 0.f;
    for (int t = threadIdx.x; t < t_len; t += blockDim.x) {
        const float e = __expf(sc[t] - mx);
        sc[t] = e;
        sum += e;
    }
    const float inv = 1.f / block_sum(sum, red);
    for (int t = threadIdx.x; t < t_len; t += blockDim.x) sc[t] = rbf(sc[t] * inv);
    __syncthreads();
    // p·v: thread (g, cc) adds positions t ≡ g (mod groups) for columns 8cc..8cc+7
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j] = 0.f;
    if (g < groups) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int t = g + j * groups;
            if (t < t_len) {
                float f[8];
                unpack8(t == pos ? ((const uint4*)vr)[cc] : vreg[j], f);
                const float p = sc[t];
#pragma unroll
                for (int e = 0; e < 8; e++) acc[e] = fmaf(p, f[e], acc[e]);
            }
        }
#pragma unroll 8
        for (int t = g + 8 * groups; t < t_len; t += groups) {
            float f[8];
            unpack8(t == pos ? ((const uint4*)vr)[cc] : ((const uint4*)(vb + (size_t)t * hd))[cc], f);
            const float p = sc[t];
#pragma unroll
            for (int e = 0; e < 8; e++) acc[e] = fmaf(p, f[e], acc[e]);
        }
#pragma unroll
        for (int e = 0; e < 8; e++) part[g * hd + cc * 8 + e] = acc[e];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < hd; e += blockDim.x) {
        float o = 0.f;
        for (int gg = 0; gg < groups; gg++) o += part[gg * hd + e];
        y[((size_t)b * nh + h) * hd + e] = to_bf16(o);
    }
}
// a = silu(g) ⊙ u over n8 chunks of 8 (silu rounded to bf16 first, as candle does).
extern "C" __global__ void step_silu_mul(const unsigned short* g, const unsigned short* u, unsigned short* a, int n8) {
    pdl_launch_next(); pdl_wait();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
        float gf[8], uf[8];
        unpack8(((const uint4*)g)[i], gf);
        unpack8(((const uint4*)u)[i], uf);
#pragma unroll
        for (int j = 0; j < 8; j++) gf[j] = rbf(gf[j] / (1.f + expf(-gf[j]))) * uf[j];
        ((uint4*)a)[i] = pack8(gf);
    }
}
// out (f32) = l (bf16) · mul over n elements.
extern "C" __global__ void step_logits(const unsigned short* l, float* out, int n, float mul) {
    pdl_launch_next(); pdl_wait();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = bf(l[i]) * mul;
}
"#;

/// Longest sequence a decoder holds (the attention kernel keeps a row of scores in shared memory).
pub const MAX_LEN: usize = 8192;
/// Threads of the norm kernel (it keeps 32 values of a row per thread: hidden ≤ 32 × this).
const NORM_THREADS: usize = 512;

/// One kernel argument.
#[derive(Clone, Copy)]
enum Arg {
    P(u64),
    I(i32),
    F(f32),
}

/// A linear layer as the step runs it: W, or A·B with the B product into `t` first.
enum Lin {
    Dense { w: u64, rows: usize, cols: usize },
    LowRank { a: u64, b: u64, rows: usize, rank: usize, cols: usize, t: Tensor },
    /// an MPO layer as its two halves (`linear::MpoHalves`): Z = X Rᵀ into the decoder's
    /// `mpo_z`, then y = L Z, both cuBLAS GEMMs
    Mpo(MpoHalves),
}

struct Layer {
    /// q, k, v, o, gate, up, down
    lins: Vec<Lin>,
    kc: Tensor,
    vc: Tensor,
}

/// Static buffers of one step (bf16 on the device unless noted).
struct Bufs {
    /// u32: position, then one token id per sequence
    meta: Tensor,
    /// f32: RoPE inverse frequencies (head_dim / 2)
    inv_freq: Tensor,
    x: Tensor,
    xn: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    att: Tensor,
    o: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
    down: Tensor,
    logits: Tensor,
    /// f32 (batch × vocab)
    out: Tensor,
}

/// Greedy-decoding steps of one batch of sequences as a replayed CUDA graph (see the module doc).
pub struct Decoder {
    dev: candle_core::cuda::CudaDevice,
    batch: usize,
    max_len: usize,
    pos: usize,
    lm_head: Lin,
    layers: Vec<Layer>,
    bufs: Bufs,
    mode: u8,
    /// the fused kinds run the step (norms, residual adds and silu·up inside the products)
    fused: bool,
    /// bf16 scratch for the MPO layers' intermediate Z (`None` without MPO layers)
    mpo_z: Option<Tensor>,
    graph: Option<cudarc::driver::CudaGraph>,
    /// kernel kinds left out of the step (`COMPACTOR_STEP_SKIP`, comma-separated: norm, attend,
    /// silu, products, head): for timing what each costs only — the logits are then wrong
    skip: Vec<String>,
    /// the model (a clone: its weights stay alive while the graph points into them)
    model: Model,
}

/// bf16, contiguous, 16-byte aligned, with a multiple of 8 columns: what the product kernels read.
fn usable(ts: &[&Tensor], cols: usize) -> crate::Result<bool> {
    for t in ts {
        if t.dtype() != DType::BF16 || !t.is_contiguous() || tensor_addr(t)? % 16 != 0 {
            return Ok(false);
        }
    }
    Ok(cols % 8 == 0)
}

fn lin(l: &Linear, batch: usize) -> crate::Result<Option<Lin>> {
    if l.bias().is_some() {
        return Ok(None);
    }
    Ok(match l {
        Linear::Dense { w, .. } => {
            let (rows, cols) = w.dims2()?;
            if !usable(&[w], cols)? {
                return Ok(None);
            }
            Some(Lin::Dense { w: tensor_addr(w)?, rows, cols })
        }
        Linear::LowRank { a, b, .. } => {
            let (rows, rank) = a.dims2()?;
            let cols = b.dim(1)?;
            if rank % 8 != 0 || !usable(&[a, b], cols)? {
                return Ok(None);
            }
            let t = Tensor::zeros((batch, rank), DType::BF16, a.device())?;
            Some(Lin::LowRank { a: tensor_addr(a)?, b: tensor_addr(b)?, rows, rank, cols, t })
        }
        Linear::Mpo { cores, .. } => {
            // no cut that pays (more bytes or more work than the cores): candle ops for the model
            let Some(halves) = MpoHalves::new(cores)? else { return Ok(None) };
            if !usable(&[&halves.l, &halves.r], 8)? {
                return Ok(None);
            }
            Some(Lin::Mpo(halves))
        }
        _ => None,
    })
}

/// Whether gate and up can run as pairs of one fused launch (same kind and shape).
fn pairable(g: &Lin, u: &Lin) -> bool {
    match (g, u) {
        (Lin::Dense { rows, cols, .. }, Lin::Dense { rows: r2, cols: c2, .. }) => rows == r2 && cols == c2,
        (Lin::LowRank { rows, rank, cols, .. }, Lin::LowRank { rows: r2, rank: k2, cols: c2, .. }) => rows == r2 && rank == k2 && cols == c2,
        _ => false,
    }
}

/// An on/off setting read from an environment variable (on unless it is `0`) at first use and
/// settable from code afterwards (a benchmark compares both in one run).
struct Switch {
    state: std::sync::atomic::AtomicU8,
    env: &'static str,
}

impl Switch {
    const fn new(env: &'static str) -> Switch {
        Switch { state: std::sync::atomic::AtomicU8::new(u8::MAX), env }
    }

    fn get(&self) -> bool {
        use std::sync::atomic::Ordering;
        match self.state.load(Ordering::Relaxed) {
            u8::MAX => {
                let on = std::env::var(self.env).map(|v| v != "0").unwrap_or(true);
                self.state.store(on as u8, Ordering::Relaxed);
                on
            }
            v => v == 1,
        }
    }

    fn set(&self, on: bool) {
        self.state.store(on as u8, std::sync::atomic::Ordering::Relaxed);
    }
}

static STEP_GRAPH: Switch = Switch::new("COMPACTOR_STEP_GRAPH");
static STEP_FUSE: Switch = Switch::new("COMPACTOR_STEP_FUSE");

/// Whether the step graph may be used (`COMPACTOR_STEP_GRAPH=0` turns it off).
pub fn enabled() -> bool {
    STEP_GRAPH.get()
}

/// Turns the step graph on or off for later decoders.
pub fn set_enabled(on: bool) {
    STEP_GRAPH.set(on)
}

/// Whether later decoders may use the fused product kinds (`COMPACTOR_STEP_FUSE=0` turns them
/// off).
pub fn fuse_enabled() -> bool {
    STEP_FUSE.get()
}

/// Turns the fused kinds on or off for later decoders.
pub fn set_fuse_enabled(on: bool) {
    STEP_FUSE.set(on)
}

impl Decoder {
    /// A decoder that continues from `cache` (filled by the candle model's prefill of `batch`
    /// sequences) for up to `max_len` positions in all; `None` where the step graph does not
    /// apply (not CUDA bf16, a layer other than dense, low rank or MPO, biases, batch > 16, …), and
    /// the caller goes on with candle ops.
    pub fn new(model: &Model, cache: &KvCache, batch: usize, max_len: usize) -> crate::Result<Option<Decoder>> {
        let candle_core::Device::Cuda(dev) = &model.device else { return Ok(None) };
        let cfg = &model.cfg;
        let (h, inter, nh, nkv, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let fits = enabled()
            && model.dtype == DType::BF16
            && !model.differentiable
            && model.capture.is_none()
            && (1..=16).contains(&batch)
            && max_len <= MAX_LEN
            && cache.len() < max_len
            && h % 8 == 0
            && h <= 32 * NORM_THREADS
            && inter % 8 == 0
            && hd % 8 == 0
            && hd <= 256
            && nkv > 0
            && nh % nkv == 0;
        if !fits {
            return Ok(None);
        }
        let device = &model.device;
        let mut layers = Vec::with_capacity(model.blocks.len());
        for (l, block) in model.blocks.iter().enumerate() {
            let mut lins = Vec::with_capacity(7);
            for role in Role::ALL {
                match lin(block.linear(role), batch)? {
                    Some(x) => lins.push(x),
                    None => return Ok(None),
                }
            }
            let kc = Tensor::zeros((batch, nkv, max_len, hd), DType::BF16, device)?;
            let vc = Tensor::zeros((batch, nkv, max_len, hd), DType::BF16, device)?;
            if let Some((k, v)) = cache.layer(l) {
                if k.dim(0)? != batch {
                    return Err(crate::Error::Invalid(format!("decoder for {batch} sequences given a cache of {}", k.dim(0)?)));
                }
                kc.slice_set(&k.contiguous()?, 2, 0)?;
                vc.slice_set(&v.contiguous()?, 2, 0)?;
            }
            layers.push(Layer { lins, kc, vc });
        }
        let Some(lm_head) = lin(&model.lm_head, batch)? else { return Ok(None) };
        let vocab = cfg.vocab_size;
        let z = |n: usize| Tensor::zeros((batch, n), DType::BF16, device);
        let inv: Vec<f32> = (0..hd / 2).map(|i| (1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64)) as f32).collect();
        let bufs = Bufs {
            meta: Tensor::zeros(batch + 1, DType::U32, device)?,
            inv_freq: Tensor::new(inv.as_slice(), device)?,
            x: z(h)?,
            xn: z(h)?,
            q: z(nh * hd)?,
            k: z(nkv * hd)?,
            v: z(nkv * hd)?,
            att: z(nh * hd)?,
            o: z(h)?,
            gate: z(inter)?,
            up: z(inter)?,
            act: z(inter)?,
            down: z(h)?,
            logits: z(vocab)?,
            out: Tensor::zeros((batch, vocab), DType::F32, device)?,
        };
        let mode = gemv_mode(batch);
        // one scratch for every MPO layer's Z (they run one after another on the stream)
        let z_len = std::iter::once(&lm_head).chain(layers.iter().flat_map(|l| &l.lins)).map(|l| if let Lin::Mpo(h) = l { batch * h.j1 * h.chi * h.i2 } else { 0 }).max().unwrap_or(0);
        let any_mpo = z_len > 0;
        let mpo_z = if any_mpo { Some(Tensor::zeros(z_len, DType::BF16, device)?) } else { None };
        if mode == 0 || any_mpo {
            crate::gpu::cublas_workspace(dev)?;
        }
        let fused = fuse_enabled() && mode == 1 && batch <= FUSED_MAX_BATCH && !any_mpo && layers.iter().all(|l| pairable(&l.lins[4], &l.lins[5]));
        Ok(Some(Decoder {
            dev: dev.clone(),
            batch,
            max_len,
            pos: cache.len(),
            lm_head,
            layers,
            bufs,
            mode,
            fused,
            mpo_z,
            graph: None,
            skip: std::env::var("COMPACTOR_STEP_SKIP").map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()).unwrap_or_default(),
            model: model.clone(),
        }))
    }

    /// Whether the step runs the fused product kinds (see [`Decoder::blocks_fused`]).
    pub fn fused(&self) -> bool {
        self.fused
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Logits (batch, vocab, f32) of the next position after `ids` (one token per sequence),
    /// whose keys and values join the cache.
    pub fn step(&mut self, ids: &[u32]) -> crate::Result<Tensor> {
        if ids.len() != self.batch {
            return Err(crate::Error::Invalid(format!("decoder step: {} ids for {} sequences", ids.len(), self.batch)));
        }
        if self.pos >= self.max_len {
            return Err(crate::Error::Invalid(format!("decoder full: {} positions", self.max_len)));
        }
        let vocab = self.model.cfg.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(crate::Error::Invalid(format!("token id {bad} outside the vocabulary of {vocab}")));
        }
        let mut meta = Vec::with_capacity(self.batch + 1);
        meta.push(self.pos as u32);
        meta.extend_from_slice(ids);
        let stream = self.dev.cuda_stream();
        // SAFETY: `meta` is batch + 1 u32 on the device; a pageable source is staged by the
        // driver before the call returns.
        unsafe { cudarc::driver::result::memcpy_htod_async(tensor_addr(&self.bufs.meta)?, &meta, stream.cu_stream()) }.map_err(ce("copy of the step's ids"))?;
        match &self.graph {
            Some(g) => g.launch().map_err(ce("graph launch"))?,
            None => {
                // the first step runs from the host (kernels loaded, cuBLAS warmed), then the
                // same launches are captured (not run) for the steps after it
                self.issue()?;
                stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(ce("begin capture"))?;
                let issued = self.issue();
                let g = stream.end_capture(CUgraphInstantiate_flags(0)).map_err(ce("end capture"));
                issued?;
                let g = g?.ok_or_else(|| crate::Error::Invalid("stream capture gave no graph".into()))?;
                g.upload().map_err(ce("graph upload"))?;
                self.graph = Some(g);
            }
        }
        self.pos += 1;
        Ok(self.bufs.out.copy()?)
    }

    fn launch(&self, name: &str, grid: (u32, u32), block: u32, shared: u32, args: &[Arg]) -> crate::Result<()> {
        let func = kernel(&self.dev, name)?;
        let mut params: Vec<*mut c_void> = args
            .iter()
            .map(|a| match a {
                Arg::P(v) => v as *const u64 as *mut c_void,
                Arg::I(v) => v as *const i32 as *mut c_void,
                Arg::F(v) => v as *const f32 as *mut c_void,
            })
            .collect();
        // SAFETY: each call below lists the arguments of its kernel in STEP_SRC.
        unsafe { launch_raw(&self.dev, &func, grid, block, shared, &mut params, true) }?;
        Ok(())
    }

    /// The products of `lins` (one group: they read `x`, width `n`) into `ys`.
    fn products(&self, lins: &[&Lin], x: u64, ys: &[u64]) -> crate::Result<()> {
        let mut first = Vec::new();
        let mut second = Vec::new();
        for (l, &y) in lins.iter().zip(ys) {
            match l {
                Lin::Mpo(h) => {
                    let z = self.mpo_z.as_ref().ok_or_else(|| crate::Error::Invalid("decoder: no MPO scratch".into()))?;
                    let (l, r, z) = (tensor_addr(&h.l)?, tensor_addr(&h.r)?, tensor_addr(z)?);
                    let p = Product { w: r, x, y: z, rows: h.chi * h.i2, cols: h.j2, ldx: h.j2 };
                    crate::gpu::cublas_product(&self.dev, self.batch * h.j1, &p)?;
                    crate::gpu::cublas_mpo_left(&self.dev, self.batch, l, z, y, h.i1, h.i2, h.j1 * h.chi)?;
                }
                Lin::Dense { w, rows, cols } => first.push(Product { w: *w, x, y, rows: *rows, cols: *cols, ldx: *cols }),
                Lin::LowRank { a, b, rows, rank, cols, t } => {
                    let t = tensor_addr(t)?;
                    first.push(Product { w: *b, x, y: t, rows: *rank, cols: *cols, ldx: *cols });
                    second.push(Product { w: *a, x: t, y, rows: *rows, cols: *rank, ldx: *rank });
                }
            }
        }
        launch_products(&self.dev, self.mode, self.batch, &first, true)?;
        if !second.is_empty() {
            launch_products(&self.dev, self.mode, self.batch, &second, true)?;
        }
        Ok(())
    }

    /// The products of `lins` (one group, reading `x`) in the fused kinds: the first launch (the
    /// dense products and the B factors) normalizes its input with `norm`; the final outputs
    /// (dense or the A factors') are written as `out` says. [`Out::Residual`] takes one layer;
    /// [`Out::Glu`] takes [gate, up] (see [`pairable`]) and one output.
    fn fused_products(&self, lins: &[&Lin], x: u64, ys: &[u64], norm: Option<(u64, f32)>, out: Out) -> crate::Result<()> {
        let (dev, nb) = (&self.dev, self.batch);
        let p = |w: u64, x: u64, y: u64, rows: usize, cols: usize| Product { w, x, y, rows, cols, ldx: cols };
        if out == Out::Glu {
            match (lins[0], lins[1]) {
                (Lin::Dense { w, rows, cols }, Lin::Dense { w: w2, .. }) => launch_fused(dev, nb, &[p(*w, x, ys[0], *rows, *cols)], &[(*w2, x)], norm, Out::Glu)?,
                (Lin::LowRank { a, b, rows, rank, cols, t }, Lin::LowRank { a: a2, b: b2, t: t2, .. }) => {
                    let (t, t2) = (tensor_addr(t)?, tensor_addr(t2)?);
                    let first = [p(*b, x, t, *rank, *cols), p(*b2, x, t2, *rank, *cols)];
                    let second = [p(*a, t, ys[0], *rows, *rank)];
                    launch_fused(dev, nb, &first, &[], norm, Out::Store)?;
                    launch_fused(dev, nb, &second, &[(*a2, t2)], None, Out::Glu)?;
                }
                _ => return Err(crate::Error::Invalid("fused step: gate and up differ in kind".into())),
            }
            return Ok(());
        }
        let mut first = Vec::new();
        let mut second = Vec::new();
        for (l, &y) in lins.iter().zip(ys) {
            match l {
                Lin::Dense { w, rows, cols } => first.push(p(*w, x, y, *rows, *cols)),
                Lin::LowRank { a, b, rows, rank, cols, t } => {
                    let t = tensor_addr(t)?;
                    first.push(p(*b, x, t, *rank, *cols));
                    second.push(p(*a, t, y, *rows, *rank));
                }
                // `Decoder::new` runs a model with MPO layers unfused
                Lin::Mpo(_) => return Err(crate::Error::Invalid("fused step: an MPO layer".into())),
            }
        }
        launch_fused(dev, nb, &first, &[], norm, if second.is_empty() { out } else { Out::Store })?;
        if !second.is_empty() {
            launch_fused(dev, nb, &second, &[], None, out)?;
        }
        Ok(())
    }

    /// Whether `COMPACTOR_STEP_SKIP` leaves this kind of kernel out (timing only).
    fn skips(&self, what: &str) -> bool {
        self.skip.iter().any(|s| s == what)
    }

    /// x (batch × hidden) = the embeddings of this step's ids.
    fn embed(&self) -> crate::Result<()> {
        use Arg::{F, I, P};
        let (model, cfg) = (&self.model, &self.model.cfg);
        let args = [P(tensor_addr(&self.bufs.meta)?), P(tensor_addr(&model.embed)?), P(tensor_addr(&self.bufs.x)?), I(cfg.hidden_size as i32), F(bf16_factor(cfg.embedding_multiplier))];
        self.launch("step_embed", (self.batch as u32, 1), 256, 0, &args)
    }

    /// Attention of `layer` (RoPE, cache write) from q, k, v into att.
    fn attend(&self, layer: &Layer) -> crate::Result<()> {
        use Arg::{F, I, P};
        if self.skips("attend") {
            return Ok(());
        }
        let (b, cfg) = (&self.bufs, &self.model.cfg);
        let a = |t: &Tensor| tensor_addr(t);
        let nh = cfg.num_attention_heads;
        let args = [
            P(a(&b.meta)?),
            P(a(&b.q)?),
            P(a(&b.k)?),
            P(a(&b.v)?),
            P(a(&layer.kc)?),
            P(a(&layer.vc)?),
            P(a(&b.inv_freq)?),
            P(a(&b.att)?),
            I(nh as i32),
            I(cfg.num_key_value_heads as i32),
            I(cfg.head_dim as i32),
            I(self.max_len as i32),
            F(cfg.attention_scale as f32),
        ];
        self.launch("step_attend", (nh as u32, self.batch as u32), 256, (self.max_len * 4) as u32, &args)
    }

    /// out (f32) = logits ÷ logits_scaling.
    fn logits(&self) -> crate::Result<()> {
        use Arg::{F, I, P};
        let cfg = &self.model.cfg;
        let n_out = (self.batch * cfg.vocab_size) as i32;
        let args = [P(tensor_addr(&self.bufs.logits)?), P(tensor_addr(&self.bufs.out)?), I(n_out), F((1.0 / cfg.logits_scaling) as f32)];
        self.launch("step_logits", ((n_out as u32).div_ceil(256).min(1024), 1), 256, 0, &args)
    }

    /// Issues one step on the stream (captured into the graph once, see [`Decoder::step`]).
    fn issue(&self) -> crate::Result<()> {
        self.embed()?;
        if self.fused {
            self.blocks_fused()?;
        } else {
            self.blocks()?;
        }
        self.logits()
    }

    /// The blocks and the lm_head in the fused kinds: per block q/k/v (normalizing the residual
    /// stream on the fly) ─► attention ─► o (added into the residual) ─► gate/up as pairs
    /// (silu·up out) ─► down (added into the residual); then lm_head (final norm on the fly).
    /// No norm or silu kernels: 5 launches per dense block and 9 per low-rank one, against 8 and
    /// 12 unfused.
    fn blocks_fused(&self) -> crate::Result<()> {
        let b = &self.bufs;
        let a = |t: &Tensor| tensor_addr(t);
        let (x, q, k, v, att, act) = (a(&b.x)?, a(&b.q)?, a(&b.k)?, a(&b.v)?, a(&b.att)?, a(&b.act)?);
        let (model, cfg) = (&self.model, &self.model.cfg);
        let (res, eps) = (Out::Residual(bf16_factor(cfg.residual_multiplier)), cfg.rms_norm_eps as f32);
        let products = |lins: &[&Lin], xin: u64, ys: &[u64], norm: Option<(u64, f32)>, out: Out| if self.skips("products") { Ok(()) } else { self.fused_products(lins, xin, ys, norm, out) };
        for (layer, block) in self.layers.iter().zip(&model.blocks) {
            let ls = &layer.lins;
            products(&[&ls[0], &ls[1], &ls[2]], x, &[q, k, v], Some((a(&block.input_norm)?, eps)), Out::Store)?;
            self.attend(layer)?;
            products(&[&ls[3]], att, &[x], None, res)?;
            products(&[&ls[4], &ls[5]], x, &[act], Some((a(&block.post_norm)?, eps)), Out::Glu)?;
            products(&[&ls[6]], act, &[x], None, res)?;
        }
        if !self.skips("head") {
            self.fused_products(&[&self.lm_head], x, &[a(&b.logits)?], Some((a(&model.norm)?, eps)), Out::Store)?;
        }
        Ok(())
    }

    /// The blocks and the lm_head unfused: add+norm, products, attention and silu·up kernels.
    fn blocks(&self) -> crate::Result<()> {
        use Arg::{F, I, P};
        let b = &self.bufs;
        let a = |t: &Tensor| tensor_addr(t);
        let (x, xn, q, k, v, att, o, gate, up, act, down) = (a(&b.x)?, a(&b.xn)?, a(&b.q)?, a(&b.k)?, a(&b.v)?, a(&b.att)?, a(&b.o)?, a(&b.gate)?, a(&b.up)?, a(&b.act)?, a(&b.down)?);
        let (model, cfg) = (&self.model, &self.model.cfg);
        let nb = self.batch as u32;
        let h = cfg.hidden_size as i32;
        let (res_mult, eps) = (bf16_factor(cfg.residual_multiplier), cfg.rms_norm_eps as f32);
        let norm = |d: u64, w: u64| {
            if self.skips("norm") {
                return Ok(());
            }
            self.launch("step_add_norm", (nb, 1), NORM_THREADS as u32, 0, &[P(x), P(d), F(res_mult), P(w), P(xn), I(h), F(eps)])
        };
        let products = |lins: &[&Lin], x: u64, ys: &[u64]| if self.skips("products") { Ok(()) } else { self.products(lins, x, ys) };
        let n8 = (self.batch * cfg.intermediate_size / 8) as i32;
        let elem_blocks = ((n8 as u32).div_ceil(256)).min(1024);
        for (l, (layer, block)) in self.layers.iter().zip(&model.blocks).enumerate() {
            norm(if l == 0 { 0 } else { down }, a(&block.input_norm)?)?;
            let ls = &layer.lins;
            products(&[&ls[0], &ls[1], &ls[2]], xn, &[q, k, v])?;
            self.attend(layer)?;
            products(&[&ls[3]], att, &[o])?;
            norm(o, a(&block.post_norm)?)?;
            products(&[&ls[4], &ls[5]], xn, &[gate, up])?;
            if !self.skips("silu") {
                self.launch("step_silu_mul", (elem_blocks, 1), 256, 0, &[P(gate), P(up), P(act), I(n8)])?;
            }
            products(&[&ls[6]], act, &[down])?;
        }
        norm(if self.layers.is_empty() { 0 } else { down }, a(&model.norm)?)?;
        if !self.skips("head") {
            self.products(&[&self.lm_head], xn, &[a(&b.logits)?])?;
        }
        Ok(())
    }
}

/// candle scales bf16 tensors by a bf16 factor (and divides f32 ones by multiplying).
fn bf16_factor(m: f64) -> f32 {
    half::bf16::from_f64(m).to_f32()
}

