//! `config.json` of the Llama family of decoder-only transformers.
//!
//! Accepted `model_type`s: `llama`, `granite` (with its four multipliers), `mistral`, `qwen2`
//! (q/k/v biases). `rope_theta` is read at the top level or inside `rope_parameters`
//! (transformers v5 style). Anything else is refused with an error naming the file.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Architecture family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Granite,
    Mistral,
    Qwen2,
}

impl Arch {
    pub const SUPPORTED: &'static [&'static str] = &["llama", "granite", "mistral", "qwen2"];
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "llama" => Arch::Llama,
            "granite" => Arch::Granite,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            _ => return None,
        })
    }
}

/// The model hyper-parameters the runtime needs, normalized across the family.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (qwen2, or `attention_bias: true`).
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Granite: embeddings are multiplied by this (1 elsewhere).
    pub embedding_multiplier: f64,
    /// Granite: attention scores scale (1/sqrt(head_dim) elsewhere).
    pub attention_scale: f64,
    /// Granite: branch outputs are multiplied by this before the residual add (1 elsewhere).
    pub residual_multiplier: f64,
    /// Granite: logits are divided by this (1 elsewhere).
    pub logits_scaling: f64,
    /// Saved dtype named in the config (`torch_dtype` or `dtype`), if any.
    pub dtype: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    vocab_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    embedding_multiplier: Option<f64>,
    attention_multiplier: Option<f64>,
    residual_multiplier: Option<f64>,
    logits_scaling: Option<f64>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::missing(path, "config.json of the model"),
            _ => Error::io(path, e),
        })?;
        Self::from_json(&text).map_err(|msg| Error::bad(path, msg))
    }

    /// Parses the text of a `config.json`; the error is a message without the path.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON for a config.json: {e}"))?;
        let model_type = raw
            .model_type
            .clone()
            .ok_or("no `model_type` field: cannot tell the architecture")?;
        let arch = Arch::parse(&model_type).ok_or_else(|| {
            format!(
                "unknown model_type `{model_type}`: Compactor runs the Llama family ({})",
                Arch::SUPPORTED.join(", ")
            )
        })?;
        fn need<T>(v: Option<T>, name: &str) -> std::result::Result<T, String> {
            v.ok_or_else(|| format!("missing required field `{name}`"))
        }
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_hidden_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        let intermediate_size = need(raw.intermediate_size, "intermediate_size")?;
        if hidden_size == 0 || num_attention_heads == 0 || vocab_size == 0 || intermediate_size == 0
        {
            return Err("hidden_size, num_attention_heads, vocab_size and intermediate_size must be positive".into());
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            ));
        }
        let head_dim = raw.head_dim.unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!("head_dim {head_dim} must be positive and even for rotary embeddings"));
        }
        let rope_params = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw
            .rope_theta
            .or_else(|| rope_params.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
            .unwrap_or(10_000.0);
        if let Some(kind) = rope_params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(|v| v.as_str())
        {
            if kind != "default" {
                return Err(format!(
                    "rope type `{kind}` is not supported yet (only `default` rotary embeddings)"
                ));
            }
        }
        let granite = arch == Arch::Granite;
        let attention_scale = match (granite, raw.attention_multiplier) {
            (true, Some(m)) => m,
            _ => 1.0 / (head_dim as f64).sqrt(),
        };
        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size,
            vocab_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(arch == Arch::Qwen2),
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            embedding_multiplier: if granite { raw.embedding_multiplier.unwrap_or(1.0) } else { 1.0 },
            attention_scale,
            residual_multiplier: if granite { raw.residual_multiplier.unwrap_or(1.0) } else { 1.0 },
            logits_scaling: if granite { raw.logits_scaling.unwrap_or(1.0) } else { 1.0 },
            dtype: raw.torch_dtype.or(raw.dtype),
        })
    }
}
