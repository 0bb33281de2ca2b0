//! `merge_adapter` (what `prefer export` writes) against PEFT 0.21's `merge_and_unload` +
//! transformers 5.17's `save_pretrained` (fixtures/train/merged, tools/gen_merge_fixtures.py),
//! on the lora_grads adapters (r 4, alpha 8, all nine modules, random A and B).
//!
//! Checked per fixture model (tied gemma, gemma2, qwen2 with biases, bf16 llama; untied
//! llama; mistral from a sharded checkpoint):
//! - the files: the same names, and the safetensors header transformers writes (tensor
//!   names, dtypes, shapes, data offsets, key order, `{"format": "pt"}`);
//! - the weights: every sampled value within a floating-point error bound of a merge in
//!   f64 (the f32 round-off of the rank-4 product and the add, then one rounding step of the
//!   stored dtype — two for the embedding's bf16 delta, as PEFT rounds it first), and of
//!   PEFT's within twice that (most are bit-equal: the count is printed),
//!   per-tensor sums within that bound, and every tensor without a delta byte-identical to
//!   the base;
//! - the merged model, loaded with `Model::load`: log-probs within 1e-4 of PEFT's merged
//!   model in f64 (our CPU runs f32);
//! - the merged model against the unmerged one (`lora_forward` with the adapter): within
//!   1e-4 for f32 checkpoints; for the bf16 one, within 0.15, the effect of rounding the
//!   merged weights to bf16 (measured 6e-2: these random fixtures move by hundredths for
//!   one bf16 rounding of their weights, docs/precision.md; the 1e-4 check against PEFT's
//!   merged bf16 model is the sharp one);
//! - ties, the leave-out options, sharding, and errors, in their own tests.
//!
//! With PREFER_MERGE_KEEP=<dir> the exports are kept under <dir>/<model>/, for
//! `tools/gen_merge_fixtures.py --check-export <dir>/<model> --model <model>` (transformers
//! loading our files).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;

use engine::{Device, Tensor};
use model::{
    Dropout, Lora, LoraPair, LoraTarget, MergeOptions, MergeReport, Model, TrainBatch,
    merge_adapter,
};
use serde_json::Value;
use testkit::{
    TempDir, dir_entries, f64s, fixture, max_abs_diff, packed_rows, read_folder_safetensors_f32,
    read_json,
};

const LOGP_TOL: f64 = 1e-4;
/// Merged vs unmerged on a bf16 checkpoint: the merged weights are rounded to bf16.
const BF16_MERGE_TOL: f64 = 0.15;
const MODELS: [&str; 6] = [
    "gemma-tiny",
    "gemma2-oldconfig",
    "llama-tiny",
    "qwen2-tiny",
    "llama-ropeparams",
    "mistral-tiny",
];

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn base_dir(name: &str) -> PathBuf {
    fixture("models").join(name)
}

/// A fixture model, its lora_grads adapter and the merged reference of both.
struct Fixture {
    /// fixtures/train/merged/<name>.json: PEFT's merge.
    reference: Value,
    base: PathBuf,
    model: Model,
    /// PEFT's key names, as a `Lora` of the model's shapes.
    lora: Lora,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let base = base_dir(name);
        let model = Model::load(&base, Device::Cpu).unwrap();
        let lora = common::load_adapter(&fixture("train/lora_grads").join(name), &model, 0.0);
        Fixture {
            reference: read_json(&fixture("train/merged").join(format!("{name}.json"))),
            base,
            model,
            lora,
        }
    }
}

/// The fixture's sequences packed into one batch; a scored row per (position, target).
fn batch(reference: &Value) -> TrainBatch {
    let packed = packed_rows(reference);
    TrainBatch {
        ids: packed.ids,
        lens: packed.lens,
        rows: packed.rows,
        targets: packed.targets,
    }
}

fn logprobs(model: &Model, batch: &TrainBatch, lora: Option<&Lora>) -> Vec<f64> {
    let (stats, _) = model.lora_forward(batch, lora, Dropout::Off).unwrap();
    stats.logp.iter().map(|&x| x as f64).collect()
}

/// The merged model at `out` scores the fixture's batch as `model` with `lora` does, within
/// [`LOGP_TOL`]; returned for further checks.
#[track_caller]
fn assert_scores_as_unmerged(out: &Path, reference: &Value, model: &Model, lora: &Lora) -> Model {
    let merged = Model::load(out, Device::Cpu).unwrap();
    let batch = batch(reference);
    let err = max_abs_diff(
        &logprobs(&merged, &batch, None),
        &logprobs(model, &batch, Some(lora)),
    );
    assert!(err <= LOGP_TOL, "{err:e}");
    merged
}

/// A safetensors file's header, keys in file order.
fn header(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0, "header padded to 8 bytes");
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

/// Every tensor of a model folder (single file or shards), as f32, with its file's dtype.
fn folder_tensors(dir: &Path) -> (Tensors, BTreeMap<String, String>) {
    let mut dtypes = BTreeMap::new();
    for file in dir_entries(dir) {
        if file.ends_with(".safetensors") {
            for (name, info) in header(&dir.join(file)).as_object().unwrap() {
                if name != "__metadata__" {
                    dtypes.insert(name.clone(), info["dtype"].as_str().unwrap().to_string());
                }
            }
        }
    }
    (read_folder_safetensors_f32(dir), dtypes)
}

/// HF's weight name of each LoRA pair, with the pair and whether it is the embedding's.
fn pairs_by_weight(lora: &Lora) -> BTreeMap<String, (bool, Vec<f32>, Vec<f32>, usize)> {
    lora.pairs()
        .into_iter()
        .map(|(layer, t, pair)| {
            let name = match (layer, t) {
                (_, LoraTarget::EmbedTokens) => "model.embed_tokens.weight".to_string(),
                (_, LoraTarget::LmHead) => "lm_head.weight".to_string(),
                (Some(i), t) => {
                    let block = match t {
                        LoraTarget::GateProj | LoraTarget::UpProj | LoraTarget::DownProj => "mlp",
                        _ => "self_attn",
                    };
                    format!("model.layers.{i}.{block}.{t}.weight")
                }
                (None, t) => panic!("{t}"),
            };
            let embedding = t == LoraTarget::EmbedTokens;
            let r = pair.a.shape()[0];
            (
                name,
                (
                    embedding,
                    pair.a.to_vec().unwrap(),
                    pair.b.to_vec().unwrap(),
                    r,
                ),
            )
        })
        .collect()
}

/// Element `i` of a pair's delta in f64, and Σ_k |term_k| · s (the scale of its f32
/// round-off). Linear: Δ [out, in] = s·B·A; embedding: Δ [V, C] = s·(B·A)ᵀ.
fn delta_f64(
    pair: &(bool, Vec<f32>, Vec<f32>, usize),
    cols: usize,
    i: usize,
    s: f64,
) -> (f64, f64) {
    let (embedding, a, b, r) = pair;
    let (row, col) = (i / cols, i % cols);
    let terms: Vec<f64> = (0..*r)
        .map(|k| {
            if *embedding {
                let v = a.len() / r;
                a[k * v + row] as f64 * b[col * r + k] as f64
            } else {
                b[row * r + k] as f64 * a[k * cols + col] as f64
            }
        })
        .collect();
    (
        s * terms.iter().sum::<f64>(),
        s * terms.iter().map(|t| t.abs()).sum::<f64>(),
    )
}

/// The unit in the last place of `x` in `dtype` (the rounding step around it).
fn ulp(x: f64, dtype: &str) -> f64 {
    let mantissa_bits = match dtype {
        "BF16" => 7,
        "F16" => 10,
        "F32" => 23,
        other => panic!("dtype {other}"),
    };
    let exp = if x == 0.0 {
        -126
    } else {
        x.abs().log2().floor() as i32
    };
    2f64.powi(exp.max(-126) - mantissa_bits)
}

fn err_text(r: model::Result<MergeReport>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn merged_models_match_peft() {
    for name in MODELS {
        check_against_peft(name);
    }
}

fn check_against_peft(name: &str) {
    let Fixture {
        reference,
        base,
        model,
        lora,
    } = Fixture::load(name);
    let tmp = TempDir::new(&format!("merge-{name}"));
    let out = tmp.join("export"); // missing: merge_adapter creates it
    let report = merge_adapter(&base, &lora, &out, &MergeOptions::default()).unwrap();

    // Files: the weights, config.json and every other file of the base.
    let mut want_files: Vec<String> = dir_entries(&base)
        .into_iter()
        .filter(|f| !f.ends_with(".safetensors") && !f.ends_with(".index.json"))
        .collect();
    want_files.push("model.safetensors".into());
    want_files.sort();
    assert_eq!(report.files, want_files, "{name}");
    assert_eq!(dir_entries(&out), want_files, "{name}: no temp files left");
    let sizes: u64 = want_files
        .iter()
        .map(|f| std::fs::metadata(out.join(f)).unwrap().len())
        .sum();
    assert_eq!(report.bytes_written, sizes, "{name}");
    for f in &want_files {
        if f != "config.json" && f != "model.safetensors" {
            assert_eq!(
                std::fs::read(out.join(f)).unwrap(),
                std::fs::read(base.join(f)).unwrap(),
                "{name}: {f} copied"
            );
        }
    }

    // The header transformers writes, key order included.
    let ours = header(&out.join("model.safetensors"));
    let theirs = &reference["header"];
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&ours), keys(theirs), "{name}: header order");
    assert_eq!(&ours, theirs, "{name}: header");

    // Ties and config.json.
    let tied = reference["base_tied"].as_bool().unwrap();
    assert_eq!(report.tie_broken, tied, "{name}");
    let mut config = read_json(&out.join("config.json"));
    let mut base_config = read_json(&base.join("config.json"));
    if tied {
        assert_eq!(config["tie_word_embeddings"], Value::Bool(false), "{name}");
        for c in [&mut config, &mut base_config] {
            c.as_object_mut().unwrap().remove("tie_word_embeddings");
        }
        assert_eq!(config, base_config, "{name}: only the tie changes");
    } else {
        assert_eq!(
            std::fs::read(out.join("config.json")).unwrap(),
            std::fs::read(base.join("config.json")).unwrap(),
            "{name}: config.json copied"
        );
    }

    // Weights: merged ones against PEFT's, the rest byte-identical to the base.
    let pairs = pairs_by_weight(&lora);
    let mut want_merged: Vec<String> = pairs.keys().cloned().collect();
    want_merged.sort();
    let mut merged = report.merged.clone();
    merged.sort();
    assert_eq!(merged, want_merged, "{name}");
    let (got, dtypes) = folder_tensors(&out);
    let want = reference["tensors"].as_object().unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{name}"
    );
    assert_eq!(report.copied + report.merged.len(), got.len(), "{name}");
    let (base_tensors, _) = folder_tensors(&base);
    let scaling = lora.spec.scaling() as f64;
    let (mut exact, mut samples) = (0, 0);
    for (tname, w) in want {
        let dtype = &dtypes[tname];
        let (shape, values) = &got[tname];
        assert_eq!(
            shape.as_slice(),
            testkit::u64s(&w["shape"])
                .iter()
                .map(|&x| x as usize)
                .collect::<Vec<_>>(),
            "{name} {tname}"
        );
        // The base value under each sample (an untied head starts from the embedding).
        let source = if base_tensors.contains_key(tname) && !(tied && tname == "lm_head.weight") {
            tname.as_str()
        } else {
            "model.embed_tokens.weight"
        };
        let base_values = &base_tensors[source].1;
        let cols = *shape.last().unwrap();
        for smp in w["samples"].as_array().unwrap() {
            // Every stored value is an f32; the round trip through f32 also undoes serde_json's
            // last-bit error in parsing f64 text.
            let i = smp[0].as_u64().unwrap() as usize;
            let v = smp[1].as_f64().unwrap() as f32 as f64;
            let ours = values[i] as f64;
            let w0 = base_values[i] as f64;
            // Ours and PEFT's each round Δ's R products, their sum, the scaling and W + Δ
            // in f32 (error ≤ (R + 2)·2⁻²⁴·(s·Σ|terms| + |W'|)), then round to the stored
            // dtype (one step there, and one for Δ itself on the embedding): against the
            // f64 merge, and each other, within that.
            let (tol, exact_ref) = match pairs.get(tname.as_str()) {
                Some(pair) if report.merged.contains(tname) => {
                    let (d, terms) = delta_f64(pair, cols, i, scaling);
                    let f32_err = (pair.3 + 2) as f64 * 2f64.powi(-24) * (terms + (w0 + d).abs());
                    let rounding = if dtype == "F32" {
                        0.0
                    } else {
                        ulp(w0 + d, dtype) + if pair.0 { ulp(d, dtype) } else { 0.0 }
                    };
                    (f32_err + rounding, w0 + d)
                }
                _ => (0.0, w0),
            };
            assert!(
                (ours - exact_ref).abs() <= tol && (ours - v).abs() <= 2.0 * tol,
                "{name} {tname}[{i}]: ours {ours}, PEFT {v}, f64 merge {exact_ref} \
                 (bound {tol:e}, {dtype})"
            );
            exact += (ours == v) as usize;
            samples += 1;
        }
        let abs_sum = w["abs_sum"].as_f64().unwrap();
        let sum: f64 = values.iter().map(|&x| x as f64).sum();
        let bound = abs_sum * ulp(1.0, dtype);
        assert!(
            (sum - w["sum"].as_f64().unwrap()).abs() <= bound,
            "{name} {tname}: sum {sum}, PEFT {} (bound {bound:e})",
            w["sum"]
        );
        if !report.merged.contains(tname) {
            assert_eq!(values, base_values, "{name} {tname} unchanged");
        }
    }

    // The merged model against PEFT's, and against the unmerged adapter.
    let batch = batch(&reference);
    let merged_model = Model::load(&out, Device::Cpu).unwrap();
    assert!(!merged_model.config().tie_word_embeddings, "{name}");
    let lp = logprobs(&merged_model, &batch, None);
    let err = max_abs_diff(&lp, &f64s(&reference["logprobs"]));
    assert!(err <= LOGP_TOL, "{name}: merged log-probs vs PEFT: {err:e}");
    let unmerged = logprobs(&model, &batch, Some(&lora));
    let bf16 = dtypes.values().any(|d| d == "BF16");
    let tol = if bf16 { BF16_MERGE_TOL } else { LOGP_TOL };
    let drift = max_abs_diff(&lp, &unmerged);
    assert!(
        drift <= tol,
        "{name}: merged vs unmerged: {drift:e} > {tol:e}"
    );
    println!(
        "{name}: {}/{} sampled weights bit-equal to PEFT's, log-probs vs PEFT {err:.1e}, \
         merged vs unmerged {drift:.1e}",
        exact, samples
    );

    if let Some(keep) = std::env::var_os("PREFER_MERGE_KEEP") {
        let dst = PathBuf::from(keep).join(name);
        std::fs::create_dir_all(&dst).unwrap();
        for f in &want_files {
            std::fs::copy(out.join(f), dst.join(f)).unwrap();
        }
    }
}

#[test]
fn shards_as_transformers_does() {
    let name = "llama-tiny";
    let Fixture {
        reference,
        base,
        lora,
        ..
    } = Fixture::load(name);
    let sharded = &reference["sharded"];
    let tmp = TempDir::new("merge-sharded");
    let options = MergeOptions {
        max_shard_bytes: sharded["max_shard_size"].as_u64().unwrap(),
        ..MergeOptions::default()
    };
    let report = merge_adapter(&base, &lora, &tmp.join("out"), &options).unwrap();
    let shards: Vec<String> = report
        .files
        .iter()
        .filter(|f| f.ends_with(".safetensors"))
        .cloned()
        .collect();
    let want_shards: Vec<String> = sharded["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    assert_eq!(shards, want_shards);
    assert!(
        report
            .files
            .contains(&"model.safetensors.index.json".to_string())
    );
    let index_text = std::fs::read_to_string(tmp.join("out/model.safetensors.index.json")).unwrap();
    let index: Value = serde_json::from_str(&index_text).unwrap();
    assert_eq!(index, sharded["index"]);
    // json.dumps(indent=2, sort_keys=True) + "\n": two-space indent, sorted keys, one newline.
    assert!(index_text.starts_with("{\n  \"metadata\": {\n    \"total_parameters\": "));
    assert!(index_text.ends_with("}\n") && !index_text.ends_with("\n\n"));

    // The same tensors as the single-file export, and the same model.
    let single = tmp.join("single");
    merge_adapter(&base, &lora, &single, &MergeOptions::default()).unwrap();
    assert_eq!(folder_tensors(&tmp.join("out")), folder_tensors(&single));
    let batch = batch(&reference);
    let a = logprobs(
        &Model::load(&tmp.join("out"), Device::Cpu).unwrap(),
        &batch,
        None,
    );
    let b = logprobs(&Model::load(&single, Device::Cpu).unwrap(), &batch, None);
    assert_eq!(a, b);
}

/// `f`'s adapter merged with `options` into `<tmp>/out`: the temp folder and the report.
fn merge_into_temp(f: &Fixture, tag: &str, options: &MergeOptions) -> (TempDir, MergeReport) {
    let tmp = TempDir::new(tag);
    let report = merge_adapter(&f.base, &f.lora, &tmp.join("out"), options).unwrap();
    (tmp, report)
}

/// The adapter without some of its pairs (what the merge leaves out, for the unmerged side).
fn without(lora: &Lora, embed: bool, head: bool) -> Lora {
    let mut l = lora.clone();
    if embed {
        l.embed = None;
    }
    if head {
        l.lm_head = None;
    }
    l
}

#[test]
fn leaving_out_embedding_and_head_keeps_the_tie() {
    let f = Fixture::load("gemma-tiny");
    let options = MergeOptions {
        leave_out_embed_tokens: true,
        leave_out_lm_head: true,
        ..MergeOptions::default()
    };
    let (tmp, report) = merge_into_temp(&f, "merge-leave-out", &options);
    assert!(!report.tie_broken);
    assert_eq!(
        report.left_out,
        vec!["model.embed_tokens.weight", "lm_head.weight"]
    );
    assert!(
        !report
            .merged
            .iter()
            .any(|n| n.contains("embed") || n.contains("lm_head"))
    );
    assert_eq!(
        std::fs::read(tmp.join("out/config.json")).unwrap(),
        std::fs::read(f.base.join("config.json")).unwrap(),
        "config.json untouched: still tied"
    );
    let (got, _) = folder_tensors(&tmp.join("out"));
    let (base_tensors, _) = folder_tensors(&f.base);
    assert!(!got.contains_key("lm_head.weight"));
    assert_eq!(
        got["model.embed_tokens.weight"],
        base_tensors["model.embed_tokens.weight"]
    );
    let merged = assert_scores_as_unmerged(
        &tmp.join("out"),
        &f.reference,
        &f.model,
        &without(&f.lora, true, true),
    );
    assert!(merged.config().tie_word_embeddings);
}

#[test]
fn leaving_out_the_head_of_an_untied_model() {
    let f = Fixture::load("llama-tiny");
    let options = MergeOptions {
        leave_out_lm_head: true,
        ..MergeOptions::default()
    };
    let (tmp, report) = merge_into_temp(&f, "merge-leave-head", &options);
    assert!(!report.tie_broken);
    assert_eq!(report.left_out, vec!["lm_head.weight"]);
    assert!(
        report
            .merged
            .contains(&"model.embed_tokens.weight".to_string())
    );
    let (got, _) = folder_tensors(&tmp.join("out"));
    let (base_tensors, _) = folder_tensors(&f.base);
    assert_eq!(got["lm_head.weight"], base_tensors["lm_head.weight"]);
    assert_ne!(
        got["model.embed_tokens.weight"],
        base_tensors["model.embed_tokens.weight"]
    );
    assert_scores_as_unmerged(
        &tmp.join("out"),
        &f.reference,
        &f.model,
        &without(&f.lora, false, true),
    );
}

/// A tied model with a delta on the embedding only: the head keeps the base embedding, so
/// the export unties and writes it.
#[test]
fn a_delta_on_one_side_of_a_tie_unties() {
    let f = Fixture::load("qwen2-tiny");
    let options = MergeOptions {
        leave_out_lm_head: true,
        ..MergeOptions::default()
    };
    let (tmp, report) = merge_into_temp(&f, "merge-untie", &options);
    assert!(report.tie_broken);
    let config = read_json(&tmp.join("out/config.json"));
    assert_eq!(config["tie_word_embeddings"], Value::Bool(false));
    let (got, _) = folder_tensors(&tmp.join("out"));
    let (base_tensors, _) = folder_tensors(&f.base);
    assert_eq!(
        got["lm_head.weight"],
        base_tensors["model.embed_tokens.weight"]
    );
    assert_scores_as_unmerged(
        &tmp.join("out"),
        &f.reference,
        &f.model,
        &without(&f.lora, false, true),
    );
}

/// A head pair that is the embedding pair transposed (PEFT's `ensure_weight_tying`) adds
/// the same delta to both: the tie stays.
#[test]
fn a_tied_pair_keeps_the_tie() {
    let mut f = Fixture::load("qwen2-tiny");
    let embed = f.lora.embed.clone().unwrap();
    f.lora.lm_head = Some(LoraPair {
        a: engine::ops::transpose(&embed.b).unwrap(),
        b: engine::ops::transpose(&embed.a).unwrap(),
    });
    let (tmp, report) = merge_into_temp(&f, "merge-tied-pair", &MergeOptions::default());
    assert!(!report.tie_broken);
    assert!(
        report
            .merged
            .contains(&"model.embed_tokens.weight".to_string())
    );
    assert!(!report.merged.contains(&"lm_head.weight".to_string()));
    let (got, _) = folder_tensors(&tmp.join("out"));
    assert!(!got.contains_key("lm_head.weight"));
    let merged = assert_scores_as_unmerged(&tmp.join("out"), &f.reference, &f.model, &f.lora);
    assert!(merged.config().tie_word_embeddings);

    // Any other head pair breaks the tie.
    let mut other = f.lora.clone();
    let head = other.lm_head.as_mut().unwrap();
    let mut a = head.a.to_vec().unwrap();
    a[0] += 0.5;
    head.a = Tensor::from_vec(a, head.a.shape()).unwrap();
    let report =
        merge_adapter(&f.base, &other, &tmp.join("out2"), &MergeOptions::default()).unwrap();
    assert!(report.tie_broken);
}

/// A copy of `name`'s folder with the checkpoint rewritten by `edit` (tensors by name).
fn edited_model(tmp: &Path, name: &str, edit: impl Fn(&mut Tensors)) -> PathBuf {
    let src = base_dir(name);
    let dst = tmp.join(format!("{name}-edited"));
    std::fs::create_dir_all(&dst).unwrap();
    for f in dir_entries(&src) {
        if !f.ends_with(".safetensors") {
            std::fs::copy(src.join(&f), dst.join(&f)).unwrap();
        }
    }
    let (mut tensors, _) = folder_tensors(&src);
    edit(&mut tensors);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, (shape, v))| (n, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes.iter().map(|(n, shape, b)| {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
            .unwrap();
        (n.clone(), view)
    });
    let file = safetensors::serialize(views, None).unwrap();
    std::fs::write(dst.join("model.safetensors"), file).unwrap();
    dst
}

#[test]
fn errors_name_the_file_and_tensor_and_leave_nothing_behind() {
    let tmp = TempDir::new("merge-errors");
    let name = "llama-tiny";
    let Fixture { base, lora, .. } = Fixture::load(name);
    let opts = MergeOptions::default();

    // Output folder not empty, or holding a model.
    let busy = tmp.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    let e = err_text(merge_adapter(&base, &lora, &busy, &opts));
    assert!(
        e.contains("busy") && e.contains("not empty") && e.contains("notes.txt"),
        "{e}"
    );
    assert_eq!(dir_entries(&busy), vec!["notes.txt"]);
    let done = tmp.join("done");
    merge_adapter(&base, &lora, &done, &opts).unwrap();
    let before = dir_entries(&done);
    let e = err_text(merge_adapter(&base, &lora, &done, &opts));
    assert!(e.contains("already holds a model"), "{e}");
    assert_eq!(dir_entries(&done), before);
    let e = err_text(merge_adapter(&base, &lora, &base, &opts));
    assert!(e.contains("already holds a model"), "{e}");

    // An adapter pair of the wrong shape: the tensor, its file and both shapes.
    let mut bad = lora.clone();
    let q = bad.layers[1].q.as_mut().unwrap();
    q.a = Tensor::zeros(&[4, 7]);
    let out = tmp.join("shape");
    let e = err_text(merge_adapter(&base, &bad, &out, &opts));
    assert!(
        e.contains("model.layers.1.self_attn.q_proj.weight")
            && e.contains("model.safetensors")
            && e.contains("[120, 7]")
            && e.contains("[120, 80]"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written");
    // A rank that A and B disagree on.
    let mut bad = lora.clone();
    bad.layers[0].down.as_mut().unwrap().b = Tensor::zeros(&[80, 3]);
    let e = err_text(merge_adapter(&base, &bad, &out, &opts));
    assert!(
        e.contains("model.layers.0.mlp.down_proj.weight") && e.contains("rank"),
        "{e}"
    );

    // An adapter for another number of layers.
    let mut bad = lora.clone();
    bad.layers.pop();
    let e = err_text(merge_adapter(&base, &bad, &out, &opts));
    assert!(e.contains("2 layers") && e.contains("config.json"), "{e}");

    // A checkpoint without a tensor the adapter targets.
    let missing = edited_model(&tmp, name, |t| {
        t.remove("model.layers.2.mlp.up_proj.weight");
    });
    let e = err_text(merge_adapter(&missing, &lora, &out, &opts));
    assert!(
        e.contains("model.layers.2.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
    assert!(!out.exists());

    // A merge that overflows f32: the tensor and row, and the temp files are gone.
    let mut huge = lora.clone();
    let o = huge.layers[2].o.as_mut().unwrap();
    o.b = Tensor::from_vec(vec![1e30; 80 * 4], &[80, 4]).unwrap();
    o.a = Tensor::from_vec(vec![1e30; 4 * 120], &[4, 120]).unwrap();
    let e = err_text(merge_adapter(&base, &huge, &out, &opts));
    assert!(
        e.contains("model.layers.2.self_attn.o_proj.weight")
            && e.contains("row 0")
            && e.contains("not finite"),
        "{e}"
    );
    assert!(!out.exists(), "the folder it created is removed again");
    let empty = tmp.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(merge_adapter(&base, &huge, &empty, &opts).is_err());
    assert!(
        dir_entries(&empty).is_empty(),
        "an existing folder is left empty"
    );
}
