//! The Llama-family decoder (Llama, Granite, Mistral, Qwen2) on candle.
//!
//! ```text
//! ids (B,S) ─► embed × embedding_multiplier
//!   └► for each block:  h = x + res_mult · o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))
//!                       x = h + res_mult · down(silu(gate(n2(h))) ⊙ up(n2(h)))
//!   └► norm ─► lm_head / logits_scaling ─► logits (B,S,V), f32
//! ```
//! Grouped-query attention with a causal mask and a KV cache; rotary embeddings in the
//! rotate-half form of transformers. Every projection is a [`Linear`], so a compressed layer
//! slots in through a [`WeightSource`] without this file changing.

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::linear::Linear;
use candle_core::{DType, Device, Tensor, D};
use std::path::PathBuf;

/// The role of a linear layer inside a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Role {
    pub const ALL: [Role; 7] = [Role::Q, Role::K, Role::V, Role::O, Role::Gate, Role::Up, Role::Down];
    /// The module path inside a block, e.g. `self_attn.q_proj`.
    pub fn module(self) -> &'static str {
        match self {
            Role::Q => "self_attn.q_proj",
            Role::K => "self_attn.k_proj",
            Role::V => "self_attn.v_proj",
            Role::O => "self_attn.o_proj",
            Role::Gate => "mlp.gate_proj",
            Role::Up => "mlp.up_proj",
            Role::Down => "mlp.down_proj",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Role::Q => "q",
            Role::K => "k",
            Role::V => "v",
            Role::O => "o",
            Role::Gate => "gate",
            Role::Up => "up",
            Role::Down => "down",
        }
    }
    /// The role of a weight name such as `model.layers.3.mlp.up_proj.weight`.
    pub fn of(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| name.contains(&format!(".{}.", r.module())) || name.ends_with(&format!(".{}", r.module())))
    }
}

/// One linear layer of the blocks: its weight name (without `.weight`), role, layer index and
/// (out, in) shape as the config implies.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinearSpec {
    pub name: String,
    pub layer: usize,
    pub role: Role,
    pub out_features: usize,
    pub in_features: usize,
}

impl LinearSpec {
    pub fn params(&self) -> usize {
        self.out_features * self.in_features
    }
}

/// Every linear layer of the decoder blocks, in order.
pub fn linear_layers(cfg: &ModelConfig) -> Vec<LinearSpec> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let mut out = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for role in Role::ALL {
            let (m, n) = match role {
                Role::Q => (q, h),
                Role::K | Role::V => (kv, h),
                Role::O => (h, q),
                Role::Gate | Role::Up => (i, h),
                Role::Down => (h, i),
            };
            out.push(LinearSpec { name: format!("model.layers.{l}.{}", role.module()), layer: l, role, out_features: m, in_features: n });
        }
    }
    out
}

/// Where a model's weights come from: a plain checkpoint, or a compressed model directory.
pub trait WeightSource {
    fn config(&self) -> &ModelConfig;
    /// For messages: the file or directory the weights come from.
    fn origin(&self) -> PathBuf;
    fn has(&self, name: &str) -> bool;
    /// A plain tensor (norms, embeddings).
    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor>;
    /// The linear layer whose weight is `{prefix}.weight` (and bias `{prefix}.bias` if stored).
    fn linear(&self, prefix: &str, dtype: DType, device: &Device) -> Result<Linear> {
        let w = self.tensor(&format!("{prefix}.weight"), dtype, device)?;
        let b = format!("{prefix}.bias");
        let bias = if self.has(&b) { Some(self.tensor(&b, dtype, device)?) } else { None };
        Ok(Linear::dense(w, bias))
    }
}

impl WeightSource for Checkpoint {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn origin(&self) -> PathBuf {
        self.files().first().map(|p| p.to_path_buf()).unwrap_or_else(|| self.dir.clone())
    }
    fn has(&self, name: &str) -> bool {
        self.contains(name)
    }
    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        Checkpoint::tensor(self, name, dtype, device)
    }
}

/// Key/value cache of a decoding session: per layer (B, n_kv_heads, T, head_dim).
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache { kv: vec![None; layers] }
    }
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.kv.first().and_then(|x| x.as_ref()).map(|(k, _)| k.dims()[2]).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Layer `l`'s keys and values, (B, n_kv_heads, T, head_dim) each, once filled.
    pub fn layer(&self, l: usize) -> Option<&(Tensor, Tensor)> {
        self.kv.get(l).and_then(|x| x.as_ref())
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    /// q, k, v, o, gate, up, down, in [`Role::ALL`] order.
    pub linears: Vec<Linear>,
}

impl Block {
    pub fn linear(&self, role: Role) -> &Linear {
        &self.linears[Role::ALL.iter().position(|r| *r == role).unwrap()]
    }
}

/// The decoder, ready to run.
#[derive(Debug, Clone)]
pub struct Model {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    pub lm_head: Linear,
    pub device: Device,
    pub dtype: DType,
    /// Use differentiable (slower) kernels for norms, rope and softmax: for fine-tuning.
    pub differentiable: bool,
    /// When set, the inputs of every linear layer are accumulated into Gram matrices XᵀX
    /// (calibration for activation-aware compression).
    pub capture: Option<std::sync::Arc<std::sync::Mutex<Grams>>>,
}

/// Which input a linear layer reads: q/k/v share one, gate/up share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    AttnIn,
    OIn,
    MlpIn,
    DownIn,
}

impl Slot {
    pub fn of(role: Role) -> Slot {
        match role {
            Role::Q | Role::K | Role::V => Slot::AttnIn,
            Role::O => Slot::OIn,
            Role::Gate | Role::Up => Slot::MlpIn,
            Role::Down => Slot::DownIn,
        }
    }
}

/// Accumulated XᵀX (n × n, f64 on the host) of each layer input, and the row count.
#[derive(Debug, Default)]
pub struct Grams {
    pub grams: std::collections::BTreeMap<(usize, Slot), (usize, Vec<f64>)>,
    pub rows: usize,
}

impl Grams {
    fn add(&mut self, layer: usize, slot: Slot, x: &Tensor) -> Result<()> {
        let n = x.dim(D::Minus1)?;
        let rows = x.elem_count() / n;
        let x2 = x.reshape((rows, n))?.to_dtype(DType::F32)?;
        let g: Vec<f32> = x2.t()?.matmul(&x2)?.flatten_all()?.to_vec1()?;
        let e = self.grams.entry((layer, slot)).or_insert_with(|| (n, vec![0.0; n * n]));
        for (a, b) in e.1.iter_mut().zip(g) {
            *a += b as f64;
        }
        if layer == 0 && slot == Slot::AttnIn {
            self.rows += rows;
        }
        Ok(())
    }
    /// The Gram matrix seen by `role` in `layer`.
    pub fn get(&self, layer: usize, role: Role) -> Option<&(usize, Vec<f64>)> {
        self.grams.get(&(layer, Slot::of(role)))
    }
}

impl Model {
    /// Builds the model from any weight source, checking every shape against the config.
    pub fn load(src: &dyn WeightSource, dtype: DType, device: &Device) -> Result<Model> {
        let cfg = src.config().clone();
        let origin = src.origin();
        let check = |name: &str, t: &Tensor, want: &[usize]| -> Result<()> {
            if t.dims() != want {
                return Err(Error::bad(
                    &origin,
                    format!("tensor `{name}` has shape {:?} but config.json implies {:?}", t.dims(), want),
                ));
            }
            Ok(())
        };
        let need = |name: &str| -> Result<()> {
            if src.has(name) { Ok(()) } else { Err(Error::bad(&origin, format!("required tensor `{name}` is not in the checkpoint"))) }
        };
        need("model.embed_tokens.weight")?;
        let embed = src.tensor("model.embed_tokens.weight", dtype, device)?;
        check("model.embed_tokens.weight", &embed, &[cfg.vocab_size, cfg.hidden_size])?;
        let norm_w = |name: &str| -> Result<Tensor> {
            need(name)?;
            let t = src.tensor(name, dtype, device)?;
            check(name, &t, &[cfg.hidden_size])?;
            Ok(t)
        };
        let specs = linear_layers(&cfg);
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let mut linears = Vec::with_capacity(7);
            for spec in specs.iter().filter(|s| s.layer == l) {
                let lin = src.linear(&spec.name, dtype, device)?;
                if (lin.out_features(), lin.in_features()) != (spec.out_features, spec.in_features) {
                    return Err(Error::bad(
                        &origin,
                        format!(
                            "linear layer `{}` is {}×{} but config.json implies {}×{}",
                            spec.name,
                            lin.out_features(),
                            lin.in_features(),
                            spec.out_features,
                            spec.in_features
                        ),
                    ));
                }
                linears.push(lin);
            }
            blocks.push(Block {
                input_norm: norm_w(&format!("model.layers.{l}.input_layernorm.weight"))?,
                post_norm: norm_w(&format!("model.layers.{l}.post_attention_layernorm.weight"))?,
                linears,
            });
        }
        let norm = norm_w("model.norm.weight")?;
        let lm_head = if src.has("lm_head.weight") && !cfg.tie_word_embeddings {
            let l = src.linear("lm_head", dtype, device)?;
            if (l.out_features(), l.in_features()) != (cfg.vocab_size, cfg.hidden_size) {
                return Err(Error::bad(&origin, format!("lm_head is {}×{}, expected {}×{}", l.out_features(), l.in_features(), cfg.vocab_size, cfg.hidden_size)));
            }
            l
        } else if cfg.tie_word_embeddings || !src.has("lm_head.weight") {
            Linear::dense(embed.clone(), None)
        } else {
            unreachable!()
        };
        Ok(Model { cfg, embed, blocks, norm, lm_head, device: device.clone(), dtype, differentiable: false, capture: None })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.blocks.len())
    }

    /// Parameters of the model as it runs (embedding counted once when tied).
    pub fn params(&self) -> usize {
        let mut n = self.embed.elem_count() + self.norm.elem_count();
        for b in &self.blocks {
            n += b.input_norm.elem_count() + b.post_norm.elem_count();
            n += b.linears.iter().map(|l| l.params()).sum::<usize>();
        }
        if !self.cfg.tie_word_embeddings {
            n += self.lm_head.params();
        }
        n
    }

    /// Logits (B, S, V) in f32 for token ids (B, S) at positions `cache.len()..`.
    /// With `cache`, keys and values are appended to it.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.hidden(ids, cache)?;
        let logits = self.lm_head.forward(&h)?.to_dtype(DType::F32)?;
        Ok((logits / self.cfg.logits_scaling)?)
    }

    /// Final hidden states (B, S, hidden) after the last norm.
    pub fn hidden(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let pos = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, s, self.cfg.hidden_size))?;
        if self.cfg.embedding_multiplier != 1.0 {
            x = (x * self.cfg.embedding_multiplier)?;
        }
        let (cos, sin) = self.rope_tables(pos, s)?;
        let mask = if s > 1 { Some(causal_mask(s, pos, &self.device)?) } else { None };
        for (l, block) in self.blocks.iter().enumerate() {
            let h = self.rms_norm(&x, &block.input_norm)?;
            self.observe(l, Slot::AttnIn, &h)?;
            let kv = cache.as_deref_mut().map(|c| &mut c.kv[l]);
            let a = self.attention(l, block, &h, &cos, &sin, mask.as_ref(), kv)?;
            x = (x + scale(a, self.cfg.residual_multiplier)?)?;
            let h = self.rms_norm(&x, &block.post_norm)?;
            self.observe(l, Slot::MlpIn, &h)?;
            let gate = block.linear(Role::Gate).forward(&h)?;
            let up = block.linear(Role::Up).forward(&h)?;
            let act = (gate.silu()? * up)?;
            self.observe(l, Slot::DownIn, &act)?;
            let m = block.linear(Role::Down).forward(&act)?;
            x = (x + scale(m, self.cfg.residual_multiplier)?)?;
        }
        self.rms_norm(&x, &self.norm)
    }

    fn observe(&self, layer: usize, slot: Slot, x: &Tensor) -> Result<()> {
        if let Some(c) = &self.capture {
            c.lock().map_err(|_| Error::Invalid("calibration capture poisoned".into()))?.add(layer, slot, x)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let q = block.linear(Role::Q).forward(x)?.reshape((b, s, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = block.linear(Role::K).forward(x)?.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = block.linear(Role::V).forward(x)?.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = self.rope(&q, cos, sin)?;
        let mut k = self.rope(&k, cos, sin)?;
        let mut v = v;
        if let Some(slot) = kv {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let k = repeat_kv(&k, nh / nkv)?;
        let v = repeat_kv(&v, nh / nkv)?;
        let q = q.to_dtype(DType::F32)?;
        let k = k.to_dtype(DType::F32)?;
        let att = (q.matmul(&k.t()?)? * cfg.attention_scale)?;
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = if self.differentiable {
            candle_nn::ops::softmax(&att, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        };
        let y = att.to_dtype(v.dtype())?.matmul(&v.contiguous()?)?;
        let y = y.transpose(1, 2)?.reshape((b, s, nh * hd))?;
        self.observe(layer, Slot::OIn, &y)?;
        Ok(block.linear(Role::O).forward(&y)?)
    }

    /// cos/sin tables (S, head_dim/2) for positions pos..pos+S.
    fn rope_tables(&self, pos: usize, s: usize) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim;
        let inv: Vec<f32> = (0..hd / 2).map(|i| (1.0 / self.cfg.rope_theta.powf(2.0 * i as f64 / hd as f64)) as f32).collect();
        let mut ang = Vec::with_capacity(s * hd / 2);
        for p in pos..pos + s {
            for f in &inv {
                ang.push(p as f32 * f);
            }
        }
        let ang = Tensor::from_vec(ang, (s, hd / 2), &self.device)?;
        Ok((ang.cos()?.to_dtype(self.dtype)?, ang.sin()?.to_dtype(self.dtype)?))
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if !self.differentiable {
            return Ok(candle_nn::rotary_emb::rope(x, cos, sin)?);
        }
        // rotate-half written with differentiable ops
        let hd = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
        let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        if !self.differentiable {
            return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?);
        }
        let dt = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dt)?;
        Ok(y.broadcast_mul(w)?)
    }
}

fn scale(t: Tensor, m: f64) -> candle_core::Result<Tensor> {
    if m == 1.0 { Ok(t) } else { t * m }
}

/// (S, pos+S) additive mask: 0 where query i may see key j (j ≤ pos+i), -inf elsewhere.
fn causal_mask(s: usize, pos: usize, device: &Device) -> Result<Tensor> {
    let t = pos + s;
    let v: Vec<f32> = (0..s).flat_map(|i| (0..t).map(move |j| if j <= pos + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Ok(Tensor::from_vec(v, (s, t), device)?)
}

/// (B, n_kv, T, D) → (B, n_kv·rep, T, D), each kv head repeated for its query group.
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, n, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, n, rep, t, d))?.reshape((b, n * rep, t, d))?)
}
