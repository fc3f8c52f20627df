//! The compute shader's block reduction equals the CPU reference.

mod common;

use compactor_viz::{reduce_blocks_cpu, ReduceMode, Renderer};

fn matrix(rows: usize, cols: usize) -> Vec<f32> {
    let mut rng = common::Rng::new(42);
    (0..rows * cols).map(|i| (rng.next() - 0.5) * (1.0 + (i % 13) as f32 / 13.0)).collect()
}

fn assert_close(gpu: &[f32], cpu: &[f32], tol: f32) {
    assert_eq!(gpu.len(), cpu.len());
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!((g - c).abs() <= tol * c.abs().max(1.0), "pixel {i}: gpu {g} vs cpu {c}");
    }
}

#[test]
fn gpu_reduction_matches_cpu_on_a_non_divisible_shape() {
    let r = Renderer::new().unwrap();
    let (rows, cols, w, h) = (1000, 777, 256, 128);
    let data = matrix(rows, cols);
    for mode in [ReduceMode::Max, ReduceMode::Rms] {
        let gpu = r.reduce_blocks_gpu(rows, cols, &data, w, h, mode).unwrap();
        let cpu = reduce_blocks_cpu(rows, cols, &data, w, h, mode);
        assert_close(&gpu, &cpu, 1e-5);
        assert!(cpu.iter().all(|v| *v > 0.0));
    }
}

#[test]
fn gpu_reduction_matches_cpu_when_uploaded_in_chunks_and_upsampled() {
    // A tiny storage-buffer limit forces the chunked path; 50 x 30 -> 64 x 40 repeats elements.
    let r = Renderer::new().unwrap().with_chunk_limit(777 * 4 * 37);
    let data = matrix(1000, 777);
    for mode in [ReduceMode::Max, ReduceMode::Rms] {
        assert_close(&r.reduce_blocks_gpu(1000, 777, &data, 200, 90, mode).unwrap(), &reduce_blocks_cpu(1000, 777, &data, 200, 90, mode), 1e-5);
        let small = &data[..50 * 30];
        assert_close(&r.reduce_blocks_gpu(50, 30, small, 64, 40, mode).unwrap(), &reduce_blocks_cpu(50, 30, small, 64, 40, mode), 1e-5);
    }
}

#[test]
fn gpu_heatmap_image_equals_the_cpu_loop() {
    let r = Renderer::new().unwrap();
    let data = matrix(1000, 777);
    let gpu = r.render_heatmap_image(1000, 777, &data, 300, 200, ReduceMode::Rms, compactor_viz::Colormap::Magma).unwrap();
    let cpu = compactor_viz::heatmap_image_cpu(1000, 777, &data, 300, 200, ReduceMode::Rms, compactor_viz::Colormap::Magma);
    let off = gpu.pixels.chunks(4).zip(cpu.pixels.chunks(4)).filter(|(a, b)| a.iter().zip(b.iter()).any(|(x, y)| x.abs_diff(*y) > 3)).count();
    // rounding at a color-table boundary may pick the neighbouring entry for a few pixels
    assert!(off < 30, "{off} pixels differ");
}

#[test]
fn wrong_sizes_are_errors_not_panics() {
    let r = Renderer::new().unwrap();
    assert!(r.reduce_blocks_gpu(10, 10, &[0.0; 99], 4, 4, ReduceMode::Max).is_err());
    assert!(r.reduce_blocks_gpu(10, 10, &[0.0; 100], 0, 4, ReduceMode::Max).is_err());
}
