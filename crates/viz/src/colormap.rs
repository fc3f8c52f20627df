//! Perceptual color maps (matplotlib's viridis and magma, as 9 stops interpolated
//! into 256-entry lookup tables) shared by the GPU heatmap shader and the CPU paths.

use crate::Colormap;

const VIRIDIS: [u32; 9] = [0x440154, 0x472d7b, 0x3b528b, 0x2c728e, 0x21918c, 0x28ae80, 0x5ec962, 0xaddc30, 0xfde725];
const MAGMA: [u32; 9] = [0x000004, 0x1c1044, 0x4f127b, 0x812581, 0xb5367a, 0xe55064, 0xfb8761, 0xfec287, 0xfcfdbf];

fn stops(map: Colormap) -> &'static [u32; 9] {
    match map {
        Colormap::Viridis => &VIRIDIS,
        Colormap::Magma => &MAGMA,
    }
}

/// Color at `t` in [0, 1] (clamped), as [r, g, b], interpolated between the stops.
pub fn sample(map: Colormap, t: f32) -> [u8; 3] {
    let s = stops(map);
    let t = t.clamp(0.0, 1.0) * (s.len() - 1) as f32;
    let i = (t.floor() as usize).min(s.len() - 2);
    let f = t - i as f32;
    let ch = |c: u32, k: u32| ((c >> (16 - 8 * k)) & 0xff) as f32;
    let mut out = [0u8; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let a = ch(s[i], k as u32);
        let b = ch(s[i + 1], k as u32);
        *o = (a + (b - a) * f).round() as u8;
    }
    out
}

/// The 256-entry table, each entry RGBA8 packed little-endian (r in the low byte), as
/// WGSL's `unpack4x8unorm` reads it.
pub fn lut(map: Colormap) -> [u32; 256] {
    let mut l = [0u32; 256];
    for (i, e) in l.iter_mut().enumerate() {
        let [r, g, b] = sample(map, i as f32 / 255.0);
        *e = u32::from_le_bytes([r, g, b, 255]);
    }
    l
}

/// Table index of value `v` on the scale [vmin, vmax]: the formula of `heatmap.wgsl`.
#[inline]
pub fn lut_index(v: f32, vmin: f32, vmax: f32) -> usize {
    let span = (vmax - vmin).max(1e-30);
    let t = ((v - vmin) / span).clamp(0.0, 1.0);
    ((t * 255.0 + 0.5) as usize).min(255)
}

/// Color-maps reduced values into RGBA8 pixels on the CPU, exactly like the shader.
pub fn map_values(values: &[f32], vmin: f32, vmax: f32, map: Colormap) -> Vec<u8> {
    let l = lut(map);
    let mut out = Vec::with_capacity(values.len() * 4);
    for &v in values {
        out.extend_from_slice(&l[lut_index(v, vmin, vmax)].to_le_bytes());
    }
    out
}
