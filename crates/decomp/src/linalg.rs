//! Thin helpers over faer on row-major buffers: matmul with optional transposes, permutation of
//! row-major tensors, Gram eigendecompositions, thin SVD, QR and a randomized range finder.
//! Everything heavy is faer's; this module only adapts layouts.

use crate::error::{DecompError, Result};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

pub(crate) fn par() -> Par {
    faer::get_global_parallelism()
}

macro_rules! mm_impl {
    ($name:ident, $t:ty) => {
        /// `op(a) · op(b)` for row-major `a` (ar × ac) and `b` (br × bc); `ta`/`tb` transpose.
        /// Returns a row-major buffer.
        pub(crate) fn $name(
            a: &[$t], ar: usize, ac: usize, ta: bool,
            b: &[$t], br: usize, bc: usize, tb: bool,
        ) -> Vec<$t> {
            let la = MatRef::from_row_major_slice(a, ar, ac);
            let lb = MatRef::from_row_major_slice(b, br, bc);
            let la = if ta { la.transpose() } else { la };
            let lb = if tb { lb.transpose() } else { lb };
            let (r, c) = (la.nrows(), lb.ncols());
            debug_assert_eq!(la.ncols(), lb.nrows());
            let mut out = vec![0.0 as $t; r * c];
            if r > 0 && c > 0 {
                let dst = MatMut::from_row_major_slice_mut(&mut out, r, c);
                matmul(dst, Accum::Replace, la, lb, 1.0 as $t, par());
            }
            out
        }
    };
}
mm_impl!(mm64, f64);
mm_impl!(mm32, f32);

/// Permute the axes of a row-major tensor: `out.shape[d] = shape[perm[d]]`.
pub(crate) fn permute<T: Copy + Default>(src: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    let nd = shape.len();
    debug_assert_eq!(perm.len(), nd);
    let total: usize = shape.iter().product();
    debug_assert_eq!(total, src.len());
    if perm.iter().enumerate().all(|(i, &p)| i == p) || total == 0 {
        return src.to_vec();
    }
    let mut sstride = vec![1usize; nd];
    for d in (0..nd.saturating_sub(1)).rev() {
        sstride[d] = sstride[d + 1] * shape[d + 1];
    }
    let oshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let ostride: Vec<usize> = perm.iter().map(|&p| sstride[p]).collect();
    let mut out = Vec::with_capacity(total);
    let last = nd - 1;
    let (ln, ls) = (oshape[last], ostride[last]);
    let mut idx = vec![0usize; nd];
    let mut base = 0usize;
    loop {
        if ls == 1 {
            out.extend_from_slice(&src[base..base + ln]);
        } else {
            let mut o = base;
            for _ in 0..ln {
                out.push(src[o]);
                o += ls;
            }
        }
        // odometer over axes 0..last
        let mut d = last;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            base += ostride[d];
            if idx[d] < oshape[d] {
                break;
            }
            base -= ostride[d] * oshape[d];
            idx[d] = 0;
        }
    }
}

/// Move axis `d` to the front; returns the row-major `(shape[d]) × (rest)` unfolding.
pub(crate) fn unfold<T: Copy + Default>(src: &[T], shape: &[usize], d: usize) -> Vec<T> {
    let mut perm = vec![d];
    perm.extend((0..shape.len()).filter(|&e| e != d));
    permute(src, shape, &perm)
}

/// Inverse of [`unfold`]: `data` has shape `[shape[d], rest...]`, return with axis order `shape`.
pub(crate) fn fold<T: Copy + Default>(data: &[T], shape: &[usize], d: usize) -> Vec<T> {
    let mut ushape = vec![shape[d]];
    ushape.extend((0..shape.len()).filter(|&e| e != d).map(|e| shape[e]));
    // unfolded axis a comes from original axis order[a]; invert
    let mut perm = vec![0usize; shape.len()];
    // out axis e is at position: e==d ->0, else 1 + rank among others
    let mut k = 1;
    for (e, p) in perm.iter_mut().enumerate() {
        if e == d {
            *p = 0;
        } else {
            *p = k;
            k += 1;
        }
    }
    permute(data, &ushape, &perm)
}

/// Mode-`d` product: `out[..., p, ...] = Σ_q M[p, q] T[..., q, ...]`, `M` row-major (new × shape[d]).
pub(crate) fn mode_product64(t: &[f64], shape: &[usize], d: usize, mat: &[f64], new: usize) -> (Vec<f64>, Vec<usize>) {
    let old = shape[d];
    let rest = t.len() / old.max(1);
    let u = unfold(t, shape, d);
    let prod = mm64(mat, new, old, false, &u, old, rest, false);
    let mut nshape = shape.to_vec();
    nshape[d] = new;
    (fold(&prod, &nshape, d), nshape)
}

pub(crate) fn mode_product32(t: &[f32], shape: &[usize], d: usize, mat: &[f32], new: usize) -> (Vec<f32>, Vec<usize>) {
    let old = shape[d];
    let rest = t.len() / old.max(1);
    let u = unfold(t, shape, d);
    let prod = mm32(mat, new, old, false, &u, old, rest, false);
    let mut nshape = shape.to_vec();
    nshape[d] = new;
    (fold(&prod, &nshape, d), nshape)
}

/// Eigenpairs of a symmetric row-major `k × k` matrix, eigenvalues DESCENDING, eigenvectors as
/// columns of a row-major `k × k` buffer (column i pairs with value i).
pub fn sym_eig_desc(g: &[f64], k: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let gm = MatRef::from_row_major_slice(g, k, k);
    let evd = gm
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| DecompError::Linalg(format!("self-adjoint eigendecomposition failed: {e:?}")))?;
    let s = evd.S().column_vector();
    let u = evd.U();
    let vals: Vec<f64> = (0..k).rev().map(|i| s[i]).collect();
    let mut vecs = vec![0.0; k * k];
    for r in 0..k {
        for c in 0..k {
            vecs[r * k + c] = u[(r, k - 1 - c)];
        }
    }
    Ok((vals, vecs))
}

/// Thin SVD of a row-major `rows × cols` matrix: (U rows×p row-major, s (p), Vᵀ p×cols row-major).
pub(crate) fn thin_svd64(a: &[f64], rows: usize, cols: usize) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let am = MatRef::from_row_major_slice(a, rows, cols);
    let svd = am
        .thin_svd()
        .map_err(|e| DecompError::Linalg(format!("SVD of a {rows} x {cols} matrix did not converge: {e:?}")))?;
    let p = rows.min(cols);
    let s: Vec<f64> = (0..p).map(|i| svd.S().column_vector()[i]).collect();
    Ok((to_rm(svd.U()), s, to_rm(svd.V().transpose())))
}

#[allow(dead_code)]
pub(crate) fn thin_svd32(a: &[f32], rows: usize, cols: usize) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let am = MatRef::from_row_major_slice(a, rows, cols);
    let svd = am
        .thin_svd()
        .map_err(|e| DecompError::Linalg(format!("SVD of a {rows} x {cols} matrix did not converge: {e:?}")))?;
    let p = rows.min(cols);
    let s: Vec<f32> = (0..p).map(|i| svd.S().column_vector()[i]).collect();
    Ok((to_rm(svd.U()), s, to_rm(svd.V().transpose())))
}

pub(crate) fn to_rm<T: Copy>(m: MatRef<'_, T>) -> Vec<T> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut out = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            out.push(m[(i, j)]);
        }
    }
    out
}

/// Orthonormal basis (thin Q) of a row-major `rows × cols` (rows ≥ cols) matrix.
pub(crate) fn thin_q64(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let q = MatRef::from_row_major_slice(a, rows, cols).qr().compute_thin_Q();
    to_rm(q.as_ref())
}

/// `rows × cols` standard normal samples (row-major) from a seeded `StdRng`: the same numbers on
/// every machine for one seed (CP's random initial columns, the range finders' test matrices).
pub(crate) fn gaussian64(rows: usize, cols: usize, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..rows * cols).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// Halko–Martinsson–Tropp randomized range finder + small SVD.
/// Returns (U rows×l, s (l), B = Qᵀ A as l×cols, Ub l×l) truncated later by callers; here we return
/// U (rows × l), s (l), Vᵀ (l × cols) with l = min(rank + oversample, rows, cols).
pub(crate) fn randomized_svd64(
    a: &[f64], rows: usize, cols: usize, rank: usize, oversample: usize, power_iters: usize, seed: u64,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let l = (rank + oversample).min(rows).min(cols);
    let omega = gaussian64(cols, l, seed);
    let y = mm64(a, rows, cols, false, &omega, cols, l, false);
    let mut q = thin_q64(&y, rows, l);
    for _ in 0..power_iters {
        let z = mm64(a, rows, cols, true, &q, rows, l, false); // cols × l
        let qz = thin_q64(&z, cols, l);
        let y = mm64(a, rows, cols, false, &qz, cols, l, false);
        q = thin_q64(&y, rows, l);
    }
    let b = mm64(&q, rows, l, true, a, rows, cols, false); // l × cols
    let (ub, s, vt) = thin_svd64(&b, l, cols)?;
    let u = mm64(&q, rows, l, false, &ub, l, l, false);
    Ok((u, s, vt))
}

/// Convert a faer matrix to a row-major f64 buffer, rejecting empty matrices and non-finite values.
pub(crate) fn checked_f64(w: MatRef<'_, f32>) -> Result<Vec<f64>> {
    let (m, n) = (w.nrows(), w.ncols());
    if m == 0 || n == 0 {
        return Err(DecompError::Empty { m, n });
    }
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let v = w[(i, j)];
            if !v.is_finite() {
                return Err(DecompError::NonFinite { row: i, col: j, value: v });
            }
            out.push(v as f64);
        }
    }
    Ok(out)
}

/// Row-major f32 buffer → faer `Mat<f32>`.
pub fn from_row_major(m: usize, n: usize, data: &[f32]) -> Mat<f32> {
    assert_eq!(data.len(), m * n, "from_row_major: {} values for a {m} x {n} matrix", data.len());
    Mat::from_fn(m, n, |i, j| data[i * n + j])
}

/// faer matrix → row-major f32 buffer.
pub fn to_row_major(w: &Mat<f32>) -> Vec<f32> {
    to_rm(w.as_ref())
}

#[allow(dead_code)]
pub(crate) fn mat_from_rm64(m: usize, n: usize, data: &[f64]) -> Mat<f32> {
    Mat::from_fn(m, n, |i, j| data[i * n + j] as f32)
}

/// Reject empty matrices and non-finite values (with their position).
pub(crate) fn check_finite(w: MatRef<'_, f32>) -> Result<()> {
    let (m, n) = (w.nrows(), w.ncols());
    if m == 0 || n == 0 {
        return Err(DecompError::Empty { m, n });
    }
    for i in 0..m {
        for j in 0..n {
            let v = w[(i, j)];
            if !v.is_finite() {
                return Err(DecompError::NonFinite { row: i, col: j, value: v });
            }
        }
    }
    Ok(())
}
