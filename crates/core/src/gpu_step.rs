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
//! in one; MPO: the layer cut into two halves at one bond, see `linear::MpoHalves`, then at
//! batch 1 one fused tensor-core launch and a sum of its blocks' partials, above it two cuBLAS
//! GEMMs) and a handful of small kernels ([`STEP_SRC`]). The step is captured once as a CUDA
//! graph; the position and the token ids live in device memory (`meta`), so the same graph
//! replays every step. Every kernel is a programmatic dependent launch on sm_90+.
//!
//! The prompt is prefilled by the candle model (one forward pass), whose KV cache is then copied
//! into the static one. Numerics follow the candle path (bf16 storage, f32 arithmetic, the same
//! roundings where candle rounds), so the logits agree to bf16 precision, not bit for bit.

use crate::gpu::{ce, gemv_mode, kernel, launch_fused, launch_products, launch_raw, tensor_addr, Out, Pair, Product, Q8, FUSED_MAX_BATCH};
use crate::linear::{Int8Weight, Linear, MpoFusedLayout, MpoHalves};
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
// ---- An MPO layer at batch 1 in one launch (sm_90+), then step_mpo_sum ----
// Layout (`linear::MpoFusedLayout`): per bond index a one chunk, R_a (I2p × J2p) then L_a
// (I1p × J1p), bf16, 16-byte groups swizzled (`linear::swizzle`: group c of row r at c ^ (r mod 8)
// in rows of a multiple of 64 values; rsw / lsw below). y[i1, i2] = Σ_a Σ_j1 L_a[i1, j1] Z_a[i2, j1],
// Z_a[i2, j1] = Σ_j2 R_a[i2, j2] x[j1, j2]. Each block takes a contiguous range of bond indices;
// a producer thread bulk-copies their chunks (cp.async.bulk, mbarrier completion) into a ring of
// `slots` chunks, from before the wait for x (weights are never written), so the next layer's
// weights stream while the previous kernel ends. MF_CW consumer warps split each chunk's work:
// warp (m, h) takes i2 tile m (16 rows) and the h-th part of j1: phase 1 puts its Z tile in
// registers (mma.m16n8k16, x from shared memory), and since an accumulator fragment of phase 1
// is laid out as the B operand of phase 2 (rows i2 = n, columns j1 = k), phase 2 multiplies
// L_a's columns of that j1 part by it without a trip through shared memory. The warps' sums
// meet in shared memory at the end, and each block writes its partial y (f32, I1 × I2) to
// part[block]; step_mpo_sum adds the partials up (no atomics: the blocks' sums all land on the
// same few addresses, which serializes them), or with tail > 0 the last `tail` blocks to finish
// do (y, cnt: two u32 counters, zero between launches; `COMPACTOR_MPO_TAIL`, not yet measured). Grid ≤ min(SMs, chi), 32·(MF_CW + 1) threads.
// Compiled for NK = J1p/16/S k steps of j1 per warp (S = min(MF_CW / T, J1p/16) warps per i2
// tile, T = I2p/16 tiles; the layout pads J1p to a multiple of 16·S) and MT = I1p/16 row tiles
// of L_a (step_mpof_NK_MT, NK ≤ 4, MT ≤ 8), so that its loops unroll whole. Requires J2 % 8 == 0;
// dynamic shared memory: slots·chunk + J1p·(J2p + 8)·2 + 16·slots bytes, the ring at least
// max(I1p·I2p·4, 4096) bytes (the warps' sums, then the tail's, reuse it).
#define MF_CW 8
// timing only (`COMPACTOR_GEMV_DEFINES`; y is then wrong): MF_SKIP=1 leaves out the tensor-core
// phases (the chunks still stream in), 2 the copies too, 3 leaves out phase 2, 4 phase 1
#ifndef MF_SKIP
#define MF_SKIP 0
#endif
__device__ __forceinline__ unsigned mf_saddr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void ldsm4a(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}
// two floats rounded to bf16 (nearest even) in one register, lo in the low half
__device__ __forceinline__ unsigned pk_bf16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ void mf_bar() { asm volatile("bar.sync 1, %0;" ::"n"(32 * MF_CW) : "memory"); }
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(unsigned long long* b, unsigned n) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(mf_saddr(b)), "r"(n) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(mf_saddr(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* b, unsigned parity) {
    unsigned ok = 0;
    while (!ok)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}" : "=r"(ok) : "r"(mf_saddr(b)), "r"(parity) : "memory");
}
#endif
// y[i4] (4 bf16 values) for float4 columns lo ≤ i4 < hi = Σ of `parts` partials (f32, parts × n)
// of step_mpof, by 256 threads: 16 columns × 16 partial groups at a time, the groups' sums meeting
// in `red` (16 × 16); BAR: the barrier of those 256 threads
template <typename BAR>
__device__ __forceinline__ void mpo_sum(const float* __restrict__ part, unsigned short* __restrict__ y, int n, int parts, int lo, int hi, float4* red, BAR bar) {
    const int col = threadIdx.x & 15, grp = threadIdx.x >> 4;
    for (int c0 = lo; c0 < hi; c0 += 16) {
        const int i4 = c0 + col;
        float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i4 < hi) {
            for (int p = grp; p < parts; p += 16) {
                const float4 v = __ldcg((const float4*)(part + (size_t)p * n) + i4);
                sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
            }
        }
        red[grp * 16 + col] = sum;
        bar();
        if (grp == 0 && i4 < hi) {
            for (int k = 1; k < 16; k++) {
                const float4 v = red[k * 16 + col];
                sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
            }
            ((uint2*)y)[i4] = make_uint2(pk_bf16(sum.x, sum.y), pk_bf16(sum.z, sum.w));
        }
        bar();
    }
}
template <int NK, int MT>
__device__ __forceinline__ void mpof(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
    float* __restrict__ part, int I1, int I2, int J1, int J2, int I1p, int I2p, int J1p, int J2p, int chi, int slots,
    unsigned short* __restrict__ y, unsigned* cnt, int tail) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) unsigned char mf_sm[];
    const int rsz = I2p * J2p, csz = rsz + I1p * J1p, XS = J2p + 8;
    const unsigned cbytes = (unsigned)csz * 2;
    unsigned char* ring = mf_sm;
    unsigned short* xs = (unsigned short*)(mf_sm + (size_t)slots * cbytes);
    unsigned long long* full = (unsigned long long*)(xs + J1p * XS);
    unsigned long long* empty = full + slots;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int a0 = (int)((long long)chi * blockIdx.x / gridDim.x), na = (int)((long long)chi * (blockIdx.x + 1) / gridDim.x) - a0;
    if (threadIdx.x == 0) {
        for (int s = 0; s < slots; s++) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], MF_CW);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    pdl_launch_next();
    if (warp == MF_CW) {
        // the producer
        if (lane == 0) {
            unsigned long long policy;
            asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
            for (int n = 0; n < (MF_SKIP == 2 ? 0 : na); n++) {
                const int s = n % slots;
                if (n >= slots) mbar_wait(&empty[s], ((n / slots) - 1) & 1);
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(mf_saddr(&full[s])), "r"(cbytes) : "memory");
                asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                             ::"r"(mf_saddr(ring + (size_t)s * cbytes)), "l"(w + (size_t)(a0 + n) * csz), "r"(cbytes), "r"(mf_saddr(&full[s])), "l"(policy) : "memory");
            }
        }
        return;
    }
    pdl_wait();
    const int c8 = J2p >> 3;
    for (int e = threadIdx.x; e < J1p * c8; e += 32 * MF_CW) {
        const int j1 = e / c8, j = (e - j1 * c8) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (j1 < J1 && j < J2) v = *(const uint4*)(x + (size_t)j1 * J2 + j);
        *(uint4*)(xs + j1 * XS + j) = v;
    }
    mf_bar();
    const int T = I2p >> 4, S = min(MF_CW / T, J1p >> 4);
    const int m = warp % T, h = warp / T;
    const bool active = h < S;
    const int kb0 = active ? h * NK : 0;
    const int g = lane >> 2, t = lane & 3, hi = lane >> 4;
    // this lane's ldmatrix addresses (shared-memory bytes), computed once: R_a row m·16 + lane%16
    // (chunk-relative), L_a row lane%16 (+ 16 per m tile), x row j1 of each of its k steps
    const int ra = m * 16 + (lane & 15);
    const unsigned rsw = (J2p & 63) == 0 ? (ra & 7) : 0, lsw = (J1p & 63) == 0 ? (lane & 7) : 0;
    const unsigned r_row = ra * J2p * 2, l_mt = 16 * J1p * 2;
    unsigned l_q[NK], x_q[NK];
#pragma unroll
    for (int q = 0; q < NK; q++) {
        l_q[q] = rsz * 2 + (lane & 15) * J1p * 2 + (((unsigned)((kb0 + q) * 2 + hi) ^ lsw) << 4);
        x_q[q] = mf_saddr(xs) + (((kb0 + q) * 16 + (hi << 3) + (lane & 7)) * XS + (((lane >> 3) & 1) << 3)) * 2;
    }
    const unsigned ring_a = mf_saddr(ring);
    float yc[MT][2][4];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) yc[i][j][0] = yc[i][j][1] = yc[i][j][2] = yc[i][j][3] = 0.f;
    for (int n = 0; n < na; n++) {
        const int s = n % slots;
        if (MF_SKIP == 2) continue;
        mbar_wait(&full[s], (n / slots) & 1);
        if (active && MF_SKIP != 1) {
            const unsigned ca = ring_a + s * cbytes;
            float zc[NK][2][4];
#pragma unroll
            for (int q = 0; q < NK; q++)
#pragma unroll
                for (int j = 0; j < 2; j++) zc[q][j][0] = zc[q][j][1] = zc[q][j][2] = zc[q][j][3] = 0.f;
            // phase 1: Z (i2 tile m × this warp's j1) = R_a · xᵀ, K = j2
#pragma unroll 4
            for (int k = 0; k < (MF_SKIP == 4 ? 0 : J2p >> 4); k++) {
                unsigned a0_, a1_, a2_, a3_;
                ldsm4a(a0_, a1_, a2_, a3_, ca + r_row + (((unsigned)(2 * k + hi) ^ rsw) << 4));
#pragma unroll
                for (int q = 0; q < NK; q++) {
                    unsigned b0, b1, b2, b3;
                    ldsm4a(b0, b1, b2, b3, x_q[q] + 32 * k);
                    mma16816(zc[q][0], a0_, a1_, a2_, a3_, b0, b1);
                    mma16816(zc[q][1], a0_, a1_, a2_, a3_, b2, b3);
                }
            }
            // phase 2: y (I1 × i2 tile m) += L_a (columns: this warp's j1) · Zᵀ, B straight from
            // phase 1's accumulators (rounded to bf16, as the two-GEMM path stores Z)
#pragma unroll
            for (int q = 0; q < NK; q++) {
                if (MF_SKIP != 3) {
                    const unsigned p00 = pk_bf16(zc[q][0][0], zc[q][0][1]), p01 = pk_bf16(zc[q][1][0], zc[q][1][1]);
                    const unsigned p10 = pk_bf16(zc[q][0][2], zc[q][0][3]), p11 = pk_bf16(zc[q][1][2], zc[q][1][3]);
                    const unsigned la = ca + l_q[q];
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        unsigned a0_, a1_, a2_, a3_;
                        ldsm4a(a0_, a1_, a2_, a3_, la + mt * l_mt);
                        mma16816(yc[mt][0], a0_, a1_, a2_, a3_, p00, p01);
                        mma16816(yc[mt][1], a0_, a1_, a2_, a3_, p10, p11);
                    }
                }
            }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[s]);
    }
    // the warps' sums into the ring (every chunk consumed), then this block's partial
    float* ys = (float*)mf_sm;
    // the ring was written by bulk copies (the async proxy); order them before these generic writes
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    mf_bar();
    for (int r = 0; r < S; r++) {
        if (active && h == r) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    float2* p0 = (float2*)(ys + (mt * 16 + g) * I2p + m * 16 + j * 8 + 2 * t);
                    float2* p1 = p0 + 4 * I2p;
                    float2 v0 = make_float2(yc[mt][j][0], yc[mt][j][1]), v1 = make_float2(yc[mt][j][2], yc[mt][j][3]);
                    if (r) {
                        v0.x += p0->x; v0.y += p0->y; v1.x += p1->x; v1.y += p1->y;
                    }
                    *p0 = v0;
                    *p1 = v1;
                }
            }
        }
        mf_bar();
    }
    float* pb = part + (size_t)blockIdx.x * I1 * I2;
    for (int e = threadIdx.x; e < I1 * I2; e += 32 * MF_CW) {
        const int i1 = e / I2;
        pb[e] = ys[i1 * I2p + e - i1 * I2];
    }
    if (tail == 0) return;
    // the last `tail` blocks to get here add the partials up, each a slice of y, instead of a
    // step_mpo_sum launch. Every block has started before any of them waits (all trigger the
    // next launch at their start), so the wait cannot hold an SM another block needs.
    __shared__ unsigned ticket;
    __threadfence();
    mf_bar();
    if (threadIdx.x == 0) ticket = atomicAdd(&cnt[0], 1u);
    mf_bar();
    const int first = (int)gridDim.x - tail;
    if ((int)ticket < first) return;
    if (threadIdx.x == 0) {
        unsigned seen;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(cnt) : "memory");
        } while (seen < gridDim.x);
        __threadfence();
    }
    mf_bar();
    const int n4 = I1 * I2 / 4, j = (int)ticket - first;
    // the ring is free again: it holds the 16 × 16 group sums
    mpo_sum(part, y, I1 * I2, (int)gridDim.x, (int)((long long)n4 * j / tail), (int)((long long)n4 * (j + 1) / tail), (float4*)mf_sm, [] { mf_bar(); });
    // the last of them resets the counters for the next replay of the step
    if (threadIdx.x == 0 && atomicAdd(&cnt[1], 1u) == (unsigned)tail - 1) {
        cnt[0] = 0;
        cnt[1] = 0;
    }
#else
    __trap();  // compiled out below sm_90: the host never launches it there
#endif
}
#define MPOF(NK, MT)                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * (MF_CW + 1), 1) step_mpof_##NK##_##MT(                 \
        const unsigned short* __restrict__ x, const unsigned short* __restrict__ w, float* __restrict__ part, \
        int I1, int I2, int J1, int J2, int I1p, int I2p, int J1p, int J2p, int chi, int slots,              \
        unsigned short* __restrict__ y, unsigned* cnt, int tail) {                                            \
        mpof<NK, MT>(x, w, part, I1, I2, J1, J2, I1p, I2p, J1p, J2p, chi, slots, y, cnt, tail);             \
    }
#define MPOF_MT(NK) MPOF(NK, 1) MPOF(NK, 2) MPOF(NK, 3) MPOF(NK, 4) MPOF(NK, 5) MPOF(NK, 6) MPOF(NK, 7) MPOF(NK, 8)
MPOF_MT(1) MPOF_MT(2) MPOF_MT(3) MPOF_MT(4)
// y (bf16, n values, n % 4 == 0) = Σ of `parts` partials (f32, parts × n) of step_mpof. Grid:
// ceil(n / 64), 256 threads: 16 float4 columns × 16 partial groups per block.
extern "C" __global__ void step_mpo_sum(const float* __restrict__ part, unsigned short* __restrict__ y, int n, int parts) {
    __shared__ float4 red[16 * 16];
    pdl_launch_next(); pdl_wait();
    mpo_sum(part, y, n, parts, (int)blockIdx.x * 16, min((int)blockIdx.x * 16 + 16, n / 4), red, [] { __syncthreads(); });
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

/// A linear layer as the step runs it: W, or A·B with the B product into `t` first; `q`, `qa`,
/// `qb`: how each weight is stored (bf16 or int8 codes, see [`Q8`]).
enum Lin {
    Dense { w: u64, rows: usize, cols: usize, q: Q8 },
    LowRank { a: u64, b: u64, rows: usize, rank: usize, cols: usize, t: Tensor, qa: Q8, qb: Q8 },
    /// an MPO layer as its two halves (`linear::MpoHalves`): Z = X Rᵀ into the decoder's
    /// `mpo_z`, then y = L Z, both cuBLAS GEMMs
    Mpo(MpoHalves),
    /// an MPO layer at batch 1 in one launch of `step_mpof` (partials into the decoder's
    /// `mpo_part`), then `step_mpo_sum`
    MpoFused(MpoFused),
}

impl Lin {
    /// A dense or low-rank layer's products from `x` into `y`: W (or B into `t`) onto `first`, and
    /// A (from `t`) onto `second`, which runs after `first`; `false` for an MPO layer.
    fn push_products(&self, x: u64, y: u64, first: &mut Vec<Product>, second: &mut Vec<Product>) -> crate::Result<bool> {
        match self {
            Lin::Dense { w, rows, cols, q } => first.push(Product { w: *w, x, y, rows: *rows, cols: *cols, ldx: *cols, q: *q }),
            Lin::LowRank { a, b, rows, rank, cols, t, qa, qb } => {
                let t = tensor_addr(t)?;
                first.push(Product { w: *b, x, y: t, rows: *rank, cols: *cols, ldx: *cols, q: *qb });
                second.push(Product { w: *a, x: t, y, rows: *rows, cols: *rank, ldx: *rank, q: *qa });
            }
            Lin::Mpo(_) | Lin::MpoFused(_) => return Ok(false),
        }
        Ok(true)
    }
}

/// An MPO layer in the fused kernel's layout, with its launch shape.
struct MpoFused {
    f: MpoFusedLayout,
    /// the kernel compiled for its loop counts (`step_mpof_NK_MT`)
    name: String,
    grid: u32,
    slots: u32,
    smem: u32,
    /// blocks that add the partials up at the end of the launch (`COMPACTOR_MPO_TAIL`; 0: a
    /// `step_mpo_sum` launch does), with their two counters (u32, zero between launches)
    tail: u32,
    cnt: Tensor,
}

/// Whether later decoders run MPO layers at batch 1 in the fused kernel (`COMPACTOR_MPO_FUSED=0`:
/// the two cuBLAS GEMMs instead).
static MPO_FUSED: Switch = Switch::new("COMPACTOR_MPO_FUSED");

/// Turns the fused MPO kernel on or off for later decoders.
pub fn set_mpo_fused(on: bool) {
    MPO_FUSED.set(on)
}

/// `halves` as one `step_mpof` launch where the kernel takes its shapes (see STEP_SRC) on this
/// GPU (sm_90+, enough shared memory), else `None`.
fn mpo_fused(halves: &MpoHalves) -> crate::Result<Option<MpoFused>> {
    use cudarc::driver::sys::{CUdevice_attribute as A, CUfunction_attribute as F};
    const CW: usize = 8; // MF_CW
    let candle_core::Device::Cuda(dev) = halves.l.device() else { return Ok(None) };
    let (i1p, i2p) = (halves.i1.next_multiple_of(16), halves.i2.next_multiple_of(16));
    // warps per i2 tile (S), each taking NK k steps of j1: J1p padded to a multiple of 16·S
    let tiles = i2p / 16;
    let splits = (CW / tiles).min(halves.j1.div_ceil(16));
    // the kernel's body exists only in the sm_90 build of the module (see `gpu::gemv_ptx`)
    if !MPO_FUSED.get() || !crate::gpu::pdl_capable(dev) || tiles > CW || splits == 0 || i1p > 16 * 8 || halves.j2 % 8 != 0 || (halves.i1 * halves.i2) % 4 != 0 {
        return Ok(None);
    }
    let nk = halves.j1.next_multiple_of(16 * splits) / 16 / splits;
    if nk > 4 {
        return Ok(None);
    }
    let f = halves.fused_layout(16 * splits)?;
    let name = format!("step_mpof_{nk}_{}", f.i1p / 16);
    let chunk = 2 * f.w.dim(1)?;
    let fixed = 2 * f.j1p * (f.j2p + 8);
    let func = kernel(dev, &name)?;
    let ctx = dev.cuda_stream().context().clone();
    let optin = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).map_err(ce("device attribute"))? as usize;
    let most = optin.saturating_sub(func.get_attribute(F::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES).map_err(ce("kernel attribute"))? as usize);
    // chunks in flight per block (`COMPACTOR_MPO_SLOTS`): 4 decoded the synthetic Granite-8B's tt
    // plan at 187.3 tok/s on an H200, 8 at 180.1, up to 16 (what fits) at 180.5
    static SLOTS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let max_slots = crate::gpu::env_usize("COMPACTOR_MPO_SLOTS", &SLOTS, 4);
    let slots = (most.saturating_sub(fixed) / (chunk + 16)).min(max_slots).min(f.chi);
    if slots < 2.min(f.chi) || slots * chunk < (4 * i1p * i2p).max(4096) {
        return Ok(None);
    }
    let smem = slots * chunk + fixed + 16 * slots;
    func.set_attribute(F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, most as i32).map_err(ce("kernel attribute"))?;
    let sms = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(ce("device attribute"))? as usize;
    let grid = sms.min(f.chi).max(1) as u32;
    // not yet measured on a GPU: off unless asked for
    static TAIL: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let tail = (crate::gpu::env_usize("COMPACTOR_MPO_TAIL", &TAIL, 0) as u32).min(grid);
    let cnt = Tensor::zeros(2, DType::U32, halves.l.device())?;
    Ok(Some(MpoFused { f, name, grid, slots: slots as u32, smem: smem as u32, tail, cnt }))
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
    /// f32 scratch for the fused MPO layers' partial sums (`None` without them)
    mpo_part: Option<Tensor>,
    graph: Option<cudarc::driver::CudaGraph>,
    /// kernel kinds left out of the step (`COMPACTOR_STEP_SKIP`, comma-separated: norm, attend,
    /// silu, products, head): for timing what each costs only — the logits are then wrong
    skip: Vec<String>,
    /// the model (a clone: its weights stay alive while the graph points into them)
    model: Model,
    /// weights made for the step (bf16 copies of int8 ones at cuBLAS batches, see `lin`)
    _keep: Vec<Tensor>,
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

/// The step's form of `l` at `batch` rows; tensors it makes for the step go to `keep` (which the
/// decoder holds while the graph points into them).
fn lin(l: &Linear, batch: usize, keep: &mut Vec<Tensor>) -> crate::Result<Option<Lin>> {
    if l.bias().is_some() {
        return Ok(None);
    }
    Ok(match l {
        Linear::Dense { w, .. } => {
            let (rows, cols) = w.dims2()?;
            if !usable(&[w], cols)? {
                return Ok(None);
            }
            Some(Lin::Dense { w: tensor_addr(w)?, rows, cols, q: Q8::BF16 })
        }
        Linear::LowRank { a, b, .. } => {
            let (rows, rank) = a.dims2()?;
            let cols = b.dim(1)?;
            if rank % 8 != 0 || !usable(&[a, b], cols)? {
                return Ok(None);
            }
            let t = Tensor::zeros((batch, rank), DType::BF16, a.device())?;
            Some(Lin::LowRank { a: tensor_addr(a)?, b: tensor_addr(b)?, rows, rank, cols, t, qa: Q8::BF16, qb: Q8::BF16 })
        }
        // where the bf16 products run on cuBLAS (above the CUDA-core batches; it streams them
        // fastest there, and the int8 kinds ran 2.3–3× slower than bf16 at batch 16 on an H200)
        // the step keeps bf16 copies of int8 weights: speed over memory at large batches
        Linear::Int8 { a, b, rank, .. } if int8_as_bf16(batch) => {
            let (a, b) = (a.dequantize(DType::BF16)?, b.as_ref().map(|b| b.dequantize(DType::BF16)).transpose()?);
            let copy = match b {
                None => Linear::Dense { w: a, bias: None },
                Some(b) => Linear::LowRank { a, b, rank: *rank, bias: None },
            };
            let out = lin(&copy, batch, keep)?;
            keep.extend(copy.factors().into_iter().cloned());
            out
        }
        Linear::Int8 { a, b, .. } => {
            let (Some((wa, qa)), (rows, inner)) = (int8_operand(a)?, a.dims()?) else { return Ok(None) };
            match b {
                None => Some(Lin::Dense { w: wa, rows, cols: inner, q: qa }),
                Some(b) => {
                    let Some((wb, qb)) = int8_operand(b)? else { return Ok(None) };
                    let t = Tensor::zeros((batch, inner), DType::BF16, a.codes.device())?;
                    Some(Lin::LowRank { a: wa, b: wb, rows, rank: inner, cols: b.dims()?.1, t, qa, qb })
                }
            }
        }
        Linear::Mpo { cores, .. } => {
            // no cut that pays (more bytes or more work than the cores): candle ops for the model
            let Some(halves) = MpoHalves::new(cores)? else { return Ok(None) };
            if !usable(&[&halves.l, &halves.r], 8)? {
                return Ok(None);
            }
            if batch == 1 {
                if let Some(f) = mpo_fused(&halves)? {
                    return Ok(Some(Lin::MpoFused(f)));
                }
            }
            Some(Lin::Mpo(halves))
        }
        _ => None,
    })
}

/// An int8 weight's codes and scales as the product kernels read them: U8 codes with a multiple
/// of 16 columns at a 16-byte aligned address, groups of 2^k ≥ 16 columns; `None` otherwise.
fn int8_operand(w: &Int8Weight) -> crate::Result<Option<(u64, Q8)>> {
    let (codes, scales) = (&w.codes, &w.scales);
    let (_, cols) = w.dims()?;
    let ok = codes.dtype() == DType::U8 && scales.dtype() == DType::F32 && codes.is_contiguous() && scales.is_contiguous() && cols % 16 == 0 && w.group.is_power_of_two() && w.group >= 16;
    if !ok {
        return Ok(None);
    }
    let at = tensor_addr(codes)?;
    if at % 16 != 0 {
        return Ok(None);
    }
    Ok(Some((at, Q8 { sc: tensor_addr(scales)?, gs: w.group.trailing_zeros(), sg: scales.dim(1)? as u32 })))
}

/// Whether a decoder of `batch` rows runs int8 weights from bf16 copies (the batches whose bf16
/// products run on cuBLAS), not from their codes.
pub fn int8_as_bf16(batch: usize) -> bool {
    gemv_mode(batch) == 0
}

/// Whether gate and up can run as pairs of one fused launch (same kind, shape and storage: a
/// pair's two rows share one kernel and group size).
fn pairable(g: &Lin, u: &Lin) -> bool {
    let same = |p: &Q8, q: &Q8| p.is_int8() == q.is_int8() && p.gs == q.gs && p.sg == q.sg;
    match (g, u) {
        (Lin::Dense { rows, cols, q, .. }, Lin::Dense { rows: r2, cols: c2, q: q2, .. }) => rows == r2 && cols == c2 && same(q, q2),
        (Lin::LowRank { rows, rank, cols, qa, qb, .. }, Lin::LowRank { rows: r2, rank: k2, cols: c2, qa: qa2, qb: qb2, .. }) => {
            rows == r2 && rank == k2 && cols == c2 && same(qa, qa2) && same(qb, qb2)
        }
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
        let mut keep = Vec::new();
        for (l, block) in model.blocks.iter().enumerate() {
            let mut lins = Vec::with_capacity(7);
            for role in Role::ALL {
                match lin(block.linear(role), batch, &mut keep)? {
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
        let Some(lm_head) = lin(&model.lm_head, batch, &mut keep)? else { return Ok(None) };
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
        let all_lins = || std::iter::once(&lm_head).chain(layers.iter().flat_map(|l| &l.lins));
        let z_len = all_lins().map(|l| if let Lin::Mpo(h) = l { batch * h.j1 * h.chi * h.i2 } else { 0 }).max().unwrap_or(0);
        let mpo_z = if z_len > 0 { Some(Tensor::zeros(z_len, DType::BF16, device)?) } else { None };
        // one f32 scratch for the fused MPO layers' partial sums
        let part_len = all_lins().map(|l| if let Lin::MpoFused(m) = l { m.grid as usize * m.f.i1 * m.f.i2 } else { 0 }).max().unwrap_or(0);
        let mpo_part = if part_len > 0 { Some(Tensor::zeros(part_len, DType::F32, device)?) } else { None };
        let any_mpo = z_len > 0 || part_len > 0;
        if mode == 0 || z_len > 0 {
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
            mpo_part,
            graph: None,
            skip: std::env::var("COMPACTOR_STEP_SKIP").map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()).unwrap_or_default(),
            model: model.clone(),
            _keep: keep,
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
                    let p = Product { w: r, x, y: z, rows: h.chi * h.i2, cols: h.j2, ldx: h.j2, q: Q8::BF16 };
                    crate::gpu::cublas_product(&self.dev, self.batch * h.j1, &p)?;
                    crate::gpu::cublas_mpo_left(&self.dev, self.batch, l, z, y, h.i1, h.i2, h.j1 * h.chi)?;
                }
                Lin::MpoFused(m) => {
                    use Arg::{I, P};
                    let part = tensor_addr(self.mpo_part.as_ref().ok_or_else(|| crate::Error::Invalid("decoder: no MPO partials".into()))?)?;
                    let f = &m.f;
                    let dims = [f.i1, f.i2, f.j1, f.j2, f.i1p, f.i2p, f.j1p, f.j2p, f.chi, m.slots as usize].map(|v| I(v as i32));
                    let mut args = vec![P(x), P(tensor_addr(&f.w)?), P(part)];
                    args.extend(dims);
                    args.extend([P(y), P(tensor_addr(&m.cnt)?), I(m.tail as i32)]);
                    self.launch(&m.name, (m.grid, 1), 32 * 9, m.smem, &args)?;
                    if m.tail == 0 {
                        let n = f.i1 * f.i2;
                        self.launch("step_mpo_sum", (n.div_ceil(64) as u32, 1), 256, 0, &[P(part), P(y), I(n as i32), I(m.grid as i32)])?;
                    }
                }
                Lin::Dense { .. } | Lin::LowRank { .. } => {
                    l.push_products(x, y, &mut first, &mut second)?;
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
        let p = |w: u64, x: u64, y: u64, rows: usize, cols: usize, q: &Q8| Product { w, x, y, rows, cols, ldx: cols, q: *q };
        if out == Out::Glu {
            match (lins[0], lins[1]) {
                (Lin::Dense { w, rows, cols, q }, Lin::Dense { w: w2, q: q2, .. }) => {
                    launch_fused(dev, nb, &[p(*w, x, ys[0], *rows, *cols, q)], &[Pair { w: *w2, x, sc: q2.sc }], norm, Out::Glu)?
                }
                (Lin::LowRank { a, b, rows, rank, cols, t, qa, qb }, Lin::LowRank { a: a2, b: b2, t: t2, qa: qa2, qb: qb2, .. }) => {
                    let (t, t2) = (tensor_addr(t)?, tensor_addr(t2)?);
                    let first = [p(*b, x, t, *rank, *cols, qb), p(*b2, x, t2, *rank, *cols, qb2)];
                    let second = [p(*a, t, ys[0], *rows, *rank, qa)];
                    launch_fused(dev, nb, &first, &[], norm, Out::Store)?;
                    launch_fused(dev, nb, &second, &[Pair { w: *a2, x: t2, sc: qa2.sc }], None, Out::Glu)?;
                }
                _ => return Err(crate::Error::Invalid("fused step: gate and up differ in kind".into())),
            }
            return Ok(());
        }
        let mut first = Vec::new();
        let mut second = Vec::new();
        for (l, &y) in lins.iter().zip(ys) {
            // `Decoder::new` runs a model with MPO layers unfused
            if !l.push_products(x, y, &mut first, &mut second)? {
                return Err(crate::Error::Invalid("fused step: an MPO layer".into()));
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

