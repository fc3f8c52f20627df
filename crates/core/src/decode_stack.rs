//! Decode-shaped stacks of linear layers on the GPU, scheduled several ways (feature `cuda`): the
//! measurement of issue 8's decode goal.
//!
//! A transformer block's seven products are four groups by input: q/k/v and gate/up read the
//! same vector, o and down one each. A [`Stack`] holds each group's weights in one buffer (dense:
//! the matrices stacked by rows; low rank: the B factors stacked by rows, the A factors one after
//! another), so the same bytes can be run
//! - ungrouped: one product per matrix (dense) or per factor (low rank), one launch each;
//! - grouped: one launch per group and stage — a dense group is one product over the stacked
//!   rows, a low-rank group is one product over the stacked B's and one launch of up to four
//!   A products (see [`crate::gpu::launch_products`]).
//!
//! Either way a step is launched from the host step by step or replayed as a captured CUDA graph, which
//! takes the per-launch host cost (several µs, as much as the low-rank stack's bytes take to
//! stream) out of every step; with or without programmatic dependent launches, which overlap
//! each kernel's start with the previous one's tail. The products run one after another in
//! stream order, as a model's would (each kernel waits for the previous one).

use crate::gpu::{ce, launch_products, tensor_addr as addr, Product, Q8};
use candle_core::{DType, Device, Tensor};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

/// Matrices of one group: they read the same input; `ranks` empty for dense weights.
struct Group {
    input: usize,
    n: usize,
    rows: Vec<usize>,
    ranks: Vec<usize>,
    /// dense: Σm × n; low rank: the B factors, Σr × n
    w: Tensor,
    /// low rank: A_i (m_i × r_i) one after another
    a: Option<Tensor>,
    /// low rank: the intermediate, b × Σr
    t: Option<Tensor>,
    /// output, b × Σm
    y: Tensor,
}

/// A stack of linear layers with preallocated inputs, intermediates and outputs (bf16, CUDA).
pub struct Stack {
    dev: candle_core::cuda::CudaDevice,
    batch: usize,
    inputs: Vec<Tensor>,
    groups: Vec<Group>,
}

/// How a step is issued: custom kernel or cuBLAS (`mode` as in `COMPACTOR_GEMV`: 0 cuBLAS,
/// 1 CUDA cores, 2 tensor cores), grouped launches or not, CUDA graph or host launches.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub mode: u8,
    pub grouped: bool,
    pub graph: bool,
    /// programmatic dependent launches (custom kernels, compute capability 9.0+)
    pub pdl: bool,
}

impl Stack {
    /// `layers` blocks of Granite-8B-like groups `(input width, [rows of each matrix])`, random
    /// bf16 weights; `ratio` None for dense, else low rank at that fraction of each matrix's
    /// parameters (rank rounded up to a multiple of 8, as the decode path pads it).
    pub fn random(device: &Device, layers: usize, groups: &[(usize, Vec<usize>)], ratio: Option<f64>, batch: usize) -> crate::Result<Self> {
        let Device::Cuda(dev) = device else { return Err(crate::Error::Invalid("a decode stack needs a CUDA device".into())) };
        let rnd = |m: usize, n: usize, scale: f32| -> crate::Result<Tensor> { Ok(Tensor::randn(0f32, scale, (m, n), device)?.to_dtype(DType::BF16)?) };
        let widths: Vec<usize> = {
            let mut w: Vec<usize> = groups.iter().map(|g| g.0).collect();
            w.sort_unstable();
            w.dedup();
            w
        };
        let inputs = widths.iter().map(|&n| rnd(batch, n, 1.0)).collect::<crate::Result<Vec<_>>>()?;
        let mut out = Vec::new();
        for _ in 0..layers {
            for (n, rows) in groups {
                let n = *n;
                let input = widths.iter().position(|&w| w == n).expect("width listed");
                let sum_m: usize = rows.iter().sum();
                let y = Tensor::zeros((batch, sum_m), DType::BF16, device)?;
                let g = match ratio {
                    None => Group { input, n, rows: rows.clone(), ranks: vec![], w: rnd(sum_m, n, 0.02)?, a: None, t: None, y },
                    Some(ratio) => {
                        let ranks = rows
                            .iter()
                            .map(|&m| Ok(compactor_decomp::rank_for_ratio(m, n, compactor_decomp::Method::Svd, ratio, None)?.div_ceil(8) * 8))
                            .collect::<crate::Result<Vec<usize>>>()?;
                        let sum_r: usize = ranks.iter().sum();
                        let a_len: usize = rows.iter().zip(&ranks).map(|(m, r)| m * r).sum();
                        Group {
                            input,
                            n,
                            rows: rows.clone(),
                            w: rnd(sum_r, n, 0.02)?,
                            a: Some(rnd(1, a_len, 0.02)?.flatten_all()?),
                            t: Some(Tensor::zeros((batch, sum_r), DType::BF16, device)?),
                            ranks,
                            y,
                        }
                    }
                };
                out.push(g);
            }
        }
        device.synchronize()?;
        Ok(Stack { dev: dev.clone(), batch, inputs, groups: out })
    }

    /// Weight bytes one step reads.
    pub fn weight_bytes(&self) -> usize {
        self.groups.iter().map(|g| 2 * (g.w.elem_count() + g.a.as_ref().map_or(0, |a| a.elem_count()))).sum()
    }

    /// The launches of one step, in order.
    fn launches(&self, grouped: bool) -> candle_core::Result<Vec<Vec<Product>>> {
        let b = self.batch;
        let mut out = Vec::new();
        for g in &self.groups {
            let x = addr(&self.inputs[g.input])?;
            let (w, y) = (addr(&g.w)?, addr(&g.y)?);
            let sum_m: usize = g.rows.iter().sum();
            if g.ranks.is_empty() {
                if grouped {
                    out.push(vec![Product { w, x, y, rows: sum_m, cols: g.n, ldx: g.n, q: Q8::BF16 }]);
                } else {
                    let mut off = 0;
                    for &m in &g.rows {
                        out.push(vec![Product { w: w + 2 * (off * g.n) as u64, x, y: y + 2 * (b * off) as u64, rows: m, cols: g.n, ldx: g.n, q: Q8::BF16 }]);
                        off += m;
                    }
                }
                continue;
            }
            let (a, t) = (addr(g.a.as_ref().expect("low rank"))?, addr(g.t.as_ref().expect("low rank"))?);
            let sum_r: usize = g.ranks.iter().sum();
            let first = Product { w, x, y: t, rows: sum_r, cols: g.n, ldx: g.n, q: Q8::BF16 };
            if grouped {
                out.push(vec![first]);
            }
            let mut second = Vec::new();
            let (mut off_m, mut off_r, mut off_a) = (0usize, 0usize, 0usize);
            for (&m, &r) in g.rows.iter().zip(&g.ranks) {
                let y_i = y + 2 * (b * off_m) as u64;
                let a_i = a + 2 * off_a as u64;
                if grouped {
                    second.push(Product { w: a_i, x: t + 2 * off_r as u64, y: y_i, rows: m, cols: r, ldx: sum_r, q: Q8::BF16 });
                } else {
                    // its own b × r block of the intermediate
                    let t_i = t + 2 * (b * off_r) as u64;
                    out.push(vec![Product { w: w + 2 * (off_r * g.n) as u64, x, y: t_i, rows: r, cols: g.n, ldx: g.n, q: Q8::BF16 }]);
                    out.push(vec![Product { w: a_i, x: t_i, y: y_i, rows: m, cols: r, ldx: r, q: Q8::BF16 }]);
                }
                off_m += m;
                off_r += r;
                off_a += m * r;
            }
            if grouped {
                out.push(second);
            }
        }
        Ok(out)
    }

    fn issue(&self, sched: Schedule, launches: &[Vec<Product>]) -> candle_core::Result<()> {
        launches.iter().try_for_each(|p| launch_products(&self.dev, sched.mode, self.batch, p, sched.pdl))
    }

    /// Seconds per step of `sched`, best of `rounds` runs of `repeats` steps each.
    pub fn time(&self, sched: Schedule, repeats: usize, rounds: usize) -> crate::Result<f64> {
        let launches = self.launches(sched.grouped)?;
        let stream = self.dev.cuda_stream();
        // warm up (modules, cuBLAS heuristics) before any capture
        self.issue(sched, &launches)?;
        let graph = if sched.graph {
            if sched.mode == 0 {
                crate::gpu::cublas_workspace(&self.dev)?;
            }
            stream.synchronize().map_err(ce("sync"))?;
            stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(ce("begin capture"))?;
            let issued = self.issue(sched, &launches);
            let g = stream.end_capture(CUgraphInstantiate_flags(0)).map_err(ce("end capture"));
            issued?;
            let g = g?.ok_or_else(|| crate::Error::Invalid("stream capture gave no graph".into()))?;
            g.upload().map_err(ce("graph upload"))?;
            Some(g)
        } else {
            None
        };
        let step = || -> crate::Result<()> {
            match &graph {
                Some(g) => Ok(g.launch().map_err(ce("graph launch"))?),
                None => Ok(self.issue(sched, &launches)?),
            }
        };
        step()?;
        stream.synchronize().map_err(ce("sync"))?;
        let mut best = f64::MAX;
        for _ in 0..rounds.max(1) {
            let t = std::time::Instant::now();
            for _ in 0..repeats.max(1) {
                step()?;
            }
            stream.synchronize().map_err(ce("sync"))?;
            best = best.min(t.elapsed().as_secs_f64() / repeats.max(1) as f64);
        }
        Ok(best)
    }

    /// The outputs of the last step, concatenated (for checking schedules against each other).
    pub fn outputs(&self) -> crate::Result<Vec<f32>> {
        let mut v = Vec::new();
        for g in &self.groups {
            v.extend(g.y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(v)
    }
}
