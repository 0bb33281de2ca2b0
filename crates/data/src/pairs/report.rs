//! Counts of everything `pairs` read, converted, joined and dropped — printed on the terminal
//! and written into the dataset card.

use std::collections::BTreeMap;

use super::filter::Rule;
use super::source_line;
use super::split::Holdout;
use crate::ingest::FieldReport;

/// Counts for one output split.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SplitReport {
    pub name: String,
    /// Gold rows with text in every required field.
    pub gold_rows: usize,
    /// Gold rows no sample matched.
    pub no_sample: usize,
    /// Pairs formed by the join, before filters.
    pub candidates: usize,
    pub(crate) dropped: BTreeMap<Rule, usize>,
    /// Pairs in the written split (after the holdout moved some).
    pub written: usize,
    /// The longest pair seen by the token budget (0 when no budget).
    pub max_tokens_seen: usize,
}

impl SplitReport {
    pub(crate) fn count(&mut self, rule: Rule) {
        *self.dropped.entry(rule).or_default() += 1;
    }

    pub fn dropped(&self, rule: Rule) -> usize {
        self.dropped.get(&rule).copied().unwrap_or(0)
    }

    fn kept(&self) -> usize {
        self.candidates - self.dropped.values().sum::<usize>()
    }
}

/// The whole report.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// (split, source, its field report), in the order given.
    pub sources: Vec<(String, String, FieldReport)>,
    pub splits: Vec<SplitReport>,
    pub samples_read: usize,
    /// Samples no gold row matched.
    pub samples_unmatched: usize,
    pub holdout: Option<(Holdout, usize)>,
    /// (pairs with a sampling-time reference log-prob, pairs in total).
    pub ref_rejected: (usize, usize),
}

impl Report {
    /// Plain lines for the terminal (and for the "no pairs left" error).
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for (split, source, fields) in &self.sources {
            out.push_str(&source_line(split, source, fields));
            out.push('\n');
        }
        out.push_str(&format!(
            "samples: {} read, {} matched no gold row\n",
            self.samples_read, self.samples_unmatched
        ));
        for s in &self.splits {
            out.push_str(&format!(
                "{}: {} gold rows, {} without a sample, {} candidate pairs",
                s.name, s.gold_rows, s.no_sample, s.candidates
            ));
            for rule in Rule::ALL {
                if s.dropped(rule) > 0 {
                    out.push_str(&format!(", {} {}", s.dropped(rule), rule.name()));
                }
            }
            out.push_str(&format!(", {} kept, {} written\n", s.kept(), s.written));
        }
        if let Some((h, moved)) = &self.holdout {
            out.push_str(&format!(
                "holdout: {moved} pairs moved from {} to {} (ratio {}, seed {})\n",
                h.from, h.to, h.ratio, h.seed
            ));
        }
        out
    }

    /// The card body's report section (Markdown tables).
    pub fn render_markdown(&self) -> String {
        let mut out = String::from("## Counts\n\n| split | pairs |\n|---|---:|\n");
        for s in &self.splits {
            out.push_str(&format!("| {} | {} |\n", s.name, s.written));
        }
        out.push_str("\n## Sources\n\n| split | source | rows read | kept | dropped (empty field) | cells converted from numbers |\n|---|---|---:|---:|---|---|\n");
        for (split, source, f) in &self.sources {
            let list = |m: &BTreeMap<&str, usize>| {
                if m.is_empty() {
                    "0".to_string()
                } else {
                    m.iter()
                        .map(|(k, v)| format!("{v} {k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            out.push_str(&format!(
                "| {split} | `{}` | {} | {} | {} | {} |\n",
                source.replace('|', "\\|"),
                f.rows_read,
                f.rows_kept,
                list(&f.dropped_empty),
                list(&f.converted)
            ));
        }
        out.push_str(&format!(
            "\nSamples: {} read, {} matched no gold row.\n\n## Filter report\n\n| split | gold rows | no sample | candidates |",
            self.samples_read, self.samples_unmatched
        ));
        for rule in Rule::ALL {
            out.push_str(&format!(" {} |", rule.name()));
        }
        out.push_str(" kept |\n|---|---:|---:|---:|");
        for _ in Rule::ALL {
            out.push_str("---:|");
        }
        out.push_str("---:|\n");
        for s in &self.splits {
            out.push_str(&format!(
                "| {} | {} | {} | {} |",
                s.name, s.gold_rows, s.no_sample, s.candidates
            ));
            for rule in Rule::ALL {
                out.push_str(&format!(" {} |", s.dropped(rule)));
            }
            out.push_str(&format!(" {} |\n", s.kept()));
        }
        if let Some((h, moved)) = &self.holdout {
            out.push_str(&format!(
                "\nHoldout: {moved} pairs moved from `{}` to `{}` (ratio {}, seed {}).\n",
                h.from, h.to, h.ratio, h.seed
            ));
        }
        out
    }
}
