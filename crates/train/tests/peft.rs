//! PEFT adapter files against PEFT 0.21 itself: fixtures/train/peft/ (tools/gen_peft_fixture.py)
//! holds an adapter folder PEFT wrote for llama-tiny and the adapter_config.json text PEFT
//! writes for several settings.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use model::{Lora, LoraSpec, LoraTarget, ModelConfig};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde_json::{Map, Value};
use train::peft::{
    AdapterConfig, CONFIG_FILE, SeededRng, WEIGHTS_FILE, init_lora, is_base_weight_dump,
    load_adapter, lora_tensor_names, save_adapter,
};

const BASE: &str = "fixtures/models/llama-tiny";

fn peft_adapter_dir() -> PathBuf {
    testkit::fixture("train/peft/adapter")
}

fn llama_tiny() -> ModelConfig {
    ModelConfig::from_file(&testkit::fixture("models/llama-tiny/config.json")).unwrap()
}

fn json_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Every tensor of a safetensors file: name → (dtype, shape, raw bytes).
fn raw_tensors(path: &Path) -> HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(name, v)| {
            (
                name.to_string(),
                (v.dtype(), v.shape().to_vec(), v.data().to_vec()),
            )
        })
        .collect()
}

fn write_raw_tensors(path: &Path, tensors: &HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The reference workflow's eight modules.
fn workflow_targets() -> BTreeSet<LoraTarget> {
    use LoraTarget::*;
    [
        EmbedTokens,
        QProj,
        KProj,
        VProj,
        GateProj,
        DownProj,
        UpProj,
        LmHead,
    ]
    .into()
}

fn copy_peft_adapter(tag: &str) -> testkit::TempDir {
    let dir = testkit::TempDir::new(tag);
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        std::fs::copy(peft_adapter_dir().join(f), dir.join(f)).unwrap();
    }
    dir
}

/// [`copy_peft_adapter`] with `from` replaced by `to` in its adapter_config.json.
fn copy_peft_adapter_editing_config(tag: &str, from: &str, to: &str) -> testkit::TempDir {
    let dir = copy_peft_adapter(tag);
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    assert!(text.contains(from), "{from:?} not in {CONFIG_FILE}");
    std::fs::write(dir.join(CONFIG_FILE), text.replace(from, to)).unwrap();
    dir
}

#[test]
fn reads_the_adapter_peft_wrote_value_for_value() {
    let cfg = llama_tiny();
    let loaded = load_adapter(&peft_adapter_dir(), &cfg).unwrap();
    let spec = &loaded.lora.spec;
    assert_eq!(
        (spec.r, spec.alpha, spec.dropout, spec.use_rslora),
        (4, 8.0, 0.05, false)
    );
    assert_eq!(
        spec.targets.iter().copied().collect::<BTreeSet<_>>(),
        workflow_targets()
    );
    assert_eq!(loaded.base_model_name_or_path.as_deref(), Some(BASE));

    let raw = raw_tensors(&peft_adapter_dir().join(WEIGHTS_FILE));
    let pairs = loaded.lora.pairs();
    // embed + 3 layers × 6 modules + head
    assert_eq!(pairs.len(), 1 + 3 * 6 + 1);
    let mut seen = BTreeSet::new();
    for (layer, target, pair) in pairs {
        for (name, t) in lora_tensor_names(target, layer)
            .iter()
            .zip([&pair.a, &pair.b])
        {
            let (dtype, shape, bytes) = &raw[name];
            assert_eq!(*dtype, Dtype::F32, "{name}");
            assert_eq!(t.shape(), &shape[..], "{name}");
            assert_eq!(
                bits(t.as_slice().unwrap()),
                bits(&f32_values(bytes)),
                "{name}"
            );
            seen.insert(name.clone());
        }
    }
    // Everything else in PEFT's file is its dump of the base embedding and head.
    let rest: BTreeSet<&String> = raw.keys().filter(|k| !seen.contains(*k)).collect();
    assert_eq!(
        rest,
        BTreeSet::from([
            &"base_model.model.lm_head.base_layer.weight".to_string(),
            &"base_model.model.model.embed_tokens.base_layer.weight".to_string()
        ])
    );
    let mut ignored = loaded.ignored_tensors.clone();
    ignored.sort();
    assert_eq!(ignored.iter().collect::<BTreeSet<_>>(), rest);
}

#[test]
fn peft_initialises_linear_a_within_the_kaiming_bound_and_we_draw_the_same_shapes() {
    // The fixture's A matrices are PEFT's own initialisation (the generator only overwrote B
    // and the embedding's A): each lies in ±1/√in and fills it, as ours does.
    let cfg = llama_tiny();
    let peft = load_adapter(&peft_adapter_dir(), &cfg).unwrap().lora;
    let ours = init_lora(peft.spec.clone(), &cfg, &mut SeededRng::new(3)).unwrap();
    for ((layer, target, p), (_, _, o)) in peft.pairs().into_iter().zip(ours.pairs()) {
        assert_eq!(
            (p.a.shape(), p.b.shape()),
            (o.a.shape(), o.b.shape()),
            "{target} {layer:?}"
        );
        let (a, b) = (o.a.as_slice().unwrap(), o.b.as_slice().unwrap());
        if target == LoraTarget::EmbedTokens {
            assert!(a.iter().all(|&x| x == 0.0), "embedding A starts at zero");
            let mean = b.iter().map(|&x| x as f64).sum::<f64>() / b.len() as f64;
            let var = b.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / b.len() as f64;
            assert!(
                mean.abs() < 0.2 && (var - 1.0).abs() < 0.3,
                "embedding B ~ N(0, 1): {mean} {var}"
            );
            continue;
        }
        assert!(b.iter().all(|&x| x == 0.0), "{target}: B starts at zero");
        let bound = 1.0 / (p.a.shape()[1] as f32).sqrt();
        for (who, a) in [("PEFT", p.a.as_slice().unwrap()), ("ours", a)] {
            let max = a.iter().fold(0f32, |m, &x| m.max(x.abs()));
            assert!(
                max <= bound && max > 0.9 * bound,
                "{who} {target} {layer:?}: max |A| {max}, bound {bound}"
            );
        }
    }
    // Reproducible from the seed, and from a saved generator state.
    let again = init_lora(peft.spec.clone(), &cfg, &mut SeededRng::new(3)).unwrap();
    for ((_, _, x), (_, _, y)) in ours.pairs().into_iter().zip(again.pairs()) {
        assert_eq!(x.a.as_slice().unwrap(), y.a.as_slice().unwrap());
        assert_eq!(x.b.as_slice().unwrap(), y.b.as_slice().unwrap());
    }
    let mut rng = SeededRng::new(9);
    rng.next_u64();
    let state = rng.state();
    let one = init_lora(peft.spec.clone(), &cfg, &mut rng).unwrap();
    let two = init_lora(peft.spec.clone(), &cfg, &mut SeededRng::from_state(&state)).unwrap();
    assert_eq!(
        one.pairs()[3].2.a.as_slice().unwrap(),
        two.pairs()[3].2.a.as_slice().unwrap()
    );
}

#[test]
fn our_writer_round_trips_and_matches_pefts_config_and_names() {
    let cfg = llama_tiny();
    let peft = load_adapter(&peft_adapter_dir(), &cfg).unwrap();
    let dir = testkit::TempDir::new("peft-roundtrip");
    let out = dir.join("adapter");
    save_adapter(&out, &peft.lora, Some(BASE)).unwrap();
    let mut entries = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<Vec<_>>();
    entries.sort();
    assert_eq!(
        entries,
        [CONFIG_FILE, WEIGHTS_FILE],
        "no temporary files left"
    );

    // Values survive bit for bit, and nothing is ignored: we write no base-weight dumps.
    let back = load_adapter(&out, &cfg).unwrap();
    assert!(back.ignored_tensors.is_empty());
    assert_eq!(back.lora.spec, peft.lora.spec);
    for ((_, _, x), (_, _, y)) in back.lora.pairs().into_iter().zip(peft.lora.pairs()) {
        assert_eq!(bits(x.a.as_slice().unwrap()), bits(y.a.as_slice().unwrap()));
        assert_eq!(bits(x.b.as_slice().unwrap()), bits(y.b.as_slice().unwrap()));
    }

    // Same tensor names, dtypes and shapes as PEFT's file, minus its dumps; PEFT's metadata.
    let ours = raw_tensors(&out.join(WEIGHTS_FILE));
    let theirs = raw_tensors(&peft_adapter_dir().join(WEIGHTS_FILE));
    let theirs_lora: BTreeSet<&String> =
        theirs.keys().filter(|k| !is_base_weight_dump(k)).collect();
    assert_eq!(ours.keys().collect::<BTreeSet<_>>(), theirs_lora);
    for (name, (dtype, shape, bytes)) in &ours {
        assert_eq!(
            (dtype, shape, bytes),
            (&theirs[name].0, &theirs[name].1, &theirs[name].2),
            "{name}"
        );
    }
    let bytes = std::fs::read(out.join(WEIGHTS_FILE)).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata().clone().unwrap(),
        HashMap::from([("format".to_string(), "pt".to_string())])
    );

    // adapter_config.json: PEFT's file key for key (target_modules is a set in PEFT).
    assert_same_config(
        &json_file(&out.join(CONFIG_FILE)),
        &json_file(&peft_adapter_dir().join(CONFIG_FILE)),
        &[],
    );
}

/// Compares two adapter_config.json objects key for key, `target_modules` as a set, skipping
/// the keys in `skip`.
fn assert_same_config(ours: &Value, peft: &Value, skip: &[&str]) {
    let (ours, peft): (&Map<String, Value>, &Map<String, Value>) =
        (ours.as_object().unwrap(), peft.as_object().unwrap());
    assert_eq!(
        ours.keys().collect::<BTreeSet<_>>(),
        peft.keys().collect::<BTreeSet<_>>(),
        "the same keys"
    );
    for (key, value) in peft {
        if skip.contains(&key.as_str()) {
            continue;
        }
        if key == "target_modules" {
            let set = |v: &Value| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect::<BTreeSet<_>>()
            };
            assert_eq!(set(&ours[key]), set(value), "target_modules");
        } else {
            assert_eq!(&ours[key], value, "{key}");
        }
    }
}

#[test]
fn adapter_config_text_is_what_peft_writes_for_the_same_settings() {
    let fx = json_file(&testkit::fixture("train/peft/configs.json"));
    for case in fx["cases"].as_array().unwrap() {
        let s = &case["settings"];
        let spec = LoraSpec {
            r: s["r"].as_u64().unwrap() as usize,
            alpha: s["lora_alpha"].as_f64().unwrap() as f32,
            dropout: s["lora_dropout"].as_f64().unwrap() as f32,
            use_rslora: s["use_rslora"].as_bool().unwrap(),
            targets: s["target_modules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| LoraTarget::parse(t.as_str().unwrap()).unwrap())
                .collect(),
        };
        let scaling = case["scaling"].as_f64().unwrap();
        assert!(
            (spec.scaling() as f64 - scaling).abs() <= 1e-6 * scaling,
            "{s}: scaling"
        );
        let config = AdapterConfig {
            spec,
            base_model_name_or_path: Some("BASE".into()),
        };
        let text = config.to_json();
        // Byte for byte: PEFT's json.dumps(indent=2, sort_keys=True) of its own dict, with
        // target_modules in our order (PEFT's is a hash-ordered set).
        assert_eq!(text, case["expected_text"].as_str().unwrap(), "{s}");
        assert_same_config(
            &serde_json::from_str(&text).unwrap(),
            &case["peft"],
            &["base_model_name_or_path"],
        );
        // And it reads back as the same settings.
        let back = AdapterConfig::from_json_str(&text, Path::new("x")).unwrap();
        assert_eq!(back.spec.r, config.spec.r);
        assert_eq!(back.spec.alpha, config.spec.alpha);
        assert_eq!(back.spec.dropout, config.spec.dropout);
        assert_eq!(back.spec.use_rslora, config.spec.use_rslora);
    }
}

/// Loads `dir` for llama-tiny and returns the error message, which must name `file`.
fn load_error(dir: &Path, cfg: &ModelConfig, file: &str) -> String {
    let err = load_adapter(dir, cfg)
        .expect_err("a bad adapter must not load")
        .to_string();
    assert!(err.contains(file), "error does not name {file}: {err}");
    err
}

#[test]
fn bad_adapters_are_errors_naming_file_and_tensor() {
    let cfg = llama_tiny();
    let q_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    let q_b = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight";

    // A missing tensor.
    let dir = copy_peft_adapter("peft-missing");
    let mut raw = raw_tensors(&dir.join(WEIGHTS_FILE));
    raw.remove(q_b);
    write_raw_tensors(&dir.join(WEIGHTS_FILE), &raw);
    let err = load_error(&dir, &cfg, WEIGHTS_FILE);
    assert!(err.contains(q_b) && err.contains("missing"), "{err}");

    // A wrong shape (one more input column).
    let dir = copy_peft_adapter("peft-shape");
    let mut raw = raw_tensors(&dir.join(WEIGHTS_FILE));
    raw.insert(q_a.into(), (Dtype::F32, vec![4, 81], vec![0u8; 4 * 81 * 4]));
    write_raw_tensors(&dir.join(WEIGHTS_FILE), &raw);
    let err = load_error(&dir, &cfg, WEIGHTS_FILE);
    assert!(
        err.contains(q_a) && err.contains("[4, 81]") && err.contains("[4, 80]"),
        "{err}"
    );

    // r in the config disagrees with the tensors.
    let dir = copy_peft_adapter_editing_config("peft-rank", "\"r\": 4,", "\"r\": 8,");
    let err = load_error(&dir, &cfg, WEIGHTS_FILE);
    assert!(
        err.contains("rank 4") && err.contains("r = 8") && err.contains("lora_"),
        "{err}"
    );

    // A module the config does not target: its tensors would be silently dropped.
    let dir =
        copy_peft_adapter_editing_config("peft-untargeted", "    \"q_proj\"\n", "    \"k_proj\"\n");
    let err = load_error(&dir, &cfg, WEIGHTS_FILE);
    assert!(
        err.contains("q_proj") && err.contains("not in target_modules"),
        "{err}"
    );

    // An adapter for a deeper model than this one.
    let mut shallow = cfg.clone();
    shallow.num_layers = 2;
    shallow.layer_windows.truncate(2);
    let err = load_error(&peft_adapter_dir(), &shallow, WEIGHTS_FILE);
    assert!(
        err.contains("layers.2.") && err.contains("the model has 2 layers"),
        "{err}"
    );

    // A tensor of another dtype, and a config that is not PEFT LoRA.
    let dir = copy_peft_adapter("peft-dtype");
    let mut raw = raw_tensors(&dir.join(WEIGHTS_FILE));
    raw.insert(
        q_b.into(),
        (Dtype::I32, vec![120, 4], vec![0u8; 120 * 4 * 4]),
    );
    write_raw_tensors(&dir.join(WEIGHTS_FILE), &raw);
    let err = load_error(&dir, &cfg, WEIGHTS_FILE);
    assert!(err.contains(q_b) && err.contains("I32"), "{err}");

    let dir =
        copy_peft_adapter_editing_config("peft-dora", "\"use_dora\": false", "\"use_dora\": true");
    let err = load_error(&dir, &cfg, CONFIG_FILE);
    assert!(err.contains("use_dora"), "{err}");

    // No config at all.
    let dir = copy_peft_adapter("peft-noconfig");
    std::fs::remove_file(dir.join(CONFIG_FILE)).unwrap();
    load_error(&dir, &cfg, CONFIG_FILE);
}

#[test]
fn bf16_lora_tensors_read_as_f32() {
    // PEFT writes BF16 LoRA weights for a bf16 base with autocast_adapter_dtype=False.
    let cfg = llama_tiny();
    let dir = copy_peft_adapter("peft-bf16");
    let mut raw = raw_tensors(&dir.join(WEIGHTS_FILE));
    let name = "base_model.model.lm_head.lora_B.weight";
    let (_, shape, bytes) = raw[name].clone();
    let as_bf16: Vec<u8> = f32_values(&bytes)
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect();
    raw.insert(name.into(), (Dtype::BF16, shape, as_bf16.clone()));
    write_raw_tensors(&dir.join(WEIGHTS_FILE), &raw);
    let lora = load_adapter(&dir, &cfg).unwrap().lora;
    let want: Vec<f32> = as_bf16
        .chunks_exact(2)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let head = lora.lm_head.as_ref().unwrap();
    assert_eq!(head.b.as_slice().unwrap(), &want[..]);
}

/// An adapter of ours with non-zero B everywhere, so loading it changes the model.
fn our_trained_looking_adapter(cfg: &ModelConfig) -> Lora {
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.05,
        use_rslora: false,
        targets: workflow_targets().into_iter().collect(),
    };
    let mut rng = SeededRng::new(11);
    let mut lora = init_lora(spec, cfg, &mut rng).unwrap();
    for (_, target, pair) in lora.pairs_mut() {
        let t = if target == LoraTarget::EmbedTokens {
            &mut pair.a
        } else {
            &mut pair.b
        };
        rng.fill_normal(t.as_mut_slice().unwrap(), 0.0, 0.05);
    }
    lora
}

/// `PeftModel.from_pretrained` loads a folder we wrote, with our values. Needs torch 2.11 +
/// transformers 5.17 + peft 0.21: `$PREFER_TORCH_PYTHON`, else /tmp/tvenv/bin/python.
/// Run with `cargo test -p train --test peft -- --ignored`.
#[test]
#[ignore = "needs python with torch, transformers and peft"]
fn peft_loads_an_adapter_we_wrote() {
    let python =
        std::env::var("PREFER_TORCH_PYTHON").unwrap_or_else(|_| "/tmp/tvenv/bin/python".into());
    let cfg = llama_tiny();
    let lora = our_trained_looking_adapter(&cfg);
    let dir = testkit::TempDir::new("peft-python");
    let out = dir.join("adapter");
    save_adapter(&out, &lora, Some(BASE)).unwrap();
    let script = r#"
import sys, warnings, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel
base_dir, adapter_dir = sys.argv[1], sys.argv[2]
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
ids = torch.tensor([[2, 17, 503, 999, 42, 7]])
with torch.no_grad():
    before = base(input_ids=ids).logits
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = PeftModel.from_pretrained(base, adapter_dir)
for w in caught:
    if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower():
        raise SystemExit(f"PEFT warned: {w.message}")
ours = load_file(adapter_dir + "/adapter_model.safetensors")
state = {k.replace(".default", ""): v for k, v in model.state_dict().items()}
for name, value in ours.items():
    if not torch.equal(state[name], value):
        raise SystemExit(f"{name} differs after loading")
lora_params = [k for k in model.state_dict() if "lora_" in k]
if len(lora_params) != len(ours):
    raise SystemExit(f"PEFT has {len(lora_params)} LoRA tensors, the file {len(ours)}")
model.eval()
with torch.no_grad():
    after = model(input_ids=ids).logits
delta = (after - before).abs().max().item()
if not delta > 1e-3:
    raise SystemExit(f"the adapter did not change the output ({delta})")
print(f"ok: {len(ours)} tensors loaded, inference_mode={model.peft_config['default'].inference_mode}, max |delta logit| {delta:.4f}, warnings: {[str(w.message) for w in caught]}")
"#;
    if !Path::new(&python).exists() {
        eprintln!("NOTICE: skipping: no {python} (set PREFER_TORCH_PYTHON)");
        return;
    }
    let base = testkit::fixture("models/llama-tiny");
    let stdout = testkit::run_python(
        &python,
        script,
        &[base.to_str().unwrap(), out.to_str().unwrap()],
    );
    eprintln!("{stdout}");
    assert!(stdout.starts_with("ok:"), "{stdout}");
}
