//! Whole runs: evaluate a model directory (plain or compressed) into a [`VariantResult`], and
//! the demo run that compresses the bundled model with every method and writes `run.json`.

use crate::compressed::AnyModel;
use crate::error::{Error, Result};
use crate::eval;
use crate::heal::{heal, HealOptions};
use crate::model::Model;
use crate::pipeline::{compress, CompressOptions};
use crate::plan::{Allocation, Calibration, Method, Plan, QuantSpec};
use crate::progress::Progress;
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One evaluated model: the original or a compressed variant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantResult {
    pub name: String,
    pub dir: String,
    pub method: String,
    pub perplexity: f64,
    pub tokens_scored: usize,
    pub params: usize,
    /// Parameters of the linear layers of the blocks.
    pub linear_params: usize,
    pub bytes: u64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub eval_seconds: f64,
    /// Mean relative Frobenius error over compressed layers.
    #[serde(default)]
    pub mean_rel_error: Option<f64>,
    #[serde(default)]
    pub heal_losses: Option<Vec<f64>>,
    #[serde(default)]
    pub heal_step_seconds: Option<f64>,
    #[serde(default)]
    pub dense_step_seconds: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub ctx: usize,
    pub max_windows: usize,
    pub batch: usize,
    pub decode_tokens: usize,
    pub device: Device,
    pub dtype: DType,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { ctx: 256, max_windows: 200, batch: 4, decode_tokens: 64, device: Device::Cpu, dtype: DType::F32 }
    }
}

/// Evaluates any model directory on `text`.
pub fn evaluate(name: &str, dir: &Path, text: &Path, opts: &EvalOptions, progress: &dyn Progress) -> Result<VariantResult> {
    let any = AnyModel::open(dir)?;
    let ck = any.checkpoint();
    let model = Model::load(any.source(), opts.dtype, &opts.device)?;
    let ids = ck.tokenizer()?.encode(&eval::read_text(text)?)?;
    let wins = eval::windows(&ids, opts.ctx, opts.max_windows, text)?;
    let p = eval::perplexity(&model, &wins, opts.batch, progress)?;
    let speed = eval::speed(&model, &wins[0], opts.decode_tokens)?;
    let manifest = any.manifest();
    let linear_params: usize = model.blocks.iter().flat_map(|b| b.linears.iter()).map(|l| l.params()).sum();
    Ok(VariantResult {
        name: name.to_string(),
        dir: dir.display().to_string(),
        method: manifest.map(|m| variant_method(&m.plan)).unwrap_or_else(|| "dense".into()),
        perplexity: p.perplexity,
        tokens_scored: p.tokens_scored,
        params: model.params(),
        linear_params,
        bytes: ck.file_bytes(),
        prefill_tokens_per_s: speed.prefill_tokens_per_s,
        decode_tokens_per_s: speed.decode_tokens_per_s,
        eval_seconds: p.seconds,
        mean_rel_error: manifest.filter(|m| !m.layers.is_empty()).map(|m| m.layers.iter().map(|l| l.rel_error).sum::<f64>() / m.layers.len() as f64),
        heal_losses: manifest.and_then(|m| m.heal.as_ref()).map(|h| h.losses.clone()),
        heal_step_seconds: manifest.and_then(|m| m.heal.as_ref()).map(|h| h.step_seconds),
        dense_step_seconds: manifest.and_then(|m| m.notes.get("dense_step_seconds")).and_then(|v| v.as_f64()),
    })
}

fn variant_method(p: &Plan) -> String {
    let m = p.default.method.unwrap_or(Method::Svd).name().to_string();
    let q = p.default.quant.map(|q| format!("+int{}", q.bits)).unwrap_or_default();
    let aa = if p.activation_aware { "aa-" } else { "" };
    format!("{aa}{m}{q}")
}

/// What a run produced: the original, every variant, where they are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub model: String,
    pub text: String,
    pub ctx: usize,
    pub max_windows: usize,
    /// Fraction of linear-layer parameters kept by the variants.
    pub param_ratio: f64,
    pub original: VariantResult,
    pub variants: Vec<VariantResult>,
    pub environment: Environment,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Environment {
    pub compactor_version: String,
    pub os: String,
    pub arch: String,
    pub cpus: usize,
    pub device: String,
}

impl Environment {
    pub fn here(device: &Device) -> Self {
        Environment {
            compactor_version: env!("CARGO_PKG_VERSION").into(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            device: format!("{device:?}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub model: PathBuf,
    pub eval_text: PathBuf,
    pub calib_text: PathBuf,
    pub out: PathBuf,
    pub ratio: f64,
    pub heal_steps: usize,
    pub eval: EvalOptions,
}

/// The main job: compress `model` with svd, tt, tucker, cp (plain and activation-aware for svd
/// and tt) at the same parameter budget and one int8 variant, heal the activation-aware svd one,
/// evaluate everything, write `run.json` under `out`.
pub fn demo(o: &DemoOptions, progress: &dyn Progress) -> Result<RunSummary> {
    std::fs::create_dir_all(&o.out).map_err(|e| Error::io(&o.out, e))?;
    let calib = Calibration::new(o.calib_text.clone(), 16384);
    let mut plans: Vec<(&str, Plan)> = Vec::new();
    // tensor networks on 2 sites: at this model's sizes (256, 768) 4 sites leave bonds too thin
    let sites = |m: Method| if m == Method::Svd { None } else { Some(2) };
    for (name, m) in [("svd", Method::Svd), ("tt", Method::Tt), ("tucker", Method::Tucker), ("cp", Method::Cp)] {
        let mut p = Plan::simple(m, Some(o.ratio), None);
        p.default.sites = sites(m);
        if m == Method::Cp {
            // CP at half the parameters means rank ~1100 on these 256 × 768 matrices: each ALS
            // sweep costs ~0.4 s per layer on 2 cores, so the demo caps the sweeps
            p.default.iterations = Some(8);
        }
        plans.push((name, p));
    }
    for (name, m) in [("aa-svd", Method::Svd), ("aa-tt", Method::Tt)] {
        let mut p = Plan::simple(m, Some(o.ratio), None);
        p.default.sites = sites(m);
        p.activation_aware = true;
        p.calibration = Some(calib.clone());
        plans.push((name, p));
    }
    let mut p = Plan::simple(Method::Dense, None, Some(QuantSpec { bits: 8, group: 64, symmetric: true }));
    p.allocation = Allocation::Uniform;
    plans.push(("int8", p));

    let original = evaluate("original", &o.model, &o.eval_text, &o.eval, progress)?;
    let mut variants = Vec::new();
    for (name, plan) in &plans {
        let dir = o.out.join(name);
        compress(&o.model, plan, &dir, &CompressOptions { device: o.eval.device.clone(), ..Default::default() }, progress)?;
        variants.push(evaluate(name, &dir, &o.eval_text, &o.eval, progress)?);
    }
    if o.heal_steps > 0 {
        let src = o.out.join("aa-svd");
        let dst = o.out.join("aa-svd-healed");
        let ho = HealOptions { steps: o.heal_steps, lr: 2e-4, device: o.eval.device.clone(), ..Default::default() };
        heal(&src, &o.calib_text, &dst, &ho, progress)?;
        variants.push(evaluate("aa-svd-healed", &dst, &o.eval_text, &o.eval, progress)?);
    }
    let summary = RunSummary {
        model: o.model.display().to_string(),
        text: o.eval_text.display().to_string(),
        ctx: o.eval.ctx,
        max_windows: o.eval.max_windows,
        param_ratio: o.ratio,
        original,
        variants,
        environment: Environment::here(&o.eval.device),
    };
    crate::checkpoint::write_atomic(&o.out.join("run.json"), serde_json::to_string_pretty(&summary).unwrap().as_bytes())?;
    Ok(summary)
}
