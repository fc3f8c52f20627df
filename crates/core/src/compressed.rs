//! The compressed model on disk, and loading it back.
//!
//! A directory holding:
//! - `compactor.json`: the [`Manifest`] (source checkpoint and its fingerprint, the plan, every
//!   compressed layer's factorization metadata, ranks, errors, sizes). Written last: a directory
//!   without it is incomplete and does not load.
//! - `model.safetensors` (or shards with `model.safetensors.index.json`): the untouched tensors
//!   under their own names, and each compressed layer's factors as `{layer}.cx.{factor}` (e.g.
//!   `model.layers.0.mlp.up_proj.cx.a`), quantized factors as `.qweight` (U8) + `.scales` (+ `.mins`).
//! - the source's `config.json`, `tokenizer.json` (and tokenizer/generation configs).
//!
//! The engine runs the model directly on its factors ([`CompressedModel`] is a [`WeightSource`]).

use crate::checkpoint::{le_bytes_of, Checkpoint, OwnedTensor};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::linear::{from_factorization, Linear};
use crate::model::{Role, WeightSource};
use crate::plan::Plan;
use candle_core::{DType, Device, Tensor};
use compactor_decomp::{FactorMeta, NamedTensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "compactor.json";
pub const FORMAT: &str = "compactor-compressed/1";
/// Infix between a layer name and its factor names.
pub const FACTOR_INFIX: &str = ".cx.";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceInfo {
    pub dir: String,
    /// sha256 over config.json, every safetensors header and every file size.
    pub fingerprint: String,
    pub params: usize,
    pub bytes: usize,
    pub linear_params: usize,
    pub linear_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerEntry {
    pub name: String,
    pub layer: usize,
    pub role: Role,
    pub method: String,
    pub meta: FactorMeta,
    pub ranks: Vec<usize>,
    pub params: usize,
    pub bytes: usize,
    pub dense_params: usize,
    pub dense_bytes: usize,
    /// ‖W − Ŵ‖_F / ‖W‖_F.
    pub rel_error: f64,
    /// For activation-aware fits: ‖(W − Ŵ) X‖ / ‖W X‖ on the calibration inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_error: Option<f64>,
    pub iterations: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    pub params: usize,
    pub bytes: usize,
    pub linear_params: usize,
    pub linear_bytes: usize,
    /// linear_params / source linear_params.
    pub linear_param_ratio: f64,
    /// bytes / source bytes.
    pub byte_ratio: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealRecord {
    pub steps: usize,
    pub lr: f64,
    pub text: String,
    pub losses: Vec<f64>,
    pub step_seconds: f64,
    pub trained_tensors: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub compactor_version: String,
    pub created_unix: u64,
    pub source: SourceInfo,
    pub plan: Plan,
    /// dtype of stored f32 factors (`BF16` or `F32`).
    pub factor_dtype: String,
    pub layers: Vec<LayerEntry>,
    pub totals: Totals,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heal: Option<HealRecord>,
    /// Free-form record of the run (allocation, calibration, timings).
    #[serde(default)]
    pub notes: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    pub fn layer(&self, name: &str) -> Option<&LayerEntry> {
        self.layers.iter().find(|l| l.name == name)
    }
}

/// A compressed model directory, opened.
pub struct CompressedModel {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub ckpt: Checkpoint,
    by_name: BTreeMap<String, usize>,
}

impl CompressedModel {
    pub fn is_compressed(dir: &Path) -> bool {
        dir.join(MANIFEST).is_file()
    }

    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let mpath = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&mpath).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::missing(&mpath, "manifest of a compressed model (the directory is not a complete Compactor output)"),
            _ => Error::io(&mpath, e),
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::bad(&mpath, format!("invalid manifest: {e}")))?;
        if manifest.format != FORMAT {
            return Err(Error::bad(&mpath, format!("format `{}` is not `{FORMAT}`", manifest.format)));
        }
        let ckpt = Checkpoint::open(&dir)?;
        let by_name = manifest.layers.iter().enumerate().map(|(i, l)| (l.name.clone(), i)).collect();
        Ok(CompressedModel { dir, manifest, ckpt, by_name })
    }

    /// The factorization of a compressed layer, rebuilt from the stored tensors.
    pub fn factorization(&self, name: &str) -> Result<Option<compactor_decomp::Factorization>> {
        let Some(&i) = self.by_name.get(name) else { return Ok(None) };
        let entry = &self.manifest.layers[i];
        let prefix = format!("{name}{FACTOR_INFIX}");
        let mut tensors = Vec::new();
        for info in self.ckpt.tensors().filter(|t| t.name.starts_with(&prefix)) {
            let (_, bytes, path) = self.ckpt.raw(&info.name)?;
            let data = match info.dtype.as_str() {
                "U8" => TensorData::U8(bytes.to_vec()),
                _ => {
                    let t = self.ckpt.tensor(&info.name, DType::F32, &Device::Cpu).map_err(|e| Error::bad(path, format!("{e}")))?;
                    TensorData::F32(t.flatten_all()?.to_vec1()?)
                }
            };
            tensors.push(NamedTensor { name: info.name[prefix.len()..].to_string(), shape: info.shape.clone(), data });
        }
        let f = compactor_decomp::Factorization::from_tensors(&entry.meta, tensors)
            .map_err(|e| Error::bad(WeightSource::origin(&self.ckpt), format!("layer `{name}`: {e}")))?;
        Ok(Some(f))
    }
}

impl WeightSource for CompressedModel {
    fn config(&self) -> &ModelConfig {
        &self.ckpt.config
    }
    fn origin(&self) -> PathBuf {
        self.ckpt.origin()
    }
    fn has(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }
    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.ckpt.tensor(name, dtype, device)
    }
    fn linear(&self, prefix: &str, dtype: DType, device: &Device) -> Result<Linear> {
        let b = format!("{prefix}.bias");
        let bias = if self.has(&b) { Some(self.tensor(&b, dtype, device)?) } else { None };
        // on CUDA an unquantized low-rank layer's stored factors go straight to the device
        // (page-locked reads in their stored dtype), not through a host f32 factorization
        if let (true, Some(&i)) = (device.is_cuda(), self.by_name.get(prefix)) {
            let entry = &self.manifest.layers[i];
            if entry.meta.kind == compactor_decomp::Kind::LowRank && entry.meta.quant.is_none() {
                let (an, bn) = (format!("{prefix}{FACTOR_INFIX}a"), format!("{prefix}{FACTOR_INFIX}b"));
                // stored as the manifest says (else the factorization path names what is wrong)
                let as_listed = |name: &str, factor: &str| match (self.ckpt.info(name), entry.meta.factor_shapes.get(factor)) {
                    (Some(info), Some(want)) => &info.shape == want,
                    _ => false,
                };
                if as_listed(&an, "a") && as_listed(&bn, "b") {
                    return Ok(Linear::low_rank(self.tensor(&an, dtype, device)?, self.tensor(&bn, dtype, device)?, bias)?);
                }
            }
        }
        match self.factorization(prefix)? {
            // symmetric int8 factors stay codes where the decode kernels read them
            Some(f) if device.is_cuda() && dtype == DType::BF16 => match crate::linear::int8_linear(&f, bias.clone(), device)? {
                Some(l) => Ok(l),
                None => Ok(from_factorization(&f, bias, dtype, device)?),
            },
            Some(f) => Ok(from_factorization(&f, bias, dtype, device)?),
            None => Ok(Linear::dense(self.tensor(&format!("{prefix}.weight"), dtype, device)?, bias)),
        }
    }
}

/// Either kind of model directory, for commands that take both.
pub enum AnyModel {
    Plain(Checkpoint),
    Compressed(Box<CompressedModel>),
}

impl AnyModel {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if CompressedModel::is_compressed(dir) {
            Ok(AnyModel::Compressed(Box::new(CompressedModel::open(dir)?)))
        } else {
            Ok(AnyModel::Plain(Checkpoint::open(dir)?))
        }
    }
    pub fn checkpoint(&self) -> &Checkpoint {
        match self {
            AnyModel::Plain(c) => c,
            AnyModel::Compressed(c) => &c.ckpt,
        }
    }
    pub fn source(&self) -> &dyn WeightSource {
        match self {
            AnyModel::Plain(c) => c,
            AnyModel::Compressed(c) => c.as_ref(),
        }
    }
    pub fn manifest(&self) -> Option<&Manifest> {
        match self {
            AnyModel::Plain(_) => None,
            AnyModel::Compressed(c) => Some(&c.manifest),
        }
    }
}

/// sha256 over config.json, every safetensors header and every file size.
pub fn fingerprint(ck: &Checkpoint) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let cfg = ck.dir.join("config.json");
    h.update(std::fs::read(&cfg).map_err(|e| Error::io(&cfg, e))?);
    for p in ck.files() {
        use std::io::Read;
        let mut f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
        let len = f.metadata().map_err(|e| Error::io(p, e))?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|e| Error::io(p, e))?;
        let hl = u64::from_le_bytes(n).min(len);
        let mut header = vec![0u8; hl as usize];
        f.read_exact(&mut header).map_err(|e| Error::io(p, e))?;
        h.update(len.to_le_bytes());
        h.update(&header);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Writes tensors into safetensors shards of about `budget` bytes without holding them: each
/// tensor's bytes go straight into the shard file behind a header region reserved up front
/// (safetensors allows the header JSON to be padded with spaces), and closing the shard writes
/// the header into it. Peak memory is one tensor, each byte is written once. A shard is closed
/// early if its header would outgrow the reserve. `finish` names the shards as Hugging Face
/// does (`model.safetensors` when there is one).
pub struct ShardWriter {
    dir: PathBuf,
    budget: usize,
    open: Option<(PathBuf, std::fs::File)>,
    pending: Vec<Placed>,
    pending_bytes: usize,
    header_estimate: usize,
    written: Vec<(PathBuf, Vec<String>)>,
}

struct Placed {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    len: usize,
}

/// Bytes reserved for a shard's 8-byte length and header: data starts 1 MiB into the file.
const HEADER_RESERVE: usize = 1 << 20;

impl ShardWriter {
    pub fn new(dir: &Path, budget: usize) -> Self {
        ShardWriter { dir: dir.to_path_buf(), budget: budget.max(1), open: None, pending: vec![], pending_bytes: 0, header_estimate: 64, written: vec![] }
    }

    fn shard_path(&self) -> PathBuf {
        self.dir.join(format!("shard-{:05}.safetensors", self.written.len() + 1))
    }

    pub fn add(&mut self, t: OwnedTensor) -> Result<()> {
        use std::io::{Seek, Write};
        // a generous bound on this tensor's header entry
        let entry = t.name.len() + 96 + 24 * t.shape.len();
        if !self.pending.is_empty() && (self.pending_bytes + t.data.len() > self.budget || self.header_estimate + entry > HEADER_RESERVE - 8) {
            self.flush()?;
        }
        if self.open.is_none() {
            let path = self.shard_path();
            let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
            f.seek(std::io::SeekFrom::Start(HEADER_RESERVE as u64)).map_err(|e| Error::io(&path, e))?;
            self.open = Some((path, f));
        }
        let (path, file) = self.open.as_mut().unwrap();
        file.write_all(&t.data).map_err(|e| Error::io(&*path, e))?;
        self.header_estimate += entry;
        self.pending_bytes += t.data.len();
        self.pending.push(Placed { name: t.name, dtype: t.dtype, shape: t.shape, len: t.data.len() });
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        use std::io::{Seek, Write};
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
        let mut offset = 0usize;
        for t in &self.pending {
            let dtype = serde_json::to_value(t.dtype).expect("dtype serializes");
            header.insert(t.name.clone(), serde_json::json!({ "dtype": dtype, "shape": t.shape, "data_offsets": [offset, offset + t.len] }));
            offset += t.len;
        }
        let mut json = serde_json::to_vec(&header).expect("header serializes");
        let (path, mut file) = match self.open.take() {
            Some(o) => o,
            None => {
                let path = self.shard_path();
                let f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
                (path, f)
            }
        };
        if json.len() > HEADER_RESERVE - 8 {
            return Err(Error::bad(&path, format!("safetensors header of {} bytes exceeds the reserved {} bytes", json.len(), HEADER_RESERVE - 8)));
        }
        json.resize(HEADER_RESERVE - 8, b' ');
        file.seek(std::io::SeekFrom::Start(0)).map_err(|e| Error::io(&path, e))?;
        file.write_all(&((HEADER_RESERVE - 8) as u64).to_le_bytes()).map_err(|e| Error::io(&path, e))?;
        file.write_all(&json).map_err(|e| Error::io(&path, e))?;
        file.set_len((HEADER_RESERVE + offset) as u64).map_err(|e| Error::io(&path, e))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        self.written.push((path, self.pending.iter().map(|t| t.name.clone()).collect()));
        self.pending.clear();
        self.pending_bytes = 0;
        self.header_estimate = 64;
        Ok(())
    }

    /// Writes the last shard and renames them; returns the total bytes written.
    pub fn finish(mut self) -> Result<u64> {
        if !self.pending.is_empty() || self.written.is_empty() {
            self.flush()?;
        }
        let n = self.written.len();
        let mut total = 0u64;
        let mut map = serde_json::Map::new();
        for (i, (path, names)) in self.written.iter().enumerate() {
            let name = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n) };
            let dest = self.dir.join(&name);
            std::fs::rename(path, &dest).map_err(|e| Error::io(&dest, e))?;
            total += std::fs::metadata(&dest).map_err(|e| Error::io(&dest, e))?.len();
            for t in names {
                map.insert(t.clone(), serde_json::Value::String(name.clone()));
            }
        }
        if n > 1 {
            let idx = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": map });
            crate::checkpoint::write_atomic(&self.dir.join(crate::checkpoint::INDEX_FILE), serde_json::to_string_pretty(&idx).unwrap().as_bytes())?;
        }
        Ok(total)
    }
}

/// The factor tensors of `f` under `{layer}.cx.`, f32 factors stored as `dtype`.
pub fn factor_tensors(layer: &str, f: &compactor_decomp::Factorization, dtype: DType) -> Vec<OwnedTensor> {
    f.tensors()
        .into_iter()
        .map(|t| {
            let name = format!("{layer}{FACTOR_INFIX}{}", t.name);
            match t.data {
                TensorData::U8(v) => OwnedTensor { name, dtype: safetensors::Dtype::U8, shape: t.shape, data: v },
                TensorData::F32(v) => match dtype {
                    DType::BF16 => OwnedTensor { name, dtype: safetensors::Dtype::BF16, shape: t.shape, data: le_bytes_of(&v.iter().map(|x| half::bf16::from_f32(*x)).collect::<Vec<_>>()) },
                    DType::F16 => OwnedTensor { name, dtype: safetensors::Dtype::F16, shape: t.shape, data: le_bytes_of(&v.iter().map(|x| half::f16::from_f32(*x)).collect::<Vec<_>>()) },
                    _ => OwnedTensor::from_f32(name, t.shape, &v),
                },
            }
        })
        .collect()
}

/// Bytes `f` takes on disk when its f32 factors are stored as `dtype`.
pub fn stored_bytes(f: &compactor_decomp::Factorization, dtype: DType) -> usize {
    let elem = dtype.size_in_bytes();
    let cp_weights = match f {
        compactor_decomp::Factorization::Cp { weights, .. } => weights.len() * elem,
        _ => 0,
    };
    cp_weights + f.factors().iter().map(|(_, t)| if t.is_quantized() { t.bytes() } else { t.numel() * elem }).sum::<usize>()
}
