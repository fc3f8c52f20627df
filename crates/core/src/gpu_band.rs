//! First stage of the two-stage symmetric eigensolver: dense → band on the GPU (feature `cuda`).
//!
//! cuSOLVER's `syevd` tridiagonalizes in one stage: every column reads the whole trailing matrix
//! (BLAS2), ~83 ms for one 4096² Gram on an H200 however many streams run. Two stages move that
//! work into GEMMs: panel by panel (b columns), a Householder QR of the panel below the band
//! ([`BAND_SRC`]'s `panel_qr`, one block) gives Q = I − V T Vᵀ, and the trailing matrix becomes
//! Qᵀ A Q = A − W Vᵀ − V Wᵀ with X = A V T, W = X − ½ V (Tᵀ Vᵀ X) (seven cuBLAS SGEMMs). What
//! is left is a band of half-width b, 4 KB per row at most, downloaded and finished on the CPU
//! by `compactor_decomp::band` (bulge chasing); the tridiagonal's eigenvalues come from bisection
//! on the GPU (`tridiag_bisect`, one thread per eigenvalue). Values only; f32 on the GPU for the
//! first stage, f64 after.
//!
//! Layout: the Gram is symmetric, so its row-major buffer is read as column-major (cuBLAS's
//! order); the full matrix is kept and updated (both triangles), the band is its lower part.

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use cudarc::cublas::sys as cb;
use cudarc::driver::DevicePtrMut;

use crate::gpu::{arg, ce, input_copy, launch_raw};
use std::sync::OnceLock;

type CResult<T> = candle_core::Result<T>;

/// The panel QR, band gather and bisection kernels: a module of their own, small, because every
/// spectra worker (one per host core) loads it on its own stream, and loading means a JIT from
/// PTX (the decode module took ~2 s per worker: granite-tiny's spectra went from 0.8 to 29 s).
pub(crate) const BAND_SRC: &str = r#"
#define PQR_THREADS 1024
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// Householder QR of one panel P (m x b, column-major, leading dimension lda; b <= 32), in place:
// R over its upper triangle, zeros below. V (m x b, ld m): the unit lower trapezoidal reflectors
// with explicit zeros and ones; T (b x b, ld b): upper triangular, Q = I - V T V^T (compact WY).
// Columns past min(b, m) get no reflector (tau 0). One block of PQR_THREADS threads; b <= MAXB.
template <int PQR_MAXB>
__device__ void panel_qr(float* P, int lda, int m, int b, float* V, float* T) {
    __shared__ float red[PQR_THREADS / 32][PQR_MAXB];
    __shared__ float wv[PQR_MAXB];
    __shared__ float taus[PQR_MAXB];
    __shared__ float vtv[PQR_MAXB][PQR_MAXB];
    __shared__ float tm[PQR_MAXB][PQR_MAXB + 1];
    __shared__ float sc[2];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nw = PQR_THREADS / 32;
    const int bb = min(b, m);
    for (int j = 0; j < bb; ++j) {
        float* pj = P + (size_t)j * lda;
        float s = 0.f;
        for (int i = j + 1 + tid; i < m; i += PQR_THREADS) { float x = pj[i]; s += x * x; }
        s = warp_sum(s);
        if (lane == 0) red[warp][0] = s;
        __syncthreads();
        if (tid == 0) {
            float t = 0.f;
            for (int w = 0; w < nw; ++w) t += red[w][0];
            float alpha = pj[j], tau = 0.f, scale = 0.f;
            if (t > 0.f) {
                float beta = -copysignf(sqrtf(alpha * alpha + t), alpha);
                tau = (beta - alpha) / beta;
                scale = 1.f / (alpha - beta);
                pj[j] = beta;
            }
            taus[j] = tau; sc[0] = tau; sc[1] = scale;
        }
        __syncthreads();
        const float tau = sc[0], scale = sc[1];
        float* vj = V + (size_t)j * m;
        for (int i = tid; i < m; i += PQR_THREADS) {
            if (i < j) vj[i] = 0.f;
            else if (i == j) vj[i] = 1.f;
            else { vj[i] = pj[i] * scale; pj[i] = 0.f; }
        }
        __syncthreads();
        if (tau == 0.f) continue;
        float acc[PQR_MAXB];
#pragma unroll
        for (int c = 0; c < PQR_MAXB; ++c) acc[c] = 0.f;
        for (int i = j + tid; i < m; i += PQR_THREADS) {
            const float vi = vj[i];
#pragma unroll
            for (int c = 0; c < PQR_MAXB; ++c)
                if (c > j && c < b) acc[c] += vi * P[(size_t)c * lda + i];
        }
#pragma unroll
        for (int c = 0; c < PQR_MAXB; ++c) {
            if (c > j && c < b) {
                float t = warp_sum(acc[c]);
                if (lane == 0) red[warp][c] = t;
            }
        }
        __syncthreads();
        if (tid > j && tid < b) {
            float t = 0.f;
            for (int w = 0; w < nw; ++w) t += red[w][tid];
            wv[tid] = tau * t;
        }
        __syncthreads();
        for (int i = j + tid; i < m; i += PQR_THREADS) {
            const float vi = vj[i];
            for (int c = j + 1; c < b; ++c) P[(size_t)c * lda + i] -= vi * wv[c];
        }
        __syncthreads();
    }
    for (int j = bb; j < b; ++j) {
        for (int i = tid; i < m; i += PQR_THREADS) V[(size_t)j * m + i] = 0.f;
        if (tid == 0) taus[j] = 0.f;
    }
    __syncthreads();
    // V^T V above the diagonal, one warp per entry
    for (int idx = warp; idx < b * b; idx += nw) {
        const int p = idx / b, q = idx % b;
        if (p >= q) continue;
        const float* vp = V + (size_t)p * m;
        const float* vq = V + (size_t)q * m;
        float t = 0.f;
        for (int i = q + lane; i < m; i += 32) t += vp[i] * vq[i];
        t = warp_sum(t);
        if (lane == 0) vtv[p][q] = t;
    }
    __syncthreads();
    // T column by column: T[j][j] = tau_j, T[0:j, j] = -tau_j T[0:j, 0:j] (V^T v_j)[0:j]
    if (tid == 0) {
        for (int j = 0; j < b; ++j) {
            for (int p = 0; p < b; ++p) tm[p][j] = 0.f;
            const float tau = taus[j];
            tm[j][j] = tau;
            if (tau == 0.f) continue;
            for (int p = 0; p < j; ++p) {
                float t = 0.f;
                for (int q = p; q < j; ++q) t += tm[p][q] * vtv[q][j];
                tm[p][j] = -tau * t;
            }
        }
    }
    __syncthreads();
    for (int idx = tid; idx < b * b; idx += PQR_THREADS) T[idx] = tm[idx % b][idx / b];
}
extern "C" __global__ void __launch_bounds__(PQR_THREADS) panel_qr16(float* P, int lda, int m, int b, float* V, float* T) { panel_qr<16>(P, lda, m, b, V, T); }
extern "C" __global__ void __launch_bounds__(PQR_THREADS) panel_qr32(float* P, int lda, int m, int b, float* V, float* T) { panel_qr<32>(P, lda, m, b, V, T); }
// Eigenvalue k (ascending) of the symmetric tridiagonal matrix (d, squared off-diagonals e2) by
// bisection on [lo, hi] with Sturm counts (the number of negative pivots of LDL^T of T - x),
// `iters` halvings; pivots smaller than pivmin are replaced by -pivmin. One thread per eigenvalue.
extern "C" __global__ void tridiag_bisect(const double* d, const double* e2, int n, double lo, double hi, double pivmin, int iters, double* out) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    double a = lo, b = hi;
    for (int it = 0; it < iters; ++it) {
        const double x = 0.5 * (a + b);
        double q = d[0] - x;
        if (fabs(q) < pivmin) q = -pivmin;
        int c = q < 0.0;
        for (int i = 1; i < n; ++i) {
            q = d[i] - x - e2[i - 1] / q;
            if (fabs(q) < pivmin) q = -pivmin;
            c += q < 0.0;
        }
        if (c > k) b = x; else a = x;
    }
    out[k] = 0.5 * (a + b);
}
// out[c * (b + 1) + d] = A(c + d, c) (column-major A, n x n), 0 past the last row.
extern "C" __global__ void band_gather(const float* A, int n, int b, float* out) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * (b + 1)) return;
    const size_t c = idx / (b + 1), d = idx % (b + 1);
    out[idx] = (c + d < (size_t)n) ? A[c * n + c + d] : 0.f;
}
"#;

/// A kernel of [`BAND_SRC`] on `dev` (compiled with NVRTC once per process, loaded once per
/// device handle by candle).
fn kernel(dev: &candle_core::cuda::CudaDevice, name: &str) -> CResult<cudarc::driver::CudaFunction> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    let ptx = PTX
        .get_or_init(|| {
            let opts = cudarc::nvrtc::CompileOptions { arch: Some("compute_80"), ..Default::default() };
            cudarc::nvrtc::compile_ptx_with_opts(BAND_SRC, opts).map(|p| p.to_src()).map_err(|e| format!("{e:?}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("compiling the band kernels with NVRTC: {e}")))?;
    Ok(dev.get_or_load_custom_func(name, "compactor_band", ptx)?.into_cuda_function())
}

/// Largest half-width the panel kernel takes.
pub const MAX_BAND: usize = 32;

/// Half-width of the band (`COMPACTOR_BAND`, default 16): the GPU's panels get cheaper with a
/// wider band, the CPU's bulge chase dearer (≈ 6 n² b flops).
pub fn band_width() -> usize {
    static B: OnceLock<usize> = OnceLock::new();
    crate::gpu::env_usize("COMPACTOR_BAND", &B, 16).clamp(2, MAX_BAND)
}

struct BandReduce {
    b: usize,
}

#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(h: cb::cublasHandle_t, ta: bool, tb: bool, m: usize, n: usize, k: usize, alpha: f32, a: u64, lda: usize, b: u64, ldb: usize, beta: f32, c: u64, ldc: usize) -> CResult<()> {
    let op = |t: bool| if t { cb::cublasOperation_t::CUBLAS_OP_T } else { cb::cublasOperation_t::CUBLAS_OP_N };
    unsafe { cb::cublasSgemm_v2(h, op(ta), op(tb), m as i32, n as i32, k as i32, &alpha, a as *const f32, lda as i32, b as *const f32, ldb as i32, &beta, c as *mut f32, ldc as i32) }
        .result()
        .map_err(ce("cublasSgemm"))
}

impl CustomOp1 for BandReduce {
    fn name(&self) -> &'static str {
        "compactor-band-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::gpu::cuda_only("band_reduce")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CResult<(CudaStorage, Shape)> {
        let (n, n2) = l.shape().dims2()?;
        let b = self.b;
        if n != n2 || !l.is_contiguous() || !(1..=MAX_BAND).contains(&b) || n * n > i32::MAX as usize {
            candle_core::bail!("band_reduce: expected a contiguous square matrix and 1 ≤ b ≤ {MAX_BAND}, got {:?}, b = {b}", l.shape());
        }
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let mut a = input_copy::<f32>(s, l, n * n, 0)?;
        // V, X1, X (n × b each), T, U, S (b × b each)
        let mut ws = stream.alloc_zeros::<f32>(3 * n * b + 3 * b * b).map_err(ce("alloc"))?;
        let mut out = unsafe { stream.alloc::<f32>(n * (b + 1)) }.map_err(ce("alloc"))?;
        let panel = kernel(&dev, if b <= 16 { "panel_qr16" } else { "panel_qr32" })?;
        let gather = kernel(&dev, "band_gather")?;
        let blas = dev.cublas_handle();
        let h = *blas.handle();
        {
            let (ap, _ga) = a.device_ptr_mut(&stream);
            let (wp, _gw) = ws.device_ptr_mut(&stream);
            let (op, _go) = out.device_ptr_mut(&stream);
            let f = 4u64;
            let (v, x1, x) = (wp, wp + f * (n * b) as u64, wp + 2 * f * (n * b) as u64);
            let (t, u, sm) = (wp + 3 * f * (n * b) as u64, wp + f * (3 * n * b + b * b) as u64, wp + f * (3 * n * b + 2 * b * b) as u64);
            let mut c0 = 0usize;
            while c0 + b + 1 < n {
                let r0 = c0 + b;
                let m = n - r0;
                let mut pp = ap + f * (c0 * n + r0) as u64;
                let (mut lda, mut mi, mut bi) = (n as i32, m as i32, b as i32);
                let (mut vp, mut tp) = (v, t);
                let mut params = [arg(&mut pp), arg(&mut lda), arg(&mut mi), arg(&mut bi), arg(&mut vp), arg(&mut tp)];
                // SAFETY: the arguments match `panel_qr16/32`'s parameters; every buffer is n·b or
                // b·b floats as the kernel reads and writes them.
                unsafe {
                    launch_raw(&dev, &panel, (1, 1), 1024, 0, &mut params, false)?;
                    let a22 = ap + f * (r0 * n + r0) as u64;
                    sgemm(h, false, false, m, b, m, 1.0, a22, n, v, m, 0.0, x1, m)?; // X1 = A V
                    sgemm(h, false, false, m, b, b, 1.0, x1, m, t, b, 0.0, x, m)?; // X = A V T
                    sgemm(h, true, false, b, b, m, 1.0, v, m, x, m, 0.0, u, b)?; // U = Vᵀ X
                    sgemm(h, true, false, b, b, b, 1.0, t, b, u, b, 0.0, sm, b)?; // S = Tᵀ U
                    sgemm(h, false, false, m, b, b, -0.5, v, m, sm, b, 1.0, x, m)?; // W = X − ½ V S
                    sgemm(h, false, true, m, m, b, -1.0, x, m, v, m, 1.0, a22, n)?; // A −= W Vᵀ
                    sgemm(h, false, true, m, m, b, -1.0, v, m, x, m, 1.0, a22, n)?; // A −= V Wᵀ
                }
                c0 += b;
            }
            let total = n * (b + 1);
            let (mut apc, mut ni, mut bi, mut opc) = (ap, n as i32, b as i32, op);
            let mut params = [arg(&mut apc), arg(&mut ni), arg(&mut bi), arg(&mut opc)];
            // SAFETY: matches `band_gather`; `out` holds n·(b+1) floats.
            unsafe { launch_raw(&dev, &gather, (total.div_ceil(256) as u32, 1), 256, 0, &mut params, false)? };
        }
        drop(a);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, b + 1))))
    }
}

/// The lower band (n × (b+1): row c holds B(c, c), B(c+1, c), …, B(c+b, c), zeros past the
/// last row) of a band matrix orthogonally similar to the symmetric f32 matrix `g` (n × n, CUDA).
pub fn band_reduce(g: &Tensor, b: usize) -> CResult<Tensor> {
    g.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&BandReduce { b })
}

/// All eigenvalues (ascending, f64) of the symmetric f32 matrix `g` on a CUDA device: dense →
/// band on the GPU ([`band_reduce`]), band → tridiagonal on the CPU (this thread, bulge
/// chasing), the tridiagonal's eigenvalues on the GPU again ([`tridiagonal_eigenvalues`]).
pub fn eigvals_two_stage(g: &Tensor, b: usize) -> CResult<Vec<f64>> {
    let n = g.dim(0)?;
    let band = band_reduce(g, b)?.flatten_all()?;
    crate::gpu::settle_tensor(&band)?;
    let band = band.to_vec1::<f32>()?;
    let (d, e) = compactor_decomp::band::band_to_tridiagonal_f32(n, b, &band).map_err(|e| candle_core::Error::Msg(format!("band → tridiagonal of a {n}×{n} Gram matrix: {e}")))?;
    match g.device() {
        candle_core::Device::Cuda(dev) => tridiagonal_eigenvalues(dev, &d, &e),
        _ => candle_core::bail!("eigvals_two_stage: CUDA tensors only"),
    }
}

/// Eigenvalues (ascending) of the symmetric tridiagonal matrix (diagonal `d`, subdiagonal `e`)
/// by bisection on the GPU, one thread per eigenvalue, to f64 precision (Gershgorin interval,
/// halved until its width is ~2 ulp of its largest end). The QL iteration the CPU uses instead
/// is latency-bound (~0.2 s for n = 4096, one thread); this takes the work off the host cores,
/// which the bulge chase of the other workers needs.
pub fn tridiagonal_eigenvalues(dev: &candle_core::cuda::CudaDevice, d: &[f64], e: &[f64]) -> CResult<Vec<f64>> {
    let n = d.len();
    if n == 0 || e.len() + 1 != n {
        candle_core::bail!("tridiagonal_eigenvalues: order {n} with {} off-diagonal values", e.len());
    }
    let e2: Vec<f64> = e.iter().map(|x| x * x).chain(std::iter::once(0.0)).collect();
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for i in 0..n {
        let r = e.get(i).map_or(0.0, |x| x.abs()) + if i > 0 { e[i - 1].abs() } else { 0.0 };
        lo = lo.min(d[i] - r);
        hi = hi.max(d[i] + r);
    }
    if !(lo.is_finite() && hi.is_finite()) {
        candle_core::bail!("tridiagonal_eigenvalues: the matrix holds a non-finite value");
    }
    let pivmin = f64::MIN_POSITIVE * e2.iter().fold(1.0f64, |m, &x| m.max(x));
    let big = lo.abs().max(hi.abs()).max(f64::MIN_POSITIVE);
    let pad = 4.0 * f64::EPSILON * big + 2.0 * pivmin;
    let (mut lo, mut hi) = (lo - pad, hi + pad);
    let iters = ((hi - lo) / (2.0 * f64::EPSILON * big)).log2().ceil().clamp(1.0, 64.0) as i32;
    let stream = dev.cuda_stream();
    let dd = stream.clone_htod(d).map_err(ce("upload"))?;
    let ee = stream.clone_htod(&e2).map_err(ce("upload"))?;
    let mut out = unsafe { stream.alloc::<f64>(n) }.map_err(ce("alloc"))?;
    let func = kernel(dev, "tridiag_bisect")?;
    {
        use cudarc::driver::DevicePtr;
        let (dp, _g1) = dd.device_ptr(&stream);
        let (ep, _g2) = ee.device_ptr(&stream);
        let (op, _g3) = out.device_ptr_mut(&stream);
        let (mut dp, mut ep, mut op, mut ni, mut pm, mut it) = (dp, ep, op, n as i32, pivmin, iters);
        let mut params = [arg(&mut dp), arg(&mut ep), arg(&mut ni), arg(&mut lo), arg(&mut hi), arg(&mut pm), arg(&mut it), arg(&mut op)];
        // SAFETY: the arguments match `tridiag_bisect`; d, e2 and out hold n doubles.
        unsafe { launch_raw(dev, &func, (n.div_ceil(128) as u32, 1), 128, 0, &mut params, false)? };
    }
    crate::gpu::settle(&stream)?;
    let mut vals = stream.clone_dtoh(&out).map_err(ce("download"))?;
    vals.sort_by(|a, b| a.total_cmp(b));
    Ok(vals)
}
