//! Tensor train / MPO (the CompactifAI form).
//!
//! With `m = m1·…·mk`, `n = n1·…·nk`, cores `G_t` have shape `(χ_{t-1}, m_t, n_t, χ_t)`,
//! `χ_0 = χ_k = 1`, and
//! `W[i, j] = G_1[:, i1, j1, :] · G_2[:, i2, j2, :] ⋯ G_k[:, ik, jk, :]`.
//! Built by TT-SVD: reshape W to `T[i1, j1, …, ik, jk]`, then left to right unfold
//! `(χ_{t-1}·m_t·n_t) × rest`, keep at most χ left singular vectors (the core), carry `Uᵀ·C`.
//! Error bound: `‖W − Ŵ‖_F ≤ sqrt(Σ_t δ_t²)` with `δ_t²` the energy discarded at bond t.
//! Params `Σ_t χ_{t-1} m_t n_t χ_t`.
//!
//! Wide unfoldings (rows ≤ cols/2) use the Gram matrix `C Cᵀ` and faer's self-adjoint
//! eigendecomposition (exact in exact arithmetic, `rows² · cols` flops, V never formed); others use
//! faer's thin SVD (QR first on tall shapes). `SvdAlgo::Auto` is exact for TT (bond unfoldings
//! have flat spectra); `SvdAlgo::Randomized` can be asked for explicitly.
//!
//! ```
//! use compactor_decomp::{factorize, from_row_major, FactorizeOptions, Method, RankChoice};
//! let data: Vec<f32> = (0..64 * 64).map(|i| ((i * 7 % 13) as f32).cos()).collect();
//! let w = from_row_major(64, 64, &data);
//! let mut opts = FactorizeOptions::new(Method::Tt, RankChoice::Rank(16));
//! opts.sites = Some((vec![4, 4, 4], vec![4, 4, 4]));
//! let f = factorize(w.as_ref(), &opts).unwrap();
//! assert!(f.rel_error(w.as_ref()) < 1e-5);          // unbounded χ is exact
//! assert_eq!(f.ranks(), vec![16, 16]);               // bond dims χ_1, χ_2 (both full)
//! ```

use crate::error::Result;
use crate::linalg::{mm32, permute};
use crate::svd::{left_truncate, SvdAlgo, Trunc};

/// Largest useful bond at each of the k−1 bonds: `min(Π_{s≤t} m_s n_s, Π_{s>t} m_s n_s)`.
pub fn full_bonds(row_dims: &[usize], col_dims: &[usize]) -> Vec<usize> {
    let pairs: Vec<usize> = row_dims.iter().zip(col_dims).map(|(a, b)| a * b).collect();
    let total: usize = pairs.iter().product();
    let mut left = 1usize;
    (0..pairs.len().saturating_sub(1))
        .map(|t| {
            left *= pairs[t];
            left.min(total / left)
        })
        .collect()
}

/// Bond dims for a uniform cap χ, clipped to what the neighbours allow.
pub fn bonds_for_cap(row_dims: &[usize], col_dims: &[usize], chi: usize) -> Vec<usize> {
    full_bonds(row_dims, col_dims).into_iter().map(|b| b.min(chi)).collect()
}

pub fn params_for_bonds(row_dims: &[usize], col_dims: &[usize], bonds: &[usize]) -> usize {
    let k = row_dims.len();
    (0..k)
        .map(|t| {
            let l = if t == 0 { 1 } else { bonds[t - 1] };
            let r = if t + 1 == k { 1 } else { bonds[t] };
            l * row_dims[t] * col_dims[t] * r
        })
        .sum()
}

pub(crate) struct TtResult {
    pub cores: Vec<(Vec<usize>, Vec<f64>)>,
    pub bonds: Vec<usize>,
    pub discarded: Vec<f64>,
}

/// TT-SVD of the row-major matrix `w` (m × n). `caps[t]` bounds bond t, `bond_tol2` bounds the
/// discarded energy per bond.
pub(crate) fn tt_svd(w: &[f64], row_dims: &[usize], col_dims: &[usize], caps: &[usize], bond_tol2: f64, algo: SvdAlgo, seed: u64) -> Result<TtResult> {
    let k = row_dims.len();
    let mut c = crate::sites::matrix_to_tensor(w, row_dims, col_dims);
    let mut chi = 1usize;
    let mut cores = Vec::with_capacity(k);
    let mut bonds = Vec::new();
    let mut discarded = Vec::new();
    for t in 0..k - 1 {
        let rows = chi * row_dims[t] * col_dims[t];
        let cols = c.len() / rows;
        let tr = Trunc { max_rank: caps[t], max_discarded: bond_tol2 };
        let (u, r, _s2, next, disc) = left_truncate(&c, rows, cols, tr, algo, seed.wrapping_add(t as u64))?;
        cores.push((vec![chi, row_dims[t], col_dims[t], r], u));
        bonds.push(r);
        discarded.push(disc);
        c = next;
        chi = r;
    }
    cores.push((vec![chi, row_dims[k - 1], col_dims[k - 1], 1], c));
    Ok(TtResult { cores, bonds, discarded })
}

/// `Y = X Ŵᵀ` for an MPO without forming Ŵ. `x` row-major batch × n; returns batch × m.
pub(crate) fn mpo_apply(cores: &[(Vec<usize>, std::borrow::Cow<'_, [f32]>)], row_dims: &[usize], col_dims: &[usize], x: &[f32], batch: usize) -> Vec<f32> {
    let k = row_dims.len();
    // state S[p, a, j_t.., ] with p = (batch, i_1..i_{t-1}), a = χ_{t-1}, then remaining columns
    let mut s = x.to_vec();
    let mut p = batch;
    let mut rest: usize = col_dims.iter().product();
    let mut chi = 1usize;
    for t in 0..k {
        let (mt, nt) = (row_dims[t], col_dims[t]);
        let chi_next = cores[t].0[3];
        rest /= nt;
        // S as [p, a, j_t, r] → [p, r, a, j_t]
        let sp = permute(&s, &[p, chi, nt, rest], &[0, 3, 1, 2]);
        // core [a, i_t, j_t, b] → [a, j_t, i_t, b]
        let g = permute(&cores[t].1, &[chi, mt, nt, chi_next], &[0, 2, 1, 3]);
        let prod = mm32(&sp, p * rest, chi * nt, false, &g, chi * nt, mt * chi_next, false);
        // prod [p, r, i_t, b] → [p, i_t, b, r]
        s = permute(&prod, &[p, rest, mt, chi_next], &[0, 2, 3, 1]);
        p *= mt;
        chi = chi_next;
    }
    s
}

/// Contract all cores into the dense matrix (m × n, row-major).
pub(crate) fn mpo_reconstruct(cores: &[(Vec<usize>, std::borrow::Cow<'_, [f32]>)], row_dims: &[usize], col_dims: &[usize]) -> Vec<f32> {
    // T[(i1 j1 … i_t j_t), b] accumulated left to right
    let mut acc: Vec<f32> = vec![1.0];
    let mut left = 1usize;
    let mut chi = 1usize;
    for (shape, g) in cores {
        let (mt, nt, b) = (shape[1], shape[2], shape[3]);
        acc = mm32(&acc, left, chi, false, g, chi, mt * nt * b, false);
        left *= mt * nt;
        chi = b;
    }
    crate::sites::tensor_to_matrix(&acc, row_dims, col_dims)
}
