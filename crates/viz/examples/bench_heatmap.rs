//! Times a 12800 × 4096 reconstruction-error heatmap: reduction + color map on wgpu
//! (`Renderer::render_heatmap_image`) against a plain CPU loop producing the same image
//! (`heatmap_image_cpu`), plus the full chart with axes and text.
//!
//! `cargo run --release -p compactor-viz --example bench_heatmap [-- ROWS COLS W H RUNS]`

use compactor_viz::{heatmap_image_cpu, Colormap, HeatmapInput, Reduce, ReduceMode, Renderer};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numeric arguments")).collect();
    let get = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (rows, cols, w, h, runs) = (get(0, 12800), get(1, 4096), get(2, 1024) as u32, get(3, 768) as u32, get(4, 5));

    let t = Instant::now();
    let mut s: u64 = 0x9E3779B97F4A7C15;
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let noise = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let (r, c) = ((i / cols) as f32, (i % cols) as f32);
            noise * 0.02 * (1.2 + (r / 700.0).sin() * (c / 300.0).cos())
        })
        .collect();
    println!("matrix {rows} x {cols} f32 ({:.0} MB) generated in {:.2} s", (rows * cols * 4) as f64 / 1e6, t.elapsed().as_secs_f64());

    let t = Instant::now();
    let r = Renderer::new()?;
    println!("adapter: {} (device created in {:.2} s)", r.adapter_name(), t.elapsed().as_secs_f64());
    println!("image {w} x {h}, median of {runs} runs, threads: CPU loop is single-threaded");

    for mode in [ReduceMode::Max, ReduceMode::Rms] {
        // warm-up (pipeline compilation, allocator)
        let gpu_img = r.render_heatmap_image(rows, cols, &data, w, h, mode, Colormap::Viridis)?;
        let cpu_img = heatmap_image_cpu(rows, cols, &data, w, h, mode, Colormap::Viridis);
        let differing = gpu_img.pixels.chunks(4).zip(cpu_img.pixels.chunks(4)).filter(|(a, b)| a != b).count();

        let mut tg = Vec::new();
        let mut tc = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            std::hint::black_box(r.render_heatmap_image(rows, cols, &data, w, h, mode, Colormap::Viridis)?);
            tg.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            std::hint::black_box(heatmap_image_cpu(rows, cols, &data, w, h, mode, Colormap::Viridis));
            tc.push(t.elapsed().as_secs_f64());
        }
        let (g, c) = (median(tg), median(tc));
        println!(
            "{mode:?}: wgpu reduce+colormap {:.1} ms | CPU loop {:.1} ms | CPU/wgpu = {:.2}x | pixels differing: {differing} of {}",
            g * 1e3,
            c * 1e3,
            c / g,
            w * h
        );
    }

    let input = HeatmapInput { title: "bench".into(), rows, cols, data, approx: None, reduce: Reduce::Max, colormap: Colormap::Viridis, vmax: None };
    r.render_heatmap(&input, 1024, 768, 1.0)?;
    let mut tf = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(r.render_heatmap(&input, 1024, 768, 1.0)?);
        tf.push(t.elapsed().as_secs_f64());
    }
    println!("full chart (axes, color bar, text) 1024 x 768 @1x: {:.1} ms", median(tf) * 1e3);
    Ok(())
}
