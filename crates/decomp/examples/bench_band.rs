//! Bulge-chasing cost (band → tridiagonal, values only) on random symmetric bands:
//! `cargo run --release -p compactor-decomp --example bench_band [n] [b...]`.
use compactor_decomp::band;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let bs: Vec<usize> = if args.len() > 2 { args[2..].iter().filter_map(|s| s.parse().ok()).collect() } else { vec![8, 16, 32] };
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    for b in bs {
        let lower: Vec<f64> = (0..n * (b + 1)).map(|_| rnd()).collect();
        let flops = 6.0 * (n * n * b) as f64;
        let time = |f: &dyn Fn() -> Vec<f64>| {
            let mut best = f64::MAX;
            let mut d = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                d = f();
                best = best.min(t.elapsed().as_secs_f64());
            }
            (best, d)
        };
        let (t0, d0) = time(&|| band::band_to_tridiagonal_portable(n, b, &lower).unwrap().0);
        let (t1, d1) = time(&|| band::band_to_tridiagonal(n, b, &lower).unwrap().0);
        let diff = d0.iter().zip(&d1).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        println!(
            "n {n} b {b}: portable {:.1} ms ({:.2} GFLOP/s), {} {:.1} ms ({:.2} GFLOP/s): {:.2}x, max |diagonal diff| {diff:.1e}",
            t0 * 1e3,
            flops / t0 / 1e9,
            if band::simd_chase() { "AVX2+FMA" } else { "same (no AVX2/FMA)" },
            t1 * 1e3,
            flops / t1 / 1e9,
            t0 / t1
        );
    }
}
