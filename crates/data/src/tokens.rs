//! Token counts under the model's tokenizer, for the token-budget filter.
//!
//! The budget is what TRL would feed the model for the longer side of a pair:
//! `tokens(prompt) + tokens(response) + 1` (the EOS TRL appends), where the prompt is
//! encoded with the tokenizer's special tokens (its BOS, if its post-processor adds one)
//! and the response without. A prompt whose text already begins with the BOS text (a chat
//! template that prints `bos_token`) is not charged for a second BOS.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::error::{DataError, Result};

/// A loaded `tokenizer.json`.
pub struct TokenCounter {
    path: PathBuf,
    tokenizer: Tokenizer,
    /// Ids the tokenizer adds around a single sequence at its start (usually `[bos]` or `[]`).
    special_prefix: Vec<u32>,
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCounter")
            .field("path", &self.path)
            .finish()
    }
}

impl TokenCounter {
    /// `path` is a model folder holding `tokenizer.json`, or the file itself.
    pub fn open(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        if !file.is_file() {
            return Err(DataError::Tokenizer {
                path: file,
                message: "not found".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&file).map_err(|e| DataError::Tokenizer {
            path: file.clone(),
            message: e.to_string(),
        })?;
        let mut counter = TokenCounter {
            path: file,
            tokenizer,
            special_prefix: Vec::new(),
        };
        counter.special_prefix = counter.encode("", true)?;
        Ok(counter)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }

    /// Prompt tokens including the tokenizer's own special tokens, without a doubled BOS.
    pub fn prompt_tokens(&self, prompt: &str) -> Result<usize> {
        let ids = self.encode(prompt, true)?;
        let p = &self.special_prefix;
        let doubled = !p.is_empty()
            && ids.len() >= 2 * p.len()
            && ids[..p.len()] == p[..]
            && ids[p.len()..2 * p.len()] == p[..];
        Ok(if doubled {
            ids.len() - p.len()
        } else {
            ids.len()
        })
    }

    /// Response tokens, without special tokens.
    pub fn response_tokens(&self, response: &str) -> Result<usize> {
        Ok(self.encode(response, false)?.len())
    }

    /// `prompt + max(chosen, rejected) + EOS` for many pairs, in parallel.
    pub fn pair_lengths(&self, pairs: &[(&str, &str, &str)]) -> Result<Vec<PairLength>> {
        pairs
            .par_iter()
            .map(|(prompt, chosen, rejected)| {
                Ok(PairLength {
                    prompt: self.prompt_tokens(prompt)?,
                    chosen: self.response_tokens(chosen)?,
                    rejected: self.response_tokens(rejected)?,
                })
            })
            .collect()
    }
}

/// Token counts of one pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairLength {
    pub prompt: usize,
    pub chosen: usize,
    pub rejected: usize,
}

impl PairLength {
    /// The longer side's full length: prompt + response + 1 EOS.
    pub fn total(&self) -> usize {
        self.prompt + self.chosen.max(self.rejected) + 1
    }
}

/// A tiny word-level tokenizer (one token per word or punctuation run, BOS added) for tests
/// of this crate and of the CLI.
#[doc(hidden)]
pub fn word_level_tokenizer_json(words: &[&str]) -> String {
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["<s>", "</s>", "<unk>"]
        .iter()
        .chain(words.iter())
        .enumerate()
    {
        vocab.insert(w.to_string(), serde_json::Value::from(i));
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<s>"), special(1, "</s>"), special(2, "<unk>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> (tempfile::TempDir, TokenCounter) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer.json"),
            word_level_tokenizer_json(&["보험", "은"]),
        )
        .unwrap();
        let c = TokenCounter::open(dir.path()).unwrap();
        (dir, c)
    }

    #[test]
    fn counts_words_plus_bos_for_prompts_only() {
        let (_dir, c) = counter();
        // Whitespace pre-tokenizer: words and punctuation runs; unknown words are <unk>.
        assert_eq!(c.prompt_tokens("보험 은 뭐 ?").unwrap(), 1 + 4);
        assert_eq!(c.response_tokens("보험 은 뭐 ?").unwrap(), 4);
        // A prompt that already starts with BOS text is not charged twice.
        assert_eq!(c.prompt_tokens("<s> 보험").unwrap(), 2);
        let lens = c.pair_lengths(&[("a b", "c", "d e f")]).unwrap();
        assert_eq!(
            lens[0],
            PairLength {
                prompt: 3,
                chosen: 1,
                rejected: 3
            }
        );
        assert_eq!(lens[0].total(), 3 + 3 + 1);
    }

    #[test]
    fn missing_or_broken_tokenizer_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = TokenCounter::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json: not found"), "{err}");
        std::fs::write(dir.path().join("tokenizer.json"), "{").unwrap();
        assert!(TokenCounter::open(dir.path()).is_err());
    }
}
