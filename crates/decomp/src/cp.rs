//! CP (CANDECOMP/PARAFAC) decomposition of the tensorized matrix.
//!
//! `T[i1, j1, …, ik, jk] ≈ Σ_{r<R} λ_r · Π_d A_d[idx_d, r]` with factor matrices
//! `A_d` of shape `(dim_d × R)` (unit-norm columns), `dim = (m1, n1, m2, n2, …)`, weights `λ` (R).
//! Equivalently `W ≈ KR_rows · diag(λ) · KR_colsᵀ` with Khatri–Rao products of the row and column
//! factors, which is how [`crate::Factorization::apply`] runs it (`R·(m+n)` work per row of X).
//! Params `R·Σ dim_d + R`.
//! Fit: CP-ALS, SVD initialisation (random columns beyond a mode's dimension), column
//! normalisation after each update, stop when the relative error changes by less than `tol`
//! or after `max_iters` sweeps; the iteration count is reported.
//!
//! ```
//! use compactor_decomp::{factorize_report, from_row_major, FactorizeOptions, Method, RankChoice};
//! let data: Vec<f32> = (0..16 * 16).map(|i| 1.0 + (i % 16) as f32).collect(); // rank-1 structure
//! let w = from_row_major(16, 16, &data);
//! let (f, rep) = factorize_report(w.as_ref(), &FactorizeOptions::new(Method::Cp, RankChoice::Rank(4))).unwrap();
//! assert!(rep.iterations >= 1);
//! assert_eq!(f.params(), 4 * (2 + 2 + 2 + 2 + 2 + 2 + 2 + 2) + 4);
//! ```

use crate::error::Result;
use crate::linalg::{gaussian64, mm32, mm64, sym_eig_desc, unfold};

pub fn params_for_rank(dims: &[usize], r: usize) -> usize {
    r * dims.iter().sum::<usize>() + r
}

pub(crate) struct CpResult {
    pub weights: Vec<f64>,
    pub factors: Vec<Vec<f64>>,
    pub iterations: usize,
    pub rel_error: f64,
    pub converged: bool,
}

/// Khatri–Rao product over `modes` (row-major over the mode indices in order): (Π dims × R).
fn khatri_rao<T: Copy + std::ops::Mul<Output = T> + From<f32>>(factors: &[&[T]], dims: &[usize], r: usize) -> Vec<T> {
    let mut acc: Vec<T> = vec![T::from(1.0); r];
    let mut rows = 1;
    for (f, &d) in factors.iter().zip(dims) {
        let mut next = Vec::with_capacity(rows * d * r);
        for q in 0..rows {
            for i in 0..d {
                for c in 0..r {
                    next.push(acc[q * r + c] * f[i * r + c]);
                }
            }
        }
        acc = next;
        rows *= d;
    }
    acc
}

/// Matricized tensor times Khatri–Rao product for mode d: (dim_d × R).
fn mttkrp(t: &[f64], dims: &[usize], factors: &[Vec<f64>], d: usize, r: usize) -> Vec<f64> {
    let dim = dims[d];
    let u = unfold(t, dims, d); // dim × (others in order)
    let others: Vec<usize> = (0..dims.len()).filter(|&e| e != d).collect();
    let rest: usize = others.iter().map(|&e| dims[e]).product();
    // split others into A (prefix) and B (suffix) with |A| ≈ sqrt(rest)
    let mut h = 0;
    let mut pa = 1usize;
    while h < others.len() && pa * pa < rest {
        pa *= dims[others[h]];
        h += 1;
    }
    let (a_modes, b_modes) = others.split_at(h);
    let pb = rest / pa;
    let fa: Vec<&[f64]> = a_modes.iter().map(|&e| factors[e].as_slice()).collect();
    let fb: Vec<&[f64]> = b_modes.iter().map(|&e| factors[e].as_slice()).collect();
    let da: Vec<usize> = a_modes.iter().map(|&e| dims[e]).collect();
    let db: Vec<usize> = b_modes.iter().map(|&e| dims[e]).collect();
    let kra = khatri_rao(&fa, &da, r);
    let krb = khatri_rao(&fb, &db, r);
    let p = mm64(&u, dim * pa, pb, false, &krb, pb, r, false); // (dim·pa) × r
    let mut m = vec![0.0; dim * r];
    for i in 0..dim {
        for a in 0..pa {
            let row = &p[(i * pa + a) * r..(i * pa + a + 1) * r];
            let ka = &kra[a * r..(a + 1) * r];
            for c in 0..r {
                m[i * r + c] += row[c] * ka[c];
            }
        }
    }
    m
}

fn gram(a: &[f64], rows: usize, r: usize) -> Vec<f64> {
    let mut out = vec![0.0; r * r];
    gram_into(a, rows, r, &mut out);
    out
}

/// [`gram`] into an existing r × r buffer (ALS's per-step Grams, without a fresh allocation).
fn gram_into(a: &[f64], rows: usize, r: usize, out: &mut [f64]) {
    let la = faer::MatRef::from_row_major_slice(a, rows, r);
    let dst = faer::MatMut::from_row_major_slice_mut(out, r, r);
    faer::linalg::matmul::matmul(dst, faer::Accum::Replace, la.transpose(), la, 1.0, crate::linalg::par());
}

/// A = M V⁻¹ (M: rows × r, V: r × r symmetric PSD, the Hadamard product of the other modes'
/// Grams) by a Cholesky solve with a tiny ridge; the eigen pseudo-inverse only when V is
/// numerically singular. (An eigendecomposition per mode step made CP-ALS at rank ~1000 take
/// minutes per layer.)
pub fn solve_normal(m: &[f64], rows: usize, v: &[f64], r: usize) -> Result<Vec<f64>> {
    NormalSolver::new(r).solve(m, rows, v)
}

/// [`solve_normal`] with its r × r factor and scratch kept between calls: CP-ALS solves one
/// such system per mode step, and fresh r × r buffers (above glibc's mmap threshold, which the
/// CLI lowers to 4 MiB) were page-faulted in anew every time.
struct NormalSolver {
    l: faer::Mat<f64>,
    scratch: faer::dyn_stack::MemBuffer,
}

impl NormalSolver {
    fn new(r: usize) -> Self {
        let req = faer::linalg::cholesky::llt::factor::cholesky_in_place_scratch::<f64>(r, crate::linalg::par(), Default::default());
        Self { l: faer::Mat::zeros(r, r), scratch: faer::dyn_stack::MemBuffer::new(req) }
    }

    fn solve(&mut self, m: &[f64], rows: usize, v: &[f64]) -> Result<Vec<f64>> {
        use faer::linalg::cholesky::llt;
        let r = self.l.nrows();
        let tr = (0..r).map(|i| v[i * r + i]).sum::<f64>() / r as f64;
        let ridge = 1e-12 * tr.max(f64::MIN_POSITIVE);
        for j in 0..r {
            for i in 0..r {
                self.l[(i, j)] = v[i * r + j] + if i == j { ridge } else { 0.0 };
            }
        }
        let stack = faer::dyn_stack::MemStack::new(&mut self.scratch);
        let par = crate::linalg::par();
        if llt::factor::cholesky_in_place(self.l.as_mut(), Default::default(), par, stack, Default::default()).is_err() {
            let vp = pinv_sym(v, r)?;
            return Ok(mm64(m, rows, r, false, &vp, r, r, false));
        }
        // V Aᵀ = Mᵀ
        let mut x = faer::Mat::<f64>::from_fn(r, rows, |i, j| m[j * r + i]);
        llt::solve::solve_in_place_with_conj(self.l.as_ref(), faer::Conj::No, x.as_mut(), par, stack);
        Ok((0..rows).flat_map(|i| (0..r).map(move |c| (i, c))).map(|(i, c)| x[(c, i)]).collect())
    }
}

fn pinv_sym(v: &[f64], r: usize) -> Result<Vec<f64>> {
    let (vals, vecs) = sym_eig_desc(v, r)?;
    let cut = vals[0].abs() * 1e-12;
    let mut out = vec![0.0; r * r];
    for (e, &lam) in vals.iter().enumerate() {
        if lam > cut {
            let inv = 1.0 / lam;
            for i in 0..r {
                let vi = vecs[i * r + e] * inv;
                for j in 0..r {
                    out[i * r + j] += vi * vecs[j * r + e];
                }
            }
        }
    }
    Ok(out)
}

/// The most memory CP-ALS may ask for: its r × r f64 matrices (one Gram per mode, the
/// Hadamard product V, and the solver's copy) grow with the square of the rank, and the rank that
/// keeps half the parameters of a 4096 × 4096 matrix (~129 000) would need over a terabyte.
pub const ALS_MAX_BYTES: usize = 8 << 30;

/// Checks, before anything is allocated, that CP-ALS at rank `r` on an `m × n` matrix with
/// `modes` tensor modes fits in [`ALS_MAX_BYTES`] (the CPU fit and the GPU one hold the same
/// r × r matrices).
pub fn check_als_size(m: usize, n: usize, modes: usize, r: usize) -> Result<()> {
    let count = modes + 3;
    let bytes = |r: usize| (count as f64) * (r as f64) * (r as f64) * 8.0;
    if bytes(r) <= ALS_MAX_BYTES as f64 {
        return Ok(());
    }
    let max_rank = ((ALS_MAX_BYTES as f64 / (count as f64 * 8.0)).sqrt().floor() as usize).max(1);
    Err(crate::DecompError::CpTooLarge { rank: r, m, n, count, needed_gib: bytes(r) / (1u64 << 30) as f64, limit_gib: ALS_MAX_BYTES >> 30, max_rank })
}

/// CP-ALS's stop rule, shared by the CPU fit and the GPU one (`compactor-core`'s `gpu_tn`) so
/// that both stop after the same sweep: the relative error from `‖T‖²`, `⟨T, T̂⟩` and `‖T̂‖²`,
/// stop once it changes by less than `tol`.
#[derive(Debug, Clone, Copy)]
pub struct AlsStop {
    pub rel_error: f64,
    pub iterations: usize,
    pub converged: bool,
}

impl Default for AlsStop {
    fn default() -> Self {
        Self { rel_error: 1.0, iterations: 0, converged: false }
    }
}

impl AlsStop {
    /// Records one sweep; true when the fit should stop.
    pub fn sweep(&mut self, norm2: f64, inner: f64, nhat: f64, tol: f64) -> bool {
        let nrel = ((norm2 - 2.0 * inner + nhat).max(0.0) / norm2).sqrt();
        self.iterations += 1;
        let change = (self.rel_error - nrel).abs();
        self.rel_error = nrel;
        self.converged = change < tol;
        self.converged
    }
}

/// A mode's starting factor (`dim × r`, row-major): its Gram's eigenvectors (`vecs`, columns of
/// a row-major `dim × dim` buffer, descending) first, seeded normal columns scaled by 1/√dim
/// beyond them; the CPU fit and `compactor-core`'s GPU one start from the same numbers.
pub fn start_columns(vecs: &[f64], dim: usize, r: usize, seed: u64) -> Vec<f64> {
    let rnd = gaussian64(dim, r, seed);
    let scale = (dim as f64).sqrt();
    (0..dim).flat_map(|i| (0..r).map(move |c| (i, c))).map(|(i, c)| if c < dim { vecs[i * dim + c] } else { rnd[i * r + c] / scale }).collect()
}

pub(crate) fn cp_als(w: &[f64], row_dims: &[usize], col_dims: &[usize], r: usize, max_iters: usize, tol: f64, seed: u64) -> Result<CpResult> {
    let dims = crate::sites::interleaved(row_dims, col_dims);
    check_als_size(row_dims.iter().product(), col_dims.iter().product(), dims.len(), r)?;
    let t = crate::sites::matrix_to_tensor(w, row_dims, col_dims);
    let nm = dims.len();
    let norm2: f64 = t.iter().map(|v| v * v).sum::<f64>().max(f64::MIN_POSITIVE);
    // SVD init
    let mut factors = Vec::with_capacity(nm);
    for d in 0..nm {
        let dim = dims[d];
        let rest = t.len() / dim;
        let u = unfold(&t, &dims, d);
        let g = mm64(&u, dim, rest, false, &u, dim, rest, true);
        let (_, vecs) = sym_eig_desc(&g, dim)?;
        factors.push(start_columns(&vecs, dim, r, seed.wrapping_add(d as u64)));
    }
    let mut grams: Vec<Vec<f64>> = factors.iter().zip(&dims).map(|(f, &d)| gram(f, d, r)).collect();
    let mut weights = vec![1.0; r];
    let mut stop = AlsStop::default();
    // the r × r buffers of every mode step, allocated once
    let mut v = vec![1.0; r * r];
    let mut solver = NormalSolver::new(r);
    for _ in 0..max_iters {
        let mut last_m = Vec::new();
        for d in 0..nm {
            let m = mttkrp(&t, &dims, &factors, d, r);
            v.fill(1.0);
            for (e, g) in grams.iter().enumerate() {
                if e != d {
                    for (x, y) in v.iter_mut().zip(g) {
                        *x *= y;
                    }
                }
            }
            let mut a = solver.solve(&m, dims[d], &v)?;
            for c in 0..r {
                let nrm = (0..dims[d]).map(|i| a[i * r + c] * a[i * r + c]).sum::<f64>().sqrt();
                weights[c] = nrm;
                if nrm > 0.0 {
                    for i in 0..dims[d] {
                        a[i * r + c] /= nrm;
                    }
                }
            }
            gram_into(&a, dims[d], r, &mut grams[d]);
            factors[d] = a;
            last_m = m;
        }
        // fit from the last mode's MTTKRP
        let d = nm - 1;
        let mut inner = 0.0;
        for i in 0..dims[d] {
            for c in 0..r {
                inner += last_m[i * r + c] * factors[d][i * r + c] * weights[c];
            }
        }
        let h = &mut v;
        h.fill(1.0);
        for g in &grams {
            for (x, y) in h.iter_mut().zip(g) {
                *x *= y;
            }
        }
        let mut nhat = 0.0;
        for i in 0..r {
            for j in 0..r {
                nhat += weights[i] * h[i * r + j] * weights[j];
            }
        }
        if stop.sweep(norm2, inner, nhat, tol) {
            break;
        }
    }
    Ok(CpResult { weights, factors, iterations: stop.iterations, rel_error: stop.rel_error, converged: stop.converged })
}

/// Khatri–Rao products of the row factors (modes 0,2,4,…) and column factors (1,3,5,…).
fn kr_rows_cols(factors: &[std::borrow::Cow<'_, [f32]>], row_dims: &[usize], col_dims: &[usize], r: usize) -> (Vec<f32>, Vec<f32>) {
    let k = row_dims.len();
    let fr: Vec<&[f32]> = (0..k).map(|t| &*factors[2 * t]).collect();
    let fc: Vec<&[f32]> = (0..k).map(|t| &*factors[2 * t + 1]).collect();
    (khatri_rao(&fr, row_dims, r), khatri_rao(&fc, col_dims, r))
}

pub(crate) fn cp_apply(weights: &[f32], factors: &[std::borrow::Cow<'_, [f32]>], row_dims: &[usize], col_dims: &[usize], x: &[f32], batch: usize) -> Vec<f32> {
    let r = weights.len();
    let (m, n) = (row_dims.iter().product::<usize>(), col_dims.iter().product::<usize>());
    let (kr_r, kr_c) = kr_rows_cols(factors, row_dims, col_dims, r);
    let mut z = mm32(x, batch, n, false, &kr_c, n, r, false);
    for b in 0..batch {
        for c in 0..r {
            z[b * r + c] *= weights[c];
        }
    }
    mm32(&z, batch, r, false, &kr_r, m, r, true)
}

pub(crate) fn cp_reconstruct(weights: &[f32], factors: &[std::borrow::Cow<'_, [f32]>], row_dims: &[usize], col_dims: &[usize]) -> Vec<f32> {
    let r = weights.len();
    let (m, n) = (row_dims.iter().product::<usize>(), col_dims.iter().product::<usize>());
    let (mut kr_r, kr_c) = kr_rows_cols(factors, row_dims, col_dims, r);
    for i in 0..m {
        for c in 0..r {
            kr_r[i * r + c] *= weights[c];
        }
    }
    mm32(&kr_r, m, r, false, &kr_c, n, r, true)
}
