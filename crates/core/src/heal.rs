//! Healing: a short fine-tune of a compressed model's factors (and, if asked, its norms) with
//! AdamW on candle's autograd, everything else frozen. Records the loss curve and the step time,
//! and can time the same fine-tune of the dense source for comparison.

use crate::compressed::{factor_tensors, CompressedModel, HealRecord, Manifest};
use crate::error::{Error, Result};
use crate::eval;
use crate::linear::Linear;
use crate::model::{Model, Role};
use crate::pipeline::{commit_dir, copy_side_files, write_manifest};
use crate::progress::{check, Progress};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use compactor_decomp::{Factor, Factorization};
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct HealOptions {
    pub steps: usize,
    pub lr: f64,
    pub ctx: usize,
    pub batch: usize,
    pub train_norms: bool,
    pub device: Device,
    /// Also time this many steps of the same fine-tune of the dense source (all linear weights).
    pub dense_reference_steps: usize,
}

impl Default for HealOptions {
    fn default() -> Self {
        HealOptions { steps: 50, lr: 1e-4, ctx: 128, batch: 4, train_norms: false, device: Device::Cpu, dense_reference_steps: 3 }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HealReport {
    pub losses: Vec<f64>,
    /// Mean seconds per step (first step excluded).
    pub step_seconds: f64,
    /// The same for the dense source, if it could be timed.
    pub dense_step_seconds: Option<f64>,
    pub trained_params: usize,
}

/// Makes every tensor of `tensors` a trainable variable in place; returns the variables.
fn make_vars(tensors: Vec<&mut Tensor>) -> Result<Vec<Var>> {
    let mut vars = Vec::new();
    for t in tensors {
        let v = Var::from_tensor(t)?;
        *t = v.as_tensor().clone();
        vars.push(v);
    }
    Ok(vars)
}

/// Marks the trainable tensors of `model`: factors of compressed layers (all linears if
/// `all_linears`), norms if `norms`.
fn trainable(model: &mut Model, compressed: &dyn Fn(&str) -> bool, all_linears: bool, norms: bool) -> Result<Vec<Var>> {
    let mut vars = Vec::new();
    for (l, block) in model.blocks.iter_mut().enumerate() {
        for (i, lin) in block.linears.iter_mut().enumerate() {
            let name = format!("model.layers.{l}.{}", Role::ALL[i].module());
            if all_linears || compressed(&name) {
                vars.extend(make_vars(lin.factors_mut())?);
            }
        }
        if norms {
            vars.extend(make_vars(vec![&mut block.input_norm, &mut block.post_norm])?);
        }
    }
    Ok(vars)
}

fn batches(windows: &[Vec<u32>], batch: usize, step: usize, device: &Device) -> Result<Tensor> {
    let n = windows.len();
    let ctx = windows[0].len();
    let ids: Vec<u32> = (0..batch).flat_map(|b| windows[(step * batch + b) % n].clone()).collect();
    Ok(Tensor::from_vec(ids, (batch, ctx), device)?)
}

fn loss_of(model: &Model, ids: &Tensor) -> Result<Tensor> {
    let (b, s) = ids.dims2()?;
    let logits = model.forward(&ids.narrow(1, 0, s - 1)?, None)?;
    let v = logits.dim(2)?;
    let targets = ids.narrow(1, 1, s - 1)?.reshape(b * (s - 1))?;
    Ok(candle_nn::loss::cross_entropy(&logits.reshape((b * (s - 1), v))?, &targets)?)
}

/// Runs `steps` AdamW steps; returns (losses, mean step seconds excluding the first).
fn train(model: &Model, vars: Vec<Var>, windows: &[Vec<u32>], opts: &HealOptions, steps: usize, progress: &dyn Progress, stage: &str) -> Result<(Vec<f64>, f64)> {
    let mut opt = AdamW::new(vars, ParamsAdamW { lr: opts.lr, weight_decay: 0.0, ..Default::default() })?;
    let mut losses = Vec::new();
    let mut times = Vec::new();
    progress.start(stage, steps as u64);
    for step in 0..steps {
        check(progress)?;
        let t0 = Instant::now();
        let ids = batches(windows, opts.batch, step, &opts.device)?;
        let loss = loss_of(model, &ids)?;
        opt.backward_step(&loss)?;
        let l = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        times.push(t0.elapsed().as_secs_f64());
        losses.push(l);
        progress.inc(1, &format!("loss {l:.4}"));
    }
    progress.finish();
    let t = if times.len() > 1 { times[1..].iter().sum::<f64>() / (times.len() - 1) as f64 } else { times.iter().sum() };
    Ok((losses, t))
}

/// `f` with its factors replaced by `values` (in [`Linear::factors`] order), re-quantized if it was.
fn with_values(f: &Factorization, values: &[Tensor]) -> Result<Factorization> {
    let v = |i: usize, shape: &[usize]| -> Result<Factor> { Ok(Factor::new(shape.to_vec(), values[i].to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)) };
    let quant = f.quant_spec();
    let g = match f {
        Factorization::Dense { m, n, weight } => Factorization::Dense { m: *m, n: *n, weight: v(0, &weight.shape)? },
        Factorization::LowRank { m, n, a, b } => Factorization::LowRank { m: *m, n: *n, a: v(0, &a.shape)?, b: v(1, &b.shape)? },
        Factorization::Mpo { m, n, row_dims, col_dims, cores } => Factorization::Mpo {
            m: *m,
            n: *n,
            row_dims: row_dims.clone(),
            col_dims: col_dims.clone(),
            cores: cores.iter().enumerate().map(|(i, c)| v(i, &c.shape)).collect::<Result<_>>()?,
        },
        Factorization::Tucker { m, n, row_dims, col_dims, core, factors } => Factorization::Tucker {
            m: *m,
            n: *n,
            row_dims: row_dims.clone(),
            col_dims: col_dims.clone(),
            core: v(0, &core.shape)?,
            factors: factors.iter().enumerate().map(|(i, c)| v(i + 1, &c.shape)).collect::<Result<_>>()?,
        },
        Factorization::Cp { m, n, row_dims, col_dims, weights: _, factors } => Factorization::Cp {
            m: *m,
            n: *n,
            row_dims: row_dims.clone(),
            col_dims: col_dims.clone(),
            weights: values[0].to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            factors: factors.iter().enumerate().map(|(i, c)| v(i + 1, &c.shape)).collect::<Result<_>>()?,
        },
    };
    Ok(match quant {
        Some(q) => g.quantized(&q)?,
        None => g,
    })
}

/// Heals the compressed model at `dir` on `text` and writes the result to `out`.
pub fn heal(dir: &Path, text: &Path, out: &Path, opts: &HealOptions, progress: &dyn Progress) -> Result<(Manifest, HealReport)> {
    let cm = CompressedModel::open(dir)?;
    let tok = cm.ckpt.tokenizer()?;
    let ids = tok.encode(&eval::read_text(text)?)?;
    let windows = eval::windows(&ids, opts.ctx, usize::MAX, text)?;
    let mut model = Model::load(&cm, DType::F32, &opts.device)?;
    model.differentiable = true;
    let is_compressed = |name: &str| cm.manifest.layer(name).is_some();
    let vars = trainable(&mut model, &is_compressed, false, opts.train_norms)?;
    if vars.is_empty() {
        return Err(Error::Invalid(format!("{}: no compressed layer to heal", dir.display())));
    }
    let trained_params: usize = vars.iter().map(|v| v.elem_count()).sum();
    let (losses, step_seconds) = train(&model, vars, &windows, opts, opts.steps, progress, "heal")?;

    // the same fine-tune of the dense source, for the step-time comparison
    let src = Path::new(&cm.manifest.source.dir);
    let dense_step_seconds = if opts.dense_reference_steps > 0 && src.is_dir() {
        let ck = crate::Checkpoint::open(src)?;
        let mut dense = Model::load(&ck, DType::F32, &opts.device)?;
        dense.differentiable = true;
        let vars = trainable(&mut dense, &|_| true, true, opts.train_norms)?;
        Some(train(&dense, vars, &windows, opts, opts.dense_reference_steps + 1, progress, "dense ref")?.1)
    } else {
        None
    };

    // write the healed variant
    if out.canonicalize().ok() == dir.canonicalize().ok() {
        return Err(Error::Invalid("heal --out must differ from the input directory".into()));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(".{}.partial-{}", out.file_name().and_then(|n| n.to_str()).unwrap_or("out"), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = (|| -> Result<Manifest> {
        let factor_dtype = if cm.manifest.factor_dtype == "BF16" { DType::BF16 } else { DType::F32 };
        let mut writer = crate::compressed::ShardWriter::new(&tmp, 1 << 30);
        let mut trained: std::collections::BTreeMap<String, Tensor> = Default::default();
        for (l, block) in model.blocks.iter().enumerate() {
            trained.insert(format!("model.layers.{l}.input_layernorm.weight"), block.input_norm.clone());
            trained.insert(format!("model.layers.{l}.post_attention_layernorm.weight"), block.post_norm.clone());
        }
        for info in cm.ckpt.tensors() {
            if info.name.contains(crate::compressed::FACTOR_INFIX) {
                continue;
            }
            match (opts.train_norms, trained.get(&info.name)) {
                (true, Some(t)) => {
                    let dt = crate::checkpoint::float_dtype(&info.dtype).unwrap_or(DType::F32);
                    writer.add(crate::checkpoint::OwnedTensor::from_tensor(&info.name, t, dt)?)?
                }
                _ => writer.add(cm.ckpt.copy_tensor(&info.name)?)?,
            }
        }
        let mut manifest = cm.manifest.clone();
        for entry in manifest.layers.iter_mut() {
            let f = cm.factorization(&entry.name)?.expect("manifest layer has factors");
            let (l, role) = (entry.layer, entry.role);
            let lin: &Linear = model.blocks[l].linear(role);
            let values: Vec<Tensor> = lin.factors().into_iter().cloned().collect();
            let g = with_values(&f, &values)?;
            for t in factor_tensors(&entry.name, &g, factor_dtype) {
                writer.add(t)?;
            }
        }
        writer.finish()?;
        copy_side_files(dir, &tmp)?;
        manifest.heal = Some(HealRecord {
            steps: opts.steps,
            lr: opts.lr,
            text: text.display().to_string(),
            losses: losses.clone(),
            step_seconds,
            trained_tensors: model.blocks.len(),
        });
        manifest.notes.insert("healed_from".into(), serde_json::json!(dir.display().to_string()));
        if let Some(d) = dense_step_seconds {
            manifest.notes.insert("dense_step_seconds".into(), serde_json::json!(d));
        }
        write_manifest(&tmp, &manifest)?;
        Ok(manifest)
    })();
    let manifest = match written {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    commit_dir(&tmp, out)?;
    Ok((manifest, HealReport { losses, step_seconds, dense_step_seconds, trained_params }))
}
