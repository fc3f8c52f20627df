//! `compactor`: the command line over the Compactor engine. It parses arguments, shows progress
//! and prints results; all the work is done by `compactor-core`.

mod commands;
mod progress;
mod render;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use compactor_core::{checkpoint::Checkpoint, eval, inventory, model::Model};
use progress::Bar;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "compactor", version, about = "Compress LLM checkpoints with tensor networks and measure what it costs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Architecture, dimensions, every tensor, linear layers by role, totals.
    Inspect {
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Perplexity (protocol in DESIGN.md), size and speed of a model.
    Eval(EvalArgs),
    /// Singular values and spectral metrics of every linear layer.
    Spectra {
        model: PathBuf,
        /// Glob on layer names, e.g. `model.layers.*.mlp.*`.
        #[arg(long)]
        layers: Option<String>,
        #[arg(long)]
        json: bool,
        /// Write one JSON per layer and summary.json here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// cpu, or cuda (Gram matrices and cuSOLVER eigenvalues on the GPU).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Factorize one layer and report rank(s), params, bytes, error and time.
    Factorize {
        model: PathBuf,
        #[arg(long)]
        layer: String,
        #[arg(long)]
        method: String,
        #[arg(long)]
        rank: Option<usize>,
        /// Fraction of the layer's parameters kept.
        #[arg(long)]
        ratio: Option<f64>,
        /// Target relative Frobenius error.
        #[arg(long)]
        tol: Option<f64>,
        #[arg(long)]
        quant: Option<String>,
        /// Tensor-network sites for tt/tucker/cp.
        #[arg(long)]
        sites: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Write a plan from flags, or preview one.
    Plan(PlanArgs),
    /// Run a plan (or a one-rule shorthand) and write the compressed model.
    Compress(CompressArgs),
    /// Write a plain dense Hugging Face checkpoint of a compressed model.
    ExportDense {
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Fine-tune the factors of a compressed model briefly; writes a new variant.
    Heal {
        dir: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 50)]
        steps: usize,
        #[arg(long, default_value_t = 1e-4)]
        lr: f64,
        #[arg(long, default_value_t = 128)]
        ctx: usize,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Train the RMSNorm weights too.
        #[arg(long)]
        norms: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// The main job on the bundled model: compress with every method, heal, evaluate, report.
    Demo(DemoArgs),
    /// Benchmarks that print a ratio against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Write the HTML and/or PDF report of a run directory (what `demo` writes).
    Report {
        run_dir: PathBuf,
        #[arg(long)]
        html: Option<PathBuf>,
        #[arg(long)]
        pdf: Option<PathBuf>,
    },
    /// Write a synthetic checkpoint with real shapes (granite-8b, llama-200mb) for benchmarks.
    Synth {
        #[arg(long, default_value = "llama-200mb")]
        preset: String,
        /// tokenizer.json to copy in.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Fewer (or more) decoder layers than the preset, same shapes.
        #[arg(long)]
        layers: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw a chart (spectra, heatmap, layer-map, curves) to a PNG with the wgpu renderer.
    Render(render::RenderArgs),
    /// Greedy text generation, for a human check.
    Generate {
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Error heatmap of a ROWS × COLS matrix: wgpu against a plain CPU loop, same image.
    Heatmap {
        #[arg(long, default_value_t = 12800)]
        rows: usize,
        #[arg(long, default_value_t = 4096)]
        cols: usize,
        #[arg(long, default_value_t = 1024)]
        width: u32,
        #[arg(long, default_value_t = 768)]
        height: u32,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Decode tokens/s of compressed models against the dense one, same run, same device.
    Decode {
        /// The dense model.
        dense: PathBuf,
        /// Compressed model directories.
        compressed: Vec<PathBuf>,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Sequences decoded side by side (a list: each is measured, the models load once).
        #[arg(long, value_delimiter = ',', default_value = "1")]
        batch: Vec<usize>,
        /// How decode steps run (CUDA, bf16): `ops` (candle ops), `graph` (the whole step as one
        /// CUDA graph), `fused` (that graph with norms, residual adds and silu·up inside the
        /// products; batch ≤ 8), any of them; each graph's logits are checked against ops'.
        #[arg(long, value_delimiter = ',', default_value = "ops,graph,fused")]
        paths: Vec<String>,
    },
    /// Decode-shaped products over a Granite-8B-shaped stack of linear layers: dense against
    /// low-rank, decode GEMV kernel against cuBLAS, batch 1 and 16.
    Linear {
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long, default_value_t = 40)]
        layers: usize,
        #[arg(long, default_value_t = 0.5)]
        ratio: f64,
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        batch: Vec<usize>,
        #[arg(long, default_value_t = 20)]
        repeats: usize,
    },
    /// Eigensolvers of symmetric N×N Gram matrices on the GPU, same matrices, same run: values
    /// by one `syevd` per matrix against one batched call (`syevBatched`) and the two-stage
    /// solver (GPU band reduction, CPU bulge chase, GPU bisection; b = 8, 16, 32); eigenvectors
    /// by `syevd` (all) against `syevdx` (the top N/4, 3N/8) and the batched call.
    Eigen {
        #[arg(long, default_value_t = 4096)]
        n: usize,
        /// matrices per batched call
        #[arg(long, value_delimiter = ',', default_value = "4,8")]
        batch: Vec<usize>,
    },
}

#[derive(clap::Args)]
struct PlanArgs {
    /// The model the plan is for.
    model: PathBuf,
    /// Preview this plan instead of writing one.
    #[arg(long)]
    preview: Option<PathBuf>,
    #[arg(long, default_value = "svd")]
    method: String,
    /// Fraction of the linear-layer parameters kept.
    #[arg(long, default_value_t = 0.5)]
    ratio: f64,
    #[arg(long)]
    quant: Option<String>,
    /// uniform, energy or sensitivity.
    #[arg(long, default_value = "uniform")]
    allocation: String,
    #[arg(long)]
    activation_aware: bool,
    /// Calibration text (activation-aware fits, sensitivity allocation).
    #[arg(long)]
    calib: Option<PathBuf>,
    #[arg(long, default_value_t = 8192)]
    calib_tokens: usize,
    /// Extra rules `GLOB=METHOD[:RATIO]` or `GLOB=dense`, tried in order.
    #[arg(long = "rule")]
    rules: Vec<String>,
    #[arg(long)]
    json: bool,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CompressArgs {
    model: PathBuf,
    #[arg(long)]
    plan: Option<PathBuf>,
    #[arg(long)]
    method: Option<String>,
    #[arg(long)]
    ratio: Option<f64>,
    #[arg(long)]
    quant: Option<String>,
    #[arg(long)]
    activation_aware: bool,
    #[arg(long)]
    calib: Option<PathBuf>,
    #[arg(long, default_value_t = 8192)]
    calib_tokens: usize,
    #[arg(long, default_value = "uniform")]
    allocation: String,
    /// Where calibration passes and the svd/tt fits run (cpu, cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output shard size in MiB.
    #[arg(long, default_value_t = 1024)]
    shard_mb: usize,
    /// Storage dtype of the factors (f32, bf16, f16); default: the source's dtype.
    #[arg(long)]
    factor_dtype: Option<String>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct DemoArgs {
    #[arg(long, default_value = "out/demo")]
    out: PathBuf,
    /// Open the desktop app on the bundled model instead.
    #[arg(long)]
    gui: bool,
    /// Fraction of linear-layer parameters kept by every variant.
    #[arg(long, default_value_t = 0.5)]
    ratio: f64,
    #[arg(long, default_value_t = 200)]
    max_windows: usize,
    #[arg(long, default_value_t = 60)]
    heal_steps: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args)]
struct EvalArgs {
    model: PathBuf,
    /// Text to score.
    #[arg(long)]
    text: PathBuf,
    #[arg(long, default_value_t = 256)]
    ctx: usize,
    #[arg(long, default_value_t = 200)]
    max_windows: usize,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Tokens generated to measure decode speed.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    #[arg(long)]
    json: bool,
}

pub(crate) fn parse_dtype(s: &str) -> Result<candle_core::DType> {
    Ok(match s {
        "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        "f16" => candle_core::DType::F16,
        other => anyhow::bail!("unknown dtype `{other}` (expected f32, bf16 or f16)"),
    })
}

fn main() {
    large_buffers_back_to_the_os();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// glibc serves buffers up to 32 MiB from its heap once a large one has been freed (its dynamic
/// mmap threshold), and keeps that heap: compressing layer after layer then holds the freed
/// working copies of earlier layers. Buffers above 4 MiB are mapped and unmapped instead, so
/// the peak stays near one layer's (measured on a 188 MiB checkpoint: 213 → 141 MiB).
fn large_buffers_back_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect { model, json } => inspect(model, json),
        Cmd::Eval(a) => eval_cmd(a),
        Cmd::Spectra { model, layers, json, out, device } => commands::spectra(model, layers, json, out, device),
        Cmd::Factorize { model, layer, method, rank, ratio, tol, quant, sites, json } => {
            commands::factorize(model, layer, method, rank, ratio, tol, quant, sites, json)
        }
        Cmd::Plan(a) => commands::plan(a),
        Cmd::Compress(a) => commands::compress(a),
        Cmd::ExportDense { dir, out } => {
            compactor_core::pipeline::export_dense(&dir, &out, &Bar::new(false))?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Cmd::Heal { dir, text, steps, lr, ctx, batch, norms, device, out } => commands::heal(dir, text, steps, lr, ctx, batch, norms, device, out),
        Cmd::Demo(a) => commands::demo(a),
        Cmd::Report { run_dir, html, pdf } => {
            if html.is_none() && pdf.is_none() {
                anyhow::bail!("give --html FILE and/or --pdf FILE");
            }
            compactor_report::write_report(&run_dir, html.as_deref(), pdf.as_deref())?;
            for p in [html, pdf].into_iter().flatten() {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
        Cmd::Synth { preset, tokenizer, device, layers, out } => {
            let mut sc = match preset.as_str() {
                "granite-8b" => compactor_core::synth::SynthConfig::granite_8b(),
                "llama-200mb" => compactor_core::synth::SynthConfig::llama_200mb(),
                other => anyhow::bail!("unknown preset `{other}` (granite-8b, llama-200mb)"),
            };
            if let Some(l) = layers {
                anyhow::ensure!(l > 0, "--layers must be at least 1");
                sc.layers = l;
            }
            compactor_core::synth::write_synthetic(&out, &sc, tokenizer.as_deref(), &compactor_core::device(&device)?, &Bar::new(false))?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Cmd::Render(a) => render::render(a),
        Cmd::Bench { what } => match what {
            BenchCmd::Heatmap { rows, cols, width, height, runs } => render::bench_heatmap(rows, cols, width, height, runs),
            BenchCmd::Linear { device, layers, ratio, batch, repeats } => commands::bench_linear(device, layers, ratio, batch, repeats),
            BenchCmd::Eigen { n, batch } => commands::bench_eigen(n, batch),
            BenchCmd::Decode { dense, compressed, prompt_tokens, tokens, repeats, device, dtype, batch, paths } => {
                commands::bench_decode(dense, compressed, prompt_tokens, tokens, repeats, device, dtype, batch, paths)
            }
        },
        Cmd::Generate { model, prompt, max_tokens, device, dtype } => {
            let any = compactor_core::compressed::AnyModel::open(&model)?;
            let tok = any.checkpoint().tokenizer()?;
            let dev = compactor_core::device(&device)?;
            let m = Model::load(any.source(), parse_dtype(&dtype)?, &dev)?;
            let ids = tok.encode(&prompt)?;
            let out = eval::generate(&m, &ids, max_tokens, None)?;
            println!("{}{}", prompt, tok.decode(&out)?);
            Ok(())
        }
    }
}

fn inspect(model: PathBuf, json: bool) -> Result<()> {
    let ck = Checkpoint::open(&model)?;
    let inv = inventory::inventory(&ck);
    if json {
        println!("{}", serde_json::to_string_pretty(&inv)?);
        return Ok(());
    }
    let c = &inv.config;
    println!("{}  ({:?})", inv.dir, c.arch);
    println!(
        "  layers {}  hidden {}  intermediate {}  heads {} (kv {})  head_dim {}  vocab {}  tied head {}",
        c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size, c.tie_word_embeddings
    );
    println!("\n{:<56} {:>16} {:>6} {:>12} {:>12}", "tensor", "shape", "dtype", "params", "bytes");
    for t in &inv.tensors {
        println!("{:<56} {:>16} {:>6} {:>12} {:>12}", t.name, format!("{:?}", t.shape), t.dtype, t.params, t.bytes);
    }
    println!("\nlinear layers by role");
    for g in &inv.linear_groups {
        println!("  {:<5} x{:<3} {:>5}x{:<5} params {:>12}  bytes {:>12}", g.role.name(), g.count, g.shape[0], g.shape[1], g.params, g.bytes);
    }
    println!(
        "\ntotal params {}  bytes {}  (linear layers: {} params, {:.1}%)",
        inv.total_params,
        inv.total_bytes,
        inv.linear_params,
        100.0 * inv.linear_params as f64 / inv.total_params.max(1) as f64
    );
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    let t0 = Instant::now();
    let any = compactor_core::compressed::AnyModel::open(&a.model)?;
    let ck = any.checkpoint();
    let tok = ck.tokenizer()?;
    let dev = compactor_core::device(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    let model = Model::load(any.source(), dtype, &dev)?;
    let load_s = t0.elapsed().as_secs_f64();
    let text = eval::read_text(&a.text)?;
    let ids = tok.encode(&text)?;
    let wins = eval::windows(&ids, a.ctx, a.max_windows, &a.text)?;
    let ppl = eval::perplexity(&model, &wins, a.batch, &Bar::new(a.json)).context("perplexity")?;
    let speed = eval::speed(&model, &wins[0], a.decode_tokens)?;
    let out = json!({
        "model": a.model.display().to_string(),
        "text": a.text.display().to_string(),
        "device": a.device,
        "dtype": a.dtype,
        "perplexity": ppl.perplexity,
        "mean_nll": ppl.mean_nll,
        "tokens_scored": ppl.tokens_scored,
        "windows": ppl.windows,
        "ctx": ppl.ctx,
        "params": model.params(),
        "bytes_on_disk": ck.file_bytes(),
        "load_seconds": load_s,
        "eval_seconds": ppl.seconds,
        "prefill_tokens_per_s": speed.prefill_tokens_per_s,
        "decode_tokens_per_s": speed.decode_tokens_per_s,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("perplexity      {:.4}  ({} tokens scored in {} windows of {})", ppl.perplexity, ppl.tokens_scored, ppl.windows, ppl.ctx);
        println!("params          {}", model.params());
        println!("bytes on disk   {}", ck.file_bytes());
        println!("load            {:.2} s", load_s);
        println!("prefill         {:.1} tokens/s", speed.prefill_tokens_per_s);
        println!("decode          {:.1} tokens/s (greedy, KV cache, batch 1)", speed.decode_tokens_per_s);
    }
    Ok(())
}
