//! config.json → [`ModelConfig`]: one typed, checked description of a decoder, whatever shape
//! the file came in.
//!
//! HF config files come in two shapes. Checkpoints saved before transformers 5 put `rope_theta`
//! and `rope_scaling` (its kind under `rope_type`, or the older `type`) at the top level;
//! transformers 5 writes one `rope_parameters` object holding `rope_theta` and `rope_type`. We
//! read both the way transformers 5.17's `convert_rope_params_to_dict` /
//! `standardize_rope_params` do: a non-empty `rope_scaling` wins over `rope_parameters`, a
//! `rope_theta` inside the object wins over the top-level one, and 10000 is the default. Where
//! the two shapes are both present and *disagree* we stop with an error instead of guessing.
//!
//! A field absent from config.json takes the value of the family's HF config class (each
//! family file passes its [`FamilyDefaults`]); a few fields distinguish `null` (feature off)
//! from absent (the class default), e.g. Gemma-2's soft-caps and Mistral's `sliding_window`.
//! The fundamental sizes (`vocab_size`, `hidden_size`, `intermediate_size`,
//! `num_hidden_layers`, `num_attention_heads`) are required: a config without them is broken,
//! and silently building a 7B-sized model from class defaults helps nobody.

use std::path::Path;

use engine::ops::{Activation, RopeScaling};
use serde_json::{Map, Value};

use crate::error::{ModelError, Result};
use crate::{gemma, gemma2, llama, mistral, qwen2};

/// The decoder families we implement, by HF `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Gemma,
    Gemma2,
}

impl Family {
    pub const ALL: [Family; 5] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Gemma,
        Family::Gemma2,
    ];

    /// The HF `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
        }
    }

    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Family::ALL
            .into_iter()
            .find(|f| f.model_type() == model_type)
    }

    /// The HF causal-LM class of the family, as config.json's `architectures` names it.
    pub(crate) fn causal_lm_class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Gemma => "GemmaForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
        }
    }

    fn supported_list() -> String {
        Family::ALL
            .iter()
            .map(|f| f.model_type())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// What makes a family's decoder differ from plain Llama. Each family file fills this in
/// explicitly, so its quirks are visible in one place.
#[derive(Clone, Debug, PartialEq)]
pub struct Arch {
    /// RMSNorm multiplies by `(norm_offset + w)`: 0 for Llama-like, 1 for Gemma's `1 + w`.
    pub norm_offset: f32,
    /// Embedding rows are multiplied by this (Gemma: sqrt(C); else 1). HF rounds Gemma's
    /// factor to the weights' dtype: this is the f32 value; a bf16 backend must round it to
    /// bf16 (sqrt(3072) = 55.43 becomes 55.5 there).
    pub embed_scale: f32,
    /// q/k/v projections carry a bias (Qwen2; Llama/Gemma with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama/Gemma with `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down projections carry a bias (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Gemma-2's extra norms: `post_attention_layernorm` normalises the attention output,
    /// `pre_feedforward_layernorm` / `post_feedforward_layernorm` wrap the MLP. Without them,
    /// `post_attention_layernorm` is the pre-MLP norm (Llama's naming).
    pub sandwich_norms: bool,
    /// Multiplies q·k: head_dim^-1/2, or query_pre_attn_scalar^-1/2 for Gemma-2.
    pub attn_scale: f32,
    /// Attention logit soft-cap (Gemma-2), applied before the mask.
    pub attn_softcap: Option<f32>,
    /// Final logit soft-cap (Gemma-2), applied inside the chunked log-softmax.
    pub final_softcap: Option<f32>,
    /// The gated MLP's activation.
    pub activation: Activation,
}

/// A checked decoder config. Sizes use the engine's dimension legend.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,        // V
    pub hidden_size: usize,       // C
    pub intermediate_size: usize, // I
    pub num_layers: usize,        // L
    pub num_heads: usize,         // H
    pub num_kv_heads: usize,      // Hkv
    pub head_dim: usize,          // D
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Sliding window W of each layer (`None`: full causal attention). [L]
    pub layer_windows: Vec<Option<usize>>,
    pub arch: Arch,
    pub bos_token_id: Option<u32>,
    /// config.json's `eos_token_id`, an int or a list there.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl ModelConfig {
    /// Reads and checks `path` (a config.json).
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        ModelConfig::from_json_str(&text, path)
    }

    /// Parses config.json text; `path` only names the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<ModelConfig> {
        let value: Value = serde_json::from_str(text).map_err(|error| ModelError::Json {
            path: path.to_path_buf(),
            error,
        })?;
        let Value::Object(map) = value else {
            return Err(ModelError::config(path, "(root)", "expected a JSON object"));
        };
        let fields = ConfigFields { path, map: &map };
        let model_type = fields
            .str_opt("model_type")?
            .ok_or_else(|| ModelError::config(path, "model_type", "missing"))?;
        let family = Family::from_model_type(model_type).ok_or_else(|| {
            ModelError::UnsupportedModelType {
                path: path.to_path_buf(),
                got: model_type.to_string(),
                supported: Family::supported_list(),
            }
        })?;
        fields.check_architectures(family)?;
        match family {
            Family::Llama => llama::config(&fields),
            Family::Mistral => mistral::config(&fields),
            Family::Qwen2 => qwen2::config(&fields),
            Family::Gemma => gemma::config(&fields),
            Family::Gemma2 => gemma2::config(&fields),
        }
    }

    /// Width of the query projection, H·D.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of each of the key and value projections, Hkv·D.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// Values the family's HF config class uses for fields absent from config.json.
pub(crate) struct FamilyDefaults {
    /// `None`: hidden_size / num_attention_heads.
    pub head_dim: Option<usize>,
    /// `None`: num_attention_heads.
    pub num_kv_heads: Option<usize>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: &'static [u32],
    pub pad_token_id: Option<u32>,
}

/// The fields every family shares, parsed; a family file adds its [`Arch`] and windows.
pub(crate) struct Common {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl Common {
    /// head_dim^-1/2, computed as HF does (in f64, used as an f32 scalar).
    pub fn default_attn_scale(&self) -> f32 {
        (self.head_dim as f64).powf(-0.5) as f32
    }

    pub fn finish(self, layer_windows: Vec<Option<usize>>, arch: Arch) -> ModelConfig {
        ModelConfig {
            family: self.family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            layer_windows,
            arch,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_ids,
            pad_token_id: self.pad_token_id,
        }
    }
}

/// A layer's attention kind, from `layer_types`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LayerType {
    Full,
    Sliding,
}

/// config.json's object with typed accessors whose errors name the file and the field.
///
/// Conventions: `*_or(key, default)` treats an absent key and `null` alike (the HF class
/// default); `nullable_*(key, default)` returns the default when the key is absent and `None`
/// when it is `null` (the feature switched off).
pub(crate) struct ConfigFields<'a> {
    pub path: &'a Path,
    pub map: &'a Map<String, Value>,
}

impl<'a> ConfigFields<'a> {
    pub fn err(&self, field: &str, msg: impl Into<String>) -> ModelError {
        ModelError::config(self.path, field, msg)
    }

    /// The value, `None` when absent or null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn is_null(&self, key: &str) -> bool {
        matches!(self.map.get(key), Some(Value::Null))
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, format!("expected a string, got {v}"))),
        }
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_usize(v)
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {v}"))),
        }
    }

    /// A required size; zero is refused (no model has an empty dimension).
    pub fn size(&self, key: &str) -> Result<usize> {
        match self.usize_opt(key)? {
            None => Err(self.err(key, "missing (needed to build the model)")),
            Some(0) => Err(self.err(key, "must be > 0")),
            Some(n) => Ok(n),
        }
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    /// A positive number that may be `null` (off); absent means `default`.
    pub fn nullable_positive_f64(&self, key: &str, default: Option<f64>) -> Result<Option<f64>> {
        if !self.map.contains_key(key) {
            return Ok(default);
        }
        match self.f64_opt(key)? {
            None => Ok(None),
            Some(x) if x > 0.0 && x.is_finite() => Ok(Some(x)),
            Some(x) => Err(self.err(key, format!("must be a positive number or null, got {x}"))),
        }
    }

    /// A positive size that may be `null` (off); absent means `default`.
    pub fn nullable_size(&self, key: &str, default: Option<usize>) -> Result<Option<usize>> {
        if !self.map.contains_key(key) {
            return Ok(default);
        }
        match self.usize_opt(key)? {
            Some(0) => Err(self.err(key, "must be > 0 or null")),
            other => Ok(other),
        }
    }

    /// A token id field: an int, or null/absent (→ `default`).
    fn token_id(&self, key: &str, default: Option<u32>) -> Result<Option<u32>> {
        if self.is_null(key) {
            return Ok(None);
        }
        match self.get(key) {
            None => Ok(default),
            Some(v) => value_u32(v)
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a token id, got {v}"))),
        }
    }

    /// The activation named by `key` (absent: `default`), read as HF's ACT2FN does.
    pub fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        let name = self.str_opt(key)?.unwrap_or(default);
        parse_activation(name).ok_or_else(|| {
            self.err(
                key,
                format!(
                    "activation `{name}` is not supported (supported: silu, swish, gelu, \
                     gelu_python, gelu_pytorch_tanh, gelu_python_tanh, gelu_new, gelu_fast)"
                ),
            )
        })
    }

    /// `layer_types`, if present: one "full_attention" / "sliding_attention" per layer.
    pub fn layer_types(&self, num_layers: usize) -> Result<Option<Vec<LayerType>>> {
        let Some(value) = self.get("layer_types") else {
            return Ok(None);
        };
        let Value::Array(items) = value else {
            return Err(self.err("layer_types", format!("expected a list, got {value}")));
        };
        if items.len() != num_layers {
            return Err(self.err(
                "layer_types",
                format!(
                    "has {} entries but num_hidden_layers is {num_layers}",
                    items.len()
                ),
            ));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item.as_str() {
                Some("full_attention") => Ok(LayerType::Full),
                Some("sliding_attention") => Ok(LayerType::Sliding),
                _ => Err(self.err(
                    &format!("layer_types[{i}]"),
                    format!("expected \"full_attention\" or \"sliding_attention\", got {item}"),
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Per-layer windows from layer types: sliding layers get `window`, which must be set.
    pub fn windows_from_types(
        &self,
        types: &[LayerType],
        window: Option<usize>,
        window_field: &str,
    ) -> Result<Vec<Option<usize>>> {
        types
            .iter()
            .enumerate()
            .map(|(i, t)| match (t, window) {
                (LayerType::Full, _) => Ok(None),
                (LayerType::Sliding, Some(w)) => Ok(Some(w)),
                (LayerType::Sliding, None) => Err(self.err(
                    window_field,
                    format!(
                        "layer {i} is a sliding_attention layer but no sliding window is set \
                         ({window_field} is null or switched off)"
                    ),
                )),
            })
            .collect()
    }

    /// `architectures` naming another family's class contradicts `model_type`.
    fn check_architectures(&self, family: Family) -> Result<()> {
        let Some(Value::Array(archs)) = self.get("architectures") else {
            return Ok(());
        };
        for arch in archs.iter().filter_map(Value::as_str) {
            if let Some(other) = Family::ALL
                .into_iter()
                .find(|f| f.causal_lm_class() == arch && *f != family)
            {
                return Err(self.err(
                    "architectures",
                    format!(
                        "names {arch} (model_type {other}) but model_type is `{family}`: \
                         the config contradicts itself"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The fields every family shares, with the family's defaults for absent ones.
    pub fn common(&self, family: Family, d: &FamilyDefaults) -> Result<Common> {
        let vocab_size = self.size("vocab_size")?;
        let hidden_size = self.size("hidden_size")?;
        let intermediate_size = self.size("intermediate_size")?;
        let num_layers = self.size("num_hidden_layers")?;
        let num_heads = self.size("num_attention_heads")?;

        let num_kv_heads = match (
            self.usize_opt("num_key_value_heads")?,
            self.is_null("num_key_value_heads"),
        ) {
            (Some(n), _) => n,
            (None, true) => num_heads,
            (None, false) => d.num_kv_heads.unwrap_or(num_heads),
        };
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(self.err(
                "num_key_value_heads",
                format!(
                    "{num_kv_heads} does not divide num_attention_heads ({num_heads}); \
                     grouped-query attention needs H % Hkv == 0"
                ),
            ));
        }

        let head_dim = match self.usize_opt("head_dim")?.or(d.head_dim) {
            Some(hd) => hd,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(self.err(
                        "head_dim",
                        format!(
                            "missing, and hidden_size ({hidden_size}) is not a multiple of \
                             num_attention_heads ({num_heads}) to derive it"
                        ),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(self.err(
                "head_dim",
                format!("{head_dim} must be even and > 0 (rotary embedding pairs halves)"),
            ));
        }

        let rms_norm_eps = self.f64_or("rms_norm_eps", d.rms_norm_eps)?;
        if !(rms_norm_eps >= 0.0 && rms_norm_eps.is_finite()) {
            return Err(self.err("rms_norm_eps", format!("must be >= 0, got {rms_norm_eps}")));
        }
        let max_position_embeddings =
            self.usize_or("max_position_embeddings", d.max_position_embeddings)?;
        let (rope_theta, rope_scaling) = self.rope(max_position_embeddings)?;
        let tie_word_embeddings = self.bool_or("tie_word_embeddings", d.tie_word_embeddings)?;
        let eos_token_ids = if self.map.contains_key("eos_token_id") {
            eos_ids(self.map.get("eos_token_id").unwrap_or(&Value::Null))
                .ok_or_else(|| self.err("eos_token_id", "expected a token id or a list of them"))?
        } else {
            d.eos_token_ids.to_vec()
        };
        Ok(Common {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings,
            bos_token_id: self.token_id("bos_token_id", d.bos_token_id)?,
            eos_token_ids,
            pad_token_id: self.token_id("pad_token_id", d.pad_token_id)?,
        })
    }

    /// RoPE θ and scaling from either config shape (see the module doc).
    fn rope(&self, max_position_embeddings: usize) -> Result<(f32, RopeScaling)> {
        let top_theta = self.f64_opt("rope_theta")?;
        let legacy = self.rope_object("rope_scaling")?;
        let modern = self.rope_object("rope_parameters")?;
        if let (Some(l), Some(m)) = (legacy, modern) {
            let parsed_l =
                self.rope_from_object("rope_scaling", l, top_theta, max_position_embeddings)?;
            let parsed_m =
                self.rope_from_object("rope_parameters", m, top_theta, max_position_embeddings)?;
            if parsed_l != parsed_m {
                return Err(self.err(
                    "rope_scaling",
                    "both rope_scaling and rope_parameters are set and they disagree; \
                     keep one of them",
                ));
            }
        }
        match (legacy, modern) {
            (Some(obj), _) => {
                self.rope_from_object("rope_scaling", obj, top_theta, max_position_embeddings)
            }
            (None, Some(obj)) => {
                self.rope_from_object("rope_parameters", obj, top_theta, max_position_embeddings)
            }
            (None, None) => {
                let theta = top_theta.unwrap_or(DEFAULT_ROPE_THETA);
                Ok((
                    check_theta(self, "rope_theta", theta)?,
                    RopeScaling::Default,
                ))
            }
        }
    }

    /// A rope object field: `None` when absent, null or `{}` (all mean "default" to HF).
    fn rope_object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) if m.is_empty() => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.err(key, format!("expected an object, got {v}"))),
        }
    }

    fn rope_from_object(
        &self,
        key: &str,
        obj: &Map<String, Value>,
        top_theta: Option<f64>,
        max_position_embeddings: usize,
    ) -> Result<(f32, RopeScaling)> {
        if obj.contains_key("full_attention") || obj.contains_key("sliding_attention") {
            return Err(self.err(
                key,
                "per-layer-type RoPE parameters are not supported by these families",
            ));
        }
        let field = |name: &str| format!("{key}.{name}");
        let num = |name: &str| -> Result<Option<f64>> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| self.err(&field(name), format!("expected a number, got {v}"))),
            }
        };
        let inner_theta = num("rope_theta")?;
        if let (Some(inner), Some(top)) = (inner_theta, top_theta)
            && inner != top
        {
            return Err(self.err(
                "rope_theta",
                format!("top-level rope_theta {top} contradicts {key}.rope_theta {inner}"),
            ));
        }
        let theta = inner_theta.or(top_theta).unwrap_or(DEFAULT_ROPE_THETA);
        let theta = check_theta(self, &field("rope_theta"), theta)?;

        // HF: rope_type, else the older `type`, else "default".
        let kind = match (obj.get("rope_type"), obj.get("type")) {
            (Some(Value::String(s)), _) => s.as_str(),
            (None | Some(Value::Null), Some(Value::String(s))) => s.as_str(),
            (None | Some(Value::Null), None | Some(Value::Null)) => "default",
            (Some(v), _) | (_, Some(v)) => {
                return Err(self.err(&field("rope_type"), format!("expected a string, got {v}")));
            }
        };
        let factor = || -> Result<f32> {
            match num("factor")? {
                Some(f) if f > 0.0 && f.is_finite() => Ok(f as f32),
                Some(f) => Err(self.err(&field("factor"), format!("must be > 0, got {f}"))),
                None => Err(self.err(
                    &field("factor"),
                    format!("missing (rope_type {kind} needs it)"),
                )),
            }
        };
        let required = |name: &str| -> Result<f32> {
            num(name)?.map(|x| x as f32).ok_or_else(|| {
                self.err(&field(name), format!("missing (rope_type {kind} needs it)"))
            })
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "llama3" => {
                // HF gives a top-level `original_max_position_embeddings` priority, then the
                // rope object's, then max_position_embeddings.
                let original = match self.usize_opt("original_max_position_embeddings")? {
                    Some(n) => n,
                    None => match obj.get("original_max_position_embeddings") {
                        None | Some(Value::Null) => max_position_embeddings,
                        Some(v) => value_usize(v).ok_or_else(|| {
                            self.err(
                                &field("original_max_position_embeddings"),
                                format!("expected a positive integer, got {v}"),
                            )
                        })?,
                    },
                };
                let low_freq_factor = required("low_freq_factor")?;
                let high_freq_factor = required("high_freq_factor")?;
                if original == 0 || high_freq_factor <= low_freq_factor {
                    return Err(self.err(
                        key,
                        format!(
                            "llama3 scaling needs high_freq_factor ({high_freq_factor}) > \
                             low_freq_factor ({low_freq_factor}) and \
                             original_max_position_embeddings ({original}) > 0"
                        ),
                    ));
                }
                RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: original,
                }
            }
            other => {
                return Err(self.err(
                    &field("rope_type"),
                    format!("`{other}` is not supported (supported: default, linear, llama3)"),
                ));
            }
        };
        if let Some(p) = num("partial_rotary_factor")?
            && p != 1.0
        {
            return Err(self.err(
                &field("partial_rotary_factor"),
                format!("{p} is not supported by these families (only 1.0)"),
            ));
        }
        Ok((theta, scaling))
    }
}

/// transformers' `RotaryEmbeddingConfigMixin.default_theta`.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

fn check_theta(fields: &ConfigFields, field: &str, theta: f64) -> Result<f32> {
    if theta > 0.0 && theta.is_finite() {
        Ok(theta as f32)
    } else {
        Err(fields.err(field, format!("must be a positive number, got {theta}")))
    }
}

/// An integer-valued JSON number as usize (`4096` or `4096.0`, not `4096.5` or `-1`).
pub(crate) fn value_usize(v: &Value) -> Option<usize> {
    if let Some(n) = v.as_u64() {
        return usize::try_from(n).ok();
    }
    let f = v.as_f64()?;
    (f >= 0.0 && f.fract() == 0.0 && f <= usize::MAX as f64).then_some(f as usize)
}

pub(crate) fn value_u32(v: &Value) -> Option<u32> {
    value_usize(v).and_then(|n| u32::try_from(n).ok())
}

/// `eos_token_id` as HF allows it: an int, a list of ints, or null (none).
pub(crate) fn eos_ids(v: &Value) -> Option<Vec<u32>> {
    match v {
        Value::Null => Some(Vec::new()),
        Value::Array(items) => items.iter().map(value_u32).collect(),
        other => value_u32(other).map(|id| vec![id]),
    }
}

/// HF ACT2FN names → our activations. The tanh-approximation variants (`gelu_new`,
/// `gelu_fast`, `gelu_pytorch_tanh`) are one formula up to f32 rounding.
pub(crate) fn parse_activation(name: &str) -> Option<Activation> {
    match name {
        "silu" | "swish" => Some(Activation::Silu),
        "gelu" | "gelu_python" => Some(Activation::Gelu),
        "gelu_pytorch_tanh" | "gelu_python_tanh" | "gelu_new" | "gelu_fast" => {
            Some(Activation::GeluTanh)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(json, Path::new("config.json"))
    }

    /// A minimal config of `model_type` with `extra` fields merged in (later keys win).
    fn cfg(model_type: &str, extra: &str) -> Result<ModelConfig> {
        let base = format!(
            r#"{{"model_type": "{model_type}", "vocab_size": 100, "hidden_size": 48,
                "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 6,
                "num_key_value_heads": 2{}{extra}}}"#,
            if extra.is_empty() { "" } else { ", " }
        );
        parse(&base)
    }

    fn err_text(r: Result<ModelConfig>) -> String {
        match r {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn llama_defaults() {
        let c = cfg("llama", "").unwrap();
        assert_eq!(c.family, Family::Llama);
        assert_eq!(c.head_dim, 8); // 48 / 6
        assert_eq!(c.num_kv_heads, 2);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 10_000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.arch.activation, Activation::Silu);
        assert_eq!(c.arch.norm_offset, 0.0);
        assert_eq!(c.arch.embed_scale, 1.0);
        assert!(!c.arch.qkv_bias && !c.arch.o_bias && !c.arch.mlp_bias);
        assert_eq!(c.arch.attn_scale, (8f64).powf(-0.5) as f32);
        assert_eq!(c.layer_windows, vec![None; 4]);
        assert_eq!(c.bos_token_id, Some(1));
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn kv_heads_absent_or_null_per_family() {
        let without = |mt: &str, extra: &str| {
            parse(&format!(
                r#"{{"model_type": "{mt}", "vocab_size": 100, "hidden_size": 64,
                    "intermediate_size": 96, "num_hidden_layers": 2,
                    "num_attention_heads": 32{extra}}}"#
            ))
            .unwrap()
            .num_kv_heads
        };
        // LlamaConfig: None → heads; MistralConfig: 8; Qwen2Config: 32.
        assert_eq!(without("llama", ""), 32);
        assert_eq!(without("mistral", ""), 8);
        assert_eq!(without("qwen2", ""), 32);
        assert_eq!(without("mistral", r#", "num_key_value_heads": null"#), 32);
    }

    #[test]
    fn head_dim_explicit_and_gemma_default() {
        assert_eq!(cfg("llama", r#""head_dim": 16"#).unwrap().head_dim, 16);
        // GemmaConfig / Gemma2Config default head_dim to 256, not hidden / heads.
        assert_eq!(cfg("gemma", "").unwrap().head_dim, 256);
        assert_eq!(cfg("gemma2", "").unwrap().head_dim, 256);
        assert_eq!(cfg("gemma2", r#""head_dim": 12"#).unwrap().head_dim, 12);
    }

    #[test]
    fn head_dim_underivable_is_an_error() {
        let e = err_text(cfg("llama", r#""hidden_size": 50"#));
        assert!(e.contains("config.json") && e.contains("head_dim"), "{e}");
        let e = err_text(cfg("llama", r#""head_dim": 7"#));
        assert!(e.contains("even"), "{e}");
    }

    #[test]
    fn tie_defaults_per_family() {
        for (mt, tied) in [
            ("llama", false),
            ("mistral", false),
            ("qwen2", false),
            ("gemma", true),
            ("gemma2", true),
        ] {
            assert_eq!(cfg(mt, "").unwrap().tie_word_embeddings, tied, "{mt}");
            let flipped = format!(r#""tie_word_embeddings": {}"#, !tied);
            assert_eq!(
                cfg(mt, &flipped).unwrap().tie_word_embeddings,
                !tied,
                "{mt}"
            );
        }
    }

    #[test]
    fn rope_top_level_shape() {
        let c = cfg("llama", r#""rope_theta": 500000.0, "rope_scaling": null"#).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        let c = cfg(
            "llama",
            r#""rope_theta": 500000, "rope_scaling": {"type": "linear", "factor": 2.0}"#,
        )
        .unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let c = cfg(
            "llama",
            r#""max_position_embeddings": 1024, "rope_scaling": {"rope_type": "llama3",
               "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}"#,
        )
        .unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64
            }
        );
    }

    #[test]
    fn rope_parameters_shape() {
        let c = cfg(
            "llama",
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 123.0}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 123.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        // llama3 without original_max_position_embeddings: max_position_embeddings.
        let c = cfg(
            "llama",
            r#""max_position_embeddings": 300, "rope_parameters": {"rope_type": "llama3",
               "rope_theta": 10.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 2.0}"#,
        )
        .unwrap();
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                original_max_position_embeddings: 300,
                ..
            }
        ));
        // A top-level original_max_position_embeddings has priority (HF's Phi-3 rule).
        let c = cfg(
            "llama",
            r#""original_max_position_embeddings": 77, "rope_parameters": {"rope_type": "llama3",
               "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
               "original_max_position_embeddings": 99}"#,
        )
        .unwrap();
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                original_max_position_embeddings: 77,
                ..
            }
        ));
        // theta only at top level, type in rope_parameters: merged.
        let c = cfg(
            "llama",
            r#""rope_theta": 42.0, "rope_parameters": {"rope_type": "linear", "factor": 3}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 42.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 3.0 });
    }

    #[test]
    fn rope_contradictions_and_unsupported() {
        let e = err_text(cfg(
            "llama",
            r#""rope_theta": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 2.0}"#,
        ));
        assert!(e.contains("rope_theta") && e.contains("contradicts"), "{e}");
        let e = err_text(cfg(
            "llama",
            r#""rope_scaling": {"type": "linear", "factor": 2.0},
               "rope_parameters": {"rope_type": "linear", "factor": 4.0}"#,
        ));
        assert!(e.contains("disagree"), "{e}");
        // Agreeing copies are fine.
        cfg(
            "llama",
            r#""rope_scaling": {"type": "linear", "factor": 2.0},
               "rope_parameters": {"rope_type": "linear", "factor": 2.0}"#,
        )
        .unwrap();
        let e = err_text(cfg(
            "llama",
            r#""rope_scaling": {"rope_type": "yarn", "factor": 2.0}"#,
        ));
        assert!(e.contains("yarn") && e.contains("llama3"), "{e}");
        let e = err_text(cfg("llama", r#""rope_scaling": {"rope_type": "linear"}"#));
        assert!(
            e.contains("rope_scaling.factor") && e.contains("missing"),
            "{e}"
        );
        let e = err_text(cfg(
            "llama",
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}"#,
        ));
        assert!(e.contains("high_freq_factor"), "{e}");
    }

    #[test]
    fn eos_int_list_null() {
        assert_eq!(
            cfg("llama", r#""eos_token_id": 7"#).unwrap().eos_token_ids,
            vec![7]
        );
        assert_eq!(
            cfg("llama", r#""eos_token_id": [7, 9]"#)
                .unwrap()
                .eos_token_ids,
            vec![7, 9]
        );
        assert!(
            cfg("llama", r#""eos_token_id": null"#)
                .unwrap()
                .eos_token_ids
                .is_empty()
        );
        assert!(cfg("llama", r#""eos_token_id": "x""#).is_err());
        assert_eq!(cfg("qwen2", "").unwrap().eos_token_ids, Vec::<u32>::new());
        assert_eq!(cfg("gemma", "").unwrap().eos_token_ids, vec![1]);
        assert_eq!(cfg("gemma", "").unwrap().bos_token_id, Some(2));
        assert_eq!(cfg("gemma", "").unwrap().pad_token_id, Some(0));
    }

    #[test]
    fn missing_and_bad_fields_name_the_field() {
        let e = err_text(parse(r#"{"model_type": "llama", "vocab_size": 10}"#));
        assert!(
            e.contains("config.json") && e.contains("hidden_size") && e.contains("missing"),
            "{e}"
        );
        let e = err_text(cfg("llama", r#""vocab_size": "many""#));
        assert!(e.contains("vocab_size"), "{e}");
        let e = err_text(cfg("llama", r#""vocab_size": 0"#));
        assert!(e.contains("vocab_size") && e.contains("> 0"), "{e}");
        let e = err_text(cfg("llama", r#""num_key_value_heads": 4"#));
        assert!(
            e.contains("num_key_value_heads") && e.contains("divide"),
            "{e}"
        );
        let e = err_text(parse(r#"{"vocab_size": 10}"#));
        assert!(e.contains("model_type") && e.contains("missing"), "{e}");
        let e = err_text(parse("{not json"));
        assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
        let e = err_text(cfg("llama", r#""hidden_act": "relu""#));
        assert!(e.contains("hidden_act") && e.contains("relu"), "{e}");
    }

    #[test]
    fn unsupported_model_type_lists_supported() {
        let e = err_text(cfg("gpt2", ""));
        assert!(e.contains("gpt2"), "{e}");
        for f in Family::ALL {
            assert!(e.contains(f.model_type()), "{e}");
        }
    }

    #[test]
    fn architectures_contradicting_model_type() {
        let e = err_text(cfg("llama", r#""architectures": ["Gemma2ForCausalLM"]"#));
        assert!(e.contains("architectures") && e.contains("gemma2"), "{e}");
        cfg("llama", r#""architectures": ["LlamaForCausalLM"]"#).unwrap();
        cfg("llama", r#""architectures": ["SomethingElse"]"#).unwrap();
    }

    #[test]
    fn mistral_window_on_every_layer() {
        assert_eq!(
            cfg("mistral", "").unwrap().layer_windows,
            vec![Some(4096); 4]
        );
        assert_eq!(
            cfg("mistral", r#""sliding_window": 3"#)
                .unwrap()
                .layer_windows,
            vec![Some(3); 4]
        );
        assert_eq!(
            cfg("mistral", r#""sliding_window": null"#)
                .unwrap()
                .layer_windows,
            vec![None; 4]
        );
    }

    #[test]
    fn qwen2_sliding_rules() {
        let c = cfg("qwen2", r#""sliding_window": 5"#).unwrap();
        assert_eq!(
            c.layer_windows,
            vec![None; 4],
            "use_sliding_window defaults to false"
        );
        assert!(c.arch.qkv_bias && !c.arch.o_bias);
        let c = cfg(
            "qwen2",
            r#""use_sliding_window": true, "sliding_window": 5, "max_window_layers": 2"#,
        )
        .unwrap();
        assert_eq!(c.layer_windows, vec![None, None, Some(5), Some(5)]);
        let c = cfg(
            "qwen2",
            r#""use_sliding_window": true, "sliding_window": 5, "max_window_layers": 2,
               "layer_types": ["sliding_attention", "full_attention", "full_attention",
                               "sliding_attention"]"#,
        )
        .unwrap();
        assert_eq!(c.layer_windows, vec![Some(5), None, None, Some(5)]);
        let e = err_text(cfg(
            "qwen2",
            r#""layer_types": ["sliding_attention", "full_attention", "full_attention",
                               "full_attention"]"#,
        ));
        assert!(e.contains("layer 0") && e.contains("sliding"), "{e}");
    }

    #[test]
    fn gemma_quirks() {
        let c = cfg("gemma", r#""head_dim": 8"#).unwrap();
        assert_eq!(c.arch.norm_offset, 1.0);
        assert_eq!(c.arch.embed_scale, (48f64).sqrt() as f32);
        assert_eq!(c.arch.activation, Activation::GeluTanh);
        assert!(!c.arch.sandwich_norms);
        // transformers 5.17's GemmaMLP reads `hidden_act` only.
        let c = cfg(
            "gemma",
            r#""hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh""#,
        )
        .unwrap();
        assert_eq!(c.arch.activation, Activation::Gelu);
        let e = err_text(cfg("gemma", r#""use_bidirectional_attention": true"#));
        assert!(e.contains("use_bidirectional_attention"), "{e}");
    }

    #[test]
    fn gemma2_quirks_and_defaults() {
        let c = cfg("gemma2", r#""head_dim": 8"#).unwrap();
        assert!(c.arch.sandwich_norms);
        assert_eq!(c.arch.attn_softcap, Some(50.0));
        assert_eq!(c.arch.final_softcap, Some(30.0));
        assert_eq!(c.arch.attn_scale, (256f64).powf(-0.5) as f32);
        // Older configs without layer_types: even-indexed layers slide.
        assert_eq!(c.layer_windows, vec![Some(4096), None, Some(4096), None]);
        // Gemma2MLP reads `hidden_activation` only.
        let c = cfg(
            "gemma2",
            r#""hidden_act": "gelu", "hidden_activation": "gelu""#,
        )
        .unwrap();
        assert_eq!(c.arch.activation, Activation::Gelu);
        let c = cfg(
            "gemma2",
            r#""query_pre_attn_scalar": 12, "attn_logit_softcapping": null,
               "final_logit_softcapping": 5.5, "sliding_window": 3,
               "layer_types": ["full_attention", "sliding_attention", "sliding_attention",
                               "full_attention"]"#,
        )
        .unwrap();
        assert_eq!(c.arch.attn_scale, (12f64).powf(-0.5) as f32);
        assert_eq!(c.arch.attn_softcap, None);
        assert_eq!(c.arch.final_softcap, Some(5.5));
        assert_eq!(c.layer_windows, vec![None, Some(3), Some(3), None]);
        let e = err_text(cfg("gemma2", r#""layer_types": ["full_attention"]"#));
        assert!(
            e.contains("layer_types") && e.contains("num_hidden_layers"),
            "{e}"
        );
        let e = err_text(cfg("gemma2", r#""sliding_window": null"#));
        assert!(e.contains("sliding_window"), "{e}");
    }

    #[test]
    fn llama_biases() {
        let c = cfg("llama", r#""attention_bias": true, "mlp_bias": true"#).unwrap();
        assert!(c.arch.qkv_bias && c.arch.o_bias && c.arch.mlp_bias);
    }
}
