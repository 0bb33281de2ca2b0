//! The pair filters, applied in the order of [`Rule`]; a pair is counted under the first
//! rule that drops it.

use super::report::SplitReport;
use super::{Candidate, Pair, Seen};
use crate::error::{DataError, Result};
use crate::tokens::TokenCounter;

/// Why a candidate pair was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// The sample was cut by max_tokens (`finish_reason == "length"`); `--keep-truncated` keeps it.
    Truncated,
    /// The rejected response is empty or only whitespace.
    EmptyRejected,
    /// Rejected equals chosen once runs of whitespace are collapsed and ends trimmed.
    Identical,
    /// The same (prompt, chosen, rejected) appeared earlier in the split.
    Duplicate,
    /// prompt + max(chosen, rejected) + EOS exceeds `--max-length` tokens, or the prompt
    /// exceeds `--max-prompt-length`.
    OverBudget,
}

impl Rule {
    pub const ALL: [Rule; 5] = [
        Rule::Truncated,
        Rule::EmptyRejected,
        Rule::Identical,
        Rule::Duplicate,
        Rule::OverBudget,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rule::Truncated => "truncated (finish_reason length)",
            Rule::EmptyRejected => "empty rejected",
            Rule::Identical => "rejected identical to chosen",
            Rule::Duplicate => "duplicate (prompt, chosen, rejected)",
            Rule::OverBudget => "over the token budget",
        }
    }
}

/// Filter settings.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub keep_truncated: bool,
    /// Token budget for prompt + longer response + EOS.
    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
}

/// Text with runs of whitespace collapsed to one space and the ends trimmed.
fn collapsed(text: &str) -> impl Iterator<Item = &str> {
    text.split_whitespace()
}

fn identical(a: &str, b: &str) -> bool {
    collapsed(a).eq(collapsed(b))
}

impl Filters {
    /// Keeps the candidates that pass every rule, counting the others in `report`.
    pub(crate) fn apply(
        &self,
        candidates: Vec<Candidate>,
        tokens: Option<&TokenCounter>,
        report: &mut SplitReport,
    ) -> Result<Vec<Pair>> {
        let mut keep = vec![true; candidates.len()];
        {
            let mut seen: Seen = Seen::with_capacity(candidates.len());
            for (i, c) in candidates.iter().enumerate() {
                let p = &c.pair;
                let rule = if c.truncated && !self.keep_truncated {
                    Some(Rule::Truncated)
                } else if p.rejected.trim().is_empty() {
                    Some(Rule::EmptyRejected)
                } else if identical(&p.chosen, &p.rejected) {
                    Some(Rule::Identical)
                } else if !seen.insert((&p.prompt, &p.chosen, &p.rejected)) {
                    Some(Rule::Duplicate)
                } else {
                    None
                };
                if let Some(rule) = rule {
                    keep[i] = false;
                    report.count(rule);
                }
            }
        }
        if self.max_length.is_some() || self.max_prompt_length.is_some() {
            let tokens = tokens.ok_or_else(|| {
                DataError::Pairs(
                    "a token budget (--max-length / --max-prompt-length) needs --tokenizer".into(),
                )
            })?;
            let survivors: Vec<usize> = (0..candidates.len()).filter(|&i| keep[i]).collect();
            let texts: Vec<(&str, &str, &str)> = survivors
                .iter()
                .map(|&i| {
                    let p = &candidates[i].pair;
                    (p.prompt.as_str(), p.chosen.as_str(), p.rejected.as_str())
                })
                .collect();
            let lengths = tokens.pair_lengths(&texts)?;
            for (&i, len) in survivors.iter().zip(&lengths) {
                report.max_tokens_seen = report.max_tokens_seen.max(len.total());
                let over = self.max_length.is_some_and(|m| len.total() > m)
                    || self.max_prompt_length.is_some_and(|m| len.prompt > m);
                if over {
                    keep[i] = false;
                    report.count(Rule::OverBudget);
                }
            }
        }
        Ok(candidates
            .into_iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|(c, _)| c.pair)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::{TokenCounter, word_level_tokenizer_json};

    fn cand(prompt: &str, chosen: &str, rejected: &str, truncated: bool) -> Candidate {
        Candidate {
            pair: Pair {
                prompt: prompt.into(),
                chosen: chosen.into(),
                rejected: rejected.into(),
                ref_chosen_logps: None,
                ref_rejected_logps: None,
            },
            truncated,
        }
    }

    #[test]
    fn each_rule_drops_and_counts_once() {
        let candidates = vec![
            cand("p", "좋은 답", "잘린 답", true), // truncated (and would pass otherwise)
            cand("p", "좋은 답", " \n\t", false),  // empty
            cand("p", "좋은  답\n", " 좋은 답", false), // identical after collapsing
            cand("p", "좋은 답", "나쁜 답", false), // kept
            cand("p", "좋은 답", "나쁜 답", false), // duplicate
            cand("q", "좋은 답", "나쁜 답", true), // truncated beats duplicate-free
        ];
        let mut report = SplitReport::default();
        let kept = Filters::default()
            .apply(candidates, None, &mut report)
            .unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].rejected, "나쁜 답");
        assert_eq!(report.dropped(Rule::Truncated), 2);
        assert_eq!(report.dropped(Rule::EmptyRejected), 1);
        assert_eq!(report.dropped(Rule::Identical), 1);
        assert_eq!(report.dropped(Rule::Duplicate), 1);
    }

    #[test]
    fn keep_truncated_keeps_them() {
        let mut report = SplitReport::default();
        let f = Filters {
            keep_truncated: true,
            ..Default::default()
        };
        let kept = f
            .apply(vec![cand("p", "a", "b", true)], None, &mut report)
            .unwrap();
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn budget_counts_tokens_not_characters() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer.json"),
            word_level_tokenizer_json(&[]),
        )
        .unwrap();
        let tokens = TokenCounter::open(dir.path()).unwrap();
        // prompt "a b" = BOS + 2; longer response 3 words; + EOS = 7 tokens.
        let long_chars = "가나다라마바사아자차카타파하".repeat(10); // one token, many characters
        let candidates = vec![
            cand("a b", "x y z", &long_chars, false),
            cand("a b", "x y z w", "v", false),
        ];
        let mut report = SplitReport::default();
        let f = Filters {
            max_length: Some(7),
            ..Default::default()
        };
        let kept = f.apply(candidates, Some(&tokens), &mut report).unwrap();
        assert_eq!(
            kept.len(),
            1,
            "the 140-character response is one token and fits"
        );
        assert_eq!(kept[0].chosen, "x y z");
        assert_eq!(report.dropped(Rule::OverBudget), 1);
        assert_eq!(report.max_tokens_seen, 8);
        let mut report = SplitReport::default();
        let err = f
            .apply(vec![cand("a", "b", "c", false)], None, &mut report)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs --tokenizer"), "{err}");
    }
}
