//! The renderer's output: a plain RGBA8 buffer, savable as PNG.

use crate::VizError;
use std::path::Path;

/// An RGBA8 image, rows top to bottom, 4 bytes per pixel, straight (non-premultiplied)
/// alpha; charts are opaque.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbaImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl RgbaImage {
    /// Writes the image as an 8-bit RGBA PNG file.
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<(), VizError> {
        let path = path.as_ref();
        let err = |e: &dyn std::fmt::Display| VizError::Png { path: path.display().to_string(), detail: e.to_string() };
        let file = std::fs::File::create(path).map_err(|e| err(&e))?;
        let w = std::io::BufWriter::new(file);
        let mut enc = png::Encoder::new(w, self.width, self.height);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| err(&e))?;
        writer.write_image_data(&self.pixels).map_err(|e| err(&e))?;
        writer.finish().map_err(|e| err(&e))?;
        Ok(())
    }

    /// Reads an 8-bit RGB or RGBA PNG file (as written by [`Self::save_png`]).
    pub fn load_png(path: impl AsRef<Path>) -> Result<RgbaImage, VizError> {
        let path = path.as_ref();
        let err = |e: &dyn std::fmt::Display| VizError::Png { path: path.display().to_string(), detail: e.to_string() };
        let file = std::fs::File::open(path).map_err(|e| err(&e))?;
        let mut reader = png::Decoder::new(std::io::BufReader::new(file)).read_info().map_err(|e| err(&e))?;
        let size = reader.output_buffer_size().ok_or_else(|| err(&"image too large"))?;
        let mut buf = vec![0u8; size];
        let info = reader.next_frame(&mut buf).map_err(|e| err(&e))?;
        buf.truncate(info.buffer_size());
        let pixels = match (info.color_type, info.bit_depth) {
            (png::ColorType::Rgba, png::BitDepth::Eight) => buf,
            (png::ColorType::Rgb, png::BitDepth::Eight) => buf.chunks(3).flat_map(|c| [c[0], c[1], c[2], 255]).collect(),
            other => return Err(err(&format!("unsupported PNG format {other:?}"))),
        };
        Ok(RgbaImage { width: info.width, height: info.height, pixels })
    }

    /// The pixel at (x, y) as [r, g, b, a].
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 4] {
        let i = ((y * self.width + x) * 4) as usize;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2], self.pixels[i + 3]]
    }
}
