#![allow(dead_code)]
use candle_core::{Device, Tensor};
use std::path::PathBuf;

/// ../shared beside the repository (CI gets a read-only copy there).
pub fn shared() -> PathBuf {
    let p = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR"))).join("../../../shared");
    assert!(p.is_dir(), "shared/ not found beside the repository at {}", p.display());
    p
}
pub fn fixture(name: &str) -> PathBuf {
    shared().join("fixtures").join(name)
}
pub fn corpus(name: &str) -> PathBuf {
    shared().join("corpora").join(name)
}
pub fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("fixture.json")).unwrap()).unwrap()
}

/// (input_ids, logits [S, V]) of a reference logits file.
pub fn reference_logits(name: &str, file: &str) -> (Vec<u32>, Tensor) {
    let t = candle_core::safetensors::load(fixture(name).join(file), &Device::Cpu).unwrap();
    let ids: Vec<i64> = t["input_ids"].to_vec1().unwrap();
    (ids.into_iter().map(|x| x as u32).collect(), t["logits"].clone())
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(candle_core::DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(candle_core::DType::F64).unwrap().flatten_all().unwrap();
    let d: f64 = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    let n: f64 = b.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    (d / n).sqrt()
}

/// Copies a fixture into a fresh temporary directory (so tests can break it).
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        let mut perm = std::fs::metadata(&p).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&p, perm).unwrap();
    }
    dir
}
