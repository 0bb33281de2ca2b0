//! Incremental detokenization: token ids in one at a time, newly completed text out.
//!
//! Decoding each token alone is wrong in two ways: a byte-level BPE token can hold part of a
//! multi-byte UTF-8 character (a Korean syllable is 3 bytes, an emoji 4, and either may be
//! split over tokens), and some decoders render a token differently at the start of a text
//! (SentencePiece's leading space). So, as vLLM and `tokenizers`' `DecodeStream` do, we keep
//! two offsets into the ids:
//!
//! - `prefix_offset`: start of a short window of already-emitted tokens kept as context;
//! - `read_offset`: end of what has been emitted.
//!
//! For each new id we decode `ids[prefix..read]` (text already emitted) and `ids[prefix..]`;
//! when the second is longer and does not end in U+FFFD (an incomplete character), its extra
//! characters are emitted and both offsets move forward. Otherwise nothing is emitted and the
//! bytes wait for the next token, so a character is never split or garbled.
//!
//! The window starts on the prompt's tail (vLLM: the shortest suffix of 4 to 23 tokens that
//! decodes without U+FFFD, else the whole prompt), fed through like generated tokens, so the
//! first generated token is decoded in context, and a character that the prompt starts and
//! the output completes comes out whole. A trailing incomplete character when generation
//! ends is never emitted, as in vLLM.

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::error::{Result, SampleError};

const REPLACEMENT: char = '\u{FFFD}';
/// Prompt context lengths tried, as vLLM's FastIncrementalDetokenizer does.
const MIN_CONTEXT: usize = 4;
const MAX_CONTEXT: usize = 23;

pub struct IncrementalDetokenizer {
    tokenizer: Arc<Tokenizer>,
    skip_special_tokens: bool,
    /// Context and generated ids; everything before `prefix_offset` is dropped as we go.
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Characters in the decode of `ids[prefix_offset..read_offset]`, once computed.
    prefix_chars: Option<usize>,
}

impl IncrementalDetokenizer {
    /// A detokenizer for the text generated after `prompt_ids`.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        prompt_ids: &[u32],
        skip_special_tokens: bool,
    ) -> Result<Self> {
        let mut this = Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            prefix_chars: None,
        };
        // vLLM: the shortest suffix of 4..=23 tokens that decodes cleanly, else the whole
        // prompt; fed through like generated tokens, so the offsets end at the last complete
        // character even when the prompt ends inside one.
        let mut context = prompt_ids;
        if prompt_ids.len() > MIN_CONTEXT {
            for len in MIN_CONTEXT..=prompt_ids.len().min(MAX_CONTEXT) {
                let suffix = &prompt_ids[prompt_ids.len() - len..];
                if !this.decode(suffix)?.contains(REPLACEMENT) {
                    context = suffix;
                    break;
                }
            }
        }
        for &id in context {
            this.push(id)?;
        }
        Ok(this)
    }

    /// Feeds one generated id; returns the text it completes (often empty while a multi-byte
    /// character is still incomplete, or for a skipped special token).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix_chars = match self.prefix_chars {
            Some(n) => n,
            None => {
                let n = self
                    .decode(&self.ids[self.prefix_offset..self.read_offset])?
                    .chars()
                    .count();
                self.prefix_chars = Some(n);
                n
            }
        };
        let text = self.decode(&self.ids[self.prefix_offset..])?;
        if text.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        let Some((start, _)) = text.char_indices().nth(prefix_chars) else {
            // Not longer than what was emitted (a skipped special token, say).
            return Ok(String::new());
        };
        let new_text = text[start..].to_string();
        // The emitted tokens become the context; older ids are no longer needed.
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        self.prefix_chars = None;
        Ok(new_text)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| SampleError::Decode {
                ids: ids.to_vec(),
                msg: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::fixture_tokenizer;

    fn stream(tok: &Arc<Tokenizer>, prompt: &[u32], ids: &[u32], skip: bool) -> Vec<String> {
        let mut d = IncrementalDetokenizer::new(tok.clone(), prompt, skip).unwrap();
        ids.iter().map(|&id| d.push(id).unwrap()).collect()
    }

    #[test]
    fn korean_and_emoji_stream_equals_full_decode_at_every_prefix() {
        let tok = fixture_tokenizer();
        let text = "보험 계약 해지 환급금은 얼마? 🙂👍🏽 좋아요! 鬱 naïve — done.";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        // The fixture's small vocabulary must split some characters over tokens, or this
        // test would not test holding bytes back.
        let split =
            (1..ids.len()).any(|k| tok.decode(&ids[..k], false).unwrap().ends_with(REPLACEMENT));
        assert!(
            split,
            "no multi-byte character is split by the fixture tokenizer"
        );

        let pieces = stream(&tok, &[], &ids, false);
        let mut acc = String::new();
        for (k, piece) in pieces.iter().enumerate() {
            assert!(!piece.contains(REPLACEMENT), "piece {k} {piece:?}");
            acc.push_str(piece);
            let full = tok.decode(&ids[..=k], false).unwrap();
            if full.ends_with(REPLACEMENT) {
                // Held back: what was emitted is the full decode minus the broken tail.
                let clean = full.trim_end_matches(REPLACEMENT);
                assert!(clean.starts_with(&acc) && acc.len() <= clean.len(), "{k}");
            } else {
                assert_eq!(acc, full, "prefix of {} tokens", k + 1);
            }
        }
        assert_eq!(acc, text);
    }

    #[test]
    fn prompt_context_does_not_leak_into_the_output() {
        let tok = fixture_tokenizer();
        let prompt = tok
            .encode(
                "###지시사항:\n한국의 수도는 어디인가요?\n\n###답변:\n",
                true,
            )
            .unwrap()
            .get_ids()
            .to_vec();
        let answer = "서울입니다. 🏙️";
        let ids = tok.encode(answer, false).unwrap().get_ids().to_vec();
        assert_eq!(stream(&tok, &prompt, &ids, true).concat(), answer);
    }

    #[test]
    fn character_started_in_the_prompt_is_completed_by_the_output() {
        let tok = fixture_tokenizer();
        let ids = tok.encode("abc 🙂 def", false).unwrap().get_ids().to_vec();
        // Cut the prompt inside the emoji's bytes.
        let cut = (1..ids.len())
            .find(|&k| tok.decode(&ids[..k], false).unwrap().ends_with(REPLACEMENT))
            .unwrap();
        let mut d = IncrementalDetokenizer::new(tok.clone(), &ids[..cut], false).unwrap();
        let out: String = ids[cut..].iter().map(|&id| d.push(id).unwrap()).collect();
        // The emoji's first bytes came with the prompt: the output's first text is the whole
        // emoji, as the full decode has it (vLLM's behaviour too).
        assert_eq!(out, "🙂 def");
    }

    #[test]
    fn special_tokens_are_skipped_or_kept_as_asked() {
        let tok = fixture_tokenizer();
        let eos = tok.token_to_id("<eos>").unwrap();
        let mut ids = tok.encode("안녕하세요", false).unwrap().get_ids().to_vec();
        ids.push(eos);
        ids.extend(tok.encode(" 끝", false).unwrap().get_ids());
        assert_eq!(stream(&tok, &[], &ids, true).concat(), "안녕하세요 끝");
        assert_eq!(
            stream(&tok, &[], &ids, false).concat(),
            "안녕하세요<eos> 끝"
        );
    }
}
