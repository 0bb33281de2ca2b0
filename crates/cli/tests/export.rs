//! `prefer export` end to end on the CPU: adapters trained by `prefer train` on fixture
//! models (2 steps at lr 1e-2, so every pair has moved), merged, and the export checked with
//! `model::Model::load` against the unmerged adapter's forward (`Model::lora_forward` with the
//! adapter): the log-probs of a fixed batch agree within [`LOGP_TOL`] (f32 fixtures; measured
//! differences are below 1e-5, the f32 round-off of merging first, while the adapters move
//! them by 0.07 to 1.5). Also: the leave-out options (those weights byte-identical to the
//! base), `--servable vllm` on a tied Gemma-2, sharding, the PEFT-merged references of
//! fixtures/train/merged, and the errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use engine::Device;
use model::{Dropout, Lora, LoraPair, LoraSpec, LoraTarget, Model, TrainBatch};
use serde_json::Value;
use testkit::{
    Ran, TempDir, dir_entries, fixture, max_abs_diff, prefer, read_folder_safetensors_f32,
    read_json, run,
};

/// Merged vs unmerged (and vs PEFT's merged model in f64), f32 checkpoints.
const LOGP_TOL: f64 = 1e-4;
/// The adapter must move log-probs by more than this, or the comparisons prove nothing.
const MOVED: f64 = 1e-3;
const ALL_MODULES: &str =
    "embed_tokens,q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head";
const EMBED: &str = "model.embed_tokens.weight";
const HEAD: &str = "lm_head.weight";

fn model_dir(name: &str) -> PathBuf {
    fixture("models").join(name)
}

/// `prefer train` for 2 steps (batch 2, lr 1e-2, r 4, alpha 8, a checkpoint at step 2) on
/// `modules`; the adapter is written to `out`.
fn train(model: &str, modules: &str, out: &Path) {
    let mut cmd = prefer!();
    cmd.arg("train")
        .arg("--model")
        .arg(model_dir(model))
        .arg("--data")
        .arg(fixture("train/trl_run/rows.jsonl"))
        .arg("--output-dir")
        .arg(out)
        .args(["--max-steps", "2", "--per-device-train-batch-size", "2"])
        .args(["--save-steps", "2", "--learning-rate", "1e-2"])
        .args(["--lora-r", "4", "--lora-alpha", "8"])
        .args(["--lora-target-modules", modules]);
    run(&mut cmd).ok();
}

fn export(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = prefer!();
    cmd.arg("export")
        .arg("--model")
        .arg(model)
        .arg("--adapter")
        .arg(adapter)
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd
}

/// A fresh temp folder (named after `tag`) holding at `adapter` what [`train`] wrote for
/// `model` on `modules`: (the folder, the adapter, the model's folder).
fn trained(tag: &str, model: &str, modules: &str) -> (TempDir, PathBuf, PathBuf) {
    let tmp = TempDir::new(tag);
    let adapter = tmp.join("adapter");
    train(model, modules, &adapter);
    (tmp, adapter, model_dir(model))
}

/// `prefer export` that must succeed, and what it printed.
#[track_caller]
fn export_ok(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Ran {
    run(&mut export(model, adapter, out, extra)).ok()
}

/// `prefer export` that must fail, and what it printed.
#[track_caller]
fn export_fails(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Ran {
    run(&mut export(model, adapter, out, extra)).failed()
}

fn load_adapter(dir: &Path, model: &Model) -> Lora {
    train::peft::load_adapter(dir, model.config()).unwrap().lora
}

/// Three sequences of ids below every fixture's vocabulary, a scored row at each position
/// (the next token, and token 7 as a second target at every third position).
fn batch() -> TrainBatch {
    let seqs: [&[u32]; 3] = [
        &[2, 17, 503, 88, 940, 12, 361, 77, 5],
        &[2, 640, 41, 999, 230, 8],
        &[2, 150, 151, 152, 700, 701, 19, 33, 812, 402, 6],
    ];
    let (mut rows, mut targets, mut start) = (Vec::new(), Vec::new(), 0);
    for s in seqs {
        for p in 0..s.len() - 1 {
            rows.push(start + p);
            targets.push(s[p + 1]);
            if p % 3 == 0 {
                rows.push(start + p);
                targets.push(7);
            }
        }
        start += s.len();
    }
    TrainBatch {
        ids: seqs.concat(),
        lens: seqs.iter().map(|s| s.len()).collect(),
        rows,
        targets,
    }
}

fn logprobs(model: &Model, lora: Option<&Lora>, batch: &TrainBatch) -> Vec<f64> {
    let (stats, _) = model.lora_forward(batch, lora, Dropout::Off).unwrap();
    stats.logp.iter().map(|&x| x as f64).collect()
}

/// The merged export scores `batch` as the base with `lora` does, and not as the bare base.
#[track_caller]
fn assert_scores_as(out: &Path, base: &Model, lora: &Lora, what: &str) {
    let b = batch();
    let merged = logprobs(&Model::load(out, Device::Cpu).unwrap(), None, &b);
    let unmerged = logprobs(base, Some(lora), &b);
    let bare = logprobs(base, None, &b);
    let d = max_abs_diff(&merged, &unmerged);
    assert!(d <= LOGP_TOL, "{what}: merged vs unmerged differ by {d:e}");
    let moved = max_abs_diff(&unmerged, &bare);
    assert!(
        moved > MOVED,
        "{what}: the adapter moves log-probs by only {moved:e}"
    );
}

/// A model folder's tensors by name: (shape, values as f32).
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

#[track_caller]
fn assert_bit_identical(a: &Tensors, b: &Tensors, name: &str) {
    let (x, y) = (&a[name], &b[name]);
    assert_eq!(x.0, y.0, "{name}: shape");
    let same =
        x.1.iter()
            .zip(&y.1)
            .all(|(p, q)| p.to_bits() == q.to_bits());
    assert!(same, "{name} differs from the base");
}

#[test]
fn an_export_scores_as_the_unmerged_adapter() {
    let (tmp, adapter, base_dir) = trained("export-llama", "llama-tiny", ALL_MODULES);
    let base = Model::load(&base_dir, Device::Cpu).unwrap();
    let lora = load_adapter(&adapter, &base);
    let out = tmp.join("out");
    let ran = export_ok(&base_dir, &adapter, &out, &[]);
    // L layers × 7 linears, the embedding and the head; the norms copied.
    let layers = base.config().num_layers;
    assert!(
        ran.stdout.contains(&format!(
            "merged {} tensors with the adapter's delta, copied {} unchanged",
            7 * layers + 2,
            2 * layers + 1
        )) && ran.stdout.contains("tied embeddings: untied in the base"),
        "{}",
        ran.all()
    );
    assert!(!ran.stderr.contains("warning"), "{}", ran.all());
    assert!(
        ran.stdout.contains(&out.display().to_string()),
        "{}",
        ran.all()
    );

    assert_scores_as(&out, &base, &lora, "llama-tiny, all nine modules");
    // A plain model folder: the weights, the base's config (untied llama: byte for byte) and
    // its other files; no temp files left beside it.
    let mut want: Vec<String> = dir_entries(&base_dir);
    want.sort();
    assert_eq!(dir_entries(&out), want);
    for f in ["config.json", "generation_config.json", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(base_dir.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(dir_entries(tmp.path()), vec!["adapter", "out"]);

    // The step-2 checkpoint is the same adapter: the same bytes.
    let from_checkpoint = tmp.join("from-checkpoint");
    export_ok(
        &base_dir,
        &adapter.join("checkpoint-2"),
        &from_checkpoint,
        &[],
    );
    // --servable vllm: llama loads untied heads, so nothing is left out.
    let servable = tmp.join("servable");
    let ran = export_ok(&base_dir, &adapter, &servable, &["--servable", "vllm"]);
    assert!(
        ran.stdout.contains("nothing more to leave out") && !ran.stdout.contains("left out the"),
        "{}",
        ran.all()
    );
    for dir in [&from_checkpoint, &servable] {
        assert!(
            std::fs::read(dir.join("model.safetensors")).unwrap()
                == std::fs::read(out.join("model.safetensors")).unwrap(),
            "{}",
            dir.display()
        );
    }
}

#[test]
fn left_out_weights_stay_as_the_base_has_them() {
    let (tmp, adapter, base_dir) = trained("export-leave-out", "llama-tiny", ALL_MODULES);
    let base = Model::load(&base_dir, Device::Cpu).unwrap();
    let base_tensors = read_folder_safetensors_f32(&base_dir);
    let lora = load_adapter(&adapter, &base);

    for (flag, embed_out, head_out) in [
        ("embed_tokens,lm_head", true, true),
        ("lm_head", false, true),
        ("embed_tokens", true, false),
    ] {
        let out = tmp.join(format!("out-{flag}"));
        let ran = export_ok(&base_dir, &adapter, &out, &["--leave-out", flag]);
        assert!(
            ran.stdout.contains("left out the delta of"),
            "{}",
            ran.all()
        );
        let got = read_folder_safetensors_f32(&out);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            base_tensors.keys().collect::<Vec<_>>()
        );
        for (name, left_out) in [(EMBED, embed_out), (HEAD, head_out)] {
            if left_out {
                assert_bit_identical(&got, &base_tensors, name);
            } else {
                assert_ne!(got[name].1, base_tensors[name].1, "{flag}: {name} merged");
            }
        }
        let q = "model.layers.0.self_attn.q_proj.weight";
        assert_ne!(got[q].1, base_tensors[q].1, "{flag}: q_proj merged");
        // The export is the adapter without those pairs.
        let mut partial = lora.clone();
        if embed_out {
            partial.embed = None;
        }
        if head_out {
            partial.lm_head = None;
        }
        assert_scores_as(&out, &base, &partial, flag);
    }

    // A module the adapter has no pair for: said, and nothing changes.
    let adapter_q = tmp.join("adapter-q");
    train("llama-tiny", "q_proj,v_proj", &adapter_q);
    let out = tmp.join("out-q");
    let ran = export_ok(&base_dir, &adapter_q, &out, &["--leave-out", "lm_head"]);
    assert!(
        ran.stdout.contains("no lm_head pair")
            && ran
                .stdout
                .contains(&format!("merged {} tensors", 2 * base.config().num_layers)),
        "{}",
        ran.all()
    );
    // An unknown module name is refused by the parser, listing the choices.
    let ran = export_fails(
        &base_dir,
        &adapter_q,
        &tmp.join("never"),
        &["--leave-out", "q_proj"],
    );
    assert!(ran.stderr.contains("embed_tokens"), "{}", ran.all());
    assert!(!tmp.join("never").exists());
}

#[test]
fn servable_vllm_keeps_a_tied_gemma2_tied() {
    // gemma2-oldconfig has no tie_word_embeddings in config.json: Gemma-2's default, tied.
    let name = "gemma2-oldconfig";
    let (tmp, adapter, base_dir) = trained(
        "export-gemma2",
        name,
        "embed_tokens,q_proj,down_proj,lm_head",
    );
    let base = Model::load(&base_dir, Device::Cpu).unwrap();
    assert!(base.config().tie_word_embeddings);
    let lora = load_adapter(&adapter, &base);
    let base_tensors = read_folder_safetensors_f32(&base_dir);
    assert!(!base_tensors.contains_key(HEAD), "a tied checkpoint");

    // Without it: the trained embedding and head differ, so the tie is broken (transformers
    // loads that; vLLM's Gemma-2 does not) — and the report says so.
    let untied = tmp.join("untied");
    let ran = export_ok(&base_dir, &adapter, &untied, &[]);
    assert!(
        ran.stdout.contains("broken") && ran.stdout.contains("--servable vllm"),
        "{}",
        ran.all()
    );
    assert_eq!(
        read_json(&untied.join("config.json"))["tie_word_embeddings"],
        Value::Bool(false)
    );
    assert!(read_folder_safetensors_f32(&untied).contains_key(HEAD));
    assert_scores_as(&untied, &base, &lora, "gemma2, tie broken");

    // With it: the embedding and head deltas are left out, the tie and config.json stay.
    let servable = tmp.join("servable");
    let ran = export_ok(&base_dir, &adapter, &servable, &["--servable", "vllm"]);
    assert!(
        ran.stdout
            .contains("embed_tokens, lm_head: left out for --servable vllm")
            && ran.stdout.contains("requires tied embeddings")
            && ran.stdout.contains("tied embeddings: kept"),
        "{}",
        ran.all()
    );
    assert_eq!(
        std::fs::read(servable.join("config.json")).unwrap(),
        std::fs::read(base_dir.join("config.json")).unwrap(),
        "config.json unchanged: still tied"
    );
    let got = read_folder_safetensors_f32(&servable);
    assert!(!got.contains_key(HEAD), "no separate head written");
    assert_bit_identical(&got, &base_tensors, EMBED);
    let mut partial = lora.clone();
    partial.embed = None;
    partial.lm_head = None;
    assert_scores_as(&servable, &base, &partial, "gemma2, servable");

    // A head pair that is the embedding pair transposed adds one delta to the shared matrix
    // (PEFT's ensure_weight_tying): the tie holds, so nothing is left out and both merge.
    let mut tied = lora.clone();
    let embed = tied.embed.clone().unwrap();
    tied.lm_head = Some(LoraPair {
        a: engine::ops::transpose(&embed.b).unwrap(),
        b: engine::ops::transpose(&embed.a).unwrap(),
    });
    let tied_adapter = tmp.join("adapter-tied");
    train::peft::save_adapter(&tied_adapter, &tied, None).unwrap();
    let one_delta = tmp.join("one-delta");
    let ran = export_ok(
        &base_dir,
        &tied_adapter,
        &one_delta,
        &["--servable", "vllm"],
    );
    assert!(
        ran.stdout
            .contains("adds one delta to the shared embedding and head")
            && !ran.stdout.contains("left out the")
            && ran.stdout.contains("tied embeddings: kept"),
        "{}",
        ran.all()
    );
    assert_eq!(
        std::fs::read(one_delta.join("config.json")).unwrap(),
        std::fs::read(base_dir.join("config.json")).unwrap()
    );
    let got = read_folder_safetensors_f32(&one_delta);
    assert!(!got.contains_key(HEAD));
    assert_ne!(
        got[EMBED].1, base_tensors[EMBED].1,
        "the embedding delta merged"
    );
    assert_scores_as(&one_delta, &base, &tied, "gemma2, one shared delta");

    // An untied Gemma-2 base (gemma2-tiny says tie_word_embeddings: false): vLLM refuses the
    // base itself, so no export can be servable — said, nothing written.
    let adapter2 = tmp.join("adapter-untied-base");
    train("gemma2-tiny", "q_proj", &adapter2);
    let never = tmp.join("never");
    let ran = export_fails(
        &model_dir("gemma2-tiny"),
        &adapter2,
        &never,
        &["--servable", "vllm"],
    );
    assert!(
        ran.stderr.contains("tie_word_embeddings: false") && ran.stderr.contains("config.json"),
        "{}",
        ran.all()
    );
    assert!(!never.exists());
}

#[test]
fn shards_as_save_pretrained_at_max_shard_size() {
    let (tmp, adapter, base_dir) = trained("export-shards", "llama-tiny", ALL_MODULES);
    let single = tmp.join("single");
    export_ok(&base_dir, &adapter, &single, &[]);
    let sharded = tmp.join("sharded");
    // transformers' index for this model at max_shard_size=200_000 (the same tensor sizes
    // whatever the adapter's values): fixtures/train/merged/llama-tiny.json.
    let reference = read_json(&fixture("train/merged/llama-tiny.json"))["sharded"].clone();
    assert_eq!(reference["max_shard_size"], 200_000);
    let ran = export_ok(
        &base_dir,
        &adapter,
        &sharded,
        &["--max-shard-size", "200KB"],
    );
    let files: Vec<String> = reference["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    for f in &files {
        assert!(sharded.join(f).is_file(), "{f}: {}", ran.all());
    }
    assert!(!sharded.join("model.safetensors").exists());
    assert_eq!(
        read_json(&sharded.join("model.safetensors.index.json")),
        reference["index"]
    );
    assert!(
        ran.stdout
            .contains(&format!("in {} files", files.len() + 6)),
        "shards + index + config + 4 copied files: {}",
        ran.all()
    );
    // The same weights as the single file, so the same log-probs exactly.
    assert_eq!(
        read_folder_safetensors_f32(&sharded),
        read_folder_safetensors_f32(&single)
    );
    let b = batch();
    let a = logprobs(&Model::load(&single, Device::Cpu).unwrap(), None, &b);
    let s = logprobs(&Model::load(&sharded, Device::Cpu).unwrap(), None, &b);
    assert_eq!(a, s);

    let ran = export_fails(
        &base_dir,
        &adapter,
        &tmp.join("never"),
        &["--max-shard-size", "5XB"],
    );
    assert!(
        ran.stderr.contains("--max-shard-size") && ran.stderr.contains("5XB"),
        "{}",
        ran.all()
    );
}

/// The lora_grads fixture adapters (PEFT key names, random A and B on all nine modules) have
/// no adapter_config.json: one is written from case.json. Exported by `prefer export`, each
/// scores as PEFT's `merge_and_unload` model did in f64 (fixtures/train/merged, which unties
/// tied bases first, as the export does; llama-ropeparams is bf16, merged and rounded as PEFT
/// does).
#[test]
fn fixture_adapters_export_as_peft_merges_them() {
    for name in [
        "llama-tiny",
        "gemma-tiny",
        "gemma2-oldconfig",
        "qwen2-tiny",
        "mistral-tiny",
        "llama-ropeparams",
    ] {
        let tmp = TempDir::new(&format!("export-fixture-{name}"));
        let src = fixture("train/lora_grads").join(name);
        let case = read_json(&src.join("case.json"));
        assert!(
            !src.join("adapter_config.json").exists(),
            "{name}: has one now"
        );
        let adapter = tmp.join("adapter");
        std::fs::create_dir_all(&adapter).unwrap();
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            adapter.join("adapter_model.safetensors"),
        )
        .unwrap();
        let spec = LoraSpec {
            r: case["r"].as_u64().unwrap() as usize,
            alpha: case["lora_alpha"].as_f64().unwrap() as f32,
            dropout: 0.0,
            use_rslora: false,
            targets: case["target_modules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| LoraTarget::parse(t.as_str().unwrap()).unwrap())
                .collect(),
        };
        let config = train::peft::AdapterConfig {
            spec,
            base_model_name_or_path: Some(model_dir(name).to_string_lossy().into_owned()),
        };
        std::fs::write(adapter.join("adapter_config.json"), config.to_json()).unwrap();

        let out = tmp.join("out");
        export_ok(&model_dir(name), &adapter, &out, &[]);
        let reference = read_json(&fixture("train/merged").join(format!("{name}.json")));
        let packed = testkit::packed_rows(&reference);
        let b = TrainBatch {
            ids: packed.ids,
            lens: packed.lens,
            rows: packed.rows,
            targets: packed.targets,
        };
        let got = logprobs(&Model::load(&out, Device::Cpu).unwrap(), None, &b);
        let want = testkit::f64s(&reference["logprobs"]);
        let d = max_abs_diff(&got, &want);
        assert!(d <= LOGP_TOL, "{name}: {d:e} from PEFT's merged model");
    }
}

#[test]
fn an_existing_folder_is_replaced_only_with_overwrite() {
    let (tmp, adapter, base_dir) = trained("export-overwrite", "llama-tiny", "q_proj,v_proj");
    let out = tmp.join("out");
    export_ok(&base_dir, &adapter, &out, &[]);
    std::fs::write(out.join("stale.txt"), "from before").unwrap();
    let before = std::fs::read(out.join("model.safetensors")).unwrap();

    let ran = export_fails(&base_dir, &adapter, &out, &[]);
    assert!(
        ran.stderr.contains(&out.display().to_string()) && ran.stderr.contains("--overwrite"),
        "{}",
        ran.all()
    );
    assert!(out.join("stale.txt").exists(), "left as it was");

    let ran = export_ok(&base_dir, &adapter, &out, &["--overwrite"]);
    assert!(
        !out.join("stale.txt").exists(),
        "replaced whole: {}",
        ran.all()
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        before
    );
    assert_eq!(
        dir_entries(tmp.path()),
        vec!["adapter", "out"],
        "no temp folders"
    );

    // An empty folder is fine without --overwrite.
    let empty = tmp.join("empty");
    std::fs::create_dir(&empty).unwrap();
    export_ok(&base_dir, &adapter, &empty, &[]);
    assert!(empty.join("model.safetensors").is_file());

    // --overwrite replaces a model folder, never anything else, nor an input.
    let notes = tmp.join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("todo.txt"), "keep me").unwrap();
    let ran = export_fails(&base_dir, &adapter, &notes, &["--overwrite"]);
    assert!(ran.stderr.contains("todo.txt"), "{}", ran.all());
    assert!(notes.join("todo.txt").exists());
    let copy = tmp.join("base-copy");
    std::fs::create_dir(&copy).unwrap();
    for f in dir_entries(&base_dir) {
        std::fs::copy(base_dir.join(&f), copy.join(&f)).unwrap();
    }
    let ran = export_fails(&copy, &adapter, &copy, &["--overwrite"]);
    assert!(ran.stderr.contains("an input"), "{}", ran.all());
    assert_eq!(dir_entries(&copy), dir_entries(&base_dir));
    // A file where the folder should be.
    let file = tmp.join("file");
    std::fs::write(&file, "x").unwrap();
    let ran = export_fails(&base_dir, &adapter, &file, &["--overwrite"]);
    assert!(ran.stderr.contains("not a folder"), "{}", ran.all());
}

#[test]
fn bad_inputs_are_refused_naming_the_file() {
    let (tmp, adapter, base_dir) = trained("export-bad", "llama-tiny", "q_proj,lm_head");
    let out = tmp.join("out");

    // No such adapter folder.
    let missing = tmp.join("no-such-adapter");
    let ran = export_fails(&base_dir, &missing, &out, &[]);
    assert!(
        ran.stderr.contains(&missing.display().to_string()),
        "{}",
        ran.all()
    );
    // A folder that is not an adapter, but holds checkpoints: pointed at one.
    let runs = tmp.join("runs");
    std::fs::create_dir_all(runs.join("checkpoint-2")).unwrap();
    std::fs::create_dir_all(runs.join("checkpoint-10")).unwrap();
    let ran = export_fails(&base_dir, &runs, &out, &[]);
    assert!(
        ran.stderr.contains("adapter_config.json") && ran.stderr.contains("checkpoint-10"),
        "{}",
        ran.all()
    );
    // No such model.
    let ran = export_fails(&tmp.join("no-model"), &adapter, &out, &[]);
    assert!(ran.stderr.contains("no-model"), "{}", ran.all());
    // A model folder without config.json.
    let bare = tmp.join("bare");
    std::fs::create_dir(&bare).unwrap();
    let ran = export_fails(&bare, &adapter, &out, &[]);
    assert!(
        ran.stderr
            .contains(&bare.join("config.json").display().to_string()),
        "{}",
        ran.all()
    );
    // An adapter for another architecture (llama-tiny's onto qwen2-tiny): the tensor that
    // does not fit, in its file.
    let ran = export_fails(&model_dir("qwen2-tiny"), &adapter, &out, &[]);
    assert!(
        ran.stderr.contains("adapter_model.safetensors")
            && ran.stderr.contains("qwen2-tiny (qwen2")
            && ran.stderr.contains("shape"),
        "{}",
        ran.all()
    );
    // The adapter's weights file truncated.
    let broken = tmp.join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        broken.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        broken.join("adapter_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let ran = export_fails(&base_dir, &broken, &out, &[]);
    assert!(
        ran.stderr.contains(
            &broken
                .join("adapter_model.safetensors")
                .display()
                .to_string()
        ),
        "{}",
        ran.all()
    );
    assert!(!out.exists(), "no failed run wrote anything");
    assert_eq!(
        dir_entries(tmp.path()),
        vec!["adapter", "bare", "broken", "runs"],
        "no temp folders left"
    );
}

#[test]
fn an_adapter_trained_on_another_folder_is_merged_with_a_warning() {
    let (tmp, adapter, _) = trained("export-other-base", "llama-tiny", "q_proj,v_proj");
    // The same weights in another folder (another name).
    let copy = tmp.join("my-llama");
    std::fs::create_dir(&copy).unwrap();
    for f in dir_entries(&model_dir("llama-tiny")) {
        std::fs::copy(model_dir("llama-tiny").join(&f), copy.join(&f)).unwrap();
    }
    let out = tmp.join("out");
    let ran = export_ok(&copy, &adapter, &out, &[]);
    assert!(
        ran.stderr.contains("warning")
            && ran.stderr.contains("llama-tiny")
            && ran.stderr.contains("my-llama"),
        "{}",
        ran.all()
    );
    assert!(out.join("model.safetensors").is_file());
}
