//! Fixed, deterministic chart inputs shared by the golden tests and the docs example.
#![allow(dead_code)]

use compactor_viz::*;

/// A small deterministic pseudo-random generator (xorshift), values in [0, 1).
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Spectra of five projections of one layer, two with truncation ranks.
pub fn spectra() -> SpectraChart {
    let roles = [("q", 1.0f32, 40.0f32), ("k", 0.8, 25.0), ("v", 0.6, 90.0), ("o", 0.7, 120.0), ("gate", 1.3, 200.0)];
    let series = roles
        .iter()
        .enumerate()
        .map(|(j, &(role, amp, tau))| {
            let n = if role == "gate" { 1024 } else { 512 };
            let values = (0..n)
                .map(|i| {
                    let i = i as f32;
                    amp * (30.0 * (-i / tau).exp() + 2.0 / (1.0 + i).sqrt()) * (1.0 - i / (n as f32 + 40.0)).powf(3.0)
                })
                .collect();
            Series {
                label: format!("layer 12 {role}_proj"),
                values,
                color_key: ColorKey::Role(role.into()),
                mark_rank: match j {
                    0 => Some(64),
                    4 => Some(256),
                    _ => None,
                },
            }
        })
        .collect();
    SpectraChart { title: "Singular values, layer 12".into(), series }
}

/// Spectra of the q projection across 24 layers, colored by depth.
pub fn spectra_depth() -> SpectraChart {
    let n_layers = 24;
    let series = (0..n_layers)
        .map(|l| {
            let d = l as f32 / (n_layers - 1) as f32;
            let tau = 20.0 + 120.0 * d;
            let values = (0..512).map(|i| (10.0 * (-(i as f32) / tau).exp() + 0.5 / (1.0 + i as f32).sqrt()) * (1.0 + d)).collect();
            Series { label: format!("layer {l}"), values, color_key: ColorKey::Depth(d), mark_rank: None }
        })
        .collect();
    SpectraChart { title: "q_proj spectra across depth".into(), series }
}

/// A 1000 × 777 error matrix with smooth structure, hot rows/columns and noise.
pub fn heatmap() -> HeatmapInput {
    let (rows, cols) = (1000, 777);
    let mut rng = Rng::new(7);
    let mut data = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let smooth = 0.02 * (1.0 + ((r as f32) / 90.0).sin() * ((c as f32) / 60.0).cos());
            let hot = if r % 211 == 17 || c % 157 == 40 { 0.05 } else { 0.0 };
            data.push((smooth + hot) * (0.5 + rng.next()) * if rng.next() < 0.5 { -1.0 } else { 1.0 });
        }
    }
    HeatmapInput { title: "Reconstruction error, layer 12 down_proj (SVD rank 128)".into(), rows, cols, data, approx: None, reduce: Reduce::Max, colormap: Colormap::Viridis, vmax: None }
}

/// Layers × methods relative errors, one missing cell.
pub fn layer_map() -> LayerMap {
    let methods = ["svd", "tt (χ=64)", "tucker", "cp", "int8"];
    let n = 16;
    let mut values = Vec::new();
    for l in 0..n {
        for (j, _) in methods.iter().enumerate() {
            let base = [0.12, 0.21, 0.17, 0.30, 0.012][j];
            let v = base * (1.0 + 0.6 * ((l as f64) / 5.0).sin().abs()) * (1.0 + l as f64 / 30.0);
            values.push(if l == 5 && j == 3 { f64::NAN } else { v });
        }
    }
    LayerMap {
        title: "Relative error per layer and method".into(),
        row_labels: (0..n).map(|l| format!("layer {l}")).collect(),
        col_labels: methods.iter().map(|s| s.to_string()).collect(),
        values,
        log_color: false,
        colormap: Colormap::Viridis,
    }
}

/// Error vs parameter ratio for four methods.
pub fn curves() -> Curves {
    let ratios: [f64; 7] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7];
    let make = |label: &str, a: f64, p: f64| Line { label: label.into(), points: ratios.iter().map(|&x| (x, a * (1.0 - x).powf(p) + 0.002)).collect() };
    Curves {
        title: "Reconstruction error vs parameter ratio".into(),
        x_label: "parameter ratio (compressed / original)".into(),
        y_label: "relative Frobenius error".into(),
        lines: vec![make("svd", 0.6, 2.0), make("tt / mpo", 0.7, 1.6), make("tucker", 0.65, 1.8), make("cp", 0.8, 1.2)],
        log_y: true,
    }
}
