//! Block reduction of a large matrix to an image: the CPU reference of
//! `shaders/reduce.wgsl`.

use serde::{Deserialize, Serialize};

/// How one output pixel summarizes its block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReduceMode {
    /// max |v| over the block.
    Max,
    /// sqrt(mean(v²)) over the block.
    Rms,
}

impl From<crate::Reduce> for ReduceMode {
    fn from(r: crate::Reduce) -> Self {
        match r {
            crate::Reduce::Max => ReduceMode::Max,
            crate::Reduce::Rms => ReduceMode::Rms,
        }
    }
}

/// Half-open range of input indices covered by output index `i` of `n_out`.
#[inline]
pub(crate) fn block_range(i: usize, n_in: usize, n_out: usize) -> (usize, usize) {
    let a = i * n_in / n_out;
    let b = ((i + 1) * n_in / n_out).max(a + 1);
    (a, b)
}

/// Reduces the row-major `rows × cols` matrix `data` to `out_w × out_h` values (row-major,
/// `out_h` rows of `out_w`). Pixel (x, y) covers rows `[y·rows/out_h, (y+1)·rows/out_h)` and
/// columns `[x·cols/out_w, (x+1)·cols/out_w)` (integer division, at least one element), so
/// shapes need not divide evenly. Max takes max |v|; Rms takes sqrt(mean v²), summed in f32
/// row by row like the shader.
///
/// Panics if `data.len() != rows * cols` or a size is zero.
pub fn reduce_blocks_cpu(rows: usize, cols: usize, data: &[f32], out_w: usize, out_h: usize, mode: ReduceMode) -> Vec<f32> {
    assert_eq!(data.len(), rows * cols, "data length must be rows * cols");
    assert!(rows > 0 && cols > 0 && out_w > 0 && out_h > 0, "sizes must be positive");
    let mut out = vec![0f32; out_w * out_h];
    let col_ranges: Vec<(usize, usize)> = (0..out_w).map(|x| block_range(x, cols, out_w)).collect();
    for y in 0..out_h {
        let (r0, r1) = block_range(y, rows, out_h);
        let out_row = &mut out[y * out_w..(y + 1) * out_w];
        for (x, &(c0, c1)) in col_ranges.iter().enumerate() {
            let mut acc = 0f32;
            for r in r0..r1 {
                let row = &data[r * cols + c0..r * cols + c1];
                match mode {
                    ReduceMode::Max => {
                        for &v in row {
                            acc = acc.max(v.abs());
                        }
                    }
                    ReduceMode::Rms => {
                        for &v in row {
                            acc += v * v;
                        }
                    }
                }
            }
            if mode == ReduceMode::Rms {
                acc = (acc / ((r1 - r0) * (c1 - c0)) as f32).sqrt();
            }
            out_row[x] = acc;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_every_element_once_when_shrinking() {
        let mut seen = vec![0; 777];
        for x in 0..128 {
            let (a, b) = block_range(x, 777, 128);
            for s in &mut seen[a..b] {
                *s += 1;
            }
        }
        assert!(seen.iter().all(|&s| s == 1));
    }

    #[test]
    fn max_and_rms_of_a_2x2_matrix_to_one_pixel() {
        let d = [1.0, -3.0, 2.0, 0.0];
        assert_eq!(reduce_blocks_cpu(2, 2, &d, 1, 1, ReduceMode::Max), vec![3.0]);
        let rms = reduce_blocks_cpu(2, 2, &d, 1, 1, ReduceMode::Rms)[0];
        assert!((rms - (14.0f32 / 4.0).sqrt()).abs() < 1e-6);
    }
}
