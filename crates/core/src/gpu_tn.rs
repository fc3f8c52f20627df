//! Tucker (HOOI) and CP (ALS) fits on a CUDA device (feature `cuda`): the GPU form of
//! `compactor_decomp::tucker` and `compactor_decomp::cp`, step for step and in f64 like them, so
//! that a CPU and a GPU fit of one matrix agree to rounding (same ranks, same iteration rule,
//! same seeded initial columns).
//!
//! The tensorized weight `T` (interleaved modes `m1, n1, m2, n2, …`) stays on the device from
//! upload to the download of the factors. The heavy steps are cuBLAS GEMMs through candle: the
//! mode unfoldings' Gram matrices, the mode products of HOOI, the Khatri–Rao products and the
//! MTTKRP of ALS, the r × r Grams. The small dense problems: the mode Grams (order ≤ the largest
//! site dimension, ~16) are eigendecomposed on the host (a few hundred bytes each way), and CP's
//! normal equations `A V = M` (V: r × r) are solved on the device by cuSOLVER's Cholesky
//! (`potrf` + `potrs`); only when V is numerically singular do V and M go to the host for the
//! CPU's pseudo-inverse. Host waits: per CP mode step three scalars (V's trace for the ridge,
//! `potrf`'s `info`, the op's flag), per sweep two (the error that decides the stop); per Tucker
//! mode step the Gram and one norm. All are a few bytes; none moves the tensor.

use crate::gpu::{ce, cuda_only, input_copy, settle, solver};
use crate::linear::khatri_rao;
use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use compactor_decomp as dc;
use cudarc::cusolver::sys as cs;
use cudarc::driver::DevicePtrMut;

type CResult<T> = candle_core::Result<T>;

/// `W` (m × n) as the 2k-way tensor `T[i1, j1, …, ik, jk]` in f64 (see `compactor_decomp::sites`).
fn tensorize(w: &Tensor, rd: &[usize], cd: &[usize]) -> CResult<Tensor> {
    let k = rd.len();
    let shape: Vec<usize> = rd.iter().chain(cd).copied().collect();
    let perm: Vec<usize> = (0..k).flat_map(|t| [t, k + t]).collect();
    w.to_dtype(DType::F64)?.reshape(shape)?.permute(perm)?.contiguous()
}

/// Mode-d unfolding: `dim_d × (the other modes, in order)`.
fn unfold(t: &Tensor, d: usize) -> CResult<Tensor> {
    let dims = t.dims();
    let mut perm = vec![d];
    perm.extend((0..dims.len()).filter(|&e| e != d));
    t.permute(perm)?.contiguous()?.reshape((dims[d], t.elem_count() / dims[d]))
}

/// Mode-d product `out[…, p, …] = Σ_q M[p, q] T[…, q, …]` (M: new × dims[d]).
fn mode_product(t: &Tensor, d: usize, mat: &Tensor) -> CResult<Tensor> {
    let p = mat.matmul(&unfold(t, d)?)?;
    let dims = t.dims();
    let mut ushape = vec![mat.dim(0)?];
    ushape.extend((0..dims.len()).filter(|&e| e != d).map(|e| dims[e]));
    // unfolded axis 0 goes back to position d, the others keep their order
    let perm: Vec<usize> = (0..dims.len()).map(|e| if e == d { 0 } else if e < d { e + 1 } else { e }).collect();
    p.reshape(ushape)?.permute(perm)?.contiguous()
}

/// Eigenvectors of the mode-d unfolding's Gram matrix (descending, as columns of a row-major
/// `dim × dim` host buffer): the Gram on the device, its tiny eigenproblem on the host.
fn mode_eigvecs(t: &Tensor, d: usize) -> crate::Result<Vec<f64>> {
    let u = unfold(t, d)?;
    let dim = u.dim(0)?;
    let g = u.matmul(&u.t()?)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(dc::sym_eig_desc(&g, dim)?.1)
}

/// The first `r` columns of a row-major `rows × cols` buffer, as a `rows × r` device tensor.
fn leading_cols(u: &[f64], rows: usize, cols: usize, r: usize, dev: &candle_core::Device) -> CResult<Tensor> {
    Tensor::from_vec(dc::tucker::take_cols(u, rows, cols, r), (rows, r), dev)
}

fn to_host(t: &Tensor) -> CResult<Vec<f64>> {
    t.flatten_all()?.to_vec1::<f64>()
}

/// A Tucker fit: core (shape `ranks`) and factors (`dims[d] × ranks[d]`), row-major, on the host.
pub struct TuckerFit {
    pub core: Vec<f64>,
    pub ranks: Vec<usize>,
    pub factors: Vec<Vec<f64>>,
    pub iterations: usize,
    pub rel_error: f64,
}

/// HOOI with per-mode rank caps (the rank-only rule of `compactor_decomp::tucker`): HOSVD start,
/// then sweeps while the error improves by at least `tol`, at most `max_iters`.
pub fn tucker_hooi(w: &Tensor, rd: &[usize], cd: &[usize], caps: &[usize], max_iters: usize, tol: f64) -> crate::Result<TuckerFit> {
    let dims = dc::sites::interleaved(rd, cd);
    let t = tensorize(w, rd, cd)?;
    let dev = t.device().clone();
    let nm = dims.len();
    let norm2 = t.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let ranks: Vec<usize> = (0..nm).map(|d| caps[d].min(dims[d]).max(1)).collect();
    let mut factors = (0..nm).map(|d| Ok(leading_cols(&mode_eigvecs(&t, d)?, dims[d], dims[d], ranks[d], &dev)?)).collect::<crate::Result<Vec<_>>>()?;
    let project_all_but = |factors: &[Tensor], skip: Option<usize>| -> CResult<Tensor> {
        dc::tucker::projection_order(&dims, &ranks, skip).into_iter().try_fold(t.clone(), |y, e| mode_product(&y, e, &factors[e].t()?))
    };
    let err_of = |core: &Tensor| -> CResult<f64> {
        let c2 = core.sqr()?.sum_all()?.to_scalar::<f64>()?;
        Ok(((norm2 - c2).max(0.0) / norm2.max(f64::MIN_POSITIVE)).sqrt())
    };
    let mut core = project_all_but(&factors, None)?;
    let mut err = err_of(&core)?;
    let mut iterations = 0;
    for _ in 0..max_iters {
        let mut new_factors = factors.clone();
        let mut last = None;
        for d in 0..nm {
            let y = project_all_but(&new_factors, Some(d))?;
            new_factors[d] = leading_cols(&mode_eigvecs(&y, d)?, dims[d], dims[d], ranks[d], &dev)?;
            last = Some((y, d));
        }
        let (y, d) = last.expect("at least one mode");
        let ncore = mode_product(&y, d, &new_factors[d].t()?)?;
        let nerr = err_of(&ncore)?;
        iterations += 1;
        if nerr >= err {
            break;
        }
        let improvement = err - nerr;
        (factors, core, err) = (new_factors, ncore, nerr);
        if improvement < tol {
            break;
        }
    }
    Ok(TuckerFit { core: to_host(&core)?, ranks, factors: factors.iter().map(to_host).collect::<CResult<_>>()?, iterations, rel_error: err })
}

/// A CP fit: weights (R) and unit-column factors (`dims[d] × R`), row-major, on the host.
pub struct CpFit {
    pub weights: Vec<f64>,
    pub factors: Vec<Vec<f64>>,
    pub iterations: usize,
    pub rel_error: f64,
    pub converged: bool,
}

/// MTTKRP for mode d (`dim_d × r`), with the other modes split into a prefix and a suffix of
/// about √rest rows each as on the CPU, so that no Khatri–Rao product has `rest` rows.
fn mttkrp(t: &Tensor, dims: &[usize], factors: &[Tensor], d: usize, r: usize) -> CResult<Tensor> {
    let dev = t.device();
    let dim = dims[d];
    let others: Vec<usize> = (0..dims.len()).filter(|&e| e != d).collect();
    let rest: usize = others.iter().map(|&e| dims[e]).product();
    let (mut h, mut pa) = (0, 1usize);
    while h < others.len() && pa * pa < rest {
        pa *= dims[others[h]];
        h += 1;
    }
    let (a_modes, b_modes) = others.split_at(h);
    let kr = |modes: &[usize]| khatri_rao(&modes.iter().map(|&e| &factors[e]).collect::<Vec<_>>(), r, DType::F64, dev);
    let (kra, krb) = (kr(a_modes)?, kr(b_modes)?);
    let p = unfold(t, d)?.reshape((dim * pa, rest / pa))?.matmul(&krb)?;
    p.reshape((dim, pa, r))?.broadcast_mul(&kra.unsqueeze(0)?)?.sum(1)
}

/// `A = M V⁻¹` for symmetric positive definite V (r × r) and M (rows × r), both f64: cuSOLVER
/// `potrf` then `potrs` (row-major M is the column-major r × rows right-hand side). Output
/// `rows·r + 1` values: A, then `info` of `potrf` (0: V was positive definite).
struct CholSolve;

impl CustomOp2 for CholSolve {
    fn name(&self) -> &'static str {
        "compactor-chol-solve"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        cuda_only("chol_solve")
    }

    fn cuda_fwd(&self, v: &CudaStorage, lv: &Layout, m: &CudaStorage, lm: &Layout) -> CResult<(CudaStorage, Shape)> {
        let (r, r2) = lv.shape().dims2()?;
        let (rows, rm) = lm.shape().dims2()?;
        if r != r2 || rm != r || !lv.is_contiguous() || !lm.is_contiguous() {
            candle_core::bail!("chol_solve: expected V r×r and M rows×r, contiguous, got {:?} and {:?}", lv.shape(), lm.shape());
        }
        let dev = v.device().clone();
        let stream = dev.cuda_stream();
        let mut a = input_copy::<f64>(v, lv, r * r, 0)?;
        let mut b = input_copy::<f64>(m, lm, rows * r, 1)?;
        let h = solver(&stream)?;
        let uplo = cs::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
        let (ri, rowsi) = (r as i32, rows as i32);
        let mut info = stream.alloc_zeros::<i32>(1).map_err(ce("alloc"))?;
        let mut lwork = 0i32;
        {
            let (ap, _ga) = a.device_ptr_mut(&stream);
            let (ip, _gi) = info.device_ptr_mut(&stream);
            let (ap, ip) = (ap as *mut f64, ip as *mut i32);
            unsafe { cs::cusolverDnDpotrf_bufferSize(h.cu(), uplo, ri, ap, ri, &mut lwork) }.result().map_err(ce("cusolverDnDpotrf_bufferSize"))?;
            let mut work = stream.alloc_zeros::<f64>(lwork.max(1) as usize).map_err(ce("alloc"))?;
            let (wk, _gw) = work.device_ptr_mut(&stream);
            unsafe { cs::cusolverDnDpotrf(h.cu(), uplo, ri, ap, ri, wk as *mut f64, lwork, ip) }.result().map_err(ce("cusolverDnDpotrf"))?;
            settle(&stream)?;
        }
        let code = stream.clone_dtoh(&info).map_err(ce("info"))?[0];
        if code == 0 {
            let (ap, _ga) = a.device_ptr_mut(&stream);
            let (bp, _gb) = b.device_ptr_mut(&stream);
            let (ip, _gi) = info.device_ptr_mut(&stream);
            unsafe { cs::cusolverDnDpotrs(h.cu(), uplo, ri, rowsi, ap as *const f64, ri, bp as *mut f64, ri, ip as *mut i32) }.result().map_err(ce("cusolverDnDpotrs"))?;
        }
        if code < 0 {
            candle_core::bail!("cusolverDnDpotrf: argument {} is invalid ({r}×{r})", -code);
        }
        if code > 0 {
            let flag = vec![code as f64];
            stream.memcpy_htod(&flag,  &mut b.slice_mut(rows * r..rows * r + 1)).map_err(ce("copy"))?;
        }
        Ok((CudaStorage::wrap_cuda_slice(b, dev), Shape::from(rows * r + 1)))
    }
}

/// `A = M V⁻¹` as `compactor_decomp::cp::solve_normal` does it: a tiny ridge, Cholesky on the
/// device; the host's eigen pseudo-inverse when V is numerically singular.
fn solve_normal(m: &Tensor, v: &Tensor) -> crate::Result<Tensor> {
    let (rows, r) = m.dims2()?;
    let eye = Tensor::eye(r, DType::F64, v.device())?;
    let tr = v.mul(&eye)?.sum_all()?.to_scalar::<f64>()? / r as f64;
    let ridge = 1e-12 * tr.max(f64::MIN_POSITIVE);
    let vr = (v + (eye * ridge)?)?;
    let out = vr.contiguous()?.apply_op2_no_bwd(&m.contiguous()?, &CholSolve)?;
    let info = out.narrow(0, rows * r, 1)?.to_vec1::<f64>()?[0];
    if info == 0.0 {
        return Ok(out.narrow(0, 0, rows * r)?.reshape((rows, r))?);
    }
    let a = dc::cp::solve_normal(&to_host(m)?, rows, &to_host(v)?, r)?;
    Ok(Tensor::from_vec(a, (rows, r), m.device())?)
}

/// CP-ALS at rank `r` as `compactor_decomp::cp` runs it: SVD start (seeded normal columns beyond
/// a mode's dimension), unit columns after each update, stop when the error changes by less
/// than `tol` or after `max_iters` sweeps.
pub fn cp_als(w: &Tensor, rd: &[usize], cd: &[usize], r: usize, max_iters: usize, tol: f64, seed: u64) -> crate::Result<CpFit> {
    let dims = dc::sites::interleaved(rd, cd);
    dc::cp::check_als_size(w.dim(0)?, w.dim(1)?, dims.len(), r)?;
    let t = tensorize(w, rd, cd)?;
    let dev = t.device().clone();
    let nm = dims.len();
    let norm2 = t.sqr()?.sum_all()?.to_scalar::<f64>()?.max(f64::MIN_POSITIVE);
    let mut factors = Vec::with_capacity(nm);
    for (d, &dim) in dims.iter().enumerate() {
        let f = dc::cp::start_columns(&mode_eigvecs(&t, d)?, dim, r, seed.wrapping_add(d as u64));
        factors.push(Tensor::from_vec(f, (dim, r), &dev)?);
    }
    let gram = |a: &Tensor| a.t()?.matmul(a);
    let mut grams = factors.iter().map(gram).collect::<CResult<Vec<_>>>()?;
    let hadamard = |skip: Option<usize>, grams: &[Tensor]| -> CResult<Tensor> {
        grams.iter().enumerate().filter(|&(e, _)| Some(e) != skip).try_fold(Tensor::ones((r, r), DType::F64, &dev)?, |acc, (_, g)| acc.mul(g))
    };
    let mut weights = Tensor::ones(r, DType::F64, &dev)?;
    let mut stop = dc::cp::AlsStop::default();
    for _ in 0..max_iters {
        let mut last_m = None;
        for d in 0..nm {
            let m = mttkrp(&t, &dims, &factors, d, r)?;
            let a = solve_normal(&m, &hadamard(Some(d), &grams)?)?;
            let nrm = a.sqr()?.sum(0)?.sqrt()?;
            // columns of norm 0 stay as they are
            let safe = nrm.gt(0.0)?.where_cond(&nrm, &Tensor::ones(r, DType::F64, &dev)?)?;
            let a = a.broadcast_div(&safe.unsqueeze(0)?)?;
            grams[d] = gram(&a)?;
            factors[d] = a;
            weights = nrm;
            last_m = Some(m);
        }
        // the fit from the last mode's MTTKRP: ‖T‖² − 2⟨T, T̂⟩ + ‖T̂‖²
        let last_m = last_m.expect("at least one mode");
        let inner = last_m.mul(&factors[nm - 1])?.broadcast_mul(&weights.unsqueeze(0)?)?.sum_all()?;
        let wcol = weights.unsqueeze(1)?;
        let nhat = wcol.t()?.matmul(&hadamard(None, &grams)?)?.matmul(&wcol)?.sum_all()?;
        let (inner, nhat) = (inner.to_scalar::<f64>()?, nhat.to_scalar::<f64>()?);
        if stop.sweep(norm2, inner, nhat, tol) {
            break;
        }
    }
    Ok(CpFit { weights: to_host(&weights)?, factors: factors.iter().map(to_host).collect::<CResult<_>>()?, iterations: stop.iterations, rel_error: stop.rel_error, converged: stop.converged })
}
