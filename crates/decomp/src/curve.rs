//! Error curves: relative Frobenius error versus kept parameter ratio for one layer.
//!
//! For SVD the curve comes from the spectrum (Eckart–Young: `sqrt(Σ_{i>r} σ_i²)/‖W‖`), for the
//! other methods from running [`crate::factorize`] at each ratio. Ratios too small for rank 1
//! of a method are skipped.
//!
//! ```
//! use compactor_decomp::{error_curve, from_row_major, Method};
//! let data: Vec<f32> = (0..32 * 32).map(|i| ((i * 37 % 101) as f32).sin()).collect();
//! let w = from_row_major(32, 32, &data);
//! let pts = error_curve(w.as_ref(), &[Method::Svd], &[0.25, 0.5, 1.0]).unwrap();
//! assert_eq!(pts.len(), 3);
//! assert!(pts[0].rel_error >= pts[1].rel_error && pts[1].rel_error >= pts[2].rel_error);
//! ```

use crate::error::{DecompError, Result};
use crate::factorization::{factorize, rank_for_ratio, FactorizeOptions, Method, RankChoice};
use faer::MatRef;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub method: Method,
    /// Requested fraction of params kept.
    pub ratio: f64,
    /// Actual params of the factorization.
    pub params: usize,
    pub rel_error: f64,
    pub rank: Vec<usize>,
}

pub fn error_curve(w: MatRef<'_, f32>, methods: &[Method], ratios: &[f64]) -> Result<Vec<CurvePoint>> {
    error_curve_with(w, methods, ratios, &FactorizeOptions::new(Method::Svd, RankChoice::Rank(1)))
}

/// [`error_curve`] with the fit settings of `base` (sites, iteration budget, tolerance, seed) for
/// the non-SVD methods; its method and rank choice are ignored.
pub fn error_curve_with(w: MatRef<'_, f32>, methods: &[Method], ratios: &[f64], base: &FactorizeOptions) -> Result<Vec<CurvePoint>> {
    let (m, n) = (w.nrows(), w.ncols());
    let mut out = Vec::new();
    let mut svals: Option<Vec<f64>> = None;
    for &method in methods {
        for &ratio in ratios {
            let sites = if method == Method::Svd { None } else { base.sites.as_ref() };
            let r = match rank_for_ratio(m, n, method, ratio, sites) {
                Ok(r) => r,
                Err(DecompError::RatioTooSmall { .. }) => continue,
                Err(e) => return Err(e),
            };
            if method == Method::Svd {
                if svals.is_none() {
                    svals = Some(crate::spectrum::singular_values(w)?);
                }
                let s = svals.as_ref().unwrap();
                let tot: f64 = s.iter().map(|v| v * v).sum();
                let tail: f64 = s[r.min(s.len())..].iter().map(|v| v * v).sum();
                out.push(CurvePoint { method, ratio, params: r * (m + n), rel_error: (tail / tot.max(f64::MIN_POSITIVE)).sqrt(), rank: vec![r] });
            } else {
                let mut o = base.clone();
                o.method = method;
                // a ratio, as plans fit it (Tucker fills its modes to the budget, see
                // `tucker_ranks`; for TT and CP this is rank `r`)
                o.rank = RankChoice::Ratio(ratio);
                let f = factorize(w, &o)?;
                out.push(CurvePoint { method, ratio, params: f.params(), rel_error: f.rel_error(w), rank: f.ranks() });
            }
        }
    }
    Ok(out)
}
