//! Chart images for the page: PNG data URLs, and where the plot area of a rendered chart is (so
//! the page can map the pointer to data for its hover readout).

use base64::Engine;
use compactor_viz::RgbaImage;
use serde::Serialize;

/// A rendered chart as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ChartImage {
    /// `data:image/png;base64,…`
    pub url: String,
    /// Pixel size of the image.
    pub width: u32,
    pub height: u32,
    /// The plot area in image pixels `[x0, y0, x1, y1]`, when it could be found.
    pub plot: Option<[u32; 4]>,
}

pub fn png_bytes(img: &RgbaImage) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width, img.height);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| format!("PNG encoding failed: {e}"))?;
        w.write_image_data(&img.pixels).map_err(|e| format!("PNG encoding failed: {e}"))?;
    }
    Ok(out)
}

pub fn data_url(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

pub fn chart(img: &RgbaImage) -> Result<ChartImage, String> {
    Ok(ChartImage { url: data_url(&png_bytes(img)?), width: img.width, height: img.height, plot: plot_rect(img) })
}

/// The frame of the plot area: compactor-viz draws it as a 1-point grey line (rgb 110) around
/// the plot. Rows whose longest run of frame-grey pixels spans a good part of the width are the
/// top and bottom edges; the bottom edge's run gives the left and right edges.
pub fn plot_rect(img: &RgbaImage) -> Option<[u32; 4]> {
    let (w, h) = (img.width as usize, img.height as usize);
    if w < 16 || h < 16 {
        return None;
    }
    let greyish = |x: usize, y: usize| {
        let i = (y * w + x) * 4;
        let (r, g, b) = (img.pixels[i] as i32, img.pixels[i + 1] as i32, img.pixels[i + 2] as i32);
        (r - g).abs() < 14 && (g - b).abs() < 14 && (60..=205).contains(&r)
    };
    let min_run = w * 3 / 10;
    let mut rows: Vec<(usize, usize, usize)> = Vec::new(); // (y, start, len)
    for y in 0..h {
        let (mut best, mut best_start, mut run, mut start) = (0, 0, 0, 0);
        for x in 0..w {
            if greyish(x, y) {
                if run == 0 {
                    start = x;
                }
                run += 1;
                if run > best {
                    best = run;
                    best_start = start;
                }
            } else {
                run = 0;
            }
        }
        if best >= min_run {
            rows.push((y, best_start, best));
        }
    }
    let first = rows.first()?;
    let last = rows.last()?;
    if last.0 <= first.0 + 8 {
        return None;
    }
    Some([last.1 as u32, first.0 as u32, (last.1 + last.2) as u32, last.0 as u32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_drawn_frame() {
        let (w, h) = (200u32, 100u32);
        let mut px = vec![255u8; (w * h * 4) as usize];
        let mut set = |x: u32, y: u32| {
            let i = ((y * w + x) * 4) as usize;
            px[i..i + 3].copy_from_slice(&[110, 110, 110]);
        };
        for x in 30..180 {
            set(x, 10);
            set(x, 80);
        }
        for y in 10..=80 {
            set(30, y);
            set(179, y);
        }
        let img = RgbaImage { width: w, height: h, pixels: px };
        assert_eq!(plot_rect(&img), Some([30, 10, 180, 80]));
    }
}
