//! What a checkpoint holds: architecture, dimensions, every tensor, the linear layers of the
//! blocks grouped by role, and totals. Built from safetensors headers only.

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::model::{linear_layers, Role};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub params: usize,
    pub bytes: usize,
    /// q/k/v/o/gate/up/down for the linear layers of the blocks.
    pub role: Option<Role>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoleGroup {
    pub role: Role,
    pub count: usize,
    /// (out, in) of each layer of this role (they are all equal in this family).
    pub shape: [usize; 2],
    pub params: usize,
    pub bytes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    pub dir: String,
    pub config: ModelConfig,
    pub files: Vec<String>,
    pub file_bytes: u64,
    pub tensors: Vec<TensorEntry>,
    pub linear_groups: Vec<RoleGroup>,
    pub total_params: usize,
    pub total_bytes: usize,
    /// Parameters in the linear layers of the blocks (what compression acts on).
    pub linear_params: usize,
    pub linear_bytes: usize,
}

pub fn inventory(ck: &Checkpoint) -> Inventory {
    let tensors: Vec<TensorEntry> = ck
        .tensors()
        .map(|t| TensorEntry {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype.clone(),
            params: t.numel(),
            bytes: t.nbytes(),
            role: if t.name.ends_with(".weight") { Role::of(&t.name) } else { None },
        })
        .collect();
    let mut groups: BTreeMap<Role, RoleGroup> = BTreeMap::new();
    for spec in linear_layers(&ck.config) {
        let w = format!("{}.weight", spec.name);
        let Some(t) = tensors.iter().find(|t| t.name == w) else { continue };
        let g = groups.entry(spec.role).or_insert(RoleGroup { role: spec.role, count: 0, shape: [spec.out_features, spec.in_features], params: 0, bytes: 0 });
        g.count += 1;
        g.params += t.params;
        g.bytes += t.bytes;
    }
    let linear_groups: Vec<RoleGroup> = Role::ALL.iter().filter_map(|r| groups.remove(r)).collect();
    Inventory {
        dir: ck.dir.display().to_string(),
        config: ck.config.clone(),
        files: ck.files().iter().map(|p| p.display().to_string()).collect(),
        file_bytes: ck.file_bytes(),
        total_params: tensors.iter().map(|t| t.params).sum(),
        total_bytes: tensors.iter().map(|t| t.bytes).sum(),
        linear_params: linear_groups.iter().map(|g| g.params).sum(),
        linear_bytes: linear_groups.iter().map(|g| g.bytes).sum(),
        tensors,
        linear_groups,
    }
}
