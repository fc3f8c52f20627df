//! Evaluation: perplexity by the project's protocol, and speed.
//!
//! Perplexity protocol (shared with the reference numbers of the fixtures): encode the text
//! without special tokens, cut the ids into non-overlapping windows of `ctx` tokens from the
//! start (drop the tail), keep the first `max_windows`; perplexity = exp(mean NLL) over the
//! ctx−1 next-token predictions of every window.

use crate::error::{Error, Result};
use crate::model::{KvCache, Model};
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

/// The token-by-token steps of greedy decoding after a prompt: candle ops with a growing KV
/// cache, or — on CUDA in bf16, where the model fits it — the whole step as one replayed CUDA
/// graph (`gpu_step`).
pub enum Stepper<'a> {
    Ops(&'a Model, KvCache),
    #[cfg(feature = "cuda")]
    Graph(Box<crate::gpu_step::Decoder>),
}

impl<'a> Stepper<'a> {
    /// Prefills `ids` (B, S) and returns the stepper (room for `max_new` more positions) and the
    /// prompt's logits (B, S, V).
    pub fn start(model: &'a Model, ids: &Tensor, max_new: usize) -> Result<(Self, Tensor)> {
        let mut cache = model.new_cache();
        let logits = model.forward(ids, Some(&mut cache))?;
        #[cfg(feature = "cuda")]
        {
            let (b, s) = ids.dims2()?;
            let max_len = (s + max_new).min(model.cfg.max_position_embeddings);
            if let Some(d) = crate::gpu_step::Decoder::new(model, &cache, b, max_len)? {
                return Ok((Stepper::Graph(Box::new(d)), logits));
            }
        }
        let _ = max_new;
        Ok((Stepper::Ops(model, cache), logits))
    }

    /// Logits (B, 1, V) after one more token per sequence (`ids`, B of them).
    pub fn step(&mut self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Stepper::Ops(model, cache) => {
                let t = Tensor::new(ids, &model.device)?.unsqueeze(1)?;
                model.forward(&t, Some(cache))
            }
            #[cfg(feature = "cuda")]
            Stepper::Graph(d) => Ok(d.step(ids)?.unsqueeze(1)?),
        }
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        match self {
            Stepper::Ops(_, c) => c.len(),
            #[cfg(feature = "cuda")]
            Stepper::Graph(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `ops` or `graph`, for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Stepper::Ops(..) => "ops",
            #[cfg(feature = "cuda")]
            Stepper::Graph(_) => "graph",
        }
    }
}

/// The greedy next token of each sequence from logits (B, S, V): the argmax at the last position.
fn next_tokens(logits: &Tensor) -> Result<Vec<u32>> {
    let last = logits.narrow(1, logits.dim(1)? - 1, 1)?.squeeze(1)?.argmax(D::Minus1)?;
    Ok(last.to_vec1::<u32>()?)
}

/// Greedy generation with the KV cache. Returns the new ids (prompt excluded).
pub fn generate(model: &Model, prompt: &[u32], max_tokens: usize, stop: Option<u32>) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt encodes to no tokens".into()));
    }
    let ids = Tensor::new(prompt, &model.device)?.unsqueeze(0)?;
    let (mut stepper, mut logits) = Stepper::start(model, &ids, max_tokens)?;
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let next = next_tokens(&logits)?[0];
        out.push(next);
        if Some(next) == stop || stepper.len() + 1 >= model.cfg.max_position_embeddings || out.len() == max_tokens {
            break;
        }
        logits = stepper.step(&[next])?;
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
    let (mut warm, mut wl) = Stepper::start(model, &ids.narrow(1, 0, prompt.len().min(8))?, 4)?;
    for _ in 0..4 {
        wl = warm.step(&next_tokens(&wl)?)?;
    }
    drop(warm);
    // decode: prefill the prompt, then time token-by-token steps; the host sees every step's
    // tokens, as a sampler would
    let room = model.cfg.max_position_embeddings.saturating_sub(prompt.len() + 2);
    let n = decode_tokens.min(room).max(1);
    let (mut stepper, mut logits) = Stepper::start(model, &ids, n + 1)?;
    // the step graph is captured at its first step: take that step out of the timing
    logits = stepper.step(&next_tokens(&logits)?)?;
    sync(&model.device)?;
    let t1 = Instant::now();
    for _ in 0..n {
        logits = stepper.step(&next_tokens(&logits)?)?;
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

/// How far the step graph's logits are from candle ops' (CUDA, bf16): both steppers are fed the
/// ops path's greedy tokens for `steps` steps after `prompt` (batch `batch`). The ops path runs
/// its products as cuBLAS GEMMs, so the reference shares no product kernel with the graph.
/// Returns the largest |Δlogit| relative to the largest |logit| and the fraction of (step,
/// sequence) pairs whose argmax agrees; `None` where the graph does not apply to the model.
#[cfg(feature = "cuda")]
pub fn step_agreement(model: &Model, prompt: &[u32], batch: usize, steps: usize) -> Result<Option<(f64, f64)>> {
    use crate::gpu_step::{enabled, set_enabled};
    let ids = Tensor::new(prompt, &model.device)?.unsqueeze(0)?.repeat((batch.max(1), 1))?;
    let (was, kernel) = (enabled(), crate::gpu::gemv_setting());
    // the reference: candle ops with cuBLAS products (the kernel setting restored after each use)
    fn on_cublas<T>(kernel: u8, f: impl FnOnce() -> T) -> T {
        crate::linear::set_decode_kernel(0);
        let r = f();
        crate::linear::set_decode_kernel(kernel);
        r
    }
    set_enabled(false);
    let ops = on_cublas(kernel, || Stepper::start(model, &ids, steps + 1));
    set_enabled(true);
    let graph = Stepper::start(model, &ids, steps + 1);
    set_enabled(was);
    let ((mut ops, mut lo), (mut graph, _)) = (ops?, graph?);
    if !matches!(graph, Stepper::Graph(_)) {
        return Ok(None);
    }
    let (mut worst, mut same, mut total) = (0f64, 0usize, 0usize);
    for _ in 0..steps {
        let tokens = next_tokens(&lo)?;
        lo = on_cublas(kernel, || ops.step(&tokens))?;
        let lg = graph.step(&tokens)?;
        let diff = (&lo - &lg)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        let scale = lo.abs()?.max_all()?.to_scalar::<f32>()?.max(f32::MIN_POSITIVE) as f64;
        worst = worst.max(diff / scale);
        let (a, b) = (next_tokens(&lo)?, next_tokens(&lg)?);
        same += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        total += a.len();
    }
    Ok(Some((worst, same as f64 / total.max(1) as f64)))
}
