//! Test support: temp dirs, the repository's fixtures, and tiny random checkpoints of every
//! family written from a config (so unit tests need no Python and no fixture download).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::ModelConfig;
use crate::weights::testing::{RawTensor, write_safetensors};

/// The shared scratch folder (removed when dropped) of every test suite.
pub(crate) use testkit::TempDir;

pub(crate) fn temp_dir(tag: &str) -> TempDir {
    TempDir::new(&format!("model-{tag}"))
}

/// The fixture tokenizer, when the repository's `fixtures/` holds one.
pub(crate) fn fixture_tokenizer_dir() -> Option<PathBuf> {
    let dir = testkit::fixture("tokenizer");
    dir.join("tokenizer.json").is_file().then_some(dir)
}

/// A deterministic pseudo-random stream (xorshift64*), values in [-1, 1).
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// How to store the random weights.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    F32,
    Bf16,
}

/// Names and shapes of every tensor a model of `cfg` reads (plus `lm_head.weight` when untied).
pub(crate) fn tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (v, c, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
    let a = &cfg.arch;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, c])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let mut push = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
        push("input_layernorm.weight", vec![c]);
        for (name, n) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            push(&format!("self_attn.{name}.weight"), vec![n, c]);
            if a.qkv_bias {
                push(&format!("self_attn.{name}.bias"), vec![n]);
            }
        }
        push("self_attn.o_proj.weight", vec![c, q]);
        if a.o_bias {
            push("self_attn.o_proj.bias", vec![c]);
        }
        push("post_attention_layernorm.weight", vec![c]);
        if a.sandwich_norms {
            push("pre_feedforward_layernorm.weight", vec![c]);
            push("post_feedforward_layernorm.weight", vec![c]);
        }
        for (name, shape) in [
            ("gate_proj", vec![i, c]),
            ("up_proj", vec![i, c]),
            ("down_proj", vec![c, i]),
        ] {
            let n = shape[0];
            push(&format!("mlp.{name}.weight"), shape);
            if a.mlp_bias {
                push(&format!("mlp.{name}.bias"), vec![n]);
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![c]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, c]));
    }
    out
}

/// Writes `config` as config.json and random weights of its shapes as model.safetensors.
/// Norm weights are non-trivial (around 1 for Llama-style norms, around 0 for Gemma's 1 + w).
pub(crate) fn write_random_model(
    dir: &Path,
    config: &Value,
    seed: u64,
    store: Store,
) -> ModelConfig {
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(config).unwrap()).unwrap();
    let cfg = ModelConfig::from_file(&config_path).unwrap();
    let mut rng = Rng::new(seed);
    let tensors: Vec<RawTensor> = tensor_shapes(&cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                let base = 1.0 - cfg.arch.norm_offset;
                rng.vec(n, 0.3).into_iter().map(|x| base + x).collect()
            } else if name.ends_with(".bias") {
                rng.vec(n, 0.1)
            } else {
                // Roughly unit-variance outputs: scale by 1/sqrt(fan_in).
                let fan_in = *shape.last().unwrap_or(&1) as f32;
                let scale = if name.contains("embed_tokens") {
                    1.0
                } else {
                    1.7 / fan_in.sqrt()
                };
                rng.vec(n, scale)
            };
            match store {
                Store::F32 => RawTensor::f32(&name, &shape, &data),
                Store::Bf16 => RawTensor::bf16(&name, &shape, &data),
            }
        })
        .collect();
    write_safetensors(&dir.join(crate::weights::SINGLE_FILE), &tensors);
    cfg
}

/// Small configs with each family's quirks switched on: GQA, head_dim ≠ hidden / heads,
/// windows shorter than the test sequences, biases, soft-caps, llama3 RoPE.
pub(crate) fn family_configs() -> Vec<(&'static str, Value)> {
    use serde_json::json;
    let base = |mt: &str| {
        json!({
            "model_type": mt, "vocab_size": 61, "hidden_size": 24, "intermediate_size": 40,
            "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2,
            "head_dim": 6, "rms_norm_eps": 1e-5, "max_position_embeddings": 64
        })
    };
    let merge = |mut a: Value, b: Value| {
        if let (Value::Object(a), Value::Object(b)) = (&mut a, b) {
            a.extend(b);
        }
        a
    };
    vec![
        (
            "llama",
            merge(
                base("llama"),
                json!({"rope_theta": 500.0, "attention_bias": true, "mlp_bias": true,
                       "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
            ),
        ),
        (
            "llama-linear-tied",
            merge(
                base("llama"),
                json!({"tie_word_embeddings": true, "head_dim": 4, "num_key_value_heads": 3,
                       "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}}),
            ),
        ),
        (
            "mistral",
            merge(base("mistral"), json!({"sliding_window": 3})),
        ),
        (
            "qwen2",
            merge(
                base("qwen2"),
                json!({"use_sliding_window": true, "sliding_window": 2, "max_window_layers": 1,
                       "rope_theta": 1e6}),
            ),
        ),
        ("gemma", merge(base("gemma"), json!({"hidden_act": "gelu"}))),
        (
            "gemma2",
            merge(
                base("gemma2"),
                json!({"query_pre_attn_scalar": 10, "attn_logit_softcapping": 1.5,
                       "final_logit_softcapping": 2.0, "sliding_window": 3,
                       "hidden_activation": "gelu_pytorch_tanh"}),
            ),
        ),
    ]
}
