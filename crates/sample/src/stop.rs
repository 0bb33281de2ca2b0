//! When a sequence stops, and what its text keeps.
//!
//! Two kinds of stop, as in vLLM V1:
//! - **Stop tokens** ([`StopTokens`]), checked on each sampled id once min_tokens are out:
//!   the tokenizer's EOS (stop_reason null), then generation_config.json's EOS ids and
//!   `stop_token_ids` (stop_reason = the id); EOS and generation_config's ids only unless
//!   ignore_eos. A stop token's text is left out of the output unless
//!   include_stop_str_in_output.
//! - **Stop strings** ([`StopStrings`]), matched on the detokenized text, so they are found
//!   across token boundaries and inside multi-byte text. vLLM's rule: each new piece of text
//!   is searched from (stop length − 1) characters before it, stop strings in the order
//!   given, the first one found wins; the text is cut before it (after it with
//!   include_stop_str_in_output). stop_reason = the string.
//!
//! While streaming, text that could still become the start of a stop string is held back
//! ([`StopStrings::held_back`]), so a partial stop string is never shown.

use serde::Serialize;

use crate::params::ValidParams;

/// Why a sequence finished (the output's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// max_tokens, or the model's context, reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What stopped a sequence (the output's `stop_reason`): a stop token id or a stop string.
/// EOS and length stops have none (null), as in vLLM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum StopReason {
    Token(u32),
    Text(String),
}

/// The result of checking one sampled id against the stop tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStop {
    /// The tokenizer's EOS: stop_reason stays null.
    Eos,
    /// generation_config EOS id or a stop_token_id: stop_reason is the id.
    Id(u32),
}

/// The token ids that end a sequence, and the ones min_tokens masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopTokens {
    /// The tokenizer's EOS, unless ignore_eos.
    eos: Option<u32>,
    /// stop_token_ids, plus generation_config's EOS ids (other than `eos`) unless ignore_eos.
    ids: Vec<u32>,
    /// Every stop token whatever ignore_eos says: what min_tokens masks (vLLM's
    /// `all_stop_token_ids`).
    all: Vec<u32>,
}

impl StopTokens {
    /// `tokenizer_eos` is the tokenizer's EOS id; `generation_eos` are generation_config.json's
    /// `eos_token_id` (an int or a list there).
    pub fn new(params: &ValidParams, tokenizer_eos: Option<u32>, generation_eos: &[u32]) -> Self {
        let mut all: Vec<u32> = Vec::new();
        let add = |v: &mut Vec<u32>, id: u32| {
            if !v.contains(&id) {
                v.push(id);
            }
        };
        for &id in params
            .stop_token_ids
            .iter()
            .chain(tokenizer_eos.iter())
            .chain(generation_eos)
        {
            add(&mut all, id);
        }
        let mut ids = Vec::new();
        for &id in &params.stop_token_ids {
            add(&mut ids, id);
        }
        if !params.ignore_eos {
            for &id in generation_eos {
                if Some(id) != tokenizer_eos {
                    add(&mut ids, id);
                }
            }
        }
        Self {
            eos: tokenizer_eos.filter(|_| !params.ignore_eos),
            ids,
            all,
        }
    }

    /// Whether `id` stops the sequence (call only once min_tokens are generated).
    pub fn check(&self, id: u32) -> Option<TokenStop> {
        if self.eos == Some(id) {
            Some(TokenStop::Eos)
        } else if self.ids.contains(&id) {
            Some(TokenStop::Id(id))
        } else {
            None
        }
    }

    /// The ids min_tokens masks while the output is shorter than min_tokens.
    pub fn min_tokens_mask(&self) -> &[u32] {
        &self.all
    }
}

/// The stop strings of a request and how their match cuts the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StopStrings {
    stops: Vec<String>,
    include_in_output: bool,
}

/// A stop string found in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StopMatch {
    /// Index of the stop string in the request's list.
    pub(crate) index: usize,
    /// Byte length the text keeps (before the stop string, or after it when it is kept).
    pub(crate) truncate_to: usize,
}

impl StopStrings {
    pub(crate) fn new(params: &ValidParams) -> Self {
        Self {
            stops: params.stop.clone(),
            include_in_output: params.include_stop_str_in_output,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    pub(crate) fn get(&self, index: usize) -> &str {
        &self.stops[index]
    }

    /// Looks for a stop string that ends in the new text `text[new_from..]` (vLLM's
    /// `check_stop_strings`): each stop string in order is searched from (its length − 1)
    /// characters before the new text; the first found wins.
    pub(crate) fn find(&self, text: &str, new_from: usize) -> Option<StopMatch> {
        if new_from >= text.len() {
            return None;
        }
        for (index, stop) in self.stops.iter().enumerate() {
            let back = stop.chars().count() - 1;
            let start = text[..new_from]
                .char_indices()
                .rev()
                .take(back)
                .last()
                .map_or(new_from, |(i, _)| i);
            if let Some(pos) = text[start..].find(stop.as_str()) {
                let at = start + pos;
                let truncate_to = if self.include_in_output {
                    at + stop.len()
                } else {
                    at
                };
                return Some(StopMatch { index, truncate_to });
            }
        }
        None
    }

    /// Bytes at the end of `text` to hold back from a stream: the longest suffix that is a
    /// proper prefix of a stop string, which later text could complete. Nothing is held back
    /// when stop strings are kept in the output (as vLLM).
    pub(crate) fn held_back(&self, text: &str) -> usize {
        if self.include_in_output {
            return 0;
        }
        let mut longest = 0;
        for stop in &self.stops {
            for (cut, _) in stop.char_indices().skip(1) {
                if cut > longest && text.ends_with(&stop[..cut]) {
                    longest = cut;
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::SamplingParams;

    fn valid(p: SamplingParams) -> ValidParams {
        p.validate().unwrap()
    }

    #[test]
    fn stop_token_sets_follow_vllm() {
        let p = valid(SamplingParams {
            stop_token_ids: vec![9, 7],
            ..Default::default()
        });
        let s = StopTokens::new(&p, Some(1), &[1, 5]);
        assert_eq!(s.check(1), Some(TokenStop::Eos));
        assert_eq!(s.check(5), Some(TokenStop::Id(5)));
        assert_eq!(s.check(7), Some(TokenStop::Id(7)));
        assert_eq!(s.check(2), None);
        assert_eq!(s.min_tokens_mask(), &[9, 7, 1, 5]);

        // ignore_eos: EOS and generation_config ids go on, stop_token_ids still stop, and
        // min_tokens still masks them all.
        let p = valid(SamplingParams {
            stop_token_ids: vec![9],
            ignore_eos: true,
            ..Default::default()
        });
        let s = StopTokens::new(&p, Some(1), &[1, 5]);
        assert_eq!((s.check(1), s.check(5)), (None, None));
        assert_eq!(s.check(9), Some(TokenStop::Id(9)));
        assert_eq!(s.min_tokens_mask(), &[9, 1, 5]);
    }

    fn strings(stops: &[&str], include: bool) -> StopStrings {
        StopStrings::new(&valid(SamplingParams {
            stop: stops.iter().map(|s| s.to_string()).collect(),
            include_stop_str_in_output: include,
            ..Default::default()
        }))
    }

    #[test]
    fn find_reaches_back_into_earlier_text_by_the_stop_length() {
        let s = strings(&["###"], false);
        // "##" came earlier, "#" is new: found, cut before it.
        assert_eq!(s.find("답변 ##", "답변 ##".len()), None);
        let text = "답변 ###끝";
        let m = s.find(text, "답변 ##".len()).unwrap();
        assert_eq!(&text[..m.truncate_to], "답변 ");
        // A match entirely inside old text is not looked for again.
        assert_eq!(s.find("### 답", "### ".len()), None);
        let s = strings(&["###"], true);
        let m = s.find(text, "답변 ##".len()).unwrap();
        assert_eq!(&text[..m.truncate_to], "답변 ###");
    }

    #[test]
    fn multi_byte_stop_strings_match_on_characters() {
        let s = strings(&["니다."], false);
        let text = "서울입니다. 그리고";
        let new_from = "서울입니".len();
        let m = s.find(text, new_from).unwrap();
        assert_eq!(&text[..m.truncate_to], "서울입");
    }

    #[test]
    fn first_stop_string_in_list_order_wins() {
        let s = strings(&["cd", "ab"], false);
        let m = s.find("xxabcd", 2).unwrap();
        assert_eq!((m.index, m.truncate_to), (0, 4));
    }

    #[test]
    fn held_back_is_the_longest_suffix_that_starts_a_stop() {
        let s = strings(&["###답변", "<|im_end|>"], false);
        assert_eq!(s.held_back("hello ##"), 2);
        assert_eq!(s.held_back("hello ###답"), "###답".len());
        assert_eq!(s.held_back("hello <|im"), 4);
        assert_eq!(s.held_back("hello"), 0);
        // A complete stop string is not a proper prefix: find() deals with it.
        assert_eq!(strings(&["ab"], false).held_back("xab"), 0);
        assert_eq!(strings(&["ab"], true).held_back("xa"), 0);
    }
}
