//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate, plus what
//! transformers reads from `tokenizer_config.json` (and `special_tokens_map.json`,
//! `chat_template.jinja`): the bos/eos/pad/unk token strings, the chat template, and the
//! `add_bos_token` / `add_eos_token` switches.
//!
//! What we match from transformers 5.17 (`tokenization_utils_tokenizers.py`):
//! - `tok(text)` adds special tokens (the post-processor's BOS/EOS) by default.
//! - When tokenizer_config.json sets `add_bos_token` or `add_eos_token` explicitly, the
//!   post-processor is rebuilt from them (`update_post_processor`): `[bos] $A [eos]`.
//! - Truncation and padding stored in tokenizer.json are switched off, as a plain `tok(text)`
//!   call does.
//!
//! Not matched: the class-specific rebuilds some `PreTrainedTokenizer` subclasses do on load
//! (e.g. transformers 5's `LlamaTokenizer` re-creates its pre-tokenizer from the vocabulary);
//! tokenizer.json is taken as written.
//!
//! [`Tokenizer::encode_prompt_completion`] splits prompt and completion as TRL 1.16's DPO
//! trainer does for plain-text rows.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;
use tokenizers::processors::template::TemplateProcessing;

use crate::error::{ModelError, Result};

/// A prompt and its completion as token ids, split the way TRL splits them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptCompletion {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
}

/// A model's tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_token", &self.pad_token)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (required) and the optional side files.
    pub fn load(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer file not found"),
            ));
        }
        let mut inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
                path: path.clone(),
                msg: format!("cannot load: {e}"),
            })?;
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        inner.with_padding(None);

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_object(&config_path)?;
        let map_path = dir.join("special_tokens_map.json");
        let special_map = read_json_object(&map_path)?;
        // tokenizer_config.json wins; special_tokens_map.json fills in what it lacks.
        let special = |key: &str| -> Result<Option<String>> {
            if let Some(cfg) = &config
                && cfg.contains_key(key)
            {
                return token_string(cfg.get(key), &config_path, key);
            }
            match &special_map {
                Some(m) => token_string(m.get(key), &map_path, key),
                None => Ok(None),
            }
        };
        let bos_token = special("bos_token")?;
        let eos_token = special("eos_token")?;
        let pad_token = special("pad_token")?;
        let unk_token = special("unk_token")?;

        let template_file = dir.join("chat_template.jinja");
        let chat_template = if template_file.is_file() {
            Some(
                std::fs::read_to_string(&template_file)
                    .map_err(|e| ModelError::io(&template_file, e))?,
            )
        } else {
            match &config {
                Some(cfg) => chat_template_field(cfg.get("chat_template"), &config_path)?,
                None => None,
            }
        };

        let mut tokenizer = Tokenizer {
            inner,
            path,
            bos_token,
            eos_token,
            pad_token,
            unk_token,
            chat_template,
        };
        if let Some(cfg) = &config {
            let flag = |key: &str| -> Result<Option<bool>> {
                match cfg.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::Bool(b)) => Ok(Some(*b)),
                    Some(v) => Err(ModelError::config(
                        &config_path,
                        key,
                        format!("expected true or false, got {v}"),
                    )),
                }
            };
            let (add_bos, add_eos) = (flag("add_bos_token")?, flag("add_eos_token")?);
            if add_bos.is_some() || add_eos.is_some() {
                tokenizer.rebuild_post_processor(
                    add_bos.unwrap_or(false),
                    add_eos.unwrap_or(false),
                    &config_path,
                )?;
            }
        }
        Ok(tokenizer)
    }

    /// transformers' `update_post_processor`: `[bos:0] $A:0 [eos:0]` for one sequence, the
    /// same again with type id 1 for a pair. A flag whose token is undefined is dropped.
    fn rebuild_post_processor(
        &mut self,
        add_bos: bool,
        add_eos: bool,
        config_path: &Path,
    ) -> Result<()> {
        let mut specials: Vec<(String, u32)> = Vec::new();
        let mut lookup = |token: &Option<String>, what: &str| -> Result<Option<String>> {
            let Some(t) = token else { return Ok(None) };
            let id = self.inner.token_to_id(t).ok_or_else(|| {
                ModelError::config(
                    config_path,
                    &format!("add_{what}_token"),
                    format!("{what}_token {t:?} is not in the tokenizer's vocabulary"),
                )
            })?;
            if !specials.iter().any(|(s, _)| s == t) {
                specials.push((t.clone(), id));
            }
            Ok(Some(t.clone()))
        };
        let bos = if add_bos {
            lookup(&self.bos_token, "bos")?
        } else {
            None
        };
        let eos = if add_eos {
            lookup(&self.eos_token, "eos")?
        } else {
            None
        };
        let side = |seq: &str, type_id: u32| {
            let mut parts = Vec::new();
            if let Some(b) = &bos {
                parts.push(format!("{b}:{type_id}"));
            }
            parts.push(format!("${seq}:{type_id}"));
            if let Some(e) = &eos {
                parts.push(format!("{e}:{type_id}"));
            }
            parts.join(" ")
        };
        let single = side("A", 0);
        let pair = format!("{single} {}", side("B", 1));
        let template = TemplateProcessing::builder()
            .try_single(single.as_str())
            .and_then(|b| b.try_pair(pair.as_str()))
            .map_err(|e| ModelError::config(config_path, "add_bos_token", e.to_string()))?
            .special_tokens(specials)
            .build()
            .map_err(|e| ModelError::config(config_path, "add_bos_token", e.to_string()))?;
        self.inner.with_post_processor(Some(template));
        Ok(())
    }

    /// The path of tokenizer.json (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `tok(text)["input_ids"]`: special tokens added as the post-processor says.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| ModelError::Tokenizer {
                    path: self.path.clone(),
                    msg: format!("cannot encode text: {e}"),
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                msg: format!("cannot decode ids: {e}"),
            })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    pub fn unk_token(&self) -> Option<&str> {
        self.unk_token.as_deref()
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The chat template (chat_template.jinja, else tokenizer_config.json's `chat_template`).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// TRL 1.16's split of a plain-text row: tokenize the prompt alone and prompt+completion
    /// together (both with special tokens); the prompt is their common prefix and the
    /// completion everything after it. With `add_eos`, the eos_token *string* is appended to
    /// the completion text first unless it already ends with it.
    pub fn encode_prompt_completion(
        &self,
        prompt: &str,
        completion: &str,
        add_eos: bool,
    ) -> Result<PromptCompletion> {
        let completion = if add_eos {
            let eos = self
                .eos_token
                .as_deref()
                .ok_or_else(|| ModelError::Tokenizer {
                    path: self.path.clone(),
                    msg: "adding EOS needs an eos_token, and tokenizer_config.json defines none"
                        .into(),
                })?;
            if completion.ends_with(eos) {
                std::borrow::Cow::Borrowed(completion)
            } else {
                std::borrow::Cow::Owned(format!("{completion}{eos}"))
            }
        } else {
            std::borrow::Cow::Borrowed(completion)
        };
        let prompt_ids = self.encode(prompt)?;
        let mut full = self.encode(&format!("{prompt}{completion}"))?;
        let prompt_len = common_prefix_len(&prompt_ids, &full);
        let completion_ids = full.split_off(prompt_len);
        Ok(PromptCompletion {
            prompt_ids: full,
            completion_ids,
        })
    }

    /// [`Tokenizer::encode_prompt_completion`] over many rows in parallel, in order.
    pub fn encode_prompt_completions(
        &self,
        rows: &[(&str, &str)],
        add_eos: bool,
    ) -> Vec<Result<PromptCompletion>> {
        rows.par_iter()
            .map(|(p, c)| self.encode_prompt_completion(p, c, add_eos))
            .collect()
    }
}

/// Number of leading tokens `a` and `b` share (TRL's `common_prefix_length`).
pub fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// An optional JSON file holding an object; `None` when the file does not exist.
fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    match serde_json::from_str(&text).map_err(|error| ModelError::Json {
        path: path.to_path_buf(),
        error,
    })? {
        Value::Object(map) => Ok(Some(map)),
        _ => Err(ModelError::config(path, "(root)", "expected a JSON object")),
    }
}

/// A special token as tokenizer configs write it: a string, or an AddedToken object
/// `{"content": "...", ...}`; null or absent means none.
fn token_string(value: Option<&Value>, path: &Path, key: &str) -> Result<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(ModelError::config(
                path,
                key,
                "token object has no string `content`",
            )),
        },
        Some(v) => Err(ModelError::config(
            path,
            key,
            format!("expected a token string or {{\"content\": ...}}, got {v}"),
        )),
    }
}

/// `chat_template`: a string, or the older list of `{"name", "template"}` (we take "default").
fn chat_template_field(value: Option<&Value>, path: &Path) -> Result<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => Ok(items.iter().find_map(|item| {
            (item.get("name")?.as_str()? == "default")
                .then(|| item.get("template")?.as_str().map(str::to_string))
                .flatten()
        })),
        Some(v) => Err(ModelError::config(
            path,
            "chat_template",
            format!("expected a string or a list of named templates, got {v}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{TempDir, fixture_tokenizer_dir, temp_dir};

    /// A copy of the repository's fixture tokenizer in a temp dir we can edit.
    fn tokenizer_copy(tag: &str) -> Option<TempDir> {
        let src = fixture_tokenizer_dir()?;
        let dir = temp_dir(&format!("tok-{tag}"));
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            if src.join(f).is_file() {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
        }
        Some(dir)
    }

    /// A tiny word-level tokenizer.json written by hand (no fixture needed).
    fn word_level_dir(tag: &str, post_processor: Value) -> TempDir {
        let dir = temp_dir(&format!("wl-{tag}"));
        let tok = serde_json::json!({
            "version": "1.0",
            "truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0},
            "padding": null,
            "added_tokens": [
                {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": post_processor,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"<s>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4, "c": 5}, "unk_token": "<unk>"}
        });
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        dir
    }

    #[test]
    fn word_level_without_config() {
        let dir = word_level_dir("plain", Value::Null);
        let t = Tokenizer::load(&dir).unwrap();
        // tokenizer.json's truncation (max_length 2) is switched off, as tok(text) does.
        assert_eq!(t.encode("a b c a").unwrap(), vec![3, 4, 5, 3]);
        assert_eq!(t.eos_token(), None);
        assert_eq!(t.encode("a </s>").unwrap(), vec![3, 1]);
    }

    #[test]
    fn add_bos_eos_flags_rebuild_post_processor() {
        let dir = word_level_dir("flags", Value::Null);
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>",
                "add_bos_token": true, "add_eos_token": true, "chat_template": "{{ x }}"}"#,
        )
        .unwrap();
        let t = Tokenizer::load(&dir).unwrap();
        assert_eq!(t.bos_token(), Some("<s>"));
        assert_eq!(t.eos_token_id(), Some(1));
        assert_eq!(t.chat_template(), Some("{{ x }}"));
        assert_eq!(t.encode("a b").unwrap(), vec![0, 3, 4, 1]);
        assert_eq!(t.encode_with("a b", false).unwrap(), vec![3, 4]);
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false}"#,
        )
        .unwrap();
        assert_eq!(Tokenizer::load(&dir).unwrap().encode("a").unwrap(), vec![3]);
    }

    #[test]
    fn trl_split_and_add_eos() {
        let dir = word_level_dir("trl", Value::Null);
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}"#,
        )
        .unwrap();
        let t = Tokenizer::load(&dir).unwrap();
        let pc = t.encode_prompt_completion("a b", " c a", false).unwrap();
        assert_eq!(pc.prompt_ids, vec![0, 3, 4]);
        assert_eq!(pc.completion_ids, vec![5, 3]);
        let pc = t.encode_prompt_completion("a b", " c", true).unwrap();
        assert_eq!(pc.completion_ids, vec![5, 1]);
        // Already ends with the eos string: not doubled.
        let pc = t.encode_prompt_completion("a b", " c </s>", true).unwrap();
        assert_eq!(pc.completion_ids, vec![5, 1]);
        let all = t.encode_prompt_completions(&[("a", " b"), ("b", " c")], false);
        assert_eq!(all[1].as_ref().unwrap().completion_ids, vec![5]);
    }

    #[test]
    fn prompt_not_a_prefix_splits_at_divergence() {
        // A byte-level BPE merges across the boundary; TRL then splits where ids diverge.
        assert_eq!(common_prefix_len(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix_len(&[], &[1]), 0);
        let Some(dir) = tokenizer_copy("bpe") else {
            return;
        };
        let t = Tokenizer::load(&dir).unwrap();
        let prompt = "###답변:\n보";
        let completion = "험 계약";
        let pc = t
            .encode_prompt_completion(prompt, completion, false)
            .unwrap();
        let full = t.encode(&format!("{prompt}{completion}")).unwrap();
        let alone = t.encode(prompt).unwrap();
        assert_eq!(
            [pc.prompt_ids.clone(), pc.completion_ids.clone()].concat(),
            full
        );
        assert_eq!(pc.prompt_ids.len(), common_prefix_len(&alone, &full));
    }

    #[test]
    fn fixture_tokenizer_adds_bos() {
        let Some(dir) = tokenizer_copy("fixture") else {
            return;
        };
        let t = Tokenizer::load(&dir).unwrap();
        let ids = t.encode("hello").unwrap();
        assert_eq!(ids[0], t.token_to_id(t.bos_token().unwrap()).unwrap());
        assert_eq!(t.decode(&ids, true).unwrap(), "hello");
    }

    #[test]
    fn bad_files_are_named() {
        let dir = temp_dir("tok-missing");
        let e = Tokenizer::load(&dir).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        std::fs::write(dir.join("tokenizer.json"), "{broken").unwrap();
        let e = Tokenizer::load(&dir).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        let dir = word_level_dir("badcfg", Value::Null);
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": 5}"#).unwrap();
        let e = Tokenizer::load(&dir).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("eos_token"),
            "{e}"
        );
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": "<nope>", "add_bos_token": true}"#,
        )
        .unwrap();
        let e = Tokenizer::load(&dir).unwrap_err().to_string();
        assert!(e.contains("<nope>") && e.contains("vocabulary"), "{e}");
        let e = Tokenizer::load(&word_level_dir("noeos", Value::Null))
            .unwrap()
            .encode_prompt_completion("a", "b", true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("eos_token"), "{e}");
    }
}
