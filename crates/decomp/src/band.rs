//! Eigenvalues of a symmetric band matrix: the second and third stage of a two-stage symmetric
//! eigensolver (the first, dense → band, runs on the GPU: `compactor_core::gpu::band_reduce`).
//!
//! - [`band_to_tridiagonal`]: Householder bulge chasing. Sweep j annihilates column j below the
//!   subdiagonal with one reflector of length ≤ b, applied from both sides to the diagonal block;
//!   applying it from the right to the block below fills that block, and a new reflector on the
//!   block's first column pushes the fill one block further down ("chases the bulge") until it
//!   leaves the matrix. Only the first column of each filled block is annihilated; the rest of the
//!   fill (a triangle within 2b − 1 of the diagonal) is removed by the next sweeps. Values only:
//!   no reflector is kept. Cost ≈ 6 n² b flops in f64 on a band of width 2b.
//! - [`tridiagonal_eigenvalues`]: implicit QL with Wilkinson shifts (values only), O(n²).
//! - [`band_eigenvalues`]: both, from the lower band of an f32 matrix. (The GPU path replaces
//!   the QL by bisection, one thread per eigenvalue: `compactor_core::gpu_band`.)
//!
//! Every step is an orthogonal similarity, so the eigenvalues are those of the band matrix to
//! f64 round-off; the accuracy of the whole solve is set by the f32 first stage.

use crate::error::{DecompError, Result};

/// A symmetric n × n matrix stored by its lower diagonals: entry (r, c), 0 ≤ r − c < w, at
/// `a[c·w + r − c]`. `w = 2b` holds a band of half-width b plus the bulge of the chase.
struct Band {
    n: usize,
    w: usize,
    a: Vec<f64>,
}

/// `a·b + c`, fused where the caller was compiled with FMA (see [`band_to_tridiagonal`]).
#[inline(always)]
fn madd<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Σ xᵢ yᵢ of two length-B arrays (B a multiple of 4), in four partial sums so that the
/// additions do not wait on each other.
#[inline(always)]
fn dot4<const FMA: bool, const B: usize>(x: &[f64], y: &[f64; B]) -> f64 {
    let x = &x[..B];
    let mut acc = [0.0f64; 4];
    for k in 0..B / 4 {
        for j in 0..4 {
            acc[j] = madd::<FMA>(x[4 * k + j], y[4 * k + j], acc[j]);
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

impl Band {
    /// `D ← H D H` for the diagonal block at rows/columns s..s+v.len(), H = I − τ v vᵀ
    /// (lower triangle, column by column: each column's entries are contiguous).
    #[inline(always)]
    fn two_sided(&mut self, s: usize, v: &[f64], tau: f64, p: &mut [f64]) {
        let l = v.len();
        if tau == 0.0 {
            return;
        }
        let p = &mut p[..l];
        p.fill(0.0);
        for c in 0..l {
            let col = &self.a[(s + c) * self.w..(s + c) * self.w + l - c];
            let vc = v[c];
            let mut acc = col[0] * vc;
            for ((x, pr), vr) in col[1..].iter().zip(&mut p[c + 1..]).zip(&v[c + 1..]) {
                *pr += x * vc;
                acc += x * vr;
            }
            p[c] += acc;
        }
        let k = 0.5 * tau * tau * v.iter().zip(p.iter()).map(|(a, b)| a * b).sum::<f64>();
        for (pr, vr) in p.iter_mut().zip(v) {
            *pr = tau * *pr - k * vr;
        }
        for c in 0..l {
            let col = &mut self.a[(s + c) * self.w..(s + c) * self.w + l - c];
            let (vc, pc) = (v[c], p[c]);
            for ((x, vr), pr) in col.iter_mut().zip(&v[c..]).zip(&p[c..]) {
                *x -= vr * pc + pr * vc;
            }
        }
    }

    /// Column c of the off-diagonal block with rows r0..r0+len below the columns c0.. (r0 > c0 + c):
    /// entries (r0 + i, c0 + c), contiguous.
    #[inline(always)]
    fn block_col(&mut self, r0: usize, c0: usize, c: usize, len: usize) -> &mut [f64] {
        let base = (c0 + c) * self.w + (r0 - c0 - c);
        &mut self.a[base..base + len]
    }
}

/// One chase step with full blocks of a half-width B known at compile time (B = 8, 16 or 32):
/// the columns st..st+B hold reflector (v, τ) to apply from the right to the block below (rows
/// st+B..st+2B); a new reflector (returned in `v2`, with its τ) annihilates that block's first
/// column, goes from the left through the block and from both sides through the next diagonal
/// block. Same arithmetic as the general loop, in registers, without length checks.
#[inline(always)]
fn chase_step<const FMA: bool, const B: usize>(a: &mut [f64], w: usize, st: usize, v: &[f64; B], tau: f64, v2: &mut [f64; B]) -> f64 {
    // column st + c of the block below starts at row st + B: offset B − c in that column
    let below = |c: usize| (st + c) * w + (B - c);
    let mut d = [0.0f64; B];
    for c in 0..B {
        let col = &a[below(c)..below(c) + B];
        for i in 0..B {
            d[i] = madd::<FMA>(col[i], v[c], d[i]);
        }
    }
    // from the right, column 0 first: it gives the next reflector
    {
        let f = -tau * v[0];
        let col = &mut a[below(0)..below(0) + B];
        for i in 0..B {
            col[i] = madd::<FMA>(f, d[i], col[i]);
        }
        v2.copy_from_slice(col);
    }
    let (tau2, beta2) = house(&mut v2[..]);
    {
        let col = &mut a[below(0)..below(0) + B];
        col.fill(0.0);
        col[0] = beta2;
    }
    // the other columns: from the right, then the new reflector from the left
    for c in 1..B {
        let f = -tau * v[c];
        let col = &mut a[below(c)..below(c) + B];
        for i in 0..B {
            col[i] = madd::<FMA>(f, d[i], col[i]);
        }
        let g = -tau2 * dot4::<FMA, B>(col, v2);
        for i in 0..B {
            col[i] = madd::<FMA>(g, v2[i], col[i]);
        }
    }
    // both sides of the next diagonal block (rows/columns st + B..st + 2B): p = D v2 from a full
    // copy of the block, so that every product is an axpy
    let s = st + B;
    let mut full = [[0.0f64; B]; B];
    for c in 0..B {
        let col = &a[(s + c) * w..(s + c) * w + B - c];
        for r in c..B {
            full[c][r] = col[r - c];
            full[r][c] = col[r - c];
        }
    }
    let mut p = [0.0f64; B];
    for c in 0..B {
        for r in 0..B {
            p[r] = madd::<FMA>(full[c][r], v2[c], p[r]);
        }
    }
    let k = 0.5 * tau2 * tau2 * dot4::<FMA, B>(&p, v2);
    for r in 0..B {
        p[r] = madd::<FMA>(tau2, p[r], -k * v2[r]);
    }
    for c in 0..B {
        let col = &mut a[(s + c) * w..(s + c) * w + B - c];
        let (vc, pc) = (v2[c], p[c]);
        for r in c..B {
            col[r - c] = madd::<FMA>(-v2[r], pc, madd::<FMA>(-p[r], vc, col[r - c]));
        }
    }
    tau2
}

/// Householder reflector of x: (v with v₀ = 1, τ, β) such that (I − τ v vᵀ) x = β e₁.
/// Writes v over `x`.
#[inline(always)]
fn house(x: &mut [f64]) -> (f64, f64) {
    let a = x[0];
    let s: f64 = x[1..].iter().map(|t| t * t).sum();
    x[0] = 1.0;
    if s == 0.0 {
        return (0.0, a);
    }
    let beta = -(a * a + s).sqrt().copysign(a);
    let scale = 1.0 / (a - beta);
    for t in &mut x[1..] {
        *t *= scale;
    }
    ((beta - a) / beta, beta)
}

/// Reduces a symmetric band matrix (half-width `b`, lower band in `lower[c·(b+1) + d]` = A(c+d, c)
/// for d ≤ b, entries past the last row ignored) to tridiagonal form by orthogonal similarity;
/// returns the diagonal (n) and subdiagonal (n − 1). On x86-64 CPUs with AVX2 and FMA the chase
/// runs in a copy compiled for them (`examples/bench_band.rs` times both).
pub fn band_to_tridiagonal(n: usize, b: usize, lower: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
    reduce(n, b, lower, simd_chase())
}

/// [`band_to_tridiagonal`] in its portable copy (no AVX2/FMA): the baseline of
/// `examples/bench_band.rs` and of the test that both copies agree.
#[doc(hidden)]
pub fn band_to_tridiagonal_portable(n: usize, b: usize, lower: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
    reduce(n, b, lower, false)
}

fn reduce(n: usize, b: usize, lower: &[f64], simd: bool) -> Result<(Vec<f64>, Vec<f64>)> {
    if b == 0 || lower.len() != n * (b + 1) {
        return Err(DecompError::Shape(format!("band of half-width {b} for n = {n} needs {} values, got {}", n * (b + 1), lower.len())));
    }
    let w = 2 * b.max(1);
    let mut m = Band { n, w, a: vec![0.0; n * w] };
    for c in 0..n {
        for d in 0..=b.min(n - 1 - c) {
            m.a[c * w + d] = lower[c * (b + 1) + d];
        }
    }
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `simd` is only true where simd_chase() saw AVX2 and FMA on this CPU
        true => unsafe { chase_avx2_fma(&mut m, b) },
        _ => chase::<false>(&mut m, b),
    }
    let d = (0..n).map(|i| m.a[i * w]).collect();
    let e = (0..n.saturating_sub(1)).map(|i| m.a[i * w + 1]).collect();
    Ok((d, e))
}

/// Whether [`band_to_tridiagonal`] runs its AVX2 + FMA copy (the CPU has both).
pub fn simd_chase() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn chase_avx2_fma(m: &mut Band, b: usize) {
    chase::<true>(m, b)
}

/// The sweeps of [`band_to_tridiagonal`] on the widened band `m`.
#[inline(always)]
fn chase<const FMA: bool>(m: &mut Band, b: usize) {
    match b {
        8 => sweeps::<FMA, 8>(m, b),
        16 => sweeps::<FMA, 16>(m, b),
        32 => sweeps::<FMA, 32>(m, b),
        _ => sweeps::<FMA, 0>(m, b),
    }
}

/// The sweeps; chase steps with full blocks of half-width `B` (≠ 0) go through [`chase_step`].
#[inline(always)]
fn sweeps<const FMA: bool, const B: usize>(m: &mut Band, b: usize) {
    let (n, w) = (m.n, m.w);
    let mut v = vec![0.0; b];
    let mut v2 = vec![0.0; b];
    let mut p = vec![0.0; b];
    let (mut fv, mut fv2) = ([0.0f64; B], [0.0f64; B]);
    for j in 0..n.saturating_sub(2) {
        let (mut st, mut ed) = (j + 1, (j + b).min(n - 1));
        if ed <= st {
            continue;
        }
        let mut l = ed - st + 1;
        // column j below the diagonal: rows st..=ed, contiguous
        let cj = j * w + 1;
        v[..l].copy_from_slice(&m.a[cj..cj + l]);
        let (mut tau, beta) = house(&mut v[..l]);
        m.a[cj] = beta;
        m.a[cj + 1..cj + l].fill(0.0);
        m.two_sided(st, &v[..l], tau, &mut p);
        if B != 0 && l == B {
            // full blocks while the block below ends inside the matrix
            fv.copy_from_slice(&v[..B]);
            while ed + B < n {
                tau = chase_step::<FMA, B>(&mut m.a, w, st, &fv, tau, &mut fv2);
                std::mem::swap(&mut fv, &mut fv2);
                (st, ed) = (st + B, ed + B);
            }
            v[..B].copy_from_slice(&fv);
        }
        // chase: block rows st2..=ed2, columns st..=ed
        while ed + 1 < n {
            let (st2, ed2) = (ed + 1, (ed + b).min(n - 1));
            let l2 = ed2 - st2 + 1;
            // from the right: B ← B H, d = B v
            if tau != 0.0 {
                let d = &mut p[..l2];
                d.fill(0.0);
                for (c, &vc) in v[..l].iter().enumerate() {
                    for (x, y) in d.iter_mut().zip(m.block_col(st2, st, c, l2).iter()) {
                        *x += y * vc;
                    }
                }
                for (c, &vc) in v[..l].iter().enumerate() {
                    let f = tau * vc;
                    let d = &p[..l2];
                    for (y, x) in m.block_col(st2, st, c, l2).iter_mut().zip(d) {
                        *y -= f * x;
                    }
                }
            }
            // a reflector for the block's first column, applied from the left to the others
            v2[..l2].copy_from_slice(m.block_col(st2, st, 0, l2));
            let (tau2, beta2) = house(&mut v2[..l2]);
            let col0 = m.block_col(st2, st, 0, l2);
            col0.fill(0.0);
            col0[0] = beta2;
            if tau2 != 0.0 {
                for c in 1..l {
                    let col = m.block_col(st2, st, c, l2);
                    let f = tau2 * col.iter().zip(&v2[..l2]).map(|(x, y)| x * y).sum::<f64>();
                    for (x, y) in col.iter_mut().zip(&v2[..l2]) {
                        *x -= f * y;
                    }
                }
            }
            m.two_sided(st2, &v2[..l2], tau2, &mut p);
            std::mem::swap(&mut v, &mut v2);
            (st, ed, l, tau) = (st2, ed2, l2, tau2);
        }
    }
}

/// Eigenvalues (ascending) of the symmetric tridiagonal matrix with diagonal `d` and
/// subdiagonal `e` (len n − 1): the root-free implicit QL iteration of Pal, Walker and Kahan
/// (values only; it works on the squared off-diagonals, one square root per iteration).
pub fn tridiagonal_eigenvalues(mut d: Vec<f64>, e: &[f64]) -> Result<Vec<f64>> {
    let n = d.len();
    if e.len() + 1 != n.max(1) {
        return Err(DecompError::Shape(format!("tridiagonal of order {n} needs {} off-diagonal values, got {}", n.saturating_sub(1), e.len())));
    }
    if let Some(bad) = d.iter().chain(e).find(|x| !x.is_finite()) {
        return Err(DecompError::Linalg(format!("tridiagonal matrix holds {bad}")));
    }
    // scale to O(1) so that squares neither overflow nor underflow
    let scale = d.iter().chain(e).fold(0.0f64, |m, x| m.max(x.abs()));
    if scale == 0.0 {
        return Ok(d);
    }
    let inv = 1.0 / scale;
    d.iter_mut().for_each(|x| *x *= inv);
    let mut e2: Vec<f64> = e.iter().map(|x| (x * inv) * (x * inv)).chain(std::iter::once(0.0)).collect();
    let eps2 = f64::EPSILON * f64::EPSILON;
    let mut l = 0;
    let mut iters = 0usize;
    while l < n {
        let mut m = l;
        while m + 1 < n && e2[m] > eps2 * (d[m] * d[m + 1]).abs() {
            m += 1;
        }
        if m == l {
            l += 1;
            continue;
        }
        iters += 1;
        if iters > 40 * n {
            return Err(DecompError::Linalg(format!("tridiagonal QL did not converge (order {n}, at eigenvalue {l})")));
        }
        // Wilkinson-like shift from the leading 2×2 of the unreduced block l..=m
        let rte = e2[l].sqrt();
        let g = (d[l + 1] - d[l]) / (2.0 * rte);
        let r = (g * g + 1.0).sqrt();
        let sigma = d[l] - rte / (g + r.copysign(g));
        let (mut c, mut s) = (1.0f64, 0.0f64);
        let mut gamma = d[m] - sigma;
        let mut p = gamma * gamma;
        for i in (l..m).rev() {
            let bb = e2[i];
            let r = p + bb;
            if i + 1 != m {
                e2[i + 1] = s * r;
            }
            let oldc = c;
            let ir = 1.0 / r;
            c = p * ir;
            s = bb * ir;
            let oldgam = gamma;
            let alpha = d[i];
            gamma = c * (alpha - sigma) - s * oldgam;
            d[i + 1] = oldgam + (alpha - gamma);
            p = if c != 0.0 { gamma * gamma / c } else { oldc * bb };
        }
        e2[l] = s * p;
        d[l] = sigma + gamma;
    }
    d.iter_mut().for_each(|x| *x *= scale);
    d.sort_by(|a, b| a.total_cmp(b));
    Ok(d)
}

/// Eigenvalues (ascending) of a symmetric band matrix given by its lower band in f32,
/// `lower[c·(b+1) + d]` = A(c+d, c) (the layout the GPU's first stage downloads).
pub fn band_eigenvalues(n: usize, b: usize, lower: &[f32]) -> Result<Vec<f64>> {
    let (d, e) = band_to_tridiagonal_f32(n, b, lower)?;
    tridiagonal_eigenvalues(d, &e)
}

/// [`band_to_tridiagonal`] of an f32 lower band (checked for NaN and infinities), in f64.
pub fn band_to_tridiagonal_f32(n: usize, b: usize, lower: &[f32]) -> Result<(Vec<f64>, Vec<f64>)> {
    if let Some(i) = lower.iter().position(|x| !x.is_finite()) {
        return Err(DecompError::NonFinite { row: i % (b + 1) + i / (b + 1), col: i / (b + 1), value: lower[i] });
    }
    let wide: Vec<f64> = lower.iter().map(|&x| x as f64).collect();
    band_to_tridiagonal(n, b, &wide)
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::{Mat, Side};

    fn dense_eigs(n: usize, f: impl Fn(usize, usize) -> f64) -> Vec<f64> {
        let a = Mat::from_fn(n, n, |r, c| f(r.max(c), r.min(c)));
        let mut s = a.self_adjoint_eigenvalues(Side::Lower).unwrap();
        s.sort_by(|a, b| a.total_cmp(b));
        s
    }

    /// A deterministic symmetric band matrix with a wide spread of eigenvalues.
    fn band_entry(r: usize, c: usize, b: usize) -> f64 {
        if r - c > b {
            return 0.0;
        }
        let h = ((r * 7919 + c * 104729 + 13) % 1000) as f64 / 1000.0 - 0.5;
        if r == c {
            h + 4.0 * (0.97f64).powi(r as i32)
        } else {
            h * 0.5
        }
    }

    #[test]
    fn band_eigenvalues_match_dense_eigensolver() {
        for (n, b) in [(1, 3), (2, 1), (5, 8), (37, 1), (64, 8), (97, 16), (130, 32)] {
            let lower: Vec<f32> = (0..n).flat_map(|c| (0..=b).map(move |d| if c + d < n { band_entry(c + d, c, b) as f32 } else { 0.0 })).collect();
            let got = band_eigenvalues(n, b, &lower).unwrap();
            let want = dense_eigs(n, |r, c| band_entry(r, c, b) as f32 as f64);
            let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let err = got.iter().zip(&want).fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
            assert_eq!(got.len(), n);
            assert!(err <= 1e-12 * scale.max(1.0), "n={n} b={b}: max |Δλ| {err:e} (λ_max {scale})");
        }
    }

    /// The copy `band_to_tridiagonal` picks on this CPU (AVX2 + FMA where it has them) and the
    /// portable copy reach the same eigenvalues: the fixed-width chase steps (b = 8, 16, 32)
    /// and the generic loop (b = 12) alike.
    #[test]
    fn simd_and_portable_chase_agree() {
        let n = 300;
        for b in [8, 12, 16, 32] {
            let lower: Vec<f64> = (0..n).flat_map(|c| (0..=b).map(move |d| if c + d < n { band_entry(c + d, c, b) } else { 0.0 })).collect();
            let eig = |(d, e): (Vec<f64>, Vec<f64>)| tridiagonal_eigenvalues(d, &e).unwrap();
            let fast = eig(band_to_tridiagonal(n, b, &lower).unwrap());
            let portable = eig(band_to_tridiagonal_portable(n, b, &lower).unwrap());
            let want = dense_eigs(n, |r, c| band_entry(r, c, b));
            let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let apart = fast.iter().zip(&portable).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
            let off = fast.iter().zip(&want).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(apart <= 1e-12 * scale, "b={b}: copies differ by {apart:e} (simd {})", simd_chase());
            assert!(off <= 1e-12 * scale, "b={b}: max |Δλ| against faer {off:e}");
        }
    }

    #[test]
    fn tridiagonal_handles_split_and_repeated_eigenvalues() {
        // two identical blocks separated by a zero off-diagonal: every eigenvalue twice
        let d = vec![2.0, 2.0, 2.0, 2.0];
        let e = vec![1.0, 0.0, 1.0];
        let got = tridiagonal_eigenvalues(d, &e).unwrap();
        for (g, w) in got.iter().zip([1.0, 1.0, 3.0, 3.0]) {
            assert!((g - w).abs() < 1e-14, "{got:?}");
        }
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(matches!(band_eigenvalues(3, 1, &[1.0; 5]), Err(DecompError::Shape(_))));
        assert!(matches!(band_eigenvalues(2, 1, &[1.0, f32::NAN, 1.0, 0.0]), Err(DecompError::NonFinite { row: 1, col: 0, .. })));
        assert!(matches!(tridiagonal_eigenvalues(vec![1.0, 2.0], &[]), Err(DecompError::Shape(_))));
    }
}
