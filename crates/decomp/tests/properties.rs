//! Property tests on random matrices with known singular values: W = Q1 diag(s) Q2ᵀ.

use compactor_decomp::*;
use faer::Mat;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

fn gaussian(m: usize, n: usize, seed: u64) -> Mat<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Mat::from_fn(m, n, |_, _| StandardNormal.sample(&mut rng))
}

/// W (m × n, f32) with singular values `s` (len min(m,n)) and Haar-like random singular vectors.
fn known_spectrum(m: usize, n: usize, s: &[f64], seed: u64) -> Mat<f32> {
    let p = m.min(n);
    let q1 = gaussian(m, p, seed).qr().compute_thin_Q();
    let q2 = gaussian(n, p, seed + 1).qr().compute_thin_Q();
    let mut us = q1.clone();
    for j in 0..p {
        for i in 0..m {
            us[(i, j)] *= s[j];
        }
    }
    let w = &us * q2.transpose();
    Mat::from_fn(m, n, |i, j| w[(i, j)] as f32)
}

fn decaying(p: usize, rate: f64) -> Vec<f64> {
    (0..p).map(|i| (-(i as f64) * rate).exp() + 0.01 / (1.0 + i as f64)).collect()
}

fn fro(w: &Mat<f32>) -> f64 {
    let mut s = 0.0;
    for j in 0..w.ncols() {
        for i in 0..w.nrows() {
            s += (w[(i, j)] as f64).powi(2);
        }
    }
    s.sqrt()
}

fn rel_diff(a: &Mat<f32>, b: &Mat<f32>) -> f64 {
    let mut num = 0.0;
    let mut den = 0.0;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            num += (a[(i, j)] as f64 - b[(i, j)] as f64).powi(2);
            den += (b[(i, j)] as f64).powi(2);
        }
    }
    (num / den).sqrt()
}

fn opts(method: Method, rank: RankChoice) -> FactorizeOptions {
    FactorizeOptions::new(method, rank)
}

#[test]
fn svd_truncation_error_equals_eckart_young_tail() {
    for &(m, n) in &[(48, 40), (30, 64)] {
        let p = m.min(n);
        let s: Vec<f64> = (0..p).map(|i| 1.0 / (1.0 + i as f64).sqrt()).collect();
        let w = known_spectrum(m, n, &s, 7);
        let norm: f64 = s.iter().map(|v| v * v).sum::<f64>().sqrt();
        for r in [1, 5, 17, p - 1] {
            let mut o = opts(Method::Svd, RankChoice::Rank(r));
            o.svd_algo = SvdAlgo::Exact;
            let f = factorize(w.as_ref(), &o).unwrap();
            let tail = s[r..].iter().map(|v| v * v).sum::<f64>().sqrt() / norm;
            let err = f.rel_error(w.as_ref());
            assert!(((err - tail) / tail).abs() < 1e-6, "{m}x{n} r={r}: err {err} vs Eckart–Young {tail}");
            assert_eq!(f.params(), r * (m + n));
        }
    }
}

#[test]
fn tt_with_full_bond_reconstructs_exactly() {
    for &(m, n, ref sites) in &[(32, 48, None), (64, 64, Some((vec![4, 4, 4], vec![2, 8, 4])))] {
        let w = known_spectrum(m, n, &decaying(m.min(n), 0.1), 3);
        let mut o = opts(Method::Tt, RankChoice::Rank(max_rank(m, n, Method::Tt, sites.as_ref()).unwrap()));
        o.sites = sites.clone();
        let f = factorize(w.as_ref(), &o).unwrap();
        let err = f.rel_error(w.as_ref());
        assert!(err < 1e-6, "{m}x{n}: full-bond TT error {err}");
    }
}

#[test]
fn tt_error_obeys_tt_svd_bound() {
    let (m, n) = (64, 48);
    let w = known_spectrum(m, n, &decaying(48, 0.15), 11);
    let norm = fro(&w);
    for chi in [1, 2, 4, 8, 16] {
        let (f, rep) = factorize_report(w.as_ref(), &opts(Method::Tt, RankChoice::Rank(chi))).unwrap();
        assert_eq!(rep.discarded.len(), 3);
        let bound = rep.discarded.iter().sum::<f64>().sqrt() / norm;
        let err = f.rel_error(w.as_ref());
        assert!(err <= bound * (1.0 + 1e-5) + 1e-6, "chi={chi}: err {err} > bound {bound}");
        assert!(f.ranks().iter().all(|&b| b <= chi));
    }
}

#[test]
fn tucker_error_does_not_increase_with_rank() {
    let w = known_spectrum(64, 64, &decaying(64, 0.08), 5);
    let mut prev = f64::INFINITY;
    for r in 1..=4 {
        let f = factorize(w.as_ref(), &opts(Method::Tucker, RankChoice::Rank(r))).unwrap();
        let err = f.rel_error(w.as_ref());
        assert!(err <= prev + 1e-9, "tucker rank {r}: {err} > {prev}");
        prev = err;
    }
    assert!(prev < 1e-5, "full Tucker rank should be exact, got {prev}");
}

#[test]
fn cp_error_does_not_increase_with_rank() {
    let w = known_spectrum(16, 16, &decaying(16, 0.3), 9);
    let mut prev = f64::INFINITY;
    for r in [1, 2, 4, 8, 12, 15] {
        let mut o = opts(Method::Cp, RankChoice::Rank(r));
        o.max_iters = 200;
        o.tol = 1e-9;
        let (f, rep) = factorize_report(w.as_ref(), &o).unwrap();
        let err = f.rel_error(w.as_ref());
        assert!((err - rep.rel_error_estimate).abs() < 1e-4, "cp fit estimate {} vs measured {err}", rep.rel_error_estimate);
        assert!(err <= prev + 1e-6, "cp rank {r}: {err} > {prev}");
        assert!(rep.iterations >= 1 && rep.iterations <= 200);
        prev = err;
    }
}

fn all_factorizations(w: &Mat<f32>) -> Vec<(String, Factorization)> {
    let mut out = Vec::new();
    let quants = [
        None,
        Some(QuantSpec { bits: Bits::Int8, group_size: 32, symmetric: true }),
        Some(QuantSpec { bits: Bits::Int4, group_size: 64, symmetric: false }),
        Some(QuantSpec { bits: Bits::Int4, group_size: 128, symmetric: true }),
        Some(QuantSpec { bits: Bits::Int8, group_size: 64, symmetric: false }),
    ];
    for method in [Method::Svd, Method::Tt, Method::Tucker, Method::Cp, Method::Dense] {
        for q in quants {
            let mut o = opts(method, RankChoice::Ratio(0.5));
            o.quant = q;
            o.max_iters = 10;
            out.push((format!("{method:?} {q:?}"), factorize(w.as_ref(), &o).unwrap()));
        }
    }
    out
}

#[test]
fn apply_equals_reconstruct_then_matmul_for_every_method() {
    let (m, n) = (48, 80);
    let w = known_spectrum(m, n, &decaying(48, 0.1), 21);
    let x = Mat::from_fn(7, n, |i, j| ((i * 31 + j * 17) % 23) as f32 / 11.0 - 1.0);
    for (name, f) in all_factorizations(&w) {
        let y = f.apply(x.as_ref()).unwrap();
        let w_hat = f.reconstruct();
        let y_ref = &x * w_hat.transpose();
        let d = rel_diff(&y, &y_ref);
        assert!(d < 1e-5, "{name}: apply differs from reconstruct·matmul by {d}");
        assert_eq!((y.nrows(), y.ncols()), (7, m));
    }
    let f = factorize(w.as_ref(), &opts(Method::Svd, RankChoice::Rank(3))).unwrap();
    assert!(matches!(f.apply(Mat::<f32>::zeros(2, n + 1).as_ref()), Err(DecompError::Shape(_))));
}

#[test]
fn quantization_round_trip_within_half_scale() {
    let data: Vec<f32> = (0..5 * 200).map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.3) * (1.0 + (i % 13) as f32)).collect();
    for bits in [Bits::Int8, Bits::Int4] {
        for symmetric in [true, false] {
            for g in [32, 64, 128] {
                let spec = QuantSpec { bits, group_size: g, symmetric };
                let q = Quantized::quantize(&data, &[5, 200], &spec).unwrap();
                let back = q.dequantize();
                let groups = 200usize.div_ceil(g);
                for r in 0..5 {
                    for c in 0..200 {
                        let scale = q.scales[r * groups + c / g];
                        let e = (data[r * 200 + c] - back[r * 200 + c]).abs();
                        assert!(e <= scale / 2.0 * (1.0 + 1e-5) + 1e-6, "{spec:?} ({r},{c}): |w-ŵ| {e} > scale/2 {}", scale / 2.0);
                    }
                }
                // the bound is the advertised one, and it is tight-ish (not a vacuous huge scale)
                let levels = if symmetric { (1 << (bits.bits() - 1)) - 1 } else { (1 << bits.bits()) - 1 } as f32;
                let amax = data.iter().fold(0f32, |a, v| a.max(v.abs()));
                assert!(q.error_bound() <= 2.0 * amax / levels / 2.0 * 1.0001);
                assert_eq!(q.bytes(), spec.bytes_for(&[5, 200]));
            }
        }
    }
}

#[test]
fn randomized_svd_is_close_to_exact_on_decaying_spectrum() {
    let (m, n) = (400, 300);
    let s: Vec<f64> = (0..300).map(|i| 0.9f64.powi(i)).collect();
    let w = known_spectrum(m, n, &s, 13);
    let r = 20;
    let (_, sr, _) = randomized_svd(w.as_ref(), r, 10, 2, 1).unwrap();
    for i in 0..r {
        assert!(((sr[i] as f64) - s[i]).abs() / s[i] < 1e-4, "σ_{i}: {} vs {}", sr[i], s[i]);
    }
    let mut o = opts(Method::Svd, RankChoice::Rank(r));
    o.svd_algo = SvdAlgo::Randomized { oversample: 10, power_iters: 2 };
    let fr = factorize(w.as_ref(), &o).unwrap();
    o.svd_algo = SvdAlgo::Exact;
    let fe = factorize(w.as_ref(), &o).unwrap();
    let (er, ee) = (fr.rel_error(w.as_ref()), fe.rel_error(w.as_ref()));
    assert!(er <= ee * 1.001, "randomized {er} vs exact {ee}");
}

#[test]
fn tolerance_rank_choice_meets_target() {
    let w = known_spectrum(64, 48, &decaying(48, 0.1), 17);
    for method in [Method::Svd, Method::Tt, Method::Tucker] {
        for tol in [0.3, 0.1, 0.02] {
            let f = factorize(w.as_ref(), &opts(method, RankChoice::Tol(tol))).unwrap();
            let err = f.rel_error(w.as_ref());
            assert!(err <= tol * 1.0001 + 1e-6, "{method:?} tol {tol}: error {err}");
        }
    }
    let f = factorize(w.as_ref(), &opts(Method::Cp, RankChoice::Tol(0.5))).unwrap();
    assert!(f.rel_error(w.as_ref()) <= 0.5 + 1e-4);
}

#[test]
fn ratio_keeps_params_within_budget_and_predict_agrees() {
    let (m, n) = (96, 64);
    let w = known_spectrum(m, n, &decaying(64, 0.1), 2);
    for method in [Method::Svd, Method::Tt, Method::Tucker, Method::Cp] {
        for ratio in [0.1, 0.3, 0.7] {
            let mut o = opts(method, RankChoice::Ratio(ratio));
            o.max_iters = 3;
            let f = factorize(w.as_ref(), &o).unwrap();
            assert!(f.params() as f64 <= ratio * (m * n) as f64, "{method:?} {ratio}: {} params", f.params());
            let p = predict(m, n, method, RankChoice::Ratio(ratio), None, None).unwrap();
            assert_eq!(p.params, f.params(), "{method:?} {ratio}");
            assert_eq!(p.ranks, f.ranks(), "{method:?} {ratio}");
            assert_eq!(p.bytes, f.bytes());
            // one more rank would not fit
            let r = rank_for_ratio(m, n, method, ratio, None).unwrap();
            if r < max_rank(m, n, method, None).unwrap() {
                assert!(params_at_rank(m, n, method, r + 1, None).unwrap().0 as f64 > ratio * (m * n) as f64);
            }
        }
    }
    let q = QuantSpec { bits: Bits::Int4, group_size: 32, symmetric: false };
    let mut o = opts(Method::Svd, RankChoice::Rank(8));
    o.quant = Some(q);
    let f = factorize(w.as_ref(), &o).unwrap();
    assert_eq!(predict(m, n, Method::Svd, RankChoice::Rank(8), None, Some(&q)).unwrap().bytes, f.bytes());
}

#[test]
fn tensors_round_trip_through_metadata() {
    let w = known_spectrum(48, 80, &decaying(48, 0.1), 4);
    for (name, f) in all_factorizations(&w) {
        let meta = f.metadata();
        let json = serde_json::to_string(&meta).unwrap();
        let meta2: FactorMeta = serde_json::from_str(&json).unwrap();
        let g = Factorization::from_tensors(&meta2, f.tensors()).unwrap();
        assert_eq!(f, g, "{name}");
        for t in f.tensors() {
            let numel: usize = t.shape.iter().product();
            let len = match &t.data {
                TensorData::F32(v) => v.len(),
                TensorData::U8(v) => v.len(),
            };
            assert_eq!(numel, len, "{name}: tensor {}", t.name);
        }
    }
    let f = factorize(w.as_ref(), &opts(Method::Svd, RankChoice::Rank(4))).unwrap();
    let mut ts = f.tensors();
    ts.pop();
    assert!(matches!(Factorization::from_tensors(&f.metadata(), ts), Err(DecompError::Tensors(_))));
}

#[test]
fn bad_input_gives_clear_errors() {
    let mut w = Mat::<f32>::from_fn(8, 6, |i, j| (i + j) as f32);
    let o = opts(Method::Svd, RankChoice::Rank(2));
    assert_eq!(factorize(Mat::<f32>::zeros(0, 4).as_ref(), &o), Err(DecompError::Empty { m: 0, n: 4 }));
    assert!(matches!(factorize(w.as_ref(), &opts(Method::Svd, RankChoice::Rank(0))), Err(DecompError::RankZero)));
    assert!(matches!(factorize(w.as_ref(), &opts(Method::Svd, RankChoice::Rank(7))), Err(DecompError::RankTooLarge { rank: 7, max: 6, .. })));
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        assert!(matches!(factorize(w.as_ref(), &opts(Method::Tt, RankChoice::Ratio(bad))), Err(DecompError::BadRatio { .. })));
    }
    assert!(matches!(factorize(w.as_ref(), &opts(Method::Svd, RankChoice::Ratio(0.01))), Err(DecompError::RatioTooSmall { .. })));
    assert!(matches!(factorize(w.as_ref(), &opts(Method::Svd, RankChoice::Tol(0.0))), Err(DecompError::BadTolerance { .. })));
    let mut o2 = opts(Method::Tt, RankChoice::Rank(2));
    o2.sites = Some((vec![2, 2], vec![2, 3]));
    let e = factorize(w.as_ref(), &o2).unwrap_err();
    assert!(matches!(e, DecompError::BadSites { product: 4, expected: 8, .. }), "{e}");
    o2.sites = Some((vec![2, 4], vec![6]));
    assert!(matches!(factorize(w.as_ref(), &o2), Err(DecompError::SiteCount { .. })));
    w[(3, 5)] = f32::NAN;
    let e = factorize(w.as_ref(), &o).unwrap_err();
    assert!(matches!(e, DecompError::NonFinite { row: 3, col: 5, .. }));
    assert!(e.to_string().contains("row 3, col 5"), "{e}");
    w[(3, 5)] = f32::INFINITY;
    assert!(matches!(spectrum(w.as_ref()), Err(DecompError::NonFinite { row: 3, col: 5, .. })));
    let mut o3 = opts(Method::Dense, RankChoice::Rank(1));
    o3.quant = Some(QuantSpec { bits: Bits::Int8, group_size: 48, symmetric: true });
    w[(3, 5)] = 1.0;
    assert!(matches!(factorize(w.as_ref(), &o3), Err(DecompError::BadQuant(_))));
    assert_eq!(predict(8, 6, Method::Svd, RankChoice::Tol(0.1), None, None), Err(DecompError::NeedsData));
}

#[test]
fn balanced_site_factoring() {
    use compactor_decomp::sites::balanced_factors;
    assert_eq!(balanced_factors(4096, 4), vec![8, 8, 8, 8]);
    assert_eq!(balanced_factors(12800, 4), vec![10, 10, 16, 8]);
    let f = balanced_factors(768, 4);
    assert_eq!(f.iter().product::<usize>(), 768);
    assert!(f.iter().all(|&d| (4..=8).contains(&d)), "{f:?}");
}

#[test]
fn spectrum_statistics_and_power_law() {
    let s = decaying(40, 0.1);
    let w = known_spectrum(50, 40, &s, 8);
    let sp = spectrum(w.as_ref()).unwrap();
    for i in 0..40 {
        assert!((sp.singular_values[i] - s[i]).abs() < 1e-5 * s[0]);
    }
    let e2: f64 = s.iter().map(|v| v * v).sum();
    assert!((sp.stable_rank - e2 / (s[0] * s[0])).abs() < 1e-4);
    assert!((sp.energy_at_rank[39] - 1.0).abs() < 1e-9);
    assert!(sp.entropy_effective_rank > 1.0 && sp.entropy_effective_rank < 40.0);
    // synthetic Pareto eigenvalues with alpha = 3: the MLE+KS fit should recover it
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let eigs: Vec<f64> = (0..3000)
        .map(|_| {
            let u: f64 = rand::Rng::random(&mut rng);
            (1.0 - u).powf(-1.0 / 2.0)
        })
        .collect();
    let (alpha, xmin, ks) = compactor_decomp::spectrum::power_law_fit(&eigs).unwrap();
    assert!((alpha - 3.0).abs() < 0.25, "alpha {alpha} xmin {xmin} ks {ks}");
    let json = serde_json::to_string(&sp).unwrap();
    assert!(json.contains("alpha_ks"));
}

#[test]
fn error_curve_is_monotone_for_svd() {
    let w = known_spectrum(40, 40, &decaying(40, 0.2), 6);
    let pts = error_curve(w.as_ref(), &[Method::Svd, Method::Tt], &[0.1, 0.3, 0.6, 1.0]).unwrap();
    let svd: Vec<_> = pts.iter().filter(|p| p.method == Method::Svd).collect();
    assert_eq!(svd.len(), 4);
    assert!(svd.windows(2).all(|p| p[1].rel_error <= p[0].rel_error));
    assert!(pts.iter().all(|p| p.params as f64 <= p.ratio * 1600.0));
}

#[test]
fn cp_refuses_ranks_whose_als_matrices_exceed_the_memory_limit() {
    // 1024 × 1024 on 4 sites (dims 4·4·8·8 each side): ratio 0.5 asks for rank 10 699, whose 11
    // r × r f64 matrices need 9.4 GiB; the limit (8 GiB) allows rank 9 879
    let w = Mat::from_fn(1024, 1024, |i, j| ((i * 7 + j * 3) % 11) as f32 - 5.0);
    let mut o = opts(Method::Cp, RankChoice::Ratio(0.5));
    o.sites = Some((vec![4, 4, 8, 8], vec![4, 4, 8, 8]));
    let r = rank_for_ratio(1024, 1024, Method::Cp, 0.5, o.sites.as_ref()).unwrap();
    assert_eq!(r, 10699);
    match factorize(w.as_ref(), &o) {
        Err(DecompError::CpTooLarge { rank, m, n, count, max_rank, limit_gib, needed_gib }) => {
            assert_eq!((rank, m, n, count, max_rank, limit_gib), (10699, 1024, 1024, 11, 9879, 8));
            assert!((needed_gib - 11.0 * 10699f64.powi(2) * 8.0 / (1u64 << 30) as f64).abs() < 1e-9);
        }
        other => panic!("expected CpTooLarge, got {:?}", other.map(|f| f.ranks())),
    }
    // the message names the rank, the shape and what to do
    let msg = factorize(w.as_ref(), &o).unwrap_err().to_string();
    assert!(msg.contains("rank 10699 on a 1024 x 1024 matrix") && msg.contains("choose rank 9879 or less"), "{msg}");
    // at the largest allowed rank the check passes (the fit itself is not run here)
    assert!(cp::check_als_size(1024, 1024, 8, 9879).is_ok());
    assert!(cp::check_als_size(1024, 1024, 8, 9880).is_err());
}
