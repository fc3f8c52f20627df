//! The shard writer on real files: tensors go straight into shard files behind a reserved
//! header, shards split by byte budget and by header room, and every file parses as safetensors
//! with the values that went in.

use compactor_core::checkpoint::OwnedTensor;
use compactor_core::compressed::ShardWriter;
use std::collections::BTreeSet;
use std::path::Path;

fn read_back(dir: &Path) -> (Vec<String>, Vec<(String, Vec<f32>)>) {
    let idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    let files: BTreeSet<String> = idx["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap().to_string()).collect();
    let mut tensors = vec![];
    for f in &files {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{f}: {e}"));
        for (name, view) in st.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            tensors.push((name, view.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()));
        }
    }
    (files.into_iter().collect(), tensors)
}

#[test]
fn shards_split_by_budget_and_hold_the_values_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(dir.path(), 4096);
    for i in 0..10 {
        let v: Vec<f32> = (0..256).map(|k| (i * 1000 + k) as f32).collect();
        w.add(OwnedTensor::from_f32(format!("t{i}"), vec![16, 16], &v)).unwrap();
    }
    let total = w.finish().unwrap();
    let (files, tensors) = read_back(dir.path());
    assert_eq!(files.len(), 3, "10 tensors of 1 KiB in 4 KiB shards");
    assert_eq!(tensors.len(), 10);
    for (name, v) in &tensors {
        let i: usize = name[1..].parse().unwrap();
        assert_eq!(v[0], (i * 1000) as f32);
        assert_eq!(v[255], (i * 1000 + 255) as f32);
    }
    let on_disk: u64 = files.iter().map(|f| std::fs::metadata(dir.path().join(f)).unwrap().len()).sum();
    assert_eq!(total, on_disk);
}

#[test]
fn a_shard_closes_before_its_header_outgrows_the_reserve() {
    // 9000 tensors with 120-character names: one header would need ~2 MiB, more than the 1 MiB
    // reserved in front of the data, so the writer opens new shards
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(dir.path(), 1 << 30);
    for i in 0..9000 {
        w.add(OwnedTensor::from_f32(format!("{i:0>120}"), vec![2], &[i as f32, -(i as f32)])).unwrap();
    }
    w.finish().unwrap();
    let (files, tensors) = read_back(dir.path());
    assert!(files.len() >= 2, "{files:?}");
    assert_eq!(tensors.len(), 9000);
    for (name, v) in &tensors {
        let i: f32 = name.parse::<u32>().unwrap() as f32;
        assert_eq!(v, &vec![i, -i]);
    }
}
