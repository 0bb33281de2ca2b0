//! Preference pairs: gold rows joined with sampled responses, filtered, split.
//!
//! chosen = the gold output, rejected = the model's sample for the same prompt. The prompt
//! is the text exactly as sampled (the sample's `prompt` when it has one, else the gold row
//! rendered with the template) — never wrapped; a DPO-time wrapper is the trainer's.
//!
//! Steps, in order (each drop is counted once, under the first rule that drops it):
//! 1. read every gold source of every split ([`crate::ingest`]): rows with an empty
//!    instruction/output are dropped, numeric cells converted (counted per source);
//! 2. join: by `id` when the gold row has one that a sample carries (`--join auto`, the
//!    default; `id` and `prompt` force one key), else by prompt text; every matching sample
//!    makes a candidate; gold rows without a sample are counted;
//! 3. filters ([`filter`]): truncated, empty rejected, identical, duplicate, token budget;
//! 4. an optional seeded holdout moves a fraction of one split's pairs into another;
//! 5. reference log-prob columns are attached when every kept pair has one.

mod filter;
mod report;
mod split;

use std::collections::{HashMap, HashSet};

pub use filter::{Filters, Rule};
pub use report::{Report, SplitReport};
pub use split::Holdout;

use crate::error::{DataError, Result};
use crate::ingest::{self, FieldReport, Requirements, SourceSpec};
use crate::samples::{Sample, Scores};
use crate::template::Template;
use crate::tokens::TokenCounter;

/// One gold source feeding one output split.
#[derive(Debug, Clone)]
pub struct GoldSource {
    pub split: String,
    pub spec: SourceSpec,
}

/// How gold rows find their samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JoinKey {
    /// By id where the gold row has an id that some sample carries, else by prompt text.
    #[default]
    Auto,
    /// By id only; gold rows without an id column get the `FILE:ROW` id `prefer sample`
    /// gives them ([`ingest::fallback_id`]).
    Id,
    Prompt,
}

/// Everything that shapes the pairs, apart from the inputs.
#[derive(Debug)]
pub struct PairOptions<'a> {
    pub template: &'a Template,
    pub join: JoinKey,
    pub strict: bool,
    pub filters: Filters,
    pub tokens: Option<&'a TokenCounter>,
    pub holdout: Option<Holdout>,
    pub scores: Option<&'a Scores>,
}

/// One preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub ref_chosen_logps: Option<f64>,
    pub ref_rejected_logps: Option<f64>,
}

/// The pairs of one output split.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitPairs {
    pub name: String,
    pub pairs: Vec<Pair>,
}

/// The result: pairs per split, which reference columns they carry, and the report.
#[derive(Debug)]
pub struct PairSet {
    pub splits: Vec<SplitPairs>,
    /// Every pair carries `ref_chosen_logps` (from `prefer score`).
    pub has_ref_chosen: bool,
    /// Every pair carries `ref_rejected_logps` (from `prefer sample --logprobs 0`).
    pub has_ref_rejected: bool,
    pub report: Report,
}

/// A gold row with its prompt rendered.
struct Gold {
    id: Option<String>,
    prompt: String,
    chosen: String,
}

/// A pair before filtering, with what the filters need.
pub(crate) struct Candidate {
    pub pair: Pair,
    pub truncated: bool,
}

/// Builds the pair set. Splits appear in the order they are first named in `gold`.
pub fn build(gold: &[GoldSource], samples: &[Sample], options: &PairOptions) -> Result<PairSet> {
    let mut split_names: Vec<String> = Vec::new();
    for g in gold {
        if !split_names.contains(&g.split) {
            split_names.push(g.split.clone());
        }
    }
    let mut report = Report {
        samples_read: samples.len(),
        ..Default::default()
    };

    // 1. Gold rows per split.
    let mut gold_rows: Vec<Vec<Gold>> = split_names.iter().map(|_| Vec::new()).collect();
    for source in gold {
        let _span = tracing::info_span!("gold source", split = %source.split, path = %source.spec.path.display()).entered();
        let table = ingest::open(&source.spec, Some(&source.split))?;
        tracing::info!(rows = table.rows.len(), columns = ?table.columns, "read");
        let (records, fields) = ingest::records(
            &table,
            &source.spec,
            Requirements {
                output: true,
                strict: options.strict,
            },
        )?;
        let split_index = split_names
            .iter()
            .position(|s| *s == source.split)
            .unwrap_or(0);
        for record in records {
            let prompt = match record.prompt {
                Some(p) => p,
                None => options
                    .template
                    .render(
                        record.instruction.as_deref().unwrap_or_default(),
                        record.input.as_deref(),
                    )
                    .map_err(|e| {
                        DataError::Pairs(format!(
                            "{}: {}: {e}",
                            table.source,
                            table.location(record.row)
                        ))
                    })?,
            };
            let id = match (record.id, options.join) {
                (Some(id), _) => Some(id),
                (None, JoinKey::Id) => Some(ingest::fallback_id(&source.spec, record.row)),
                (None, _) => None,
            };
            gold_rows[split_index].push(Gold {
                id,
                prompt,
                chosen: record.output.unwrap_or_default(),
            });
        }
        report
            .sources
            .push((source.split.clone(), table.source.clone(), fields));
    }

    // 2. Join.
    tracing::info!(samples = samples.len(), join = ?options.join, "joining");
    let mut by_id: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut by_prompt: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, s) in samples.iter().enumerate() {
        if let Some(id) = &s.id {
            by_id.entry(id.as_str()).or_default().push(i);
        }
        if let Some(p) = &s.prompt {
            by_prompt.entry(p.as_str()).or_default().push(i);
        }
    }
    if options.join == JoinKey::Id && by_id.is_empty() {
        return Err(DataError::Pairs(
            "--join id: the samples carry no id".into(),
        ));
    }
    let mut used = vec![false; samples.len()];
    let mut splits = Vec::with_capacity(split_names.len());
    for (name, rows) in split_names.iter().zip(&gold_rows) {
        let mut split_report = SplitReport {
            name: name.clone(),
            gold_rows: rows.len(),
            ..Default::default()
        };
        let mut candidates = Vec::new();
        for row in rows {
            let by_row_id = || row.id.as_deref().and_then(|id| by_id.get(id));
            let matches = match options.join {
                JoinKey::Id => by_row_id(),
                JoinKey::Prompt => by_prompt.get(row.prompt.as_str()),
                JoinKey::Auto => by_row_id().or_else(|| by_prompt.get(row.prompt.as_str())),
            };
            let Some(matches) = matches else {
                split_report.no_sample += 1;
                continue;
            };
            for &i in matches {
                used[i] = true;
                let sample = &samples[i];
                candidates.push(Candidate {
                    pair: Pair {
                        prompt: sample.prompt.clone().unwrap_or_else(|| row.prompt.clone()),
                        chosen: row.chosen.clone(),
                        rejected: sample.response.clone(),
                        ref_chosen_logps: None,
                        ref_rejected_logps: sample.ref_logps,
                    },
                    truncated: sample.truncated(),
                });
            }
        }
        split_report.candidates = candidates.len();
        // 3. Filters.
        let kept = options
            .filters
            .apply(candidates, options.tokens, &mut split_report)?;
        splits.push(SplitPairs {
            name: name.clone(),
            pairs: kept,
        });
        report.splits.push(split_report);
    }
    report.samples_unmatched = used.iter().filter(|u| !**u).count();

    // 4. Holdout.
    if let Some(holdout) = &options.holdout {
        let moved = holdout.apply(&mut splits)?;
        report.holdout = Some((holdout.clone(), moved));
    }
    for (split, r) in splits.iter().zip(report.splits.iter_mut()) {
        r.written = split.pairs.len();
    }
    for split in splits.iter().skip(report.splits.len()) {
        report.splits.push(SplitReport {
            name: split.name.clone(),
            written: split.pairs.len(),
            ..Default::default()
        });
    }

    // 5. Reference log-prob columns.
    let has_ref_chosen = match options.scores {
        Some(scores) => {
            let mut missing = 0usize;
            let mut first_missing = None;
            for pair in splits.iter_mut().flat_map(|s| s.pairs.iter_mut()) {
                pair.ref_chosen_logps = scores.get(&pair.prompt, &pair.chosen);
                if pair.ref_chosen_logps.is_none() {
                    missing += 1;
                    first_missing
                        .get_or_insert_with(|| pair.prompt.chars().take(60).collect::<String>());
                }
            }
            if missing > 0 {
                return Err(DataError::Pairs(format!(
                    "--chosen-logps: {missing} pairs have no score for their (prompt, chosen); first prompt: {:?}",
                    first_missing.unwrap_or_default()
                )));
            }
            true
        }
        None => false,
    };
    let total: usize = splits.iter().map(|s| s.pairs.len()).sum();
    let with_rejected = splits
        .iter()
        .flat_map(|s| &s.pairs)
        .filter(|p| p.ref_rejected_logps.is_some())
        .count();
    let has_ref_rejected = total > 0 && with_rejected == total;
    if !has_ref_rejected {
        for pair in splits.iter_mut().flat_map(|s| s.pairs.iter_mut()) {
            pair.ref_rejected_logps = None;
        }
    }
    report.ref_rejected = (with_rejected, total);
    if total == 0 {
        return Err(DataError::Pairs(format!(
            "no pairs left after joining and filtering\n{}",
            report.render_text()
        )));
    }
    Ok(PairSet {
        splits,
        has_ref_chosen,
        has_ref_rejected,
        report,
    })
}

/// `(prompt, chosen, rejected)` already seen, for the duplicate filter.
pub(crate) type Seen<'a> = HashSet<(&'a str, &'a str, &'a str)>;

/// A report of one source as the card lists it.
pub(crate) fn source_line(split: &str, source: &str, f: &FieldReport) -> String {
    let mut line = format!(
        "{split} ← {source}: {} rows read, {} kept",
        f.rows_read, f.rows_kept
    );
    for (field, n) in &f.dropped_empty {
        line.push_str(&format!("; {n} dropped (empty {field})"));
    }
    for (field, n) in &f.converted {
        line.push_str(&format!("; {n} {field} cells converted from numbers"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn sample(id: Option<&str>, prompt: &str, response: &str, finish: &str) -> Sample {
        Sample {
            location: String::new(),
            id: id.map(str::to_string),
            prompt: Some(prompt.into()),
            response: response.into(),
            finish_reason: Some(finish.into()),
            ref_logps: Some(-1.0),
        }
    }

    #[test]
    fn joins_by_prompt_and_id_and_counts_everything() {
        let dir = tempfile::tempdir().unwrap();
        let train = write(
            dir.path(),
            "train.jsonl",
            "{\"instruction\":\"가\",\"output\":\"A\"}\n{\"instruction\":\"나\",\"output\":\"B\"}\n{\"instruction\":\"다\",\"output\":\"C\"}\n{\"instruction\":\"라\",\"output\":\"\"}\n",
        );
        let valid = write(
            dir.path(),
            "v.jsonl",
            "{\"id\":\"v1\",\"instruction\":\"마\",\"output\":\"E\"}\n",
        );
        let t = Template::Korean;
        let samples = vec![
            sample(None, &t.render("가", None).unwrap(), "a", "stop"),
            sample(None, &t.render("나", None).unwrap(), "b", "length"),
            sample(Some("v1"), "마 as sampled", "e", "stop"),
            sample(None, "orphan", "x", "stop"),
        ];
        let gold = vec![
            GoldSource {
                split: "train".into(),
                spec: SourceSpec::plain(&train),
            },
            GoldSource {
                split: "validation".into(),
                spec: SourceSpec::plain(&valid),
            },
        ];
        let options = PairOptions {
            template: &t,
            join: JoinKey::Auto,
            strict: false,
            filters: Filters::default(),
            tokens: None,
            holdout: None,
            scores: None,
        };
        let set = build(&gold, &samples, &options).unwrap();
        assert_eq!(set.splits[0].pairs.len(), 1);
        assert_eq!(set.splits[0].pairs[0].chosen, "A");
        assert_eq!(set.splits[0].pairs[0].rejected, "a");
        // Joined by id: the prompt is the sample's, exactly as sampled.
        assert_eq!(set.splits[1].pairs[0].prompt, "마 as sampled");
        assert!(set.has_ref_rejected);
        let r = &set.report;
        assert_eq!(r.samples_unmatched, 1);
        assert_eq!(r.splits[0].no_sample, 1); // 다
        assert_eq!(r.splits[0].dropped(Rule::Truncated), 1);
        assert_eq!(r.sources[0].2.dropped_empty.get("output"), Some(&1));
    }
}
