//! The one interface: [`factorize`] turns W (m × n) into a [`Factorization`] that knows its params,
//! bytes, error, how to rebuild W and how to apply itself to activations (`Y = X Ŵᵀ`).

use crate::error::{DecompError, Result};
use crate::factor::{Factor, FactorData};
use crate::linalg::{checked_f64, from_row_major, to_rm};
use crate::quant::{QuantSpec, Quantized};
use crate::svd::{SvdAlgo, Trunc};
use crate::{cp, sites, svd, tt, tucker};
use faer::{Mat, MatRef};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Decomposition method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Truncated SVD, `W ≈ A·B`.
    Svd,
    /// Tensor train / MPO.
    Tt,
    Tucker,
    Cp,
    /// No factorization (useful with `quant` for a plain quantized weight).
    Dense,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Svd => "svd",
            Method::Tt => "tt",
            Method::Tucker => "tucker",
            Method::Cp => "cp",
            Method::Dense => "dense",
        }
    }
}

/// How to pick the rank.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RankChoice {
    /// SVD rank r, TT max bond χ, Tucker per-mode cap, or CP rank.
    Rank(usize),
    /// Fraction of the layer's params (m·n) kept; the largest rank whose param count fits (for
    /// Tucker, then single modes one rank higher while they fit: [`tucker_ranks`]).
    Ratio(f64),
    /// Target relative Frobenius error.
    Tol(f64),
}

/// Options for [`factorize`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactorizeOptions {
    pub method: Method,
    pub rank: RankChoice,
    /// Override the automatic site factoring: (row dims, col dims), same length.
    pub sites: Option<(Vec<usize>, Vec<usize>)>,
    /// Quantize every factor (and the dense weight for `Method::Dense`) after fitting.
    pub quant: Option<QuantSpec>,
    /// Iteration cap for HOOI (Tucker) and ALS (CP).
    pub max_iters: usize,
    /// Stopping tolerance for HOOI / ALS on the change of relative error.
    pub tol: f64,
    pub seed: u64,
    pub svd_algo: SvdAlgo,
}

impl FactorizeOptions {
    pub fn new(method: Method, rank: RankChoice) -> Self {
        Self { method, rank, sites: None, quant: None, max_iters: 50, tol: 1e-6, seed: 0x5eed, svd_algo: SvdAlgo::Auto }
    }
}

/// What the fit did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    pub method: Method,
    pub ranks: Vec<usize>,
    /// ALS / HOOI sweeps (0 for SVD and TT).
    pub iterations: usize,
    pub converged: bool,
    /// Relative error of the f64 fit before f32 storage / quantization.
    pub rel_error_estimate: f64,
    /// Discarded energy (absolute, Σσ²): per bond for TT, the tail for SVD; empty otherwise.
    pub discarded: Vec<f64>,
}

/// A factorized weight matrix. Every factor is a row-major tensor ([`Factor`]), f32 or quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Factorization {
    /// W itself (m × n), possibly quantized.
    Dense { m: usize, n: usize, weight: Factor },
    /// `W ≈ A·B`, A = U_r diag(s) (m × r), B = V_rᵀ (r × n).
    LowRank { m: usize, n: usize, a: Factor, b: Factor },
    /// MPO cores `(χ_{t-1}, m_t, n_t, χ_t)`.
    Mpo { m: usize, n: usize, row_dims: Vec<usize>, col_dims: Vec<usize>, cores: Vec<Factor> },
    /// Core `(r_1..r_2k)` and factors `U_d (dim_d × r_d)` over interleaved modes (m1, n1, m2, n2, …).
    Tucker { m: usize, n: usize, row_dims: Vec<usize>, col_dims: Vec<usize>, core: Factor, factors: Vec<Factor> },
    /// Weights λ (R) and factors `A_d (dim_d × R)` over interleaved modes.
    Cp { m: usize, n: usize, row_dims: Vec<usize>, col_dims: Vec<usize>, weights: Vec<f32>, factors: Vec<Factor> },
}

/// Kind tag stored in metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dense,
    LowRank,
    Mpo,
    Tucker,
    Cp,
}

/// Serializable description of a factorization; with [`NamedTensor`]s it rebuilds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactorMeta {
    pub kind: Kind,
    pub m: usize,
    pub n: usize,
    pub row_dims: Vec<usize>,
    pub col_dims: Vec<usize>,
    pub ranks: Vec<usize>,
    pub quant: Option<QuantSpec>,
    /// Logical (dequantized) shape of every factor, by name.
    pub factor_shapes: BTreeMap<String, Vec<usize>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    U8(Vec<u8>),
}

/// One tensor to store (e.g. in safetensors).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

fn validate_rank(r: usize, max: usize, method: Method, m: usize, n: usize) -> Result<()> {
    if r == 0 {
        return Err(DecompError::RankZero);
    }
    if r > max {
        return Err(DecompError::RankTooLarge { rank: r, max, method: method.name(), m, n });
    }
    Ok(())
}

/// Largest meaningful rank for `method` on an m × n matrix (SVD: min(m,n); TT: largest full bond;
/// Tucker: largest mode dim; CP: the rank whose params reach m·n).
pub fn max_rank(m: usize, n: usize, method: Method, sites: Option<&(Vec<usize>, Vec<usize>)>) -> Result<usize> {
    if m == 0 || n == 0 {
        return Err(DecompError::Empty { m, n });
    }
    let (rd, cd) = sites::resolve_sites(m, n, sites)?;
    Ok(match method {
        Method::Svd => m.min(n),
        Method::Tt => tt::full_bonds(&rd, &cd).into_iter().max().unwrap_or(1),
        Method::Tucker => sites::interleaved(&rd, &cd).into_iter().max().unwrap_or(1),
        Method::Cp => (m * n / (rd.iter().sum::<usize>() + cd.iter().sum::<usize>() + 1)).max(1),
        Method::Dense => m.min(n),
    })
}

/// Parameter count of `method` at rank `r` (no data needed).
pub fn params_at_rank(m: usize, n: usize, method: Method, r: usize, sites: Option<&(Vec<usize>, Vec<usize>)>) -> Result<(usize, Vec<usize>)> {
    let (rd, cd) = sites::resolve_sites(m, n, sites)?;
    Ok(match method {
        Method::Svd => (r * (m + n), vec![r]),
        Method::Tt => {
            let b = tt::bonds_for_cap(&rd, &cd, r);
            (tt::params_for_bonds(&rd, &cd, &b), b)
        }
        Method::Tucker => {
            let dims = sites::interleaved(&rd, &cd);
            let rk = tucker::ranks_for_cap(&dims, r);
            (tucker::params_for_ranks(&dims, &rk), rk)
        }
        Method::Cp => (cp::params_for_rank(&sites::interleaved(&rd, &cd), r), vec![r]),
        Method::Dense => (m * n, vec![]),
    })
}

/// Tucker's per-mode ranks (caps for a tolerance fit): a rank `r` on every mode; for a ratio, the
/// largest fitting cap ([`rank_for_ratio`]) filled up mode by mode to the budget
/// (`tucker::ranks_for_budget`); for a tolerance, the full modes (the fit truncates). The CPU fit,
/// the GPU fit and [`predict`] all take their ranks from here.
pub fn tucker_ranks(m: usize, n: usize, choice: RankChoice, sites: Option<&(Vec<usize>, Vec<usize>)>) -> Result<Vec<usize>> {
    let (rd, cd) = sites::resolve_sites(m, n, sites)?;
    let dims = sites::interleaved(&rd, &cd);
    Ok(match choice {
        RankChoice::Rank(r) => tucker::ranks_for_cap(&dims, r),
        RankChoice::Ratio(q) => tucker::ranks_for_budget(&dims, rank_for_ratio(m, n, Method::Tucker, q, sites)?, (q * (m * n) as f64).floor() as usize),
        RankChoice::Tol(_) => tucker::ranks_for_cap(&dims, max_rank(m, n, Method::Tucker, sites)?),
    })
}

/// The largest rank whose param count is at most `ratio · m · n`.
pub fn rank_for_ratio(m: usize, n: usize, method: Method, ratio: f64, sites: Option<&(Vec<usize>, Vec<usize>)>) -> Result<usize> {
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(DecompError::BadRatio { ratio });
    }
    let maxr = max_rank(m, n, method, sites)?;
    let budget = (ratio * (m * n) as f64).floor() as usize;
    let (p1, _) = params_at_rank(m, n, method, 1, sites)?;
    if p1 > budget {
        return Err(DecompError::RatioTooSmall { ratio, budget, needed: p1, method: method.name(), m, n });
    }
    // params are monotone in the rank: binary search the largest fitting rank
    let (mut lo, mut hi) = (1usize, maxr);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if params_at_rank(m, n, method, mid, sites)?.0 <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(lo)
}

/// Predicted params and ranks without running the decomposition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub params: usize,
    pub ranks: Vec<usize>,
    /// Bytes as stored (f32 factors, or codes+scales if `quant`).
    pub bytes: usize,
}

pub fn predict(m: usize, n: usize, method: Method, rank: RankChoice, sites: Option<&(Vec<usize>, Vec<usize>)>, quant: Option<&QuantSpec>) -> Result<Prediction> {
    if m == 0 || n == 0 {
        return Err(DecompError::Empty { m, n });
    }
    let r = match (method, rank) {
        (Method::Dense, _) => 0,
        (_, RankChoice::Rank(r)) => {
            validate_rank(r, max_rank(m, n, method, sites)?, method, m, n)?;
            r
        }
        (_, RankChoice::Ratio(q)) => rank_for_ratio(m, n, method, q, sites)?,
        (_, RankChoice::Tol(_)) => return Err(DecompError::NeedsData),
    };
    let (rd, cd) = sites::resolve_sites(m, n, sites)?;
    let (params, ranks) = match method {
        Method::Tucker => {
            let rk = tucker_ranks(m, n, rank, sites)?;
            (tucker::params_for_ranks(&sites::interleaved(&rd, &cd), &rk), rk)
        }
        _ => params_at_rank(m, n, method, r, sites)?,
    };
    let shapes = factor_shapes(method, m, n, &rd, &cd, &ranks);
    let bytes = shapes
        .iter()
        .map(|(name, s)| match quant {
            Some(q) if name != "weights" => q.bytes_for(s),
            _ => 4 * s.iter().product::<usize>(),
        })
        .sum();
    Ok(Prediction { params, ranks, bytes })
}

fn factor_shapes(method: Method, m: usize, n: usize, rd: &[usize], cd: &[usize], ranks: &[usize]) -> Vec<(String, Vec<usize>)> {
    let k = rd.len();
    match method {
        Method::Dense => vec![("weight".into(), vec![m, n])],
        Method::Svd => vec![("a".into(), vec![m, ranks[0]]), ("b".into(), vec![ranks[0], n])],
        Method::Tt => (0..k)
            .map(|t| {
                let l = if t == 0 { 1 } else { ranks[t - 1] };
                let r = if t + 1 == k { 1 } else { ranks[t] };
                (format!("core.{t}"), vec![l, rd[t], cd[t], r])
            })
            .collect(),
        Method::Tucker => {
            let dims = sites::interleaved(rd, cd);
            std::iter::once(("core".to_string(), ranks.to_vec()))
                .chain(dims.iter().enumerate().map(|(d, &dim)| (format!("factor.{d}"), vec![dim, ranks[d]])))
                .collect()
        }
        Method::Cp => {
            let dims = sites::interleaved(rd, cd);
            std::iter::once(("weights".to_string(), vec![ranks[0]]))
                .chain(dims.iter().enumerate().map(|(d, &dim)| (format!("factor.{d}"), vec![dim, ranks[0]])))
                .collect()
        }
    }
}

/// Factorize `w` (m × n, f32). See the crate docs for the conventions.
pub fn factorize(w: MatRef<'_, f32>, opts: &FactorizeOptions) -> Result<Factorization> {
    factorize_report(w, opts).map(|(f, _)| f)
}

/// [`factorize`], also returning what the fit did (iterations, discarded energies, …).
pub fn factorize_report(w: MatRef<'_, f32>, opts: &FactorizeOptions) -> Result<(Factorization, FitReport)> {
    let (m, n) = (w.nrows(), w.ncols());
    let data = checked_f64(w)?;
    if let Some(q) = &opts.quant {
        q.validate()?;
    }
    let (rd, cd) = sites::resolve_sites(m, n, opts.sites.as_ref())?;
    let norm2: f64 = data.iter().map(|v| v * v).sum();
    let method = opts.method;
    // resolve rank choice
    let (rank, tol) = match (method, opts.rank) {
        (Method::Dense, _) => (0, None),
        (_, RankChoice::Rank(r)) => {
            validate_rank(r, max_rank(m, n, method, opts.sites.as_ref())?, method, m, n)?;
            (r, None)
        }
        (_, RankChoice::Ratio(q)) => (rank_for_ratio(m, n, method, q, opts.sites.as_ref())?, None),
        (_, RankChoice::Tol(t)) => {
            if !(t > 0.0 && t < 1.0) {
                return Err(DecompError::BadTolerance { tol: t });
            }
            (max_rank(m, n, method, opts.sites.as_ref())?, Some(t))
        }
    };
    let rel = |disc: f64| (disc / norm2.max(f64::MIN_POSITIVE)).sqrt();
    let (fact, report) = match method {
        Method::Dense => (
            Factorization::Dense { m, n, weight: Factor::from_f64(vec![m, n], &data) },
            FitReport { method, ranks: vec![], iterations: 0, converged: true, rel_error_estimate: 0.0, discarded: vec![] },
        ),
        Method::Svd => {
            let (trunc, algo) = match tol {
                Some(t) => (Trunc { max_rank: rank, max_discarded: t * t * norm2 }, SvdAlgo::Exact),
                None => (Trunc { max_rank: rank, max_discarded: 0.0 }, opts.svd_algo),
            };
            let (a, b, r, disc) = svd::truncated_svd(&data, m, n, trunc, algo, opts.seed)?;
            (
                Factorization::LowRank { m, n, a: Factor::from_f64(vec![m, r], &a), b: Factor::from_f64(vec![r, n], &b) },
                FitReport { method, ranks: vec![r], iterations: 0, converged: true, rel_error_estimate: rel(disc), discarded: vec![disc] },
            )
        }
        Method::Tt => {
            let caps = tt::bonds_for_cap(&rd, &cd, rank);
            let bond_tol2 = match tol {
                Some(t) => t * t * norm2 / (rd.len().saturating_sub(1).max(1)) as f64,
                None => 0.0,
            };
            // TT bond unfoldings have flat spectra, where a randomized range finder loses accuracy:
            // Auto means exact here; an explicit Randomized is honoured for rank-only rules.
            let algo = match (tol, opts.svd_algo) {
                (Some(_), _) | (None, SvdAlgo::Auto) => SvdAlgo::Exact,
                (None, a) => a,
            };
            let res = tt::tt_svd(&data, &rd, &cd, &caps, bond_tol2, algo, opts.seed)?;
            let disc: f64 = res.discarded.iter().sum();
            (
                Factorization::Mpo { m, n, row_dims: rd.clone(), col_dims: cd.clone(), cores: res.cores.iter().map(|(s, d)| Factor::from_f64(s.clone(), d)).collect() },
                FitReport { method, ranks: res.bonds, iterations: 0, converged: true, rel_error_estimate: rel(disc), discarded: res.discarded },
            )
        }
        Method::Tucker => {
            let dims = sites::interleaved(&rd, &cd);
            let caps = tucker_ranks(m, n, opts.rank, opts.sites.as_ref())?;
            let mode_tol2 = tol.map(|t| t * t * norm2 / dims.len() as f64).unwrap_or(0.0);
            let res = tucker::tucker_hooi(&data, &rd, &cd, &caps, mode_tol2, opts.max_iters, opts.tol)?;
            let factors = res.factors.iter().enumerate().map(|(d, f)| Factor::from_f64(vec![dims[d], res.ranks[d]], f)).collect();
            (
                Factorization::Tucker { m, n, row_dims: rd.clone(), col_dims: cd.clone(), core: Factor::from_f64(res.ranks.clone(), &res.core), factors },
                FitReport { method, ranks: res.ranks, iterations: res.iterations, converged: res.iterations < opts.max_iters, rel_error_estimate: res.rel_error, discarded: vec![] },
            )
        }
        Method::Cp => {
            let dims = sites::interleaved(&rd, &cd);
            let candidates: Vec<usize> = match tol {
                None => vec![rank],
                Some(_) => {
                    let mut v = vec![];
                    let mut r = 1;
                    while r < rank {
                        v.push(r);
                        r *= 2;
                    }
                    v.push(rank);
                    v
                }
            };
            let mut best = None;
            for r in candidates {
                let res = cp::cp_als(&data, &rd, &cd, r, opts.max_iters, opts.tol, opts.seed)?;
                let ok = tol.map(|t| res.rel_error <= t).unwrap_or(true);
                let best_err = res.rel_error;
                best = Some(res);
                if ok {
                    break;
                }
                if r == rank {
                    return Err(DecompError::ToleranceUnreachable { tol: tol.unwrap(), method: "cp", max_params: m * n, best: best_err });
                }
            }
            let res = best.unwrap();
            let r = res.weights.len();
            let factors = res.factors.iter().enumerate().map(|(d, f)| Factor::from_f64(vec![dims[d], r], f)).collect();
            (
                Factorization::Cp { m, n, row_dims: rd.clone(), col_dims: cd.clone(), weights: res.weights.iter().map(|&v| v as f32).collect(), factors },
                FitReport { method, ranks: vec![r], iterations: res.iterations, converged: res.converged, rel_error_estimate: res.rel_error, discarded: vec![] },
            )
        }
    };
    let fact = match &opts.quant {
        Some(q) => fact.quantized(q)?,
        None => fact,
    };
    Ok((fact, report))
}

fn cows(fs: &[Factor]) -> Vec<Cow<'_, [f32]>> {
    fs.iter().map(|f| f.values()).collect()
}

impl Factorization {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Factorization::Dense { m, n, .. }
            | Factorization::LowRank { m, n, .. }
            | Factorization::Mpo { m, n, .. }
            | Factorization::Tucker { m, n, .. }
            | Factorization::Cp { m, n, .. } => (*m, *n),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Factorization::Dense { .. } => Kind::Dense,
            Factorization::LowRank { .. } => Kind::LowRank,
            Factorization::Mpo { .. } => Kind::Mpo,
            Factorization::Tucker { .. } => Kind::Tucker,
            Factorization::Cp { .. } => Kind::Cp,
        }
    }

    /// Named factors in storage order (CP weights excluded; see [`Factorization::tensors`]).
    pub fn factors(&self) -> Vec<(String, &Factor)> {
        match self {
            Factorization::Dense { weight, .. } => vec![("weight".into(), weight)],
            Factorization::LowRank { a, b, .. } => vec![("a".into(), a), ("b".into(), b)],
            Factorization::Mpo { cores, .. } => cores.iter().enumerate().map(|(t, c)| (format!("core.{t}"), c)).collect(),
            Factorization::Tucker { core, factors, .. } => std::iter::once(("core".to_string(), core))
                .chain(factors.iter().enumerate().map(|(d, f)| (format!("factor.{d}"), f)))
                .collect(),
            Factorization::Cp { factors, .. } => factors.iter().enumerate().map(|(d, f)| (format!("factor.{d}"), f)).collect(),
        }
    }

    fn factors_mut(&mut self) -> Vec<&mut Factor> {
        match self {
            Factorization::Dense { weight, .. } => vec![weight],
            Factorization::LowRank { a, b, .. } => vec![a, b],
            Factorization::Mpo { cores, .. } => cores.iter_mut().collect(),
            Factorization::Tucker { core, factors, .. } => std::iter::once(core).chain(factors.iter_mut()).collect(),
            Factorization::Cp { factors, .. } => factors.iter_mut().collect(),
        }
    }

    /// Quantize every factor (CP weights stay f32).
    pub fn quantized(mut self, spec: &QuantSpec) -> Result<Self> {
        spec.validate()?;
        for f in self.factors_mut() {
            *f = f.quantize(spec)?;
        }
        Ok(self)
    }

    pub fn quant_spec(&self) -> Option<QuantSpec> {
        self.factors().iter().find_map(|(_, f)| match &f.data {
            FactorData::Quantized(q) => Some(q.spec),
            _ => None,
        })
    }

    /// Number of stored values (codes count as one each).
    pub fn params(&self) -> usize {
        let w = if let Factorization::Cp { weights, .. } = self { weights.len() } else { 0 };
        self.factors().iter().map(|(_, f)| f.numel()).sum::<usize>() + w
    }

    /// Bytes as stored: 4 per f32 value, or codes + scales (+ mins) when quantized.
    pub fn bytes(&self) -> usize {
        let w = if let Factorization::Cp { weights, .. } = self { 4 * weights.len() } else { 0 };
        self.factors().iter().map(|(_, f)| f.bytes()).sum::<usize>() + w
    }

    /// SVD: [r]; TT: bonds χ_1..χ_{k-1}; Tucker: core shape; CP: [R]; Dense: [].
    pub fn ranks(&self) -> Vec<usize> {
        match self {
            Factorization::Dense { .. } => vec![],
            Factorization::LowRank { a, .. } => vec![a.shape[1]],
            Factorization::Mpo { cores, .. } => cores[..cores.len() - 1].iter().map(|c| c.shape[3]).collect(),
            Factorization::Tucker { core, .. } => core.shape.clone(),
            Factorization::Cp { weights, .. } => vec![weights.len()],
        }
    }

    fn reconstruct_rm(&self) -> Vec<f32> {
        match self {
            Factorization::Dense { weight, .. } => weight.values().into_owned(),
            Factorization::LowRank { m, n, a, b } => {
                let r = a.shape[1];
                crate::linalg::mm32(&a.values(), *m, r, false, &b.values(), r, *n, false)
            }
            Factorization::Mpo { row_dims, col_dims, cores, .. } => {
                let cs: Vec<_> = cores.iter().map(|c| (c.shape.clone(), c.values())).collect();
                tt::mpo_reconstruct(&cs, row_dims, col_dims)
            }
            Factorization::Tucker { row_dims, col_dims, core, factors, .. } => {
                tucker::tucker_reconstruct(&core.values(), &core.shape, &cows(factors), row_dims, col_dims)
            }
            Factorization::Cp { row_dims, col_dims, weights, factors, .. } => cp::cp_reconstruct(weights, &cows(factors), row_dims, col_dims),
        }
    }

    /// Ŵ (m × n).
    pub fn reconstruct(&self) -> Mat<f32> {
        let (m, n) = self.shape();
        from_row_major(m, n, &self.reconstruct_rm())
    }

    /// `Y = X Ŵᵀ` (batch × m) for `X` (batch × n), without forming Ŵ.
    pub fn apply(&self, x: MatRef<'_, f32>) -> Result<Mat<f32>> {
        let (m, n) = self.shape();
        if x.ncols() != n {
            return Err(DecompError::Shape(format!("activations have {} columns, the layer expects n = {n}", x.ncols())));
        }
        let batch = x.nrows();
        let xr = to_rm(x);
        let y = match self {
            Factorization::Dense { weight, .. } => crate::linalg::mm32(&xr, batch, n, false, &weight.values(), m, n, true),
            Factorization::LowRank { a, b, .. } => {
                let r = a.shape[1];
                let z = crate::linalg::mm32(&xr, batch, n, false, &b.values(), r, n, true);
                crate::linalg::mm32(&z, batch, r, false, &a.values(), m, r, true)
            }
            Factorization::Mpo { row_dims, col_dims, cores, .. } => {
                let cs: Vec<_> = cores.iter().map(|c| (c.shape.clone(), c.values())).collect();
                tt::mpo_apply(&cs, row_dims, col_dims, &xr, batch)
            }
            Factorization::Tucker { row_dims, col_dims, core, factors, .. } => {
                tucker::tucker_apply(&core.values(), &core.shape, &cows(factors), row_dims, col_dims, &xr, batch)
            }
            Factorization::Cp { row_dims, col_dims, weights, factors, .. } => cp::cp_apply(weights, &cows(factors), row_dims, col_dims, &xr, batch),
        };
        Ok(from_row_major(batch, m, &y))
    }

    /// `‖W − Ŵ‖_F / ‖W‖_F` (computed in f64).
    pub fn rel_error(&self, w: MatRef<'_, f32>) -> f64 {
        let r = self.reconstruct_rm();
        let (m, n) = self.shape();
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for i in 0..m {
            for j in 0..n {
                let a = w[(i, j)] as f64;
                let d = a - r[i * n + j] as f64;
                num += d * d;
                den += a * a;
            }
        }
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }

    pub fn metadata(&self) -> FactorMeta {
        let (m, n) = self.shape();
        let (row_dims, col_dims) = match self {
            Factorization::Mpo { row_dims, col_dims, .. } | Factorization::Tucker { row_dims, col_dims, .. } | Factorization::Cp { row_dims, col_dims, .. } => {
                (row_dims.clone(), col_dims.clone())
            }
            _ => (vec![m], vec![n]),
        };
        let mut factor_shapes: BTreeMap<String, Vec<usize>> = self.factors().into_iter().map(|(k, f)| (k, f.shape.clone())).collect();
        if let Factorization::Cp { weights, .. } = self {
            factor_shapes.insert("weights".into(), vec![weights.len()]);
        }
        FactorMeta { kind: self.kind(), m, n, row_dims, col_dims, ranks: self.ranks(), quant: self.quant_spec(), factor_shapes }
    }

    /// Tensors to store. f32 factor `NAME` → `NAME` (F32, its shape). Quantized factor `NAME` →
    /// `NAME.qweight` (U8, [rows, packed cols]), `NAME.scales` (F32, [rows, groups]) and, if
    /// asymmetric, `NAME.mins` (F32, [rows, groups]); rows = product of all but the last axis.
    /// CP also stores `weights` (F32, [R]).
    pub fn tensors(&self) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        if let Factorization::Cp { weights, .. } = self {
            out.push(NamedTensor { name: "weights".into(), shape: vec![weights.len()], data: TensorData::F32(weights.clone()) });
        }
        for (name, f) in self.factors() {
            match &f.data {
                FactorData::F32(v) => out.push(NamedTensor { name, shape: f.shape.clone(), data: TensorData::F32(v.clone()) }),
                FactorData::Quantized(q) => {
                    let (rows, _) = crate::quant::rows_cols(&f.shape);
                    let groups = q.scales.len() / rows.max(1);
                    out.push(NamedTensor { name: format!("{name}.qweight"), shape: vec![rows, q.codes.len() / rows.max(1)], data: TensorData::U8(q.codes.clone()) });
                    out.push(NamedTensor { name: format!("{name}.scales"), shape: vec![rows, groups], data: TensorData::F32(q.scales.clone()) });
                    if !q.symmetric_spec() {
                        out.push(NamedTensor { name: format!("{name}.mins"), shape: vec![rows, groups], data: TensorData::F32(q.mins.clone()) });
                    }
                }
            }
        }
        out
    }

    /// Rebuild from [`Factorization::metadata`] and [`Factorization::tensors`].
    pub fn from_tensors(meta: &FactorMeta, tensors: Vec<NamedTensor>) -> Result<Self> {
        let mut map: BTreeMap<String, NamedTensor> = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        let take_f32 = |name: &str, map: &mut BTreeMap<String, NamedTensor>| -> Result<Vec<f32>> {
            match map.remove(name) {
                Some(NamedTensor { data: TensorData::F32(v), .. }) => Ok(v),
                Some(_) => Err(DecompError::Tensors(format!("tensor {name} should be F32"))),
                None => Err(DecompError::Tensors(format!("missing tensor {name}"))),
            }
        };
        let factor = |name: &str, map: &mut BTreeMap<String, NamedTensor>| -> Result<Factor> {
            let shape = meta.factor_shapes.get(name).cloned().ok_or_else(|| DecompError::Tensors(format!("no shape for factor {name} in metadata")))?;
            let numel: usize = shape.iter().product();
            match meta.quant {
                None => {
                    let v = take_f32(name, map)?;
                    if v.len() != numel {
                        return Err(DecompError::Tensors(format!("{name}: {} values for shape {shape:?}", v.len())));
                    }
                    Ok(Factor::new(shape, v))
                }
                Some(spec) => {
                    let codes = match map.remove(&format!("{name}.qweight")) {
                        Some(NamedTensor { data: TensorData::U8(v), .. }) => v,
                        _ => return Err(DecompError::Tensors(format!("missing or non-U8 tensor {name}.qweight"))),
                    };
                    let scales = take_f32(&format!("{name}.scales"), map)?;
                    let mins = if spec.symmetric { vec![] } else { take_f32(&format!("{name}.mins"), map)? };
                    let q = Quantized { spec, shape: shape.clone(), codes, scales, mins };
                    if q.bytes() != spec.bytes_for(&shape) {
                        return Err(DecompError::Tensors(format!("{name}: quantized payload does not match shape {shape:?}")));
                    }
                    Ok(Factor { shape, data: FactorData::Quantized(q) })
                }
            }
        };
        let (m, n) = (meta.m, meta.n);
        let (rd, cd) = (meta.row_dims.clone(), meta.col_dims.clone());
        let nmodes = 2 * rd.len();
        let f = match meta.kind {
            Kind::Dense => Factorization::Dense { m, n, weight: factor("weight", &mut map)? },
            Kind::LowRank => Factorization::LowRank { m, n, a: factor("a", &mut map)?, b: factor("b", &mut map)? },
            Kind::Mpo => {
                let cores = (0..rd.len()).map(|t| factor(&format!("core.{t}"), &mut map)).collect::<Result<_>>()?;
                Factorization::Mpo { m, n, row_dims: rd, col_dims: cd, cores }
            }
            Kind::Tucker => {
                let core = factor("core", &mut map)?;
                let factors = (0..nmodes).map(|d| factor(&format!("factor.{d}"), &mut map)).collect::<Result<_>>()?;
                Factorization::Tucker { m, n, row_dims: rd, col_dims: cd, core, factors }
            }
            Kind::Cp => {
                let weights = take_f32("weights", &mut map)?;
                let factors = (0..nmodes).map(|d| factor(&format!("factor.{d}"), &mut map)).collect::<Result<_>>()?;
                Factorization::Cp { m, n, row_dims: rd, col_dims: cd, weights, factors }
            }
        };
        if let Some(extra) = map.keys().next() {
            return Err(DecompError::Tensors(format!("unexpected tensor {extra}")));
        }
        Ok(f)
    }
}
