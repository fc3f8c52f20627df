//! The report's data model, read from a run directory.

use crate::charts::{self, Charts};
use crate::ReportError;
use compactor_core::compressed::{Manifest, MANIFEST};
use compactor_core::run::{RunSummary, VariantResult};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The name of the run summary inside a run directory.
pub const RUN_JSON: &str = "run.json";

/// One run, ready to render: the summary as the run wrote it, every variant's manifest, the
/// derived summary rows and the charts.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub title: String,
    pub run_dir: PathBuf,
    /// `run.json` as written by the run.
    pub summary: RunSummary,
    /// One per entry of `summary.variants`, same order.
    pub variants: Vec<VariantReport>,
    /// The original first, then every variant.
    pub rows: Vec<SummaryRow>,
    pub charts: Charts,
    /// `compactor-report <version>`.
    pub generator: String,
}

/// One compressed variant: its evaluation and its manifest.
#[derive(Debug, Clone, Serialize)]
pub struct VariantReport {
    pub result: VariantResult,
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
}

impl VariantReport {
    /// The per-layer table of this variant.
    pub fn layer_rows(&self) -> Vec<LayerRow> {
        self.manifest
            .layers
            .iter()
            .map(|l| LayerRow {
                name: l.name.clone(),
                layer: l.layer,
                role: l.role.name().to_string(),
                method: l.method.clone(),
                ranks: l.ranks.clone(),
                params: l.params,
                dense_params: l.dense_params,
                bytes: l.bytes,
                rel_error: l.rel_error,
                act_error: l.act_error,
            })
            .collect()
    }
}

/// One line of the summary table.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryRow {
    pub name: String,
    pub method: String,
    pub params: usize,
    pub bytes: u64,
    pub perplexity: f64,
    /// (ppl / ppl_original − 1) · 100; `None` for the original.
    pub delta_ppl_pct: Option<f64>,
    pub decode_tokens_per_s: f64,
    /// decode tokens/s ÷ the original's.
    pub decode_speed_ratio: Option<f64>,
    /// Mean relative Frobenius error over the compressed layers; `None` for the original.
    pub mean_rel_error: Option<f64>,
}

impl SummaryRow {
    fn new(v: &VariantResult, original: &VariantResult, is_original: bool) -> SummaryRow {
        let ratio = |a: f64, b: f64| if b > 0.0 && a.is_finite() && b.is_finite() { Some(a / b) } else { None };
        SummaryRow {
            name: v.name.clone(),
            method: v.method.clone(),
            params: v.params,
            bytes: v.bytes,
            perplexity: v.perplexity,
            delta_ppl_pct: if is_original { None } else { ratio(v.perplexity, original.perplexity).map(|r| (r - 1.0) * 100.0) },
            decode_tokens_per_s: v.decode_tokens_per_s,
            decode_speed_ratio: ratio(v.decode_tokens_per_s, original.decode_tokens_per_s),
            mean_rel_error: v.mean_rel_error,
        }
    }
}

/// One compressed layer of one variant.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    pub name: String,
    pub layer: usize,
    pub role: String,
    pub method: String,
    pub ranks: Vec<usize>,
    pub params: usize,
    pub dense_params: usize,
    pub bytes: usize,
    pub rel_error: f64,
    pub act_error: Option<f64>,
}

/// What [`build_report_with`] does beyond reading the files.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Draw the charts (needs a graphics adapter; without one the report says why).
    pub charts: bool,
    /// Compute the singular-value spectra of the original checkpoint for the spectra chart
    /// (only when it is still on disk and its matrices are small enough; see [`ReportOptions::spectra_max_elements`]).
    pub spectra: bool,
    /// Largest matrix (m·n) whose full spectrum is computed.
    pub spectra_max_elements: usize,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions { charts: true, spectra: true, spectra_max_elements: 4096 * 4096 }
    }
}

/// Reads `run_dir/run.json` and every variant's `compactor.json`, and draws the charts.
pub fn build_report(run_dir: &Path) -> Result<Report, ReportError> {
    build_report_with(run_dir, &ReportOptions::default())
}

/// [`build_report`] with options.
pub fn build_report_with(run_dir: &Path, opts: &ReportOptions) -> Result<Report, ReportError> {
    let run_path = run_dir.join(RUN_JSON);
    let summary: RunSummary = read_json(&run_path, "run summary (written by `compactor demo --out DIR`)")?;
    let mut variants = Vec::new();
    for v in &summary.variants {
        let manifest_path = manifest_path(run_dir, v)?;
        let manifest: Manifest = read_json(&manifest_path, "compressed-model manifest")?;
        variants.push(VariantReport { result: v.clone(), manifest_path, manifest });
    }
    let mut rows = vec![SummaryRow::new(&summary.original, &summary.original, true)];
    rows.extend(summary.variants.iter().map(|v| SummaryRow::new(v, &summary.original, false)));
    let model_name = Path::new(&summary.model).file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| summary.model.clone());
    let mut report = Report {
        title: format!("Compactor report: {model_name}"),
        run_dir: run_dir.to_path_buf(),
        summary,
        variants,
        rows,
        charts: Charts::default(),
        generator: format!("compactor-report {}", env!("CARGO_PKG_VERSION")),
    };
    report.charts = if opts.charts { charts::draw(&report, run_dir, opts) } else { Charts::unavailable("charts were not requested".into()) };
    Ok(report)
}

/// `run_dir/<name>/compactor.json`, else the directory the run recorded.
fn manifest_path(run_dir: &Path, v: &VariantResult) -> Result<PathBuf, ReportError> {
    let local = run_dir.join(&v.name).join(MANIFEST);
    if local.is_file() {
        return Ok(local);
    }
    let recorded = Path::new(&v.dir).join(MANIFEST);
    if recorded.is_file() {
        return Ok(recorded);
    }
    Err(ReportError::Missing { path: local, what: format!("manifest of variant `{}` (also not at {})", v.name, recorded.display()) })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ReportError::Missing { path: path.to_path_buf(), what: what.to_string() },
        _ => ReportError::io(path, e),
    })?;
    serde_json::from_str(&text).map_err(|e| ReportError::Json { path: path.to_path_buf(), what: what.to_string(), detail: e.to_string() })
}
