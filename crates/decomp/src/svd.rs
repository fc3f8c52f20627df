//! Truncated SVD: `W ≈ U_r diag(s_r) V_rᵀ`, stored as two factors
//! `A = U_r·diag(s_r)` (m × r) and `B = V_rᵀ` (r × n), so a layer computes `Y = (X Bᵀ) Aᵀ`.
//! Params `r·(m + n)`. By Eckart–Young the relative error is `sqrt(Σ_{i>r} s_i²) / ‖W‖_F`.
//!
//! Exact route: faer's thin SVD (f64). When only a small leading part is needed
//! (`r + 10 ≤ min(m, n)/5` and `min(m, n) ≥ 256`) the randomized route is used (Halko et al.:
//! Gaussian range finder, `q` power iterations with QR re-orthonormalization, small SVD).
//!
//! ```
//! use compactor_decomp::{factorize, from_row_major, FactorizeOptions, Method, RankChoice};
//! let w = from_row_major(4, 3, &[1., 2., 3., 2., 4., 6., 1., 0., 1., 0., 1., 0.]);
//! let f = factorize(w.as_ref(), &FactorizeOptions::new(Method::Svd, RankChoice::Rank(3))).unwrap();
//! assert!(f.rel_error(w.as_ref()) < 1e-6);
//! assert_eq!(f.params(), 3 * (4 + 3));
//! ```

use crate::error::Result;
use crate::linalg::{mm64, randomized_svd64, thin_svd64};

/// Which SVD algorithm to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub enum SvdAlgo {
    /// Randomized when the kept rank is small relative to min(m, n), exact otherwise.
    #[default]
    Auto,
    Exact,
    Randomized { oversample: usize, power_iters: usize },
}

/// Truncation rule: keep at most `max_rank` values, and the fewest whose discarded energy
/// `Σ_{i≥r} σ_i²` is at most `max_discarded`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Trunc {
    pub max_rank: usize,
    pub max_discarded: f64,
}

pub(crate) fn choose_rank(s2: &[f64], t: Trunc) -> usize {
    if t.max_discarded <= 0.0 {
        // rank-only rule: shapes are exactly what `predict` says, even for rank-deficient data
        return t.max_rank.min(s2.len()).max(1);
    }
    let mut tail = 0.0;
    let mut r = s2.len();
    // walk from the end while the tail stays within budget
    while r > 1 {
        let nt = tail + s2[r - 1].max(0.0);
        if nt > t.max_discarded {
            break;
        }
        tail = nt;
        r -= 1;
    }
    r.min(t.max_rank).max(1)
}

pub(crate) fn use_randomized(algo: SvdAlgo, rank: usize, rows: usize, cols: usize) -> Option<(usize, usize)> {
    let p = rows.min(cols);
    match algo {
        SvdAlgo::Exact => None,
        SvdAlgo::Randomized { oversample, power_iters } => Some((oversample, power_iters)),
        SvdAlgo::Auto => {
            if p >= 256 && (rank + 10) * 5 <= p {
                Some((10, 4))
            } else {
                None
            }
        }
    }
}

/// Leading left factor of a row-major `rows × cols` matrix `c`.
/// Returns `(U rows×r, next = Uᵀc  r×cols, all σ² if computed exactly (else the kept ones), discarded energy)`.
pub(crate) fn left_truncate(
    c: &[f64], rows: usize, cols: usize, t: Trunc, algo: SvdAlgo, seed: u64,
) -> Result<(Vec<f64>, usize, Vec<f64>, Vec<f64>, f64)> {
    let total: f64 = c.iter().map(|v| v * v).sum();
    let rank_only = t.max_discarded <= 0.0;
    let (u_full, p, s2, next_full): (Vec<f64>, usize, Vec<f64>, Option<Vec<f64>>) =
        match (rank_only, use_randomized(algo, t.max_rank, rows, cols)) {
            (true, Some((os, q))) => {
                let (u, s, vt) = randomized_svd64(c, rows, cols, t.max_rank, os, q, seed)?;
                let l = s.len();
                let next: Vec<f64> = { let s = &s; (0..l).flat_map(|i| vt[i * cols..(i + 1) * cols].iter().map(move |v| v * s[i])).collect() };
                (u, l, s.iter().map(|v| v * v).collect(), Some(next))
            }
            _ if 2 * rows <= cols => {
                // wide: Gram C Cᵀ (rows × rows) + symmetric eigendecomposition, next = Uᵀ C
                let g = mm64(c, rows, cols, false, c, rows, cols, true);
                let (vals, vecs) = crate::linalg::sym_eig_desc(&g, rows)?;
                (vecs, rows, vals.into_iter().map(|v| v.max(0.0)).collect(), None)
            }
            _ => {
                let (u, s, vt) = thin_svd64(c, rows, cols)?;
                let p = s.len();
                let next: Vec<f64> = { let s = &s; (0..p).flat_map(|i| vt[i * cols..(i + 1) * cols].iter().map(move |v| v * s[i])).collect() };
                (u, p, s.iter().map(|v| v * v).collect(), Some(next))
            }
        };
    let r = choose_rank(&s2, t).min(p);
    let u: Vec<f64> = (0..rows).flat_map(|i| u_full[i * p..i * p + r].iter().copied()).collect();
    let next = match next_full {
        Some(nf) => nf[..r * cols].to_vec(),
        None => mm64(&u, rows, r, true, c, rows, cols, false),
    };
    let kept: f64 = next.iter().map(|v| v * v).sum();
    let discarded = (total - kept).max(0.0);
    Ok((u, r, s2, next, discarded))
}

/// Truncated SVD of row-major `w` (m × n): returns (A = U_r diag(s) m×r, B = V_rᵀ r×n, r, discarded energy).
pub(crate) fn truncated_svd(w: &[f64], m: usize, n: usize, t: Trunc, algo: SvdAlgo, seed: u64) -> Result<(Vec<f64>, Vec<f64>, usize, f64)> {
    // factor from the smaller side for the "left" routine: work on Wᵀ when m > n so that the
    // kept left vectors are V (n × r) and next = diag(s) U_rᵀ.
    if m <= n {
        let (u, r, _s2, next, disc) = left_truncate(w, m, n, t, algo, seed)?;
        // next = U_rᵀ W = diag(s) V_rᵀ; A = U_r diag(s), B = V_rᵀ = diag(1/s) next
        // Normalize rows of next to get B, put the norms into A (robust: the row norms of next are s_i).
        let (a, b) = split_scale(&u, m, r, &next, n);
        Ok((a, b, r, disc))
    } else {
        let wt = crate::linalg::permute(w, &[m, n], &[1, 0]);
        let (v, r, _s2, next, disc) = left_truncate(&wt, n, m, t, algo, seed)?;
        // next = V_rᵀ Wᵀ = (W V_r)ᵀ = (U_r diag(s))ᵀ  (r × m) → A = nextᵀ, B = V_rᵀ
        let a = crate::linalg::permute(&next, &[r, m], &[1, 0]);
        let b = crate::linalg::permute(&v, &[n, r], &[1, 0]);
        Ok((a, b, r, disc))
    }
}

/// Given orthonormal `u` (m × r) and `next = uᵀW` (r × n) with orthogonal rows, return
/// `A = u·diag(‖next_i‖)` and `B = diag(1/‖next_i‖)·next` so that B has orthonormal rows.
fn split_scale(u: &[f64], m: usize, r: usize, next: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let norms: Vec<f64> = (0..r).map(|i| next[i * n..(i + 1) * n].iter().map(|v| v * v).sum::<f64>().sqrt()).collect();
    let mut a = u.to_vec();
    for i in 0..m {
        for j in 0..r {
            a[i * r + j] *= norms[j];
        }
    }
    let mut b = next.to_vec();
    for i in 0..r {
        let inv = if norms[i] > 0.0 { 1.0 / norms[i] } else { 0.0 };
        for v in &mut b[i * n..(i + 1) * n] {
            *v *= inv;
        }
    }
    (a, b)
}
