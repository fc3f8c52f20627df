//! CUDA linear algebra for the pipeline and batch-≤16 GEMV kernels for decode (feature `cuda`).
//!
//! Factorizations on the GPU follow one pattern: the Gram matrix of the smaller side (a cuBLAS
//! GEMM through candle, f32), then a symmetric eigensolver on it, then GEMMs to form the factors.
//! The weight never leaves the device between upload and the download of the factors; one host
//! sync per eigensolve (to read `info`). Weights are read with `pread` into a
//! page-locked buffer per thread and uploaded in their stored dtype; factors come back the same
//! way ([`download_bytes`]).
//! - [`singular_values`]: σ_i = sqrt(λ_i(Gram)), values only: the two-stage solver of
//!   [`crate::gpu_band`] (`syevd` with `COMPACTOR_EIGH=syevd` and below order 256).
//! - [`truncated_svd`]: top-r eigen-subspace of the Gram ([`crate::gpu_filter`] from order 2048,
//!   cuSOLVER's `syevdx` below; see [`vector_source`]); A = U_r Σ_r, B = V_rᵀ (the CPU form).
//! - [`tt_svd`]: TT-SVD (left to right), each bond a truncated left factor of the unfolding.
//!
//! Decode: [`launch_products`] computes `y = x Wᵀ` for bf16 W (m × n, n % 8 == 0) and up to 16
//! rows of x in one pass over W, for up to four products per launch (a grouped launch: q/k/v or
//! gate/up of one layer, or the A factors of several low-rank layers). CUDA cores: 16-byte loads,
//! 1–8 warps per 1–2 rows so that few, long rows still fill the GPU; tensor cores:
//! `mma.m16n8k16`, 16 rows per block of 8 warps that split the columns. On compute capability 9.0+
//! the kernels are programmatic dependent launches: each lets the next start early, and loads its
//! first weights before it waits for the previous kernel's output. [`gemv`] and [`low_rank_gemv`]
//! are the candle ops the model uses; `decode_stack` schedules whole stacks (grouped, as a CUDA
//! graph). `COMPACTOR_GEMV=0|1|2|3`: cuBLAS, CUDA-core, tensor-core, auto (default);
//! `COMPACTOR_PDL=0` turns programmatic launches off. Per-launch host cost matters at decode: the
//! kernels are looked up once, the intermediate uses a per-stream scratch buffer, and cudarc's
//! event tracking is off (see [`single_stream`]).

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use cudarc::cusolver::{safe::DnHandle, sys as cs};
use cudarc::driver::DevicePtrMut;
use half::bf16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

type CResult<T> = candle_core::Result<T>;

/// The CPU side of the custom ops here: they run on CUDA tensors only.
pub(crate) fn cuda_only<T>(op: &str) -> CResult<T> {
    Err(candle_core::Error::Msg(format!("{op}: a CUDA operation, called on CPU tensors")))
}

pub(crate) fn ce<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> candle_core::Error + '_ {
    move |e| candle_core::Error::Msg(format!("{what}: {e:?}"))
}

/// Loads candle's kernel modules once each, on a background thread, as soon as a CUDA device is
/// opened (`COMPACTOR_PREWARM=0`: not). They ship as PTX, which the driver compiles for the GPU
/// the first time a module is loaded on a machine and then caches on disk (`~/.nv/ComputeCache`).
/// The driver compiles one module at a time (loads from several threads finish one after
/// another), ~17 s for these nine on a fresh H200 host, binary alone ~7 s; unwarmed, each
/// compile happens when a fit first needs the module, on the fits' critical path. The svd plan
/// of the synthetic Granite-8B with the cache emptied before each run, interleaved on one fresh
/// H200 host (2026-12-01): 33.0 / 33.1 s with this one-thread prewarm (cast, reduce and unary
/// first), 33.5 / 39.9 s with one thread per module (`COMPACTOR_PREWARM=parallel`), 37.8 /
/// 36.6 s without; 13.3 s once cached, when each load takes milliseconds. Between hosts the
/// cold runs vary more than that (29.1 s without a prewarm on another one). The convolution and
/// quantized-matmul modules, which no Compactor GPU path uses, are left out.
pub(crate) fn prewarm_modules(ordinal: usize) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let mode = std::env::var("COMPACTOR_PREWARM").unwrap_or_default();
        if mode == "0" {
            return;
        }
        use candle_core::cuda::kernels as k;
        let start = std::time::Instant::now();
        let order = [
            ("cast", k::CAST),
            ("reduce", k::REDUCE),
            ("unary", k::UNARY),
            ("indexing", k::INDEXING),
            ("binary", k::BINARY),
            ("ternary", k::TERNARY),
            ("affine", k::AFFINE),
            ("fill", k::FILL),
            ("sort", k::SORT),
        ]
        .map(|(name, m)| (name, m.ptx()));
        let load = move |mods: &[(&str, &'static str)]| {
            let Ok(ctx) = cudarc::driver::CudaContext::new(ordinal) else { return };
            for &(name, ptx) in mods {
                let t0 = start.elapsed().as_secs_f64();
                let r = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map(drop);
                if timing_on() {
                    let state = if r.is_ok() { "loaded" } else { "failed to load" };
                    eprintln!("prewarm: candle's {name} module {state}, {t0:.2} s → {:.2} s after the device opened", start.elapsed().as_secs_f64());
                }
            }
        };
        // detached: loads still running when the job ends only cost a CPU thread.
        // `COMPACTOR_PREWARM=parallel`: one thread per module (for comparison)
        if mode == "parallel" {
            for m in order {
                let _ = std::thread::Builder::new().name("compactor-prewarm".into()).spawn(move || load(&[m]));
            }
        } else {
            let _ = std::thread::Builder::new().name("compactor-prewarm".into()).spawn(move || load(&order));
        }
    });
}

/// The first `len` elements of a custom op's contiguous input, copied into a new buffer of
/// `len + extra` elements on the input's stream (the solvers work in place and must leave the
/// input alone); the `extra` tail (room for eigenvalues, say) is zeroed.
pub(crate) fn input_copy<T>(s: &CudaStorage, l: &Layout, len: usize, extra: usize) -> CResult<cudarc::driver::CudaSlice<T>>
where
    T: candle_core::cuda::CudaDType + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
{
    let stream = s.device().cuda_stream();
    let src = s.as_cuda_slice::<T>()?.slice(l.start_offset()..l.start_offset() + len);
    let mut a = unsafe { stream.alloc::<T>(len + extra) }.map_err(ce("alloc"))?;
    stream.memcpy_dtod(&src, &mut a.slice_mut(0..len)).map_err(ce("copy"))?;
    if extra > 0 {
        stream.memset_zeros(&mut a.slice_mut(len..len + extra)).map_err(ce("memset"))?;
    }
    Ok(a)
}

/// Phase timing of the GPU fits (`COMPACTOR_GPU_TIMING=1`): each [`lap`] syncs the stream and
/// adds the time since the previous lap of this thread to a phase; [`for_each_ordered`] prints
/// the sums (over all streams) at the end.
const PHASES: [&str; 6] = ["upload", "gram", "eigh", "factors", "download", "error"];
static PHASE_NS: [std::sync::atomic::AtomicU64; 6] = [const { std::sync::atomic::AtomicU64::new(0) }; 6];

thread_local! {
    static LAST_LAP: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

fn timing_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("COMPACTOR_GPU_TIMING").map(|v| v == "1").unwrap_or(false))
}

/// Ends phase `phase` (an index into PHASES; `None` starts a new job) on `dev`.
pub fn lap(dev: &candle_core::Device, phase: Option<usize>) {
    if !timing_on() {
        return;
    }
    let _ = dev.synchronize();
    let now = std::time::Instant::now();
    LAST_LAP.with(|l| {
        if let (Some(p), Some(t)) = (phase, l.get()) {
            PHASE_NS[p].fetch_add((now - t).as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        l.set(Some(now));
    });
}

/// cuSOLVER handles by the CUDA stream they run on.
static SOLVERS: OnceLock<Mutex<HashMap<usize, Arc<DnHandle>>>> = OnceLock::new();

/// One cuSOLVER handle per CUDA stream (creating one costs milliseconds), kept until
/// [`forget_solver`] (a handle holds its stream: without that, every worker stream of every
/// [`for_each_ordered`] call would live as long as the process — the desktop app's).
pub(crate) fn solver(stream: &Arc<cudarc::driver::CudaStream>) -> CResult<Arc<DnHandle>> {
    let key = stream.cu_stream() as usize;
    let mut map = SOLVERS.get_or_init(Default::default).lock().unwrap();
    if let Some(h) = map.get(&key) {
        return Ok(h.clone());
    }
    let h = Arc::new(DnHandle::new(stream.clone()).map_err(ce("cusolverDnCreate"))?);
    map.insert(key, h.clone());
    Ok(h)
}

/// Drops the cuSOLVER handle of `dev`'s stream, if it has one (its worker is done with it).
fn forget_solver(dev: &candle_core::Device) {
    if let (candle_core::Device::Cuda(c), Some(map)) = (dev, SOLVERS.get()) {
        map.lock().unwrap().remove(&(c.cuda_stream().cu_stream() as usize));
    }
}

/// Symmetric eigendecomposition of an n×n f32 matrix: output (n+1) × n, rows 0..n the
/// eigenvectors (row j = v_j, ascending λ; garbage without `vectors`), row n the eigenvalues.
/// With `top` = r > 0 only the r largest pairs are computed (`syevdx`, vectors only): rows 0..r
/// and the first r values of row n hold them, ascending; the other rows are garbage.
struct Eigh {
    vectors: bool,
    top: usize,
}

impl CustomOp1 for Eigh {
    fn name(&self) -> &'static str {
        "compactor-eigh"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        cuda_only("eigh")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CResult<(CudaStorage, Shape)> {
        let (n, n2) = l.shape().dims2()?;
        if n != n2 || !l.is_contiguous() {
            candle_core::bail!("eigh: expected a contiguous square matrix, got {:?}", l.shape());
        }
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let mut out = input_copy::<f32>(s, l, n * n, n)?;
        let h = solver(&stream)?;
        let jobz = if self.vectors { cs::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR } else { cs::cusolverEigMode_t::CUSOLVER_EIG_MODE_NOVECTOR };
        let uplo = cs::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
        let ni = n as i32;
        let mut info = stream.alloc_zeros::<i32>(1).map_err(ce("alloc"))?;
        let top = if self.vectors && self.top > 0 && self.top < n { self.top as i32 } else { 0 };
        // syevdx (the top `top` pairs) or syevd (all): same buffers, same workspace steps
        let range = cs::cusolverEigRange_t::CUSOLVER_EIG_RANGE_I;
        let (il, iu) = (ni - top + 1, ni);
        {
            let (a_ptr, _ga) = out.device_ptr_mut(&stream);
            let w_ptr = a_ptr + (n * n * 4) as u64;
            let (a, w) = (a_ptr as *mut f32, w_ptr as *mut f32);
            let (mut lwork, mut meig) = (0i32, 0i32);
            if top > 0 {
                unsafe { cs::cusolverDnSsyevdx_bufferSize(h.cu(), jobz, range, uplo, ni, a, ni, 0.0, 0.0, il, iu, &mut meig, w, &mut lwork) }.result().map_err(ce("cusolverDnSsyevdx_bufferSize"))?;
            } else {
                unsafe { cs::cusolverDnSsyevd_bufferSize(h.cu(), jobz, uplo, ni, a, ni, w, &mut lwork) }.result().map_err(ce("cusolverDnSsyevd_bufferSize"))?;
            }
            let mut work = stream.alloc_zeros::<f32>(lwork.max(1) as usize).map_err(ce("alloc"))?;
            let (wk, _gw) = work.device_ptr_mut(&stream);
            let (ip, _gi) = info.device_ptr_mut(&stream);
            let (wk, ip) = (wk as *mut f32, ip as *mut i32);
            if top > 0 {
                unsafe { cs::cusolverDnSsyevdx(h.cu(), jobz, range, uplo, ni, a, ni, 0.0, 0.0, il, iu, &mut meig, w, wk, lwork, ip) }.result().map_err(ce("cusolverDnSsyevdx"))?;
                if meig != top {
                    candle_core::bail!("cusolverDnSsyevdx returned {meig} eigenpairs of a {n}×{n} Gram matrix, asked for {top}");
                }
            } else {
                unsafe { cs::cusolverDnSsyevd(h.cu(), jobz, uplo, ni, a, ni, w, wk, lwork, ip) }.result().map_err(ce("cusolverDnSsyevd"))?;
            }
        }
        settle(&stream)?;
        let code = stream.clone_dtoh(&info).map_err(ce("info"))?[0];
        if code != 0 {
            candle_core::bail!("cuSOLVER's eigensolver failed (info = {code}) on a {n}×{n} Gram matrix");
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n + 1, n))))
    }
}

/// Eigenvalues of `k` symmetric n×n f32 matrices stacked as (k·n) × n, in one batched cuSOLVER
/// call (`cusolverDnXsyevBatched`): output k × n, each row ascending; with `vectors`, (k·n + k) ×
/// n: matrix i's eigenvectors in rows i·n..(i+1)·n (row j = v_j), then the k rows of values.
struct SyevBatched {
    k: usize,
    vectors: bool,
}

impl CustomOp1 for SyevBatched {
    fn name(&self) -> &'static str {
        "compactor-syev-batched"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        cuda_only("eigvals_batched")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CResult<(CudaStorage, Shape)> {
        let (kn, n) = l.shape().dims2()?;
        let k = self.k;
        if k == 0 || kn != k * n || !l.is_contiguous() || (n * n).checked_mul(k).is_none_or(|t| t > i32::MAX as usize) {
            candle_core::bail!("eigvals_batched: {k} matrices in a {kn}×{n} stack (n·n·k ≤ 2³¹ − 1)");
        }
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        // with vectors the values follow the vectors in one buffer, the op's output
        let mut a = input_copy::<f32>(s, l, k * n * n, if self.vectors { k * n } else { 0 })?;
        let mut w = unsafe { stream.alloc::<f32>(if self.vectors { 1 } else { k * n }) }.map_err(ce("alloc"))?;
        let mut info = stream.alloc_zeros::<i32>(k).map_err(ce("alloc"))?;
        let h = solver(&stream)?;
        let jobz = if self.vectors { cs::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR } else { cs::cusolverEigMode_t::CUSOLVER_EIG_MODE_NOVECTOR };
        let uplo = cs::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
        let f32t = cs::cudaDataType::CUDA_R_32F;
        let mut params: cs::cusolverDnParams_t = std::ptr::null_mut();
        unsafe { cs::cusolverDnCreateParams(&mut params) }.result().map_err(ce("cusolverDnCreateParams"))?;
        let res = (|| -> CResult<()> {
            let (ap, _ga) = a.device_ptr_mut(&stream);
            let (wp, _gw) = w.device_ptr_mut(&stream);
            let wp = if self.vectors { ap + (k * n * n * 4) as u64 } else { wp };
            let (ip, _gi) = info.device_ptr_mut(&stream);
            let (mut dev_bytes, mut host_bytes) = (0usize, 0usize);
            let (ni, ki) = (n as i64, k as i64);
            unsafe { cs::cusolverDnXsyevBatched_bufferSize(h.cu(), params, jobz, uplo, ni, f32t, ap as *const _, ni, f32t, wp as *const _, f32t, &mut dev_bytes, &mut host_bytes, ki) }
                .result()
                .map_err(ce("cusolverDnXsyevBatched_bufferSize"))?;
            let mut work = unsafe { stream.alloc::<u8>(dev_bytes.max(1)) }.map_err(ce("alloc"))?;
            let (wk, _gk) = work.device_ptr_mut(&stream);
            let mut host = vec![0u8; host_bytes.max(1)];
            unsafe { cs::cusolverDnXsyevBatched(h.cu(), params, jobz, uplo, ni, f32t, ap as *mut _, ni, f32t, wp as *mut _, f32t, wk as *mut _, dev_bytes, host.as_mut_ptr() as *mut _, host_bytes, ip as *mut i32, ki) }
                .result()
                .map_err(ce("cusolverDnXsyevBatched"))?;
            // the host workspace must outlive the call's work on the stream
            stream.synchronize().map_err(ce("sync"))?;
            Ok(())
        })();
        unsafe { cs::cusolverDnDestroyParams(params) };
        res?;
        if let Some(bad) = stream.clone_dtoh(&info).map_err(ce("info"))?.iter().position(|&c| c != 0) {
            candle_core::bail!("cusolverDnXsyevBatched failed on matrix {bad} of {k} ({n}×{n})");
        }
        Ok(if self.vectors {
            (CudaStorage::wrap_cuda_slice(a, dev), Shape::from((k * n + k, n)))
        } else {
            (CudaStorage::wrap_cuda_slice(w, dev), Shape::from((k, n)))
        })
    }
}

/// Eigenvalues (k × n, rows ascending) of the k symmetric n×n f32 matrices stacked in `g`
/// ((k·n) × n), in one batched eigensolver call.
pub fn eigvals_batched(g: &Tensor, k: usize) -> CResult<Tensor> {
    g.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&SyevBatched { k, vectors: false })
}

/// [`eigvals_batched`] with eigenvectors: (values k × n, vectors (k·n) × n, matrix i's in rows
/// i·n..(i+1)·n, row j = v_j, ascending).
pub fn eigh_batched(g: &Tensor, k: usize) -> CResult<(Tensor, Tensor)> {
    let n = g.dim(1)?;
    let out = g.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&SyevBatched { k, vectors: true })?;
    Ok((out.narrow(0, k * n, k)?, out.narrow(0, 0, k * n)?))
}

/// Eigenvalues (ascending, length n) and, if asked, eigenvectors (row j = v_j) of a symmetric
/// f32 matrix on a CUDA device.
pub fn eigh(g: &Tensor, vectors: bool) -> CResult<(Tensor, Option<Tensor>)> {
    let n = g.dim(0)?;
    let out = g.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&Eigh { vectors, top: 0 })?;
    let vals = out.narrow(0, n, 1)?.squeeze(0)?;
    Ok((vals, if vectors { Some(out.narrow(0, 0, n)?) } else { None }))
}

/// Gram matrix of the smaller side: `(W Wᵀ, true)` if m ≤ n, else `(Wᵀ W, false)`.
fn gram(w: &Tensor) -> CResult<(Tensor, bool)> {
    let (m, n) = w.dims2()?;
    Ok(if m <= n { (w.matmul(&w.t()?)?, true) } else { (w.t()?.matmul(w)?, false) })
}

/// Whether the spectra use the two-stage eigensolver ([`crate::gpu_band`]) for Grams of order
/// ≥ 256 (default) or cuSOLVER's `syevd` throughout (`COMPACTOR_EIGH=syevd`).
pub fn two_stage() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("COMPACTOR_EIGH").map(|v| v != "syevd").unwrap_or(true))
}

/// Worker streams for [`for_each_ordered`] over [`singular_values`]: with the two-stage solver
/// each worker also runs a CPU second stage (~0.5 s for a 4096² Gram), so one per host core.
pub fn spectra_streams() -> usize {
    if two_stage() {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4).clamp(4, 16)
    } else {
        4
    }
}

/// All min(m, n) singular values of an f32 matrix on the GPU, descending.
pub fn singular_values(w: &Tensor) -> CResult<Vec<f64>> {
    let (g, _) = gram(w)?;
    lap(w.device(), Some(1));
    let n = g.dim(0)?;
    let mut s: Vec<f64> = if two_stage() && n >= 256 {
        crate::gpu_band::eigvals_two_stage(&g, crate::gpu_band::band_width())?.iter().map(|&v| v.max(0.0).sqrt()).collect()
    } else {
        let (vals, _) = eigh(&g, false)?;
        settle_tensor(&vals)?;
        vals.to_vec1::<f32>()?.iter().map(|&v| (v.max(0.0) as f64).sqrt()).collect()
    };
    lap(w.device(), Some(2));
    s.reverse();
    Ok(s)
}

/// How the fits get the top-r eigenvectors of a Gram matrix (`COMPACTOR_EIGH_VECTORS`):
/// `filter` (default) — [`crate::gpu_filter`]'s Chebyshev-filtered subspace iteration for Grams
/// of order ≥ 2048, cuSOLVER's `syevdx` below that and wherever the filter does not apply (at
/// order 1024 `syevdx` is as fast in the plans and exact: measured on an H200, 2026-12-01);
/// `filter-all` — the filter from order 16 up (to check it on small models); `filter:N` — from
/// order N up; `syevdx` — the top r pairs from cuSOLVER; `syevd` — all pairs from cuSOLVER.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorSource {
    Filter { min_order: usize },
    Syevdx,
    Syevd,
}

/// [`VectorSource`] from `COMPACTOR_EIGH_VECTORS` (unset or empty: the default); an unknown
/// value is an error that names it, so that a mistyped experiment does not run the default.
pub fn vector_source() -> CResult<VectorSource> {
    static MODE: OnceLock<Result<VectorSource, String>> = OnceLock::new();
    MODE.get_or_init(|| parse_vector_source(&std::env::var("COMPACTOR_EIGH_VECTORS").unwrap_or_default()))
        .clone()
        .map_err(candle_core::Error::Msg)
}

fn parse_vector_source(v: &str) -> Result<VectorSource, String> {
    let filter_from = |n: &str| n.parse::<usize>().ok().filter(|&n| n >= 16).map(|min_order| VectorSource::Filter { min_order });
    match v {
        "" | "filter" => Ok(VectorSource::Filter { min_order: 2048 }),
        "filter-all" => Ok(VectorSource::Filter { min_order: 16 }),
        "syevdx" => Ok(VectorSource::Syevdx),
        "syevd" => Ok(VectorSource::Syevd),
        _ => v.strip_prefix("filter:").and_then(filter_from).ok_or_else(|| {
            format!("COMPACTOR_EIGH_VECTORS=`{v}`: expected filter, filter-all, filter:N (N ≥ 16), syevdx or syevd")
        }),
    }
}

#[cfg(test)]
mod vector_source_tests {
    use super::{parse_vector_source, VectorSource};

    #[test]
    fn parses_every_documented_value_and_names_a_bad_one() {
        assert_eq!(parse_vector_source(""), Ok(VectorSource::Filter { min_order: 2048 }));
        assert_eq!(parse_vector_source("filter"), Ok(VectorSource::Filter { min_order: 2048 }));
        assert_eq!(parse_vector_source("filter-all"), Ok(VectorSource::Filter { min_order: 16 }));
        assert_eq!(parse_vector_source("filter:1024"), Ok(VectorSource::Filter { min_order: 1024 }));
        assert_eq!(parse_vector_source("syevdx"), Ok(VectorSource::Syevdx));
        assert_eq!(parse_vector_source("syevd"), Ok(VectorSource::Syevd));
        for bad in ["filter:8", "filter:", "filter:x", "syevj", "Filter"] {
            let e = parse_vector_source(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
    }
}

/// The top `r` eigenvectors of a symmetric matrix as rows, largest first (r × n): only those
/// (`syevdx`) if `partial`, else all of them (`syevd`).
pub fn top_eigenvectors(g: &Tensor, r: usize, partial: bool) -> CResult<Tensor> {
    let n = g.dim(0)?;
    let top = if partial && r < n { r } else { 0 };
    let out = g.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&Eigh { vectors: true, top })?;
    // ascending rows end at row `top` (syevdx) or n (syevd)
    let last = if top > 0 { top } else { n };
    let idx: Vec<u32> = (0..r).map(|i| (last - 1 - i) as u32).collect();
    out.index_select(&Tensor::from_vec(idx, r, g.device())?, 0)
}

/// The top `r` eigenvectors (rows, largest first; an orthonormal basis of about their span with
/// the filter, see [`vector_source`]) of the Gram matrix of `w`'s smaller side, and
/// whether that side is the left one (W Wᵀ: left singular vectors; else right ones).
fn top_gram_vectors(w: &Tensor, r: usize) -> CResult<(Tensor, bool)> {
    let (g, left) = gram(w)?;
    lap(w.device(), Some(1));
    let n = g.dim(0)?;
    let top = match vector_source()? {
        VectorSource::Filter { min_order } if n >= min_order => match crate::gpu_filter::top_subspace(&g, r, 0x5eed ^ ((n as u64) << 24) ^ r as u64)? {
            Some(t) => t,
            None => top_eigenvectors(&g, r, true)?,
        },
        VectorSource::Syevd => top_eigenvectors(&g, r, false)?,
        _ => top_eigenvectors(&g, r, true)?,
    };
    lap(w.device(), Some(2));
    Ok((top, left))
}

/// Leading left factor of `c` (rows × cols): `(U rows×r with orthonormal columns, Uᵀ c r×cols)`.
pub fn left_truncate(c: &Tensor, r: usize) -> CResult<(Tensor, Tensor)> {
    let (top, left) = top_gram_vectors(c, r)?;
    if left {
        // U = topᵀ, next = Uᵀ c
        Ok((top.t()?.contiguous()?, top.matmul(c)?))
    } else {
        // V_r = topᵀ; c V_r = U Σ; next = Σ V_rᵀ
        let us = c.matmul(&top.t()?)?;
        let s = us.sqr()?.sum_keepdim(0)?.sqrt()?; // 1 × r
        let u = us.broadcast_div(&s.clamp(1e-30, f64::MAX)?)?;
        Ok((u, top.broadcast_mul(&s.t()?)?))
    }
}

/// Rank-r truncated SVD in the CPU's form: A = U_r Σ_r (m × r), B = V_rᵀ (r × n).
pub fn truncated_svd(w: &Tensor, r: usize) -> CResult<(Tensor, Tensor)> {
    let (top, left) = top_gram_vectors(w, r)?;
    if left {
        // P = U_rᵀ W = Σ V_rᵀ: σ_j = ‖P_j‖, B = P / σ, A = U_r σ
        let p = top.matmul(w)?;
        let s = p.sqr()?.sum_keepdim(1)?.sqrt()?; // r × 1
        let b = p.broadcast_div(&s.clamp(1e-30, f64::MAX)?)?;
        let a = top.t()?.broadcast_mul(&s.t()?)?.contiguous()?;
        Ok((a, b))
    } else {
        Ok((w.matmul(&top.t()?)?, top))
    }
}

/// TT-SVD of W (m × n) into MPO cores (χ_{t-1}, m_t, n_t, χ_t), bond t capped at `caps[t]`.
pub fn tt_svd(w: &Tensor, row_dims: &[usize], col_dims: &[usize], caps: &[usize]) -> CResult<Vec<Tensor>> {
    let k = row_dims.len();
    let mut shape = row_dims.to_vec();
    shape.extend_from_slice(col_dims);
    let perm: Vec<usize> = (0..k).flat_map(|t| [t, k + t]).collect();
    let mut c = w.reshape(shape)?.permute(perm)?.contiguous()?.flatten_all()?;
    let mut chi = 1usize;
    let mut cores = Vec::with_capacity(k);
    for t in 0..k - 1 {
        let rows = chi * row_dims[t] * col_dims[t];
        let cols = c.elem_count() / rows;
        let r = caps[t].min(rows).min(cols);
        let (u, next) = left_truncate(&c.reshape((rows, cols))?, r)?;
        cores.push(u.reshape((chi, row_dims[t], col_dims[t], r))?);
        c = next;
        chi = r;
    }
    cores.push(c.reshape((chi, row_dims[k - 1], col_dims[k - 1], 1))?);
    Ok(cores)
}

/// ‖W − Ŵ‖_F / ‖W‖_F on the device.
pub fn rel_error(w: &Tensor, w_hat: &Tensor) -> CResult<f64> {
    let r = total(&(w - w_hat)?.sqr()?)?;
    let t = total(&w.sqr()?)?;
    Ok((r / t.max(f64::MIN_POSITIVE)).sqrt())
}


/// Device address of a tensor's first element (f32, bf16, f16 or u32 on CUDA).
pub fn tensor_addr(t: &Tensor) -> CResult<u64> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(c) = &*s else { candle_core::bail!("expected a CUDA tensor") };
    let dev = c.device();
    let base = match c.dtype() {
        DType::F32 => addr(dev, &c.as_cuda_slice::<f32>()?.slice(..)),
        DType::BF16 => addr(dev, &c.as_cuda_slice::<bf16>()?.slice(..)),
        DType::F16 => addr(dev, &c.as_cuda_slice::<half::f16>()?.slice(..)),
        DType::U32 => addr(dev, &c.as_cuda_slice::<u32>()?.slice(..)),
        DType::U8 => addr(dev, &c.as_cuda_slice::<u8>()?.slice(..)),
        other => candle_core::bail!("tensor_addr: dtype {other:?}"),
    };
    Ok(base + (l.start_offset() * t.dtype().size_in_bytes()) as u64)
}

thread_local! {
    /// This thread's page-locked staging buffers: [0] uploads (write-combined), [1] downloads.
    static STAGING: std::cell::RefCell<[Option<cudarc::driver::PinnedHostSlice<u8>>; 2]> = const { std::cell::RefCell::new([None, None]) };
}

/// Runs `f` on this thread's staging buffer `which` (see STAGING), grown to `len` bytes if needed.
/// Copies from and to page-locked memory run at the bus's speed and from several threads at
/// once; pageable ones go through the driver's own staging, one thread at a time.
fn with_staging<R, E: From<candle_core::Error>>(dev: &candle_core::cuda::CudaDevice, which: usize, len: usize, f: impl FnOnce(&mut [u8]) -> Result<R, E>) -> Result<R, E> {
    STAGING.with(|st| {
        let mut st = st.borrow_mut();
        let slot = &mut st[which];
        if slot.as_ref().is_none_or(|b| b.len() < len) {
            *slot = None;
            let ctx = dev.cuda_stream().context().clone();
            let flags = if which == 0 { cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED } else { 0 };
            *slot = Some(unsafe { ctx.alloc_pinned_with_flags::<u8>(len.max(1 << 20), flags) }.map_err(ce("cuMemHostAlloc"))?);
        }
        let buf = slot.as_mut().expect("allocated").as_mut_slice().map_err(ce("pinned buffer"))?;
        f(&mut buf[..len])
    })
}

/// A stored tensor uploaded in its stored dtype: read with `pread` into page-locked memory, then
/// one asynchronous copy (no page faults on the mapping, no pageable copy).
fn upload(ck: &crate::Checkpoint, name: &str, dtype: DType, shape: &[usize], dev: &candle_core::cuda::CudaDevice) -> crate::Result<Tensor> {
    let len = shape.iter().product::<usize>() * dtype.size_in_bytes();
    with_staging(dev, 0, len, |buf| -> crate::Result<Tensor> {
        ck.read_into(name, buf)?;
        let stream = dev.cuda_stream();
        fn copy_in<T: cudarc::driver::DeviceRepr>(dev: &candle_core::cuda::CudaDevice, src: &[u8]) -> CResult<cudarc::driver::CudaSlice<T>> {
            let stream = dev.cuda_stream();
            let mut d = unsafe { dev.alloc::<T>(src.len() / std::mem::size_of::<T>())? };
            let (p, _g) = d.device_ptr_mut(&stream);
            unsafe { cudarc::driver::result::memcpy_htod_async(p, src, stream.cu_stream()) }.map_err(ce("upload"))?;
            drop(_g);
            Ok(d)
        }
        let storage = match dtype {
            DType::BF16 => CudaStorage::wrap_cuda_slice(copy_in::<bf16>(dev, buf)?, dev.clone()),
            DType::F16 => CudaStorage::wrap_cuda_slice(copy_in::<half::f16>(dev, buf)?, dev.clone()),
            DType::F32 => CudaStorage::wrap_cuda_slice(copy_in::<f32>(dev, buf)?, dev.clone()),
            other => return Err(crate::Error::Invalid(format!("upload: dtype {other:?}"))),
        };
        // the staging buffer is refilled by this thread's next upload
        stream.synchronize().map_err(ce("sync"))?;
        Ok(Tensor::from_storage(candle_core::Storage::Cuda(storage), shape.to_vec(), candle_core::op::BackpropOp::none(), false))
    })
}

/// The bytes of a CUDA tensor (made contiguous), copied back through page-locked memory.
pub fn download_bytes(t: &Tensor) -> crate::Result<Vec<u8>> {
    let t = t.contiguous()?;
    let candle_core::Device::Cuda(dev) = t.device() else { return Err(crate::Error::Invalid("download_bytes: not a CUDA tensor".into())) };
    let len = t.elem_count() * t.dtype().size_in_bytes();
    let src = tensor_addr(&t)?;
    with_staging(dev, 1, len, |buf| -> crate::Result<Vec<u8>> {
        let stream = dev.cuda_stream();
        unsafe { cudarc::driver::result::memcpy_dtoh_async(buf, src, stream.cu_stream()) }.map_err(ce("download"))?;
        stream.synchronize().map_err(ce("sync"))?;
        Ok(buf.to_vec())
    })
}

/// Σ of all elements of a matrix, in two passes (row sums, then their sum): candle reduces to a
/// single value with one thread block, which is slow on hundreds of MB.
fn total(t: &Tensor) -> CResult<f64> {
    let t = if t.rank() == 2 { t.clone() } else { t.flatten_all()?.unsqueeze(0)? };
    let s = t.sum(1)?.sum_all()?.to_dtype(DType::F32)?;
    settle_tensor(&s)?;
    Ok(s.to_scalar::<f32>()? as f64)
}

/// Waits for `stream`'s work before a small copy to pageable host memory. Such a copy is
/// synchronous and goes through the driver's staging, which the process's threads share: issued
/// behind long GPU work it holds the other workers up. Waiting here first (the workers yield,
/// see `SchedGuard`) leaves the copy only the copy to do: spectra of the synthetic Granite-8B on
/// an H200, 16 workers, 8.8–9.7 s against 11.6 s without the wait (`COMPACTOR_SETTLE=0`; the
/// workers' summed upload phase 16–22 s against 41 s: BENCH-GPU.md, eighth session).
pub(crate) fn settle(stream: &cudarc::driver::CudaStream) -> CResult<()> {
    static OFF: OnceLock<bool> = OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("COMPACTOR_SETTLE").is_ok_and(|v| v == "0")) {
        return Ok(());
    }
    stream.synchronize().map_err(ce("stream synchronize"))
}

/// [`settle`] on the stream of a CUDA tensor's device (nothing on the CPU).
pub(crate) fn settle_tensor(t: &Tensor) -> CResult<()> {
    match t.device() {
        candle_core::Device::Cuda(d) => settle(&d.cuda_stream()),
        _ => Ok(()),
    }
}

/// A weight of the checkpoint as f32 on `device`: uploaded in its stored dtype, converted there,
/// and checked for NaN/Inf there (the CPU loader names the first bad index if there is one).
pub fn load_weight(ck: &crate::Checkpoint, name: &str, device: &candle_core::Device) -> crate::Result<Tensor> {
    lap(device, None);
    let (info, _, path) = ck.raw(name)?;
    let src = crate::checkpoint::float_dtype(&info.dtype)
        .ok_or_else(|| crate::Error::bad(path, format!("tensor `{name}` has dtype {} (expected BF16, F16 or F32)", info.dtype)))?;
    let w = match device {
        candle_core::Device::Cuda(dev) => upload(ck, name, src, &info.shape, dev)?,
        _ => return Err(crate::Error::Invalid("load_weight needs a CUDA device".into())),
    };
    let w = w.to_dtype(DType::F32)?;
    // x − x is 0 for every finite x and NaN otherwise
    #[allow(clippy::eq_op)]
    let probe = total(&(&w - &w)?)?;
    if probe != 0.0 {
        ck.tensor(name, DType::F32, &candle_core::Device::Cpu)?;
        return Err(crate::Error::bad(path, format!("tensor `{name}` holds a non-finite value (NaN or Inf)")));
    }
    lap(device, Some(0));
    Ok(w)
}

/// Worker streams for the fits: 8 (the filter's Lanczos steps and small downloads leave gaps
/// that other workers' uploads and GEMMs fill; an H200 svd plan took 14.5 s on 8 against 23.2 s
/// on 4). `COMPACTOR_GPU_STREAMS` overrides it.
pub const FIT_STREAMS: usize = 8;

/// Most worker threads [`for_each_ordered`] runs.
pub const MAX_WORKERS: usize = 32;

/// How the threads of `dev`'s context wait for the GPU while [`for_each_ordered`] runs:
/// `COMPACTOR_GPU_SCHED` = `spin`, `yield` or `block` (default `yield`): workers that wait on
/// their stream give their core to the ones running a CPU stage. The context's own policy (CUDA
/// spins while it has fewer contexts than cores) comes back on drop: decode steps want it.
struct SchedGuard(Option<Arc<cudarc::driver::CudaContext>>);

impl SchedGuard {
    fn new(dev: &candle_core::Device) -> crate::Result<Self> {
        use cudarc::driver::sys::CUctx_flags as F;
        let candle_core::Device::Cuda(d) = dev else { return Ok(SchedGuard(None)) };
        let flags = match std::env::var("COMPACTOR_GPU_SCHED").as_deref() {
            Ok("spin") => return Ok(SchedGuard(None)),
            Ok("block") => F::CU_CTX_SCHED_BLOCKING_SYNC,
            Ok("yield") | Err(_) => F::CU_CTX_SCHED_YIELD,
            Ok(other) => return Err(crate::Error::Invalid(format!("COMPACTOR_GPU_SCHED={other}: expected spin, yield or block"))),
        };
        let ctx = d.cuda_stream().context().clone();
        ctx.set_flags(flags).map_err(ce("cuCtxSetFlags"))?;
        Ok(SchedGuard(Some(ctx)))
    }
}

impl Drop for SchedGuard {
    fn drop(&mut self) {
        if let Some(ctx) = &self.0 {
            let _ = ctx.set_flags(cudarc::driver::sys::CUctx_flags::CU_CTX_SCHED_AUTO);
        }
    }
}

/// Runs `fit(i, device)` for every i in `todo` on several worker threads, each with its own CUDA
/// stream on `device`'s GPU (eigensolves of one matrix leave most of the GPU idle), and hands
/// the results to `sink` in `todo`'s order on this thread. `COMPACTOR_GPU_STREAMS` (default
/// `streams`: [`FIT_STREAMS`] for the fits; [`spectra_streams`] for the two-stage spectra, whose second stage
/// runs on the worker's CPU thread), at most [`MAX_WORKERS`].
pub fn for_each_ordered<T: Send>(
    device: &candle_core::Device,
    streams: usize,
    todo: &[usize],
    fit: &(dyn Fn(usize, &candle_core::Device) -> crate::Result<T> + Sync),
    sink: &mut dyn FnMut(usize, T) -> crate::Result<()>,
    progress: &dyn crate::progress::Progress,
) -> crate::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let ordinal = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => return Err(crate::Error::Invalid("for_each_ordered needs a CUDA device".into())),
    };
    let streams = std::env::var("COMPACTOR_GPU_STREAMS").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(streams).clamp(1, MAX_WORKERS).min(todo.len().max(1));
    let _sched = SchedGuard::new(device)?;
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| -> crate::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, crate::Result<T>)>(streams);
        for _ in 0..streams {
            let tx = tx.clone();
            let (next, stop) = (&next, &stop);
            scope.spawn(move || {
                let dev = match candle_core::Device::new_cuda_with_stream(ordinal) {
                    Ok(d) => {
                        single_stream(&d);
                        d
                    }
                    Err(e) => {
                        let _ = tx.send((usize::MAX, Err(e.into())));
                        return;
                    }
                };
                loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    if k >= todo.len() || stop.load(Ordering::SeqCst) || progress.cancelled() {
                        break;
                    }
                    if tx.send((k, fit(todo[k], &dev))).is_err() {
                        break;
                    }
                }
                forget_solver(&dev);
            });
        }
        drop(tx);
        let mut pending = std::collections::BTreeMap::new();
        let mut want = 0usize;
        let result = (|| -> crate::Result<()> {
            for (k, res) in rx.iter() {
                pending.insert(k, res?);
                while let Some(v) = pending.remove(&want) {
                    crate::progress::check(progress)?;
                    sink(todo[want], v)?;
                    want += 1;
                }
            }
            crate::progress::check(progress)?;
            if want < todo.len() {
                return Err(crate::Error::Invalid(format!("GPU workers stopped after {want} of {} layers", todo.len())));
            }
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        // drain so that blocked workers can finish
        drop(rx);
        if timing_on() {
            let parts: Vec<String> = PHASES.iter().zip(&PHASE_NS).map(|(n, t)| format!("{n} {:.2} s", t.load(Ordering::Relaxed) as f64 / 1e9)).collect();
            eprintln!("GPU phases over {streams} streams (summed): {}", parts.join(", "));
        }
        result
    })
}

/// Turns off cudarc's per-buffer event tracking on `dev`'s context. Compactor gives every CUDA
/// device handle one stream and never shares a buffer between streams (each worker of
/// [`for_each_ordered`] uploads, computes and downloads its own), so the events only cost
/// time: two to three driver calls per kernel argument, which decode steps feel.
pub fn single_stream(dev: &candle_core::Device) {
    if let candle_core::Device::Cuda(c) = dev {
        // SAFETY: see above; no buffer is used on two streams.
        unsafe { c.disable_event_tracking() }
    }
}

// ---------------------------------------------------------------------------------------------
// decode GEMV

const GEMV_SRC: &str = r#"
// Tuning knobs, set at compile time (`COMPACTOR_GEMV_DEFINES`, e.g. "GEMV_P=8:GEMV_MINB=6"):
// GEMV_P column chunks per lane loaded before the PDL wait; GEMV_MINB blocks per SM the
// compiler must fit (a register cap, so that the next launch's blocks fit beside this one's).
#ifndef GEMV_P
#define GEMV_P 4
#endif
// GEMV_PL: the chunks per lane of the long-preload kinds (`_l`, batch ≤ 2), launched where a
// warp's whole share of its rows fits in them but not in GEMV_P.
#ifndef GEMV_PL
#define GEMV_PL 8
#endif
#ifdef GEMV_MINB
#define GEMV_LB __launch_bounds__(256, GEMV_MINB)
#else
#define GEMV_LB
#endif
__device__ __forceinline__ void unpack8(const uint4 v, float* f) {
    f[0] = __uint_as_float(v.x << 16); f[1] = __uint_as_float(v.x & 0xffff0000u);
    f[2] = __uint_as_float(v.y << 16); f[3] = __uint_as_float(v.y & 0xffff0000u);
    f[4] = __uint_as_float(v.z << 16); f[5] = __uint_as_float(v.z & 0xffff0000u);
    f[6] = __uint_as_float(v.w << 16); f[7] = __uint_as_float(v.w & 0xffff0000u);
}
__device__ __forceinline__ unsigned short to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ float bf(unsigned short u) { return __uint_as_float(((unsigned)u) << 16); }
__device__ __forceinline__ float rbf(float f) { return bf(to_bf16(f)); }
// Programmatic dependent launch (sm_90+; no-ops before, and when not launched with it): a kernel
// lets the next one start once all its blocks run, and waits for the previous one to finish only
// where it first reads what that one wrote (x). Weights are never written, so their first loads
// are issued before the wait and overlap the previous kernel's tail.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_next() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
// One product y = x Wᵀ of a launch: W rows x cols (bf16, cols % 8 == 0), x batch x cols with row
// stride ldx, y batch x rows. A launch carries up to 4 products (a grouped launch); its blocks
// are numbered consecutively over the products, product i starting at block first_block.
// The fused kinds (the decode step graph's) also use w2/x2 (a pair's second row: row j of w2
// times x2), nw (norm weights) and s, eps (see `gemv`).
// With int8 weights (the `_w8` module, GEMV_W8 defined) sc / sc2 are the f32 scales of w / w2,
// one per group of 2^gs columns, sg groups a row.
struct Seg { const void* w; const void* x; unsigned short* y; int rows; int cols; int ldx; int split; int first_block; int pad;
             const void* w2; const void* x2; const void* nw; float s; float eps; const float* sc; const float* sc2; int gs; int sg; };
struct Segs { Seg s[4]; int n; int batch; };
__device__ __forceinline__ const Seg& seg_of(const Segs& g, int id, int& blk) {
    int i = 0;
    while (i + 1 < g.n && id >= g.s[i + 1].first_block) i++;
    blk = id - g.s[i].first_block;
    return g.s[i];
}
// A chunk of a row's weights is one 16-byte load: 8 bf16 columns, or (GEMV_W8) 16 int8 codes in
// offset binary (q + 128) whose group scale multiplies the chunk's dot product (w = scale · q,
// symmetric; a group holds whole chunks). CSH: log2 of the columns of a chunk.
#ifdef GEMV_W8
#define CSH 4
#else
#define CSH 3
#endif
// code byte k placed under the exponent of 2^23 is the float 2^23 + q + 128, exactly
__device__ __forceinline__ float code_at(unsigned v, unsigned sel) { return __uint_as_float(__byte_perm(v, 0x4b000000u, sel)) - 8388736.f; }
__device__ __forceinline__ void unpack_codes(unsigned lo, unsigned hi, float* f) {
    f[0] = code_at(lo, 0x7540); f[1] = code_at(lo, 0x7541); f[2] = code_at(lo, 0x7542); f[3] = code_at(lo, 0x7543);
    f[4] = code_at(hi, 0x7540); f[5] = code_at(hi, 0x7541); f[6] = code_at(hi, 0x7542); f[7] = code_at(hi, 0x7543);
}
// acc[r][b] += Σ_k wf[r][k] x'_{r,b}[k] over the 8 columns of x chunk xv (8 bf16 columns), where x'
// is x (every row), or x ⊙ nw with ss[b] += Σ x² (NORM), or row r's own x (SEPX).
template <int B, int R, bool NORM, bool SEPX>
__device__ __forceinline__ void fma8(const float (&wf)[R][8], const uint4* const (&xr)[R], const uint4* nw, int ldx8, int xv, float (&acc)[R][B], float (&ss)[B]) {
    float nf[8];
    if (NORM) unpack8(__ldg(nw + xv), nf);
#pragma unroll
    for (int b = 0; b < B; b++) {
        if (SEPX) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                float xf[8];
                unpack8(__ldg(xr[r] + (size_t)b * ldx8 + xv), xf);
#pragma unroll
                for (int k = 0; k < 8; k++) acc[r][b] = fmaf(wf[r][k], xf[k], acc[r][b]);
            }
        } else {
            float xf[8];
            unpack8(__ldg(xr[0] + (size_t)b * ldx8 + xv), xf);
            if (NORM) {
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    ss[b] = fmaf(xf[k], xf[k], ss[b]);
                    xf[k] *= nf[k];
                }
            }
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int k = 0; k < 8; k++) acc[r][b] = fmaf(wf[r][k], xf[k], acc[r][b]);
        }
    }
}
// acc[r][b] += the dot products of chunk v of each row (wv[r]) with the inputs (see fma8);
// GEMV_W8: the codes' dot product over the chunk's two halves first, then times scl[r].
template <int B, int R, bool NORM, bool SEPX>
__device__ __forceinline__ void fma_chunk(const uint4 (&wv)[R], const uint4* const (&xr)[R], const uint4* nw, int ldx8, int v, float (&acc)[R][B], float (&ss)[B], const float (&scl)[R]) {
    float wf[R][8];
#ifdef GEMV_W8
    float d[R][B];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int b = 0; b < B; b++) d[r][b] = 0.f;
#pragma unroll
    for (int r = 0; r < R; r++) unpack_codes(wv[r].x, wv[r].y, wf[r]);
    fma8<B, R, NORM, SEPX>(wf, xr, nw, ldx8, 2 * v, d, ss);
#pragma unroll
    for (int r = 0; r < R; r++) unpack_codes(wv[r].z, wv[r].w, wf[r]);
    fma8<B, R, NORM, SEPX>(wf, xr, nw, ldx8, 2 * v + 1, d, ss);
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int b = 0; b < B; b++) acc[r][b] = fmaf(scl[r], d[r][b], acc[r][b]);
#else
#pragma unroll
    for (int r = 0; r < R; r++) unpack8(wv[r], wf[r]);
    fma8<B, R, NORM, SEPX>(wf, xr, nw, ldx8, v, acc, ss);
#endif
}
// The group scales of chunk v of each row (GEMV_W8; bf16 weights have none).
template <int R>
__device__ __forceinline__ void chunk_scales(const float* const (&sr)[R], int v, int gs, float (&scl)[R]) {
#pragma unroll
    for (int r = 0; r < R; r++) {
#ifdef GEMV_W8
        scl[r] = __ldg(sr[r] + (v >> (gs - CSH)));
#else
        scl[r] = 1.f;
#endif
    }
}
// Writes output `row` of input b: a0 (a1: the pair's second row) the dot products, ss Σ x².
template <bool NORM, int OUT>
__device__ __forceinline__ void store(const Seg& s, int row, int b, float a0, float a1, float ss) {
    if (NORM) {
        const float r = rsqrtf(ss / s.cols + s.eps);
        a0 *= r;
        a1 *= r;
    }
    unsigned short* y = s.y + (size_t)b * s.rows + row;
    if (OUT == 0) {
        *y = to_bf16(a0);
    } else if (OUT == 1) {
        float d = rbf(a0);
        if (s.s != 1.f) d = rbf(d * s.s);
        *y = to_bf16(bf(*y) + d);
    } else {
        const float g = rbf(a0), u = rbf(a1);
        *y = to_bf16(rbf(g / (1.f + expf(-g))) * u);
    }
}
// CUDA cores: a block of 8 warps; `split` warps (1, 2, 4 or 8) share a group of R rows, each
// taking every split-th 32-lane column chunk, and add up through shared memory; so matrices with
// few, long rows still keep every SM busy. Plain (NORM = false, OUT = 0): y = x Wᵀ. The fused
// kinds of the decode step graph (batch ≤ 8), each rounding where candle's ops round:
// - NORM: the input is rmsnorm(x) ⊙ nw; x² is summed over the row as it streams by (a warp group
//   sees every column) and the dot products are scaled by rsqrt(mean(x²) + eps) at the end;
// - OUT 1: y is the residual stream, y += s · rbf(x Wᵀ);
// - OUT 2 (R = 2): output j pairs row j of w (times x) with row j of w2 (times x2, or x with
//   NORM): y_j = silu(g) · u — the gate and up products of a block, or their A factors.
template <int B, int R, bool NORM, int OUT, int P>
__device__ void gemv(const Seg& s, int blk) {
    static_assert(OUT != 2 || R == 2, "a pair is two rows");
    constexpr int RG = OUT == 2 ? 1 : R;      // outputs per warp group
    constexpr bool SEPX = OUT == 2 && !NORM;  // the pair's rows read x and x2
    __shared__ float red[8][R][B];
    __shared__ float red_ss[8][B];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int split = s.split, groups = 8 / split;
    const int grp = warp / split, part = warp - grp * split;
    const int rows = s.rows, cols8 = s.cols >> CSH, ldx8 = s.ldx >> 3;  // cols8: chunks a row
    const int row0 = (blk * groups + grp) * RG;
    const uint4* nw = (const uint4*)s.nw;
    float acc[R][B], ss[B];
#pragma unroll
    for (int b = 0; b < B; b++) {
        ss[b] = 0.f;
#pragma unroll
        for (int r = 0; r < R; r++) acc[r][b] = 0.f;
    }
    pdl_launch_next();
    const bool live = row0 < rows;
    const uint4* wr[R];
    const uint4* xr[R];
    const float* sr[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int row = OUT == 2 ? min(row0, rows - 1) : min(row0 + r, rows - 1);
        wr[r] = (const uint4*)(OUT == 2 && r == 1 ? s.w2 : s.w) + (size_t)row * cols8;
        sr[r] = (OUT == 2 && r == 1 ? s.sc2 : s.sc) + (size_t)row * s.sg;
        xr[r] = (const uint4*)(SEPX && r == 1 ? s.x2 : s.x);
    }
    // the first P column chunks of this warp's rows, loaded before waiting for x
    const int v0 = part * 32 + lane, stride = 32 * split;
    uint4 pre[P][R];
#pragma unroll
    for (int p = 0; p < P; p++)
#pragma unroll
        for (int r = 0; r < R; r++) pre[p][r] = (live && v0 + p * stride < cols8) ? __ldcs(wr[r] + v0 + p * stride) : make_uint4(0, 0, 0, 0);
    pdl_wait();
    if (live) {
        float scl[R];
#pragma unroll
        for (int p = 0; p < P; p++)
            if (v0 + p * stride < cols8) {
                chunk_scales<R>(sr, v0 + p * stride, s.gs, scl);
                fma_chunk<B, R, NORM, SEPX>(pre[p], xr, nw, ldx8, v0 + p * stride, acc, ss, scl);
            }
#pragma unroll 4
        for (int v = v0 + P * stride; v < cols8; v += stride) {
            uint4 wv[R];
#pragma unroll
            for (int r = 0; r < R; r++) wv[r] = __ldcs(wr[r] + v);
            chunk_scales<R>(sr, v, s.gs, scl);
            fma_chunk<B, R, NORM, SEPX>(wv, xr, nw, ldx8, v, acc, ss, scl);
        }
    }
#pragma unroll
    for (int b = 0; b < B; b++) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            float t = acc[r][b];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
            acc[r][b] = t;
        }
        if (NORM) {
            float t = ss[b];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
            ss[b] = t;
        }
    }
    if (split == 1) {
        if (lane == 0 && live) {
#pragma unroll
            for (int r = 0; r < RG; r++)
                if (row0 + r < rows)
#pragma unroll
                    for (int b = 0; b < B; b++) store<NORM, OUT>(s, row0 + r, b, acc[r][b], acc[R - 1][b], ss[b]);
        }
        return;
    }
    if (lane == 0) {
#pragma unroll
        for (int b = 0; b < B; b++) {
#pragma unroll
            for (int r = 0; r < R; r++) red[warp][r][b] = acc[r][b];
            red_ss[warp][b] = ss[b];
        }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < groups * RG * B; t += blockDim.x) {
        const int gg = t / (RG * B), rb = t - gg * (RG * B), r = rb / B, b = rb - r * B;
        const int row = (blk * groups + gg) * RG + r;
        if (row < rows) {
            float a0 = 0.f, a1 = 0.f, sq = 0.f;
            for (int p = 0; p < split; p++) {
                const int w = gg * split + p;
                a0 += red[w][r][b];
                if (OUT == 2) a1 += red[w][R - 1][b];
                if (NORM) sq += red_ss[w][b];
            }
            store<NORM, OUT>(s, row, b, a0, a1, sq);
        }
    }
}
#ifndef GEMV_W8
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// Tensor cores, for 1..8 (NT = 1) or 9..16 (NT = 2) inputs. A block of 8 warps owns 16 rows
// of w; its warps split the columns in 32-wide chunks (so short-row and few-row matrices still
// keep many loads in flight) and add up through shared memory. Thread (g = lane/4, c = lane%4)
// loads 8 consecutive columns of rows g and g+8 and of input g (+8): the same permutation of k
// on both operands of mma.m16n8k16, so the dot products are unchanged.
template <int NT>
__device__ void gemv_tc(const Seg& s, int blk, int batch) {
    __shared__ float red[8][16][16];
    pdl_launch_next();
    pdl_wait();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int rows = s.rows, cols = s.cols;
    const int row0 = blk * 16;
    const unsigned short* w = (const unsigned short*)s.w;
    const unsigned short* x = (const unsigned short*)s.x;
    const uint4* wa = (const uint4*)(w + (size_t)min(row0 + g, rows - 1) * cols);
    const uint4* wb = (const uint4*)(w + (size_t)min(row0 + g + 8, rows - 1) * cols);
    const uint4* xr[NT];
    bool xv[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) {
        int bi = g + 8 * t;
        xv[t] = bi < batch;
        xr[t] = (const uint4*)(x + (size_t)(xv[t] ? bi : 0) * s.ldx);
    }
    float acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    const int cols8 = cols >> 3;
    const int chunks = (cols8 + 3) >> 2;
#pragma unroll 4
    for (int ch = warp; ch < chunks; ch += 8) {
        const int v = ch * 4 + c;
        uint4 p = make_uint4(0, 0, 0, 0), q = make_uint4(0, 0, 0, 0);
        if (v < cols8) { p = __ldcs(wa + v); q = __ldcs(wb + v); }
#pragma unroll
        for (int t = 0; t < NT; t++) {
            uint4 r = make_uint4(0, 0, 0, 0);
            if (xv[t] && v < cols8) r = __ldg(xr[t] + v);
            mma16816(acc[t], p.x, q.x, p.y, q.y, r.x, r.y);
            mma16816(acc[t], p.z, q.z, p.w, q.w, r.z, r.w);
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        red[warp][g][8 * t + 2 * c] = acc[t][0];
        red[warp][g][8 * t + 2 * c + 1] = acc[t][1];
        red[warp][g + 8][8 * t + 2 * c] = acc[t][2];
        red[warp][g + 8][8 * t + 2 * c + 1] = acc[t][3];
    }
    __syncthreads();
    const int rr = threadIdx.x >> 4, cc = threadIdx.x & 15;
    if (cc < batch && cc < 8 * NT && row0 + rr < rows) {
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < 8; k++) sum += red[k][rr][cc];
        s.y[(size_t)cc * rows + row0 + rr] = to_bf16(sum);
    }
}
extern "C" __global__ void gemv_tc8(const Segs g) { int blk; const Seg& s = seg_of(g, blockIdx.x, blk); gemv_tc<1>(s, blk, g.batch); }
extern "C" __global__ void gemv_tc16(const Segs g) { int blk; const Seg& s = seg_of(g, blockIdx.x, blk); gemv_tc<2>(s, blk, g.batch); }
#endif
#define GEMVK(NAME, B, R, NORM, OUT) \
    extern "C" __global__ void GEMV_LB NAME##B(const Segs g) { int blk; const Seg& s = seg_of(g, blockIdx.x, blk); gemv<B, R, NORM, OUT, GEMV_P>(s, blk); }
#define GEMVKL(NAME, B, R, NORM, OUT) \
    extern "C" __global__ void GEMV_LB NAME##B##_l(const Segs g) { int blk; const Seg& s = seg_of(g, blockIdx.x, blk); gemv<B, R, NORM, OUT, GEMV_PL>(s, blk); }
// R12: rows of a warp group at batch 1 and 2 (pairs aside): 1, or W8R (2 unless set) for int8
// weights, whose rows are half as long (`gpu::rows_per_warp`)
#ifndef W8R
#define W8R 2
#endif
#ifdef GEMV_W8
#define R12 W8R
#else
#define R12 1
#endif
#define GEMV(B, R) GEMVK(gemv_b, B, R, false, 0)
GEMV(1, R12) GEMV(2, R12) GEMV(3, 2) GEMV(4, 2) GEMV(5, 2) GEMV(6, 2) GEMV(7, 2) GEMV(8, 2)
GEMV(9, 2) GEMV(10, 2) GEMV(11, 2) GEMV(12, 2) GEMV(13, 2) GEMV(14, 2) GEMV(15, 2) GEMV(16, 2)
// the fused kinds (batch ≤ 8): n norm in, r residual out, np norm in and pairs out, p pairs out
#define FUSED(B, R) GEMVK(gemvn_b, B, R, true, 0) GEMVK(gemvr_b, B, R, false, 1) GEMVK(gemvnp_b, B, 2, true, 2) GEMVK(gemvp_b, B, 2, false, 2)
FUSED(1, R12) FUSED(2, R12) FUSED(3, 2) FUSED(4, 2) FUSED(5, 2) FUSED(6, 2) FUSED(7, 2) FUSED(8, 2)
// the long-preload kinds (batch 1 and 2), every one of the above
#define LONG(B) GEMVKL(gemv_b, B, R12, false, 0) GEMVKL(gemvn_b, B, R12, true, 0) GEMVKL(gemvr_b, B, R12, false, 1) GEMVKL(gemvnp_b, B, 2, true, 2) GEMVKL(gemvp_b, B, 2, false, 2)
LONG(1) LONG(2)
"#;

/// Rows of one warp group for batch `b` (must match GEMV_SRC's R12): 2 from batch 3 on; at
/// batch 1–2 one bf16 row, or `COMPACTOR_W8_ROWS` (2 unless set; 1 to 4) int8 rows.
fn rows_per_warp(b: usize, int8: bool) -> usize {
    if b > 2 {
        2
    } else if int8 {
        w8_rows()
    } else {
        1
    }
}

fn w8_rows() -> usize {
    static ROWS: OnceLock<usize> = OnceLock::new();
    env_usize("COMPACTOR_W8_ROWS", &ROWS, 2).clamp(1, 4)
}

/// Warps that share a row group: more where there are few rows of many columns, so that a
/// launch has ~4K warps in flight, but each lane still reads at least 4 chunks of a row. Int8
/// rows (`int8_rows` > 0: the rows a warp group streams) count a lane's chunks over all of them,
/// at least `COMPACTOR_W8_SPLIT_LOADS` (2 unless set; 8 is bf16's rule for 2 rows). On an H200
/// (svd 0.5 with int8 factors, Granite-8B shapes, batch 1, 2026-12-01) 8 / 4 / 2 / 1 gave 352.3 /
/// 327.3 / 328.0 / 323.0 tok/s with the biased code conversion since dropped, and 8 / 2 gave
/// 353.6 / 361.9, 361.1, 362.7, 359.6 with the exact one: the small int8 launches (the rank-1024
/// A factors, the B factors with residual) had 1–2 blocks an SM.
/// The target is `COMPACTOR_SPLIT_WARPS` (4096 unless set): in the decode step graph of the
/// Granite-8B shapes at batch 1 (H100, 2026-11-28) 2048 / 4096 / 8192 / 16384 gave the svd model
/// 268.0 / 272.3 / 258.6 / 263.0 tok/s and the dense one 158.3 / 158.8 / 157.3 / 163.7.
fn split_for(row_groups: usize, chunks: usize, int8_rows: usize) -> usize {
    static TARGET: OnceLock<usize> = OnceLock::new();
    static W8_LOADS: OnceLock<usize> = OnceLock::new();
    let target = env_usize("COMPACTOR_SPLIT_WARPS", &TARGET, 4096);
    let (reads, least) = if int8_rows > 0 { (chunks * int8_rows, env_usize("COMPACTOR_W8_SPLIT_LOADS", &W8_LOADS, 2).max(1)) } else { (chunks, 4) };
    let mut s = 1;
    while s < 8 && row_groups * s < target && reads >= 32 * s * least {
        s *= 2;
    }
    s
}

/// Whether `dev` runs programmatic dependent launches (compute capability 9.0 or later), unless
/// `COMPACTOR_PDL=0`.
pub(crate) fn pdl_capable(dev: &candle_core::cuda::CudaDevice) -> bool {
    static CAP: OnceLock<bool> = OnceLock::new();
    *CAP.get_or_init(|| {
        let major = dev.cuda_stream().context().compute_capability().map(|c| c.0).unwrap_or(0);
        major >= 9 && std::env::var("COMPACTOR_PDL").map(|v| v != "0").unwrap_or(true)
    })
}

/// The decode module's PTX: GEMV_SRC and STEP_SRC, or with `w8` GEMV_SRC alone for int8
/// weights (`GEMV_W8`; compiled at the first decode of a model that has them).
fn gemv_ptx(dev: &candle_core::cuda::CudaDevice, w8: bool) -> CResult<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    static PTX_W8: OnceLock<Result<String, String>> = OnceLock::new();
    if w8 { &PTX_W8 } else { &PTX }.get_or_init(|| {
        let arch = if pdl_capable(dev) { "compute_90" } else { "compute_80" };
        let opts = cudarc::nvrtc::CompileOptions { arch: Some(arch), ..Default::default() };
        let defines: String = std::env::var("COMPACTOR_GEMV_DEFINES")
            .unwrap_or_default()
            .split(|c: char| c.is_whitespace() || c == ':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("#define {}\n", d.replacen('=', " ", 1)))
            .collect();
        let src = if w8 { format!("{defines}#define GEMV_W8 1\n#define W8R {}\n{GEMV_SRC}", w8_rows()) } else { format!("{defines}{GEMV_SRC}{}", crate::gpu_step::STEP_SRC) };
        cudarc::nvrtc::compile_ptx_with_opts(src, opts).map(|p| p.to_src()).map_err(|e| format!("{e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("compiling the GEMV kernel with NVRTC: {e}")))
}

/// Which decode kernel [`gemv`] uses: 0 cuBLAS (no custom kernel), 1 the CUDA-core kernel,
/// 2 the tensor-core kernel, 3 auto (default): the CUDA-core kernel up to 8 rows of input,
/// cuBLAS above (measured on an H200, batch 16: cuBLAS streams the weights fastest).
/// `COMPACTOR_GEMV` sets the start value.
static GEMV_MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// The decode kernel setting (0–3, see [`GEMV_MODE`]), read from `COMPACTOR_GEMV` at first use.
pub fn gemv_setting() -> u8 {
    use std::sync::atomic::Ordering;
    match GEMV_MODE.load(Ordering::Relaxed) {
        u8::MAX => {
            let m = std::env::var("COMPACTOR_GEMV").ok().and_then(|v| v.parse::<u8>().ok()).unwrap_or(3).min(3);
            GEMV_MODE.store(m, Ordering::Relaxed);
            m
        }
        m => m,
    }
}

pub(crate) fn gemv_mode(rows: usize) -> u8 {
    match gemv_setting() {
        3 if rows <= 8 => 1,
        3 => 0,
        m => m,
    }
}

/// See `linear::set_decode_kernel`.
pub fn set_gemv_mode(mode: u8) {
    GEMV_MODE.store(mode.min(3), std::sync::atomic::Ordering::Relaxed);
}

/// A kernel of the decode module on `dev`'s stream, loaded once (looking it up costs a driver
/// call per launch otherwise, which decode steps feel).
pub(crate) fn kernel(dev: &candle_core::cuda::CudaDevice, name: &str) -> CResult<cudarc::driver::CudaFunction> {
    module_kernel(dev, name, false)
}

/// A kernel of the decode module, or with `w8` of its int8-weight form (see [`gemv_ptx`]).
fn module_kernel(dev: &candle_core::cuda::CudaDevice, name: &str, w8: bool) -> CResult<cudarc::driver::CudaFunction> {
    static FUNCS: OnceLock<Mutex<HashMap<(usize, String, bool), cudarc::driver::CudaFunction>>> = OnceLock::new();
    let key = (dev.cuda_stream().cu_stream() as usize, name.to_string(), w8);
    let mut map = FUNCS.get_or_init(Default::default).lock().unwrap();
    if let Some(f) = map.get(&key) {
        return Ok(f.clone());
    }
    let module = if w8 { "compactor_gemv_w8" } else { "compactor_gemv" };
    let f = dev.get_or_load_custom_func(name, module, gemv_ptx(dev, w8)?)?.into_cuda_function();
    map.insert(key, f.clone());
    Ok(f)
}

/// This stream's scratch buffer (bf16) of at least `len` elements, and a guard that holds it.
fn scratch(dev: &candle_core::cuda::CudaDevice, len: usize) -> CResult<(ScratchMap, cudarc::driver::CudaSlice<bf16>)> {
    static BUFS: OnceLock<Mutex<HashMap<usize, cudarc::driver::CudaSlice<bf16>>>> = OnceLock::new();
    let key = dev.cuda_stream().cu_stream() as usize;
    let mut map = BUFS.get_or_init(Default::default).lock().unwrap();
    let buf = match map.remove(&key) {
        Some(b) if b.len() >= len => b,
        _ => unsafe { dev.alloc::<bf16>(len.max(1 << 16))? },
    };
    Ok((map, buf))
}

type ScratchMap = std::sync::MutexGuard<'static, HashMap<usize, cudarc::driver::CudaSlice<bf16>>>;

/// Returns a buffer taken with [`scratch`].
fn put_scratch(dev: &candle_core::cuda::CudaDevice, mut map: ScratchMap, buf: cudarc::driver::CudaSlice<bf16>) {
    map.insert(dev.cuda_stream().cu_stream() as usize, buf);
}

/// One product of a launch: y (b × rows) = x (b × cols, row stride `ldx`) · W (rows × cols)ᵀ,
/// given by device address (16-byte aligned; cols and ldx multiples of 8). x and y are bf16; W is
/// bf16, or int8 codes where `q` says so.
#[derive(Clone, Copy, Debug)]
pub struct Product {
    pub w: u64,
    pub x: u64,
    pub y: u64,
    pub rows: usize,
    pub cols: usize,
    pub ldx: usize,
    pub q: Q8,
}

/// How a product's weights are stored: bf16 (`sc` = 0), or symmetric int8 codes in offset binary
/// (q + 128, one byte each, row-major) with f32 scales at `sc`, one per group of 2^`gs` columns,
/// `sg` groups a row (`linear::Int8Weight`). Int8 products run on the CUDA-core kinds of the
/// `GEMV_W8` module only.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Q8 {
    pub sc: u64,
    pub gs: u32,
    pub sg: u32,
}

impl Q8 {
    pub const BF16: Q8 = Q8 { sc: 0, gs: 0, sg: 0 };

    pub fn is_int8(&self) -> bool {
        self.sc != 0
    }
}

/// Kernel-side form of a launch (must match `Seg`/`Segs` in GEMV_SRC).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Seg {
    w: u64,
    x: u64,
    y: u64,
    rows: i32,
    cols: i32,
    ldx: i32,
    split: i32,
    first_block: i32,
    pad: i32,
    w2: u64,
    x2: u64,
    nw: u64,
    s: f32,
    eps: f32,
    sc: u64,
    sc2: u64,
    gs: i32,
    sg: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Segs {
    s: [Seg; 4],
    n: i32,
    batch: i32,
}

// SAFETY: plain old data with the layout of the kernel's `Segs` parameter.
unsafe impl cudarc::driver::DeviceRepr for Segs {}

/// Device address of a view (one stream per device handle: see [`single_stream`]).
fn addr<T>(dev: &candle_core::cuda::CudaDevice, v: &cudarc::driver::CudaView<T>) -> u64 {
    use cudarc::driver::DevicePtr;
    let stream = dev.cuda_stream();
    let (p, _g) = v.device_ptr(&stream);
    p
}

/// The kernel-side form of product `p` starting at block `first`, and its block count; `rg`:
/// outputs per warp group of the CUDA-core kernel (1 for pairs, else [`rows_per_warp`]); `rows`:
/// the weight rows a warp group streams (2 for pairs, else `rg`).
fn seg_for(mode: u8, rg: usize, rows: usize, p: &Product, first: usize, fit: usize) -> (Seg, usize) {
    // tensor cores: 16 rows per block; CUDA cores: 8 warps in groups of `split`, each group 1–2 rows
    let (split, nb) = if mode == 2 {
        (0, p.rows.div_ceil(16))
    } else {
        let groups = p.rows.div_ceil(rg);
        let chunks = row_chunks(p.cols, p.q.is_int8());
        let mut split = split_for(groups, chunks, if p.q.is_int8() { rows } else { 0 });
        while fit > 0 && split < 8 && lane_chunks(chunks, split) > fit {
            split *= 2;
        }
        (split, groups.div_ceil(8 / split))
    };
    let (sc, gs, sg) = (p.q.sc, p.q.gs as i32, p.q.sg as i32);
    (Seg { w: p.w, x: p.x, y: p.y, rows: p.rows as i32, cols: p.cols as i32, ldx: p.ldx as i32, split: split as i32, first_block: first as i32, sc, gs, sg, ..Default::default() }, nb)
}

/// Chunks (16 bytes of a row) each lane preloads before the PDL wait: `GEMV_P` and `GEMV_PL` in GEMV_SRC
/// (their defaults: the kind choice below assumes them, also when `COMPACTOR_GEMV_DEFINES` changes
/// them for an experiment).
const PRELOAD: usize = 4;
const PRELOAD_LONG: usize = 8;
/// Batches the long-preload kinds (`_l`) are compiled for.
const LONG_MAX_BATCH: usize = 2;

/// Chunks each lane of a warp group reads from a row of `chunks` chunks when `split` warps share
/// the row.
fn lane_chunks(chunks: usize, split: usize) -> usize {
    chunks.div_ceil(32 * split)
}

/// 16-byte chunks of a row of `cols` weights: 8 bf16 columns each, or 16 int8 codes.
fn row_chunks(cols: usize, int8: bool) -> usize {
    cols / if int8 { 16 } else { 8 }
}

/// A setting read once from the environment (a number; `default` when unset or unreadable).
pub(crate) fn env_usize(name: &'static str, cell: &'static OnceLock<usize>, default: usize) -> usize {
    *cell.get_or_init(|| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

/// The column split of a batch-`b` CUDA-core launch is raised (up to 8 warps a row) until each
/// lane reads at most `fit` chunks of a row, where the launch's weights (the products and their
/// pairs) take at least `mib` MiB: the first of the tiers `COMPACTOR_SPLIT_FIT` (`mib:fit,…` or `mib:fit/…`,
/// largest first; "70:4" unless set; "0:0" never raises) that the launch reaches. Measured on an
/// H200 (Granite-8B shapes, batch 1, fused step graph, 2026-12-01): the large launches (a dense
/// MLP's, the lm_head, an svd plan's gate/up A pair) stream faster with more warps in flight,
/// while small launches (≤ 50 MiB: the attention products, rank-1024 factors) are fastest with
/// the split of [`split_for`].
fn split_fit(b: usize, prods: &[Product], pairs: usize) -> usize {
    static TIERS: OnceLock<Vec<(usize, usize)>> = OnceLock::new();
    let tiers = TIERS.get_or_init(|| {
        let v = std::env::var("COMPACTOR_SPLIT_FIT").unwrap_or_default();
        parse_tiers(&v).unwrap_or_else(|e| {
            eprintln!("COMPACTOR_SPLIT_FIT: {e}; using 70:4");
            parse_tiers("").unwrap_or_default()
        })
    });
    if b > LONG_MAX_BATCH {
        return 0;
    }
    let bytes: usize = prods.iter().enumerate().map(|(i, p)| p.rows * p.cols * if p.q.is_int8() { 1 } else { 2 } * if i < pairs { 2 } else { 1 }).sum();
    tiers.iter().find(|&&(mib, _)| bytes >= mib.saturating_mul(1 << 20)).map_or(0, |&(_, fit)| fit)
}

/// The tiers of `COMPACTOR_SPLIT_FIT` (see [`split_fit`]), largest first; "" is the default.
fn parse_tiers(v: &str) -> Result<Vec<(usize, usize)>, String> {
    let v = if v.trim().is_empty() { "70:4" } else { v };
    let mut tiers = v
        .split([',', '/'])
        .map(|t| {
            let (m, f) = t.split_once(':').ok_or_else(|| format!("`{t}` is not mib:fit"))?;
            let num = |x: &str| x.trim().parse::<usize>().map_err(|_| format!("`{t}`: `{x}` is not a whole number"));
            Ok((num(m)?, num(f)?))
        })
        .collect::<Result<Vec<_>, String>>()?;
    tiers.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(tiers)
}

#[cfg(test)]
mod split_tier_tests {
    use super::{parse_tiers, split_for};

    #[test]
    fn int8_rows_split_further_than_bf16_rows_of_the_same_bytes() {
        // bf16 (q's A factor at rank 1024, 4096 columns): 1024 row groups, 512 chunks a row
        assert_eq!(split_for(1024, 512, 0), 4);
        // the same factor in int8, 2 rows a warp group: 512 groups of 256 chunks a row
        assert_eq!(split_for(512, 256, 2), 8);
        // B factors of 64 chunks a row: bf16 stays whole, int8 pairs of rows split in two
        assert_eq!(split_for(4096, 128, 0), 1);
        assert_eq!(split_for(2048, 64, 2), 2);
        // enough row groups: no split either way
        assert_eq!(split_for(8192, 4096, 2), 1);
    }

    #[test]
    fn tiers_parse_sorted_largest_first_and_a_bad_one_is_named() {
        assert_eq!(parse_tiers(""), Ok(vec![(70, 4)]));
        assert_eq!(parse_tiers("30:8/70:4"), Ok(vec![(70, 4), (30, 8)]));
        assert_eq!(parse_tiers("45:2, 100:4"), Ok(vec![(100, 4), (45, 2)]));
        assert_eq!(parse_tiers("0:0"), Ok(vec![(0, 0)]));
        for bad in ["70", "x:4", "70:y", "70:4/"] {
            let e = parse_tiers(bad).unwrap_err();
            assert!(e.contains('`'), "{bad}: {e}");
        }
    }
}

/// The kernel of a CUDA-core launch: `base` + batch, or its long-preload kind where a lane's whole
/// share of some product's rows fits in the long preload, and takes at least
/// `COMPACTOR_GEMV_LONG` chunks (6 unless set: a row share of 5 runs faster short; 0 turns the
/// long kinds off;
/// `COMPACTOR_GEMV_LONG_PAIRS=0` keeps the pair kinds short).
fn kind_name(base: &str, b: usize, segs: &Segs) -> String {
    static LONG: OnceLock<usize> = OnceLock::new();
    static PAIRS: OnceLock<usize> = OnceLock::new();
    let most = segs.s[..segs.n as usize].iter().map(|s| lane_chunks(row_chunks(s.cols as usize, s.sc != 0), s.split.max(1) as usize)).max().unwrap_or(0);
    let from = env_usize("COMPACTOR_GEMV_LONG", &LONG, PRELOAD + 2);
    let pair = base.ends_with("p_b");
    let long = b <= LONG_MAX_BATCH && from != 0 && most >= from.max(PRELOAD + 1) && most <= PRELOAD_LONG && (!pair || env_usize("COMPACTOR_GEMV_LONG_PAIRS", &PAIRS, 1) != 0);
    format!("{base}{b}{}", if long { "_l" } else { "" })
}

fn check_batch(b: usize) -> CResult<()> {
    if !(1..=16).contains(&b) {
        candle_core::bail!("gemv: {b} input rows (1 to 16 supported)");
    }
    Ok(())
}

/// Runs `prods` (each with `b` input rows) on `dev`'s stream in this order: mode 1 (CUDA cores)
/// or 2 (tensor cores) up to four products per launch (a grouped launch: give it products that do
/// not read each other's outputs), mode 0 one cuBLAS GEMM each. With `pdl`, the launches are
/// programmatic dependent launches where the GPU has them.
/// Products with int8 weights (see [`Q8`]) run on the CUDA-core kinds whatever `mode` says,
/// after the others.
pub fn launch_products(dev: &candle_core::cuda::CudaDevice, mode: u8, b: usize, prods: &[Product], pdl: bool) -> CResult<()> {
    check_batch(b)?;
    if prods.iter().any(|p| p.q.is_int8()) {
        let (w8, plain): (Vec<Product>, Vec<Product>) = prods.iter().partition(|p| p.q.is_int8());
        if !plain.is_empty() {
            launch_products(dev, mode, b, &plain, pdl)?;
        }
        return launch_chunks(dev, 1, b, &w8, pdl, true);
    }
    if mode == 0 {
        return prods.iter().try_for_each(|p| cublas_product(dev, b, p));
    }
    launch_chunks(dev, mode, b, prods, pdl, false)
}

/// [`launch_products`] in kernel launches of up to four products (all bf16, or with `w8` all int8).
fn launch_chunks(dev: &candle_core::cuda::CudaDevice, mode: u8, b: usize, prods: &[Product], pdl: bool, w8: bool) -> CResult<()> {
    for chunk in prods.chunks(4) {
        let mut segs = Segs { n: chunk.len() as i32, batch: b as i32, ..Default::default() };
        let (mut blocks, fit) = (0usize, split_fit(b, chunk, 0));
        for (seg, p) in segs.s.iter_mut().zip(chunk) {
            let rg = rows_per_warp(b, w8);
            let (sg, nb) = seg_for(mode, rg, rg, p, blocks, fit);
            *seg = sg;
            blocks += nb;
        }
        launch_segs(dev, mode, b, &segs, blocks, pdl, w8)?;
    }
    Ok(())
}

/// How a fused launch of the decode step writes its outputs (see `gemv` in GEMV_SRC).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Out {
    /// y = the product
    Store,
    /// y is the residual stream: y += s · the product
    Residual(f32),
    /// output j = silu(row j of the product) · row j of its pair's product
    Glu,
}

/// The second row of a pair in a fused launch ([`Out::Glu`]): W₂, x₂ and W₂'s int8 scales (0 for
/// bf16; group size as the product's).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pair {
    pub w: u64,
    pub x: u64,
    pub sc: u64,
}

/// Batch sizes the fused kinds are compiled for.
pub const FUSED_MAX_BATCH: usize = 8;

/// One launch of the decode step graph's fused kinds (CUDA cores, `b` ≤ [`FUSED_MAX_BATCH`]):
/// with `norm` = (norm weights, eps) the input of every product is rmsnorm(x) ⊙ weights (x: the
/// product's input, one row per sequence, of `cols` values); `out` says how outputs are written.
/// With [`Out::Glu`], `pairs[i]` = (W₂, x₂) of product i: output j of product i is
/// silu(x Wᵀ)_j · (x₂ W₂ᵀ)_j (x₂ is ignored with `norm`: both rows read the normalized x).
/// W₂ is stored as W is (`Pair::sc`: its int8 scales). Products of both storage forms run as one
/// launch each.
pub(crate) fn launch_fused(dev: &candle_core::cuda::CudaDevice, b: usize, prods: &[Product], pairs: &[Pair], norm: Option<(u64, f32)>, out: Out) -> CResult<()> {
    if !(1..=FUSED_MAX_BATCH).contains(&b) || prods.len() > 4 || (out == Out::Glu && pairs.len() != prods.len()) {
        candle_core::bail!("fused gemv: {} products of batch {b} ({out:?}, {} pairs)", prods.len(), pairs.len());
    }
    let w8 = prods.first().is_some_and(|p| p.q.is_int8());
    if prods.iter().any(|p| p.q.is_int8() != w8) {
        let part = |int8: bool| -> (Vec<Product>, Vec<Pair>) {
            let keep: Vec<usize> = (0..prods.len()).filter(|&i| prods[i].q.is_int8() == int8).collect();
            (keep.iter().map(|&i| prods[i]).collect(), keep.iter().filter_map(|&i| pairs.get(i).copied()).collect())
        };
        for int8 in [false, true] {
            let (p, q) = part(int8);
            if !p.is_empty() {
                launch_fused(dev, b, &p, &q, norm, out)?;
            }
        }
        return Ok(());
    }
    let name = match (norm.is_some(), out) {
        (true, Out::Store) => "gemvn_b",
        (false, Out::Residual(_)) => "gemvr_b",
        (true, Out::Glu) => "gemvnp_b",
        (false, Out::Glu) => "gemvp_b",
        (false, Out::Store) => "gemv_b",
        (true, Out::Residual(_)) => candle_core::bail!("fused gemv: no kind normalizes its input and adds to the residual"),
    };
    let (segs, blocks) = fused_segs(b, prods, pairs, norm, out);
    let func = module_kernel(dev, &kind_name(name, b, &segs), w8)?;
    let mut params = [&segs as *const Segs as *mut std::ffi::c_void];
    // SAFETY: `segs` has the layout of the kernels' `Segs` parameter.
    unsafe { launch_raw(dev, &func, (blocks as u32, 1), 256, 0, &mut params, true) }
}

/// The kernel-side form of a fused launch and its block count.
fn fused_segs(b: usize, prods: &[Product], pairs: &[Pair], norm: Option<(u64, f32)>, out: Out) -> (Segs, usize) {
    let rg = if out == Out::Glu { 1 } else { rows_per_warp(b, prods.first().is_some_and(|p| p.q.is_int8())) };
    let mut segs = Segs { n: prods.len() as i32, batch: b as i32, ..Default::default() };
    let (mut blocks, fit) = (0usize, split_fit(b, prods, pairs.len()));
    for (i, (seg, p)) in segs.s.iter_mut().zip(prods).enumerate() {
        let (mut sg, nb) = seg_for(1, rg, if out == Out::Glu { 2 } else { rg }, p, blocks, fit);
        if let Some(pair) = pairs.get(i) {
            (sg.w2, sg.x2, sg.sc2) = (pair.w, pair.x, pair.sc);
        }
        if let Some((nw, eps)) = norm {
            (sg.nw, sg.eps) = (nw, eps);
        }
        if let Out::Residual(m) = out {
            sg.s = m;
        }
        *seg = sg;
        blocks += nb;
    }
    (segs, blocks)
}

fn launch_segs(dev: &candle_core::cuda::CudaDevice, mode: u8, b: usize, segs: &Segs, blocks: usize, pdl: bool, w8: bool) -> CResult<()> {
    let func = if mode == 2 { kernel(dev, if b <= 8 { "gemv_tc8" } else { "gemv_tc16" })? } else { module_kernel(dev, &kind_name("gemv_b", b, segs), w8)? };
    let mut params = [segs as *const Segs as *mut std::ffi::c_void];
    // SAFETY: `segs` has the layout of the kernels' `Segs` parameter.
    unsafe { launch_raw(dev, &func, (blocks as u32, 1), 256, 0, &mut params, pdl) }
}

/// A kernel argument for [`launch_raw`]: the address of its value.
pub(crate) fn arg<T>(v: &mut T) -> *mut std::ffi::c_void {
    v as *mut T as *mut std::ffi::c_void
}

/// Launches `func` on `dev`'s stream with `params` (pointers to each argument's value). With
/// `pdl` (and a GPU that has it) as a programmatic dependent launch: the kernel may start before
/// the previous one on the stream has finished, and must `griddepcontrol.wait` before it reads
/// what that one wrote or writes anything.
///
/// # Safety
/// `params` must match the kernel's parameter list in number, order and layout.
pub(crate) unsafe fn launch_raw(
    dev: &candle_core::cuda::CudaDevice,
    func: &cudarc::driver::CudaFunction,
    grid: (u32, u32),
    block: u32,
    shared: u32,
    params: &mut [*mut std::ffi::c_void],
    pdl: bool,
) -> CResult<()> {
    use cudarc::driver::sys;
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let pdl = pdl && pdl_capable(dev);
    let cfg = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: 1,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: shared,
        hStream: dev.cuda_stream().cu_stream(),
        attrs: &mut attr,
        numAttrs: if pdl { 1 } else { 0 },
    };
    unsafe { sys::cuLaunchKernelEx(&cfg, func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }.result().map_err(ce("kernel launch"))
}

/// Gives `dev`'s cuBLAS handle a workspace of its own (32 MiB, kept for the process), so that
/// GEMMs captured into a CUDA graph never allocate.
pub fn cublas_workspace(dev: &candle_core::cuda::CudaDevice) -> CResult<()> {
    static SET: OnceLock<Mutex<HashMap<usize, cudarc::driver::CudaSlice<u8>>>> = OnceLock::new();
    let blas = dev.cublas_handle();
    let key = *blas.handle() as usize;
    let mut map = SET.get_or_init(Default::default).lock().unwrap();
    if map.contains_key(&key) {
        return Ok(());
    }
    let len = 32 << 20;
    let buf = unsafe { dev.alloc::<u8>(len)? };
    let p = addr(dev, &buf.slice(..));
    unsafe { cudarc::cublas::sys::cublasSetWorkspace_v2(*blas.handle(), p as *mut _, len) }.result().map_err(ce("cublasSetWorkspace"))?;
    map.insert(key, buf);
    Ok(())
}

/// One product through cuBLAS (bf16 in and out, f32 accumulation): row-major y = x Wᵀ is the
/// column-major Y (rows × b) = Wᵀ X.
pub(crate) fn cublas_product(dev: &candle_core::cuda::CudaDevice, b: usize, p: &Product) -> CResult<()> {
    use cudarc::cublas::sys as cb;
    let blas = dev.cublas_handle();
    let (alpha, beta) = (1f32, 0f32);
    let bf = cb::cudaDataType_t::CUDA_R_16BF;
    unsafe {
        cb::cublasGemmEx(
            *blas.handle(),
            cb::cublasOperation_t::CUBLAS_OP_T,
            cb::cublasOperation_t::CUBLAS_OP_N,
            p.rows as i32,
            b as i32,
            p.cols as i32,
            &alpha as *const f32 as *const _,
            p.w as *const _,
            bf,
            p.cols as i32,
            p.x as *const _,
            bf,
            p.ldx as i32,
            &beta as *const f32 as *const _,
            p.y as *mut _,
            bf,
            p.rows as i32,
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .result()
    .map_err(ce("cublasGemmEx"))
}

/// The second GEMM of an MPO layer cut in two halves (see `linear::MpoHalves`), for each of `b`
/// inputs: y_b (i1 × i2) = L (i1 × k) · Z_b (k × i2), all row-major bf16, f32 accumulation; Z_b
/// follow each other in `z`, y_b in `y`.
pub(crate) fn cublas_mpo_left(dev: &candle_core::cuda::CudaDevice, b: usize, l: u64, z: u64, y: u64, i1: usize, i2: usize, k: usize) -> CResult<()> {
    use cudarc::cublas::sys as cb;
    let blas = dev.cublas_handle();
    let (alpha, beta) = (1f32, 0f32);
    let bf = cb::cudaDataType_t::CUDA_R_16BF;
    let n = cb::cublasOperation_t::CUBLAS_OP_N;
    // column-major: y_bᵀ (i2 × i1) = Z_bᵀ (i2 × k) · Lᵀ (k × i1)
    unsafe {
        cb::cublasGemmStridedBatchedEx(
            *blas.handle(),
            n,
            n,
            i2 as i32,
            i1 as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            z as *const _,
            bf,
            i2 as i32,
            (k * i2) as i64,
            l as *const _,
            bf,
            k as i32,
            0,
            &beta as *const f32 as *const _,
            y as *mut _,
            bf,
            i2 as i32,
            (i1 * i2) as i64,
            b as i32,
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .result()
    .map_err(ce("cublasGemmStridedBatchedEx"))
}

fn check_operand(l: &Layout, what: &str) -> CResult<(usize, usize)> {
    let (r, c) = l.shape().dims2()?;
    if c % 8 != 0 || !l.is_contiguous() || l.start_offset() % 8 != 0 {
        candle_core::bail!("gemv: {what} {:?} must be contiguous, 16-byte aligned, with a multiple of 8 columns", l.shape());
    }
    Ok((r, c))
}

/// `x Wᵀ` (one product).
struct Gemv(u8);

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "compactor-gemv"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        cuda_only("gemv")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout) -> CResult<(CudaStorage, Shape)> {
        let (b, n) = check_operand(xl, "x")?;
        let (m, n2) = check_operand(wl, "W")?;
        if n != n2 || !(1..=16).contains(&b) {
            candle_core::bail!("gemv: unsupported shapes {:?} × {:?}ᵀ", xl.shape(), wl.shape());
        }
        let dev = xs.device().clone();
        let x = xs.as_cuda_slice::<bf16>()?.slice(xl.start_offset()..xl.start_offset() + b * n);
        let w = ws.as_cuda_slice::<bf16>()?.slice(wl.start_offset()..wl.start_offset() + m * n);
        let y = unsafe { dev.alloc::<bf16>(b * m)? };
        let p = Product { w: addr(&dev, &w), x: addr(&dev, &x), y: addr(&dev, &y.slice(..)), rows: m, cols: n, ldx: n, q: Q8::BF16 };
        launch_products(&dev, self.0, b, &[p], true)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((b, m))))
    }
}

/// `(x Bᵀ) Aᵀ` (a low-rank layer) as one op: two launches, the r-wide intermediate stays on
/// the device and never becomes a tensor.
struct LowRankGemv(u8);

impl candle_core::CustomOp3 for LowRankGemv {
    fn name(&self) -> &'static str {
        "compactor-low-rank-gemv"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        cuda_only("gemv")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, bs: &CudaStorage, bl: &Layout, a_s: &CudaStorage, al: &Layout) -> CResult<(CudaStorage, Shape)> {
        let (b, n) = check_operand(xl, "x")?;
        let (r, n2) = check_operand(bl, "B")?;
        let (m, r2) = check_operand(al, "A")?;
        if n != n2 || r != r2 || !(1..=16).contains(&b) {
            candle_core::bail!("gemv: unsupported shapes {:?}, B {:?}, A {:?}", xl.shape(), bl.shape(), al.shape());
        }
        let dev = xs.device().clone();
        let x = xs.as_cuda_slice::<bf16>()?.slice(xl.start_offset()..xl.start_offset() + b * n);
        let bw = bs.as_cuda_slice::<bf16>()?.slice(bl.start_offset()..bl.start_offset() + r * n);
        let aw = a_s.as_cuda_slice::<bf16>()?.slice(al.start_offset()..al.start_offset() + m * r);
        // the r-wide intermediate lives in this stream's scratch buffer: the next layer's first
        // kernel overwrites it only after this layer's second kernel has read it (stream order)
        let (map, t) = scratch(&dev, b * r)?;
        let y = unsafe { dev.alloc::<bf16>(b * m)? };
        let ta = addr(&dev, &t.slice(..));
        let first = Product { w: addr(&dev, &bw), x: addr(&dev, &x), y: ta, rows: r, cols: n, ldx: n, q: Q8::BF16 };
        let second = Product { w: addr(&dev, &aw), x: ta, y: addr(&dev, &y.slice(..)), rows: m, cols: r, ldx: r, q: Q8::BF16 };
        let res = launch_products(&dev, self.0, b, &[first], true).and_then(|_| launch_products(&dev, self.0, b, &[second], true));
        put_scratch(&dev, map, t);
        res?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((b, m))))
    }
}

fn gemv_applies(x: &Tensor, ws: &[&Tensor]) -> CResult<bool> {
    Ok(x.device().is_cuda()
        && x.dtype() == DType::BF16
        && x.rank() == 2
        && (1..=16).contains(&x.dim(0)?)
        && x.dim(1)? % 8 == 0
        && !x.track_op()
        && ws.iter().all(|w| w.dtype() == DType::BF16 && w.rank() == 2 && w.dim(1).map(|c| c % 8 == 0).unwrap_or(false) && !w.track_op()))
}

/// `x Wᵀ` through the decode kernel when it applies (bf16 on CUDA, 1–16 rows, n % 8 == 0, no
/// gradient tracking); `None` otherwise (the caller uses a GEMM).
pub fn gemv(x: &Tensor, w: &Tensor) -> CResult<Option<Tensor>> {
    let mode = gemv_mode(x.dim(0)?);
    if mode == 0 || !gemv_applies(x, &[w])? {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &Gemv(mode))?))
}

/// `(x Bᵀ) Aᵀ` through the decode kernel (see [`gemv`]); `None` where it does not apply.
pub fn low_rank_gemv(x: &Tensor, b: &Tensor, a: &Tensor) -> CResult<Option<Tensor>> {
    let mode = gemv_mode(x.dim(0)?);
    if mode == 0 || !gemv_applies(x, &[b, a])? {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(&b.contiguous()?, &a.contiguous()?, &LowRankGemv(mode))?))
}

/// Zero-pads the rank of a low-rank pair to a multiple of 8 (A m×r → m×r', B r×n → r'×n):
/// the product is unchanged and the GEMV kernel's 16-byte loads stay aligned.
pub fn pad_rank(a: Tensor, b: Tensor) -> CResult<(Tensor, Tensor)> {
    let r = a.dim(1)?;
    let pad = (8 - r % 8) % 8;
    if pad == 0 {
        return Ok((a, b));
    }
    let (m, n) = (a.dim(0)?, b.dim(1)?);
    let a = Tensor::cat(&[&a, &Tensor::zeros((m, pad), a.dtype(), a.device())?], 1)?;
    let b = Tensor::cat(&[&b, &Tensor::zeros((pad, n), b.dtype(), b.device())?], 0)?;
    Ok((a, b))
}
