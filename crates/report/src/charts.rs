//! The report's charts, drawn by `compactor-viz` and kept as PNG bytes.
//!
//! A missing graphics adapter (or any failure of one chart) never fails the report: the reason
//! is kept in [`Charts::unavailable`] and printed where the charts would be.

use crate::model::{Report, ReportOptions};
use compactor_viz::{ColorKey, Curves, LayerMap, Line, Renderer, RgbaImage, Series, SpectraChart};
use serde::Serialize;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Logical width of every chart, in points (rendered at 2× pixels).
const WIDTH: u32 = 900;
const SCALE: f32 = 2.0;

/// One drawn chart.
#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    /// Short id (`spectra`, `error-map`, `error-vs-params`, `heal-loss`).
    pub id: String,
    pub title: String,
    /// One sentence on what the chart shows.
    pub caption: String,
    /// Pixel size of the PNG.
    pub width: u32,
    pub height: u32,
    #[serde(skip)]
    pub png: Vec<u8>,
}

/// The charts of a report, and why any are missing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Charts {
    pub images: Vec<Chart>,
    /// `charts unavailable: …` lines, one per reason.
    pub unavailable: Vec<String>,
}

impl Charts {
    pub(crate) fn unavailable(reason: String) -> Charts {
        Charts { images: Vec::new(), unavailable: vec![format!("charts unavailable: {reason}")] }
    }
}

/// Draws every chart that has data.
pub(crate) fn draw(report: &Report, run_dir: &Path, opts: &ReportOptions) -> Charts {
    let renderer = match catch_unwind(Renderer::new) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Charts::unavailable(e.to_string()),
        Err(p) => return Charts::unavailable(format!("the renderer panicked: {}", panic_text(&p))),
    };
    let mut out = Charts::default();
    let r = &renderer;
    if opts.spectra {
        match spectra(report, run_dir, opts) {
            Ok(chart) => add(
                &mut out,
                r,
                "spectra",
                "Singular-value spectra of the original",
                "Singular values of every compressed weight matrix of the original model, colored by role; markers at the rank the svd variant kept.",
                500,
                &|r, h| r.render_spectra(&chart, WIDTH, h, SCALE),
            ),
            Err(reason) => out.unavailable.push(format!("Singular-value spectra: chart unavailable: {reason}")),
        }
    }

    if let Some(map) = error_map(report) {
        let h = (map.row_labels.len() as u32 * 18 + 160).clamp(300, 4000);
        add(
            &mut out,
            r,
            "error-map",
            "Relative error per layer and variant",
            "‖W − Ŵ‖_F / ‖W‖_F of every compressed layer (rows) in every variant (columns); color on a log scale.",
            h,
            &|r, h| r.render_layer_map(&map, WIDTH, h, SCALE),
        );
    }

    let points = error_vs_params(report);
    if !points.lines.is_empty() {
        add(
            &mut out,
            r,
            "error-vs-params",
            "Error against kept parameters",
            "One point per compressed layer: its parameters as a fraction of the dense layer's (x) and its relative error (y), one line per variant.",
            500,
            &|r, h| r.render_curves(&points, WIDTH, h, SCALE),
        );
    }

    let heal = heal_curves(report);
    if !heal.lines.is_empty() {
        add(
            &mut out,
            r,
            "heal-loss",
            "Heal loss",
            "Training loss of the healing fine-tune, step by step.",
            420,
            &|r, h| r.render_curves(&heal, WIDTH, h, SCALE),
        );
    }
    out
}

type Draw<'a> = &'a dyn Fn(&Renderer, u32) -> Result<RgbaImage, compactor_viz::VizError>;

/// Draws one chart at logical height `h`; a failure is noted, never raised.
fn add(out: &mut Charts, renderer: &Renderer, id: &str, title: &str, caption: &str, h: u32, draw: Draw) {
    match catch_unwind(AssertUnwindSafe(|| draw(renderer, h))) {
        Ok(Ok(img)) => match encode_png(&img) {
            Ok(png) => out.images.push(Chart { id: id.into(), title: title.into(), caption: caption.into(), width: img.width, height: img.height, png }),
            Err(e) => out.unavailable.push(format!("{title}: chart unavailable: PNG encoding failed: {e}")),
        },
        Ok(Err(e)) => out.unavailable.push(format!("{title}: chart unavailable: {e}")),
        Err(p) => out.unavailable.push(format!("{title}: chart unavailable: the renderer panicked: {}", panic_text(&p))),
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into())
}

/// Encodes an RGBA image as PNG bytes.
pub(crate) fn encode_png(img: &RgbaImage) -> Result<Vec<u8>, png::EncodingError> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, img.width, img.height);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::High);
        let mut w = enc.write_header()?;
        w.write_image_data(&img.pixels)?;
        w.finish()?;
    }
    Ok(buf)
}

/// A short row label: `L0 q`.
fn short(layer: usize, role: &str) -> String {
    format!("L{layer} {role}")
}

/// The layer × variant table of relative errors.
fn error_map(report: &Report) -> Option<LayerMap> {
    let cols: Vec<&crate::VariantReport> = report.variants.iter().filter(|v| !v.manifest.layers.is_empty()).collect();
    if cols.is_empty() {
        return None;
    }
    // rows: every layer name that appears, in (layer, role) order
    let mut rows: BTreeMap<(usize, String), String> = BTreeMap::new();
    for v in &cols {
        for l in &v.manifest.layers {
            rows.entry((l.layer, role_order(l.role.name()))).or_insert_with(|| l.name.clone());
        }
    }
    let names: Vec<(String, String)> = rows.iter().map(|((layer, _), name)| {
        let role = cols.iter().flat_map(|v| v.manifest.layers.iter()).find(|l| &l.name == name).map(|l| l.role.name()).unwrap_or("?");
        (name.clone(), short(*layer, role))
    }).collect();
    let mut values = Vec::with_capacity(names.len() * cols.len());
    for (name, _) in &names {
        for v in &cols {
            values.push(v.manifest.layer(name).map(|l| l.rel_error).unwrap_or(f64::NAN));
        }
    }
    Some(LayerMap {
        title: "Relative Frobenius error per layer".into(),
        row_labels: names.into_iter().map(|(_, s)| s).collect(),
        col_labels: cols.iter().map(|v| v.result.name.clone()).collect(),
        values,
        log_color: true,
        colormap: Default::default(),
    })
}

/// Orders roles the way a block runs them.
fn role_order(role: &str) -> String {
    let i = ["q", "k", "v", "o", "gate", "up", "down"].iter().position(|r| *r == role).unwrap_or(9);
    format!("{i}{role}")
}

fn error_vs_params(report: &Report) -> Curves {
    let lines = report
        .variants
        .iter()
        .filter(|v| !v.manifest.layers.is_empty())
        .map(|v| {
            let mut points: Vec<(f64, f64)> = v
                .manifest
                .layers
                .iter()
                .filter(|l| l.dense_params > 0)
                .map(|l| (l.params as f64 / l.dense_params as f64, l.rel_error))
                .filter(|(x, y)| x.is_finite() && y.is_finite() && *y > 0.0)
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
            Line { label: v.result.name.clone(), points }
        })
        .filter(|l| !l.points.is_empty())
        .collect();
    Curves {
        title: "Relative error against kept parameters, per layer".into(),
        x_label: "layer parameters / dense parameters".into(),
        y_label: "relative error".into(),
        lines,
        log_y: true,
    }
}

fn heal_curves(report: &Report) -> Curves {
    let lines = report
        .variants
        .iter()
        .filter_map(|v| {
            let losses = v.manifest.heal.as_ref().map(|h| &h.losses).or(v.result.heal_losses.as_ref())?;
            let points: Vec<(f64, f64)> = losses.iter().enumerate().map(|(i, l)| ((i + 1) as f64, *l)).filter(|(_, l)| l.is_finite()).collect();
            (!points.is_empty()).then(|| Line { label: v.result.name.clone(), points })
        })
        .collect();
    Curves { title: "Heal loss".into(), x_label: "step".into(), y_label: "loss".into(), lines, log_y: false }
}

/// The spectra of the original's compressed matrices, computed from its checkpoint.
fn spectra(report: &Report, run_dir: &Path, opts: &ReportOptions) -> Result<SpectraChart, String> {
    let model_dir = locate(&report.summary.model, run_dir).ok_or_else(|| format!("the original checkpoint {} is not on disk", report.summary.model))?;
    let ck = compactor_core::checkpoint::Checkpoint::open(&model_dir).map_err(|e| e.to_string())?;
    // the layers and ranks: from the plain svd variant if there is one, else any with layers
    let source = report
        .variants
        .iter()
        .find(|v| v.result.name == "svd")
        .or_else(|| report.variants.iter().find(|v| v.result.method == "svd"))
        .or_else(|| report.variants.iter().find(|v| !v.manifest.layers.is_empty()))
        .ok_or("no variant has compressed layers")?;
    let mark = source.manifest.layers.first().map(|l| l.method == "svd").unwrap_or(false);
    let mut series = Vec::new();
    let mut skipped = 0;
    for l in &source.manifest.layers {
        let name = format!("{}.weight", l.name);
        let Some(info) = ck.info(&name) else { continue };
        if info.numel() > opts.spectra_max_elements {
            skipped += 1;
            continue;
        }
        let (m, n, w) = ck.matrix_f32(&name).map_err(|e| e.to_string())?;
        let s = compactor_decomp::singular_values(compactor_decomp::from_row_major(m, n, &w).as_ref()).map_err(|e| format!("{name}: {e}"))?;
        ck.release(&name);
        series.push(Series {
            label: short(l.layer, l.role.name()),
            values: s.iter().map(|v| *v as f32).collect(),
            color_key: ColorKey::Role(l.role.name().to_string()),
            mark_rank: if mark { l.ranks.first().copied() } else { None },
        });
    }
    if series.is_empty() {
        return Err(if skipped > 0 {
            format!("{skipped} matrices are larger than {} elements (full SVD skipped)", opts.spectra_max_elements)
        } else {
            "no compressed layer found in the original checkpoint".into()
        });
    }
    Ok(SpectraChart { title: format!("Singular values of the original ({} matrices)", series.len()), series })
}

/// The model directory as recorded, else relative to the run directory or its parents.
fn locate(model: &str, run_dir: &Path) -> Option<PathBuf> {
    let p = PathBuf::from(model);
    if p.join("config.json").is_file() {
        return Some(p);
    }
    if p.is_relative() {
        for base in run_dir.ancestors() {
            let q = base.join(&p);
            if q.join("config.json").is_file() {
                return Some(q);
            }
        }
    }
    None
}
