//! A compression plan: a versioned JSON document that says, for every linear layer of the
//! blocks, how to compress it.
//!
//! ```json
//! {
//!   "version": 1,
//!   "target": { "param_ratio": 0.5 },
//!   "default": { "method": "svd" },
//!   "rules": [
//!     { "match": "model.layers.*.self_attn.k_proj", "keep_dense": true },
//!     { "match": "model.layers.*.mlp.*", "method": "tt", "ratio": 0.4, "quant": { "bits": 8, "group": 64 } }
//!   ],
//!   "allocation": "uniform",
//!   "activation_aware": false,
//!   "calibration": { "text": "calib.txt", "tokens": 8192, "ctx": 256, "damping": 1.0 },
//!   "healing": { "text": "heal.txt", "steps": 50, "lr": 1e-4 }
//! }
//! ```
//! Rules are tried in order; the first whose glob matches a layer's name (without `.weight`)
//! decides it; layers no rule matches take `default`. A layer's kept fraction comes from its rule's
//! `rank`/`ratio`/`tol`, else from the allocation of `target.param_ratio`. Everywhere, a ratio is
//! the fraction of parameters KEPT.

use crate::error::{Error, Result};
use crate::model::LinearSpec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const PLAN_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Svd,
    Tt,
    Tucker,
    Cp,
    /// Keep the weight as it is (possibly quantized).
    Dense,
}

impl Method {
    pub fn parse(s: &str) -> Result<Method> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| Error::Invalid(format!("unknown method `{s}` (expected svd, tt, tucker, cp or dense)")))
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantSpec {
    /// 8 or 4.
    pub bits: u8,
    /// Group size along the input dimension: 32, 64 or 128.
    #[serde(default = "default_group")]
    pub group: usize,
    #[serde(default = "yes")]
    pub symmetric: bool,
}
fn default_group() -> usize {
    64
}
fn yes() -> bool {
    true
}

impl QuantSpec {
    pub fn parse(s: &str) -> Result<QuantSpec> {
        let bits = match s {
            "int8" => 8,
            "int4" => 4,
            other => return Err(Error::Invalid(format!("unknown quantization `{other}` (expected int8 or int4)"))),
        };
        Ok(QuantSpec { bits, group: 64, symmetric: true })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Fraction of the linear-layer parameters kept, over all matched layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param_ratio: Option<f64>,
}

/// What to do with a layer. In a rule, unset fields fall back to `default`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// Explicit rank (svd rank, TT bond χ, Tucker rank cap, CP rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// Fraction of this layer's parameters kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Target relative Frobenius error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tol: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantSpec>,
    /// Number of tensor-network sites for tt/tucker/cp (default: automatic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sites: Option<usize>,
    /// Most sweeps of the iterative fits (Tucker HOOI, CP-ALS); default 25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<usize>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_dense: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Glob on layer names, e.g. `model.layers.*.mlp.*` (a trailing `.weight` is ignored).
    #[serde(rename = "match")]
    pub pattern: String,
    #[serde(flatten)]
    pub spec: LayerSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Allocation {
    /// Every layer keeps the target ratio.
    #[default]
    Uniform,
    /// Layers whose spectrum concentrates more energy in few values give more away.
    Energy,
    /// Layers that hurt perplexity least when compressed alone give more away.
    Sensitivity,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub text: PathBuf,
    #[serde(default = "default_tokens")]
    pub tokens: usize,
    #[serde(default = "default_ctx")]
    pub ctx: usize,
    /// Activation-aware fits whiten by C + damping·mean(λ(C))·I, C the inputs' covariance.
    #[serde(default = "default_damping")]
    pub damping: f64,
}
impl Calibration {
    pub fn new(text: impl Into<PathBuf>, tokens: usize) -> Calibration {
        Calibration { text: text.into(), tokens, ctx: default_ctx(), damping: default_damping() }
    }
}
fn default_damping() -> f64 {
    1.0
}
fn default_tokens() -> usize {
    8192
}
fn default_ctx() -> usize {
    256
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Healing {
    pub text: PathBuf,
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub train_norms: bool,
}
fn default_steps() -> usize {
    50
}
fn default_lr() -> f64 {
    1e-4
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub version: u32,
    #[serde(default)]
    pub target: Target,
    #[serde(default)]
    pub default: LayerSpec,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub allocation: Allocation,
    /// Whitened truncation (SVD-LLM style) from calibration activations, for svd and tt.
    #[serde(default)]
    pub activation_aware: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healing: Option<Healing>,
}

/// The decision for one layer after rules and defaults are applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub name: String,
    pub method: Method,
    pub rank: Option<usize>,
    pub ratio: Option<f64>,
    pub tol: Option<f64>,
    pub quant: Option<QuantSpec>,
    pub sites: Option<usize>,
    pub iterations: Option<usize>,
    /// Index of the rule that matched, if any.
    pub rule: Option<usize>,
    /// The ratio comes from `target.param_ratio` (so the allocation may move it).
    pub from_target: bool,
}

impl Plan {
    /// A one-rule plan: every linear layer of the blocks with `method` at `ratio`.
    pub fn simple(method: Method, ratio: Option<f64>, quant: Option<QuantSpec>) -> Plan {
        Plan {
            version: PLAN_VERSION,
            target: Target { param_ratio: ratio },
            default: LayerSpec { method: Some(method), quant, ..Default::default() },
            rules: vec![],
            allocation: Allocation::Uniform,
            activation_aware: false,
            calibration: None,
            healing: None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::missing(path, "plan file"),
            _ => Error::io(path, e),
        })?;
        let plan: Plan = serde_json::from_str(&text).map_err(|e| Error::bad(path, format!("invalid plan: {e}")))?;
        plan.validate().map_err(|e| match e {
            Error::Invalid(m) => Error::bad(path, m),
            other => other,
        })?;
        Ok(plan)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plan serializes")
    }

    /// Checks the plan on its own (not against a model). Messages name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.version != PLAN_VERSION {
            return bad(format!("version: {} is not supported (this Compactor reads version {PLAN_VERSION})", self.version));
        }
        if let Some(r) = self.target.param_ratio {
            if !(r > 0.0 && r <= 1.0) {
                return bad(format!("target.param_ratio: {r} must be in (0, 1] (the fraction of parameters kept)"));
            }
        }
        check_spec(&self.default, "default")?;
        for (i, rule) in self.rules.iter().enumerate() {
            glob::Pattern::new(&rule.pattern).map_err(|e| Error::Invalid(format!("rules[{i}].match: bad glob `{}`: {e}", rule.pattern)))?;
            check_spec(&rule.spec, &format!("rules[{i}]"))?;
        }
        if self.activation_aware && self.calibration.is_none() {
            return bad("calibration: activation_aware needs calibration text (calibration.text)".into());
        }
        if self.allocation == Allocation::Sensitivity && self.calibration.is_none() {
            return bad("calibration: sensitivity allocation needs calibration text (calibration.text)".into());
        }
        if let Some(c) = &self.calibration {
            if c.tokens < c.ctx || c.ctx < 2 {
                return bad(format!("calibration.tokens ({}) must be at least calibration.ctx ({}) and ctx at least 2", c.tokens, c.ctx));
            }
            if !(c.damping >= 0.0 && c.damping.is_finite()) {
                return bad(format!("calibration.damping ({}) must be a finite number ≥ 0", c.damping));
            }
        }
        if let Some(h) = &self.healing {
            if h.steps == 0 || !(h.lr > 0.0) {
                return bad("healing: steps must be ≥ 1 and lr > 0".into());
            }
        }
        Ok(())
    }

    /// Resolves every layer, checking the plan against the model: every rule must match at least
    /// one layer, and explicit ranks must fit the layer's shape.
    pub fn resolve(&self, layers: &[LinearSpec]) -> Result<Vec<Resolved>> {
        self.validate()?;
        let pats: Vec<glob::Pattern> = self.rules.iter().map(|r| glob::Pattern::new(r.pattern.trim_end_matches(".weight")).unwrap()).collect();
        let mut used = vec![false; self.rules.len()];
        let mut out = Vec::with_capacity(layers.len());
        for l in layers {
            let hit = pats.iter().position(|p| p.matches(&l.name));
            let spec = match hit {
                Some(i) => {
                    used[i] = true;
                    merge(&self.rules[i].spec, &self.default)
                }
                None => self.default.clone(),
            };
            let method = if spec.keep_dense { Method::Dense } else { spec.method.unwrap_or(Method::Svd) };
            let r = Resolved {
                name: l.name.clone(),
                method,
                rank: spec.rank,
                ratio: spec.ratio.or(if spec.rank.is_none() && spec.tol.is_none() { self.target.param_ratio } else { None }),
                tol: spec.tol,
                quant: spec.quant,
                sites: spec.sites,
                iterations: spec.iterations,
                rule: hit,
                from_target: spec.rank.is_none() && spec.ratio.is_none() && spec.tol.is_none() && self.target.param_ratio.is_some(),
            };
            if let (Some(rank), Method::Svd) = (r.rank, r.method) {
                let max = l.out_features.min(l.in_features);
                if rank == 0 || rank > max {
                    let field = hit.map(|i| format!("rules[{i}].rank")).unwrap_or("default.rank".into());
                    return Err(Error::Invalid(format!("{field}: rank {rank} is outside 1..={max} for `{}` ({}×{})", l.name, l.out_features, l.in_features)));
                }
            }
            if r.method != Method::Dense && r.rank.is_none() && r.ratio.is_none() && r.tol.is_none() {
                return Err(Error::Invalid(format!("`{}`: no rank, ratio or tol, and no target.param_ratio to allocate from", l.name)));
            }
            out.push(r);
        }
        if let Some(i) = used.iter().position(|u| !u) {
            return Err(Error::Invalid(format!("rules[{i}].match: `{}` matches no linear layer of this model", self.rules[i].pattern)));
        }
        Ok(out)
    }
}

fn merge(rule: &LayerSpec, default: &LayerSpec) -> LayerSpec {
    let explicit = rule.rank.is_some() || rule.ratio.is_some() || rule.tol.is_some();
    LayerSpec {
        method: rule.method.or(default.method),
        rank: if explicit { rule.rank } else { default.rank },
        ratio: if explicit { rule.ratio } else { default.ratio },
        tol: if explicit { rule.tol } else { default.tol },
        quant: rule.quant.or(default.quant),
        sites: rule.sites.or(default.sites),
        iterations: rule.iterations.or(default.iterations),
        keep_dense: rule.keep_dense,
    }
}

fn check_spec(s: &LayerSpec, at: &str) -> Result<()> {
    let bad = |m: String| Err(Error::Invalid(m));
    if let Some(r) = s.ratio {
        if !(r > 0.0 && r <= 1.0) {
            return bad(format!("{at}.ratio: {r} must be in (0, 1] (the fraction of parameters kept)"));
        }
    }
    if let Some(t) = s.tol {
        if !(t > 0.0 && t < 1.0) {
            return bad(format!("{at}.tol: {t} must be in (0, 1)"));
        }
    }
    if s.rank == Some(0) {
        return bad(format!("{at}.rank: must be at least 1"));
    }
    if [s.rank.is_some(), s.ratio.is_some(), s.tol.is_some()].iter().filter(|x| **x).count() > 1 {
        return bad(format!("{at}: give only one of rank, ratio, tol"));
    }
    if let Some(q) = s.quant {
        if q.bits != 8 && q.bits != 4 {
            return bad(format!("{at}.quant.bits: {} (expected 8 or 4)", q.bits));
        }
        if ![32, 64, 128].contains(&q.group) {
            return bad(format!("{at}.quant.group: {} (expected 32, 64 or 128)", q.group));
        }
    }
    if s.sites == Some(0) {
        return bad(format!("{at}.sites: must be at least 1"));
    }
    if s.iterations == Some(0) {
        return bad(format!("{at}.iterations: must be at least 1"));
    }
    Ok(())
}
