//! Group-wise integer quantization of a dense matrix or of any factor.
//!
//! A factor is a row-major tensor; groups of `group_size` consecutive values run along its LAST
//! axis (for a weight W (m × n) that is the input dimension n); the last group of a row may be
//! shorter. Per group:
//!
//! - symmetric: `scale = max|w| / qmax` (`qmax` = 127 for int8, 7 for int4), `q = round(w/scale)`
//!   in `[-qmax, qmax]`, `ŵ = scale·q`;
//! - asymmetric: `scale = (max − min) / (2^bits − 1)`, `q = round((w − min)/scale)` in
//!   `[0, 2^bits − 1]`, `ŵ = min + scale·q` (the offset `min` is stored as f32, so no clamping).
//!
//! Round-trip bound: `|w − ŵ| ≤ scale/2` per element (plus f32 rounding), see [`Quantized::error_bound`].
//! Storage: int8 codes one byte each, int4 codes two per byte (low nibble first), per-group f32
//! scales (and f32 mins when asymmetric).
//!
//! ```
//! use compactor_decomp::quant::{QuantSpec, Quantized, Bits};
//! let w: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
//! let spec = QuantSpec { bits: Bits::Int8, group_size: 32, symmetric: true };
//! let q = Quantized::quantize(&w, &[2, 32], &spec).unwrap();
//! let back = q.dequantize();
//! let bound = q.error_bound();
//! assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() <= bound * 1.0001 + 1e-7));
//! ```

use crate::error::{DecompError, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bits {
    Int8,
    Int4,
}

impl Bits {
    pub fn bits(self) -> u32 {
        match self {
            Bits::Int8 => 8,
            Bits::Int4 => 4,
        }
    }
}

/// How to quantize: bit width, group size along the last axis (32, 64 or 128), symmetric or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantSpec {
    pub bits: Bits,
    pub group_size: usize,
    pub symmetric: bool,
}

impl QuantSpec {
    pub fn validate(&self) -> Result<()> {
        if ![32, 64, 128].contains(&self.group_size) {
            return Err(DecompError::BadQuant(format!("group size {} (use 32, 64 or 128)", self.group_size)));
        }
        Ok(())
    }
    fn qmax_sym(&self) -> f32 {
        ((1u32 << (self.bits.bits() - 1)) - 1) as f32
    }
    fn levels(&self) -> f32 {
        ((1u32 << self.bits.bits()) - 1) as f32
    }
    /// Bytes used to store a tensor of `shape` with this spec.
    pub fn bytes_for(&self, shape: &[usize]) -> usize {
        let (rows, cols) = rows_cols(shape);
        let groups = cols.div_ceil(self.group_size);
        let code_bytes = match self.bits {
            Bits::Int8 => cols,
            Bits::Int4 => cols.div_ceil(2),
        };
        rows * code_bytes + rows * groups * 4 * if self.symmetric { 1 } else { 2 }
    }
}

pub(crate) fn rows_cols(shape: &[usize]) -> (usize, usize) {
    let cols = *shape.last().unwrap_or(&1);
    let total: usize = shape.iter().product();
    (if cols == 0 { 0 } else { total / cols }, cols)
}

/// A quantized tensor: codes + per-group scales (+ mins if asymmetric).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub spec: QuantSpec,
    /// Logical shape of the tensor (row-major); groups run along the last axis.
    pub shape: Vec<usize>,
    /// rows × packed_cols bytes (int8: two's-complement i8 for symmetric, u8 for asymmetric; int4:
    /// two nibbles per byte, low nibble first, symmetric codes stored with +8 offset).
    pub codes: Vec<u8>,
    /// rows × groups
    pub scales: Vec<f32>,
    /// rows × groups, asymmetric only (empty otherwise)
    pub mins: Vec<f32>,
}

impl Quantized {
    pub fn quantize(data: &[f32], shape: &[usize], spec: &QuantSpec) -> Result<Self> {
        spec.validate()?;
        let (rows, cols) = rows_cols(shape);
        if rows * cols != data.len() {
            return Err(DecompError::Shape(format!("{} values for shape {shape:?}", data.len())));
        }
        let g = spec.group_size;
        let groups = cols.div_ceil(g);
        let mut scales = Vec::with_capacity(rows * groups);
        let mut mins = Vec::new();
        let mut q = vec![0i32; rows * cols];
        for r in 0..rows {
            for gi in 0..groups {
                let lo = r * cols + gi * g;
                let hi = r * cols + ((gi + 1) * g).min(cols);
                let seg = &data[lo..hi];
                if spec.symmetric {
                    let amax = seg.iter().fold(0f32, |a, &v| a.max(v.abs()));
                    let scale = if amax > 0.0 { amax / spec.qmax_sym() } else { 0.0 };
                    scales.push(scale);
                    let qm = spec.qmax_sym();
                    for (k, &v) in seg.iter().enumerate() {
                        q[lo + k] = if scale > 0.0 { (v / scale).round().clamp(-qm, qm) as i32 } else { 0 };
                    }
                } else {
                    let mn = seg.iter().cloned().fold(f32::INFINITY, f32::min);
                    let mx = seg.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let scale = if mx > mn { (mx - mn) / spec.levels() } else { 0.0 };
                    scales.push(scale);
                    mins.push(mn);
                    for (k, &v) in seg.iter().enumerate() {
                        q[lo + k] = if scale > 0.0 { ((v - mn) / scale).round().clamp(0.0, spec.levels()) as i32 } else { 0 };
                    }
                }
            }
        }
        let codes = match spec.bits {
            Bits::Int8 => q.iter().map(|&v| v as i8 as u8).collect(),
            Bits::Int4 => {
                let pc = cols.div_ceil(2);
                let mut out = vec![0u8; rows * pc];
                let off = if spec.symmetric { 8 } else { 0 };
                for r in 0..rows {
                    for c in 0..cols {
                        let nib = ((q[r * cols + c] + off) as u8) & 0x0f;
                        out[r * pc + c / 2] |= if c % 2 == 0 { nib } else { nib << 4 };
                    }
                }
                out
            }
        };
        Ok(Self { spec: *spec, shape: shape.to_vec(), codes, scales, mins })
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = rows_cols(&self.shape);
        let g = self.spec.group_size;
        let groups = cols.div_ceil(g);
        let mut out = Vec::with_capacity(rows * cols);
        let pc = cols.div_ceil(2);
        for r in 0..rows {
            for c in 0..cols {
                let code: i32 = match self.spec.bits {
                    Bits::Int8 => {
                        let b = self.codes[r * cols + c];
                        if self.spec.symmetric { b as i8 as i32 } else { b as i32 }
                    }
                    Bits::Int4 => {
                        let b = self.codes[r * pc + c / 2];
                        let nib = if c % 2 == 0 { b & 0x0f } else { b >> 4 } as i32;
                        if self.spec.symmetric { nib - 8 } else { nib }
                    }
                };
                let gi = r * groups + c / g;
                let s = self.scales[gi];
                out.push(if self.spec.symmetric { s * code as f32 } else { self.mins[gi] + s * code as f32 });
            }
        }
        out
    }

    /// Largest per-element round-trip error: `max scale / 2` over the groups.
    pub fn error_bound(&self) -> f32 {
        self.scales.iter().fold(0f32, |a, &s| a.max(s)) / 2.0
    }

    /// Per-group bound `scale/2`, rows × groups.
    pub fn group_bounds(&self) -> Vec<f32> {
        self.scales.iter().map(|s| s / 2.0).collect()
    }

    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * (self.scales.len() + self.mins.len())
    }
}

impl Quantized {
    pub(crate) fn symmetric_spec(&self) -> bool {
        self.spec.symmetric
    }
}
