//! Run reports for Compactor: one run (the original model and its compressed variants) as a
//! data model ([`Report`]), rendered to one self-contained HTML file and to a PDF.
//!
//! **What it is for.** Reading a run directory as written by `compactor demo --out DIR`:
//!
//! ```text
//! DIR/run.json                 RunSummary: original + every variant (perplexity, params, bytes, speed)
//! DIR/<variant>/compactor.json Manifest: plan, per-layer method, ranks, params, errors, heal record
//! ```
//!
//! and writing a report that compares the original with every variant: a summary table
//! (params, bytes, perplexity, Δppl, decode speed ratio, mean layer error), charts (singular-value
//! spectra of the original, the layer × variant error map, error against kept parameters, the
//! heal loss curve) drawn by `compactor-viz`, per-layer tables, every plan as JSON, and the
//! machine the run used.
//!
//! * HTML: one file, CSS inline, charts as `data:image/png;base64` URIs, printable.
//! * PDF: A4, real (selectable) text in embedded DejaVu fonts, charts as images, page numbers.
//!
//! Both renderers print numbers through the same functions ([`format`]), so the HTML table,
//! the PDF text and `run.json` agree digit for digit.
//!
//! Charts need a graphics adapter (a GPU or Mesa's lavapipe). Without one the report is still
//! written, and says `charts unavailable: <reason>` where the charts would be.
//!
//! **What it is not for.** It runs no model and compresses nothing: everything comes from the
//! run directory (and, for the spectra, from the original checkpoint when it is still on disk).
//!
//! ```no_run
//! use std::path::Path;
//! compactor_report::write_report(Path::new("out/demo"), Some(Path::new("report.html")), Some(Path::new("report.pdf")))?;
//! # Ok::<(), compactor_report::ReportError>(())
//! ```

mod charts;
pub mod format;
mod html;
mod model;
mod pdf;

pub use charts::{Chart, Charts};
pub use html::render_html;
pub use model::{build_report, build_report_with, LayerRow, Report, ReportOptions, SummaryRow, VariantReport};
pub use pdf::render_pdf;

use std::path::{Path, PathBuf};

/// Everything that can go wrong while building or writing a report. Every variant names the
/// file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file the report needs is not there.
    #[error("{path}: missing ({what})")]
    Missing { path: PathBuf, what: String },
    /// A file is there but could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A JSON file does not parse as what it should be.
    #[error("{path}: invalid {what}: {detail}")]
    Json { path: PathBuf, what: String, detail: String },
    /// The PDF could not be produced.
    #[error("{path}: could not write the PDF: {detail}")]
    Pdf { path: PathBuf, detail: String },
}

impl ReportError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ReportError::Io { path: path.to_path_buf(), source }
    }
}

/// Writes the report as one self-contained HTML file at `path` (atomically: a temporary file
/// next to it, then a rename).
pub fn write_html(report: &Report, path: &Path) -> Result<(), ReportError> {
    write_atomic(path, render_html(report).as_bytes())
}

/// Writes the report as a PDF at `path` (atomically).
pub fn write_pdf(report: &Report, path: &Path) -> Result<(), ReportError> {
    let bytes = render_pdf(report).map_err(|detail| ReportError::Pdf { path: path.to_path_buf(), detail })?;
    write_atomic(path, &bytes)
}

/// Builds the report of the run in `run_dir` and writes the HTML and/or the PDF.
pub fn write_report(run_dir: &Path, html: Option<&Path>, pdf: Option<&Path>) -> Result<(), ReportError> {
    let report = build_report(run_dir)?;
    if let Some(p) = html {
        write_html(&report, p)?;
    }
    if let Some(p) = pdf {
        write_pdf(&report, p)?;
    }
    Ok(())
}

/// Writes `bytes` to a temporary file in the directory of `path`, then renames it over `path`:
/// readers see the old file or the new one, never half of one.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "report".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ReportError::io(path, e)
    })
}
