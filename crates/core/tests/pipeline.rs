//! Plans, compression, saving, reloading, healing on the real granite-tiny fixture.

mod common;
use candle_core::{DType, Device};
use common::*;
use compactor_core::compressed::{CompressedModel, Manifest};
use compactor_core::model::{linear_layers, Role};
use compactor_core::pipeline::{compress, fit_layer, CompressOptions};
use compactor_core::plan::{Calibration, Method, Plan};
use compactor_core::progress::NoProgress;
use compactor_core::{eval, Checkpoint, Model};

fn heldout_windows(n: usize) -> Vec<Vec<u32>> {
    let ck = Checkpoint::open(fixture("granite-tiny")).unwrap();
    let path = corpus("gutenberg-heldout.txt");
    let ids = ck.tokenizer().unwrap().encode(&eval::read_text(&path).unwrap()).unwrap();
    eval::windows(&ids, 256, n, &path).unwrap()
}

fn ppl(model: &Model, wins: &[Vec<u32>]) -> f64 {
    eval::perplexity(model, wins, 8, &NoProgress).unwrap().perplexity
}

fn ppl_of_dir(dir: &std::path::Path, wins: &[Vec<u32>]) -> f64 {
    let cm = CompressedModel::open(dir).unwrap();
    ppl(&Model::load(&cm, DType::F32, &Device::Cpu).unwrap(), wins)
}

fn calib_plan(method: Method, ratio: f64) -> Plan {
    let mut p = Plan::simple(method, Some(ratio), None);
    p.activation_aware = true;
    p.calibration = Some(Calibration::new(shared().join("corpora/gutenberg/austen-sense.txt"), 8192));
    p
}

#[test]
fn reload_round_trip_gives_the_same_perplexity() {
    let ck = Checkpoint::open(fixture("granite-tiny")).unwrap();
    let plan = Plan::simple(Method::Svd, Some(0.5), None);
    let specs = linear_layers(&ck.config);
    let resolved = plan.resolve(&specs).unwrap();
    // in memory, before saving
    let mut model = Model::load(&ck, DType::F32, &Device::Cpu).unwrap();
    for (s, r) in specs.iter().zip(&resolved) {
        let f = fit_layer(&ck, s, r, None, None, DType::F32).unwrap().factorization.unwrap();
        let slot = Role::ALL.iter().position(|x| *x == s.role).unwrap();
        model.blocks[s.layer].linears[slot] = compactor_core::linear::from_factorization(&f, None, DType::F32, &Device::Cpu).unwrap();
    }
    let wins = heldout_windows(12);
    let before = ppl(&model, &wins);
    // saved with f32 factors, loaded back
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("svd");
    let m = compress(&fixture("granite-tiny"), &plan, &dir, &CompressOptions { factor_dtype: Some(DType::F32), ..Default::default() }, &NoProgress).unwrap();
    let after = ppl_of_dir(&dir, &wins);
    assert!(((after - before) / before).abs() < 1e-6, "before {before} after {after}");
    // half of the linear parameters went away
    assert!((m.totals.linear_param_ratio - 0.5).abs() < 0.02, "{}", m.totals.linear_param_ratio);
    assert_eq!(m.layers.len(), 42);
    // the manifest parses back
    let _: Manifest = serde_json::from_str(&std::fs::read_to_string(dir.join("compactor.json")).unwrap()).unwrap();
}

#[test]
fn every_method_compresses_and_runs_on_its_factors() {
    let wins = heldout_windows(4);
    let out = tempfile::tempdir().unwrap();
    let dense = ppl(&Model::load(&Checkpoint::open(fixture("granite-tiny")).unwrap(), DType::F32, &Device::Cpu).unwrap(), &wins);
    for (method, ratio) in [(Method::Tt, 0.5), (Method::Tucker, 0.5), (Method::Cp, 0.1)] {
        let dir = out.path().join(method.name());
        let mut plan = Plan::simple(method, Some(ratio), None);
        plan.default.sites = Some(2);
        let m = compress(&fixture("granite-tiny"), &plan, &dir, &CompressOptions::default(), &NoProgress).unwrap();
        assert!(m.totals.linear_param_ratio <= ratio + 1e-9, "{method:?} kept {}", m.totals.linear_param_ratio);
        assert!(m.totals.bytes < m.source.bytes, "{method:?}");
        let p = ppl_of_dir(&dir, &wins);
        assert!(p.is_finite() && p > dense, "{method:?}: {p} vs dense {dense}");
        // the factor forward equals the dense reconstruction's forward
        let cm = CompressedModel::open(&dir).unwrap();
        let name = "model.layers.2.mlp.down_proj";
        let lin = compactor_core::model::WeightSource::linear(&cm, name, DType::F32, &Device::Cpu).unwrap();
        // the reference: the factorization's own reconstruction in compactor-decomp
        let rec = cm.factorization(name).unwrap().unwrap().reconstruct();
        let w = candle_core::Tensor::from_vec(compactor_decomp::to_row_major(&rec), (rec.nrows(), rec.ncols()), &Device::Cpu).unwrap();
        // few rows (decode) and many (prefill, evaluation) take different paths for CP
        for rows in [5, 64] {
            let x = candle_core::Tensor::randn(0f32, 1., (rows, 768), &Device::Cpu).unwrap();
            let y = lin.forward(&x).unwrap();
            let y2 = x.matmul(&w.t().unwrap()).unwrap();
            assert!(rel_l2(&y, &y2) < 1e-5, "{method:?}, {rows} rows: {}", rel_l2(&y, &y2));
        }
    }
}

#[test]
fn activation_aware_beats_plain_svd_and_tt() {
    let wins = heldout_windows(16);
    let out = tempfile::tempdir().unwrap();
    let mut res = vec![];
    // tt on 2 sites, as the demo: on this model's 256 × 768 matrices 4 sites at half the
    // parameters leave bonds so thin that plain tt's perplexity is in the millions
    let two_sites = |mut p: Plan| {
        p.default.sites = Some(2);
        p
    };
    for (name, plan) in [
        ("svd", Plan::simple(Method::Svd, Some(0.5), None)),
        ("aa-svd", calib_plan(Method::Svd, 0.5)),
        ("tt", two_sites(Plan::simple(Method::Tt, Some(0.5), None))),
        ("aa-tt", two_sites(calib_plan(Method::Tt, 0.5))),
    ] {
        let dir = out.path().join(name);
        compress(&fixture("granite-tiny"), &plan, &dir, &CompressOptions::default(), &NoProgress).unwrap();
        res.push(ppl_of_dir(&dir, &wins));
        eprintln!("{name}: ppl {:.3}", res.last().unwrap());
    }
    assert!(res[1] < res[0], "aa-svd {} vs svd {}", res[1], res[0]);
    assert!(res[3] < res[2], "aa-tt {} vs tt {}", res[3], res[2]);
}

#[test]
fn healing_lowers_perplexity() {
    let wins = heldout_windows(16);
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("svd");
    compress(&fixture("granite-tiny"), &Plan::simple(Method::Svd, Some(0.5), None), &dir, &CompressOptions::default(), &NoProgress).unwrap();
    let before = ppl_of_dir(&dir, &wins);
    let healed = out.path().join("healed");
    let opts = compactor_core::heal::HealOptions { steps: 30, lr: 3e-4, ctx: 128, batch: 4, dense_reference_steps: 1, ..Default::default() };
    let (m, rep) = compactor_core::heal::heal(&dir, &shared().join("corpora/gutenberg/austen-sense.txt"), &healed, &opts, &NoProgress).unwrap();
    let after = ppl_of_dir(&healed, &wins);
    assert!(after < before, "healed {after} vs {before}");
    assert_eq!(rep.losses.len(), 30);
    assert!(m.heal.is_some());
    assert!(rep.dense_step_seconds.is_some());
}

#[test]
fn export_dense_writes_a_plain_checkpoint_with_the_same_logits() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("tt");
    compress(&fixture("granite-tiny"), &Plan::simple(Method::Tt, Some(0.5), None), &dir, &CompressOptions { factor_dtype: Some(DType::F32), ..Default::default() }, &NoProgress).unwrap();
    let hf = out.path().join("hf");
    compactor_core::pipeline::export_dense(&dir, &hf, &NoProgress).unwrap();
    assert!(!hf.join("compactor.json").exists());
    let x = candle_core::Tensor::new(&[5u32, 17, 99, 1000, 3], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let a = Model::load(&CompressedModel::open(&dir).unwrap(), DType::F32, &Device::Cpu).unwrap().forward(&x, None).unwrap();
    let b = Model::load(&Checkpoint::open(&hf).unwrap(), DType::F32, &Device::Cpu).unwrap().forward(&x, None).unwrap();
    assert!(rel_l2(&b, &a) < 1e-4, "{}", rel_l2(&b, &a));
}

#[test]
fn bad_plans_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plan.json");
    let specs = linear_layers(&Checkpoint::open(fixture("granite-tiny")).unwrap().config);
    let cases: &[(&str, &str)] = &[
        (r#"{"version": 1, "default": {"method": "wavelet"}}"#, "wavelet"),
        (r#"{"version": 1, "target": {"param_ratio": 1.5}, "default": {"method": "svd"}}"#, "target.param_ratio"),
        (r#"{"version": 1, "default": {"method": "svd", "ratio": 0.5}, "rules": [{"match": "model.layers.*.attn.*", "method": "tt"}]}"#, "matches no linear layer"),
        (r#"{"version": 1, "default": {"method": "svd", "rank": 100000}}"#, "rank 100000"),
        (r#"{"version": 1, "default": {"method": "svd", "ratio": 0.5}, "activation_aware": true}"#, "calibration"),
        (r#"{"version": 2}"#, "version"),
        (r#"{"version": 1, "default": {"method": "svd", "ratio": 0.5, "quant": {"bits": 3}}}"#, "quant.bits"),
        (r#"not json"#, "invalid plan"),
    ];
    for (text, want) in cases {
        std::fs::write(&p, text).unwrap();
        let e = Plan::from_file(&p).and_then(|plan| plan.resolve(&specs).map(|_| ())).unwrap_err().to_string();
        assert!(e.contains(want), "plan {text}: error `{e}` should mention `{want}`");
    }
    // calibration text that does not exist: named when the pipeline runs
    let mut plan = calib_plan(Method::Svd, 0.5);
    plan.calibration.as_mut().unwrap().text = dir.path().join("nope.txt");
    let e = compress(&fixture("granite-tiny"), &plan, &dir.path().join("o"), &CompressOptions::default(), &NoProgress).unwrap_err().to_string();
    assert!(e.contains("nope.txt"), "{e}");
    assert!(!dir.path().join("o").exists());
    // writing into the source checkpoint is refused
    let src = copy_fixture("granite-tiny");
    let e = compress(src.path(), &Plan::simple(Method::Svd, Some(0.5), None), &src.path().join("out"), &CompressOptions::default(), &NoProgress).unwrap_err().to_string();
    assert!(e.contains("source"), "{e}");
}

#[test]
fn energy_and_sensitivity_allocations_meet_the_budget() {
    let out = tempfile::tempdir().unwrap();
    for alloc in [compactor_core::plan::Allocation::Energy, compactor_core::plan::Allocation::Sensitivity] {
        let mut plan = Plan::simple(Method::Svd, Some(0.5), None);
        plan.allocation = alloc;
        plan.calibration = Some(Calibration::new(shared().join("corpora/gutenberg/austen-sense.txt"), 1024));
        let m = compress(&fixture("granite-tiny"), &plan, &out.path().join(format!("{alloc:?}")), &CompressOptions::default(), &NoProgress).unwrap();
        assert!(m.totals.linear_param_ratio <= 0.505, "{alloc:?}: {}", m.totals.linear_param_ratio);
        assert!(m.totals.linear_param_ratio >= 0.4, "{alloc:?}: {}", m.totals.linear_param_ratio);
        let ranks: std::collections::BTreeSet<usize> = m.layers.iter().filter(|l| l.role == Role::Up).map(|l| l.ranks[0]).collect();
        assert!(ranks.len() > 1, "{alloc:?}: the allocation should differ across layers");
    }
}

#[test]
fn a_failing_fit_names_its_layer_and_leaves_no_output() {
    // a 1024-wide model: cp at half the parameters asks for rank 10 699 on q_proj, whose ALS
    // would need 9.4 GiB of r × r matrices: refused before anything is allocated
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("wide");
    let sc = compactor_core::synth::SynthConfig {
        layers: 1,
        intermediate: 1024,
        vocab: 256,
        dtype: "f32".into(),
        ..compactor_core::synth::SynthConfig::llama_200mb()
    };
    compactor_core::synth::write_synthetic(&model, &sc, None, &Device::Cpu, &NoProgress).unwrap();
    let mut plan = Plan::simple(Method::Cp, Some(0.5), None);
    plan.default.sites = Some(4);
    let out = dir.path().join("out");
    let e = compress(&model, &plan, &out, &CompressOptions::default(), &NoProgress).unwrap_err().to_string();
    assert!(e.starts_with("model.layers.0.self_attn.q_proj: cp at rank 10699 on a 1024 x 1024 matrix"), "{e}");
    assert!(e.contains("choose rank 9879 or less"), "{e}");
    assert!(!out.exists());
    // the plan preview (the app's plan editor) refuses it the same way, before any fit
    let e = compactor_core::pipeline::preview(&model, &plan, false, &NoProgress).unwrap_err().to_string();
    assert!(e.starts_with("model.layers.0.self_attn.q_proj: cp at rank 10699"), "{e}");
    // at a rank within the limit the preview goes through
    plan.default.ratio = Some(0.4);
    let rows = compactor_core::pipeline::preview(&model, &plan, false, &NoProgress).unwrap();
    assert!(rows.iter().all(|r| r.method == "cp" && r.rank <= 9879), "{:?}", rows.iter().map(|r| r.rank).collect::<Vec<_>>());
}

#[test]
fn the_plan_preview_gives_the_ranks_and_sizes_the_fit_takes() {
    // one layer per method at half its parameters, the rest dense
    let plan: Plan = serde_json::from_str(
        r#"{"version": 1, "default": {"method": "dense"}, "rules": [
            {"match": "model.layers.0.*", "method": "tucker", "ratio": 0.5},
            {"match": "model.layers.1.*", "method": "tt", "ratio": 0.5},
            {"match": "model.layers.2.*", "method": "svd", "ratio": 0.5}]}"#,
    )
    .unwrap();
    let rows = compactor_core::pipeline::preview(&fixture("granite-tiny"), &plan, false, &NoProgress).unwrap();
    let out = tempfile::tempdir().unwrap();
    let m = compress(&fixture("granite-tiny"), &plan, &out.path().join("m"), &CompressOptions::default(), &NoProgress).unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for l in &m.layers {
        let r = rows.iter().find(|r| r.name == l.name).unwrap_or_else(|| panic!("{} not in the preview", l.name));
        assert_eq!((r.method.as_str(), r.params), (l.method.as_str(), l.params), "{}", l.name);
        if l.method != "dense" {
            assert_eq!(r.ranks, l.ranks, "{}: the preview's ranks are the fit's", l.name);
            assert_eq!(r.rank, *l.ranks.iter().max().unwrap(), "{}", l.name);
        }
        *seen.entry(l.method.clone()).or_insert(0usize) += 1;
        // Tucker on 4 sites has a rank per interleaved mode; tt a bond between each pair of sites
        let want = match l.method.as_str() {
            "tucker" => 8,
            "tt" => 3,
            "svd" => 1,
            _ => 0,
        };
        assert_eq!(r.ranks.len(), want, "{}: {:?}", l.name, r.ranks);
    }
    // the manifest lists the fitted layers; the preview also the dense ones, without ranks
    assert_eq!(seen, [("svd".to_string(), 7), ("tt".to_string(), 7), ("tucker".to_string(), 7)].into_iter().collect());
    let dense: Vec<_> = rows.iter().filter(|r| r.method == "dense").collect();
    assert_eq!(dense.len(), rows.len() - 21);
    assert!(dense.iter().all(|r| r.ranks.is_empty() && r.params == r.dense_params));
}
