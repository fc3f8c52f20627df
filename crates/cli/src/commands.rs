//! The commands beyond inspect/eval/generate. Each parses its flags into engine calls and prints.

use crate::progress::Bar;
use crate::{parse_dtype, CompressArgs, DemoArgs, PlanArgs};
use anyhow::{bail, Context, Result};
use compactor_core::checkpoint::Checkpoint;
use compactor_core::model::{linear_layers, Model};
use compactor_core::plan::{Allocation, Calibration, LayerSpec, Method, Plan, QuantSpec, Rule};
use compactor_core::progress::Progress;
use compactor_core::{eval, pipeline, run};
use compactor_decomp as dc;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub fn spectra(model: PathBuf, layers: Option<String>, json: bool, out: Option<PathBuf>, device: String) -> Result<()> {
    let dev = compactor_core::device(&device)?;
    let t0 = Instant::now();
    let ck = Checkpoint::open(&model)?;
    let pat = layers.as_deref().map(glob::Pattern::new).transpose().context("--layers is not a valid glob")?;
    let specs: Vec<_> = linear_layers(&ck.config).into_iter().filter(|s| pat.as_ref().map(|p| p.matches(&s.name)).unwrap_or(true)).collect();
    if specs.is_empty() {
        bail!("--layers {:?} matches no linear layer of {}", layers.unwrap_or_default(), model.display());
    }
    if let Some(o) = &out {
        std::fs::create_dir_all(o).with_context(|| format!("{}: cannot create", o.display()))?;
    }
    let bar = Bar::new(json);
    bar.start("spectra", specs.len() as u64);
    let mut all = Vec::new();
    let mut sink = |i: usize, sp: dc::Spectrum| -> compactor_core::Result<()> {
        let s = &specs[i];
        let entry = serde_json::json!({ "name": s.name, "layer": s.layer, "role": s.role, "spectrum": sp });
        if let Some(o) = &out {
            compactor_core::checkpoint::write_atomic(&o.join(format!("{}.json", s.name)), serde_json::to_string(&entry).expect("json").as_bytes())?;
        }
        all.push(entry);
        bar.inc(1, &s.name);
        Ok(())
    };
    if dev.is_cuda() {
        #[cfg(feature = "cuda")]
        {
            // Gram + eigenvalues (two-stage: GPU band reduction, CPU bulge chase) on several
            // streams, results in layer order
            let fit = |i: usize, d: &candle_core::Device| -> compactor_core::Result<dc::Spectrum> {
                let w = compactor_core::gpu::load_weight(&ck, &format!("{}.weight", specs[i].name), d)?;
                let (m, n) = w.dims2()?;
                Ok(dc::spectrum::spectrum_from_values(m, n, compactor_core::gpu::singular_values(&w)?))
            };
            let todo: Vec<usize> = (0..specs.len()).collect();
            compactor_core::gpu::for_each_ordered(&dev, compactor_core::gpu::spectra_streams(), &todo, &fit, &mut sink, &bar)?;
        }
    } else {
        for (i, s) in specs.iter().enumerate() {
            if bar.cancelled() {
                bail!("cancelled");
            }
            let (m, n, w) = ck.matrix_f32(&format!("{}.weight", s.name))?;
            sink(i, dc::spectrum(dc::from_row_major(m, n, &w).as_ref())?)?;
        }
    }
    bar.finish();
    eprintln!("spectra of {} matrices in {:.2} s on {device}", specs.len(), t0.elapsed().as_secs_f64());
    if let Some(o) = &out {
        let summary: Vec<_> = all.iter().map(|e| {
            let sp = &e["spectrum"];
            serde_json::json!({ "name": e["name"], "layer": e["layer"], "role": e["role"], "m": sp["m"], "n": sp["n"],
                "sigma_max": sp["singular_values"][0], "stable_rank": sp["stable_rank"], "entropy_effective_rank": sp["entropy_effective_rank"],
                "alpha": sp["alpha"], "alpha_xmin": sp["alpha_xmin"] })
        }).collect();
        compactor_core::checkpoint::write_atomic(&o.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    }
    if json {
        println!("{}", serde_json::to_string(&all)?);
        return Ok(());
    }
    println!("{:<40} {:>11} {:>10} {:>8} {:>8} {:>7} {:>10}", "layer", "shape", "σ_max", "stable", "eff.rank", "alpha", "xmin");
    for e in &all {
        let sp = &e["spectrum"];
        println!(
            "{:<40} {:>11} {:>10.4} {:>8.2} {:>8.1} {:>7} {:>10}",
            e["name"].as_str().unwrap_or(""),
            format!("{}x{}", sp["m"], sp["n"]),
            sp["singular_values"][0].as_f64().unwrap_or(0.0),
            sp["stable_rank"].as_f64().unwrap_or(0.0),
            sp["entropy_effective_rank"].as_f64().unwrap_or(0.0),
            sp["alpha"].as_f64().map(|a| format!("{a:.2}")).unwrap_or("-".into()),
            sp["alpha_xmin"].as_f64().map(|a| format!("{a:.3e}")).unwrap_or("-".into()),
        );
    }
    if let Some(o) = out {
        println!("wrote {} layer files and summary.json to {}", all.len(), o.display());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn factorize(model: PathBuf, layer: String, method: String, rank: Option<usize>, ratio: Option<f64>, tol: Option<f64>, quant: Option<String>, sites: Option<usize>, json: bool) -> Result<()> {
    let ck = Checkpoint::open(&model)?;
    let name = layer.trim_end_matches(".weight").to_string();
    let spec = linear_layers(&ck.config).into_iter().find(|s| s.name == name);
    let Some(spec) = spec else { bail!("{}: no linear layer named `{name}` (see `compactor inspect`)", model.display()) };
    let choice = match (rank, ratio, tol) {
        (Some(r), None, None) => dc::RankChoice::Rank(r),
        (None, Some(p), None) => dc::RankChoice::Ratio(p),
        (None, None, Some(t)) => dc::RankChoice::Tol(t),
        (None, None, None) => bail!("give one of --rank, --ratio, --tol"),
        _ => bail!("give only one of --rank, --ratio, --tol"),
    };
    let m = Method::parse(&method)?;
    let mut opts = dc::FactorizeOptions::new(pipeline::to_dc_method(m), choice);
    opts.quant = quant.as_deref().map(QuantSpec::parse).transpose()?.as_ref().map(pipeline::to_dc_quant);
    opts.sites = sites.map(|k| (dc::sites::balanced_factors(spec.out_features, k), dc::sites::balanced_factors(spec.in_features, k)));
    let (rows, cols, w) = ck.matrix_f32(&format!("{name}.weight"))?;
    let wm = dc::from_row_major(rows, cols, &w);
    let t0 = Instant::now();
    let (f, rep) = dc::factorize_report(wm.as_ref(), &opts)?;
    let secs = t0.elapsed().as_secs_f64();
    let err = f.rel_error(wm.as_ref());
    let meta = f.metadata();
    let out = serde_json::json!({
        "layer": name, "method": m.name(), "shape": [rows, cols], "ranks": f.ranks(),
        "row_dims": meta.row_dims, "col_dims": meta.col_dims,
        "params": f.params(), "dense_params": rows * cols, "param_ratio": f.params() as f64 / (rows * cols) as f64,
        "bytes": f.bytes(), "rel_error": err, "iterations": rep.iterations, "converged": rep.converged, "seconds": secs,
        "quant": opts.quant,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{name}  {rows}x{cols}  method {}", m.name());
        println!("  ranks       {:?}  (sites {:?} x {:?})", f.ranks(), meta.row_dims, meta.col_dims);
        println!("  params      {} of {} ({:.1}%)", f.params(), rows * cols, 100.0 * f.params() as f64 / (rows * cols) as f64);
        println!("  bytes       {} (f32 factors{})", f.bytes(), if opts.quant.is_some() { ", quantized" } else { "" });
        println!("  rel. error  {err:.6}");
        println!("  iterations  {}  converged {}", rep.iterations, rep.converged);
        println!("  time        {:.3} s", secs);
    }
    Ok(())
}

fn parse_allocation(s: &str) -> Result<Allocation> {
    Ok(match s {
        "uniform" => Allocation::Uniform,
        "energy" => Allocation::Energy,
        "sensitivity" => Allocation::Sensitivity,
        other => bail!("unknown allocation `{other}` (expected uniform, energy or sensitivity)"),
    })
}

fn parse_rule(s: &str) -> Result<Rule> {
    let (pat, what) = s.split_once('=').with_context(|| format!("rule `{s}`: expected GLOB=METHOD[:RATIO]"))?;
    if what == "dense" {
        return Ok(Rule { pattern: pat.into(), spec: LayerSpec { keep_dense: true, ..Default::default() } });
    }
    let (m, ratio) = match what.split_once(':') {
        Some((m, r)) => (m, Some(r.parse::<f64>().with_context(|| format!("rule `{s}`: bad ratio `{r}`"))?)),
        None => (what, None),
    };
    Ok(Rule { pattern: pat.into(), spec: LayerSpec { method: Some(Method::parse(m)?), ratio, ..Default::default() } })
}

#[allow(clippy::too_many_arguments)]
fn build_plan(method: &str, ratio: Option<f64>, quant: Option<&str>, allocation: &str, aa: bool, calib: Option<&Path>, calib_tokens: usize, rules: &[String]) -> Result<Plan> {
    let m = Method::parse(method)?;
    let mut plan = Plan::simple(m, ratio, quant.map(QuantSpec::parse).transpose()?);
    plan.allocation = parse_allocation(allocation)?;
    plan.activation_aware = aa;
    plan.calibration = calib.map(|p| Calibration::new(p, calib_tokens));
    plan.rules = rules.iter().map(|r| parse_rule(r)).collect::<Result<_>>()?;
    plan.validate()?;
    Ok(plan)
}

pub fn plan(a: PlanArgs) -> Result<()> {
    let bar = Bar::new(a.json);
    if let Some(p) = &a.preview {
        let plan = Plan::from_file(p)?;
        let rows = pipeline::preview(&a.model, &plan, true, &bar)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
            return Ok(());
        }
        println!("{:<40} {:>7} {:>6} {:>10} {:>10} {:>10} {:>9}  ranks", "layer", "method", "rank", "dense", "params", "bytes", "pred.err");
        for r in &rows {
            let ranks: Vec<String> = r.ranks.iter().map(|k| k.to_string()).collect();
            println!("{:<40} {:>7} {:>6} {:>10} {:>10} {:>10} {:>9}  {}", r.name, r.method, r.rank, r.dense_params, r.params, r.bytes, r.predicted_error.map(|e| format!("{e:.4}")).unwrap_or("-".into()), ranks.join(","));
        }
        let (d, p, b): (usize, usize, usize) = rows.iter().fold((0, 0, 0), |acc, r| (acc.0 + r.dense_params, acc.1 + r.params, acc.2 + r.bytes));
        println!("total: {p} of {d} linear parameters ({:.1}%), {b} bytes", 100.0 * p as f64 / d.max(1) as f64);
        return Ok(());
    }
    let plan = build_plan(&a.method, Some(a.ratio), a.quant.as_deref(), &a.allocation, a.activation_aware, a.calib.as_deref(), a.calib_tokens, &a.rules)?;
    let ck = Checkpoint::open(&a.model)?;
    plan.resolve(&linear_layers(&ck.config)).with_context(|| format!("plan does not fit {}", a.model.display()))?;
    let text = plan.to_json();
    match a.out {
        Some(o) => {
            compactor_core::checkpoint::write_atomic(&o, text.as_bytes())?;
            println!("wrote {}", o.display());
        }
        None => println!("{text}"),
    }
    Ok(())
}

pub fn compress(a: CompressArgs) -> Result<()> {
    let plan = match (&a.plan, &a.method) {
        (Some(p), None) => Plan::from_file(p)?,
        (None, Some(m)) => build_plan(m, Some(a.ratio.unwrap_or(0.5)), a.quant.as_deref(), &a.allocation, a.activation_aware, a.calib.as_deref(), a.calib_tokens, &[])?,
        (Some(_), Some(_)) => bail!("give either --plan or --method, not both"),
        (None, None) => bail!("give --plan plan.json or --method svd|tt|tucker|cp --ratio P"),
    };
    let dev = compactor_core::device(&a.device)?;
    let factor_dtype = match a.factor_dtype.as_deref() {
        None => None,
        Some("f32") => Some(candle_core::DType::F32),
        Some("bf16") => Some(candle_core::DType::BF16),
        Some("f16") => Some(candle_core::DType::F16),
        Some(o) => bail!("--factor-dtype: unknown dtype `{o}` (expected f32, bf16 or f16)"),
    };
    let opts = pipeline::CompressOptions { device: dev, shard_bytes: a.shard_mb << 20, factor_dtype, ..Default::default() };
    let t0 = Instant::now();
    let bar = Bar::new(a.json);
    let m = pipeline::compress(&a.model, &plan, &a.out, &opts, &bar)?;
    let secs = t0.elapsed().as_secs_f64();
    let rss = peak_rss_bytes();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "out": a.out, "seconds": secs, "peak_rss_bytes": rss, "totals": m.totals, "layers": m.layers.len() }))?);
    } else {
        println!("wrote {} in {:.1} s", a.out.display(), secs);
        println!("  linear params {} of {} ({:.1}% kept)", m.totals.linear_params, m.source.linear_params, 100.0 * m.totals.linear_param_ratio);
        println!("  bytes         {} of {} ({:.1}%)", m.totals.bytes, m.source.bytes, 100.0 * m.totals.byte_ratio);
        let mean = m.layers.iter().map(|l| l.rel_error).sum::<f64>() / m.layers.len().max(1) as f64;
        println!("  mean relative error over {} layers: {mean:.4}", m.layers.len());
        let act: Vec<f64> = m.layers.iter().filter_map(|l| l.act_error).collect();
        if !act.is_empty() {
            println!("  mean activation error (calibration inputs): {:.4}", act.iter().sum::<f64>() / act.len() as f64);
        }
        if let Some(r) = rss {
            println!("  peak RSS      {:.1} MiB", r as f64 / (1u64 << 20) as f64);
        }
    }
    Ok(())
}

/// Peak resident set size of this process (VmHWM), Linux only.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[allow(clippy::too_many_arguments)]
pub fn heal(dir: PathBuf, text: PathBuf, steps: usize, lr: f64, ctx: usize, batch: usize, norms: bool, device: String, out: PathBuf) -> Result<()> {
    let opts = compactor_core::heal::HealOptions { steps, lr, ctx, batch, train_norms: norms, device: compactor_core::device(&device)?, ..Default::default() };
    let (_, rep) = compactor_core::heal::heal(&dir, &text, &out, &opts, &Bar::new(false))?;
    let first = rep.losses.first().copied().unwrap_or(f64::NAN);
    let k = rep.losses.len().min(5).max(1);
    let last = rep.losses[rep.losses.len() - k..].iter().sum::<f64>() / k as f64;
    println!("healed {} → {}", dir.display(), out.display());
    println!("  loss {first:.4} → {last:.4} (mean of last {k}) over {} steps, {} trained parameters", rep.losses.len(), rep.trained_params);
    println!("  step time {:.3} s", rep.step_seconds);
    if let Some(d) = rep.dense_step_seconds {
        println!("  dense fine-tune step time {:.3} s (ratio dense/compressed {:.2}x)", d, d / rep.step_seconds);
    }
    Ok(())
}

/// The bundled assets: `assets/` in the current directory, else beside the source tree (where
/// cargo says it is when it runs us, else where this binary was built: a shared target
/// directory may hold a binary built from a checkout at another path).
fn assets_dir() -> Result<PathBuf> {
    let runtime = std::env::var_os("CARGO_MANIFEST_DIR").map(|d| PathBuf::from(d).join("../../assets"));
    for c in [Some(PathBuf::from("assets")), runtime, Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"))].into_iter().flatten() {
        if c.join("models/granite-tiny/config.json").is_file() {
            return Ok(c);
        }
    }
    bail!("bundled assets not found: run from the repository root (assets/models/granite-tiny)")
}

pub fn demo(a: DemoArgs) -> Result<()> {
    let assets = assets_dir()?;
    if a.gui {
        // the desktop app (src-tauri/): $COMPACTOR_APP, else `compactor-app` next to this executable
        let model = assets.join("models/granite-tiny");
        let model = model.canonicalize().unwrap_or(model);
        let app = match std::env::var_os("COMPACTOR_APP").filter(|v| !v.is_empty()) {
            Some(p) if Path::new(&p).is_file() => PathBuf::from(p),
            Some(p) => bail!("COMPACTOR_APP={} is not a file: build the desktop app with `scripts/demo.sh --gui`", Path::new(&p).display()),
            None => match std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("compactor-app"))).filter(|p| p.is_file()) {
                Some(p) => p,
                None => bail!("the desktop app is not built: run `scripts/demo.sh --gui` (it builds ui/ and src-tauri/, then opens the app on the bundled model)"),
            },
        };
        let mut cmd = std::process::Command::new(&app);
        cmd.arg("--open").arg(&model);
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            let e = cmd.exec();
            bail!("could not start the desktop app {}: {e}", app.display());
        }
        #[cfg(not(unix))]
        {
            let st = cmd.status().with_context(|| format!("could not start the desktop app {}", app.display()))?;
            if !st.success() {
                bail!("the desktop app {} exited with {st}", app.display());
            }
            return Ok(());
        }
    }
    let dev = compactor_core::device(&a.device)?;
    let o = run::DemoOptions {
        model: assets.join("models/granite-tiny"),
        eval_text: assets.join("gutenberg-heldout.txt"),
        calib_text: assets.join("calibration.txt"),
        out: a.out.clone(),
        ratio: a.ratio,
        heal_steps: a.heal_steps,
        eval: run::EvalOptions { max_windows: a.max_windows, device: dev, ..Default::default() },
    };
    let t0 = Instant::now();
    let s = run::demo(&o, &Bar::new(false))?;
    print_summary(&s);
    let (html, pdf) = (a.out.join("report.html"), a.out.join("report.pdf"));
    compactor_report::write_report(&a.out, Some(&html), Some(&pdf))?;
    println!("\nwrote {}, {} and {} in {:.0} s", a.out.join("run.json").display(), html.display(), pdf.display(), t0.elapsed().as_secs_f64());
    Ok(())
}

pub fn print_summary(s: &run::RunSummary) {
    let o = &s.original;
    println!("\n{} on {} (ctx {}, {} windows), {:.0}% of linear parameters kept", s.model, s.text, s.ctx, s.max_windows, 100.0 * s.param_ratio);
    println!("{:<14} {:>10} {:>8} {:>10} {:>10} {:>11} {:>8} {:>8}", "variant", "ppl", "Δppl%", "params", "bytes", "decode t/s", "speed×", "err");
    for v in std::iter::once(o).chain(s.variants.iter()) {
        println!(
            "{:<14} {:>10.3} {:>8.1} {:>10} {:>10} {:>11.1} {:>8.2} {:>8}",
            v.name,
            v.perplexity,
            100.0 * (v.perplexity / o.perplexity - 1.0),
            v.params,
            v.bytes,
            v.decode_tokens_per_s,
            v.decode_tokens_per_s / o.decode_tokens_per_s,
            v.mean_rel_error.map(|e| format!("{e:.3}")).unwrap_or("-".into())
        );
    }
}

#[allow(clippy::too_many_arguments)]
pub fn bench_decode(dense: PathBuf, compressed: Vec<PathBuf>, prompt_tokens: usize, tokens: usize, repeats: usize, device: String, dtype: String, batches: Vec<usize>, paths: Vec<String>) -> Result<()> {
    const PATHS: [&str; 3] = ["ops", "graph", "fused"];
    if let Some(p) = paths.iter().find(|p| !PATHS.contains(&p.as_str())) {
        anyhow::bail!("--paths: unknown path `{p}` (expected some of ops, graph, fused)");
    }
    let dev = compactor_core::device(&device)?;
    let dt = parse_dtype(&dtype)?;
    // on CUDA in bf16 a model can decode three ways: candle ops, the whole step as a CUDA graph,
    // and that graph with norms, residual adds and silu fused into the products
    let graph_ok = cfg!(feature = "cuda") && dev.is_cuda() && dt == candle_core::DType::BF16;
    let paths: Vec<&str> = PATHS.into_iter().filter(|n| paths.iter().any(|p| p == n) && (*n == "ops" || graph_ok)).collect();
    if paths.is_empty() {
        anyhow::bail!("--paths graph or fused needs a CUDA build, --device cuda and --dtype bf16");
    }
    #[cfg(feature = "cuda")]
    let use_path = |p: &str| {
        compactor_core::gpu_step::set_enabled(p != "ops");
        compactor_core::gpu_step::set_fuse_enabled(p == "fused");
    };
    let load = |p: &Path| -> Result<Model> {
        let t = Instant::now();
        let any = compactor_core::compressed::AnyModel::open(p)?;
        let m = Model::load(any.source(), dt, &dev)?;
        eprintln!("loaded {} in {:.1} s", p.display(), t.elapsed().as_secs_f64());
        Ok(m)
    };
    let base = load(&dense)?;
    let prompt: Vec<u32> = (0..prompt_tokens).map(|i| (i * 7 % base.cfg.vocab_size.min(1000)) as u32 + 1).collect();
    let mut models = vec![(dense.display().to_string(), base)];
    for c in &compressed {
        models.push((c.display().to_string(), load(c)?));
    }
    #[cfg(feature = "cuda")]
    if paths.contains(&"ops") {
        for &p in paths.iter().filter(|&&p| p != "ops") {
            use_path(p);
            for (name, m) in &models {
                for &batch in &batches {
                    match eval::step_agreement(m, &prompt, batch, 16)? {
                        Some((rel, same)) => println!("{} vs candle ops, {name}, batch {batch}, 16 steps: max |Δlogit|/max|logit| {rel:.2e}, same argmax {:.1}%", path_name(p), 100.0 * same),
                        None => println!("{} does not apply to {name}", path_name(p)),
                    }
                }
            }
        }
    }
    for &batch in &batches {
        for &p in &paths {
            #[cfg(feature = "cuda")]
            use_path(p);
            // interleave repeats so that drift in machine load hits every model alike; keep the best
            let mut best = vec![0f64; models.len()];
            for _ in 0..repeats.max(1) {
                for (i, (_, m)) in models.iter().enumerate() {
                    let s = eval::speed_batch(m, &prompt, tokens, batch)?;
                    best[i] = best[i].max(s.decode_tokens_per_s);
                }
            }
            println!("decode tokens/s, batch {batch}, {prompt_tokens}-token prompt, {tokens} tokens, best of {repeats}, device {device}, {dtype}, {}", path_name(p));
            #[cfg(feature = "cuda")]
            if p == "fused" && batch > compactor_core::gpu::FUSED_MAX_BATCH {
                println!("(the fused kinds run batches of up to {} on CUDA cores: batch {batch} runs the unfused step graph)", compactor_core::gpu::FUSED_MAX_BATCH);
            }
            #[cfg(feature = "cuda")]
            if p == "fused" && models.iter().any(|(_, m)| m.blocks.iter().flat_map(|b| b.linears.iter()).any(|l| matches!(l, compactor_core::linear::Linear::Mpo { .. }))) {
                println!("(models with MPO layers run the unfused step graph: the fused kinds take dense and low-rank products only)");
            }
            println!("{:<50} {:>12} {:>14} {:>10} {:>16} {:>8}", "model", "linear params", "decode tok/s", "vs dense", "weight GB/step", "GB/s");
            for (i, (name, m)) in models.iter().enumerate() {
                let lp: usize = m.blocks.iter().flat_map(|b| b.linears.iter()).map(|l| l.params()).sum();
                // bytes of weights one decode step streams: every linear factor plus the lm_head
                // (int8 weights: codes and scales, or the step's bf16 copies at cuBLAS batches)
                #[cfg(feature = "cuda")]
                let int8_copies = device == "cuda" && p != "ops" && compactor_core::gpu_step::int8_as_bf16(batch);
                #[cfg(not(feature = "cuda"))]
                let int8_copies = false;
                let layer_bytes = |l: &compactor_core::linear::Linear| -> usize {
                    match l {
                        compactor_core::linear::Linear::Int8 { .. } if int8_copies => 2 * l.params(),
                        _ => l.factors().iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum(),
                    }
                };
                let step_bytes: usize = m.blocks.iter().flat_map(|b| b.linears.iter()).chain(std::iter::once(&m.lm_head)).map(layer_bytes).sum();
                let steps_per_s = best[i] / batch as f64;
                println!("{:<50} {:>12} {:>14.1} {:>9.2}x {:>16.3} {:>8.0}", name, lp, best[i], best[i] / best[0], step_bytes as f64 / 1e9, step_bytes as f64 * steps_per_s / 1e9);
            }
        }
    }
    Ok(())
}

/// How `bench decode` names a decode path in its output.
fn path_name(p: &str) -> &'static str {
    match p {
        "ops" => "candle ops",
        "graph" => "step graph",
        _ => "fused step graph",
    }
}

/// Decode-shaped products over a stack of Granite-8B-shaped linear layers (no attention): the
/// dense stack against the low-rank stack at `ratio` of the parameters, batch 1 and 16, through
/// the decode GEMV kernel and through cuBLAS, in one run on one device.
pub fn bench_linear(device: String, layers: usize, ratio: f64, batches: Vec<usize>, repeats: usize) -> Result<()> {
    bench_linear_stack(device, layers, ratio, batches, repeats)
}

/// The eigensolvers behind the GPU spectra: `syevd` one matrix at a time against the batched
/// `syevBatched` and the two-stage solver (each stage timed), on the same Gram matrices (of
/// random Gaussian n × n matrices), same run; the largest difference of their eigenvalues
/// against `syevd` is printed with the times.
#[cfg(feature = "cuda")]
pub fn bench_eigen(n: usize, batches: Vec<usize>) -> Result<()> {
    use candle_core::{DType, Tensor, D};
    let dev = compactor_core::device("cuda")?;
    let k = batches.iter().copied().max().unwrap_or(1).max(1);
    let w = Tensor::randn(0f32, 1.0, (k, n, n), &dev)?;
    let g = w.matmul(&w.transpose(1, 2)?)?.contiguous()?; // k Gram matrices
    // warm-up (solver handle, kernels)
    compactor_core::gpu::eigh(&g.get(0)?, false)?;
    dev.synchronize()?;
    let t = Instant::now();
    let mut single = Vec::with_capacity(k);
    for i in 0..k {
        single.push(compactor_core::gpu::eigh(&g.get(i)?, false)?.0);
    }
    dev.synchronize()?;
    let per_single = t.elapsed().as_secs_f64() / k as f64;
    let single = Tensor::stack(&single, 0)?;
    println!("eigenvalues of {n}×{n} Gram matrices (f32), one syevd each: {:.1} ms per matrix", per_single * 1e3);
    for &b in &batches {
        let stack = g.narrow(0, 0, b)?.reshape((b * n, n))?;
        compactor_core::gpu::eigvals_batched(&stack, b)?; // warm-up
        dev.synchronize()?;
        let t = Instant::now();
        let vals = compactor_core::gpu::eigvals_batched(&stack, b)?;
        dev.synchronize()?;
        let per = t.elapsed().as_secs_f64() / b as f64;
        let base = single.narrow(0, 0, b)?;
        let scale = base.abs()?.max_keepdim(D::Minus1)?;
        let diff = ((&vals - &base)?.abs()?.broadcast_div(&scale)?).max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        println!("batched ({b} per call): {:.1} ms per matrix, {:.2}x syevd; max |Δλ|/λ_max {diff:.2e}", per * 1e3, per_single / per);
    }
    // eigenvectors, as the fits ask for them: all (syevd) against the top r only (syevdx), then
    // all of them in batched calls; ‖V_allᵀ V‖_F² / r is 1 where two sets span the same space
    let overlap = |a: &Tensor, b: &Tensor, r: usize| -> Result<f64> { Ok(a.matmul(&b.t()?)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? / r as f64) };
    let mut all_quarter = Vec::new(); // syevd's top n/4 of each matrix, for the batched rows
    let mut per_all_quarter = 0f64;
    for r in [n / 4, 3 * n / 8] {
        let mut per = [0f64; 2];
        let mut tops = Vec::new();
        for (i, partial) in [false, true].into_iter().enumerate() {
            compactor_core::gpu::top_eigenvectors(&g.get(0)?, r, partial)?; // warm-up
            dev.synchronize()?;
            let t = Instant::now();
            let mut v = Vec::with_capacity(k);
            for j in 0..k {
                v.push(compactor_core::gpu::top_eigenvectors(&g.get(j)?, r, partial)?);
            }
            dev.synchronize()?;
            per[i] = t.elapsed().as_secs_f64() / k as f64;
            tops.push(v);
        }
        let mut worst = 1f64;
        for (a, b) in tops[0].iter().zip(&tops[1]) {
            worst = worst.min(overlap(a, b, r)?);
        }
        println!(
            "top {r} eigenvectors of {n}×{n}: syevd (all) {:.1} ms, syevdx (top {r}) {:.1} ms per matrix: {:.2}x; subspace overlap ‖VᵀV'‖²/r ≥ {worst:.6}",
            per[0] * 1e3,
            per[1] * 1e3,
            per[0] / per[1]
        );
        // the fits' default: the filtered subspace (no eigensolver); what matters is the energy it
        // captures, i.e. the relative error sqrt((tr G − tr VGVᵀ)/tr G) of the fit it gives
        let diag = Tensor::arange_step(0u32, (n * n) as u32, (n + 1) as u32, g.device())?;
        let filter = |j: usize, seed: u64| -> Result<Tensor> {
            compactor_core::gpu_filter::top_subspace(&g.get(j)?, r, seed)?.ok_or_else(|| anyhow::anyhow!("the filter declined Gram {j} ({n}×{n}) at r = {r}"))
        };
        let seed = 7u64;
        filter(0, seed)?; // warm-up
        dev.synchronize()?;
        let t = Instant::now();
        let mut filtered = Vec::with_capacity(k);
        for j in 0..k {
            filtered.push(filter(j, seed + j as u64)?);
        }
        dev.synchronize()?;
        let per_filter = t.elapsed().as_secs_f64() / k as f64;
        let (mut worst_loss, mut exact_err) = (0f64, 0f64);
        for (j, v) in filtered.iter().enumerate() {
            let gj = g.get(j)?.to_dtype(DType::F64)?;
            let total = gj.flatten_all()?.index_select(&diag, 0)?.sum_all()?.to_scalar::<f64>()?;
            let rel_err = |v: &Tensor| -> Result<f64> {
                let v = v.to_dtype(DType::F64)?;
                let kept = (v.matmul(&gj)? * &v)?.sum_all()?.to_scalar::<f64>()?;
                Ok(((total - kept).max(0.0) / total).sqrt())
            };
            let exact = rel_err(&tops[1][j])?;
            worst_loss = worst_loss.max(rel_err(v)? - exact);
            exact_err = exact_err.max(exact);
        }
        println!(
            "filtered top-{r} subspace of {n}×{n}: {:.1} ms per matrix: {:.2}x syevdx; fit's relative error {exact_err:.4} (syevdx) + at most {worst_loss:.2e}",
            per_filter * 1e3,
            per[1] / per_filter
        );
        if r == n / 4 {
            all_quarter = tops.swap_remove(0);
            per_all_quarter = per[0];
        }
    }
    let r = n / 4;
    for &b in &batches {
        let stack = g.narrow(0, 0, b)?.reshape((b * n, n))?;
        compactor_core::gpu::eigh_batched(&stack, b)?; // warm-up
        dev.synchronize()?;
        let t = Instant::now();
        let (_, vecs) = compactor_core::gpu::eigh_batched(&stack, b)?;
        dev.synchronize()?;
        let per = t.elapsed().as_secs_f64() / b as f64;
        let mut worst = 1f64;
        for (i, s) in all_quarter.iter().enumerate().take(b) {
            worst = worst.min(overlap(s, &vecs.narrow(0, i * n + n - r, r)?, r)?);
        }
        println!(
            "with eigenvectors: syevd {:.1} ms, batched ({b} per call) {:.1} ms per matrix: {:.2}x; top-{r} subspace overlap ≥ {worst:.6}",
            per_all_quarter * 1e3,
            per * 1e3,
            per_all_quarter / per
        );
    }
    // two stages: dense → band on the GPU, band → tridiagonal → eigenvalues on the CPU
    let reference: Vec<Vec<f32>> = single.to_dtype(DType::F32)?.to_vec2()?;
    for band in [8usize, 16, 32] {
        compactor_core::gpu_band::band_reduce(&g.get(0)?, band)?; // warm-up
        dev.synchronize()?;
        let t = Instant::now();
        let mut bands = Vec::with_capacity(k);
        for i in 0..k {
            bands.push(compactor_core::gpu_band::band_reduce(&g.get(i)?, band)?.flatten_all()?.to_vec1::<f32>()?);
        }
        let gpu_s = t.elapsed().as_secs_f64() / k as f64;
        let candle_core::Device::Cuda(cdev) = &dev else { unreachable!("a CUDA device") };
        let (mut chase_s, mut bisect_s, mut ql_s) = (0f64, 0f64, 0f64);
        let (mut diff, mut diff_ql) = (0f64, 0f64);
        for (b, r) in bands.iter().zip(&reference) {
            let t = Instant::now();
            let (d, e) = dc::band::band_to_tridiagonal_f32(n, band, b)?;
            chase_s += t.elapsed().as_secs_f64() / k as f64;
            let t = Instant::now();
            let vals = compactor_core::gpu_band::tridiagonal_eigenvalues(cdev, &d, &e)?;
            bisect_s += t.elapsed().as_secs_f64() / k as f64;
            let t = Instant::now();
            let ql = dc::band::tridiagonal_eigenvalues(d, &e)?;
            ql_s += t.elapsed().as_secs_f64() / k as f64;
            let scale = r.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
            diff = vals.iter().zip(r).fold(diff, |m, (v, &x)| m.max((v - x as f64).abs() / scale));
            diff_ql = vals.iter().zip(&ql).fold(diff_ql, |m, (v, q)| m.max((v - q).abs() / scale));
        }
        println!(
            "two-stage, band {band}: GPU dense → band {:.1} ms, CPU bulge chase {:.1} ms (one thread), GPU bisection {:.1} ms (CPU QL instead {:.1} ms; max |Δλ|/λ_max between them {diff_ql:.1e}) per matrix; GPU stages {:.2}x syevd; max |Δλ|/λ_max against syevd {diff:.2e}",
            gpu_s * 1e3,
            chase_s * 1e3,
            bisect_s * 1e3,
            ql_s * 1e3,
            per_single / (gpu_s + bisect_s)
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn bench_eigen(_: usize, _: Vec<usize>) -> Result<()> {
    Err(anyhow::anyhow!("`bench eigen` measures the CUDA eigensolvers: rebuild with `--features cuda` (scripts/build-cuda.sh)"))
}

#[cfg(not(feature = "cuda"))]
fn bench_linear_stack(_: String, _: usize, _: f64, _: Vec<usize>, _: usize) -> Result<()> {
    Err(anyhow::anyhow!("`bench linear` measures the CUDA decode kernels: rebuild with `--features cuda` (scripts/build-cuda.sh)"))
}

/// The Granite-8B-shaped linear stack, dense against low rank, every kernel and schedule; the
/// outputs of each schedule are checked against cuBLAS's.
#[cfg(feature = "cuda")]
fn bench_linear_stack(device: String, layers: usize, ratio: f64, batches: Vec<usize>, repeats: usize) -> Result<()> {
    use compactor_core::decode_stack::{Schedule, Stack};
    let dev = compactor_core::device(&device)?;
    let sc = compactor_core::synth::SynthConfig::granite_8b();
    let (h, i, kv) = (sc.hidden, sc.intermediate, sc.kv_heads * (sc.hidden / sc.heads));
    let groups = [(h, vec![h, kv, kv]), (h, vec![h]), (h, vec![i, i]), (i, vec![h])];
    // ((graph, grouped, pdl), kernels): host launches one per product, then grouped launches,
    // CUDA graphs and programmatic dependent launches (custom kernels only)
    let plan: [((bool, bool, bool), &[u8]); 6] = [
        ((false, false, false), &[0, 1, 2]),
        ((false, false, true), &[1, 2]),
        ((false, true, false), &[0, 1]),
        ((true, false, false), &[0, 1]),
        ((true, true, false), &[0, 1, 2]),
        ((true, true, true), &[1, 2]),
    ];
    let names = ["cublas", "simt", "mma"];
    let mut scheds = Vec::new();
    for ((graph, grouped, pdl), modes) in plan {
        for &mode in modes {
            scheds.push((names[mode as usize], Schedule { mode, grouped, graph, pdl }));
        }
    }
    let label = |s: &Schedule| {
        let mut l = String::from(if s.graph { "graph" } else { "launches" });
        for (on, name) in [(s.grouped, ", grouped"), (s.pdl, ", PDL")] {
            if on {
                l.push_str(name);
            }
        }
        l
    };
    println!("{:>5} {:>23} {:>7} {:>9} {:>7} {:>9} {:>7} {:>8} {:>9}", "batch", "schedule", "kernel", "dense ms", "GB/s", "low ms", "GB/s", "speedup", "max diff");
    for &b in &batches {
        let dense = Stack::random(&dev, layers, &groups, None, b)?;
        let low = Stack::random(&dev, layers, &groups, Some(ratio), b)?;
        let (db, lb) = (dense.weight_bytes(), low.weight_bytes());
        println!("batch {b}: {layers} layers x 7 matrices (Granite-8B shapes), bf16; dense {:.2} GB, low rank at {ratio} of the parameters {:.2} GB per step", db as f64 / 1e9, lb as f64 / 1e9);
        // three interleaved rounds, best of each, so that clocks and warm-up favour no one
        let mut best = vec![(f64::MAX, f64::MAX); scheds.len()];
        let mut diff = vec![0f64; scheds.len()];
        for round in 0..3 {
            let mut reference: [Option<(Vec<f32>, Vec<f32>)>; 2] = [None, None];
            for (k, (_, sc)) in scheds.iter().enumerate() {
                let td = dense.time(*sc, repeats, 1)?;
                let tl = low.time(*sc, repeats, 1)?;
                best[k] = (best[k].0.min(td), best[k].1.min(tl));
                if round == 0 {
                    let out = (dense.outputs()?, low.outputs()?);
                    let slot = &mut reference[sc.grouped as usize];
                    match slot {
                        None => *slot = Some(out),
                        Some((rd, rl)) => {
                            let rel = |a: &[f32], r: &[f32]| {
                                let scale = r.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
                                a.iter().zip(r).fold(0f32, |m, (x, y)| m.max((x - y).abs())) as f64 / scale as f64
                            };
                            diff[k] = rel(&out.0, rd).max(rel(&out.1, rl));
                        }
                    }
                }
            }
        }
        for (k, (name, sc)) in scheds.iter().enumerate() {
            let (td, tl) = best[k];
            println!("{:>5} {:>23} {:>7} {:>9.3} {:>7.0} {:>9.3} {:>7.0} {:>7.2}x {:>9.1e}", b, label(sc), name, td * 1e3, db as f64 / td / 1e9, tl * 1e3, lb as f64 / tl / 1e9, td / tl, diff[k]);
        }
        let bd = best.iter().map(|t| t.0).fold(f64::MAX, f64::min);
        let bl = best.iter().map(|t| t.1).fold(f64::MAX, f64::min);
        println!("{:>5} {:>23} {:>7} {:>9.3} {:>7.0} {:>9.3} {:>7.0} {:>7.2}x  (best dense vs best low rank)", b, "best", "", bd * 1e3, db as f64 / bd / 1e9, bl * 1e3, lb as f64 / bl / 1e9, bd / bl);
    }
    Ok(())
}
