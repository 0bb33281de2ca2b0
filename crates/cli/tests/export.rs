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

use engine::{Device, Tensor};
use model::{Dropout, Lora, LoraPair, LoraSpec, LoraTarget, Model, TrainBatch};
use serde_json::Value;
use testkit::{TempDir, fixture, prefer, read_safetensors_f32, run};

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

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// The merged export scores `batch` as the base with `lora` does, and not as the bare base.
#[track_caller]
fn assert_scores_as(out: &Path, base: &Model, lora: &Lora, what: &str) {
    let b = batch();
    let merged = logprobs(&Model::load(out, Device::Cpu).unwrap(), None, &b);
    let unmerged = logprobs(base, Some(lora), &b);
    let bare = logprobs(base, None, &b);
    let d = max_diff(&merged, &unmerged);
    assert!(d <= LOGP_TOL, "{what}: merged vs unmerged differ by {d:e}");
    let moved = max_diff(&unmerged, &bare);
    assert!(
        moved > MOVED,
        "{what}: the adapter moves log-probs by only {moved:e}"
    );
}

/// Every tensor of the model folder's safetensors files, by name.
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;
fn tensors(dir: &Path) -> Tensors {
    let mut all = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            all.extend(read_safetensors_f32(&path));
        }
    }
    all
}

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

/// `x` [m, n] transposed to [n, m].
fn transpose(x: &Tensor) -> Tensor {
    let (&[m, n], v) = (x.shape(), x.to_vec().unwrap()) else {
        panic!("not a matrix: {:?}", x.shape());
    };
    let t: Vec<f32> = (0..n)
        .flat_map(|j| (0..m).map(move |i| (i, j)))
        .map(|(i, j)| v[i * n + j])
        .collect();
    Tensor::from_vec(t, &[n, m]).unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn an_export_scores_as_the_unmerged_adapter() {
    let tmp = TempDir::new("export-llama");
    let adapter = tmp.join("adapter");
    train("llama-tiny", ALL_MODULES, &adapter);
    let base_dir = model_dir("llama-tiny");
    let base = Model::load(&base_dir, Device::Cpu).unwrap();
    let lora = load_adapter(&adapter, &base);
    let out = tmp.join("out");
    let ran = run(&mut export(&base_dir, &adapter, &out, &[])).ok();
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
    let mut want: Vec<String> = entries(&base_dir);
    want.sort();
    assert_eq!(entries(&out), want);
    for f in ["config.json", "generation_config.json", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(base_dir.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(entries(tmp.path()), vec!["adapter", "out"]);

    // The step-2 checkpoint is the same adapter: the same bytes.
    let from_checkpoint = tmp.join("from-checkpoint");
    run(&mut export(
        &base_dir,
        &adapter.join("checkpoint-2"),
        &from_checkpoint,
        &[],
    ))
    .ok();
    // --servable vllm: llama loads untied heads, so nothing is left out.
    let servable = tmp.join("servable");
    let ran = run(&mut export(
        &base_dir,
        &adapter,
        &servable,
        &["--servable", "vllm"],
    ))
    .ok();
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
    let tmp = TempDir::new("export-leave-out");
    let adapter = tmp.join("adapter");
    train("llama-tiny", ALL_MODULES, &adapter);
    let base_dir = model_dir("llama-tiny");
    let base = Model::load(&base_dir, Device::Cpu).unwrap();
    let base_tensors = tensors(&base_dir);
    let lora = load_adapter(&adapter, &base);

    for (flag, embed_out, head_out) in [
        ("embed_tokens,lm_head", true, true),
        ("lm_head", false, true),
        ("embed_tokens", true, false),
    ] {
        let out = tmp.join(format!("out-{flag}"));
        let ran = run(&mut export(
            &base_dir,
            &adapter,
            &out,
            &["--leave-out", flag],
        ))
        .ok();
        assert!(
            ran.stdout.contains("left out the delta of"),
            "{}",
            ran.all()
        );
        let got = tensors(&out);
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
    let ran = run(&mut export(
        &base_dir,
        &adapter_q,
        &out,
        &["--leave-out", "lm_head"],
    ))
    .ok();
    assert!(
        ran.stdout.contains("no lm_head pair")
            && ran
                .stdout
                .contains(&format!("merged {} tensors", 2 * base.config().num_layers)),
        "{}",
        ran.all()
    );
    // An unknown module name is refused by the parser, listing the choices.
    let ran = run(&mut export(
        &base_dir,
        &adapter_q,
        &tmp.join("never"),
        &["--leave-out", "q_proj"],
    ))
    .failed();
    assert!(ran.stderr.contains("embed_tokens"), "{}", ran.all());
    assert!(!tmp.join("never").exists());
}

#[test]
fn servable_vllm_keeps_a_tied_gemma2_tied() {
    // gemma2-oldconfig has no tie_word_embeddings in config.json: Gemma-2's default, tied.
    let name = "gemma2-oldconfig";
    let tmp = TempDir::new("export-gemma2");
    let adapter = tmp.join("adapter");
    train(name, "embed_tokens,q_proj,down_proj,lm_head", &adapter);
    let base_dir = model_dir(name);
    let base = Model::load(&base_dir, Device::Cpu).unwrap();
    assert!(base.config().tie_word_embeddings);
    let lora = load_adapter(&adapter, &base);
    let base_tensors = tensors(&base_dir);
    assert!(!base_tensors.contains_key(HEAD), "a tied checkpoint");

    // Without it: the trained embedding and head differ, so the tie is broken (transformers
    // loads that; vLLM's Gemma-2 does not) — and the report says so.
    let untied = tmp.join("untied");
    let ran = run(&mut export(&base_dir, &adapter, &untied, &[])).ok();
    assert!(
        ran.stdout.contains("broken") && ran.stdout.contains("--servable vllm"),
        "{}",
        ran.all()
    );
    assert_eq!(
        read_json(&untied.join("config.json"))["tie_word_embeddings"],
        Value::Bool(false)
    );
    assert!(tensors(&untied).contains_key(HEAD));
    assert_scores_as(&untied, &base, &lora, "gemma2, tie broken");

    // With it: the embedding and head deltas are left out, the tie and config.json stay.
    let servable = tmp.join("servable");
    let ran = run(&mut export(
        &base_dir,
        &adapter,
        &servable,
        &["--servable", "vllm"],
    ))
    .ok();
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
    let got = tensors(&servable);
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
        a: transpose(&embed.b),
        b: transpose(&embed.a),
    });
    let tied_adapter = tmp.join("adapter-tied");
    train::peft::save_adapter(&tied_adapter, &tied, None).unwrap();
    let one_delta = tmp.join("one-delta");
    let ran = run(&mut export(
        &base_dir,
        &tied_adapter,
        &one_delta,
        &["--servable", "vllm"],
    ))
    .ok();
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
    let got = tensors(&one_delta);
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
    let ran = run(&mut export(
        &model_dir("gemma2-tiny"),
        &adapter2,
        &never,
        &["--servable", "vllm"],
    ))
    .failed();
    assert!(
        ran.stderr.contains("tie_word_embeddings: false") && ran.stderr.contains("config.json"),
        "{}",
        ran.all()
    );
    assert!(!never.exists());
}

#[test]
fn shards_as_save_pretrained_at_max_shard_size() {
    let tmp = TempDir::new("export-shards");
    let adapter = tmp.join("adapter");
    train("llama-tiny", ALL_MODULES, &adapter);
    let base_dir = model_dir("llama-tiny");
    let single = tmp.join("single");
    run(&mut export(&base_dir, &adapter, &single, &[])).ok();
    let sharded = tmp.join("sharded");
    // transformers' index for this model at max_shard_size=200_000 (the same tensor sizes
    // whatever the adapter's values): fixtures/train/merged/llama-tiny.json.
    let reference = read_json(&fixture("train/merged/llama-tiny.json"))["sharded"].clone();
    assert_eq!(reference["max_shard_size"], 200_000);
    let ran = run(&mut export(
        &base_dir,
        &adapter,
        &sharded,
        &["--max-shard-size", "200KB"],
    ))
    .ok();
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
    assert_eq!(tensors(&sharded), tensors(&single));
    let b = batch();
    let a = logprobs(&Model::load(&single, Device::Cpu).unwrap(), None, &b);
    let s = logprobs(&Model::load(&sharded, Device::Cpu).unwrap(), None, &b);
    assert_eq!(a, s);

    let ran = run(&mut export(
        &base_dir,
        &adapter,
        &tmp.join("never"),
        &["--max-shard-size", "5XB"],
    ))
    .failed();
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
        run(&mut export(&model_dir(name), &adapter, &out, &[])).ok();
        let reference = read_json(&fixture("train/merged").join(format!("{name}.json")));
        let seqs: Vec<Vec<u32>> = reference["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(testkit::u32s)
            .collect();
        let mut starts = vec![0];
        for s in &seqs {
            starts.push(starts.last().unwrap() + s.len());
        }
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for r in reference["rows"].as_array().unwrap() {
            let at =
                starts[r["seq"].as_u64().unwrap() as usize] + r["pos"].as_u64().unwrap() as usize;
            for t in testkit::u32s(&r["targets"]) {
                rows.push(at);
                targets.push(t);
            }
        }
        let b = TrainBatch {
            ids: seqs.concat(),
            lens: seqs.iter().map(Vec::len).collect(),
            rows,
            targets,
        };
        let got = logprobs(&Model::load(&out, Device::Cpu).unwrap(), None, &b);
        let want = testkit::f64s(&reference["logprobs"]);
        let d = max_diff(&got, &want);
        assert!(d <= LOGP_TOL, "{name}: {d:e} from PEFT's merged model");
    }
}

#[test]
fn an_existing_folder_is_replaced_only_with_overwrite() {
    let tmp = TempDir::new("export-overwrite");
    let adapter = tmp.join("adapter");
    train("llama-tiny", "q_proj,v_proj", &adapter);
    let base_dir = model_dir("llama-tiny");
    let out = tmp.join("out");
    run(&mut export(&base_dir, &adapter, &out, &[])).ok();
    std::fs::write(out.join("stale.txt"), "from before").unwrap();
    let before = std::fs::read(out.join("model.safetensors")).unwrap();

    let ran = run(&mut export(&base_dir, &adapter, &out, &[])).failed();
    assert!(
        ran.stderr.contains(&out.display().to_string()) && ran.stderr.contains("--overwrite"),
        "{}",
        ran.all()
    );
    assert!(out.join("stale.txt").exists(), "left as it was");

    let ran = run(&mut export(&base_dir, &adapter, &out, &["--overwrite"])).ok();
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
        entries(tmp.path()),
        vec!["adapter", "out"],
        "no temp folders"
    );

    // An empty folder is fine without --overwrite.
    let empty = tmp.join("empty");
    std::fs::create_dir(&empty).unwrap();
    run(&mut export(&base_dir, &adapter, &empty, &[])).ok();
    assert!(empty.join("model.safetensors").is_file());

    // --overwrite replaces a model folder, never anything else, nor an input.
    let notes = tmp.join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("todo.txt"), "keep me").unwrap();
    let ran = run(&mut export(&base_dir, &adapter, &notes, &["--overwrite"])).failed();
    assert!(ran.stderr.contains("todo.txt"), "{}", ran.all());
    assert!(notes.join("todo.txt").exists());
    let copy = tmp.join("base-copy");
    std::fs::create_dir(&copy).unwrap();
    for f in entries(&base_dir) {
        std::fs::copy(base_dir.join(&f), copy.join(&f)).unwrap();
    }
    let ran = run(&mut export(&copy, &adapter, &copy, &["--overwrite"])).failed();
    assert!(ran.stderr.contains("an input"), "{}", ran.all());
    assert_eq!(entries(&copy), entries(&base_dir));
    // A file where the folder should be.
    let file = tmp.join("file");
    std::fs::write(&file, "x").unwrap();
    let ran = run(&mut export(&base_dir, &adapter, &file, &["--overwrite"])).failed();
    assert!(ran.stderr.contains("not a folder"), "{}", ran.all());
}

#[test]
fn bad_inputs_are_refused_naming_the_file() {
    let tmp = TempDir::new("export-bad");
    let adapter = tmp.join("adapter");
    train("llama-tiny", "q_proj,lm_head", &adapter);
    let base_dir = model_dir("llama-tiny");
    let out = tmp.join("out");

    // No such adapter folder.
    let missing = tmp.join("no-such-adapter");
    let ran = run(&mut export(&base_dir, &missing, &out, &[])).failed();
    assert!(
        ran.stderr.contains(&missing.display().to_string()),
        "{}",
        ran.all()
    );
    // A folder that is not an adapter, but holds checkpoints: pointed at one.
    let runs = tmp.join("runs");
    std::fs::create_dir_all(runs.join("checkpoint-2")).unwrap();
    std::fs::create_dir_all(runs.join("checkpoint-10")).unwrap();
    let ran = run(&mut export(&base_dir, &runs, &out, &[])).failed();
    assert!(
        ran.stderr.contains("adapter_config.json") && ran.stderr.contains("checkpoint-10"),
        "{}",
        ran.all()
    );
    // No such model.
    let ran = run(&mut export(&tmp.join("no-model"), &adapter, &out, &[])).failed();
    assert!(ran.stderr.contains("no-model"), "{}", ran.all());
    // A model folder without config.json.
    let bare = tmp.join("bare");
    std::fs::create_dir(&bare).unwrap();
    let ran = run(&mut export(&bare, &adapter, &out, &[])).failed();
    assert!(
        ran.stderr
            .contains(&bare.join("config.json").display().to_string()),
        "{}",
        ran.all()
    );
    // An adapter for another architecture (llama-tiny's onto qwen2-tiny): the tensor that
    // does not fit, in its file.
    let ran = run(&mut export(&model_dir("qwen2-tiny"), &adapter, &out, &[])).failed();
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
    let ran = run(&mut export(&base_dir, &broken, &out, &[])).failed();
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
        entries(tmp.path()),
        vec!["adapter", "bare", "broken", "runs"],
        "no temp folders left"
    );
}

#[test]
fn an_adapter_trained_on_another_folder_is_merged_with_a_warning() {
    let tmp = TempDir::new("export-other-base");
    let adapter = tmp.join("adapter");
    train("llama-tiny", "q_proj,v_proj", &adapter);
    // The same weights in another folder (another name).
    let copy = tmp.join("my-llama");
    std::fs::create_dir(&copy).unwrap();
    for f in entries(&model_dir("llama-tiny")) {
        std::fs::copy(model_dir("llama-tiny").join(&f), copy.join(&f)).unwrap();
    }
    let out = tmp.join("out");
    let ran = run(&mut export(&copy, &adapter, &out, &[])).ok();
    assert!(
        ran.stderr.contains("warning")
            && ran.stderr.contains("llama-tiny")
            && ran.stderr.contains("my-llama"),
        "{}",
        ran.all()
    );
    assert!(out.join("model.safetensors").is_file());
}
