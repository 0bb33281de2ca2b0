//! `generation_config.json`: the token ids and sampling defaults a checkpoint ships for
//! generation. The sampler adds its `eos_token_id`s (an int or a list there) to the stop
//! tokens, as vLLM does.

use std::path::Path;

use serde_json::Value;

use crate::config::{eos_ids, value_u32};
use crate::error::{ModelError, Result};

/// What we read from generation_config.json; every field is optional there.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    /// An int or a list in the file; empty when absent or null.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; `None` when the file does not exist.
    pub fn load(dir: &Path) -> Result<Option<GenerationConfig>> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        GenerationConfig::from_json_str(&text, &path).map(Some)
    }

    /// Parses the file's text; `path` only names it in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<GenerationConfig> {
        let value: Value = serde_json::from_str(text).map_err(|error| ModelError::Json {
            path: path.to_path_buf(),
            error,
        })?;
        let Value::Object(map) = value else {
            return Err(ModelError::config(path, "(root)", "expected a JSON object"));
        };
        let get = |key: &str| map.get(key).filter(|v| !v.is_null());
        let id = |key: &str| -> Result<Option<u32>> {
            get(key)
                .map(|v| {
                    value_u32(v).ok_or_else(|| {
                        ModelError::config(path, key, format!("expected a token id, got {v}"))
                    })
                })
                .transpose()
        };
        let number = |key: &str| -> Result<Option<f64>> {
            get(key)
                .map(|v| {
                    v.as_f64().ok_or_else(|| {
                        ModelError::config(path, key, format!("expected a number, got {v}"))
                    })
                })
                .transpose()
        };
        let eos_token_ids = match map.get("eos_token_id") {
            None => Vec::new(),
            Some(v) => eos_ids(v).ok_or_else(|| {
                ModelError::config(
                    path,
                    "eos_token_id",
                    "expected a token id or a list of them",
                )
            })?,
        };
        let do_sample = get("do_sample")
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    ModelError::config(
                        path,
                        "do_sample",
                        format!("expected true or false, got {v}"),
                    )
                })
            })
            .transpose()?;
        let top_k = get("top_k")
            .map(|v| {
                v.as_i64().ok_or_else(|| {
                    ModelError::config(path, "top_k", format!("expected an integer, got {v}"))
                })
            })
            .transpose()?;
        Ok(GenerationConfig {
            bos_token_id: id("bos_token_id")?,
            eos_token_ids,
            pad_token_id: id("pad_token_id")?,
            do_sample,
            temperature: number("temperature")?,
            top_k,
            top_p: number("top_p")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<GenerationConfig> {
        GenerationConfig::from_json_str(s, Path::new("generation_config.json"))
    }

    #[test]
    fn eos_int_or_list() {
        assert_eq!(
            parse(r#"{"eos_token_id": 3}"#).unwrap().eos_token_ids,
            vec![3]
        );
        assert_eq!(
            parse(r#"{"eos_token_id": [3, 7], "bos_token_id": 1, "pad_token_id": null}"#).unwrap(),
            GenerationConfig {
                bos_token_id: Some(1),
                eos_token_ids: vec![3, 7],
                ..Default::default()
            }
        );
        let g =
            parse(r#"{"do_sample": true, "temperature": 0.6, "top_k": 5, "top_p": 0.9}"#).unwrap();
        assert_eq!(
            (g.do_sample, g.temperature, g.top_k, g.top_p),
            (Some(true), Some(0.6), Some(5), Some(0.9))
        );
    }

    #[test]
    fn bad_fields_named() {
        let e = parse(r#"{"eos_token_id": [1, "x"]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("generation_config.json") && e.contains("eos_token_id"),
            "{e}"
        );
        let e = parse(r#"{"bos_token_id": -1}"#).unwrap_err().to_string();
        assert!(e.contains("bos_token_id"), "{e}");
        assert!(parse("[1]").is_err());
    }

    #[test]
    fn missing_file_is_none() {
        let dir = crate::testutil::temp_dir("gen-none");
        assert_eq!(GenerationConfig::load(&dir).unwrap(), None);
        std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": 2}"#).unwrap();
        assert_eq!(
            GenerationConfig::load(&dir).unwrap().unwrap().eos_token_ids,
            vec![2]
        );
    }
}
