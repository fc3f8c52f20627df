//! Benchmark driver for scripts/bench-decomp.sh: reads `<dir>/<name>.npy` (float32, C order),
//! runs our methods and writes `<dir>/ours.json` (one record per method and shape).
//!
//! cargo run --release -p compactor-decomp --example bench_decomp -- <dir> <name>...

use compactor_decomp::*;
use std::time::Instant;

fn read_npy(path: &std::path::Path) -> (usize, usize, Vec<f32>) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..6], b"\x93NUMPY", "{}: not a .npy file", path.display());
    let (hlen, off) = if b[6] == 1 { (u16::from_le_bytes([b[8], b[9]]) as usize, 10) } else { (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12) };
    let header = std::str::from_utf8(&b[off..off + hlen]).unwrap();
    assert!(header.contains("'<f4'") && header.contains("'fortran_order': False"), "{header}");
    let shape = &header[header.find("'shape': (").unwrap() + 10..];
    let shape: Vec<usize> = shape[..shape.find(')').unwrap()].split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
    let data = b[off + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
    (shape[0], shape[1], data)
}

fn best_of<T>(reps: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..reps {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.unwrap())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut records = Vec::new();
    let mut extra = Vec::new();
    for name in &args[2..] {
        let (m, n, data) = read_npy(&dir.join(format!("{name}.npy")));
        let w = from_row_major(m, n, &data);
        let reps = if m * n <= 1 << 20 { 3 } else { 1 };
        let want = |k: &str| cfg["methods"].as_array().unwrap().iter().any(|v| v == k) && !cfg["skip"][name].as_array().map(|a| a.iter().any(|v| v == k)).unwrap_or(false);
        let mut push = |method: &str, t: f64, err: f64, ranks: Vec<usize>, params: usize, iters: usize| {
            eprintln!("{name:>10} {method:<14} {t:>8.3}s err {err:.6} ranks {ranks:?}");
            records.push(serde_json::json!({"shape": name, "m": m, "n": n, "method": method, "time_s": t, "rel_error": err, "ranks": ranks, "params": params, "iters": iters}));
        };
        if want("svd_full") {
            let (t, (u, s, vt)) = best_of(reps, || full_svd(w.as_ref()).unwrap());
            let mut us = u.clone();
            for j in 0..s.len() {
                for i in 0..m {
                    us[(i, j)] *= s[j];
                }
            }
            let rec = &us * &vt;
            let f = Factorization::Dense { m, n, weight: Factor::new(vec![m, n], to_row_major(&rec)) };
            push("svd_full", t, f.rel_error(w.as_ref()), vec![s.len()], m * n, 0);
        }
        if want("svd_trunc50") {
            let o = FactorizeOptions::new(Method::Svd, RankChoice::Ratio(0.5));
            let (t, f) = best_of(reps, || factorize(w.as_ref(), &o).unwrap());
            push("svd_trunc50", t, f.rel_error(w.as_ref()), f.ranks(), f.params(), 0);
        }
        if want("tt") {
            let chi = cfg["tt_chi"].as_u64().unwrap() as usize;
            let o = FactorizeOptions::new(Method::Tt, RankChoice::Rank(chi));
            let (t, f) = best_of(reps, || factorize(w.as_ref(), &o).unwrap());
            let meta = f.metadata();
            extra.push(serde_json::json!({"shape": name, "method": "tt_sites", "row_dims": meta.row_dims, "col_dims": meta.col_dims}));
            push("tt", t, f.rel_error(w.as_ref()), f.ranks(), f.params(), 0);
        }
        if want("tucker") {
            let mut o = FactorizeOptions::new(Method::Tucker, RankChoice::Rank(cfg["tucker_rank"].as_u64().unwrap() as usize));
            o.max_iters = cfg["tucker_iters"].as_u64().unwrap() as usize;
            o.tol = 1e-5;
            let (t, (f, rep)) = best_of(reps, || factorize_report(w.as_ref(), &o).unwrap());
            push("tucker", t, f.rel_error(w.as_ref()), f.ranks(), f.params(), rep.iterations);
        }
        if want("cp") {
            let mut o = FactorizeOptions::new(Method::Cp, RankChoice::Rank(cfg["cp_rank"].as_u64().unwrap() as usize));
            o.max_iters = cfg["cp_iters"].as_u64().unwrap() as usize;
            o.tol = 0.0;
            let (t, (f, rep)) = best_of(reps, || factorize_report(w.as_ref(), &o).unwrap());
            push("cp", t, f.rel_error(w.as_ref()), f.ranks(), f.params(), rep.iterations);
        }
    }
    records.extend(extra);
    std::fs::write(dir.join("ours.json"), serde_json::to_string_pretty(&records).unwrap()).unwrap();
}
