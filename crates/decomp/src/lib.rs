//! # compactor-decomp
//!
//! Pure linear algebra for compressing one weight matrix: truncated SVD, tensor train (MPO),
//! Tucker and CP decompositions of the tensorized matrix, group-wise int8/int4 quantization,
//! spectra and error curves, and ([`band`]) the CPU stages of a two-stage symmetric eigensolver
//! (band → tridiagonal → eigenvalues) whose first stage runs on the GPU in `compactor-core`.
//! Built on `faer`. It knows nothing about models, files or GPUs.
//!
//! Conventions: a weight `W` is `m × n` (out_features × in_features, Hugging Face layout);
//! activations `X` are `batch × n`; a layer computes `Y = X Wᵀ` (`batch × m`). Inputs and outputs
//! are f32 (`faer::Mat<f32>`); the fits run in f64.
//!
//! One entry point for every method, [`factorize`], returns a [`Factorization`] with
//! `params / bytes / ranks / reconstruct / apply / rel_error / tensors / from_tensors`.
//!
//! ```
//! use compactor_decomp::{factorize, from_row_major, FactorizeOptions, Method, RankChoice};
//! let data: Vec<f32> = (0..64 * 32).map(|i| ((i as f32) * 0.01).sin()).collect();
//! let w = from_row_major(64, 32, &data);
//! for method in [Method::Svd, Method::Tt, Method::Tucker, Method::Cp] {
//!     let f = factorize(w.as_ref(), &FactorizeOptions::new(method, RankChoice::Ratio(0.5))).unwrap();
//!     assert!(f.params() <= 64 * 32 / 2);
//!     let x = from_row_major(3, 32, &[0.5; 96]);
//!     let y = f.apply(x.as_ref()).unwrap();   // 3 × 64
//!     assert_eq!((y.nrows(), y.ncols()), (3, 64));
//! }
//! ```
//!
//! What it is not for: loading checkpoints, running models, choosing plans across layers.

pub mod band;
pub mod cp;
pub mod curve;
pub mod error;
pub mod factor;
pub mod factorization;
pub mod filter;
mod linalg;
pub mod quant;
pub mod sites;
pub mod spectrum;
pub mod svd;
pub mod tt;
pub mod tucker;

pub use curve::{error_curve, error_curve_with, CurvePoint};
pub use error::{DecompError, Result};
pub use factor::{Factor, FactorData};
pub use factorization::{
    factorize, factorize_report, max_rank, params_at_rank, predict, rank_for_ratio, tucker_ranks, FactorMeta, Factorization, FactorizeOptions, FitReport, Kind,
    Method, NamedTensor, Prediction, RankChoice, TensorData,
};
pub use linalg::{from_row_major, sym_eig_desc, to_row_major};
pub use quant::{Bits, QuantSpec, Quantized};
pub use spectrum::{singular_values, spectrum, Spectrum};
pub use svd::SvdAlgo;

/// The matrix type of the API: faer's column-major f32 matrix.
pub type Matrix = faer::Mat<f32>;

/// Randomized truncated SVD of `w`: `(U m×r, s, Vᵀ r×n)` as f32 row-major buffers.
pub fn randomized_svd(w: faer::MatRef<'_, f32>, rank: usize, oversample: usize, power_iters: usize, seed: u64) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (m, n) = (w.nrows(), w.ncols());
    let data = linalg::checked_f64(w)?;
    if rank == 0 {
        return Err(DecompError::RankZero);
    }
    if rank > m.min(n) {
        return Err(DecompError::RankTooLarge { rank, max: m.min(n), method: "svd", m, n });
    }
    let (u, s, vt) = linalg::randomized_svd64(&data, m, n, rank, oversample, power_iters, seed)?;
    let l = s.len();
    let u: Vec<f32> = (0..m).flat_map(|i| u[i * l..i * l + rank].iter().map(|&v| v as f32)).collect();
    Ok((u, s[..rank].iter().map(|&v| v as f32).collect(), vt[..rank * n].iter().map(|&v| v as f32).collect()))
}

/// Full thin SVD in f32 (faer): `(U m×p, s (p, descending), Vᵀ p×n)`, `p = min(m, n)`.
pub fn full_svd(w: faer::MatRef<'_, f32>) -> Result<(faer::Mat<f32>, Vec<f32>, faer::Mat<f32>)> {
    let (m, n) = (w.nrows(), w.ncols());
    linalg::check_finite(w)?;
    let svd = w.thin_svd().map_err(|e| DecompError::Linalg(format!("SVD of a {m} x {n} matrix did not converge: {e:?}")))?;
    let p = m.min(n);
    let s = (0..p).map(|i| svd.S().column_vector()[i]).collect();
    Ok((svd.U().to_owned(), s, svd.V().transpose().to_owned()))
}
