//! The app's commands. Each one checks its input, hands the work to the engine on the blocking
//! thread pool and returns plain serde data (errors as sentences, naming the file at fault).

use crate::images::{self, ChartImage};
use crate::progress::{ChannelProgress, JobEvent};
use compactor_core::checkpoint::Checkpoint;
use compactor_core::inventory::{inventory, Inventory};
use compactor_core::model::{linear_layers, LinearSpec};
use compactor_core::pipeline::{self, CompressOptions};
use compactor_core::plan::Plan;
use compactor_core::progress::{CancelFlag, NoProgress, Progress};
use compactor_core::run::{self, EvalOptions, RunSummary, VariantResult};
use compactor_decomp as dc;
use compactor_viz::{ColorKey, Colormap, Curves, HeatmapInput, Line, Reduce, Renderer, Series, SpectraChart};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tauri::ipc::Channel;
use tauri::{AppHandle, Manager, State};
use tauri_plugin_dialog::DialogExt;

type CmdResult<T> = Result<T, String>;

fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

// ---------------------------------------------------------------------------------------------
// state

/// An opened checkpoint and what was computed on it.
pub struct Loaded {
    pub dir: PathBuf,
    pub ck: Checkpoint,
    pub specs: Vec<LinearSpec>,
    pub inventory: Inventory,
    pub spectra: Mutex<HashMap<String, Arc<dc::Spectrum>>>,
}

/// The last heatmap drawn, kept for the hover readout.
struct HeatCache {
    m: usize,
    n: usize,
    w: Vec<f32>,
    what: Vec<f32>,
    /// Plot area size in pixels (one pixel = one block of the reduction).
    plot_w: usize,
    plot_h: usize,
}

/// The run directory of this session: every variant run since the model was opened, with the
/// original evaluated once.
struct Session {
    model_dir: PathBuf,
    run_dir: PathBuf,
    text: PathBuf,
    ctx: usize,
    max_windows: usize,
    original: Option<VariantResult>,
    variants: Vec<VariantResult>,
    ratio: f64,
}

pub struct AppState {
    startup: Option<PathBuf>,
    model: Mutex<Option<Arc<Loaded>>>,
    renderer: Mutex<Option<Arc<Renderer>>>,
    jobs: Mutex<HashMap<String, Arc<CancelFlag>>>,
    heat: Mutex<Option<Arc<HeatCache>>>,
    session: Mutex<Option<Session>>,
}

impl AppState {
    pub fn new(startup: Option<PathBuf>) -> Self {
        AppState {
            startup,
            model: Mutex::new(None),
            renderer: Mutex::new(None),
            jobs: Mutex::new(HashMap::new()),
            heat: Mutex::new(None),
            session: Mutex::new(None),
        }
    }

    fn loaded(&self) -> CmdResult<Arc<Loaded>> {
        self.model.lock().unwrap().clone().ok_or_else(|| "No model is open: open one first (Open, on the left).".to_string())
    }

    /// The renderer, created on first use (a GPU, or Mesa's lavapipe without one).
    fn renderer(&self) -> CmdResult<Arc<Renderer>> {
        let mut r = self.renderer.lock().unwrap();
        if let Some(r) = r.as_ref() {
            return Ok(r.clone());
        }
        let made = std::panic::catch_unwind(Renderer::new)
            .map_err(|_| "the chart renderer crashed while starting".to_string())?
            .map_err(|e| format!("Charts cannot be drawn: {e}"))?;
        let made = Arc::new(made);
        *r = Some(made.clone());
        Ok(made)
    }

    fn job(&self, id: &str) -> Arc<CancelFlag> {
        let flag = Arc::new(CancelFlag::default());
        self.jobs.lock().unwrap().insert(id.to_string(), flag.clone());
        flag
    }

    fn end_job(&self, id: &str) {
        self.jobs.lock().unwrap().remove(id);
    }
}

/// Runs `f` on the blocking pool with a progress reporter for job `id`.
async fn blocking_job<T: Send + 'static>(
    state: &AppState,
    id: &str,
    channel: Channel<JobEvent>,
    f: impl FnOnce(&ChannelProgress) -> CmdResult<T> + Send + 'static,
) -> CmdResult<T> {
    let flag = state.job(id);
    let out = tauri::async_runtime::spawn_blocking(move || {
        let p = ChannelProgress::new(channel, flag);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&p))).unwrap_or_else(|e| Err(format!("internal error: {}", panic_text(&e))))
    })
    .await
    .map_err(|e| format!("the background task failed: {e}"))?;
    state.end_job(id);
    out.map_err(|e| if e == "cancelled" { "Cancelled.".to_string() } else { e })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> CmdResult<T> + Send + 'static) -> CmdResult<T> {
    tauri::async_runtime::spawn_blocking(move || std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|e| Err(format!("internal error: {}", panic_text(&e)))))
        .await
        .map_err(|e| format!("the background task failed: {e}"))?
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "panic".into())
}

// ---------------------------------------------------------------------------------------------
// paths

/// The repository's `assets/` (bundled model and texts): `COMPACTOR_ASSETS`, the working
/// directory, the executable's ancestors, or the source tree this binary was built from.
fn assets_dir() -> Option<PathBuf> {
    let ok = |p: &Path| p.join("models/granite-tiny/config.json").is_file();
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("COMPACTOR_ASSETS") {
        cands.push(PathBuf::from(d));
    }
    if let Ok(cwd) = std::env::current_dir() {
        cands.extend(cwd.ancestors().map(|a| a.join("assets")));
    }
    if let Ok(exe) = std::env::current_exe() {
        cands.extend(exe.ancestors().skip(1).map(|a| a.join("assets")));
    }
    cands.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets"));
    cands.into_iter().find(|p| ok(p)).map(|p| p.canonicalize().unwrap_or(p))
}

fn config_dir(app: &AppHandle) -> PathBuf {
    app.path().app_config_dir().unwrap_or_else(|_| std::env::temp_dir().join("compactor-app"))
}

fn default_runs_root(app: &AppHandle) -> PathBuf {
    if let Some(d) = std::env::var_os("COMPACTOR_APP_RUNS") {
        return PathBuf::from(d);
    }
    app.path().app_data_dir().map(|d| d.join("runs")).unwrap_or_else(|_| std::env::temp_dir().join("compactor-runs"))
}

fn recent_file(app: &AppHandle) -> PathBuf {
    config_dir(app).join("recent.json")
}

fn read_recent(app: &AppHandle) -> Vec<String> {
    std::fs::read_to_string(recent_file(app)).ok().and_then(|t| serde_json::from_str::<Vec<String>>(&t).ok()).unwrap_or_default()
}

fn push_recent(app: &AppHandle, dir: &Path) {
    let d = dir.display().to_string();
    let mut r = read_recent(app);
    r.retain(|x| x != &d);
    r.insert(0, d);
    r.truncate(8);
    let f = recent_file(app);
    if let Some(p) = f.parent() {
        let _ = std::fs::create_dir_all(p);
    }
    let _ = std::fs::write(&f, serde_json::to_string_pretty(&r).unwrap_or_default());
}

/// A path typed by the user: `~` expanded, must not be empty.
fn user_path(p: &str) -> CmdResult<PathBuf> {
    let p = p.trim();
    if p.is_empty() {
        return Err("Give a path (or use Browse…).".into());
    }
    if let Some(rest) = p.strip_prefix("~/") {
        if let Some(home) = std::env::var_os("HOME") {
            return Ok(PathBuf::from(home).join(rest));
        }
    }
    Ok(PathBuf::from(p))
}

fn short_name(layer: &str) -> String {
    layer.strip_prefix("model.").unwrap_or(layer).replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

// ---------------------------------------------------------------------------------------------
// start, dialogs

#[derive(Serialize)]
pub struct AppInfo {
    version: String,
    bundled_model: Option<String>,
    startup_model: Option<String>,
    recent: Vec<String>,
    runs_root: String,
    eval_text: Option<String>,
    calib_text: Option<String>,
}

#[tauri::command]
pub fn app_info(app: AppHandle, state: State<'_, AppState>) -> AppInfo {
    let assets = assets_dir();
    let s = |p: PathBuf| p.display().to_string();
    AppInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        bundled_model: assets.as_ref().map(|a| s(a.join("models/granite-tiny"))),
        startup_model: state.startup.as_ref().map(|p| s(p.clone())),
        recent: read_recent(&app).into_iter().filter(|d| Path::new(d).join("config.json").is_file()).collect(),
        runs_root: s(default_runs_root(&app)),
        eval_text: assets.as_ref().map(|a| a.join("gutenberg-heldout.txt")).filter(|p| p.is_file()).map(s),
        calib_text: assets.as_ref().map(|a| a.join("calibration.txt")).filter(|p| p.is_file()).map(s),
    }
}

/// Opens a native dialog (from Rust, so the page needs no dialog permission). `kind`:
/// `model_dir`, `runs_dir`, `plan_open`, `plan_save`, `report_save`, `text_open`.
#[tauri::command]
pub async fn pick_path(app: AppHandle, kind: String) -> CmdResult<Option<String>> {
    blocking(move || {
        let d = app.dialog().file();
        let picked = match kind.as_str() {
            "model_dir" => d.set_title("Open a model directory (config.json + *.safetensors)").blocking_pick_folder(),
            "runs_dir" => d.set_title("Where to write compressed models").blocking_pick_folder(),
            "plan_open" => d.set_title("Load a plan").add_filter("Compactor plan", &["json"]).blocking_pick_file(),
            "plan_save" => d.set_title("Save the plan").add_filter("Compactor plan", &["json"]).set_file_name("plan.json").blocking_save_file(),
            "report_save" => d.set_title("Save the report (HTML, and a PDF next to it)").add_filter("HTML report", &["html"]).set_file_name("compactor-report.html").blocking_save_file(),
            "text_open" => d.set_title("Evaluation text").add_filter("Text", &["txt"]).blocking_pick_file(),
            other => return Err(format!("unknown dialog `{other}`")),
        };
        Ok(picked.and_then(|p| p.into_path().ok()).map(|p| p.display().to_string()))
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// open

#[derive(Serialize)]
pub struct ModelInfo {
    dir: String,
    name: String,
    inventory: Inventory,
    layers: Vec<LayerBasic>,
    /// Tensor-network sites the app suggests for this model (2 for small matrices).
    suggested_sites: usize,
}

#[derive(Serialize, Clone)]
pub struct LayerBasic {
    name: String,
    short: String,
    layer: usize,
    role: String,
    shape: [usize; 2],
    params: usize,
    bytes: usize,
}

#[tauri::command]
pub async fn open_model(app: AppHandle, state: State<'_, AppState>, path: String) -> CmdResult<ModelInfo> {
    let dir = user_path(&path)?;
    let dir = dir.canonicalize().unwrap_or(dir);
    let d2 = dir.clone();
    let loaded = blocking(move || {
        let ck = Checkpoint::open(&d2).map_err(|e| format!("Cannot open this model: {e}"))?;
        let specs: Vec<LinearSpec> = linear_layers(&ck.config).into_iter().filter(|s| ck.contains(&format!("{}.weight", s.name))).collect();
        if specs.is_empty() {
            return Err(format!("{}: no linear layers of a Llama-family block found in the checkpoint", d2.display()));
        }
        let inv = inventory(&ck);
        Ok(Loaded { dir: d2, ck, specs, inventory: inv, spectra: Mutex::new(HashMap::new()) })
    })
    .await?;
    let layers = layer_basics(&loaded);
    let small = loaded.specs.iter().all(|s| s.out_features.min(s.in_features) <= 1024);
    let info = ModelInfo {
        dir: dir.display().to_string(),
        name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string()),
        inventory: loaded.inventory.clone(),
        layers,
        suggested_sites: if small { 2 } else { 4 },
    };
    *state.model.lock().unwrap() = Some(Arc::new(loaded));
    *state.heat.lock().unwrap() = None;
    *state.session.lock().unwrap() = None;
    push_recent(&app, &dir);
    Ok(info)
}

fn layer_basics(l: &Loaded) -> Vec<LayerBasic> {
    l.specs
        .iter()
        .map(|s| LayerBasic {
            name: s.name.clone(),
            short: short_name(&s.name),
            layer: s.layer,
            role: s.role.name().to_string(),
            shape: [s.out_features, s.in_features],
            params: s.params(),
            bytes: l.ck.info(&format!("{}.weight", s.name)).map(|i| i.nbytes()).unwrap_or(0),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// spectra

fn spectrum_of(l: &Loaded, name: &str) -> CmdResult<Arc<dc::Spectrum>> {
    if let Some(s) = l.spectra.lock().unwrap().get(name) {
        return Ok(s.clone());
    }
    let w = format!("{name}.weight");
    let (m, n, data) = l.ck.matrix_f32(&w).map_err(msg)?;
    let s = dc::spectrum(dc::from_row_major(m, n, &data).as_ref()).map_err(|e| format!("{name}: {e}"))?;
    drop(data);
    l.ck.release(&w);
    let s = Arc::new(s);
    l.spectra.lock().unwrap().insert(name.to_string(), s.clone());
    Ok(s)
}

#[derive(Serialize)]
pub struct SpectrumRow {
    name: String,
    stable_rank: f64,
    effective_rank: f64,
    alpha: Option<f64>,
    sigma_max: f64,
    /// log10(σ_i / σ_max) clipped to [-3, 0], at up to 48 evenly spaced i: the thumbnail.
    thumb: Vec<f32>,
}

fn spectrum_row(name: &str, s: &dc::Spectrum) -> SpectrumRow {
    let v = &s.singular_values;
    let smax = v.first().copied().unwrap_or(0.0).max(f64::MIN_POSITIVE);
    let k = v.len().min(48).max(1);
    let thumb = (0..k)
        .map(|j| {
            let i = if k == 1 { 0 } else { j * (v.len() - 1) / (k - 1) };
            let x = v.get(i).copied().unwrap_or(0.0) / smax;
            (x.max(1e-3).log10()) as f32
        })
        .collect();
    SpectrumRow { name: name.to_string(), stable_rank: s.stable_rank, effective_rank: s.entropy_effective_rank, alpha: s.alpha, sigma_max: smax, thumb }
}

/// Spectra of every linear layer (cached per model), streamed row by row.
#[tauri::command]
pub async fn load_spectra(state: State<'_, AppState>, job: String, channel: Channel<JobEvent>) -> CmdResult<Vec<SpectrumRow>> {
    let l = state.loaded()?;
    blocking_job(&state, &job, channel, move |p| {
        p.start("spectra", l.specs.len() as u64);
        let mut rows = Vec::new();
        for s in &l.specs {
            if p.cancelled() {
                return Err("cancelled".into());
            }
            let sp = spectrum_of(&l, &s.name)?;
            let row = spectrum_row(&s.name, &sp);
            p.row(serde_json::to_value(&row).unwrap_or_default());
            rows.push(row);
            p.inc(1, &s.name);
        }
        p.finish();
        Ok(rows)
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// layer view

fn dc_method(name: &str) -> CmdResult<dc::Method> {
    Ok(match name {
        "svd" => dc::Method::Svd,
        "tt" => dc::Method::Tt,
        "tucker" => dc::Method::Tucker,
        "cp" => dc::Method::Cp,
        other => return Err(format!("the layer view draws svd, tt, tucker or cp, not `{other}`")),
    })
}

fn sites_for(m: usize, n: usize, k: Option<usize>) -> Option<(Vec<usize>, Vec<usize>)> {
    k.filter(|k| *k >= 2).map(|k| (dc::sites::balanced_factors(m, k), dc::sites::balanced_factors(n, k)))
}

/// The SVD rank with the same parameter count as `params` (for marking a plan on a spectrum).
fn svd_equivalent_rank(m: usize, n: usize, params: usize) -> usize {
    (params / (m + n)).clamp(1, m.min(n))
}

#[derive(Serialize)]
pub struct CurvePointOut {
    method: String,
    ratio: f64,
    params_fraction: f64,
    rel_error: f64,
    ranks: Vec<usize>,
}

#[derive(Serialize)]
pub struct LayerView {
    name: String,
    short: String,
    shape: [usize; 2],
    method: String,
    ratio: f64,
    ranks: Vec<usize>,
    params: usize,
    rel_error: f64,
    mark_rank: usize,
    sigma: Vec<f64>,
    energy: Vec<f64>,
    /// log10 range of the spectrum's y axis, as compactor-viz pads it.
    spectrum_y: [f64; 2],
    spectrum: ChartImage,
    heatmap: ChartImage,
    curves: ChartImage,
    curve_points: Vec<CurvePointOut>,
    stats: SpectrumRow,
}

#[derive(Deserialize)]
pub struct LayerViewArgs {
    name: String,
    method: String,
    ratio: f64,
    sites: Option<usize>,
    /// Device pixel ratio of the page.
    scale: f32,
    /// Logical width of one chart.
    width: u32,
}

#[tauri::command]
pub async fn layer_view(state: State<'_, AppState>, job: String, args: LayerViewArgs, channel: Channel<JobEvent>) -> CmdResult<LayerView> {
    let l = state.loaded()?;
    let renderer = state.renderer()?;
    if !(args.ratio > 0.0 && args.ratio <= 1.0) {
        return Err(format!("the kept ratio must be in (0, 1], not {}", args.ratio));
    }
    let method = dc_method(&args.method)?;
    let spec = l.specs.iter().find(|s| s.name == args.name).cloned().ok_or_else(|| format!("`{}` is not a linear layer of this model", args.name))?;
    let (view, heat) = blocking_job(&state, &job, channel, move |p| {
        let (m, n) = (spec.out_features, spec.in_features);
        let scale = args.scale.clamp(1.0, 3.0);
        let width = args.width.clamp(320, 1400);
        let height = (width as f32 * 0.62) as u32;
        p.note(format!("{}: spectrum", spec.name));
        let sp = spectrum_of(&l, &spec.name)?;
        let sites = sites_for(m, n, args.sites);
        // the factorization at the chosen point
        p.note(format!("{}: {} at {:.0}% of the parameters", spec.name, args.method, args.ratio * 100.0));
        let (rows, cols, w) = l.ck.matrix_f32(&format!("{}.weight", spec.name)).map_err(msg)?;
        let wm = dc::from_row_major(rows, cols, &w);
        let mut opts = dc::FactorizeOptions::new(method, dc::RankChoice::Ratio(args.ratio));
        opts.sites = sites.clone();
        let f = dc::factorize(wm.as_ref(), &opts).map_err(|e| format!("{}: {e}", spec.name))?;
        let what = dc::to_row_major(&f.reconstruct());
        let rel_error = f.rel_error(wm.as_ref());
        let params = f.params();
        let mark_rank = if method == dc::Method::Svd { f.ranks().first().copied().unwrap_or(1) } else { svd_equivalent_rank(m, n, params) };
        if p.cancelled() {
            return Err("cancelled".into());
        }

        // error curves: every method at a range of kept ratios
        let methods = [dc::Method::Svd, dc::Method::Tt, dc::Method::Tucker, dc::Method::Cp];
        // a few points per method, always including the ratio asked; the iterative fits
        // (tucker HOOI, cp ALS) get a short iteration budget so the view stays interactive
        let mut ratios = vec![0.1, 0.25, 0.5, 0.75];
        if !ratios.iter().any(|r: &f64| (r - args.ratio).abs() < 1e-9) {
            ratios.push(args.ratio);
            ratios.sort_by(|a, b| a.total_cmp(b));
        }
        p.start("error curves", (methods.len() * ratios.len()) as u64);
        let mut points = Vec::new();
        for &me in &methods {
            for &r in &ratios {
                if p.cancelled() {
                    return Err("cancelled".into());
                }
                let mut o = dc::FactorizeOptions::new(me, dc::RankChoice::Ratio(r));
                o.sites = sites.clone();
                o.max_iters = 12;
                o.tol = 1e-4;
                // ratios too small for rank 1 of a method are left out of its curve
                if let Ok(fi) = dc::factorize(wm.as_ref(), &o) {
                    points.push(CurvePointOut { method: me.name().into(), ratio: r, params_fraction: fi.params() as f64 / (m * n) as f64, rel_error: fi.rel_error(wm.as_ref()), ranks: fi.ranks() });
                }
                p.inc(1, "");
            }
        }
        drop(wm);
        l.ck.release(&format!("{}.weight", spec.name));

        p.note("drawing the charts");
        let short = short_name(&spec.name);
        let sigma32: Vec<f32> = sp.singular_values.iter().map(|v| *v as f32).collect();
        let spectra = SpectraChart {
            title: format!("Singular values of {short}  ({m} × {n})"),
            series: vec![Series { label: short.clone(), values: sigma32, color_key: ColorKey::Role(spec.role.name().into()), mark_rank: Some(mark_rank) }],
        };
        let img = renderer.render_spectra(&spectra, width, height, scale).map_err(msg)?;
        let spectrum = images::chart(&img)?;
        let hm = HeatmapInput {
            title: format!("Error |W − Ŵ| of {short}, {} keeping {:.0}%", args.method, args.ratio * 100.0),
            rows: m,
            cols: n,
            data: w.clone(),
            approx: Some(what.clone()),
            reduce: Reduce::Max,
            colormap: Colormap::Viridis,
            vmax: None,
        };
        let img = renderer.render_heatmap(&hm, width, height, scale).map_err(msg)?;
        let heatmap = images::chart(&img)?;
        let mut lines: Vec<Line> = methods
            .iter()
            .map(|me| Line { label: me.name().into(), points: points.iter().filter(|q| q.method == me.name()).map(|q| (q.params_fraction, q.rel_error)).collect() })
            .filter(|l| !l.points.is_empty())
            .collect();
        lines.push(Line { label: format!("this choice ({})", args.method), points: vec![(params as f64 / (m * n) as f64, rel_error)] });
        let curves = Curves {
            title: format!("Relative error ||W − Ŵ|| / ||W|| against parameters kept, {short}"),
            x_label: "parameters kept (fraction of the dense layer)".into(),
            y_label: "relative error".into(),
            lines,
            log_y: true,
        };
        let img = renderer.render_curves(&curves, width * 2 + 16, (height as f32 * 0.9) as u32, scale).map_err(msg)?;
        let curves = images::chart(&img)?;

        let (lo, hi) = sp.singular_values.iter().filter(|v| v.is_finite() && **v > 0.0).fold((f64::INFINITY, 0f64), |(a, b), v| (a.min(*v), b.max(*v)));
        let (mut a, mut b) = (lo.log10(), hi.log10());
        if b - a < 1e-6 {
            a -= 0.5;
            b += 0.5;
        }
        let pad = (b - a) * 0.04;
        let heat = HeatCache {
            m,
            n,
            w,
            what,
            plot_w: heatmap.plot.map(|r| (r[2] - r[0]) as usize).unwrap_or(1).max(1),
            plot_h: heatmap.plot.map(|r| (r[3] - r[1]) as usize).unwrap_or(1).max(1),
        };
        let view = LayerView {
            name: spec.name.clone(),
            short,
            shape: [m, n],
            method: args.method.clone(),
            ratio: args.ratio,
            ranks: f.ranks(),
            params,
            rel_error,
            mark_rank,
            sigma: sp.singular_values.clone(),
            energy: sp.energy_at_rank.clone(),
            spectrum_y: [a - pad, b + pad],
            spectrum,
            heatmap,
            curves,
            curve_points: points,
            stats: spectrum_row(&spec.name, &sp),
        };
        Ok((view, heat))
    })
    .await?;
    *state.heat.lock().unwrap() = Some(Arc::new(heat));
    Ok(view)
}

#[derive(Serialize)]
pub struct HeatValue {
    row: usize,
    col: usize,
    w: f32,
    w_hat: f32,
    err: f32,
    /// The pixel's block: rows and columns it covers and the max |W − Ŵ| over it (what the
    /// color shows).
    block_rows: [usize; 2],
    block_cols: [usize; 2],
    block_max: f32,
}

/// The value under the pointer on the last heatmap; `fx`, `fy` in [0, 1) across the plot area.
#[tauri::command]
pub fn heat_value(state: State<'_, AppState>, fx: f64, fy: f64) -> CmdResult<HeatValue> {
    let h = state.heat.lock().unwrap().clone().ok_or("no heatmap drawn yet")?;
    let fx = fx.clamp(0.0, 0.999_999);
    let fy = fy.clamp(0.0, 0.999_999);
    let (px, py) = ((fx * h.plot_w as f64) as usize, (fy * h.plot_h as f64) as usize);
    let r0 = py * h.m / h.plot_h;
    let r1 = ((py + 1) * h.m / h.plot_h).max(r0 + 1).min(h.m);
    let c0 = px * h.n / h.plot_w;
    let c1 = ((px + 1) * h.n / h.plot_w).max(c0 + 1).min(h.n);
    let (row, col) = (((fy * h.m as f64) as usize).min(h.m - 1), ((fx * h.n as f64) as usize).min(h.n - 1));
    let mut block_max = 0f32;
    for r in r0..r1 {
        for c in c0..c1 {
            block_max = block_max.max((h.w[r * h.n + c] - h.what[r * h.n + c]).abs());
        }
    }
    let i = row * h.n + col;
    Ok(HeatValue { row, col, w: h.w[i], w_hat: h.what[i], err: (h.w[i] - h.what[i]).abs(), block_rows: [r0, r1], block_cols: [c0, c1], block_max })
}

// ---------------------------------------------------------------------------------------------
// plans

fn parse_plan(v: serde_json::Value) -> CmdResult<Plan> {
    let plan: Plan = serde_json::from_value(v).map_err(|e| format!("The plan is not valid: {e}"))?;
    plan.validate().map_err(|e| format!("The plan is not valid: {e}"))?;
    Ok(plan)
}

#[derive(Serialize)]
pub struct PreviewRowOut {
    name: String,
    short: String,
    method: String,
    rank: usize,
    /// every rank of the fit (see `pipeline::PreviewRow::ranks`)
    ranks: Vec<usize>,
    dense_params: usize,
    params: usize,
    dense_bytes: usize,
    bytes: usize,
    predicted_error: Option<f64>,
    /// Spectrum energy kept at the SVD rank with this layer's parameter budget (when the
    /// spectrum has been computed).
    energy: Option<f64>,
    energy_rank: usize,
}

#[derive(Serialize)]
pub struct PlanPreview {
    rows: Vec<PreviewRowOut>,
    dense_params: usize,
    params: usize,
    dense_bytes: usize,
    bytes: usize,
    /// Parameters of the whole model before and after (embeddings, norms included).
    model_params: usize,
    model_params_after: usize,
    model_bytes: usize,
    model_bytes_after: usize,
    /// Mean predicted error over the layers that have one.
    mean_predicted_error: Option<f64>,
    plan_json: String,
}

/// Predicted params, bytes and error of every layer for `plan` (nothing is written).
#[tauri::command]
pub async fn preview_plan(state: State<'_, AppState>, plan: serde_json::Value) -> CmdResult<PlanPreview> {
    let l = state.loaded()?;
    let plan = parse_plan(plan)?;
    blocking(move || {
        let rows = pipeline::preview(&l.dir, &plan, false, &NoProgress).map_err(|e| format!("The plan does not fit this model: {e}"))?;
        let spectra = l.spectra.lock().unwrap().clone();
        let mut out = Vec::new();
        for r in rows {
            let spec = l.specs.iter().find(|s| s.name == r.name);
            let (m, n) = spec.map(|s| (s.out_features, s.in_features)).unwrap_or((1, 1));
            let dense_bytes = l.ck.info(&format!("{}.weight", r.name)).map(|i| i.nbytes()).unwrap_or(r.dense_params * 2);
            let eq = if r.method == "svd" { r.rank.clamp(1, m.min(n)) } else { svd_equivalent_rank(m, n, r.params) };
            let sp = spectra.get(&r.name);
            let energy = if r.method == "dense" { Some(1.0) } else { sp.and_then(|s| s.energy_at_rank.get(eq - 1).copied()) };
            let predicted_error = match r.method.as_str() {
                "dense" => r.predicted_error.or(Some(0.0)),
                "svd" => sp.map(|s| (1.0 - s.energy_at_rank.get(eq - 1).copied().unwrap_or(1.0)).max(0.0).sqrt()),
                _ => None,
            };
            out.push(PreviewRowOut {
                short: short_name(&r.name),
                name: r.name,
                method: r.method,
                rank: r.rank,
                ranks: r.ranks,
                dense_params: r.dense_params,
                params: r.params,
                dense_bytes,
                bytes: r.bytes,
                predicted_error,
                energy,
                energy_rank: eq,
            });
        }
        let dense_params: usize = out.iter().map(|r| r.dense_params).sum();
        let params: usize = out.iter().map(|r| r.params).sum();
        let dense_bytes: usize = out.iter().map(|r| r.dense_bytes).sum();
        let bytes: usize = out.iter().map(|r| r.bytes).sum();
        let errs: Vec<f64> = out.iter().filter(|r| r.method != "dense").filter_map(|r| r.predicted_error).collect();
        let inv = &l.inventory;
        Ok(PlanPreview {
            dense_params,
            params,
            dense_bytes,
            bytes,
            model_params: inv.total_params,
            model_params_after: inv.total_params - dense_params + params,
            model_bytes: inv.total_bytes,
            model_bytes_after: inv.total_bytes - dense_bytes + bytes,
            mean_predicted_error: if errs.is_empty() { None } else { Some(errs.iter().sum::<f64>() / errs.len() as f64) },
            plan_json: plan.to_json(),
            rows: out,
        })
    })
    .await
}

#[derive(Serialize)]
pub struct LoadedPlan {
    path: String,
    plan: serde_json::Value,
}

#[tauri::command]
pub async fn load_plan(path: String) -> CmdResult<LoadedPlan> {
    let p = user_path(&path)?;
    blocking(move || {
        let plan = Plan::from_file(&p).map_err(|e| format!("Cannot load the plan: {e}"))?;
        Ok(LoadedPlan { path: p.display().to_string(), plan: serde_json::to_value(&plan).map_err(msg)? })
    })
    .await
}

#[tauri::command]
pub async fn save_plan(plan: serde_json::Value, path: String) -> CmdResult<String> {
    let p = user_path(&path)?;
    let plan = parse_plan(plan)?;
    blocking(move || {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: cannot create the folder: {e}", d.display()))?;
        }
        compactor_core::checkpoint::write_atomic(&p, plan.to_json().as_bytes()).map_err(|e| format!("Cannot save the plan: {e}"))?;
        Ok(p.display().to_string())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// run

#[derive(Deserialize)]
pub struct RunArgs {
    plan: serde_json::Value,
    /// Name of the variant (its folder in the run directory); made unique.
    name: String,
    /// Evaluation windows of 256 tokens.
    eval_windows: usize,
    eval_text: Option<String>,
    runs_root: Option<String>,
}

#[derive(Serialize)]
pub struct RunOutcome {
    run_dir: String,
    variant_dir: String,
    original: VariantResult,
    variant: VariantResult,
    seconds: f64,
    layers: Vec<RunLayer>,
    linear_param_ratio: f64,
    byte_ratio: f64,
}

#[derive(Serialize)]
pub struct RunLayer {
    name: String,
    method: String,
    ranks: Vec<usize>,
    params: usize,
    dense_params: usize,
    rel_error: f64,
    seconds: f64,
}

fn clean_name(s: &str) -> String {
    let c: String = s.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '-' }).collect();
    let c = c.trim_matches(|c| c == '-' || c == '.').to_string();
    if c.is_empty() { "variant".into() } else { c }
}

/// Compresses the open model with `plan` into this session's run directory, evaluates the
/// original (once per session) and the variant, and rewrites the session's `run.json`.
#[tauri::command]
pub async fn run_plan(app: AppHandle, state: State<'_, AppState>, job: String, args: RunArgs, channel: Channel<JobEvent>) -> CmdResult<RunOutcome> {
    let l = state.loaded()?;
    let plan = parse_plan(args.plan.clone())?;
    let text = match &args.eval_text {
        Some(t) if !t.trim().is_empty() => user_path(t)?,
        _ => assets_dir().map(|a| a.join("gutenberg-heldout.txt")).ok_or("Choose an evaluation text (a .txt file): the bundled one was not found.")?,
    };
    if !text.is_file() {
        return Err(format!("{}: the evaluation text is not there", text.display()));
    }
    let windows = args.eval_windows.clamp(1, 10_000);
    let root = match &args.runs_root {
        Some(r) if !r.trim().is_empty() => user_path(r)?,
        _ => default_runs_root(&app),
    };
    // the session's run directory: reused while the model, text and window count stay the same
    let (run_dir, original) = {
        let mut s = state.session.lock().unwrap();
        let same = s.as_ref().map(|s| s.model_dir == l.dir && s.text == text && s.max_windows == windows && s.run_dir.starts_with(&root)).unwrap_or(false);
        if !same {
            let model_name = l.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
            *s = Some(Session {
                model_dir: l.dir.clone(),
                run_dir: root.join(format!("{}-{}", clean_name(&model_name), timestamp())),
                text: text.clone(),
                ctx: 256,
                max_windows: windows,
                original: None,
                variants: Vec::new(),
                ratio: plan.target.param_ratio.unwrap_or(1.0),
            });
        }
        let s = s.as_ref().unwrap();
        (s.run_dir.clone(), s.original.clone())
    };
    let name = {
        let s = state.session.lock().unwrap();
        let taken: Vec<String> = s.as_ref().map(|s| s.variants.iter().map(|v| v.name.clone()).collect()).unwrap_or_default();
        let base = clean_name(&args.name);
        let mut name = base.clone();
        let mut k = 2;
        while taken.contains(&name) || run_dir.join(&name).exists() {
            name = format!("{base}-{k}");
            k += 1;
        }
        name
    };
    let eval = EvalOptions { max_windows: windows, ..Default::default() };
    let (rd, nm, tx) = (run_dir.clone(), name.clone(), text.clone());
    let (orig, variant, manifest, secs) = blocking_job(&state, &job, channel, move |p| {
        let t0 = Instant::now();
        std::fs::create_dir_all(&rd).map_err(|e| format!("{}: cannot create the run folder: {e}", rd.display()))?;
        let out = rd.join(&nm);
        p.note(format!("compressing into {}", out.display()));
        let manifest = pipeline::compress(&l.dir, &plan, &out, &CompressOptions::default(), p).map_err(|e| match e {
            compactor_core::Error::Cancelled => "cancelled".to_string(),
            e => format!("Compression failed: {e}"),
        })?;
        let orig = match original {
            Some(o) => o,
            None => {
                p.note("evaluating the original model");
                run::evaluate("original", &l.dir, &tx, &eval, p).map_err(|e| match e {
                    compactor_core::Error::Cancelled => "cancelled".to_string(),
                    e => format!("Evaluating the original failed: {e}"),
                })?
            }
        };
        p.note(format!("evaluating {nm}"));
        let variant = run::evaluate(&nm, &out, &tx, &eval, p).map_err(|e| match e {
            compactor_core::Error::Cancelled => "cancelled".to_string(),
            e => format!("Evaluating {nm} failed: {e}"),
        })?;
        Ok((orig, variant, manifest, t0.elapsed().as_secs_f64()))
    })
    .await?;

    // record it in the session's run.json (what the report reads)
    let summary = {
        let mut s = state.session.lock().unwrap();
        let s = s.as_mut().ok_or("the session was reset while the run went on (another model was opened)")?;
        s.original = Some(orig.clone());
        s.variants.push(variant.clone());
        RunSummary {
            model: s.model_dir.display().to_string(),
            text: s.text.display().to_string(),
            ctx: s.ctx,
            max_windows: s.max_windows,
            param_ratio: s.ratio,
            original: orig.clone(),
            variants: s.variants.clone(),
            environment: run::Environment::here(&candle_core::Device::Cpu),
        }
    };
    let json = serde_json::to_string_pretty(&summary).map_err(msg)?;
    compactor_core::checkpoint::write_atomic(&run_dir.join("run.json"), json.as_bytes()).map_err(|e| format!("Cannot write run.json: {e}"))?;
    Ok(RunOutcome {
        run_dir: run_dir.display().to_string(),
        variant_dir: run_dir.join(&name).display().to_string(),
        original: orig,
        variant,
        seconds: secs,
        layers: manifest
            .layers
            .iter()
            .map(|e| RunLayer { name: e.name.clone(), method: e.method.clone(), ranks: e.ranks.clone(), params: e.params, dense_params: e.dense_params, rel_error: e.rel_error, seconds: e.seconds })
            .collect(),
        linear_param_ratio: manifest.totals.linear_param_ratio,
        byte_ratio: manifest.totals.byte_ratio,
    })
}

#[tauri::command]
pub fn cancel_job(state: State<'_, AppState>, job: String) -> bool {
    match state.jobs.lock().unwrap().get(&job) {
        Some(f) => {
            f.cancel();
            true
        }
        None => false,
    }
}

// ---------------------------------------------------------------------------------------------
// compare, report

#[derive(Serialize)]
pub struct ChartOut {
    id: String,
    title: String,
    caption: String,
    url: String,
    width: u32,
    height: u32,
}

#[derive(Serialize)]
pub struct CompareView {
    run_dir: String,
    title: String,
    rows: Vec<compactor_report::SummaryRow>,
    charts: Vec<ChartOut>,
    unavailable: Vec<String>,
    variants: Vec<CompareVariant>,
}

#[derive(Serialize)]
pub struct CompareVariant {
    name: String,
    method: String,
    layers: Vec<compactor_report::LayerRow>,
}

fn session_run_dir(state: &AppState) -> CmdResult<PathBuf> {
    let s = state.session.lock().unwrap();
    match s.as_ref() {
        Some(s) if !s.variants.is_empty() => Ok(s.run_dir.clone()),
        _ => Err("Nothing to compare yet: run a plan first (Run, on the left).".into()),
    }
}

/// The session's variants side by side: the report model of its run directory.
#[tauri::command]
pub async fn compare(state: State<'_, AppState>) -> CmdResult<CompareView> {
    let dir = session_run_dir(&state)?;
    blocking(move || {
        let r = compactor_report::build_report(&dir).map_err(|e| format!("Cannot build the comparison: {e}"))?;
        Ok(CompareView {
            run_dir: dir.display().to_string(),
            title: r.title.clone(),
            rows: r.rows.clone(),
            charts: r
                .charts
                .images
                .iter()
                .map(|c| ChartOut { id: c.id.clone(), title: c.title.clone(), caption: c.caption.clone(), url: images::data_url(&c.png), width: c.width, height: c.height })
                .collect(),
            unavailable: r.charts.unavailable.clone(),
            variants: r.variants.iter().map(|v| CompareVariant { name: v.result.name.clone(), method: v.result.method.clone(), layers: v.layer_rows() }).collect(),
        })
    })
    .await
}

#[derive(Serialize)]
pub struct SavedReport {
    html: String,
    pdf: String,
    html_bytes: u64,
    pdf_bytes: u64,
}

/// Writes the HTML report at `path` and the PDF next to it (same name, `.pdf`).
#[tauri::command]
pub async fn save_report(state: State<'_, AppState>, path: String) -> CmdResult<SavedReport> {
    let dir = session_run_dir(&state)?;
    let p = user_path(&path)?;
    let (html, pdf) = match p.extension().and_then(|e| e.to_str()) {
        Some("html") | Some("htm") => (p.clone(), p.with_extension("pdf")),
        Some("pdf") => (p.with_extension("html"), p.clone()),
        _ => (p.with_extension("html"), p.with_extension("pdf")),
    };
    blocking(move || {
        if let Some(d) = html.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: cannot create the folder: {e}", d.display()))?;
        }
        compactor_report::write_report(&dir, Some(&html), Some(&pdf)).map_err(|e| format!("Cannot write the report: {e}"))?;
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        Ok(SavedReport { html_bytes: size(&html), pdf_bytes: size(&pdf), html: html.display().to_string(), pdf: pdf.display().to_string() })
    })
    .await
}
