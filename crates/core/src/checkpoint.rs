//! A Hugging Face model directory on disk: `config.json`, `model.safetensors` (or shards listed
//! in `model.safetensors.index.json`) and `tokenizer.json`.
//!
//! Opening a checkpoint memory-maps the safetensors files and reads their headers only; tensor
//! bytes are touched when a tensor is asked for. Every header is validated (length, JSON,
//! offsets, dtype × shape = byte size) and every error names the file. The files are only ever
//! read: the user's checkpoint is never modified.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensorError;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Where one tensor lives and what it is.
#[derive(Debug, Clone, Serialize)]
pub struct TensorInfo {
    pub name: String,
    /// safetensors dtype name (`BF16`, `F16`, `F32`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Which shard (index into [`Checkpoint::files`]).
    #[serde(skip)]
    pub shard: usize,
    /// Byte range inside the shard's data section.
    #[serde(skip)]
    pub range: (usize, usize),
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.range.1 - self.range.0
    }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// An opened model directory.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("dir", &self.dir).field("tensors", &self.tensors.len()).finish()
    }
}

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

impl Checkpoint {
    /// Opens `dir`: parses `config.json`, maps the safetensors file(s), validates headers.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::missing(&dir, "model directory"));
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = safetensors_files(&dir)?;
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for (si, (path, expected)) in files.iter().enumerate() {
            let shard = map_shard(path)?;
            let (_, meta) = read_header(path, &shard.mmap)?;
            for (name, info) in meta.tensors() {
                if let Some(expected) = expected {
                    if !expected.contains(&name) {
                        continue; // the index assigns this tensor elsewhere
                    }
                }
                tensors.insert(
                    name.clone(),
                    TensorInfo {
                        name: name.clone(),
                        dtype: format!("{:?}", info.dtype),
                        shape: info.shape.clone(),
                        shard: si,
                        range: info.data_offsets,
                    },
                );
            }
            if let Some(expected) = expected {
                if let Some(absent) = expected.iter().find(|n| !tensors.contains_key(*n)) {
                    return Err(Error::bad(
                        path,
                        format!("tensor `{absent}` is listed for this shard in {INDEX_FILE} but not stored in it"),
                    ));
                }
            }
            shards.push(shard);
        }
        Ok(Checkpoint { dir, config, shards, tensors })
    }

    /// The safetensors files, in index order.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Total size of the safetensors files in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.mmap.len() as u64).sum()
    }

    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The raw little-endian bytes of a tensor (borrowed from the memory map).
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8], &Path)> {
        let info = self.tensors.get(name).ok_or_else(|| {
            Error::bad(self.shard_path_hint(), format!("tensor `{name}` not found in the checkpoint"))
        })?;
        let shard = &self.shards[info.shard];
        let bytes = &shard.mmap[shard.data_start + info.range.0..shard.data_start + info.range.1];
        Ok((info, bytes, &shard.path))
    }

    /// Reads a tensor's stored bytes into `dst` (its length must be the tensor's byte size) with
    /// `pread`: no page faults on the mapping, so several threads read at full speed.
    pub fn read_into(&self, name: &str, dst: &mut [u8]) -> Result<()> {
        let (info, bytes, path) = self.raw(name)?;
        if dst.len() != bytes.len() {
            return Err(Error::Invalid(format!("read_into `{name}`: buffer of {} bytes for {} stored", dst.len(), bytes.len())));
        }
        let shard = &self.shards[info.shard];
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(dst, (shard.data_start + info.range.0) as u64).map_err(|e| Error::io(path, e))?;
        }
        #[cfg(not(unix))]
        {
            let _ = (f, shard);
            dst.copy_from_slice(bytes);
        }
        Ok(())
    }

    /// Tells the kernel that a tensor's pages are no longer needed (they are re-read from the
    /// file if asked again), so that streaming through a large checkpoint keeps memory low.
    pub fn release(&self, name: &str) {
        if let Some(info) = self.tensors.get(name) {
            let shard = &self.shards[info.shard];
            let start = shard.data_start + info.range.0;
            let page = 4096;
            let s = start / page * page;
            let len = shard.data_start + info.range.1 - s;
            // SAFETY: a read-only file mapping; DONTNEED drops clean pages, later reads refault them
            // from the file. No reference into this range outlives this call in the pipeline.
            let _ = unsafe { shard.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s, len) };
        }
    }

    fn shard_path_hint(&self) -> &Path {
        self.shards.first().map(|s| s.path.as_path()).unwrap_or(&self.dir)
    }

    /// Loads a floating-point tensor, converted to `dtype`, on `device`. Non-finite values are
    /// an error naming the tensor and the file.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            // uploaded in the stored dtype through page-locked memory, checked on the device
            return Ok(crate::gpu::load_weight(self, name, device)?.to_dtype(dtype)?);
        }
        let (info, bytes, path) = self.raw(name)?;
        let src = float_dtype(&info.dtype)
            .ok_or_else(|| Error::bad(path, format!("tensor `{name}` has dtype {} (expected BF16, F16 or F32)", info.dtype)))?;
        let t = Tensor::from_raw_buffer(bytes, src, &info.shape, &Device::Cpu)?.to_dtype(DType::F32)?;
        let bad = t.flatten_all()?.to_vec1::<f32>()?.iter().position(|v| !v.is_finite());
        if let Some(i) = bad {
            return Err(Error::bad(path, format!("tensor `{name}` holds a non-finite value (NaN or Inf) at flat index {i}")));
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// A byte-for-byte copy of a floating-point tensor, to write into another file unchanged.
    pub fn copy_tensor(&self, name: &str) -> Result<OwnedTensor> {
        let (info, bytes, path) = self.raw(name)?;
        let dtype = match info.dtype.as_str() {
            "BF16" => safetensors::Dtype::BF16,
            "F16" => safetensors::Dtype::F16,
            "F32" => safetensors::Dtype::F32,
            other => return Err(Error::bad(path, format!("tensor `{name}` has unsupported dtype {other}"))),
        };
        Ok(OwnedTensor { name: name.to_string(), dtype, shape: info.shape.clone(), data: bytes.to_vec() })
    }

    /// A 2-D tensor as row-major f32 (rows, cols, data).
    pub fn matrix_f32(&self, name: &str) -> Result<(usize, usize, Vec<f32>)> {
        let t = self.tensor(name, DType::F32, &Device::Cpu)?;
        let (r, c) = t.dims2().map_err(|_| Error::Invalid(format!("tensor `{name}` is not a matrix: shape {:?}", t.dims())))?;
        Ok((r, c, t.flatten_all()?.to_vec1::<f32>()?))
    }

    /// Path of `tokenizer.json`, checked to exist.
    pub fn tokenizer_path(&self) -> Result<PathBuf> {
        let p = self.dir.join("tokenizer.json");
        if p.is_file() { Ok(p) } else { Err(Error::missing(&p, "tokenizer.json of the model")) }
    }

    pub fn tokenizer(&self) -> Result<crate::tokenizer::Tokenizer> {
        crate::tokenizer::Tokenizer::from_file(&self.tokenizer_path()?)
    }
}

pub fn float_dtype(name: &str) -> Option<DType> {
    match name {
        "BF16" => Some(DType::BF16),
        "F16" => Some(DType::F16),
        "F32" => Some(DType::F32),
        _ => None,
    }
}

/// The safetensors files of `dir` and, for sharded checkpoints, which tensors each must hold.
fn safetensors_files(dir: &Path) -> Result<Vec<(PathBuf, Option<Vec<String>>)>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::bad(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::bad(&index, "no `weight_map` object"))?;
        let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| Error::bad(&index, format!("weight_map entry `{tensor}` is not a file name")))?;
            if file.contains('/') || file.contains("..") {
                return Err(Error::bad(&index, format!("weight_map entry `{tensor}` points outside the directory: {file}")));
            }
            by_file.entry(file.to_string()).or_default().push(tensor.clone());
        }
        if by_file.is_empty() {
            return Err(Error::bad(&index, "weight_map is empty"));
        }
        let mut out = Vec::new();
        for (file, names) in by_file {
            let p = dir.join(&file);
            if !p.is_file() {
                return Err(Error::missing(&p, format!("shard named in {INDEX_FILE}")));
            }
            out.push((p, Some(names)));
        }
        return Ok(out);
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![(single, None)]);
    }
    Err(Error::missing(&single, format!("weights: neither {SINGLE_FILE} nor {INDEX_FILE} exists")))
}

fn map_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only; Compactor never writes to a source checkpoint.
    // A concurrent writer from outside could change the bytes under us, as with any mmap reader.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let data_start = if mmap.len() >= 8 {
        (u64::from_le_bytes(mmap[..8].try_into().unwrap()) as usize).saturating_add(8)
    } else {
        0
    };
    Ok(Shard { path: path.to_path_buf(), mmap, data_start })
}

fn read_header(path: &Path, bytes: &[u8]) -> Result<(usize, safetensors::tensor::Metadata)> {
    safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::bad(path, explain(e, bytes)))
}

/// Turns a safetensors error into a sentence a user can act on.
fn explain(e: SafeTensorError, bytes: &[u8]) -> String {
    let header_len = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    match e {
        SafeTensorError::HeaderTooSmall => format!("not a safetensors file: {} bytes, shorter than the 8-byte header length", bytes.len()),
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => format!(
            "header length {} runs past the end of the file ({} bytes): truncated or not a safetensors file",
            header_len.unwrap_or(0),
            bytes.len()
        ),
        SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderDeserialization(_) => {
            format!("safetensors header is not valid JSON: {e}")
        }
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "file size {} does not match the tensors its header lists: truncated or padded",
            bytes.len()
        ),
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor `{name}` has overlapping or out-of-order data offsets")
        }
        SafeTensorError::TensorInvalidInfo => {
            format!("a tensor's byte range does not match its dtype × shape{}", mismatch_name(bytes))
        }
        other => format!("invalid safetensors file: {other}"),
    }
}

/// Finds the first tensor whose byte range disagrees with dtype × shape, for the message.
fn mismatch_name(bytes: &[u8]) -> String {
    let Some(n) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize) else { return String::new() };
    let Some(h) = bytes.get(8..8 + n) else { return String::new() };
    let Ok(v) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(h) else { return String::new() };
    for (name, t) in v {
        if name == "__metadata__" { continue; }
        let shape: Vec<usize> = t["shape"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect()).unwrap_or_default();
        let size = match t["dtype"].as_str() { Some("F32") | Some("I32") | Some("U32") => 4, Some("BF16") | Some("F16") | Some("I16") | Some("U16") => 2, Some("F64") | Some("I64") | Some("U64") => 8, Some("I8") | Some("U8") | Some("BOOL") => 1, _ => continue };
        let off = &t["data_offsets"];
        let (s, e) = (off[0].as_u64().unwrap_or(0) as usize, off[1].as_u64().unwrap_or(0) as usize);
        let want = shape.iter().product::<usize>() * size;
        if e.saturating_sub(s) != want {
            return format!(": tensor `{name}` is {} {:?} = {want} bytes but its offsets span {} bytes", t["dtype"].as_str().unwrap_or("?"), shape, e.saturating_sub(s));
        }
    }
    String::new()
}

/// The bytes of plain numbers as stored in safetensors (little-endian; this is a
/// little-endian target).
pub(crate) fn le_bytes_of<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    #[cfg(target_endian = "big")]
    compile_error!("safetensors bytes are written straight from memory: little-endian targets only");
    bytemuck::cast_slice(v).to_vec()
}

/// A tensor to write: name, safetensors dtype, shape, little-endian bytes.
pub struct OwnedTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> safetensors::Dtype { self.dtype }
    fn shape(&self) -> &[usize] { &self.shape }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> { std::borrow::Cow::Borrowed(&self.data) }
    fn data_len(&self) -> usize { self.data.len() }
}

impl OwnedTensor {
    /// An f32 tensor from a candle tensor (any float dtype), or in `dtype` (BF16/F16/F32).
    pub fn from_tensor(name: impl Into<String>, t: &Tensor, dtype: DType) -> Result<Self> {
        let shape = t.dims().to_vec();
        // converted where it lives (on a GPU, half the bytes come back), copied once to the host
        let t = t.to_dtype(dtype)?.flatten_all()?;
        let st = match dtype {
            DType::F32 => safetensors::Dtype::F32,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
            other => return Err(Error::Invalid(format!("cannot write dtype {other:?}"))),
        };
        #[cfg(feature = "cuda")]
        if t.device().is_cuda() {
            return Ok(OwnedTensor { name: name.into(), dtype: st, shape, data: crate::gpu::download_bytes(&t)? });
        }
        let data = match dtype {
            DType::F32 => le_bytes_of(&t.to_vec1::<f32>()?),
            DType::BF16 => le_bytes_of(&t.to_vec1::<half::bf16>()?),
            _ => le_bytes_of(&t.to_vec1::<half::f16>()?),
        };
        Ok(OwnedTensor { name: name.into(), dtype: st, shape, data })
    }
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, v: &[f32]) -> Self {
        OwnedTensor { name: name.into(), dtype: safetensors::Dtype::F32, shape, data: le_bytes_of(v) }
    }
}

/// Writes a safetensors file atomically (temporary file in the same directory, fsync, rename).
pub fn write_safetensors(path: &Path, tensors: &[OwnedTensor], metadata: Option<std::collections::HashMap<String, String>>) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|t| (t.name.clone(), t)), metadata)
        .map_err(|e| Error::bad(path, format!("cannot serialize: {e}")))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that a reader never sees
/// a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("out"), std::process::id()));
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
