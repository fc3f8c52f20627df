//! The plan files shipped in `scripts/plans/` (used by `scripts/gpu-run.sh` on the synthetic
//! Granite-8B) resolve against the Granite-3.3-8B shapes and keep the share of the linear
//! parameters their names and the benchmark notes claim.

use compactor_core::config::ModelConfig;
use compactor_core::model::linear_layers;
use compactor_core::plan::{Method, Plan, QuantSpec};
use compactor_core::synth::SynthConfig;
use std::path::PathBuf;

fn plan_file(name: &str) -> PathBuf {
    // cargo sets CARGO_MANIFEST_DIR when it runs the test too: the checkout the test runs in, even
    // when the test binary was built from another one sharing the target directory
    std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR"))).join("../../scripts/plans").join(name)
}

/// (parameters kept, parameters of the dense linear layers), counting a layer given a ratio as
/// ratio · its parameters; every layer's quantization must be `quant`.
fn kept_quantized(name: &str, quant: Option<QuantSpec>) -> (f64, f64) {
    let cfg = ModelConfig::from_json(&SynthConfig::granite_8b().config_json().to_string()).unwrap();
    let specs = linear_layers(&cfg);
    assert_eq!(specs.len(), 280);
    let plan = Plan::from_file(&plan_file(name)).unwrap();
    let resolved = plan.resolve(&specs).unwrap();
    let (mut kept, mut total) = (0f64, 0f64);
    for (s, r) in specs.iter().zip(&resolved) {
        assert_eq!(r.quant, quant, "{name}: quantization of {}", s.name);
        let dense = s.params() as f64;
        total += dense;
        kept += match (r.method, r.rank, r.ratio) {
            (Method::Dense, ..) => dense,
            (Method::Svd, Some(k), _) => (k * (s.out_features + s.in_features)) as f64,
            (Method::Svd, None, Some(x)) => x * dense,
            other => panic!("{name}: unexpected resolution {other:?} for {}", s.name),
        };
    }
    (kept, total)
}

fn kept(name: &str) -> (f64, f64) {
    kept_quantized(name, None)
}

#[test]
fn decode_aware_plans_keep_what_they_claim() {
    // attention dense, MLP factors of rank 1024, layers 0 and 39's MLPs and layer 1's down
    // projection dense: 3 999 793 152 of 7 969 177 600 parameters (the manifest of the GPU run)
    let (k, t) = kept("granite-8b-decode-50.json");
    assert_eq!(t, 7_969_177_600.0);
    assert_eq!(k, 3_999_793_152.0);
    assert!(k / t >= 0.5 && k / t < 0.502, "{}", k / t);
    // the same plan with every layer, dense or factor, in int8 (groups of 64): the decode benchmark's
    // fastest model at half the parameters
    let int8 = Some(QuantSpec { bits: 8, group: 64, symmetric: true });
    assert_eq!(kept_quantized("granite-8b-decode-50-int8.json", int8), (k, t));
    let (k, _) = kept("granite-8b-decode-1024.json");
    assert_eq!(k, 4_070_047_744.0);
    // attention dense, MLPs at 36.67 %: half of the parameters
    let (k, t) = kept("granite-8b-mlp-half.json");
    assert!((k / t - 0.5).abs() < 2e-4, "{}", k / t);
}
