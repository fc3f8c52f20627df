//! Spectra of every linear layer of the granite-tiny fixture match numpy.linalg.svd (float64)
//! to 1e-5 relative on the top 50 singular values. Reference: tests/data/granite_tiny_top50.json,
//! made by tests/granite_spectra_reference.py from the same file.

use compactor_decomp::{from_row_major, spectrum};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR"))).join("../../../shared/fixtures/granite-tiny/model.safetensors")
}

#[test]
fn granite_tiny_spectra_match_numpy() {
    let path = fixture();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("fixture is valid safetensors");
    let reference: serde_json::Value =
        serde_json::from_str(include_str!("data/granite_tiny_top50.json")).expect("reference JSON");
    let spectra = reference["spectra"].as_object().unwrap();
    assert_eq!(spectra.len(), 42, "7 projections x 6 layers");
    let mut worst = 0.0f64;
    for (name, entry) in spectra {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::BF16, "{name}");
        let (m, n) = (t.shape()[0], t.shape()[1]);
        let data: Vec<f32> = t.data().chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        let w = from_row_major(m, n, &data);
        let ours = spectrum(w.as_ref()).unwrap().singular_values;
        let theirs: Vec<f64> = entry["top50"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(theirs.len(), 50);
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let rel = (a - b).abs() / b.abs();
            worst = worst.max(rel);
            assert!(rel < 1e-5, "{name} σ_{i}: ours {a} numpy {b} (rel {rel:e})");
        }
    }
    eprintln!("worst relative difference over 42 layers x 50 values: {worst:e}");
}

/// The CPU half of the GPU's two-stage eigensolver (bulge chase + QL, `compactor_decomp::band`)
/// on real Gram matrices: every k_proj of the fixture (128 × 256), its 128 × 128 Gram taken as a
/// band of full width, gives the same top 50 singular values as numpy.linalg.svd.
#[test]
fn band_eigensolver_on_granite_tiny_grams_matches_numpy() {
    let path = fixture();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("fixture is valid safetensors");
    let reference: serde_json::Value = serde_json::from_str(include_str!("data/granite_tiny_top50.json")).expect("reference JSON");
    let mut checked = 0;
    for (name, entry) in reference["spectra"].as_object().unwrap().iter().filter(|(k, _)| k.contains("k_proj")) {
        let t = st.tensor(name).unwrap();
        let (m, n) = (t.shape()[0], t.shape()[1]);
        let w: Vec<f64> = t.data().chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64()).collect();
        assert!(m < n, "{name}: {m} x {n}");
        // lower band of W Wᵀ with half-width m − 1 (the whole lower triangle)
        let b = m - 1;
        let mut lower = vec![0.0f64; m * (b + 1)];
        for c in 0..m {
            for d in 0..m - c {
                let r = c + d;
                lower[c * (b + 1) + d] = (0..n).map(|k| w[r * n + k] * w[c * n + k]).sum();
            }
        }
        let (d, e) = compactor_decomp::band::band_to_tridiagonal(m, b, &lower).unwrap();
        let mut s: Vec<f64> = compactor_decomp::band::tridiagonal_eigenvalues(d, &e).unwrap().iter().map(|l| l.max(0.0).sqrt()).collect();
        s.reverse();
        let theirs: Vec<f64> = entry["top50"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        for (i, (a, b)) in s.iter().zip(&theirs).enumerate() {
            assert!((a - b).abs() / b < 1e-9, "{name} σ_{i}: band solver {a}, numpy {b}");
        }
        checked += 1;
    }
    assert_eq!(checked, 6, "one k_proj per layer");
}
