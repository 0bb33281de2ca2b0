//! Parity with Hugging Face transformers 5.17 (float32, eager attention) on the fixture
//! checkpoints in `fixtures/models/*`, against `fixtures/reference/<name>.json` (see
//! fixtures/README.md for how they were made).
//!
//! Tolerances (CPU float32 against HF's float32, statistics in f64):
//! - every token log-prob, entropy and mean logit: |Δ| < 1e-4 (absolute);
//! - argmax (ties → lowest id) and greedy ids: equal, except at positions the fixture lists
//!   as near ties (margin < 1e-4), where f32 rounding may legitimately flip the order;
//! - a completion's summed log-prob: |Δ| < 1e-4 · (number of tokens);
//! - tokenization: ids identical.
//!
//! The fixtures are found at run time: $PREFER_FIXTURES, else a `fixtures/` folder above the
//! current directory or above the test executable (CARGO_MANIFEST_DIR is baked in at build
//! time and is wrong on the GPU machine).

use std::path::{Path, PathBuf};

use engine::Device;
use engine::ops::SeqLayout;
use model::{CpuKvCache, Model, Tokenizer};
use serde_json::Value;
use testkit::{f64s, fixtures_dir, u32s};

const TOL: f64 = 1e-4;

/// Every fixture model with its reference, sorted by name.
fn fixture_models() -> Vec<(String, PathBuf, Value)> {
    let root = fixtures_dir();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root.join("models")).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let reference = root.join("reference").join(format!("{name}.json"));
        assert!(
            reference.is_file(),
            "fixture model {name} has no reference {}: regenerate the fixtures",
            reference.display()
        );
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
        out.push((name, dir, json));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "no fixture models with references");
    out
}

fn near_ties(v: &Value) -> Vec<usize> {
    v.as_array().map_or(Vec::new(), |a| {
        a.iter().map(|x| x.as_u64().unwrap() as usize).collect()
    })
}

/// Collects mismatches so one run reports all of them.
#[derive(Default)]
struct Report(Vec<String>);

impl Report {
    fn close(&mut self, what: &str, got: f64, want: f64, tol: f64) {
        if (got - want).abs() >= tol || got.is_nan() {
            self.0.push(format!(
                "{what}: got {got}, want {want} (|Δ| {:.2e})",
                (got - want).abs()
            ));
        }
    }
    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} mismatches:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

/// Per-position log-probs, entropy, mean logit and argmax of every reference sequence, run
/// one at a time and packed together in one forward.
#[test]
fn sequences_match_hf() {
    let mut report = Report::default();
    for (name, dir, reference) in fixture_models() {
        let model = Model::load(&dir, Device::Cpu).unwrap();
        assert_eq!(
            model.config().vocab_size as u64,
            reference["vocab_size"].as_u64().unwrap()
        );
        let seqs = reference["sequences"].as_array().unwrap();
        let all_ids: Vec<Vec<u32>> = seqs.iter().map(|s| u32s(&s["ids"])).collect();

        // Packed: every sequence in one forward.
        let lens: Vec<usize> = all_ids.iter().map(Vec::len).collect();
        let ids: Vec<u32> = all_ids.concat();
        let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        let packed = model
            .forward(&ids, &positions, &SeqLayout::prefill(&lens))
            .unwrap();
        // The target of each row is the next token; the last row of a sequence has none
        // (any id will do: only its distribution statistics are compared).
        let targets: Vec<u32> = all_ids
            .iter()
            .flat_map(|s| s[1..].iter().copied().chain([0]))
            .collect();
        let packed_stats = model.token_stats(&packed, &targets).unwrap();

        let mut offset = 0;
        for (s, seq) in seqs.iter().enumerate() {
            let ids = &all_ids[s];
            let t = ids.len();
            let positions: Vec<u32> = (0..t as u32).collect();
            let hidden = model
                .forward(ids, &positions, &SeqLayout::prefill(&[t]))
                .unwrap();
            let targets: Vec<u32> = ids[1..].iter().copied().chain([0]).collect();
            let single = model.token_stats(&hidden, &targets).unwrap();
            let ties = near_ties(&seq["near_ties"]);
            let (logprobs, entropy, mean_logit, argmax) = (
                f64s(&seq["logprobs"]),
                f64s(&seq["entropy"]),
                f64s(&seq["mean_logit"]),
                u32s(&seq["argmax"]),
            );
            for (mode, at) in [("single", 0), ("packed", offset)] {
                let stats = if mode == "single" {
                    &single
                } else {
                    &packed_stats
                };
                let label =
                    |what: &str, i: usize| format!("{name} seq {s} (len {t}) {mode} {what}[{i}]");
                for i in 0..t {
                    if i + 1 < t {
                        report.close(
                            &label("logprob", i),
                            stats.logp[at + i] as f64,
                            logprobs[i],
                            TOL,
                        );
                    }
                    report.close(
                        &label("entropy", i),
                        stats.entropy[at + i] as f64,
                        entropy[i],
                        TOL,
                    );
                    report.close(
                        &label("mean_logit", i),
                        stats.mean_logit[at + i] as f64,
                        mean_logit[i],
                        TOL,
                    );
                    if !ties.contains(&i) && stats.argmax[at + i] != argmax[i] {
                        report.0.push(format!(
                            "{}: got {}, want {}",
                            label("argmax", i),
                            stats.argmax[at + i],
                            argmax[i]
                        ));
                    }
                }
            }
            offset += t;
        }
    }
    report.finish();
}

/// Greedy decoding through the KV cache (prefill the prompt, then one token per step)
/// reproduces HF `generate(do_sample=False)` with EOS disabled.
#[test]
fn greedy_decoding_with_kv_cache_matches_hf() {
    let mut report = Report::default();
    for (name, dir, reference) in fixture_models() {
        let model = Model::load(&dir, Device::Cpu).unwrap();
        for (g, case) in reference["greedy"].as_array().unwrap().iter().enumerate() {
            let prompt = u32s(&case["prompt_ids"]);
            let want = u32s(&case["output_ids"]);
            let ties = near_ties(&case["near_ties"]);
            let mut cache = CpuKvCache::new(model.config(), 1);
            let mut ids = prompt.clone();
            let mut got = Vec::new();
            let mut fed = 0; // tokens already in the cache
            for step in 0..want.len() {
                let new = &ids[fed..];
                let positions: Vec<u32> = (fed as u32..ids.len() as u32).collect();
                let layout = SeqLayout {
                    q_starts: vec![0, new.len()],
                    kv_starts: vec![0, ids.len()],
                };
                let hidden = model
                    .forward_cached(new, &positions, &layout, &mut cache)
                    .unwrap();
                let stats = model.token_stats(&hidden, &vec![0; new.len()]).unwrap();
                let next = *stats.argmax.last().unwrap();
                fed = ids.len();
                // After a near tie HF and we may legitimately diverge: stop comparing there.
                if ties.contains(&step) {
                    break;
                }
                got.push(next);
                ids.push(next);
            }
            if got[..] != want[..got.len()] {
                report
                    .0
                    .push(format!("{name} greedy {g}: got {got:?}\nwant {want:?}"));
            }
        }
    }
    report.finish();
}

/// Text rows: the TRL-style split of prompt and completion (with and without EOS) and the
/// completion log-probs.
#[test]
fn text_rows_match_hf() {
    let mut report = Report::default();
    for (name, dir, reference) in fixture_models() {
        let model = Model::load(&dir, Device::Cpu).unwrap();
        let tok = Tokenizer::load(&dir).unwrap();
        for (r, row) in reference["text"].as_array().unwrap().iter().enumerate() {
            let prompt = row["prompt"].as_str().unwrap();
            let completion = row["completion"].as_str().unwrap();
            let add_eos = row["add_eos"].as_bool().unwrap();
            let pc = tok
                .encode_prompt_completion(prompt, completion, add_eos)
                .unwrap();
            let prefix_len = row["prefix_len"].as_u64().unwrap() as usize;
            let want_prompt = &u32s(&row["prompt_ids"])[..prefix_len];
            let want_completion = u32s(&row["completion_ids"]);
            if pc.prompt_ids != want_prompt || pc.completion_ids != want_completion {
                report.0.push(format!(
                    "{name} text {r}: split ({:?}, {:?}) != HF ({want_prompt:?}, {want_completion:?})",
                    pc.prompt_ids, pc.completion_ids
                ));
                continue;
            }
            let stats = model
                .completion_stats(&[(&pc.prompt_ids, &pc.completion_ids)])
                .unwrap();
            let want = f64s(&row["completion_logprobs"]);
            for (i, (g, w)) in stats[0].logp.iter().zip(&want).enumerate() {
                report.close(&format!("{name} text {r} logprob[{i}]"), *g as f64, *w, TOL);
            }
            let sum: f64 = stats[0].logp.iter().map(|&x| x as f64).sum();
            report.close(
                &format!("{name} text {r} logp"),
                sum,
                row["completion_logp"].as_f64().unwrap(),
                TOL * want.len() as f64,
            );
        }
    }
    report.finish();
}

/// The fixture tokenizer against HF's `tok(text)` / `tok.decode(...)`.
#[test]
fn tokenization_matches_hf() {
    let root = fixtures_dir();
    let path = root.join("reference").join("tokenization.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let dir: &Path = &root.join("tokenizer");
    let tok = Tokenizer::load(dir).unwrap();
    assert_eq!(
        tok.vocab_size() as u64,
        reference["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(
        tok.eos_token_id().map(u64::from),
        reference["eos_token_id"].as_u64()
    );
    let mut report = Report::default();
    for (i, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let text = case["text"].as_str().unwrap();
        let with = tok.encode(text).unwrap();
        let without = tok.encode_with(text, false).unwrap();
        if with != u32s(&case["ids_with_special"]) || without != u32s(&case["ids_without_special"])
        {
            report
                .0
                .push(format!("case {i} {text:?}: ids {with:?} / {without:?}"));
        }
        let decoded = tok.decode(&with, false).unwrap();
        let skipped = tok.decode(&with, true).unwrap();
        if decoded != case["decode_with_special"].as_str().unwrap()
            || skipped != case["decode_skip_special"].as_str().unwrap()
        {
            report.0.push(format!(
                "case {i} {text:?}: decoded {decoded:?} / {skipped:?}"
            ));
        }
    }
    report.finish();
}
