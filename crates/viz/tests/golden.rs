//! Golden-image tests: each chart kind, rendered from fixed inputs on this machine's
//! adapter (lavapipe in CI), must match the PNG under tests/golden/ within a tolerance:
//! at most 2% of pixels may differ by more than 8/255 in any channel.
//!
//! `UPDATE_GOLDEN=1 cargo test -p compactor-viz --test golden` (re)writes the goldens;
//! without it a missing golden is a failure. On a mismatch the rendered image is
//! written next to the target dir's tmp folder for inspection.

mod common;

use compactor_viz::{Renderer, RgbaImage};
use std::path::PathBuf;
use std::sync::OnceLock;

const MAX_BAD_FRACTION: f64 = 0.02;
const CHANNEL_TOL: u8 = 8;

fn renderer() -> &'static Renderer {
    static R: OnceLock<Renderer> = OnceLock::new();
    R.get_or_init(|| Renderer::new().expect("a wgpu adapter (install mesa-vulkan-drivers for lavapipe)"))
}

/// Fraction of pixels whose largest channel difference exceeds `tol`.
fn bad_fraction(a: &RgbaImage, b: &RgbaImage, tol: u8) -> f64 {
    assert_eq!((a.width, a.height), (b.width, b.height), "image sizes differ");
    let bad = a
        .pixels
        .chunks(4)
        .zip(b.pixels.chunks(4))
        .filter(|(p, q)| p.iter().zip(q.iter()).any(|(x, y)| x.abs_diff(*y) > tol))
        .count();
    bad as f64 / (a.width * a.height) as f64
}

fn check_golden(name: &str, img: &RgbaImage) {
    let path = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR"))).join("tests/golden").join(format!("{name}.png"));
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        img.save_png(&path).unwrap();
        eprintln!("wrote golden {}", path.display());
        return;
    }
    assert!(path.exists(), "golden {} is missing; run with UPDATE_GOLDEN=1 to create it", path.display());
    let golden = RgbaImage::load_png(&path).unwrap();
    let frac = bad_fraction(img, &golden, CHANNEL_TOL);
    if frac > MAX_BAD_FRACTION {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.actual.png"));
        img.save_png(&out).unwrap();
        panic!("{name}: {:.2}% of pixels differ from {} (limit {:.0}%); rendered image at {}", frac * 100.0, path.display(), MAX_BAD_FRACTION * 100.0, out.display());
    }
}

#[test]
fn spectra_matches_golden() {
    let img = renderer().render_spectra(&common::spectra(), 720, 440, 1.0).unwrap();
    assert_eq!((img.width, img.height), (720, 440));
    check_golden("spectra", &img);
}

#[test]
fn heatmap_matches_golden() {
    let img = renderer().render_heatmap(&common::heatmap(), 640, 480, 1.0).unwrap();
    check_golden("heatmap", &img);
}

#[test]
fn layer_map_matches_golden() {
    let img = renderer().render_layer_map(&common::layer_map(), 640, 520, 1.0).unwrap();
    check_golden("layer-map", &img);
}

#[test]
fn curves_matches_golden() {
    let img = renderer().render_curves(&common::curves(), 720, 440, 1.0).unwrap();
    check_golden("curves", &img);
}

#[test]
fn the_comparison_can_fail() {
    // The tolerance must catch a real change: a chart with a different title differs.
    let r = renderer();
    let a = r.render_curves(&common::curves(), 400, 300, 1.0).unwrap();
    let mut other = common::curves();
    other.lines.pop();
    let b = r.render_curves(&other, 400, 300, 1.0).unwrap();
    assert!(bad_fraction(&a, &b, CHANNEL_TOL) > MAX_BAD_FRACTION);
    assert_eq!(bad_fraction(&a, &a, CHANNEL_TOL), 0.0);
}

#[test]
fn scale_two_doubles_pixels_with_the_same_layout() {
    let r = renderer();
    let one = r.render_curves(&common::curves(), 360, 240, 1.0).unwrap();
    let two = r.render_curves(&common::curves(), 360, 240, 2.0).unwrap();
    assert_eq!((two.width, two.height), (720, 480));
    // Downsample the 2x image by 2x2 averaging: it must look like the 1x image.
    let mut down = RgbaImage { width: 360, height: 240, pixels: vec![0; 360 * 240 * 4] };
    for y in 0..240 {
        for x in 0..360 {
            for ch in 0..4 {
                let s: u32 = [(0, 0), (1, 0), (0, 1), (1, 1)].iter().map(|(dx, dy)| two.pixel(2 * x + dx, 2 * y + dy)[ch] as u32).sum();
                down.pixels[((y * 360 + x) * 4) as usize + ch] = (s / 4) as u8;
            }
        }
    }
    // Text and lines are hinted per resolution, so allow more pixels off, but the layout
    // (axes, frame, legend) must line up.
    let frac = bad_fraction(&down, &one, 48);
    assert!(frac < 0.05, "{:.2}% of pixels differ", frac * 100.0);
}
