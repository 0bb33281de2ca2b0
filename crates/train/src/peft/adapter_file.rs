//! The adapter folder PEFT's `PeftModel.from_pretrained` and vLLM load:
//! `adapter_config.json` ([`AdapterConfig`]) and `adapter_model.safetensors` (F32 tensors named
//! by [`lora_tensor_names`], metadata `{"format": "pt"}` as PEFT writes).
//!
//! dtype: we write F32. PEFT 0.21 writes F32 LoRA tensors for a bf16 base too (it upcasts
//! adapter weights with `autocast_adapter_dtype=True`, its default), BF16 only when that is
//! turned off; the full-weight dumps below come in the base model's dtype.
//!
//! Unlike PEFT we do not dump the full base embedding and LM head beside their LoRA tensors
//! (PEFT does when embed_tokens or lm_head is targeted, ≈1.8 GB for gemma-2-9b): they are the
//! base model's own unchanged weights, vLLM skips them anyway, and PEFT loads an adapter
//! without them. Reading an adapter PEFT wrote skips those dumps and lists them in
//! [`LoadedAdapter::ignored_tensors`].
//!
//! Writing puts the tensors in place first and adapter_config.json last, each through a
//! temporary file and a rename: a folder without adapter_config.json is incomplete.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use engine::Tensor;
use model::{Lora, LoraTarget, ModelConfig};

use crate::error::{Result, TrainError};
use crate::peft::config::{AdapterConfig, CONFIG_FILE};
use crate::peft::keys::{is_base_weight_dump, lora_tensor_names};
use crate::peft::tensor_file::{F32Tensor, TensorFile, write_f32};

/// The weights file's name in an adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// An adapter read from a folder.
#[derive(Debug)]
pub struct LoadedAdapter {
    pub lora: Lora,
    pub base_model_name_or_path: Option<String>,
    /// Tensors in the file that are not LoRA weights but PEFT's dumps of full base weights
    /// (embedding, head), skipped.
    pub ignored_tensors: Vec<String>,
}

/// Writes `lora` as a PEFT adapter folder `dir` (created if needed).
pub fn save_adapter(dir: &Path, lora: &Lora, base_model_name_or_path: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let pairs = lora.pairs();
    let mut tensors = Vec::with_capacity(2 * pairs.len());
    for (layer, target, pair) in pairs {
        let [a_name, b_name] = lora_tensor_names(target, layer);
        for (name, t) in [(a_name, &pair.a), (b_name, &pair.b)] {
            tensors.push(F32Tensor {
                name,
                shape: t.shape().to_vec(),
                data: t.as_slice()?,
            });
        }
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_f32(&dir.join(WEIGHTS_FILE), &tensors, metadata)?;
    AdapterConfig {
        spec: lora.spec.clone(),
        base_model_name_or_path: base_model_name_or_path.map(str::to_string),
    }
    .write(dir)
}

/// Reads the adapter folder `dir` for `model`: every LoRA tensor the config's targets imply
/// must be present with its shape; any other tensor, except PEFT's base-weight dumps, is an
/// error (it would be a trained weight we silently drop).
pub fn load_adapter(dir: &Path, model: &ModelConfig) -> Result<LoadedAdapter> {
    let config = AdapterConfig::read(&dir.join(CONFIG_FILE))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(TrainError::Format {
            path: dir.join("adapter_model.bin"),
            where_: "file".into(),
            msg: "pickled adapters are not read; save it with safe_serialization=True".into(),
        });
    }
    let file = TensorFile::read(&weights_path)?;
    let r = config.spec.r;
    let mut lora = Lora::zeros(config.spec.clone(), model)?;
    let mut used = HashSet::new();
    for (layer, target, pair) in lora.pairs_mut() {
        let names = lora_tensor_names(target, layer);
        let expected = [pair.a.shape().to_vec(), pair.b.shape().to_vec()];
        let mut loaded = Vec::with_capacity(2);
        for (which, (name, shape)) in names.iter().zip(expected).enumerate() {
            let (got_shape, values) = file.f32_tensor(name)?.ok_or_else(|| TrainError::Format {
                path: weights_path.clone(),
                where_: format!("tensor {name}"),
                msg: format!(
                    "missing (adapter_config.json targets {}, so every one of the model's {} layers needs it)",
                    target.hf_name(),
                    model.num_layers
                ),
            })?;
            if got_shape != shape {
                return Err(TrainError::Format {
                    path: weights_path.clone(),
                    where_: format!("tensor {name}"),
                    msg: shape_mismatch(&got_shape, &shape, which, r),
                });
            }
            loaded.push(Tensor::from_vec(values, &shape)?);
            used.insert(name.clone());
        }
        let b = loaded.pop();
        let a = loaded.pop();
        if let (Some(a), Some(b)) = (a, b) {
            pair.a = a;
            pair.b = b;
        }
    }
    let mut ignored = Vec::new();
    let st = file.tensors()?;
    let mut names = st.names();
    names.sort();
    for name in names {
        if used.contains(name) {
            continue;
        }
        if is_base_weight_dump(name) {
            ignored.push(name.to_string());
            continue;
        }
        return Err(TrainError::Format {
            path: weights_path.clone(),
            where_: format!("tensor {name}"),
            msg: unexpected_tensor(name, &config, model),
        });
    }
    Ok(LoadedAdapter {
        lora,
        base_model_name_or_path: config.base_model_name_or_path,
        ignored_tensors: ignored,
    })
}

/// Says what is wrong with a tensor's shape: a rank other than the config's r gets its own
/// message, since that is the usual cause (a config from another adapter).
fn shape_mismatch(got: &[usize], want: &[usize], which: usize, r: usize) -> String {
    // A is [R, in]; B is [out, R].
    let rank_axis = if which == 0 { 0 } else { 1 };
    if got.len() == 2 && got[rank_axis] != r && got[1 - rank_axis] == want[1 - rank_axis] {
        format!(
            "shape {got:?} has rank {} but adapter_config.json says r = {r} (expected {want:?})",
            got[rank_axis]
        )
    } else {
        format!("shape {got:?}; expected {want:?} for this model")
    }
}

/// Why a tensor that is not one of the expected LoRA tensors is refused.
fn unexpected_tensor(name: &str, config: &AdapterConfig, model: &ModelConfig) -> String {
    let layer_beyond = name
        .split(".layers.")
        .nth(1)
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .filter(|&i| i >= model.num_layers);
    if let Some(i) = layer_beyond {
        return format!(
            "layer {i} does not exist: the model has {} layers (an adapter for another model?)",
            model.num_layers
        );
    }
    let listed: Vec<&str> = config.spec.targets.iter().map(|t| t.hf_name()).collect();
    let module_hint = LoraTarget::ALL
        .iter()
        .find(|t| name.contains(&format!(".{}.", t.hf_name())))
        .filter(|t| !config.spec.targets.contains(t))
        .map(|t| {
            format!(
                " ({} is not in target_modules [{}])",
                t.hf_name(),
                listed.join(", ")
            )
        })
        .unwrap_or_default();
    format!("not a LoRA weight of this adapter's modules{module_hint}")
}
