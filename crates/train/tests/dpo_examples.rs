//! DPO examples, packed batches and step counts against TRL 1.16 / transformers 5.17 themselves:
//! fixtures/train/dpo_examples.json, made by tools/gen_dpo_examples_fixtures.py from a real
//! `DPOTrainer` (its `_prepare_dataset`, `DataCollatorForPreference`, and the `labels` its
//! `compute_loss` hands the model) and a real `Trainer.train()` loop.

use serde_json::Value;
use testkit::u32s;
use train::examples::{
    DpoExample, ExampleConfig, PreferenceRow, PromptWrapper, StepPlan, Truncation, build_examples,
    pack, total_optimizer_steps,
};

fn fixture() -> Value {
    let path = testkit::fixture("train/dpo_examples.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn tokenizer(fx: &Value) -> model::Tokenizer {
    let dir = testkit::fixture(fx["tokenizer"].as_str().unwrap());
    model::Tokenizer::load(&dir).unwrap()
}

fn config(fx: &Value, case: &Value) -> ExampleConfig {
    ExampleConfig {
        max_length: case["max_length"].as_u64().map(|n| n as usize),
        truncation: Truncation::from_name(case["truncation_mode"].as_str().unwrap()).unwrap(),
        max_prompt_length: None,
        wrapper: case["wrapper"]
            .as_bool()
            .unwrap()
            .then(|| PromptWrapper::new(fx["wrapper"].as_str().unwrap()).unwrap()),
    }
}

fn rows(case: &Value) -> Vec<PreferenceRow> {
    let text = |r: &Value, k: &str| r[k].as_str().unwrap().to_string();
    case["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| PreferenceRow {
            prompt: text(r, "prompt"),
            chosen: text(r, "chosen"),
            rejected: text(r, "rejected"),
        })
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    testkit::u64s(v).into_iter().map(|n| n as usize).collect()
}

fn cases(fx: &Value) -> &Vec<Value> {
    fx["cases"].as_array().unwrap()
}

/// The built examples of every case, with the case's config.
fn built(fx: &Value) -> Vec<(String, ExampleConfig, Vec<DpoExample>, Vec<usize>)> {
    let tok = tokenizer(fx);
    cases(fx)
        .iter()
        .map(|case| {
            let cfg = config(fx, case);
            let set = build_examples(&tok, &rows(case), &cfg).unwrap();
            let name = case["name"].as_str().unwrap().to_string();
            (name, cfg, set.examples, set.dropped)
        })
        .collect()
}

#[test]
fn defaults_are_dpo_configs() {
    let fx = fixture();
    let d = &fx["dpo_config_defaults"];
    let cfg = ExampleConfig::default();
    assert_eq!(
        cfg.max_length,
        Some(d["max_length"].as_u64().unwrap() as usize)
    );
    assert_eq!(
        cfg.truncation.name(),
        d["truncation_mode"].as_str().unwrap()
    );
    // What packing and StepPlan assume of transformers' defaults.
    assert!(d["pad_to_multiple_of"].is_null());
    assert_eq!(d["dataloader_drop_last"], Value::Bool(false));
    assert_eq!(d["train_sampling_strategy"], "random");
}

#[test]
fn examples_match_trl_prepare_dataset() {
    let fx = fixture();
    for (case, (name, _, examples, dropped)) in cases(&fx).iter().zip(built(&fx)) {
        let expected = case["examples"].as_array().unwrap();
        assert_eq!(
            dropped,
            usizes(&case["dropped_rows"]),
            "{name}: dropped rows"
        );
        assert_eq!(examples.len(), expected.len(), "{name}: kept rows");
        for (got, want) in examples.iter().zip(expected) {
            let row = want["row"].as_u64().unwrap() as usize;
            assert_eq!(got.row, row, "{name}");
            assert_eq!(
                got.prompt_ids,
                u32s(&want["prompt_ids"]),
                "{name} row {row}: prompt_ids"
            );
            assert_eq!(
                got.chosen_ids,
                u32s(&want["chosen_ids"]),
                "{name} row {row}: chosen_ids"
            );
            assert_eq!(
                got.rejected_ids,
                u32s(&want["rejected_ids"]),
                "{name} row {row}: rejected_ids"
            );
        }
    }
}

#[test]
fn packed_batches_match_trl_collator_and_loss_labels() {
    let fx = fixture();
    for (case, (name, cfg, examples, _)) in cases(&fx).iter().zip(built(&fx)) {
        let pad = case["pad_token_id"].as_u64().unwrap() as u32;
        for (b, batch) in case["batches"].as_array().unwrap().iter().enumerate() {
            let which = usizes(&batch["examples"]);
            let refs: Vec<&DpoExample> = which.iter().map(|&i| &examples[i]).collect();
            let packed = pack(&refs, &cfg).unwrap();
            let input_ids = batch["input_ids"].as_array().unwrap();
            assert_eq!(packed.seq_lens.len(), input_ids.len(), "{name} batch {b}");
            assert_eq!(packed.pairs(), which.len());
            assert_eq!(
                packed.num_tokens() as u64,
                batch["num_tokens"].as_u64().unwrap(),
                "{name} batch {b}: num_tokens"
            );
            let offsets = packed.offsets();
            for s in 0..input_ids.len() {
                let at = format!("{name} batch {b} sequence {s}");
                let ids = u32s(&input_ids[s]);
                let attention = usizes(&batch["attention_mask"][s]);
                let completion = usizes(&batch["completion_mask"][s]);
                let labels: Vec<i64> = batch["labels"][s]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect();
                let len = attention.iter().sum::<usize>();
                // Right padding: real tokens first, then pad ids with mask 0.
                assert!(attention[..len].iter().all(|&m| m == 1), "{at}");
                assert!(ids[len..].iter().all(|&t| t == pad), "{at}");
                assert_eq!(packed.seq_lens[s], len, "{at}: length");
                let seq = offsets[s]..offsets[s + 1];
                assert_eq!(&packed.input_ids[seq.clone()], &ids[..len], "{at}: ids");
                assert_eq!(
                    packed.completion_tokens[s],
                    completion.iter().sum::<usize>(),
                    "{at}: completion_mask sum"
                );
                // The fused head scores position t against labels[t + 1]; -100 is ignored.
                for (k, t) in seq.enumerate() {
                    let next = labels.get(k + 1).copied().unwrap_or(-100);
                    let counts = k + 1 < len && next != -100;
                    assert_eq!(
                        packed.weights[t],
                        f32::from(u8::from(counts)),
                        "{at} position {k}"
                    );
                    if counts {
                        assert_eq!(i64::from(packed.targets[t]), next, "{at} position {k}");
                    } else if k + 1 < len {
                        assert_eq!(packed.targets[t], ids[k + 1], "{at} position {k}");
                    }
                }
                let scored = labels[1..len.max(1)].iter().filter(|&&l| l != -100).count();
                assert_eq!(packed.scored_tokens[s], scored, "{at}: scored tokens");
            }
            let tb = packed.train_batch();
            assert_eq!(tb.rows.len(), packed.scored_tokens.iter().sum::<usize>());
            assert_eq!(packed.scored_sequences().len(), tb.rows.len());
        }
    }
}

#[test]
fn step_counts_match_transformers_trainer() {
    let fx = fixture();
    for s in fx["step_counts"].as_array().unwrap() {
        let n = |k: &str| s[k].as_u64().unwrap() as usize;
        let (rows, b, ga) = (
            n("rows"),
            n("per_device_train_batch_size"),
            n("gradient_accumulation_steps"),
        );
        let epochs = s["num_train_epochs"].as_f64().unwrap();
        let max_steps = s["max_steps"].as_i64().unwrap();
        let max_steps = (max_steps > 0).then_some(max_steps as usize);
        let at =
            format!("rows {rows} batch {b} accum {ga} epochs {epochs} max_steps {max_steps:?}");
        let plan = StepPlan::new(rows, b, ga, epochs, max_steps).unwrap();
        assert_eq!(plan.total_steps(), n("total_steps"), "{at}");
        assert_eq!(
            total_optimizer_steps(rows, b, ga, epochs, max_steps).unwrap(),
            n("total_steps")
        );
        let steps = s["steps"].as_array().unwrap();
        assert_eq!(steps.len(), plan.total_steps(), "{at}: steps run");
        let order: Vec<usize> = (0..rows).collect();
        for (i, want) in steps.iter().enumerate() {
            let step = plan.step(i).unwrap();
            let sizes: Vec<usize> = step
                .batches
                .clone()
                .map(|k| plan.batch_examples(&order, k).len())
                .collect();
            assert_eq!(sizes, usizes(&want["micro_batches"]), "{at} step {i}");
            // Exact: Rust's `parse` rounds correctly (serde_json's float parser may not).
            let epoch: f64 = want["epoch_repr"].as_str().unwrap().parse().unwrap();
            assert_eq!(step.epoch_after, epoch, "{at} step {i}: epoch");
        }
    }
}

/// The fixture must keep exercising what it was made for; a regenerated file that lost a
/// case would otherwise pass silently.
#[test]
fn fixture_covers_every_rule() {
    let fx = fixture();
    let tok = tokenizer(&fx);
    let eos = tok.eos_token_id().unwrap();
    let by_name = |n: &str| cases(&fx).iter().find(|c| c["name"] == n).unwrap();
    let (start, end) = (by_name("keep_start"), by_name("keep_end"));
    assert!(!usizes(&start["dropped_rows"]).is_empty());
    assert!(usizes(&end["dropped_rows"]).is_empty());
    assert!(cases(&fx).iter().any(|c| c["wrapper"] == true));
    assert!(cases(&fx).iter().any(|c| c["max_length"].is_null()));
    for case in [start, end] {
        let max = case["max_length"].as_u64().unwrap() as usize;
        let cut = case["examples"].as_array().unwrap().iter().any(|e| {
            let p = e["prompt_ids"].as_array().unwrap().len();
            p + e["chosen_ids"].as_array().unwrap().len() > max
        });
        assert!(cut, "{}: no sequence is truncated", case["name"]);
    }
    let examples = start["examples"].as_array().unwrap();
    // A prompt tokenized alone that is not a prefix of prompt+completion (boundary merge).
    let merged = examples.iter().any(|e| {
        let row = &start["rows"][e["row"].as_u64().unwrap() as usize];
        tok.encode(row["prompt"].as_str().unwrap()).unwrap().len()
            > e["prompt_ids"].as_array().unwrap().len()
    });
    assert!(merged, "no boundary-merge row");
    // A chosen text already ending in the EOS string keeps one EOS.
    let eos_text = examples.iter().any(|e| {
        let row = &start["rows"][e["row"].as_u64().unwrap() as usize];
        row["chosen"].as_str().unwrap().ends_with("<eos>")
            && u32s(&e["chosen_ids"]).iter().filter(|&&t| t == eos).count() == 1
    });
    assert!(eos_text);
    // Korean text.
    assert!(
        start["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["prompt"].as_str().unwrap().contains("###답변"))
    );
}
