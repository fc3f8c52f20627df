//! `compactor render`: the renderer's four charts as PNG files, from a chart JSON (the
//! compactor-viz input structs) or straight from a model / compressed variants.

use anyhow::{bail, Context, Result};
use compactor_core::checkpoint::Checkpoint;
use compactor_core::compressed::Manifest;
use compactor_core::model::{linear_layers, LinearSpec};
use compactor_core::plan::Method;
use compactor_core::pipeline;
use compactor_decomp as dc;
use compactor_viz::{ColorKey, Curves, HeatmapInput, LayerMap, Line, Reduce, Renderer, Series, SpectraChart, CHART_KINDS};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct RenderArgs {
    /// spectra | heatmap | layer-map | curves
    pub kind: String,
    /// Chart input as JSON (the compactor-viz struct of that kind); or use --model / --variants.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Model directory to draw from (spectra, heatmap, curves).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// spectra: glob on layer names (default: every linear layer).
    #[arg(long)]
    pub layers: Option<String>,
    /// heatmap, curves: the layer, e.g. model.layers.0.mlp.down_proj.
    #[arg(long)]
    pub layer: Option<String>,
    /// heatmap: method of Ŵ (svd, tt, tucker, cp).
    #[arg(long, default_value = "svd")]
    pub method: String,
    /// heatmap: fraction of the layer's parameters kept; spectra: marks the rank it gives.
    #[arg(long)]
    pub ratio: Option<f64>,
    /// heatmap: max or rms per pixel block.
    #[arg(long, default_value = "max")]
    pub reduce: String,
    /// layer-map: compressed model directories (their compactor.json), one column each.
    #[arg(long, num_args = 1..)]
    pub variants: Vec<PathBuf>,
    /// heatmap, curves: tensor-network sites for tt/tucker/cp (default: automatic).
    #[arg(long)]
    pub sites: Option<usize>,
    /// spectra: color by depth or role.
    #[arg(long, default_value = "depth")]
    pub color: String,
    #[arg(long, default_value_t = 1200)]
    pub width: u32,
    #[arg(long, default_value_t = 700)]
    pub height: u32,
    /// Pixel scale (2 = HiDPI).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f32,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn render(a: RenderArgs) -> Result<()> {
    if !CHART_KINDS.contains(&a.kind.as_str()) {
        bail!("unknown chart `{}`: expected one of {}", a.kind, CHART_KINDS.join(", "));
    }
    let r = Renderer::new()?;
    let img = match (&a.input, a.kind.as_str()) {
        (Some(p), kind) => {
            let json = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read chart input", p.display()))?;
            r.render_json(kind, &json, a.width, a.height, a.scale).with_context(|| format!("{}: bad {kind} chart input", p.display()))?
        }
        (None, "spectra") => r.render_spectra(&spectra(&a)?, a.width, a.height, a.scale)?,
        (None, "heatmap") => r.render_heatmap(&heatmap(&a)?, a.width, a.height, a.scale)?,
        (None, "curves") => r.render_curves(&curves(&a)?, a.width, a.height, a.scale)?,
        (None, _) => r.render_layer_map(&layer_map(&a.variants)?, a.width, a.height, a.scale)?,
    };
    img.save_png(&a.out).with_context(|| format!("{}: cannot write PNG", a.out.display()))?;
    println!("wrote {} ({} x {} px, adapter {})", a.out.display(), img.width, img.height, r.adapter_name());
    Ok(())
}

fn model_of(a: &RenderArgs) -> Result<(PathBuf, Checkpoint)> {
    let Some(m) = &a.model else { bail!("`render {}` needs --model DIR (or --input chart.json)", a.kind) };
    Ok((m.clone(), Checkpoint::open(m)?))
}

fn one_layer(a: &RenderArgs, ck: &Checkpoint, model: &Path) -> Result<LinearSpec> {
    let Some(name) = &a.layer else { bail!("`render {}` needs --layer NAME (see `compactor inspect`)", a.kind) };
    let name = name.trim_end_matches(".weight");
    linear_layers(&ck.config)
        .into_iter()
        .find(|s| s.name == name)
        .with_context(|| format!("{}: no linear layer named `{name}` (see `compactor inspect`)", model.display()))
}

fn spectra(a: &RenderArgs) -> Result<SpectraChart> {
    let (model, ck) = model_of(a)?;
    let pat = a.layers.as_deref().map(glob::Pattern::new).transpose().context("--layers is not a valid glob")?;
    let specs: Vec<_> = linear_layers(&ck.config).into_iter().filter(|s| pat.as_ref().map(|p| p.matches(&s.name)).unwrap_or(true)).collect();
    if specs.is_empty() {
        bail!("--layers {:?} matches no linear layer of {}", a.layers.clone().unwrap_or_default(), model.display());
    }
    let depth = ck.config.num_hidden_layers.max(2) - 1;
    let mut series = Vec::new();
    for s in &specs {
        let (m, n, w) = ck.matrix_f32(&format!("{}.weight", s.name))?;
        let sv = dc::singular_values(dc::from_row_major(m, n, &w).as_ref())?;
        let color_key = match a.color.as_str() {
            "role" => ColorKey::Role(s.role.name().to_string()),
            "depth" => ColorKey::Depth(s.layer as f32 / depth as f32),
            o => bail!("--color: `{o}` is not depth or role"),
        };
        let mark_rank = a.ratio.map(|p| dc::rank_for_ratio(m, n, dc::Method::Svd, p, None).unwrap_or(1));
        series.push(Series { label: format!("{} {}", s.layer, s.role.name()), values: sv.iter().map(|v| *v as f32).collect(), color_key, mark_rank });
    }
    Ok(SpectraChart { title: format!("Singular values — {}", model.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()), series })
}

fn heatmap(a: &RenderArgs) -> Result<HeatmapInput> {
    let (model, ck) = model_of(a)?;
    let spec = one_layer(a, &ck, &model)?;
    let ratio = a.ratio.unwrap_or(0.5);
    let method = Method::parse(&a.method)?;
    let (m, n, w) = ck.matrix_f32(&format!("{}.weight", spec.name))?;
    let wm = dc::from_row_major(m, n, &w);
    let f = dc::factorize(wm.as_ref(), &fit_options(a, pipeline::to_dc_method(method), dc::RankChoice::Ratio(ratio), m, n))?;
    let approx = dc::to_row_major(&f.reconstruct());
    let reduce = match a.reduce.as_str() {
        "max" => Reduce::Max,
        "rms" => Reduce::Rms,
        o => bail!("--reduce: `{o}` is not max or rms"),
    };
    Ok(HeatmapInput {
        title: format!("|W − Ŵ| of {} — {} at {:.0}% of parameters, rel. error {:.3}", spec.name, method.name(), 100.0 * ratio, f.rel_error(wm.as_ref())),
        rows: m,
        cols: n,
        data: w,
        approx: Some(approx),
        reduce,
        colormap: Default::default(),
        vmax: None,
    })
}

fn curves(a: &RenderArgs) -> Result<Curves> {
    let (model, ck) = model_of(a)?;
    let spec = one_layer(a, &ck, &model)?;
    let (m, n, w) = ck.matrix_f32(&format!("{}.weight", spec.name))?;
    let methods = [dc::Method::Svd, dc::Method::Tt, dc::Method::Tucker, dc::Method::Cp];
    let base = fit_options(a, dc::Method::Tt, dc::RankChoice::Rank(1), m, n);
    let pts = dc::error_curve_with(dc::from_row_major(m, n, &w).as_ref(), &methods, &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], &base)?;
    let lines = methods
        .iter()
        .map(|me| Line { label: format!("{me:?}").to_lowercase(), points: pts.iter().filter(|p| p.method == *me).map(|p| (p.params as f64 / (m * n) as f64, p.rel_error)).collect() })
        .filter(|l| !l.points.is_empty())
        .collect();
    Ok(Curves { title: format!("Error vs parameters — {}", spec.name), x_label: "parameters kept (fraction)".into(), y_label: "relative error ‖W − Ŵ‖/‖W‖".into(), lines, log_y: true })
}

/// Fit settings of the drawn factorizations: the pipeline's iteration budget for the iterative
/// methods (Tucker HOOI, CP-ALS) and `--sites` for the tensor networks.
fn fit_options(a: &RenderArgs, method: dc::Method, rank: dc::RankChoice, m: usize, n: usize) -> dc::FactorizeOptions {
    let mut o = dc::FactorizeOptions::new(method, rank);
    o.max_iters = 25;
    o.tol = 1e-4;
    if method != dc::Method::Svd {
        o.sites = a.sites.map(|k| (dc::sites::balanced_factors(m, k), dc::sites::balanced_factors(n, k)));
    }
    o
}

fn layer_map(variants: &[PathBuf]) -> Result<LayerMap> {
    if variants.is_empty() {
        bail!("`render layer-map` needs --variants DIR… (compressed models) or --input chart.json");
    }
    let mut cols = Vec::new();
    let mut manifests = Vec::new();
    for v in variants {
        let p = v.join(compactor_core::compressed::MANIFEST);
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read (is {} a compressed model?)", p.display(), v.display()))?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| format!("{}: not a Compactor manifest", p.display()))?;
        cols.push(v.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| v.display().to_string()));
        manifests.push(m);
    }
    let mut rows: Vec<String> = manifests.iter().flat_map(|m| m.layers.iter().map(|l| l.name.clone())).collect();
    rows.sort_by_key(|n| (layer_index(n), n.clone()));
    rows.dedup();
    let values = rows
        .iter()
        .flat_map(|r| manifests.iter().map(move |m| m.layers.iter().find(|l| &l.name == r).map(|l| l.rel_error).unwrap_or(f64::NAN)))
        .collect();
    let short = rows.iter().map(|r| r.trim_start_matches("model.layers.").replace(".self_attn.", " ").replace(".mlp.", " ").replace("_proj", "")).collect();
    Ok(LayerMap { title: "Relative error per layer and variant".into(), row_labels: short, col_labels: cols, values, log_color: false, colormap: Default::default() })
}

fn layer_index(name: &str) -> usize {
    name.split('.').find_map(|p| p.parse().ok()).unwrap_or(usize::MAX)
}

/// `compactor bench heatmap`: a ROWS × COLS error matrix to a W × H color-mapped heatmap, on
/// wgpu (compute-shader reduction + color map) against the plain CPU loop that makes the same
/// image; prints both times, the ratio and how many pixels differ.
pub fn bench_heatmap(rows: usize, cols: usize, w: u32, h: u32, runs: usize) -> Result<()> {
    use compactor_viz::{heatmap_image_cpu, Colormap, ReduceMode};
    use std::time::Instant;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let noise = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let (r, c) = ((i / cols) as f32, (i % cols) as f32);
            noise * 0.02 * (1.2 + (r / 700.0).sin() * (c / 300.0).cos())
        })
        .collect();
    let t = Instant::now();
    let r = Renderer::new()?;
    println!("adapter: {} (device in {:.2} s); matrix {rows} x {cols} f32, image {w} x {h}, median of {runs} runs; CPU loop single-threaded", r.adapter_name(), t.elapsed().as_secs_f64());
    for mode in [ReduceMode::Max, ReduceMode::Rms] {
        let g0 = r.render_heatmap_image(rows, cols, &data, w, h, mode, Colormap::Viridis)?;
        let c0 = heatmap_image_cpu(rows, cols, &data, w, h, mode, Colormap::Viridis);
        let differing = g0.pixels.chunks(4).zip(c0.pixels.chunks(4)).filter(|(a, b)| a != b).count();
        let (mut tg, mut tc) = (Vec::new(), Vec::new());
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            std::hint::black_box(r.render_heatmap_image(rows, cols, &data, w, h, mode, Colormap::Viridis)?);
            tg.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            std::hint::black_box(heatmap_image_cpu(rows, cols, &data, w, h, mode, Colormap::Viridis));
            tc.push(t.elapsed().as_secs_f64());
        }
        let (g, c) = (median(tg), median(tc));
        println!("{mode:?}: wgpu {:.1} ms | CPU loop {:.1} ms | CPU/wgpu = {:.2}x | pixels differing {differing} of {}", g * 1e3, c * 1e3, c / g, w * h);
    }
    // the whole chart as the report draws it: axes, color bar, text
    let input = HeatmapInput { title: "bench".into(), rows, cols, data, approx: None, reduce: Reduce::Max, colormap: Colormap::Viridis, vmax: None };
    r.render_heatmap(&input, w, h, 1.0)?;
    let mut tf = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        std::hint::black_box(r.render_heatmap(&input, w, h, 1.0)?);
        tf.push(t.elapsed().as_secs_f64());
    }
    println!("full chart (axes, color bar, text) {w} x {h} @1x: {:.1} ms", median(tf) * 1e3);
    Ok(())
}
