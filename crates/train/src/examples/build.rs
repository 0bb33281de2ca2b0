//! Preference rows → [`DpoExample`]s, as TRL 1.16's `DPOTrainer._prepare_dataset` builds them,
//! plus our `max_prompt_length` and DPO-time prompt wrapper.
//!
//! Per row, in order:
//! 1. the wrapper, if any, turns the stored prompt into the training prompt (the reference
//!    workflow applied `###질문:\n{question}\n\n###답변:\n` to its dataset before TRL saw it);
//! 2. TRL's `add_eos`: the eos_token *string* is appended to chosen and to rejected unless the
//!    text already ends with it;
//! 3. TRL's `tokenize_fn`: the prompt and prompt+completion are tokenized (special tokens
//!    added); the prompt is the common prefix, taking the *shorter* of the two prefixes (with
//!    chosen and with rejected), and each completion is the rest of its sequence — so a
//!    token that merges across the boundary moves into both completions;
//! 4. ours: `max_prompt_length` keeps the prompt's last tokens;
//! 5. TRL's filter: under keep_start, a row whose prompt alone has `max_length` tokens or
//!    more is dropped (the collator would keep no completion token). keep_end drops nothing.
//!
//! Why `max_prompt_length` keeps the prompt's end: see [`ExampleConfig::max_prompt_length`].

use crate::error::{Result, TrainError};
use model::Tokenizer;

use super::rows::PreferenceRow;

/// The placeholder a wrapper template holds exactly once.
const QUESTION: &str = "{question}";

/// How TRL's collator cuts a prompt+completion longer than `max_length`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Truncation {
    /// Keep the first `max_length` tokens (TRL's default and only non-deprecated mode).
    #[default]
    KeepStart,
    /// Keep the last `max_length` tokens (deprecated in TRL 1.16, still honoured).
    KeepEnd,
}

impl Truncation {
    /// TRL's names: `keep_start`, `keep_end`.
    pub fn from_name(name: &str) -> Option<Truncation> {
        match name {
            "keep_start" => Some(Truncation::KeepStart),
            "keep_end" => Some(Truncation::KeepEnd),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Truncation::KeepStart => "keep_start",
            Truncation::KeepEnd => "keep_end",
        }
    }
}

/// A DPO-time prompt wrapper: a template with one `{question}` where the stored prompt goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptWrapper {
    before: String,
    after: String,
}

impl PromptWrapper {
    /// E.g. the reference workflow's `"###질문:\n{question}\n\n###답변:\n"`.
    pub fn new(template: &str) -> Result<PromptWrapper> {
        let mut parts = template.split(QUESTION);
        match (parts.next(), parts.next(), parts.next()) {
            (Some(before), Some(after), None) => Ok(PromptWrapper {
                before: before.to_string(),
                after: after.to_string(),
            }),
            _ => Err(TrainError::Arg {
                what: "prompt wrapper",
                msg: format!(
                    "the template must hold {QUESTION} exactly once, got {} times in {template:?}",
                    template.matches(QUESTION).count()
                ),
            }),
        }
    }

    pub fn apply(&self, prompt: &str) -> String {
        format!("{}{prompt}{}", self.before, self.after)
    }
}

/// What shapes the examples: TRL's `max_length` and `truncation_mode`, and our
/// `max_prompt_length` and prompt wrapper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExampleConfig {
    /// Longest prompt+completion sequence, in tokens; `None`: no limit.
    pub max_length: Option<usize>,
    pub truncation: Truncation,
    /// Longest prompt, in tokens (its end is kept); `None`: no limit.
    ///
    /// `max_prompt_length` is gone from TRL 1.x (already from 0.29). The TRL the reference
    /// workflow used had it, in one of two forms (read from the 0.11.4 and 0.12.0 wheels):
    /// - TRL ≤ 0.11 (`_truncate_tokens`): only when prompt + longer completion exceeded
    ///   `max_length`, the prompt was cut to `max_prompt_length` tokens, keeping its end under
    ///   the then-default `truncation_mode="keep_end"` (its start under keep_start); if still too
    ///   long, both completions were cut to `max_length - max_prompt_length` tokens — with the
    ///   reference workflow's `max_length == max_prompt_length` that empties every over-long
    ///   completion.
    /// - TRL 0.12 on (`tokenize_row`): every prompt cut to its last `max_prompt_length` tokens,
    ///   unconditionally; then the concatenated sequence cut to `max_length`.
    ///
    /// We do as 0.12+ did and keep the prompt's end, unconditionally: the text nearest the
    /// completion is what the response depends on most, and the cut does not depend on the
    /// completions. (A `<bos>` at the prompt's start is cut with the rest, as there.) The cut runs
    /// before TRL's drop rule, so with `max_prompt_length < max_length` no row is dropped.
    pub max_prompt_length: Option<usize>,
    /// Applied to every prompt before tokenization; `None` trains on the prompt as stored.
    pub wrapper: Option<PromptWrapper>,
}

impl Default for ExampleConfig {
    /// DPOConfig's defaults (`max_length` 1024, keep_start), no prompt limit, no wrapper.
    fn default() -> ExampleConfig {
        ExampleConfig {
            max_length: Some(1024),
            truncation: Truncation::KeepStart,
            max_prompt_length: None,
            wrapper: None,
        }
    }
}

impl ExampleConfig {
    /// Zero lengths are refused (Python's slices would read `[-0:]` as "everything").
    pub fn validate(&self) -> Result<()> {
        for (what, value) in [
            ("max_length", self.max_length),
            ("max_prompt_length", self.max_prompt_length),
        ] {
            if value == Some(0) {
                return Err(TrainError::Arg {
                    what,
                    msg: "must be at least 1 (leave it unset for no limit)".into(),
                });
            }
        }
        Ok(())
    }
}

/// One row as token ids: TRL's `prompt_ids`, `chosen_ids`, `rejected_ids`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DpoExample {
    /// Index of the row in the slice given to [`build_examples`].
    pub row: usize,
    pub prompt_ids: Vec<u32>,
    /// The chosen completion, EOS included (unless it was in the text already).
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
}

/// The examples of a dataset and what happened to the rest.
#[derive(Clone, Debug, PartialEq)]
pub struct ExampleSet {
    pub examples: Vec<DpoExample>,
    /// Rows dropped because their prompt alone reaches `max_length` (keep_start only).
    pub dropped: Vec<usize>,
    /// Rows whose prompt `max_prompt_length` shortened (kept).
    pub prompts_cut: usize,
    /// The `max_length` the drop rule used (for the report).
    pub max_length: Option<usize>,
}

impl std::fmt::Display for ExampleSet {
    /// One line for the CLI: kept, dropped (the first few, numbered from 1 in the order the
    /// rows were given), prompts cut.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = self.examples.len() + self.dropped.len();
        write!(f, "{} of {rows} rows kept", self.examples.len())?;
        if let (Some(max), false) = (self.max_length, self.dropped.is_empty()) {
            const SHOWN: usize = 5;
            let first: Vec<String> = self
                .dropped
                .iter()
                .take(SHOWN)
                .map(|r| (r + 1).to_string())
                .collect();
            let more = if self.dropped.len() > SHOWN {
                ", …"
            } else {
                ""
            };
            write!(
                f,
                "; dropped {} whose prompt reaches max_length ({max} tokens): row {}{more}",
                self.dropped.len(),
                first.join(", ")
            )?;
        }
        if self.prompts_cut > 0 {
            write!(f, "; {} prompts cut to max_prompt_length", self.prompts_cut)?;
        }
        Ok(())
    }
}

/// Tokenizes every row (in parallel) and applies the drop rule; see the module doc.
pub fn build_examples(
    tokenizer: &Tokenizer,
    rows: &[PreferenceRow],
    config: &ExampleConfig,
) -> Result<ExampleSet> {
    config.validate()?;
    if tokenizer.eos_token().is_none() {
        return Err(TrainError::Arg {
            what: "tokenizer",
            msg: format!(
                "{} defines no eos_token; TRL appends it to every chosen and rejected text",
                tokenizer.path().display()
            ),
        });
    }
    let prompts: Vec<std::borrow::Cow<'_, str>> = rows
        .iter()
        .map(|r| match &config.wrapper {
            Some(w) => w.apply(&r.prompt).into(),
            None => r.prompt.as_str().into(),
        })
        .collect();
    // All chosen pairs, then all rejected pairs: one parallel pass over 2N texts.
    let pairs: Vec<(&str, &str)> = [false, true]
        .iter()
        .flat_map(|&rejected| {
            rows.iter().zip(&prompts).map(move |(r, p)| {
                let completion = if rejected { &r.rejected } else { &r.chosen };
                (p.as_ref(), completion.as_str())
            })
        })
        .collect();
    let mut split = tokenizer
        .encode_prompt_completions(&pairs, true)
        .into_iter();
    let chosen: Vec<_> = split.by_ref().take(rows.len()).collect();
    let rejected: Vec<_> = split.collect();

    let mut set = ExampleSet {
        examples: Vec::with_capacity(rows.len()),
        dropped: Vec::new(),
        prompts_cut: 0,
        max_length: config.max_length,
    };
    for (row, (c, r)) in chosen.into_iter().zip(rejected).enumerate() {
        let (c, r) = (c?, r?);
        let (mut prompt_ids, chosen_ids, rejected_ids) = join_split(c, r);
        if let Some(max) = config.max_prompt_length
            && prompt_ids.len() > max
        {
            prompt_ids.drain(..prompt_ids.len() - max);
            set.prompts_cut += 1;
        }
        let reaches_max = config.max_length.is_some_and(|max| prompt_ids.len() >= max);
        if reaches_max && config.truncation == Truncation::KeepStart {
            set.dropped.push(row);
            continue;
        }
        set.examples.push(DpoExample {
            row,
            prompt_ids,
            chosen_ids,
            rejected_ids,
        });
    }
    Ok(set)
}

/// TRL's `prompt_len = min(common prefix with chosen, common prefix with rejected)`: both
/// splits' prompts are prefixes of the same tokenized prompt, so the shorter one is the
/// prompt and what the longer one had beyond it moves to the front of its completion.
fn join_split(
    chosen: model::PromptCompletion,
    rejected: model::PromptCompletion,
) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let len = chosen.prompt_ids.len().min(rejected.prompt_ids.len());
    let completion = |pc: model::PromptCompletion| -> (Vec<u32>, Vec<u32>) {
        let mut prompt = pc.prompt_ids;
        let mut ids = prompt.split_off(len);
        ids.extend(pc.completion_ids);
        (prompt, ids)
    };
    let (prompt_ids, chosen_ids) = completion(chosen);
    let (_, rejected_ids) = completion(rejected);
    (prompt_ids, chosen_ids, rejected_ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        Tokenizer::load(&testkit::fixture("tokenizer")).unwrap()
    }

    fn row(p: &str, c: &str, r: &str) -> PreferenceRow {
        PreferenceRow {
            prompt: p.into(),
            chosen: c.into(),
            rejected: r.into(),
        }
    }

    #[test]
    fn wrapper_needs_one_placeholder() {
        let w = PromptWrapper::new("###질문:\n{question}\n\n###답변:\n").unwrap();
        assert_eq!(w.apply("Q"), "###질문:\nQ\n\n###답변:\n");
        for bad in ["no placeholder", "{question} and {question}"] {
            let e = PromptWrapper::new(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("prompt wrapper: the template must hold {question} exactly once"),
                "{e}"
            );
        }
    }

    #[test]
    fn zero_lengths_are_refused() {
        let tok = tokenizer();
        for (cfg, what) in [
            (
                ExampleConfig {
                    max_length: Some(0),
                    ..ExampleConfig::default()
                },
                "max_length",
            ),
            (
                ExampleConfig {
                    max_prompt_length: Some(0),
                    ..ExampleConfig::default()
                },
                "max_prompt_length",
            ),
        ] {
            let e = build_examples(&tok, &[row("a", "b", "c")], &cfg).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with(&format!("{what}: must be at least 1")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_tokenizer_without_eos_is_refused() {
        let dir = testkit::TempDir::new("train-noeos");
        let src = testkit::fixture("tokenizer/tokenizer.json");
        std::fs::copy(src, dir.join("tokenizer.json")).unwrap();
        let tok = Tokenizer::load(&dir).unwrap();
        let e = build_examples(&tok, &[row("a", "b", "c")], &ExampleConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("tokenizer: ") && e.contains("defines no eos_token"),
            "{e}"
        );
    }

    #[test]
    fn eos_is_added_once_and_split_matches_separate_tokenization() {
        let tok = tokenizer();
        let eos = tok.eos_token_id().unwrap();
        let set = build_examples(
            &tok,
            &[row("Is it?", " Yes.<eos>", " No.")],
            &ExampleConfig::default(),
        )
        .unwrap();
        let ex = &set.examples[0];
        // Independent reference: the prompt alone, and the completion texts with EOS.
        assert_eq!(ex.prompt_ids, tok.encode("Is it?").unwrap());
        let full_c = tok.encode("Is it? Yes.<eos>").unwrap();
        let full_r = tok.encode("Is it? No.<eos>").unwrap();
        assert_eq!(ex.chosen_ids, full_c[ex.prompt_ids.len()..]);
        assert_eq!(ex.rejected_ids, full_r[ex.prompt_ids.len()..]);
        assert_eq!(ex.chosen_ids.iter().filter(|&&t| t == eos).count(), 1);
        assert_eq!(ex.rejected_ids.last(), Some(&eos));
    }

    #[test]
    fn boundary_merge_takes_the_shorter_prefix() {
        // ' ' + 'yes' merges across the boundary; '\nno' does not. Either side may be the
        // one whose prefix is shorter.
        let tok = tokenizer();
        let p = "Answer yes or no: ";
        let prompt = tok.encode(p).unwrap();
        for (c, r) in [("yes", "\nno"), ("\nno", "yes")] {
            let ex = &build_examples(&tok, &[row(p, c, r)], &ExampleConfig::default())
                .unwrap()
                .examples[0];
            let full_c = tok.encode(&format!("{p}{c}<eos>")).unwrap();
            let full_r = tok.encode(&format!("{p}{r}<eos>")).unwrap();
            let (kc, kr) = (
                model::common_prefix_len(&prompt, &full_c),
                model::common_prefix_len(&prompt, &full_r),
            );
            assert_ne!(
                kc, kr,
                "the fixture tokenizer should merge on one side only"
            );
            let k = kc.min(kr);
            assert_eq!(ex.prompt_ids, prompt[..k]);
            assert_eq!(ex.chosen_ids, full_c[k..]);
            assert_eq!(ex.rejected_ids, full_r[k..]);
        }
    }

    #[test]
    fn max_prompt_length_keeps_the_end_and_runs_before_the_drop_rule() {
        let tok = tokenizer();
        let rows = [
            row(
                "one two three four five six seven eight nine ten",
                " a",
                " b",
            ),
            row("short", " a", " b"),
        ];
        let full = build_examples(&tok, &rows, &ExampleConfig::default()).unwrap();
        let p0 = &full.examples[0].prompt_ids;
        assert!(p0.len() > 4);
        let cfg = ExampleConfig {
            max_length: Some(5),
            max_prompt_length: Some(4),
            ..ExampleConfig::default()
        };
        let cut = build_examples(&tok, &rows, &cfg).unwrap();
        // Cut to 4 < max_length 5, so nothing is dropped.
        assert!(cut.dropped.is_empty());
        assert_eq!(cut.prompts_cut, 1);
        assert_eq!(cut.examples[0].prompt_ids, p0[p0.len() - 4..]);
        assert_eq!(cut.examples[0].chosen_ids, full.examples[0].chosen_ids);
        assert_eq!(cut.examples[1], full.examples[1]);
    }

    #[test]
    fn drop_rule_is_prompt_len_at_least_max_length_under_keep_start_only() {
        let tok = tokenizer();
        let rows = [row("one two three", " a", " b"), row("one", " a", " b")];
        let plen = build_examples(&tok, &rows, &ExampleConfig::default())
            .unwrap()
            .examples[0]
            .prompt_ids
            .len();
        let at = |max: usize, truncation| {
            let cfg = ExampleConfig {
                max_length: Some(max),
                truncation,
                ..ExampleConfig::default()
            };
            build_examples(&tok, &rows, &cfg).unwrap()
        };
        assert_eq!(at(plen, Truncation::KeepStart).dropped, vec![0]);
        assert!(at(plen + 1, Truncation::KeepStart).dropped.is_empty());
        let kept = at(plen, Truncation::KeepEnd);
        assert!(kept.dropped.is_empty());
        assert_eq!(kept.examples.len(), 2);
        let report = at(plen, Truncation::KeepStart).to_string();
        assert_eq!(
            report,
            format!(
                "1 of 2 rows kept; dropped 1 whose prompt reaches max_length ({plen} tokens): row 1"
            )
        );
    }

    #[test]
    fn wrapper_is_applied_before_tokenization() {
        let tok = tokenizer();
        let cfg = ExampleConfig {
            wrapper: Some(PromptWrapper::new("###질문:\n{question}\n\n###답변:\n").unwrap()),
            ..ExampleConfig::default()
        };
        let ex = &build_examples(&tok, &[row("보험료는?", "네", "아니요")], &cfg)
            .unwrap()
            .examples[0];
        let wrapped = "###질문:\n보험료는?\n\n###답변:\n";
        let full = tok.encode(&format!("{wrapped}네<eos>")).unwrap();
        assert_eq!(
            [ex.prompt_ids.clone(), ex.chosen_ids.clone()].concat(),
            full
        );
    }

    #[test]
    fn truncation_names() {
        for t in [Truncation::KeepStart, Truncation::KeepEnd] {
            assert_eq!(Truncation::from_name(t.name()), Some(t));
        }
        assert_eq!(Truncation::from_name("left"), None);
    }
}
