//! Singular-value spectrum of one weight matrix and derived statistics.
//!
//! - `singular_values`: all σ_i of W (m × n), descending, computed in f64 by faer.
//! - `stable_rank = ‖W‖_F² / σ_max²`.
//! - `entropy_effective_rank = exp(H)`, `H = −Σ p_i ln p_i`, `p_i = σ_i / Σσ`.
//! - `energy_at_rank[r-1] = Σ_{i<r} σ_i² / Σ σ_i²` (cumulative energy kept at rank r).
//! - WeightWatcher-style power law on the eigenvalues `λ_i = σ_i²`: for each candidate `xmin`
//!   (every eigenvalue with at least 3 above it… and itself), MLE `α = 1 + n / Σ_{λ≥xmin} ln(λ/xmin)`;
//!   the `xmin` minimizing the Kolmogorov–Smirnov distance between the empirical tail CDF and
//!   `1 − (λ/xmin)^{1−α}` is kept (`alpha`, `alpha_xmin`, `alpha_ks`).
//!
//! ```
//! use compactor_decomp::{from_row_major, spectrum};
//! let w = from_row_major(2, 2, &[3.0, 0.0, 0.0, 4.0]);
//! let s = spectrum(w.as_ref()).unwrap();
//! assert!((s.singular_values[0] - 4.0).abs() < 1e-12);
//! assert!((s.stable_rank - 25.0 / 16.0).abs() < 1e-12);
//! ```

use crate::error::{DecompError, Result};
use crate::linalg::checked_f64;
use faer::MatRef;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spectrum {
    pub m: usize,
    pub n: usize,
    pub singular_values: Vec<f64>,
    pub frobenius_norm: f64,
    pub stable_rank: f64,
    pub entropy_effective_rank: f64,
    pub energy_at_rank: Vec<f64>,
    /// Power-law exponent of the eigenvalue tail (None when fewer than 4 positive eigenvalues).
    pub alpha: Option<f64>,
    pub alpha_xmin: Option<f64>,
    pub alpha_ks: Option<f64>,
}

/// All singular values of `w`, descending (f64).
pub fn singular_values(w: MatRef<'_, f32>) -> Result<Vec<f64>> {
    let (m, n) = (w.nrows(), w.ncols());
    let data = checked_f64(w)?;
    let a = MatRef::from_row_major_slice(&data, m, n);
    let mut s = if m >= n { a.singular_values() } else { a.transpose().singular_values() }
        .map_err(|e| DecompError::Linalg(format!("SVD of a {m} x {n} matrix did not converge: {e:?}")))?;
    s.sort_by(|a, b| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal));
    Ok(s)
}

pub fn spectrum(w: MatRef<'_, f32>) -> Result<Spectrum> {
    let (m, n) = (w.nrows(), w.ncols());
    let s = singular_values(w)?;
    Ok(spectrum_from_values(m, n, s))
}

/// Statistics from already computed singular values (descending).
pub fn spectrum_from_values(m: usize, n: usize, s: Vec<f64>) -> Spectrum {
    let e2: f64 = s.iter().map(|v| v * v).sum();
    let smax = s.first().copied().unwrap_or(0.0);
    let stable_rank = if smax > 0.0 { e2 / (smax * smax) } else { 0.0 };
    let ssum: f64 = s.iter().sum();
    let h: f64 = if ssum > 0.0 {
        s.iter().filter(|&&v| v > 0.0).map(|&v| {
            let p = v / ssum;
            -p * p.ln()
        }).sum()
    } else {
        0.0
    };
    let mut acc = 0.0;
    let energy_at_rank = s
        .iter()
        .map(|v| {
            acc += v * v;
            if e2 > 0.0 { acc / e2 } else { 1.0 }
        })
        .collect();
    let (alpha, alpha_xmin, alpha_ks) = match power_law_fit(&s.iter().map(|v| v * v).collect::<Vec<_>>()) {
        Some((a, x, d)) => (Some(a), Some(x), Some(d)),
        None => (None, None, None),
    };
    Spectrum {
        m,
        n,
        frobenius_norm: e2.sqrt(),
        stable_rank,
        entropy_effective_rank: if ssum > 0.0 { h.exp() } else { 0.0 },
        energy_at_rank,
        singular_values: s,
        alpha,
        alpha_xmin,
        alpha_ks,
    }
}

/// Power-law fit of positive `eigs` (any order): (alpha, xmin, ks distance).
pub fn power_law_fit(eigs: &[f64]) -> Option<(f64, f64, f64)> {
    let smax = eigs.iter().cloned().fold(0.0, f64::max);
    let mut x: Vec<f64> = eigs.iter().copied().filter(|&v| v > smax * 1e-12 && v.is_finite()).collect();
    if x.len() < 4 {
        return None;
    }
    x.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let logs: Vec<f64> = x.iter().map(|v| v.ln()).collect();
    // suffix sums of logs
    let mut suffix = vec![0.0; x.len() + 1];
    for i in (0..x.len()).rev() {
        suffix[i] = suffix[i + 1] + logs[i];
    }
    let mut best: Option<(f64, f64, f64)> = None;
    // every x is a candidate xmin up to 1024 values; above that an evenly spaced 1024 of them
    // (the KS scan is quadratic: 4096 eigenvalues cost 0.2 s per matrix otherwise)
    let step = (x.len() - 3).div_ceil(1024).max(1);
    for i in (0..x.len() - 3).step_by(step) {
        let xmin = x[i];
        if i > 0 && x[i] == x[i - 1] {
            continue;
        }
        let nt = (x.len() - i) as f64;
        let sum_ln = suffix[i] - nt * logs[i];
        if sum_ln <= 0.0 {
            continue;
        }
        let alpha = 1.0 + nt / sum_ln;
        let mut d: f64 = 0.0;
        for (k, &lv) in logs[i..].iter().enumerate() {
            // (v / xmin)^(1 − α) through the logs already taken
            let fit = 1.0 - ((lv - logs[i]) * (1.0 - alpha)).exp();
            let lo = k as f64 / nt;
            let hi = (k + 1) as f64 / nt;
            d = d.max((fit - lo).abs()).max((hi - fit).abs());
        }
        if best.map(|b| d < b.2).unwrap_or(true) {
            best = Some((alpha, xmin, d));
        }
    }
    best
}
