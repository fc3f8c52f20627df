//! A stored factor: a row-major f32 tensor with a shape, or its quantized form.

use crate::quant::{QuantSpec, Quantized};

#[derive(Debug, Clone, PartialEq)]
pub enum FactorData {
    F32(Vec<f32>),
    Quantized(Quantized),
}

/// One factor of a factorization (a matrix, an MPO core, a Tucker core…), row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Factor {
    pub shape: Vec<usize>,
    pub data: FactorData,
}

impl Factor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data: FactorData::F32(data) }
    }
    pub fn from_f64(shape: Vec<usize>, data: &[f64]) -> Self {
        Self::new(shape, data.iter().map(|&v| v as f32).collect())
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Values as f32 (dequantized if needed).
    pub fn values(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.data {
            FactorData::F32(v) => std::borrow::Cow::Borrowed(v),
            FactorData::Quantized(q) => std::borrow::Cow::Owned(q.dequantize()),
        }
    }
    pub fn bytes(&self) -> usize {
        match &self.data {
            FactorData::F32(v) => 4 * v.len(),
            FactorData::Quantized(q) => q.bytes(),
        }
    }
    pub fn quantize(&self, spec: &QuantSpec) -> crate::Result<Self> {
        let q = Quantized::quantize(&self.values(), &self.shape, spec)?;
        Ok(Self { shape: self.shape.clone(), data: FactorData::Quantized(q) })
    }
    pub fn is_quantized(&self) -> bool {
        matches!(self.data, FactorData::Quantized(_))
    }
}
