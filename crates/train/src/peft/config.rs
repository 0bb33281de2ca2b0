//! adapter_config.json: written key for key as PEFT 0.21's `LoraConfig.save_pretrained`
//! writes it, read from what any PEFT version wrote.
//!
//! Writing: PEFT dumps every LoraConfig field, `json.dumps(indent=2, sort_keys=True)` with
//! Python's default ASCII escaping and no final newline; `inference_mode` is true (PeftModel
//! sets it while saving). We write the same 41 keys with the values PEFT writes for a plain
//! LoRA (no DoRA, no per-module ranks, no bias), and `peft_version` "0.21.2", the version whose
//! format this is. Two things PEFT itself does not pin down: `target_modules` is a Python set
//! there, so its order depends on string hashing — we list the modules in
//! [`LoraTarget::ALL`] order; and `lora_alpha` is written as an integer when it is one
//! (LoraConfig's type is int), else as a float.
//!
//! Reading accepts older and newer PEFT files (missing keys take LoraConfig's defaults) but
//! refuses what our LoRA cannot represent — DoRA, per-module ranks or alphas, LoRA biases,
//! `modules_to_save`, a subset of layers, regex `target_modules`, unknown module names — with
//! an error naming the file and field.

use std::collections::BTreeMap;
use std::path::Path;

use model::{LoraSpec, LoraTarget};
use serde_json::{Map, Value, json};

use crate::error::{Result, TrainError};
use crate::peft::tensor_file::write_atomically;

/// The config file's name in an adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The PEFT release whose adapter_config.json we reproduce.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// What adapter_config.json says about a LoRA adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    pub spec: LoraSpec,
    /// The base model's Hub id or folder (PEFT writes null when it has none).
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    /// The exact text PEFT 0.21 writes for this adapter.
    pub fn to_json(&self) -> String {
        let spec = &self.spec;
        let mut targets: Vec<LoraTarget> = spec.targets.clone();
        targets.sort();
        targets.dedup();
        let fields: BTreeMap<&str, Value> = BTreeMap::from([
            ("alora_invocation_tokens", Value::Null),
            ("alpha_pattern", json!({})),
            ("arrow_config", Value::Null),
            ("auto_mapping", Value::Null),
            (
                "base_model_name_or_path",
                self.base_model_name_or_path
                    .as_ref()
                    .map_or(Value::Null, |s| Value::String(s.clone())),
            ),
            ("bias", json!("none")),
            ("corda_config", Value::Null),
            ("ensure_weight_tying", json!(false)),
            ("eva_config", Value::Null),
            ("exclude_modules", Value::Null),
            ("fan_in_fan_out", json!(false)),
            ("inference_mode", json!(true)),
            ("init_lora_weights", json!(true)),
            ("kasa_config", Value::Null),
            ("layer_replication", Value::Null),
            ("layers_pattern", Value::Null),
            ("layers_to_transform", Value::Null),
            ("loftq_config", json!({})),
            ("lora_alpha", alpha_value(spec.alpha)),
            ("lora_bias", json!(false)),
            ("lora_dropout", json!(shortest_f64(spec.dropout))),
            ("lora_ga_config", Value::Null),
            ("megatron_config", Value::Null),
            ("megatron_core", json!("megatron.core")),
            ("modules_to_save", Value::Null),
            ("monteclora_config", Value::Null),
            ("peft_type", json!("LORA")),
            ("peft_version", json!(PEFT_FORMAT_VERSION)),
            ("qalora_group_size", json!(16)),
            ("r", json!(spec.r)),
            ("rank_pattern", json!({})),
            ("revision", Value::Null),
            (
                "target_modules",
                Value::Array(targets.iter().map(|t| json!(t.hf_name())).collect()),
            ),
            ("target_parameters", Value::Null),
            ("task_type", json!("CAUSAL_LM")),
            ("trainable_token_indices", Value::Null),
            ("use_bdlora", Value::Null),
            ("use_dora", json!(false)),
            ("use_qalora", json!(false)),
            ("use_rslora", json!(spec.use_rslora)),
            ("velora_config", Value::Null),
        ]);
        // A BTreeMap serialises in key order (Python's sort_keys), whatever serde_json's
        // `preserve_order` feature does to `Value` maps; the nested maps are empty.
        let text = serde_json::to_string_pretty(&fields).unwrap_or_default();
        ascii_escape(&text)
    }

    /// Writes `<dir>/adapter_config.json` (temporary file, then rename).
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        write_atomically(&dir.join(CONFIG_FILE), self.to_json().as_bytes())
    }

    /// Reads and checks an adapter_config.json.
    pub fn read(path: &Path) -> Result<AdapterConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        AdapterConfig::from_json_str(&text, path)
    }

    /// Parses adapter_config.json text; `path` only names the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<AdapterConfig> {
        let value: Value = serde_json::from_str(text).map_err(|source| TrainError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let Value::Object(map) = value else {
            return Err(field_error(path, "(root)", "expected a JSON object".into()));
        };
        let fields = Fields { path, map: &map };
        fields.check_supported()?;

        let r = fields
            .required("r")?
            .as_u64()
            .filter(|&r| r >= 1)
            .ok_or_else(|| fields.error("r", "expected a positive integer"))?;
        let alpha = fields
            .required("lora_alpha")?
            .as_f64()
            .ok_or_else(|| fields.error("lora_alpha", "expected a number"))?;
        let dropout = match fields.get("lora_dropout") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| fields.error("lora_dropout", "expected a number"))?,
        };
        let use_rslora = fields.bool_or("use_rslora", false)?;
        let spec = LoraSpec {
            r: r as usize,
            alpha: alpha as f32,
            dropout: dropout as f32,
            use_rslora,
            targets: fields.targets()?,
        };
        spec.validate()
            .map_err(|e| field_error(path, "(LoRA settings)", e.to_string()))?;
        let base_model_name_or_path = match fields.get("base_model_name_or_path") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                return Err(fields.error("base_model_name_or_path", "expected a string or null"));
            }
        };
        Ok(AdapterConfig {
            spec,
            base_model_name_or_path,
        })
    }
}

/// adapter_config.json's fields, with errors that name the file and field.
struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    /// A field that is absent or null counts as absent (PEFT writes null for unset options).
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| self.error(key, "missing"))
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(key, "expected true or false")),
        }
    }

    fn error(&self, key: &str, msg: &str) -> TrainError {
        field_error(self.path, key, msg.to_string())
    }

    /// Refuses settings our LoRA cannot reproduce (what PEFT would compute differently).
    fn check_supported(&self) -> Result<()> {
        match self.get("peft_type") {
            Some(Value::String(t)) if t == "LORA" => {}
            Some(other) => {
                return Err(self.error(
                    "peft_type",
                    &format!("{other}; only LORA adapters are supported"),
                ));
            }
            None => return Err(self.error("peft_type", "missing")),
        }
        if let Some(task) = self.get("task_type")
            && task != "CAUSAL_LM"
        {
            return Err(self.error("task_type", &format!("{task}; expected CAUSAL_LM")));
        }
        for key in ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
            if self.bool_or(key, false)? {
                return Err(self.error(key, "true is not supported"));
            }
        }
        if let Some(bias) = self.get("bias")
            && bias != "none"
        {
            return Err(self.error(
                "bias",
                &format!("{bias} is not supported; expected \"none\""),
            ));
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            match self.get(key) {
                None => {}
                Some(Value::Object(m)) if m.is_empty() => {}
                Some(_) => {
                    return Err(self.error(key, "per-module ranks and alphas are not supported"));
                }
            }
        }
        for key in [
            "modules_to_save",
            "layers_to_transform",
            "layers_pattern",
            "layer_replication",
            "exclude_modules",
            "target_parameters",
            "trainable_token_indices",
        ] {
            match self.get(key) {
                None => {}
                Some(Value::Array(a)) if a.is_empty() => {}
                Some(v) => {
                    return Err(self.error(key, &format!("{v} is not supported; expected null")));
                }
            }
        }
        Ok(())
    }

    /// `target_modules`: a list of module names (a string is a regex or "all-linear" in PEFT,
    /// which we do not resolve).
    fn targets(&self) -> Result<Vec<LoraTarget>> {
        let list = match self.required("target_modules")? {
            Value::Array(list) => list,
            Value::String(s) => {
                return Err(self.error(
                    "target_modules",
                    &format!(
                        "{s:?}: a regex or \"all-linear\" is not supported; list the module names"
                    ),
                ));
            }
            _ => return Err(self.error("target_modules", "expected a list of module names")),
        };
        let mut targets = Vec::with_capacity(list.len());
        for item in list {
            let name = item.as_str().ok_or_else(|| {
                self.error("target_modules", &format!("{item} is not a module name"))
            })?;
            let target = LoraTarget::parse(name)
                .map_err(|e| self.error("target_modules", &e.to_string()))?;
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
        if targets.is_empty() {
            return Err(self.error("target_modules", "empty"));
        }
        targets.sort();
        Ok(targets)
    }
}

fn field_error(path: &Path, key: &str, msg: String) -> TrainError {
    TrainError::Format {
        path: path.to_path_buf(),
        where_: format!("field {key}"),
        msg,
    }
}

/// lora_alpha as PEFT writes it: an int for an integral value (LoraConfig's type), else the
/// f32's shortest decimal.
fn alpha_value(alpha: f32) -> Value {
    if alpha.fract() == 0.0 && alpha.abs() < 9.0e15 {
        json!(alpha as i64)
    } else {
        json!(shortest_f64(alpha))
    }
}

/// The f64 whose shortest decimal is the f32's: 0.05f32 is written 0.05 (as the user typed it
/// into PEFT), not 0.05000000074505806.
fn shortest_f64(x: f32) -> f64 {
    format!("{x}").parse().unwrap_or(x as f64)
}

/// Python's `json.dumps` default `ensure_ascii`: every character outside printable ASCII is
/// written `\uXXXX` (UTF-16 units, lower-case hex). In JSON text such characters only occur
/// inside strings, so escaping the serialised text is the same as escaping each string.
fn ascii_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if (c as u32) < 0x7f {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LoraSpec {
        LoraSpec {
            r: 16,
            alpha: 16.0,
            dropout: 0.05,
            use_rslora: false,
            targets: vec![
                LoraTarget::LmHead,
                LoraTarget::QProj,
                LoraTarget::EmbedTokens,
            ],
        }
    }

    #[test]
    fn writes_sorted_keys_pythons_layout_and_canonical_target_order() {
        let text = AdapterConfig {
            spec: spec(),
            base_model_name_or_path: Some("org/model".into()),
        }
        .to_json();
        assert!(
            text.starts_with("{\n  \"alora_invocation_tokens\": null,\n  \"alpha_pattern\": {},\n")
        );
        assert!(text.contains("\n  \"lora_alpha\": 16,\n"), "{text}");
        assert!(text.contains("\n  \"lora_dropout\": 0.05,\n"), "{text}");
        assert!(
            text.contains("\"target_modules\": [\n    \"embed_tokens\",\n    \"q_proj\",\n    \"lm_head\"\n  ],"),
            "{text}"
        );
        assert!(
            text.ends_with("\"velora_config\": null\n}"),
            "no final newline: {text}"
        );
        let keys: Vec<String> = serde_json::from_str::<Map<String, Value>>(&text)
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys.len(), 41);
        assert_eq!(keys, sorted);
    }

    #[test]
    fn non_ascii_is_escaped_as_python_does() {
        assert_eq!(
            ascii_escape("\"모델 🤗\""),
            "\"\\ubaa8\\ub378 \\ud83e\\udd17\""
        );
        assert_eq!(ascii_escape("a\u{7f}"), "a\\u007f");
    }

    #[test]
    fn alpha_and_dropout_are_written_as_typed() {
        assert_eq!(alpha_value(8.0), json!(8));
        assert_eq!(alpha_value(0.5), json!(0.5));
        assert_eq!(shortest_f64(0.05), 0.05);
        assert_eq!(shortest_f64(0.0), 0.0);
    }

    #[test]
    fn what_we_write_reads_back() {
        let config = AdapterConfig {
            spec: LoraSpec {
                use_rslora: true,
                alpha: 2.5,
                ..spec()
            },
            base_model_name_or_path: None,
        };
        let back = AdapterConfig::from_json_str(&config.to_json(), Path::new("a.json")).unwrap();
        let mut want = config.clone();
        want.spec.targets.sort();
        assert_eq!(back, want);
    }

    #[test]
    fn unsupported_settings_name_the_file_and_field() {
        let base = AdapterConfig {
            spec: spec(),
            base_model_name_or_path: None,
        }
        .to_json();
        let path = Path::new("dir/adapter_config.json");
        let cases = [
            (
                "\"use_dora\": false",
                "\"use_dora\": true",
                "field use_dora",
            ),
            (
                "\"rank_pattern\": {}",
                "\"rank_pattern\": {\"q_proj\": 8}",
                "field rank_pattern",
            ),
            (
                "\"modules_to_save\": null",
                "\"modules_to_save\": [\"score\"]",
                "field modules_to_save",
            ),
            (
                "\"peft_type\": \"LORA\"",
                "\"peft_type\": \"IA3\"",
                "field peft_type",
            ),
            ("\"r\": 16", "\"r\": 0", "field r"),
            ("\"q_proj\"", "\"qkv_proj\"", "field target_modules"),
            (
                "\"lora_dropout\": 0.05",
                "\"lora_dropout\": 1.5",
                "lora_dropout",
            ),
        ];
        for (from, to, want) in cases {
            assert!(base.contains(from), "{from}");
            let err = AdapterConfig::from_json_str(&base.replace(from, to), path)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("dir/adapter_config.json") && err.contains(want),
                "{to}: {err}"
            );
        }
        let regex = base.replace(
            "\"target_modules\": [\n    \"embed_tokens\",\n    \"q_proj\",\n    \"lm_head\"\n  ]",
            "\"target_modules\": \"all-linear\"",
        );
        let err = AdapterConfig::from_json_str(&regex, path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("all-linear"), "{err}");
    }

    #[test]
    fn minimal_old_configs_take_peft_defaults() {
        let text = r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 32, "target_modules": ["v_proj", "q_proj"]}"#;
        let c = AdapterConfig::from_json_str(text, Path::new("x")).unwrap();
        assert_eq!(c.spec.targets, [LoraTarget::QProj, LoraTarget::VProj]);
        assert_eq!((c.spec.dropout, c.spec.use_rslora), (0.0, false));
        assert_eq!(c.base_model_name_or_path, None);
    }
}
