//! Tensorization of a matrix dimension into sites: `m = m1·…·mk`, row index
//! `i = (i1,…,ik)` row-major (i1 most significant), same for columns.
//!
//! The automatic factoring is balanced: prime factors, largest first, each go to the currently
//! smallest site (first one on ties). `4096 → [8,8,8,8]`, `12800 → [10,10,16,8]`, `768 → [6,8,4,4]`.
//!
//! ```
//! use compactor_decomp::sites::balanced_factors;
//! assert_eq!(balanced_factors(4096, 4), vec![8, 8, 8, 8]);
//! assert_eq!(balanced_factors(12800, 4), vec![10, 10, 16, 8]);
//! ```

use crate::error::{DecompError, Result};

/// Default number of sites.
pub const DEFAULT_SITES: usize = 4;

/// Split `n` into `k` balanced factors (see module docs). `n ≥ 1`, `k ≥ 1`.
pub fn balanced_factors(n: usize, k: usize) -> Vec<usize> {
    let k = k.max(1);
    let mut primes = Vec::new();
    let mut x = n.max(1);
    let mut p = 2;
    while p * p <= x {
        while x % p == 0 {
            primes.push(p);
            x /= p;
        }
        p += 1;
    }
    if x > 1 {
        primes.push(x);
    }
    primes.sort_unstable_by(|a, b| b.cmp(a));
    let mut bins = vec![1usize; k];
    for q in primes {
        let (idx, _) = bins.iter().enumerate().min_by_key(|&(i, &v)| (v, i)).unwrap();
        bins[idx] *= q;
    }
    bins
}

/// Resolve the sites for an `m × n` matrix: the user's override (validated) or balanced factors.
pub fn resolve_sites(m: usize, n: usize, sites: Option<&(Vec<usize>, Vec<usize>)>) -> Result<(Vec<usize>, Vec<usize>)> {
    match sites {
        None => Ok((balanced_factors(m, DEFAULT_SITES), balanced_factors(n, DEFAULT_SITES))),
        Some((r, c)) => {
            if r.len() != c.len() || r.is_empty() || r.contains(&0) || c.contains(&0) {
                return Err(DecompError::SiteCount { rows: r.len(), cols: c.len() });
            }
            let pr: usize = r.iter().product();
            if pr != m {
                return Err(DecompError::BadSites { dims: r.clone(), product: pr, what: "row (m)", expected: m });
            }
            let pc: usize = c.iter().product();
            if pc != n {
                return Err(DecompError::BadSites { dims: c.clone(), product: pc, what: "column (n)", expected: n });
            }
            Ok((r.clone(), c.clone()))
        }
    }
}

/// Interleaved mode dims `[m1, n1, m2, n2, …]` of the 2k-way tensor.
pub fn interleaved(row_dims: &[usize], col_dims: &[usize]) -> Vec<usize> {
    row_dims.iter().zip(col_dims).flat_map(|(&a, &b)| [a, b]).collect()
}

/// Row-major matrix (m × n) → 2k-way tensor T[i1,j1,…,ik,jk] (row-major).
pub(crate) fn matrix_to_tensor<T: Copy + Default>(w: &[T], row_dims: &[usize], col_dims: &[usize]) -> Vec<T> {
    let k = row_dims.len();
    let mut shape = row_dims.to_vec();
    shape.extend_from_slice(col_dims);
    let perm: Vec<usize> = (0..k).flat_map(|t| [t, k + t]).collect();
    crate::linalg::permute(w, &shape, &perm)
}

/// Inverse of [`matrix_to_tensor`].
pub(crate) fn tensor_to_matrix<T: Copy + Default>(t: &[T], row_dims: &[usize], col_dims: &[usize]) -> Vec<T> {
    let k = row_dims.len();
    let shape = interleaved(row_dims, col_dims);
    let perm: Vec<usize> = (0..k).map(|t| 2 * t).chain((0..k).map(|t| 2 * t + 1)).collect();
    crate::linalg::permute(t, &shape, &perm)
}
