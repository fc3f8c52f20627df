//! The `compactor` binary end to end: commands, JSON output, kill safety, memory.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_compactor"))
}
fn shared() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR"))).join("../../../shared")
}
fn fixture(n: &str) -> PathBuf {
    shared().join("fixtures").join(n)
}
fn run_json(args: &[&str]) -> serde_json::Value {
    let out = bin().args(args).output().unwrap();
    assert!(out.status.success(), "compactor {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn inspect_json_totals() {
    let v = run_json(&["inspect", fixture("granite-tiny").to_str().unwrap(), "--json"]);
    let sum: u64 = v["tensors"].as_array().unwrap().iter().map(|t| t["params"].as_u64().unwrap()).sum();
    assert_eq!(v["total_params"].as_u64().unwrap(), sum);

    assert_eq!(v["linear_groups"].as_array().unwrap().len(), 7);
}

#[test]
fn eval_json_has_the_documented_keys() {
    let v = run_json(&[
        "eval", fixture("stories260K").to_str().unwrap(), "--text", shared().join("corpora/tinystories_val.txt").to_str().unwrap(),
        "--max-windows", "8", "--decode-tokens", "8", "--json",
    ]);
    for k in ["perplexity", "mean_nll", "tokens_scored", "windows", "ctx", "params", "bytes_on_disk", "load_seconds", "eval_seconds", "prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(v.get(k).is_some(), "missing key {k}");
    }
    assert_eq!(v["tokens_scored"].as_u64().unwrap(), 8 * 255);
    let p = v["perplexity"].as_f64().unwrap();
    assert!(p > 2.0 && p < 8.0, "{p}");
}

#[test]
fn errors_name_the_file_and_exit_nonzero() {
    let out = bin().args(["eval", "/nonexistent/model", "--text", "x.txt"]).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("/nonexistent/model") && !e.contains("panicked"), "{e}");
}

#[test]
fn bench_decode_refuses_unknown_or_unavailable_paths() {
    let model = fixture("granite-tiny");
    let m = model.to_str().unwrap();
    for (paths, want) in [("fast", "unknown path `fast`"), ("graph", "--paths graph or fused needs a CUDA build"), ("ops,fuse", "unknown path `fuse`"), ("fused", "--paths graph or fused needs a CUDA build")] {
        let out = bin().args(["bench", "decode", m, "--paths", paths, "--tokens", "2", "--prompt-tokens", "4"]).output().unwrap();
        assert!(!out.status.success(), "--paths {paths} succeeded on the CPU");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(want) && !e.contains("panicked"), "{e}");
    }
    // the CPU path itself runs and prints its table
    let out = bin().args(["bench", "decode", m, "--paths", "ops", "--tokens", "4", "--prompt-tokens", "8", "--repeats", "1"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(o.contains("candle ops") && o.contains("1.00x"), "{o}");
}

fn dir_digest(dir: &Path) -> Vec<(String, u64, Vec<u8>)> {
    use std::io::Read;
    let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v.iter()
        .map(|p| {
            let mut f = std::fs::File::open(p).unwrap();
            let mut head = vec![0u8; 1 << 16];
            let n = f.read(&mut head).unwrap();
            head.truncate(n);
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::metadata(p).unwrap().len(), head)
        })
        .collect()
}

/// One synthetic ~200 MB checkpoint shared by the two tests below.
fn synthetic() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("synth-llama-200mb");
    if !dir.join("config.json").is_file() {
        let out = bin()
            .args(["synth", "--preset", "llama-200mb", "--tokenizer", fixture("granite-tiny").join("tokenizer.json").to_str().unwrap(), "--out", dir.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    dir
}

#[test]
fn peak_rss_while_compressing_stays_below_the_file_size() {
    let src = synthetic();
    let size: u64 = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap()).filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors")).map(|e| e.metadata().unwrap().len()).sum();
    assert!(size > 180 << 20, "synthetic checkpoint is {size} bytes");
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("svd");
    let v = run_json(&["compress", src.to_str().unwrap(), "--method", "svd", "--ratio", "0.5", "--shard-mb", "32", "--out", out_dir.to_str().unwrap(), "--json"]);
    let rss = v["peak_rss_bytes"].as_u64().unwrap();
    println!("peak RSS {:.1} MiB while compressing a {:.1} MiB checkpoint", rss as f64 / 1048576.0, size as f64 / 1048576.0);
    assert!(rss < size, "peak RSS {rss} ≥ checkpoint size {size}");
    assert!(out_dir.join("compactor.json").is_file());
}

#[test]
fn sigkill_mid_write_leaves_the_source_untouched_and_nothing_loadable() {
    let src = synthetic();
    let before = dir_digest(&src);
    let tmp = tempfile::tempdir().unwrap();
    let killed = tmp.path().join("killed");
    let mut child = bin().args(["compress", src.to_str().unwrap(), "--method", "svd", "--ratio", "0.5", "--shard-mb", "16", "--out", killed.to_str().unwrap()]).spawn().unwrap();
    // wait until it has started writing shards
    let t0 = std::time::Instant::now();
    loop {
        let partial = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with(".killed.partial"));
        if let Some(p) = partial {
            if std::fs::read_dir(&p).map(|d| d.count()).unwrap_or(0) > 1 {
                break;
            }
        }
        assert!(t0.elapsed().as_secs() < 300, "compress never started writing");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(dir_digest(&src), before, "the source checkpoint changed");
    assert!(!killed.exists(), "a killed run must not leave a directory under the output name");
    let mut seen = 0;
    for e in std::fs::read_dir(tmp.path()).unwrap() {
        let p = e.unwrap().path();
        seen += 1;
        assert!(compactor_core::compressed::CompressedModel::open(&p).is_err(), "{} loads as complete", p.display());
    }
    assert!(seen >= 1, "the partial directory should be there to inspect");
}

fn png_size_and_colors(p: &Path) -> (u32, u32, usize) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    let px = &buf[..info.buffer_size()];
    let colors: std::collections::HashSet<&[u8]> = px.chunks(info.color_type.samples()).collect();
    (info.width, info.height, colors.len())
}

#[test]
fn render_draws_every_chart_from_the_model_and_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("granite-tiny");
    let m = m.to_str().unwrap();
    let cases: [(&str, &[&str]); 3] = [
        ("spectra", &["--model", m, "--layers", "model.layers.*.mlp.down_proj", "--ratio", "0.5"]),
        ("heatmap", &["--model", m, "--layer", "model.layers.0.mlp.down_proj", "--method", "svd", "--ratio", "0.5"]),
        ("curves", &["--model", m, "--layer", "model.layers.0.self_attn.k_proj", "--sites", "2"]),
    ];
    for (kind, args) in cases {
        let out = tmp.path().join(format!("{kind}.png"));
        let o = bin().args(["render", kind]).args(args).args(["--width", "480", "--height", "320", "--scale", "2", "--out", out.to_str().unwrap()]).output().unwrap();
        assert!(o.status.success(), "render {kind}: {}", String::from_utf8_lossy(&o.stderr));
        let (w, h, colors) = png_size_and_colors(&out);
        assert_eq!((w, h), (960, 640), "{kind}: 2x scale of 480 x 320");
        assert!(colors > 50, "{kind}: only {colors} colors — an empty chart?");
    }
    for (args, want) in [
        (vec!["render", "pie", "--out", "x.png"], "unknown chart `pie`"),
        (vec!["render", "heatmap", "--out", "x.png"], "needs --model"),
        (vec!["render", "heatmap", "--model", m, "--layer", "model.layers.0.nope", "--out", "x.png"], "no linear layer named `model.layers.0.nope`"),
        (vec!["render", "layer-map", "--variants", m, "--out", "x.png"], "compactor.json"),
    ] {
        let o = bin().args(&args).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(want) && !e.contains("panicked"), "{args:?}: {e}");
    }
}
