//! One abstraction for every linear layer of the model: `y = x Wᵀ + b`, with W of shape
//! (out_features m, in_features n) as in Hugging Face checkpoints, x of shape (…, n) and y of
//! shape (…, m).
//!
//! The model code only ever calls [`Linear::forward`]; how W is stored is the variant's
//! business. Today: [`Linear::Dense`] (W itself) and [`Linear::LowRank`] (W ≈ A·B with A m×r,
//! B r×n, applied as (x Bᵀ) Aᵀ so that W is never formed). The tensor-network variants are added
//! next to them without touching the model.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use compactor_core::linear::Linear;
//! let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu).unwrap(); // 3×2
//! let lin = Linear::dense(w, None);
//! let x = Tensor::new(&[[1f32, 1.]], &Device::Cpu).unwrap();
//! assert_eq!(lin.forward(&x).unwrap().to_vec2::<f32>().unwrap(), vec![vec![3., 7., 11.]]);
//! assert_eq!((lin.out_features(), lin.in_features()), (3, 2));
//! ```

use candle_core::{Result, Tensor, D};

/// A linear layer in one of its storage forms.
#[derive(Debug, Clone)]
pub enum Linear {
    /// W (m × n), dense.
    Dense { w: Tensor, bias: Option<Tensor> },
    /// W ≈ A B, A (m × r), B (r × n). `rank` is the fitted r; on CUDA the tensors may carry
    /// zero padding up to a multiple of 8 (see `gpu::pad_rank`), which `params` does not count.
    LowRank { a: Tensor, b: Tensor, rank: usize, bias: Option<Tensor> },
    /// Tensor train / MPO: cores G_t (χ_{t-1}, m_t, n_t, χ_t), m = Π m_t, n = Π n_t. `halves`:
    /// the layer cut in two at one bond, made at the first CPU decode step (see [`MpoCache`]).
    Mpo { cores: Vec<Tensor>, m: usize, n: usize, bias: Option<Tensor>, halves: MpoCache },
    /// Tucker over the interleaved modes (m1, n1, m2, n2, …): core (r_1..r_2k), factors U_d (dim_d × r_d).
    /// `matrix`: the core as a matrix, made at the first decode step (see [`CoreCache`]).
    Tucker { core: Tensor, factors: Vec<Tensor>, m: usize, n: usize, bias: Option<Tensor>, matrix: CoreCache },
    /// CP over the interleaved modes: weights λ (R), factors A_d (dim_d × R).
    Cp { weights: Tensor, factors: Vec<Tensor>, m: usize, n: usize, bias: Option<Tensor> },
    /// Symmetric int8 weights kept as codes ([`Int8Weight`]): W itself (`b` is `None`), or
    /// W ≈ A B with A (m × r) and B (r × n) — r zero-padded to a multiple of 16, `rank` the fitted
    /// r. Made for bf16 on CUDA ([`int8_linear`]), where the decode kernels read the codes; candle
    /// ops dequantize them at every call.
    Int8 { a: Int8Weight, b: Option<Int8Weight>, rank: usize, bias: Option<Tensor> },
}

/// A matrix of symmetric group-wise int8 codes, as `compactor-decomp`'s quantization stores it
/// (w = scale · q, q in [−127, 127], one f32 scale per `group` consecutive columns of a row), held
/// for the GPU decode kernels: `codes` (U8, rows × cols) in offset binary (q + 128), `scales`
/// (F32, rows × ⌈cols / group⌉).
#[derive(Debug, Clone)]
pub struct Int8Weight {
    pub codes: Tensor,
    pub scales: Tensor,
    pub group: usize,
}

impl Int8Weight {
    /// From a symmetric int8 matrix, zero-padded (codes of 0, scales of 0) to `rows` × `cols`;
    /// `None` for another quantization or shape.
    pub fn from_quantized(q: &compactor_decomp::quant::Quantized, rows: usize, cols: usize, device: &candle_core::Device) -> Result<Option<Self>> {
        let &[r0, c0] = q.shape.as_slice() else { return Ok(None) };
        let g = q.spec.group_size;
        let groups = c0.div_ceil(g);
        let stored = q.codes.len() == r0 * c0 && q.scales.len() == r0 * groups;
        if q.spec.bits != compactor_decomp::quant::Bits::Int8 || !q.spec.symmetric || !stored || r0 > rows || c0 > cols || cols.div_ceil(g) != groups {
            return Ok(None);
        }
        let mut codes = vec![128u8; rows * cols];
        let mut scales = vec![0f32; rows * groups];
        for i in 0..r0 {
            // two's complement i8 → offset binary
            for (d, &c) in codes[i * cols..i * cols + c0].iter_mut().zip(&q.codes[i * c0..(i + 1) * c0]) {
                *d = c ^ 0x80;
            }
            scales[i * groups..(i + 1) * groups].copy_from_slice(&q.scales[i * groups..(i + 1) * groups]);
        }
        Ok(Some(Int8Weight { codes: Tensor::from_vec(codes, (rows, cols), device)?, scales: Tensor::from_vec(scales, (rows, groups), device)?, group: g }))
    }

    /// (rows, cols) of the codes.
    pub fn dims(&self) -> Result<(usize, usize)> {
        self.codes.dims2()
    }

    /// The matrix the codes stand for, in `dtype` (candle ops: the codes in f32, times the
    /// scales spread over their groups).
    pub fn dequantize(&self, dtype: candle_core::DType) -> Result<Tensor> {
        let (rows, cols) = self.dims()?;
        let groups = self.scales.dim(1)?;
        let q = self.codes.to_dtype(candle_core::DType::F32)?.affine(1.0, -128.0)?;
        let s = self.scales.unsqueeze(2)?.broadcast_as((rows, groups, self.group))?.reshape((rows, groups * self.group))?.narrow(1, 0, cols)?;
        (q * s)?.to_dtype(dtype)
    }
}

/// An [`Linear::Int8`] for a dense or low-rank factorization whose factors are all symmetric int8
/// (the input width a multiple of 16, as the decode kernels read it; the rank is padded to one)
/// and no bias (the decode step graph takes no biases, and candle ops would dequantize the codes
/// at every call); `None` for anything else.
/// `COMPACTOR_INT8_DECODE=0` turns it off (the factors are then dequantized on load).
pub fn int8_linear(f: &compactor_decomp::Factorization, bias: Option<Tensor>, device: &candle_core::Device) -> Result<Option<Linear>> {
    use compactor_decomp::factor::FactorData;
    use compactor_decomp::Factorization as F;
    if bias.is_some() || std::env::var("COMPACTOR_INT8_DECODE").is_ok_and(|v| v == "0") {
        return Ok(None);
    }
    let q = |fac: &compactor_decomp::Factor, rows: usize, cols: usize| match &fac.data {
        FactorData::Quantized(q) => Int8Weight::from_quantized(q, rows, cols, device),
        FactorData::F32(_) => Ok(None),
    };
    Ok(match f {
        F::Dense { m, n, weight } if n % 16 == 0 => q(weight, *m, *n)?.map(|a| Linear::Int8 { a, b: None, rank: 0, bias }),
        F::LowRank { m, n, a, b } if n % 16 == 0 && a.shape.len() == 2 => {
            let r = a.shape[1];
            let r16 = r.next_multiple_of(16);
            match (q(a, *m, r16)?, q(b, r16, *n)?) {
                (Some(a), Some(b)) => Some(Linear::Int8 { a, b: Some(b), rank: r, bias }),
                _ => None,
            }
        }
        _ => None,
    })
}

impl Linear {
    pub fn dense(w: Tensor, bias: Option<Tensor>) -> Self {
        Linear::Dense { w, bias }
    }

    /// W ≈ A B. On CUDA in bf16 the rank is zero-padded to a multiple of 8 for the decode kernel.
    pub fn low_rank(a: Tensor, b: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let rank = a.dim(1)?;
        #[cfg(feature = "cuda")]
        let (a, b) = if a.device().is_cuda() && a.dtype() == candle_core::DType::BF16 { crate::gpu::pad_rank(a, b)? } else { (a, b) };
        Ok(Linear::LowRank { a, b, rank, bias })
    }

    pub fn out_features(&self) -> usize {
        match self {
            Linear::Dense { w, .. } => w.dims()[0],
            Linear::LowRank { a, .. } => a.dims()[0],
            Linear::Int8 { a, .. } => a.codes.dims()[0],
            Linear::Mpo { m, .. } | Linear::Tucker { m, .. } | Linear::Cp { m, .. } => *m,
        }
    }

    pub fn in_features(&self) -> usize {
        match self {
            Linear::Dense { w, .. } => w.dims()[1],
            Linear::LowRank { b, .. } => b.dims()[1],
            Linear::Int8 { a, b, .. } => b.as_ref().unwrap_or(a).codes.dims()[1],
            Linear::Mpo { n, .. } | Linear::Tucker { n, .. } | Linear::Cp { n, .. } => *n,
        }
    }

    /// Parameters stored (weights and bias).
    pub fn params(&self) -> usize {
        let bias = self.bias().map(|b| b.elem_count()).unwrap_or(0);
        match self {
            Linear::LowRank { rank, .. } | Linear::Int8 { rank, b: Some(_), .. } => return bias + rank * (self.out_features() + self.in_features()),
            Linear::Int8 { b: None, .. } => return bias + self.out_features() * self.in_features(),
            _ => {}
        }
        bias + self.factors().iter().map(|t| t.elem_count()).sum::<usize>()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Linear::Dense { bias, .. }
            | Linear::LowRank { bias, .. }
            | Linear::Mpo { bias, .. }
            | Linear::Tucker { bias, .. }
            | Linear::Cp { bias, .. }
            | Linear::Int8 { bias, .. } => bias.as_ref(),
        }
    }

    /// The tensors that a fine-tune may train (the weight or its factors, not the bias).
    pub fn factors(&self) -> Vec<&Tensor> {
        match self {
            Linear::Dense { w, .. } => vec![w],
            Linear::LowRank { a, b, .. } => vec![a, b],
            Linear::Mpo { cores, .. } => cores.iter().collect(),
            Linear::Tucker { core, factors, .. } => std::iter::once(core).chain(factors).collect(),
            Linear::Cp { weights, factors, .. } => std::iter::once(weights).chain(factors).collect(),
            Linear::Int8 { a, b, .. } => std::iter::once(a).chain(b).flat_map(|w| [&w.codes, &w.scales]).collect(),
        }
    }

    /// Mutable access to the same tensors as [`Linear::factors`], in the same order.
    pub fn factors_mut(&mut self) -> Vec<&mut Tensor> {
        match self {
            Linear::Dense { w, .. } => vec![w],
            Linear::LowRank { a, b, .. } => vec![a, b],
            Linear::Mpo { cores, halves, .. } => {
                *halves = MpoCache::default();
                cores.iter_mut().collect()
            }
            Linear::Tucker { core, factors, matrix, .. } => {
                *matrix = CoreCache::default();
                std::iter::once(core).chain(factors.iter_mut()).collect()
            }
            Linear::Cp { weights, factors, .. } => std::iter::once(weights).chain(factors.iter_mut()).collect(),
            Linear::Int8 { a, b, .. } => std::iter::once(a).chain(b.as_mut()).flat_map(|w| [&mut w.codes, &mut w.scales]).collect(),
        }
    }

    /// y = x Wᵀ + b for x of shape (…, n).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, n))?;
        let y = match self {
            Linear::Dense { w, .. } => match gemv(&x2, w)? {
                Some(y) => y,
                None => x2.matmul(&w.t()?)?,
            },
            Linear::LowRank { a, b, .. } => match low_rank_gemv(&x2, b, a)? {
                Some(y) => y,
                None => x2.matmul(&b.t()?)?.matmul(&a.t()?)?,
            },
            // many rows (prefill, evaluation, training): contract the factors with each other
            // first (m·n·χ), then one GEMM; site by site, every site streams rows × m × χ-sized
            // temporaries through permuted copies (10–15× slower on a CPU at 1024 rows)
            Linear::Mpo { .. } | Linear::Tucker { .. } | Linear::Cp { .. } if rows >= FACTORS_FIRST_ROWS => x2.matmul(&self.to_dense()?.t()?)?,
            Linear::Mpo { cores, halves, .. } => match halves.get(cores)? {
                Some(h) => h.apply(&x2)?,
                None => mpo_apply(cores, &x2)?,
            },
            Linear::Tucker { core, factors, m, matrix, .. } => match matrix.get(core)? {
                Some(c) => tucker_apply(c, core, factors, *m, &x2)?,
                None => tucker_apply(&interleaved_matrix(core)?, core, factors, *m, &x2)?,
            },
            Linear::Cp { weights, factors, m, .. } => cp_apply(weights, factors, *m, &x2)?,
            Linear::Int8 { a, b, .. } => {
                let dt = x2.dtype();
                let x2 = match b {
                    Some(b) => x2.matmul(&b.dequantize(dt)?.t()?)?,
                    None => x2,
                };
                x2.matmul(&a.dequantize(dt)?.t()?)?
            }
        };
        let y = match self.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(D::Minus1)?;
        y.reshape(out)
    }

    /// The dense W (m × n) this layer stands for, contracted from its factors (export, checks,
    /// and `forward` on many rows).
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Linear::Dense { w, .. } => Ok(w.clone()),
            Linear::LowRank { a, b, .. } => Ok(a.matmul(b)?),
            Linear::Mpo { cores, .. } => {
                let rd: Vec<usize> = cores.iter().map(|g| g.dim(1)).collect::<candle_core::Result<_>>()?;
                let cd: Vec<usize> = cores.iter().map(|g| g.dim(2)).collect::<candle_core::Result<_>>()?;
                Ok(mpo_dense(cores, &rd, &cd)?)
            }
            Linear::Tucker { core, factors, m, n, .. } => tucker_dense(core, factors, *m, *n),
            Linear::Cp { weights, factors, .. } => cp_dense(weights, factors),
            Linear::Int8 { a, b, .. } => {
                let a = a.dequantize(candle_core::DType::F32)?;
                match b {
                    Some(b) => a.matmul(&b.dequantize(candle_core::DType::F32)?),
                    None => Ok(a),
                }
            }
        }
    }
}

/// `x Wᵀ` through the CUDA decode kernel where it applies (decode steps in bf16), else `None`.
#[cfg(feature = "cuda")]
fn gemv(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    crate::gpu::gemv(x, w)
}

#[cfg(feature = "cuda")]
fn low_rank_gemv(x: &Tensor, b: &Tensor, a: &Tensor) -> Result<Option<Tensor>> {
    crate::gpu::low_rank_gemv(x, b, a)
}

/// Which CUDA kernel decode steps use: 0 cuBLAS GEMM, 1 CUDA-core GEMV, 2 tensor-core GEMV,
/// 3 auto (the default; `COMPACTOR_GEMV` sets the start value), so that a benchmark can
/// compare them in one run. No effect without CUDA.
pub fn set_decode_kernel(mode: u8) {
    #[cfg(feature = "cuda")]
    crate::gpu::set_gemv_mode(mode);
    let _ = mode;
}

#[cfg(not(feature = "cuda"))]
fn gemv(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
    Ok(None)
}

#[cfg(not(feature = "cuda"))]
fn low_rank_gemv(_: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
    Ok(None)
}

/// y (B, m) = x (B, n) through MPO cores G_t (χ, m_t, n_t, χ'), contracting one site at a time:
/// the state is (P, χ, n_t·R) with P = B·m_1⋯m_{t-1} and R = n_{t+1}⋯n_k.
fn mpo_apply(cores: &[Tensor], x: &Tensor) -> Result<Tensor> {
    let (b, n) = x.dims2()?;
    let mut t = x.reshape((b, 1, n))?;
    let mut p = b;
    for g in cores {
        let (chi, mt, nt, chi2) = g.dims4()?;
        let r = t.dim(2)? / nt;
        let lhs = t.reshape((p, chi, nt, r))?.permute((0, 3, 1, 2))?.contiguous()?.reshape((p * r, chi * nt))?;
        let rhs = g.permute((0, 2, 1, 3))?.contiguous()?.reshape((chi * nt, mt * chi2))?;
        let y = lhs.matmul(&rhs)?; // (p·r, m_t·χ')
        t = y.reshape((p, r, mt, chi2))?.permute((0, 2, 3, 1))?.contiguous()?.reshape((p * mt, chi2, r))?;
        p *= mt;
    }
    t.reshape((b, p / b))
}

/// An MPO layer cut at one bond into its two halves, so that a decode step applies it as two
/// GEMMs instead of one contraction per site. With I₁, J₁ the row and column indices of the
/// sites before the cut and I₂, J₂ those after it (row-major, as in the layer), and a the bond:
/// W[(I₁, I₂), (J₁, J₂)] = Σₐ L[I₁, (J₁, a)] · R[(a, I₂), J₂].
/// Then y = x Wᵀ is Z = X Rᵀ, with X = x as (J₁ × J₂) and Z read as ((J₁, a) × I₂), then
/// y = L Z, read as (I₁ × I₂).
#[derive(Debug, Clone)]
pub(crate) struct MpoHalves {
    /// |I₁| × (|J₁|·χ)
    pub l: Tensor,
    /// (χ·|I₂|) × |J₂|
    pub r: Tensor,
    pub i1: usize,
    pub i2: usize,
    pub j1: usize,
    pub j2: usize,
    pub chi: usize,
}

impl MpoHalves {
    /// Cuts `cores` at a bond and contracts each half in f32 (returned in the cores' dtype), or
    /// `None` where no cut pays: the halves must hold no more values than the cores (true for
    /// four sites with full outer bonds, as truncated tensor trains have them, but not in
    /// general) and take no more multiply-adds per row than the site-by-site contraction (sites
    /// of very unequal sizes can make them far more). Among the cuts that pay, the one with the
    /// fewest multiply-adds.
    pub(crate) fn new(cores: &[Tensor]) -> Result<Option<MpoHalves>> {
        let k = cores.len();
        if k < 2 {
            return Ok(None);
        }
        let dims: Vec<(usize, usize, usize, usize)> = cores.iter().map(|g| g.dims4()).collect::<Result<_>>()?;
        let values: usize = cores.iter().map(|c| c.elem_count()).sum();
        // site by site, per row: site t maps (m_<t, χ_{t-1}, n_t, n_>t) to (m_<t, m_t, χ_t, n_>t)
        let site_macs: usize = (0..k)
            .map(|t| {
                let (c, mt, nt, c2) = dims[t];
                dims[..t].iter().map(|d| d.1).product::<usize>() * dims[t + 1..].iter().map(|d| d.2).product::<usize>() * c * nt * mt * c2
            })
            .sum();
        let cut = |s: usize| {
            let (i1, j1): (usize, usize) = (dims[..s].iter().map(|d| d.1).product(), dims[..s].iter().map(|d| d.2).product());
            let (i2, j2): (usize, usize) = (dims[s..].iter().map(|d| d.1).product(), dims[s..].iter().map(|d| d.2).product());
            let chi = dims[s].0;
            let (l, r) = (i1 * j1 * chi, chi * i2 * j2);
            // per row: Z = X Rᵀ (j1 rows of R's size), then y = L Z (i2 columns of L's size)
            (j1 * r + i2 * l, l + r, (i1, i2, j1, j2, chi))
        };
        let best = (1..k).map(|s| (s, cut(s))).filter(|(_, (macs, vals, _))| *vals <= values && *macs <= site_macs).min_by_key(|(_, (macs, vals, _))| (*macs, *vals));
        let Some((s, (_, _, (i1, i2, j1, j2, chi)))) = best else {
            return Ok(None);
        };
        let dtype = cores[0].dtype();
        let (f32, dev) = (candle_core::DType::F32, cores[0].device());
        let sites = |d: &[(usize, usize, usize, usize)]| d.iter().map(|d| (d.1, d.2)).collect::<Vec<_>>();
        // left: (i1, j1, …, i_s, j_s) × a, then the rows put in (I₁, J₁) order
        let acc = contract_sites(Tensor::ones((1, 1), f32, dev)?, &cores[..s])?;
        let l = interleaved_to_blocks(&acc, &sites(&dims[..s]), 0, true)?.reshape((i1, j1 * chi))?.to_dtype(dtype)?;
        // right: a × (i_{s+1}, j_{s+1}, …), then the columns put in (I₂, J₂) order
        let acc = contract_sites(Tensor::eye(chi, f32, dev)?, &cores[s..])?;
        let r = interleaved_to_blocks(&acc, &sites(&dims[s..]), chi, false)?.reshape((chi * i2, j2))?.to_dtype(dtype)?;
        Ok(Some(MpoHalves { l, r, i1, i2, j1, j2, chi }))
    }

    /// Values the two halves hold.
    #[cfg(test)]
    pub(crate) fn params(&self) -> usize {
        self.l.elem_count() + self.r.elem_count()
    }

    /// y (B, |I₁|·|I₂|) = x (B, |J₁|·|J₂|) Wᵀ through the halves (the order a decode step runs).
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let k = self.j1 * self.chi;
        let z = x.reshape((b * self.j1, self.j2))?.matmul(&self.r.t()?)?; // [B][J₁][a][I₂]
        let z = z.reshape((b, k, self.i2))?.transpose(0, 1)?.contiguous()?.reshape((k, b * self.i2))?; // [(J₁, a)][B][I₂]
        let y = self.l.matmul(&z)?; // (I₁, B·I₂)
        y.reshape((self.i1, b, self.i2))?.transpose(0, 1)?.contiguous()?.reshape((b, self.i1 * self.i2))
    }
}

/// An MPO layer's halves laid out for the fused batch-1 decode kernel (`step_mpof` in
/// `gpu_step`): one contiguous chunk per bond index a, R_a (|I₂′| × |J₂′|) then L_a
/// (|I₁′| × |J₁′|), each zero-padded to whole 16 × 16 tensor-core tiles (the zeros add nothing to
/// y), where R_a[i₂, j₂] = R[(a, i₂), j₂] and L_a[i₁, j₁] = L[i₁, (j₁, a)]. So y[i₁, i₂] =
/// Σ_a Σ_j₁ L_a[i₁, j₁] Σ_j₂ R_a[i₂, j₂] x[j₁, j₂]. Within a tile whose rows hold a multiple of
/// 8 sixteen-byte groups, group c of row r is stored at c ^ (r mod 8) ([`swizzle`]), so that the
/// kernel's `ldmatrix` reads of 8 rows hit distinct shared-memory banks after a straight copy.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct MpoFusedLayout {
    /// [χ][|I₂′|·|J₂′| + |I₁′|·|J₁′|]
    pub w: Tensor,
    pub i1: usize,
    pub i2: usize,
    pub j1: usize,
    pub j2: usize,
    pub i1p: usize,
    pub i2p: usize,
    pub j1p: usize,
    pub j2p: usize,
    pub chi: usize,
}

/// Where group `c` (8 values) of row `r` of a tile `cols` wide is stored (see [`MpoFusedLayout`]):
/// an involution, so the same map reads it back.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn swizzle(r: usize, c: usize, cols: usize) -> usize {
    if cols % 64 == 0 {
        c ^ (r % 8)
    } else {
        c
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl MpoHalves {
    /// The halves in the fused kernel's layout ([`MpoFusedLayout`]), on their device, |J₁| padded
    /// to a multiple of `j1_align` (a multiple of 16).
    pub(crate) fn fused_layout(&self, j1_align: usize) -> Result<MpoFusedLayout> {
        let (chi, i1, i2, j1, j2) = (self.chi, self.i1, self.i2, self.j1, self.j2);
        let (i1p, i2p, j1p, j2p) = (i1.next_multiple_of(16), i2.next_multiple_of(16), j1.next_multiple_of(j1_align), j2.next_multiple_of(16));
        let r = self.r.reshape((chi, i2, j2))?.pad_with_zeros(1, 0, i2p - i2)?.pad_with_zeros(2, 0, j2p - j2)?;
        let l = self.l.reshape((i1, j1, chi))?.permute((2, 0, 1))?.pad_with_zeros(1, 0, i1p - i1)?.pad_with_zeros(2, 0, j1p - j1)?;
        let (rs, ls) = (i2p * j2p, i1p * j1p);
        let w = Tensor::cat(&[r.reshape((chi, rs))?, l.reshape((chi, ls))?], 1)?;
        // the swizzle as a gather of 8-value groups (the same within every bond index's chunk)
        let mut idx = Vec::with_capacity((rs + ls) / 8);
        for (off, rows, cols) in [(0, i2p, j2p), (rs / 8, i1p, j1p)] {
            for row in 0..rows {
                for c in 0..cols / 8 {
                    idx.push((off + row * cols / 8 + swizzle(row, c, cols)) as u32);
                }
            }
        }
        let idx = Tensor::from_vec(idx, (rs + ls) / 8, w.device())?;
        let w = w.reshape((chi, (rs + ls) / 8, 8))?.index_select(&idx, 1)?.reshape((chi, rs + ls))?;
        Ok(MpoFusedLayout { w, i1, i2, j1, j2, i1p, i2p, j1p, j2p, chi })
    }
}

/// An MPO layer's halves (`MpoHalves`), made once, at its first decode step on the CPU (a few
/// rows of input), where a cut pays (see `MpoHalves::new`). Per row they take
/// χ·(|I₁||J₁||I₂| + |I₂||J₂||J₁|) multiply-adds: 0.54 G against 4.3 G site by site for a
/// 4096 × 4096 layer of four sites with bonds 64, 1024, 64. Not made for trainable cores
/// (healing), nor on CUDA, where candle ops keep the site-by-site contraction as the step
/// graph's independent reference. Reset when the cores change (`factors_mut`).
#[derive(Debug, Clone, Default)]
pub struct MpoCache(std::sync::OnceLock<Option<MpoHalves>>);

impl MpoCache {
    fn get(&self, cores: &[Tensor]) -> Result<Option<&MpoHalves>> {
        Ok(decode_cached(&self.0, &cores.iter().collect::<Vec<_>>(), || MpoHalves::new(cores))?.and_then(|h| h.as_ref()))
    }
}

/// `acc` (r × χ₀) contracted with MPO `cores` left to right, in `acc`'s dtype: (r·m₁n₁⋯m_kn_k) ×
/// χ_k, the site indices interleaved (m₁, n₁, m₂, n₂, …) after r's.
fn contract_sites(mut acc: Tensor, cores: &[Tensor]) -> Result<Tensor> {
    for g in cores {
        let (c, mt, nt, c2) = g.dims4()?;
        acc = acc.matmul(&g.to_dtype(acc.dtype())?.reshape((c, mt * nt * c2))?)?;
        acc = acc.reshape((acc.elem_count() / c2, c2))?;
    }
    Ok(acc)
}

/// `acc` holds contracted MPO sites with their indices interleaved (m₁, n₁, m₂, n₂, … of `sites`,
/// (m_t, n_t) each) and the bond last (`bond_last`) or first (of size `chi`): returns it with the
/// row indices before the column indices, the bond where it was.
fn interleaved_to_blocks(acc: &Tensor, sites: &[(usize, usize)], chi: usize, bond_last: bool) -> Result<Tensor> {
    let k = sites.len();
    let mut shape: Vec<usize> = Vec::with_capacity(2 * k + 1);
    if !bond_last {
        shape.push(chi);
    }
    shape.extend(sites.iter().flat_map(|&(m, n)| [m, n]));
    let off = usize::from(!bond_last);
    let mut perm: Vec<usize> = Vec::with_capacity(2 * k + 1);
    if !bond_last {
        perm.push(0);
    }
    perm.extend((0..k).map(|t| off + 2 * t).chain((0..k).map(|t| off + 2 * t + 1)));
    if bond_last {
        shape.push(acc.elem_count() / shape.iter().product::<usize>());
        perm.push(2 * k);
    }
    acc.reshape(shape)?.permute(perm)?.contiguous()
}

/// Contracts axis `axis` of `t` (size d) with `mat` (d × r): the axis becomes size r.
pub(crate) fn mode_mul(t: &Tensor, axis: usize, mat: &Tensor) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let last = dims.len() - 1;
    let moved = if axis == last { t.clone() } else { t.transpose(axis, last)? }.contiguous()?;
    let mdims = moved.dims().to_vec();
    let d = mdims[last];
    let rows = moved.elem_count() / d;
    let r = mat.dim(1)?;
    let y = moved.reshape((rows, d))?.matmul(mat)?;
    let mut nd = mdims;
    nd[last] = r;
    let y = y.reshape(nd)?;
    if axis == last { Ok(y) } else { y.transpose(axis, last)?.contiguous() }
}

/// A 2k-way tensor with interleaved modes (a₁, b₁, a₂, b₂, …) as the matrix (a₁a₂⋯) × (b₁b₂⋯):
/// a Tucker core as the matrix a decode step multiplies by, or the contracted layer as W. A
/// permuted copy of the whole tensor.
fn interleaved_matrix(t: &Tensor) -> Result<Tensor> {
    let pairs: Vec<(usize, usize)> = t.dims().chunks(2).map(|p| (p[0], p[1])).collect();
    let rows: usize = pairs.iter().map(|p| p.0).product();
    interleaved_to_blocks(t, &pairs, 0, true)?.reshape((rows, t.elem_count() / rows.max(1)))
}

/// The value `cell` holds for a decode step, made by `make` at first use; `None` (no cache) for
/// tensors off the CPU or trainable (healing).
fn decode_cached<'a, T>(cell: &'a std::sync::OnceLock<T>, tensors: &[&Tensor], make: impl FnOnce() -> Result<T>) -> Result<Option<&'a T>> {
    if tensors.iter().any(|t| !t.device().is_cpu() || t.is_variable()) {
        return Ok(None);
    }
    if let Some(v) = cell.get() {
        return Ok(Some(v));
    }
    let v = make()?;
    Ok(Some(cell.get_or_init(|| v)))
}

/// A Tucker layer's core as an [`interleaved_matrix`], made once at its first decode step on few rows: the core's
/// modes are interleaved, so without it every step permutes a copy of the whole core. granite-tiny's
/// tucker plan at 0.5, batch 1 on 2 CPU cores: 118.1 → 130.7 tok/s (the mode products' small
/// ops dominate there). CPU only (as `MpoCache`: on CUDA the gain is unmeasured and the memory
/// matters more), not for trainable cores (healing); reset when the factors change
/// (`factors_mut`). Holds as many values as the core.
#[derive(Debug, Clone, Default)]
pub struct CoreCache(std::sync::OnceLock<Tensor>);

impl CoreCache {
    fn get(&self, core: &Tensor) -> Result<Option<&Tensor>> {
        decode_cached(&self.0, &[core], || interleaved_matrix(core))
    }
}

/// Tucker over interleaved modes: y = x contracted with the column factors, the core (as
/// `matrix`, its [`interleaved_matrix`]), then the row factors; W is never formed.
fn tucker_apply(matrix: &Tensor, core: &Tensor, factors: &[Tensor], m: usize, x: &Tensor) -> Result<Tensor> {
    let (b, _) = x.dims2()?;
    let k = factors.len() / 2;
    let cols: Vec<usize> = (0..k).map(|t| factors[2 * t + 1].dims()[0]).collect();
    let mut shape = vec![b];
    shape.extend(&cols);
    let mut z = x.reshape(shape)?;
    for t in 0..k {
        z = mode_mul(&z, t + 1, &factors[2 * t + 1])?; // n_t → rn_t
    }
    let rm: Vec<usize> = (0..k).map(|t| core.dims()[2 * t]).collect();
    let y = z.reshape((b, matrix.dim(1)?))?.matmul(&matrix.t()?)?;
    let mut shape = vec![b];
    shape.extend(&rm);
    let mut y = y.reshape(shape)?;
    for t in 0..k {
        y = mode_mul(&y, t + 1, &factors[2 * t].t()?)?; // rm_t → m_t
    }
    y.reshape((b, m))
}

/// Rows of input from which tensor-network layers contract their factors first (see `forward`).
const FACTORS_FIRST_ROWS: usize = 64;

/// Khatri–Rao product of site factors (d_s × r each, first site slowest): row (i_1, …, i_k) is
/// the elementwise product of their rows; no factors give one row of ones (`dtype` on `dev`).
pub(crate) fn khatri_rao(fs: &[&Tensor], r: usize, dtype: candle_core::DType, dev: &candle_core::Device) -> Result<Tensor> {
    fs.iter().try_fold(Tensor::ones((1, r), dtype, dev)?, |acc, f| {
        let rows = acc.dim(0)? * f.dim(0)?;
        acc.unsqueeze(1)?.broadcast_mul(&f.unsqueeze(0)?)?.reshape((rows, r))
    })
}

/// CP over interleaved modes: z_r = Σ_j x_j Π_t B_t[j_t, r] (site by site), then
/// y_i = Σ_r λ_r z_r Π_t A_t[i_t, r], the last site as a matmul.
fn cp_apply(weights: &Tensor, factors: &[Tensor], m: usize, x: &Tensor) -> Result<Tensor> {
    let (b, n) = x.dims2()?;
    let k = factors.len() / 2;
    let rank = weights.dim(0)?;
    // input side: (B, R, rest)
    let n1 = factors[1].dims()[0];
    let t = x.reshape((b, n1, n / n1))?.transpose(1, 2)?.contiguous()?.reshape((b * (n / n1), n1))?;
    let mut z = t.matmul(&factors[1])?.reshape((b, n / n1, rank))?.transpose(1, 2)?.contiguous()?; // (B, R, rest)
    let mut rest = n / n1;
    for s in 1..k {
        let f = &factors[2 * s + 1]; // (n_s, R)
        let ns = f.dims()[0];
        rest /= ns;
        let ft = f.t()?.reshape((1, rank, ns, 1))?;
        z = z.reshape((b, rank, ns, rest))?.broadcast_mul(&ft)?.sum(2)?; // (B, R, rest)
    }
    let mut u = z.reshape((b, rank))?.broadcast_mul(&weights.reshape((1, rank))?)?.reshape((b, 1, rank))?;
    // output side
    let mut mm = 1;
    for s in 0..k - 1 {
        let a = &factors[2 * s]; // (m_s, R)
        let ms = a.dims()[0];
        u = u.unsqueeze(2)?.broadcast_mul(&a.reshape((1, 1, ms, rank))?)?.reshape((b, mm * ms, rank))?;
        mm *= ms;
    }
    let last = &factors[2 * (k - 1)];
    let y = u.reshape((b * mm, rank))?.matmul(&last.t()?)?;
    y.reshape((b, m))
}

/// The dense m × n matrix of MPO cores (contracted left to right, then the interleaved modes put
/// back in row/column order).
pub fn mpo_dense(cores: &[Tensor], row_dims: &[usize], col_dims: &[usize]) -> candle_core::Result<Tensor> {
    let acc = contract_sites(Tensor::ones((1, 1), cores[0].dtype(), cores[0].device())?, cores)?;
    let sites: Vec<(usize, usize)> = row_dims.iter().copied().zip(col_dims.iter().copied()).collect();
    let (m, n) = (row_dims.iter().product::<usize>(), col_dims.iter().product::<usize>());
    interleaved_to_blocks(&acc, &sites, 0, true)?.reshape((m, n))
}

/// The dense m × n matrix of a Tucker layer: the core's modes multiplied by the factors, then
/// the interleaved (m_1, n_1, m_2, n_2, …) modes put in row/column order.
fn tucker_dense(core: &Tensor, factors: &[Tensor], m: usize, n: usize) -> Result<Tensor> {
    let mut g = core.clone();
    for (axis, f) in factors.iter().enumerate() {
        g = mode_mul(&g, axis, &f.t()?)?; // r → m_t or n_t
    }
    interleaved_matrix(&g)?.reshape((m, n))
}

/// The dense m × n matrix of a CP layer: KR(A) diag(λ) KR(B)ᵀ.
fn cp_dense(weights: &Tensor, factors: &[Tensor]) -> Result<Tensor> {
    let k = factors.len() / 2;
    let rank = weights.dim(0)?;
    let outputs: Vec<&Tensor> = (0..k).map(|s| &factors[2 * s]).collect();
    let inputs: Vec<&Tensor> = (0..k).map(|s| &factors[2 * s + 1]).collect();
    let kr = |fs: &[&Tensor]| khatri_rao(fs, rank, weights.dtype(), weights.device());
    kr(&outputs)?.broadcast_mul(&weights.reshape((1, rank))?)?.matmul(&kr(&inputs)?.t()?)
}

/// Builds the runtime layer for a factorization (quantized factors are dequantized on load).
pub fn from_factorization(
    f: &compactor_decomp::Factorization,
    bias: Option<Tensor>,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Linear> {
    use compactor_decomp::Factorization as F;
    let t = |fac: &compactor_decomp::Factor| -> Result<Tensor> {
        Tensor::from_vec(fac.values().into_owned(), fac.shape.clone(), device)?.to_dtype(dtype)
    };
    Ok(match f {
        F::Dense { weight, .. } => Linear::Dense { w: t(weight)?, bias },
        F::LowRank { a, b, .. } => Linear::low_rank(t(a)?, t(b)?, bias)?,
        F::Mpo { m, n, cores, .. } => Linear::Mpo { cores: cores.iter().map(t).collect::<Result<_>>()?, m: *m, n: *n, bias, halves: MpoCache::default() },
        F::Tucker { m, n, core, factors, .. } => {
            Linear::Tucker { core: t(core)?, factors: factors.iter().map(t).collect::<Result<_>>()?, m: *m, n: *n, bias, matrix: CoreCache::default() }
        }
        F::Cp { m, n, weights, factors, .. } => Linear::Cp {
            weights: Tensor::from_vec(weights.clone(), weights.len(), device)?.to_dtype(dtype)?,
            factors: factors.iter().map(t).collect::<Result<_>>()?,
            m: *m,
            n: *n,
            bias,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn cores(rows: &[usize], cols: &[usize], bonds: &[usize]) -> Vec<Tensor> {
        let chi: Vec<usize> = std::iter::once(1).chain(bonds.iter().copied()).chain(std::iter::once(1)).collect();
        (0..rows.len()).map(|t| Tensor::randn(0f32, 1f32, (chi[t], rows[t], cols[t], chi[t + 1]), &Device::Cpu).unwrap()).collect()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn int8_codes_compute_what_the_dequantized_factors_do() {
        use compactor_decomp::{Bits, Factor, Factorization, QuantSpec};
        let dev = &Device::Cpu;
        let rnd = |rows: usize, cols: usize| Factor::new(vec![rows, cols], Tensor::randn(0f32, 1f32, (rows, cols), dev).unwrap().flatten_all().unwrap().to_vec1().unwrap());
        let spec = |group_size: usize, symmetric: bool| QuantSpec { bits: Bits::Int8, group_size, symmetric };
        let x = Tensor::randn(0f32, 1f32, (3, 96), dev).unwrap();
        // rank 13 is padded to 16 columns of A (zero codes) and rows of B (zero scales); 96
        // columns in groups of 64 leave a short last group
        for (f, params) in [
            (Factorization::LowRank { m: 40, n: 96, a: rnd(40, 13), b: rnd(13, 96) }.quantized(&spec(64, true)).unwrap(), 13 * (40 + 96)),
            (Factorization::Dense { m: 40, n: 96, weight: rnd(40, 96) }.quantized(&spec(32, true)).unwrap(), 40 * 96),
        ] {
            let lin = int8_linear(&f, None, dev).unwrap().expect("symmetric int8 factors");
            let want = from_factorization(&f, None, DType::F32, dev).unwrap();
            assert!(matches!(&lin, Linear::Int8 { .. }));
            assert_eq!((lin.out_features(), lin.in_features(), lin.params()), (40, 96, params));
            let (y, w) = (lin.forward(&x).unwrap(), want.forward(&x).unwrap());
            assert!(max_rel(&y, &w) < 1e-6, "{}", max_rel(&y, &w));
            assert!(max_rel(&lin.to_dense().unwrap(), &want.to_dense().unwrap()) < 1e-6);
            // the codes are offset binary: q + 128, with q in [−127, 127]
            let codes: Vec<u8> = lin.factors()[0].flatten_all().unwrap().to_vec1().unwrap();
            assert!(codes.iter().all(|&c| c >= 1) && (codes.contains(&255) || codes.contains(&1)));
        }
        // asymmetric codes and f32 factors stay with the dequantized path
        let asym = Factorization::Dense { m: 8, n: 32, weight: rnd(8, 32) }.quantized(&spec(32, false)).unwrap();
        assert!(int8_linear(&asym, None, dev).unwrap().is_none());
        let sym = Factorization::Dense { m: 8, n: 32, weight: rnd(8, 32) }.quantized(&spec(32, true)).unwrap();
        assert!(int8_linear(&sym, None, dev).unwrap().is_some());
        assert!(int8_linear(&sym, Some(Tensor::zeros(8, DType::F32, dev).unwrap()), dev).unwrap().is_none(), "a layer with a bias");
        assert!(int8_linear(&Factorization::Dense { m: 8, n: 32, weight: rnd(8, 32) }, None, dev).unwrap().is_none());
    }

    #[test]
    fn tucker_decode_keeps_the_core_matrix_until_the_factors_change() {
        let dev = &Device::Cpu;
        // 48 × 32 as (4, 3, 4) × (2, 4, 4), ranks (3, 2, 2, 3, 4, 2): one mode at full rank
        let (rows, cols, ranks) = ([4usize, 3, 4], [2usize, 4, 4], [3usize, 2, 2, 3, 4, 2]);
        let core = Tensor::randn(0f32, 1f32, ranks.to_vec(), dev).unwrap();
        let dims = [rows[0], cols[0], rows[1], cols[1], rows[2], cols[2]];
        let factors: Vec<Tensor> = dims.iter().zip(ranks).map(|(&d, r)| Tensor::randn(0f32, 1f32, (d, r), dev).unwrap()).collect();
        let mut lin = Linear::Tucker { core, factors, m: 48, n: 32, bias: None, matrix: CoreCache::default() };
        let x = Tensor::randn(0f32, 1f32, (3, 32), dev).unwrap();
        let want = x.matmul(&lin.to_dense().unwrap().t().unwrap()).unwrap();
        let y = lin.forward(&x).unwrap();
        assert!(max_rel(&y, &want) < 1e-5, "{}", max_rel(&y, &want));
        assert!(matches!(&lin, Linear::Tucker { matrix, .. } if matrix.0.get().is_some_and(|c| c.dims() == [3 * 2 * 4, 2 * 3 * 2])));
        // the cached matrix is used from then on, and dropped with a change of the core
        assert!(max_rel(&lin.forward(&x).unwrap(), &want) < 1e-5);
        for c in lin.factors_mut().into_iter().take(1) {
            *c = (&*c * 3.0).unwrap();
        }
        assert!(max_rel(&lin.forward(&x).unwrap(), &(want * 3.0).unwrap()) < 1e-5, "the core matrix was not reset");
    }

    #[test]
    fn mpo_halves_apply_the_layer_as_the_cores_do() {
        // granite-tiny's gate_proj under a tt plan at 0.5 (768 × 256, bonds 24, 95, 16), a layer
        // whose first bond is truncated (the cut then moves to the first bond), and three sites
        for (rows, cols, bonds) in [
            (vec![6, 8, 4, 4], vec![4, 4, 4, 4], vec![24, 95, 16]),
            (vec![4, 4, 4, 4], vec![4, 4, 4, 4], vec![3, 40, 16]),
            (vec![8, 4, 6], vec![4, 8, 2], vec![32, 9]),
        ] {
            let g = cores(&rows, &cols, &bonds);
            let (m, n) = (rows.iter().product::<usize>(), cols.iter().product::<usize>());
            let h = MpoHalves::new(&g).unwrap().expect("a cut that pays");
            assert_eq!((h.i1 * h.i2, h.j1 * h.j2), (m, n));
            if bonds == [24, 95, 16] {
                assert_eq!((h.i1, h.j1, h.chi), (48, 16, 95), "granite-tiny's layer is cut at the middle bond");
            }
            let core_values: usize = g.iter().map(|c| c.elem_count()).sum();
            let x = Tensor::randn(0f32, 1f32, (3, n), &Device::Cpu).unwrap();
            let want = mpo_apply(&g, &x).unwrap();
            let dense = x.matmul(&mpo_dense(&g, &rows, &cols).unwrap().t().unwrap()).unwrap();
            let got = h.apply(&x).unwrap();
            assert_eq!(got.dims(), &[3, m]);
            assert!(max_rel(&got, &want) < 1e-5, "{rows:?}: {}", max_rel(&got, &want));
            assert!(max_rel(&got, &dense) < 1e-5);
            assert!(h.params() <= core_values, "{} > {core_values}", h.params());
        }
        // the fused kernel's layout, read back as the kernel reads it (16 × 16 tiles, groups of 8
        // swizzled in rows of 64 or more), contracted bond index by bond index
        for (rows, cols, bonds) in [(vec![8, 8, 8, 8], vec![8, 8, 8, 8], vec![64, 40, 64]), (vec![6, 8, 4, 4], vec![4, 4, 4, 4], vec![24, 95, 16]), (vec![4, 5, 8, 2], vec![8, 8, 4, 4], vec![32, 30, 16])] {
            let g = cores(&rows, &cols, &bonds);
            let h = MpoHalves::new(&g).unwrap().unwrap();
            let f = h.fused_layout(if rows[0] == 6 { 48 } else { 16 }).unwrap();
            assert_eq!((f.i1p % 16, f.i2p % 16, f.j1p % 16, f.j2p % 16, f.w.dims()), (0, 0, 0, 0, &[h.chi, f.i2p * f.j2p + f.i1p * f.j1p][..]));
            let w: Vec<Vec<f32>> = f.w.to_vec2().unwrap();
            let read = |chunk: &[f32], r: usize, c: usize, cols: usize| chunk[r * cols + swizzle(r, c / 8, cols) * 8 + c % 8];
            let x = Tensor::randn(0f32, 1f32, (1, h.j1 * h.j2), &Device::Cpu).unwrap();
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let mut y = vec![0f64; h.i1 * h.i2];
            for wa in &w {
                let (ra, la) = wa.split_at(f.i2p * f.j2p);
                for i2 in 0..f.i2p {
                    for j1 in 0..f.j1p {
                        let z: f64 = (0..h.j2).map(|j2| read(ra, i2, j2, f.j2p) as f64 * if j1 < h.j1 { xv[j1 * h.j2 + j2] as f64 } else { 0.0 }).sum();
                        for i1 in 0..f.i1p {
                            let v = read(la, i1, j1, f.j1p) as f64 * z;
                            if i1 < h.i1 && i2 < h.i2 {
                                y[i1 * h.i2 + i2] += v;
                            } else {
                                assert_eq!(v, 0.0, "padding must add nothing");
                            }
                        }
                    }
                }
            }
            let y = Tensor::from_vec(y.iter().map(|&v| v as f32).collect::<Vec<_>>(), (1, h.i1 * h.i2), &Device::Cpu).unwrap();
            assert!(max_rel(&y, &h.apply(&x).unwrap()) < 1e-5, "fused layout {rows:?}: {}", max_rel(&y, &h.apply(&x).unwrap()));
        }
        // the layer's forward takes the halves on the CPU, and drops them when the cores change
        let (rows, cols) = ([6, 8, 4, 4], [4, 4, 4, 4]);
        let g = cores(&rows, &cols, &[24, 95, 16]);
        let mut lin = Linear::Mpo { cores: g.clone(), m: 768, n: 256, bias: None, halves: MpoCache::default() };
        let x = Tensor::randn(0f32, 1f32, (2, 256), &Device::Cpu).unwrap();
        let y = lin.forward(&x).unwrap();
        assert!(max_rel(&y, &mpo_apply(&g, &x).unwrap()) < 1e-5);
        assert!(matches!(&lin, Linear::Mpo { halves, .. } if halves.0.get().is_some_and(|h| h.is_some())));
        for c in lin.factors_mut() {
            *c = (&*c * 2.0).unwrap();
        }
        let y2 = lin.forward(&x).unwrap();
        assert!(max_rel(&y2, &(y * 16.0).unwrap()) < 1e-5, "the cache was not reset");
        // bf16 cores give bf16 halves
        let g: Vec<Tensor> = cores(&[4, 4], &[4, 4], &[16]).iter().map(|c| c.to_dtype(DType::BF16).unwrap()).collect();
        assert_eq!(MpoHalves::new(&g).unwrap().unwrap().l.dtype(), DType::BF16);
        assert!(MpoHalves::new(&g[..1]).unwrap().is_none(), "one site has no bond");
        // two sites of very unequal sizes: the halves hold what the cores hold but take 128× the
        // multiply-adds, so no cut pays and the layer stays site by site
        assert!(MpoHalves::new(&cores(&[2, 256], &[256, 2], &[8])).unwrap().is_none());
    }
}
