//! Tucker decomposition of the tensorized matrix.
//!
//! `T[i1, j1, …, ik, jk]` (the 2k-way tensor of W, see [`crate::sites`]) is approximated by
//! `T ≈ G ×_1 U_1 ×_2 U_2 ⋯ ×_{2k} U_{2k}` with core `G` of shape `(r_1, …, r_{2k})` and
//! factor matrices `U_d` of shape `(dim_d × r_d)` with orthonormal columns, where
//! `dim = (m1, n1, m2, n2, …)`. Params `Π r_d + Σ dim_d r_d`.
//! Fit: HOSVD initialisation (leading eigenvectors of each unfolding's Gram matrix), then HOOI
//! sweeps until the relative error stops improving (or `max_iters`). Since the factors are
//! orthonormal, `‖T − T̂‖² = ‖T‖² − ‖G‖²`.
//!
//! ```
//! use compactor_decomp::{factorize, from_row_major, FactorizeOptions, Method, RankChoice};
//! let data: Vec<f32> = (0..16 * 16).map(|i| ((i % 5) as f32) * 0.1 + 1.0).collect();
//! let w = from_row_major(16, 16, &data);
//! let f = factorize(w.as_ref(), &FactorizeOptions::new(Method::Tucker, RankChoice::Rank(2))).unwrap();
//! assert_eq!(f.ranks().len(), 8);                  // 2k modes, k = 4 sites
//! assert!(f.rel_error(w.as_ref()) < 0.5);
//! ```

use crate::error::Result;
use crate::linalg::{mm64, mode_product32, mode_product64, permute, sym_eig_desc, unfold};

pub fn params_for_ranks(dims: &[usize], ranks: &[usize]) -> usize {
    ranks.iter().product::<usize>() + dims.iter().zip(ranks).map(|(d, r)| d * r).sum::<usize>()
}

/// Per-mode ranks at a cap: min(dim_d, cap) on every mode (`RankChoice::Rank`).
pub fn ranks_for_cap(dims: &[usize], cap: usize) -> Vec<usize> {
    dims.iter().map(|&d| d.min(cap)).collect()
}

/// Per-mode ranks for a parameter budget (`RankChoice::Ratio`): from the uniform `cap` (which
/// must fit), one more rank at a time on the mode truncated most relative to its size (rank /
/// dim; then the cheaper, then the lower mode), among those whose step still fits the budget and
/// whose rank stays within the product of the other ranks (beyond it the core cannot use it).
/// A uniform cap alone cannot honour a ratio on small modes: on 4-sized modes it jumps from 3⁸
/// to 4⁸ core values, so a 256 × 256 layer asked for half its values would keep a tenth.
pub fn ranks_for_budget(dims: &[usize], cap: usize, budget: usize) -> Vec<usize> {
    let mut ranks = ranks_for_cap(dims, cap);
    loop {
        let params = params_for_ranks(dims, &ranks);
        let others = |d: usize| ranks.iter().enumerate().filter(|&(e, _)| e != d).map(|(_, r)| r).product::<usize>();
        let step = (0..dims.len())
            .filter(|&d| ranks[d] < dims[d] && ranks[d] < others(d))
            .map(|d| {
                let mut r = ranks.clone();
                r[d] += 1;
                (d, params_for_ranks(dims, &r) - params)
            })
            .filter(|&(_, add)| params + add <= budget)
            // rank/dim compared as fractions: a/b < c/e ⇔ a·e < c·b
            .min_by(|&(d, add), &(e, add2)| (ranks[d] * dims[e]).cmp(&(ranks[e] * dims[d])).then(add.cmp(&add2)).then(d.cmp(&e)));
        match step {
            Some((d, _)) => ranks[d] += 1,
            None => return ranks,
        }
    }
}

pub(crate) struct TuckerResult {
    pub core: Vec<f64>,
    pub ranks: Vec<usize>,
    pub factors: Vec<Vec<f64>>,
    pub iterations: usize,
    pub rel_error: f64,
}

/// Leading eigenvectors of the mode-d Gram matrix: (all σ², U dim×dim row-major, descending).
fn mode_eig(t: &[f64], shape: &[usize], d: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let dim = shape[d];
    let rest = t.len() / dim;
    let u = unfold(t, shape, d);
    let g = mm64(&u, dim, rest, false, &u, dim, rest, true);
    sym_eig_desc(&g, dim)
}

/// The first `r` columns of a row-major `rows × cols` buffer (row-major `rows × r`): a mode's
/// leading eigenvectors (also `compactor-core`'s GPU HOOI).
pub fn take_cols(u: &[f64], rows: usize, cols: usize, r: usize) -> Vec<f64> {
    (0..rows).flat_map(|i| u[i * cols..i * cols + r].iter().copied()).collect()
}

/// The modes HOOI projects onto their factors, all but `skip`, biggest reductions (smallest
/// rank / dim) first; the CPU fit and `compactor-core`'s GPU one apply them in this order.
pub fn projection_order(dims: &[usize], ranks: &[usize], skip: Option<usize>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..dims.len()).filter(|&e| Some(e) != skip).collect();
    order.sort_by(|&a, &b| (ranks[a] as f64 / dims[a] as f64).partial_cmp(&(ranks[b] as f64 / dims[b] as f64)).unwrap());
    order
}

/// `ranks`: per-mode caps; `mode_tol2`: per-mode discarded energy allowed (0 = rank only).
pub(crate) fn tucker_hooi(w: &[f64], row_dims: &[usize], col_dims: &[usize], caps: &[usize], mode_tol2: f64, max_iters: usize, tol: f64) -> Result<TuckerResult> {
    let dims = crate::sites::interleaved(row_dims, col_dims);
    let t = crate::sites::matrix_to_tensor(w, row_dims, col_dims);
    let nm = dims.len();
    let norm2: f64 = t.iter().map(|v| v * v).sum();
    // HOSVD
    let mut ranks = Vec::with_capacity(nm);
    let mut factors = Vec::with_capacity(nm);
    for d in 0..nm {
        let (s2, u) = mode_eig(&t, &dims, d)?;
        let r = crate::svd::choose_rank(&s2, crate::svd::Trunc { max_rank: caps[d], max_discarded: mode_tol2 });
        factors.push(take_cols(&u, dims[d], dims[d], r));
        ranks.push(r);
    }
    let project_all_but = |factors: &Vec<Vec<f64>>, skip: Option<usize>| -> (Vec<f64>, Vec<usize>) {
        let mut y = t.clone();
        let mut shape = dims.clone();
        for e in projection_order(&dims, &ranks, skip) {
            let ut = permute(&factors[e], &[dims[e], ranks[e]], &[1, 0]);
            let (ny, ns) = mode_product64(&y, &shape, e, &ut, ranks[e]);
            y = ny;
            shape = ns;
        }
        (y, shape)
    };
    let (mut core, _) = project_all_but(&factors, None);
    let err_of = |core: &[f64]| ((norm2 - core.iter().map(|v| v * v).sum::<f64>()).max(0.0) / norm2.max(f64::MIN_POSITIVE)).sqrt();
    let mut err = err_of(&core);
    let mut iterations = 0;
    for _ in 0..max_iters {
        let mut new_factors = factors.clone();
        let mut last = None;
        for d in 0..nm {
            let (y, shape) = project_all_but(&new_factors, Some(d));
            let (_, u) = mode_eig(&y, &shape, d)?;
            new_factors[d] = take_cols(&u, dims[d], dims[d], ranks[d]);
            last = Some((y, shape, d));
        }
        let (y, shape, d) = last.unwrap();
        let ut = permute(&new_factors[d], &[dims[d], ranks[d]], &[1, 0]);
        let (ncore, _) = mode_product64(&y, &shape, d, &ut, ranks[d]);
        let nerr = err_of(&ncore);
        iterations += 1;
        if nerr < err {
            let improvement = err - nerr;
            factors = new_factors;
            core = ncore;
            err = nerr;
            if improvement < tol {
                break;
            }
        } else {
            break;
        }
    }
    Ok(TuckerResult { core, ranks, factors, iterations, rel_error: err })
}

/// `Y = X Ŵᵀ` without forming Ŵ. `factors[d]` is `dims[d] × ranks[d]` (interleaved modes).
pub(crate) fn tucker_apply(core: &[f32], ranks: &[usize], factors: &[std::borrow::Cow<'_, [f32]>], row_dims: &[usize], col_dims: &[usize], x: &[f32], batch: usize) -> Vec<f32> {
    let k = row_dims.len();
    // X as [batch, j1..jk] → project each j_t with U_{2t+1}ᵀ
    let mut shape = vec![batch];
    shape.extend_from_slice(col_dims);
    let mut z = x.to_vec();
    for t in 0..k {
        let d = 2 * t + 1;
        let ut = permute(&factors[d], &[col_dims[t], ranks[d]], &[1, 0]);
        let (nz, ns) = mode_product32(&z, &shape, t + 1, &ut, ranks[d]);
        z = nz;
        shape = ns;
    }
    // core (a1,c1,…,ak,ck) → (c1..ck, a1..ak)
    let perm: Vec<usize> = (0..k).map(|t| 2 * t + 1).chain((0..k).map(|t| 2 * t)).collect();
    let cp = permute(core, ranks, &perm);
    let pc: usize = (0..k).map(|t| ranks[2 * t + 1]).product();
    let pa: usize = (0..k).map(|t| ranks[2 * t]).product();
    let mut y = mm32(&z, batch, pc, false, &cp, pc, pa, false);
    let mut shape = vec![batch];
    shape.extend((0..k).map(|t| ranks[2 * t]));
    for t in 0..k {
        let d = 2 * t;
        let u = &factors[d]; // m_t × a_t
        let (ny, ns) = mode_product32(&y, &shape, t + 1, u, row_dims[t]);
        y = ny;
        shape = ns;
    }
    y
}

pub(crate) fn tucker_reconstruct(core: &[f32], ranks: &[usize], factors: &[std::borrow::Cow<'_, [f32]>], row_dims: &[usize], col_dims: &[usize]) -> Vec<f32> {
    let dims = crate::sites::interleaved(row_dims, col_dims);
    let mut y = core.to_vec();
    let mut shape = ranks.to_vec();
    for d in 0..dims.len() {
        let (ny, ns) = mode_product32(&y, &shape, d, &factors[d], dims[d]);
        y = ny;
        shape = ns;
    }
    crate::sites::tensor_to_matrix(&y, row_dims, col_dims)
}

use crate::linalg::mm32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_fills_the_modes_a_uniform_cap_leaves_empty() {
        // 256 × 256 on four 4 × 4 sites, half the values: cap 3 keeps 6657, a tenth; one more
        // rank on five of the eight modes keeps 27 764
        let dims = [4usize; 8];
        let r = ranks_for_budget(&dims, 3, 32_768);
        assert_eq!(r, vec![4, 4, 4, 4, 4, 3, 3, 3]);
        assert_eq!(params_for_ranks(&dims, &r), 27_764);
        assert_eq!(params_for_ranks(&dims, &ranks_for_cap(&dims, 3)), 6_657);
        // mixed sizes: the 8-sized modes grow before the 4-sized one, and nothing more fits
        let dims = [8usize, 2, 8, 4];
        let r = ranks_for_budget(&dims, 2, 200);
        assert!(params_for_ranks(&dims, &r) <= 200 && r.iter().zip(&dims).all(|(r, d)| r <= d), "{r:?}");
        let grown = (0..4).filter(|&d| r[d] < dims[d]).all(|d| {
            let mut s = r.clone();
            s[d] += 1;
            params_for_ranks(&dims, &s) > 200 || r[d] >= r.iter().enumerate().filter(|&(e, _)| e != d).map(|(_, x)| x).product::<usize>()
        });
        assert!(grown, "{r:?}: a mode could still grow within the budget");
        // 4096 × 4096 at a tenth: cap 5 on eight 8-sized modes, then the modes grow in turn
        // (1.40 M values at seven 6s) and the first once more (1.63 M), not one mode to 8
        assert_eq!(ranks_for_budget(&[8; 8], 5, 1_677_721), vec![7, 6, 6, 6, 6, 6, 6, 5]);
        // one site (two modes): a rank beyond the other mode's is of no use to the core, so
        // 768 × 256 at a tenth stays at the cap
        assert_eq!(ranks_for_budget(&[768, 256], 18, 19_660), vec![18, 18]);
        // a budget the cap already meets exactly changes nothing
        assert_eq!(ranks_for_budget(&[4; 8], 3, 6_657), vec![3; 8]);
    }
}
