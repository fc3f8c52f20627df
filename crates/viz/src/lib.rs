//! Headless chart renderer for Compactor: turns plain data (spectra, reconstruction
//! errors, error-vs-size curves) into RGBA images and PNG files with wgpu.
//!
//! **What it is for.** Drawing the four chart kinds the reports and the app show:
//!
//! * [`SpectraChart`]: singular-value spectra of one or many layers, log y, colored by
//!   depth or by role (q/k/v/o/gate/up/down), with optional truncation-rank markers;
//! * [`HeatmapInput`]: the reconstruction error |W − Ŵ| of one weight matrix (up to
//!   12800 × 4096 and beyond), reduced to the image size by a compute shader
//!   (`shaders/reduce.wgsl`, max or RMS per pixel block) and color-mapped on the GPU;
//! * [`LayerMap`]: a layer × method (or layer × rank) table of errors as a heatmap with
//!   the values written in the cells;
//! * [`Curves`]: error against parameter ratio, one line per method.
//!
//! Every chart has a title, axes, ticks, labels and a legend or color bar. Text goes
//! through epaint's font and glyph path (tessellated text meshes sampling epaint's font
//! atlas), drawn with the renderer's own small mesh pipeline (`shaders/mesh.wgsl`).
//! Output is an [`RgbaImage`] (for the app) that can be saved as PNG (for reports), at
//! any logical width × height and a `scale` factor (2.0 = HiDPI: same layout, 2× pixels).
//!
//! It runs headless: on a GPU through Vulkan (or Metal/DX12), and without one through
//! Mesa's lavapipe software Vulkan driver. With neither, [`Renderer::new`] returns
//! [`VizError::NoAdapter`], which says how to install lavapipe; it never panics.
//!
//! **What it is not for.** It knows nothing about models, checkpoints or decompositions:
//! inputs are the plain serde structs below, filled by the engine or the CLI (which
//! calls [`render_json`] for `compactor render <kind> input.json`). It is not an
//! interactive plotting library (no windows, no events, no zoom) and not a general
//! plotting API: new chart kinds are added here, as a struct and a `render_*` method.
//!
//! ```no_run
//! use compactor_viz::{Renderer, Curves, Line};
//! let r = Renderer::new()?;
//! let chart = Curves {
//!     title: "Error vs size".into(),
//!     x_label: "parameter ratio".into(),
//!     y_label: "relative error".into(),
//!     lines: vec![Line { label: "svd".into(), points: vec![(0.2, 0.5), (0.5, 0.2)] }],
//!     log_y: true,
//! };
//! r.render_curves(&chart, 800, 500, 2.0)?.save_png("curves.png")?;
//! # Ok::<(), compactor_viz::VizError>(())
//! ```

mod canvas;
mod charts;
pub mod colormap;
mod gpu;
mod image;
mod reduce;

pub use charts::heatmap_image_cpu;
pub use gpu::Renderer;
pub use image::RgbaImage;
pub use reduce::{reduce_blocks_cpu, ReduceMode};

use serde::{Deserialize, Serialize};

/// Everything that can go wrong while rendering.
#[derive(Debug, thiserror::Error)]
pub enum VizError {
    /// No GPU or software Vulkan driver could be opened.
    #[error(
        "no graphics adapter found ({detail}). compactor-viz needs a Vulkan driver; without a \
         GPU install Mesa's software driver lavapipe: `apt-get install mesa-vulkan-drivers \
         libvulkan1` (Debian/Ubuntu), then check with `vulkaninfo --summary`"
    )]
    NoAdapter { detail: String },
    /// An adapter was found but a device could not be created on it.
    #[error("could not open the graphics device on adapter '{adapter}': {detail}")]
    Device { adapter: String, detail: String },
    /// The input data is inconsistent (sizes, empty series, ...).
    #[error("invalid chart input: {0}")]
    InvalidInput(String),
    /// The JSON given to [`render_json`] could not be parsed.
    #[error("could not parse {kind} chart JSON: {source}")]
    Json { kind: String, source: serde_json::Error },
    /// A GPU operation failed (buffer mapping, validation).
    #[error("GPU operation failed: {0}")]
    Gpu(String),
    /// Writing or reading a PNG file failed.
    #[error("PNG file {path}: {detail}")]
    Png { path: String, detail: String },
}

/// How a spectrum line gets its color.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ColorKey {
    /// Position of the layer in the model, 0 = first layer, 1 = last (a color gradient).
    Depth(f32),
    /// Role of the weight matrix: "q", "k", "v", "o", "gate", "up", "down" (others get a
    /// fallback color).
    Role(String),
}

/// One singular-value spectrum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub label: String,
    /// Singular values, largest first (any order is drawn as given). Values ≤ 0 are
    /// left out of the log plot.
    pub values: Vec<f32>,
    pub color_key: ColorKey,
    /// Truncation rank r: draws a marker at index r (the last kept value, 1-based).
    #[serde(default)]
    pub mark_rank: Option<usize>,
}

/// Singular-value spectra of one or many layers: x = index (1-based), y = value (log).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpectraChart {
    pub title: String,
    pub series: Vec<Series>,
}

/// How a heatmap pixel summarizes its block of matrix elements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reduce {
    /// max |v| over the block (shows the worst element).
    #[default]
    Max,
    /// sqrt(mean(v²)) over the block.
    Rms,
}

/// Which color map a heatmap uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Colormap {
    #[default]
    Viridis,
    Magma,
}

/// Reconstruction error of one weight matrix, drawn as a heatmap.
///
/// `data` is row-major `rows × cols`. If `approx` is given, `data` is W and `approx` is
/// Ŵ and the error |W − Ŵ| is taken element-wise; otherwise `data` already is the
/// error (its absolute value is used).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeatmapInput {
    pub title: String,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
    #[serde(default)]
    pub approx: Option<Vec<f32>>,
    #[serde(default)]
    pub reduce: Reduce,
    #[serde(default)]
    pub colormap: Colormap,
    /// Upper end of the color scale; default: the largest reduced value.
    #[serde(default)]
    pub vmax: Option<f32>,
}

/// A whole-model table (layers × methods, or layers × ranks) of errors.
///
/// `values` is row-major `row_labels.len() × col_labels.len()`; NaN marks a missing
/// cell (JSON `null` is read as NaN).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerMap {
    pub title: String,
    pub row_labels: Vec<String>,
    pub col_labels: Vec<String>,
    #[serde(deserialize_with = "de_f64_or_null", serialize_with = "ser_f64_or_null")]
    pub values: Vec<f64>,
    /// Color by log10 of the value (for errors spanning decades).
    #[serde(default)]
    pub log_color: bool,
    #[serde(default)]
    pub colormap: Colormap,
}

/// One method's curve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub label: String,
    /// (x, y) points, drawn in the given order.
    pub points: Vec<(f64, f64)>,
}

/// Error-vs-parameter-ratio curves, one line per method.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Curves {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub lines: Vec<Line>,
    #[serde(default)]
    pub log_y: bool,
}

fn de_f64_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    let v: Vec<Option<f64>> = Vec::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
}

fn ser_f64_or_null<S: serde::Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
    let o: Vec<Option<f64>> = v.iter().map(|x| if x.is_finite() { Some(*x) } else { None }).collect();
    o.serialize(s)
}

/// The chart kinds accepted by [`render_json`] and `compactor render`.
pub const CHART_KINDS: [&str; 4] = ["spectra", "heatmap", "layer-map", "curves"];

/// Parses `json` as the input struct of chart `kind` (one of [`CHART_KINDS`]) and renders
/// it with a fresh [`Renderer`]. Convenience for the CLI; keep a `Renderer` to draw many.
pub fn render_json(kind: &str, json: &str, width: u32, height: u32, scale: f32) -> Result<RgbaImage, VizError> {
    Renderer::new()?.render_json(kind, json, width, height, scale)
}

impl Renderer {
    /// Like [`render_json`], on this renderer.
    pub fn render_json(&self, kind: &str, json: &str, width: u32, height: u32, scale: f32) -> Result<RgbaImage, VizError> {
        fn parse<T: serde::de::DeserializeOwned>(kind: &str, json: &str) -> Result<T, VizError> {
            serde_json::from_str(json).map_err(|source| VizError::Json { kind: kind.to_string(), source })
        }
        match kind {
            "spectra" => self.render_spectra(&parse(kind, json)?, width, height, scale),
            "heatmap" => self.render_heatmap(&parse(kind, json)?, width, height, scale),
            "layer-map" | "layermap" | "layer_map" => self.render_layer_map(&parse(kind, json)?, width, height, scale),
            "curves" => self.render_curves(&parse(kind, json)?, width, height, scale),
            other => Err(VizError::InvalidInput(format!(
                "unknown chart kind '{other}', expected one of {}",
                CHART_KINDS.join(", ")
            ))),
        }
    }
}
