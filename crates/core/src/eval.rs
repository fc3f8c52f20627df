//! Evaluation: perplexity by the project's protocol, and speed.
//!
//! Perplexity protocol (shared with the reference numbers of the fixtures): encode the text
//! without special tokens, cut the ids into non-overlapping windows of `ctx` tokens from the
//! start (drop the tail), keep the first `max_windows`; perplexity = exp(mean NLL) over the
//! ctx−1 next-token predictions of every window.

use crate::error::{Error, Result};
use crate::model::Model;
use crate::progress::{check, Progress};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Windows of `ctx` ids by the protocol. Errors if the text gives less than one window.
pub fn windows(ids: &[u32], ctx: usize, max_windows: usize, origin: &Path) -> Result<Vec<Vec<u32>>> {
    if ctx < 2 {
        return Err(Error::Invalid(format!("--ctx must be at least 2 (got {ctx})")));
    }
    if max_windows == 0 {
        return Err(Error::Invalid("--max-windows must be at least 1".into()));
    }
    if ids.is_empty() {
        return Err(Error::bad(origin, "text is empty: nothing to evaluate"));
    }
    if ids.len() < ctx {
        return Err(Error::bad(origin, format!("text has {} tokens, shorter than one window of {ctx}", ids.len())));
    }
    Ok(ids.chunks_exact(ctx).take(max_windows).map(|c| c.to_vec()).collect())
}

/// Reads a text file for evaluation, with errors naming it.
pub fn read_text(path: &Path) -> Result<String> {
    let t = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::missing(path, "text file"),
        std::io::ErrorKind::InvalidData => Error::bad(path, "text file is not valid UTF-8"),
        _ => Error::io(path, e),
    })?;
    if t.trim().is_empty() {
        return Err(Error::bad(path, "text file is empty"));
    }
    Ok(t)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Perplexity {
    pub perplexity: f64,
    pub mean_nll: f64,
    pub tokens_scored: usize,
    pub windows: usize,
    pub ctx: usize,
    pub seconds: f64,
}

/// Sum of next-token NLL over each row of `ids` (B, S): returns (sum, count).
pub fn nll_sum(model: &Model, ids: &Tensor) -> Result<(f64, usize)> {
    let (b, s) = ids.dims2()?;
    let logits = model.forward(ids, None)?; // (B,S,V) f32
    let logits = logits.narrow(1, 0, s - 1)?;
    let targets = ids.narrow(1, 1, s - 1)?;
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = lp.gather(&targets.unsqueeze(2)?.contiguous()?, 2)?.squeeze(2)?;
    let v: Vec<f32> = picked.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let sum: f64 = v.iter().map(|x| -(*x as f64)).sum();
    Ok((sum, b * (s - 1)))
}

/// Perplexity over `windows`, `batch` windows per forward pass.
pub fn perplexity(model: &Model, windows: &[Vec<u32>], batch: usize, progress: &dyn Progress) -> Result<Perplexity> {
    let t0 = Instant::now();
    let ctx = windows.first().map(|w| w.len()).unwrap_or(0);
    progress.start("perplexity", windows.len() as u64);
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in windows.chunks(batch.max(1)) {
        check(progress)?;
        let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (chunk.len(), ctx), &model.device)?;
        let (s, c) = nll_sum(model, &ids)?;
        total += s;
        count += c;
        progress.inc(chunk.len() as u64, "");
    }
    progress.finish();
    let mean = total / count.max(1) as f64;
    Ok(Perplexity { perplexity: mean.exp(), mean_nll: mean, tokens_scored: count, windows: windows.len(), ctx, seconds: t0.elapsed().as_secs_f64() })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Speed {
    /// Tokens per second of one forward pass over `prefill_tokens` tokens (batch 1).
    pub prefill_tokens_per_s: f64,
    pub prefill_tokens: usize,
    /// Tokens per second of greedy decoding with the KV cache (batch 1), after the prefill.
    pub decode_tokens_per_s: f64,
    pub decode_tokens: usize,
}

fn sync(device: &Device) -> Result<()> {
    device.synchronize()?;
    Ok(())
}

/// Greedy generation with the KV cache. Returns the new ids (prompt excluded).
pub fn generate(model: &Model, prompt: &[u32], max_tokens: usize, stop: Option<u32>) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt encodes to no tokens".into()));
    }
    let mut cache = model.new_cache();
    let ids = Tensor::new(prompt, &model.device)?.unsqueeze(0)?;
    let mut logits = model.forward(&ids, Some(&mut cache))?;
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let last = logits.narrow(1, logits.dim(1)? - 1, 1)?.flatten_all()?;
        let next = last.argmax(0)?.to_scalar::<u32>()?;
        out.push(next);
        if Some(next) == stop || cache.len() + 1 >= model.cfg.max_position_embeddings {
            break;
        }
        let ids = Tensor::new(&[next], &model.device)?.unsqueeze(0)?;
        logits = model.forward(&ids, Some(&mut cache))?;
    }
    Ok(out)
}

/// Measures prefill and decode speed on `prompt` (batch 1). Runs one warm-up first.
pub fn speed(model: &Model, prompt: &[u32], decode_tokens: usize) -> Result<Speed> {
    speed_batch(model, prompt, decode_tokens, 1)
}

/// [`speed`] with `batch` sequences decoded side by side (the prompt repeated); tokens/s
/// counts the tokens of every sequence.
pub fn speed_batch(model: &Model, prompt: &[u32], decode_tokens: usize, batch: usize) -> Result<Speed> {
    let batch = batch.max(1);
    let ids = Tensor::new(prompt, &model.device)?.unsqueeze(0)?.repeat((batch, 1))?;
    let next_ids = |logits: &Tensor| -> Result<Tensor> {
        let last = logits.narrow(1, logits.dim(1)? - 1, 1)?.squeeze(1)?.argmax(candle_core::D::Minus1)?;
        let v = last.to_vec1::<u32>()?; // the host sees every step's tokens, as a sampler would
        Ok(Tensor::new(v.as_slice(), &model.device)?.unsqueeze(1)?)
    };
    let _ = model.forward(&ids.narrow(1, 0, prompt.len().min(8))?, None)?; // warm-up
    sync(&model.device)?;
    let reps = 3;
    let t0 = Instant::now();
    for _ in 0..reps {
        let l = model.forward(&ids, None)?;
        let _ = l.narrow(1, 0, 1)?.flatten_all()?.to_vec1::<f32>()?;
    }
    sync(&model.device)?;
    let prefill = t0.elapsed().as_secs_f64() / reps as f64;
    // decode warm-up: the first single-token steps load kernels (CUDA) and grow buffers
    let mut warm = model.new_cache();
    let mut wl = model.forward(&ids.narrow(1, 0, prompt.len().min(8))?, Some(&mut warm))?;
    for _ in 0..4 {
        wl = model.forward(&next_ids(&wl)?, Some(&mut warm))?;
    }
    drop(warm);
    // decode: prefill the prompt, then time token-by-token steps
    let mut cache = model.new_cache();
    let mut logits = model.forward(&ids, Some(&mut cache))?;
    let room = model.cfg.max_position_embeddings.saturating_sub(prompt.len() + 1);
    let n = decode_tokens.min(room).max(1);
    sync(&model.device)?;
    let t1 = Instant::now();
    for _ in 0..n {
        logits = model.forward(&next_ids(&logits)?, Some(&mut cache))?;
    }
    sync(&model.device)?;
    let decode = t1.elapsed().as_secs_f64();
    Ok(Speed {
        prefill_tokens_per_s: (batch * prompt.len()) as f64 / prefill,
        prefill_tokens: prompt.len(),
        decode_tokens_per_s: (batch * n) as f64 / decode,
        decode_tokens: n,
    })
}
