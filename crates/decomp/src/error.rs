//! Errors of the decomposition crate. Every bad input maps to one variant with a message that
//! names the offending value; nothing in this crate panics on user input.

use thiserror::Error;

/// Everything that can go wrong when factorizing a matrix.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum DecompError {
    #[error("empty matrix ({m} x {n}): nothing to factorize")]
    Empty { m: usize, n: usize },
    #[error("non-finite value {value} at row {row}, col {col}")]
    NonFinite { row: usize, col: usize, value: f32 },
    #[error("rank must be at least 1 (got 0)")]
    RankZero,
    #[error("rank {rank} is beyond the largest meaningful rank {max} for {method} on a {m} x {n} matrix")]
    RankTooLarge { rank: usize, max: usize, method: &'static str, m: usize, n: usize },
    #[error("parameter ratio {ratio} is impossible: it must be in (0, 1]")]
    BadRatio { ratio: f64 },
    #[error("parameter ratio {ratio} keeps {budget} params, fewer than the {needed} that rank 1 of {method} needs on a {m} x {n} matrix")]
    RatioTooSmall { ratio: f64, budget: usize, needed: usize, method: &'static str, m: usize, n: usize },
    #[error("tolerance {tol} is impossible: it must be in (0, 1)")]
    BadTolerance { tol: f64 },
    #[error("tolerance {tol} cannot be reached by {method} within {max_params} params (best error {best})")]
    ToleranceUnreachable { tol: f64, method: &'static str, max_params: usize, best: f64 },
    #[error("sites {dims:?} multiply to {product}, not to the {what} dimension {expected}")]
    BadSites { dims: Vec<usize>, product: usize, what: &'static str, expected: usize },
    #[error("sites must have the same number of row and column factors (got {rows} and {cols}), at least 1, and no zero factor")]
    SiteCount { rows: usize, cols: usize },
    #[error("a tolerance-based rank cannot be predicted without the matrix; run factorize instead")]
    NeedsData,
    #[error("bad quantization spec: {0}")]
    BadQuant(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("tensor set does not match metadata: {0}")]
    Tensors(String),
    #[error("cp at rank {rank} on a {m} x {n} matrix needs {needed_gib:.1} GiB for ALS's {count} matrices of {rank} x {rank} (the limit is {limit_gib} GiB): choose rank {max_rank} or less (a lower ratio), or svd, tt or tucker")]
    CpTooLarge { rank: usize, m: usize, n: usize, count: usize, needed_gib: f64, limit_gib: usize, max_rank: usize },
    #[error("linear algebra failure: {0}")]
    Linalg(String),
}

pub type Result<T, E = DecompError> = std::result::Result<T, E>;
