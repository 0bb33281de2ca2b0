//! The fixture cases of fixtures/train/lora_grads (tools/gen_lora_grad_fixtures.py), shared
//! by the CPU test (lora_grads.rs), the GPU one (cuda_lora.rs) and the merge test (merge.rs,
//! which merges their adapters).
#![allow(dead_code)] // each test binary uses its own part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use engine::{Device, Tensor};
use model::{Lora, LoraSpec, LoraTarget, Model, TrainBatch};
use serde_json::Value;
use testkit::{fixtures_dir, packed_rows, peft_lora_key, read_json, read_safetensors_f32};

/// Every case folder, sorted.
pub fn case_dirs() -> Vec<PathBuf> {
    let root = fixtures_dir().join("train").join("lora_grads");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 5,
        "expected a case per fixture model in {}",
        root.display()
    );
    dirs
}

/// PEFT's key of one tensor of a pair.
pub fn peft_key(layer: Option<usize>, t: LoraTarget, a: bool) -> String {
    peft_lora_key(layer, t.hf_name(), a)
}

/// An adapter with the model's shapes, filled from PEFT-named tensors.
pub fn load_lora(
    model: &Model,
    spec: LoraSpec,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
) -> Lora {
    let mut lora = Lora::zeros(spec, model.config()).unwrap();
    for (layer, t, pair) in lora.pairs_mut() {
        for (a, slot) in [(true, &mut pair.a), (false, &mut pair.b)] {
            let key = peft_key(layer, t, a);
            let (shape, data) = tensors.get(&key).unwrap_or_else(|| panic!("no {key}"));
            assert_eq!(shape.as_slice(), slot.shape(), "{key}");
            *slot = Tensor::from_vec(data.clone(), shape).unwrap();
        }
    }
    lora
}

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub struct Case {
    pub name: String,
    pub json: Value,
    pub model: Model,
    pub lora: Lora,
    pub batch: TrainBatch,
}

/// The LoRA settings of a case.json (r, lora_alpha, target_modules), with `dropout`.
pub fn case_spec(case: &Value, dropout: f32) -> LoraSpec {
    let targets = case["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| LoraTarget::parse(t.as_str().unwrap()).unwrap())
        .collect();
    LoraSpec {
        r: case["r"].as_u64().unwrap() as usize,
        alpha: case["lora_alpha"].as_f64().unwrap() as f32,
        dropout,
        use_rslora: false,
        targets,
    }
}

/// A case folder's adapter (its case.json settings, its PEFT-named tensors) with the
/// model's shapes.
pub fn load_adapter(dir: &Path, model: &Model, dropout: f32) -> Lora {
    let spec = case_spec(&read_json(&dir.join("case.json")), dropout);
    load_lora(
        model,
        spec,
        &read_safetensors_f32(&dir.join("adapter_model.safetensors")),
    )
}

/// A fixture case: the model, PEFT's adapter with its settings, the packed batch.
pub fn load_case(dir: &Path, dropout: f32, device: Device) -> Case {
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let case = read_json(&dir.join("case.json"));
    let model = Model::load(&fixtures_dir().join("models").join(&name), device).unwrap();
    let lora = load_adapter(dir, &model, dropout);
    // The sequences packed; scored rows in the fixture's order.
    let packed = packed_rows(&case);
    let batch = TrainBatch {
        ids: packed.ids,
        lens: packed.lens,
        rows: packed.rows,
        targets: packed.targets,
    };
    Case {
        name,
        json: case,
        model,
        lora,
        batch,
    }
}
