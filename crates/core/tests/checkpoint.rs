//! Opening checkpoints: inventory totals, sharded checkpoints, and clear errors on bad input.

mod common;
use candle_core::{DType, Device};
use common::*;
use compactor_core::{checkpoint::OwnedTensor, eval, inventory::inventory, Checkpoint, Error, Model};
use std::collections::BTreeMap;
use std::path::Path;

/// Header of a safetensors file, parsed independently of the engine.
fn header(path: &Path) -> (BTreeMap<String, serde_json::Value>, Vec<u8>) {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&b[8..8 + n]).unwrap(), b[8 + n..].to_vec())
}

fn write_with_header(path: &Path, h: &BTreeMap<String, serde_json::Value>, data: &[u8]) {
    let hs = serde_json::to_vec(h).unwrap();
    let mut out = (hs.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&hs);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn inventory_totals_equal_the_header_sums() {
    for name in ["granite-tiny", "stories260K"] {
        let dir = fixture(name);
        let (h, _) = header(&dir.join("model.safetensors"));
        let mut params = 0usize;
        for (k, v) in &h {
            if k == "__metadata__" { continue; }
            params += v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).product::<usize>();
        }
        let inv = inventory(&Checkpoint::open(&dir).unwrap());
        assert_eq!(inv.total_params, params, "{name}");
        assert_eq!(inv.tensors.len(), h.len() - h.contains_key("__metadata__") as usize);
        assert_eq!(inv.linear_groups.len(), 7);
        assert_eq!(inv.linear_groups.iter().map(|g| g.count).sum::<usize>(), 7 * inv.config.num_hidden_layers);
    }
}

#[test]
fn sharded_checkpoint_has_the_same_totals_and_logits() {
    let src = Checkpoint::open(fixture("granite-tiny")).unwrap();
    let dir = copy_fixture("granite-tiny");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let names: Vec<String> = src.tensors().map(|t| t.name.clone()).collect();
    let mut map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len() / 3 + 1).enumerate() {
        let file = format!("model-{:05}-of-00003.safetensors", i + 1);
        let ts: Vec<OwnedTensor> = chunk.iter().map(|n| OwnedTensor::from_tensor(n, &src.tensor(n, DType::BF16, &Device::Cpu).unwrap(), DType::BF16).unwrap()).collect();
        compactor_core::checkpoint::write_safetensors(&dir.path().join(&file), &ts, None).unwrap();
        for n in chunk { map.insert(n.clone(), serde_json::Value::String(file.clone())); }
    }
    std::fs::write(dir.path().join("model.safetensors.index.json"), serde_json::to_string(&serde_json::json!({"metadata": {}, "weight_map": map})).unwrap()).unwrap();
    let sharded = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(sharded.files().len(), 3);
    let (a, b) = (inventory(&src), inventory(&sharded));
    assert_eq!(a.total_params, b.total_params);
    assert_eq!(a.total_bytes, b.total_bytes);
    assert_eq!(a.linear_params, b.linear_params);
    let x = candle_core::Tensor::new(&[1u32, 50, 300, 7], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let la = Model::load(&src, DType::F32, &Device::Cpu).unwrap().forward(&x, None).unwrap();
    let lb = Model::load(&sharded, DType::F32, &Device::Cpu).unwrap().forward(&x, None).unwrap();
    assert_eq!(rel_l2(&la, &lb), 0.0);
}

#[test]
fn read_into_gives_the_stored_bytes_of_every_tensor() {
    // the GPU loader reads tensors with pread instead of through the mapping: same bytes, checked
    // against an independent parse of the file
    let dir = fixture("granite-tiny");
    let (h, data) = header(&dir.join("model.safetensors"));
    let ck = Checkpoint::open(&dir).unwrap();
    let mut n = 0;
    for (name, v) in &h {
        if name == "__metadata__" { continue; }
        let off: Vec<usize> = v["data_offsets"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let mut buf = vec![0u8; off[1] - off[0]];
        ck.read_into(name, &mut buf).unwrap();
        assert!(buf == data[off[0]..off[1]], "{name}");
        n += 1;
    }
    assert_eq!(n, ck.tensors().count());
    let err = ck.read_into("model.norm.weight", &mut [0u8; 3]).unwrap_err().to_string();
    assert!(err.contains("model.norm.weight") && err.contains("3 bytes"), "{err}");
    let err = ck.read_into("no.such.tensor", &mut []).unwrap_err().to_string();
    assert!(err.contains("no.such.tensor") && err.contains("not found"), "{err}");
}

/// Opens (and loads) a broken copy; returns the error text.
fn open_err(dir: &Path) -> String {
    let r = Checkpoint::open(dir).and_then(|ck| Model::load(&ck, DType::F32, &Device::Cpu).map(|_| ()).and_then(|_| ck.tokenizer().map(|_| ())));
    let e = r.expect_err("broken checkpoint must not load");
    e.to_string()
}

#[test]
fn truncated_safetensors_is_named() {
    let d = copy_fixture("stories260K");
    let p = d.path().join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn header_length_past_end_of_file() {
    let d = copy_fixture("stories260K");
    let p = d.path().join("model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    let big = (b.len() as u64 * 4).to_le_bytes();
    b[..8].copy_from_slice(&big);
    std::fs::write(&p, &b).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("past the end"), "{e}");
    std::fs::write(&p, [1u8, 2, 3]).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("not a safetensors file"), "{e}");
}

#[test]
fn overlapping_and_out_of_range_offsets() {
    let d = copy_fixture("stories260K");
    let p = d.path().join("model.safetensors");
    let (mut h, data) = header(&fixture("stories260K").join("model.safetensors"));
    let name = "model.layers.0.mlp.up_proj.weight".to_string();
    let (s, e) = (h[&name]["data_offsets"][0].as_u64().unwrap(), h[&name]["data_offsets"][1].as_u64().unwrap());
    h.get_mut(&name).unwrap()["data_offsets"] = serde_json::json!([s.saturating_sub(64), e - 64]);
    write_with_header(&p, &h, &data);
    let err = open_err(d.path());
    assert!(err.contains("model.safetensors") && err.contains("offsets"), "{err}");
    // out of range: the last tensor pointing past the data
    let (mut h, data) = header(&fixture("stories260K").join("model.safetensors"));
    let last = h.iter().filter(|(k, _)| *k != "__metadata__").max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap()).unwrap().0.clone();
    let (s, e) = (h[&last]["data_offsets"][0].as_u64().unwrap(), h[&last]["data_offsets"][1].as_u64().unwrap());
    h.get_mut(&last).unwrap()["data_offsets"] = serde_json::json!([s + 1000, e + 1000]);
    write_with_header(&p, &h, &data);
    let err = open_err(d.path());
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn dtype_shape_mismatch_names_the_tensor() {
    let d = copy_fixture("stories260K");
    let p = d.path().join("model.safetensors");
    let (mut h, data) = header(&p);
    h.get_mut("model.norm.weight").unwrap()["shape"] = serde_json::json!([65]);
    write_with_header(&p, &h, &data);
    let e = open_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("model.norm.weight"), "{e}");
    // a shape that is consistent with the bytes but not with config.json
    let (mut h, data) = header(&fixture("stories260K").join("model.safetensors"));
    h.get_mut("model.layers.0.self_attn.q_proj.weight").unwrap()["shape"] = serde_json::json!([32, 128]);
    write_with_header(&p, &h, &data);
    let e = open_err(d.path());
    assert!(e.contains("q_proj") && e.contains("config.json"), "{e}");
}

#[test]
fn missing_shard_named_in_the_index() {
    let d = copy_fixture("stories260K");
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let e = open_err(d.path());
    assert!(e.contains("model-00001-of-00002.safetensors") && e.contains("missing"), "{e}");
}

#[test]
fn config_not_json_and_unknown_model_type() {
    let d = copy_fixture("stories260K");
    std::fs::write(d.path().join("config.json"), "{ this is not json").unwrap();
    let e = open_err(d.path());
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
    std::fs::write(d.path().join("config.json"), r#"{"model_type": "gpt2", "hidden_size": 64}"#).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("config.json") && e.contains("unknown model_type `gpt2`"), "{e}");
}

#[test]
fn missing_files_are_named() {
    let d = copy_fixture("stories260K");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("missing"), "{e}");
    let e = Checkpoint::open(d.path().join("nope")).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn nan_weights_are_refused_with_the_tensor_name() {
    let d = copy_fixture("stories260K");
    let p = d.path().join("model.safetensors");
    let (h, mut data) = header(&p);
    let s = h["model.layers.1.mlp.down_proj.weight"]["data_offsets"][0].as_u64().unwrap() as usize;
    data[s + 8..s + 12].copy_from_slice(&f32::NAN.to_le_bytes());
    write_with_header(&p, &h, &data);
    let e = open_err(d.path());
    assert!(e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("NaN"), "{e}");
}

#[test]
fn empty_or_short_text_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("empty.txt");
    std::fs::write(&p, "").unwrap();
    let e = eval::read_text(&p).unwrap_err();
    assert!(matches!(e, Error::BadFile { .. }) && e.to_string().contains("empty.txt"), "{e}");
    let ck = Checkpoint::open(fixture("stories260K")).unwrap();
    let ids = ck.tokenizer().unwrap().encode("Once upon a time").unwrap();
    let e = eval::windows(&ids, 256, 200, &d.path().join("short.txt")).unwrap_err().to_string();
    assert!(e.contains("short.txt") && e.contains("shorter than one window"), "{e}");
}
