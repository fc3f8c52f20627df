//! Synthetic checkpoints with real shapes and realistic spectra, for benchmarks and tests at a
//! scale no fixture has (e.g. Granite-3.3-8B shapes), written as sharded safetensors.
//!
//! Each linear weight is W = G₁ diag(s) G₂ / √k + ε·N with Gaussian G₁ (m × k), G₂ (k × n),
//! a power-law decaying s_i = (1 + i)^(-decay), and a small Gaussian noise floor: a few strong
//! directions, a heavy tail, then a bulk, as in trained LLM weights.

use crate::checkpoint::OwnedTensor;
use crate::compressed::ShardWriter;
use crate::error::{Error, Result};
use crate::model::linear_layers;
use crate::config::ModelConfig;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SynthConfig {
    pub model_type: String,
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    /// Rank of the decaying "signal" part of every weight.
    pub signal_rank: usize,
    pub decay: f64,
    pub noise: f64,
    pub dtype: String,
    pub shard_bytes: usize,
    pub seed: u64,
}

impl SynthConfig {
    /// IBM Granite 3.3 8B shapes.
    pub fn granite_8b() -> Self {
        SynthConfig { model_type: "granite".into(), layers: 40, hidden: 4096, intermediate: 12800, heads: 32, kv_heads: 8, vocab: 49159, signal_rank: 256, decay: 0.6, noise: 0.15, dtype: "bf16".into(), shard_bytes: 4 << 30, seed: 7 }
    }
    /// A small Llama (~200 MB in bf16) for memory tests.
    pub fn llama_200mb() -> Self {
        SynthConfig { model_type: "llama".into(), layers: 8, hidden: 1024, intermediate: 2816, heads: 16, kv_heads: 4, vocab: 8192, signal_rank: 64, decay: 0.6, noise: 0.15, dtype: "bf16".into(), shard_bytes: 64 << 20, seed: 7 }
    }

    pub fn config_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [if self.model_type == "granite" { "GraniteForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": self.model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": true,
            "torch_dtype": if self.dtype == "bf16" { "bfloat16" } else { "float32" },
        });
        if self.model_type == "granite" {
            let o = v.as_object_mut().unwrap();
            o.insert("embedding_multiplier".into(), 12.0.into());
            o.insert("attention_multiplier".into(), (1.0 / (self.hidden / self.heads) as f64).into());
            o.insert("residual_multiplier".into(), 0.22.into());
            o.insert("logits_scaling".into(), 16.0.into());
        }
        v
    }
}

/// Writes the synthetic checkpoint to `dir` (config.json, shards, index; `tokenizer` copied if given).
pub fn write_synthetic(dir: &Path, sc: &SynthConfig, tokenizer: Option<&Path>, device: &Device, progress: &dyn crate::progress::Progress) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg_text = serde_json::to_string_pretty(&sc.config_json()).unwrap();
    let cfg = ModelConfig::from_json(&cfg_text).map_err(|m| Error::Invalid(m))?;
    let dtype = if sc.dtype == "bf16" { DType::BF16 } else { DType::F32 };
    let mut w = ShardWriter::new(dir, sc.shard_bytes);
    let mut rng_seed = sc.seed;
    let mut gauss = |shape: (usize, usize)| -> Result<Tensor> {
        rng_seed = rng_seed.wrapping_add(1);
        // the CPU backend cannot be seeded: there the weights are random but not reproducible
        let _ = device.set_seed(rng_seed);
        Ok(Tensor::randn(0f32, 1f32, shape, device)?)
    };
    w.add(OwnedTensor::from_tensor("model.embed_tokens.weight", &(gauss((sc.vocab, sc.hidden))? * 0.02)?, dtype)?)?;
    let ones = Tensor::ones(sc.hidden, DType::F32, &Device::Cpu)?;
    let specs = linear_layers(&cfg);
    progress.start("synthesize", specs.len() as u64);
    for l in 0..sc.layers {
        w.add(OwnedTensor::from_tensor(format!("model.layers.{l}.input_layernorm.weight"), &ones, dtype)?)?;
        w.add(OwnedTensor::from_tensor(format!("model.layers.{l}.post_attention_layernorm.weight"), &ones, dtype)?)?;
    }
    for s in &specs {
        crate::progress::check(progress)?;
        let (m, n) = (s.out_features, s.in_features);
        let k = sc.signal_rank.min(m).min(n);
        let sv: Vec<f32> = (0..k).map(|i| (1.0 + i as f64).powf(-sc.decay) as f32).collect();
        let sv = Tensor::from_vec(sv, (1, k), device)?;
        let g1 = gauss((m, k))?.broadcast_mul(&sv)?;
        let g2 = gauss((k, n))?;
        let scale = 1.0 / ((k as f64).sqrt() * (n as f64).sqrt());
        let wt = ((g1.matmul(&g2)? * (scale * 4.0))? + (gauss((m, n))? * (sc.noise / (n as f64).sqrt()))?)?;
        w.add(OwnedTensor::from_tensor(format!("{}.weight", s.name), &wt, dtype)?)?;
        progress.inc(1, &s.name);
    }
    progress.finish();
    w.add(OwnedTensor::from_tensor("model.norm.weight", &ones, dtype)?)?;
    w.finish()?;
    crate::checkpoint::write_atomic(&dir.join("config.json"), cfg_text.as_bytes())?;
    if let Some(t) = tokenizer {
        std::fs::copy(t, dir.join("tokenizer.json")).map_err(|e| Error::io(t, e))?;
    }
    Ok(())
}
