//! Merging a LoRA adapter into its base checkpoint: what `prefer export` writes, and what
//! PEFT 0.21's `merge_and_unload()` followed by transformers 5.17's `save_pretrained`
//! produce — a plain HF model folder that vLLM and transformers serve without LoRA support.
//!
//! ```text
//! W' = W + s·B·A          linears (q/k/v/o, gate/up/down, lm_head): W [out, in], A [R, in], B [out, R]
//! E' = E + s·(B·A)ᵀ       embedding: E [V, C], A [R, V], B [C, R] (PEFT's lora_embedding_A/B)
//! ```
//!
//! Gemma multiplies the embedding's LoRA output by its embedding scale together with the
//! base row (`(E[id] + s·Aᵀ[id]·Bᵀ)·√C`, see `training.rs`), so merging into E is exact for
//! Gemma too.
//!
//! ## Precision (as PEFT does it)
//! Every tensor keeps its stored dtype (bf16, f16 or f32). The delta is computed in f32 from
//! the f32 adapter: `fl(fl(Σ_k B[o,k]·A[k,i]) · s)`, the product then the scaling, as
//! PEFT's `get_delta_weight` (`(B @ A) * scaling`). Then:
//! - a linear: `round(W + Δ)` — PEFT's `weight.data += delta_weight` adds an f32 delta to a
//!   bf16/f16 weight in place, which torch computes in f32 and rounds once (to nearest even);
//! - the embedding: `round(W + round(Δ))` — PEFT's `Embedding.merge` casts the delta to the
//!   weight's dtype *before* adding (`delta.to(orig_dtype)`), so on a bf16/f16 model the delta
//!   is rounded twice. We match that, bit for bit up to the summation order of the rank-R
//!   product (a last-ulp difference now and then). For f32 weights both rules are the same.
//!
//! ## Tied embeddings
//! A tied model (`tie_word_embeddings`, stored without `lm_head.weight`) with a delta on
//! only one of embed_tokens / lm_head, or different deltas on both, no longer has one matrix
//! for both: the export writes `lm_head.weight` (the base embedding plus the head's delta)
//! and sets `tie_word_embeddings: false` in config.json. PEFT itself would add both deltas
//! into the one shared matrix, which is not the model the adapter trained. A head pair that
//! is exactly the transposed embedding pair (PEFT's `ensure_weight_tying`) gives the same
//! delta twice, and the tie is kept. vLLM's Gemma and Gemma-2 refuse untied embeddings; for
//! them leave out the embed_tokens and lm_head deltas ([`MergeOptions`]), which keeps the tie.
//!
//! ## Files (as transformers' `save_pretrained` writes them)
//! - `model.safetensors`, or above [`MergeOptions::max_shard_bytes`] (transformers' default
//!   50 GB) shards `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`
//!   (`{"metadata": {"total_parameters", "total_size"}, "weight_map"}`, keys sorted,
//!   two-space indent). Tensors go to shards in transformers' order (the state dict sorted
//!   by its dot-separated, numbers-as-numbers key, as it is for a model loaded with
//!   `from_pretrained`), a tensor larger than the limit alone in its own shard. Within a file
//!   the safetensors crate's layout: `{"format": "pt"}` metadata, tensors by descending dtype
//!   then name, header padded with spaces to 8 bytes.
//! - config.json (copied byte for byte unless the tie is broken), generation_config.json and
//!   the tokenizer files that exist.
//!
//! Each file is written to a hidden temp file in the output folder and renamed when all of
//! them are complete, config.json last (a folder without it is not a model); on an error the
//! temp files are removed and the output folder is left as it was.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde_json::Value;

use crate::config::{Family, ModelConfig};
use crate::error::{ModelError, Result};
use crate::lora::{Lora, LoraPair, LoraTarget};
use crate::weights::{Checkpoint, INDEX_FILE, SINGLE_FILE, StoredTensor};

/// transformers' `save_pretrained` default `max_shard_size`, "50GB" (decimal units).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 50_000_000_000;

const EMBED: &str = "model.embed_tokens.weight";
const HEAD: &str = "lm_head.weight";
const CONFIG: &str = "config.json";

/// Files beside the weights that a served model needs, copied when present.
const COPIED_FILES: [&str; 9] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
];

/// Rows of a merged tensor computed at a time (bounds memory for a 256k-row embedding).
const BLOCK_BYTES: usize = 64 << 20;

/// What [`merge_adapter`] merges and how it shards.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeOptions {
    /// Write `model.embed_tokens.weight` unchanged, without its delta.
    pub leave_out_embed_tokens: bool,
    /// Write `lm_head.weight` unchanged (or keep it tied), without its delta.
    pub leave_out_lm_head: bool,
    /// Above this many bytes of weights, shard as transformers does.
    pub max_shard_bytes: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            leave_out_embed_tokens: false,
            leave_out_lm_head: false,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// What [`merge_adapter`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeReport {
    /// Tensors written with a delta added, in transformers' state-dict order.
    pub merged: Vec<String>,
    /// Tensors written as stored (including an untied `lm_head.weight` copied from the
    /// embedding).
    pub copied: usize,
    /// Tensors whose delta was left out on request ([`MergeOptions`]).
    pub left_out: Vec<String>,
    /// Bytes of all files written.
    pub bytes_written: u64,
    /// The base had tied embeddings and the export writes a separate `lm_head.weight`.
    pub tie_broken: bool,
    /// The files written, sorted.
    pub files: Vec<String>,
}

/// Merges `lora` into the checkpoint of `model_dir` and writes a complete HF model folder to
/// `out_dir` (created if missing; it must be empty otherwise). See the module doc for the
/// arithmetic, the tie handling and the files.
pub fn merge_adapter(
    model_dir: &Path,
    lora: &Lora,
    out_dir: &Path,
    options: &MergeOptions,
) -> Result<MergeReport> {
    let _span = tracing::info_span!("merge adapter", model = %model_dir.display(),
        out = %out_dir.display())
    .entered();
    let config_path = model_dir.join(CONFIG);
    let config = ModelConfig::from_file(&config_path)?;
    if lora.layers.len() != config.num_layers {
        return Err(ModelError::Input {
            what: "merge",
            msg: format!(
                "the adapter has {} layers, {} says {}",
                lora.layers.len(),
                config_path.display(),
                config.num_layers
            ),
        });
    }
    let checkpoint = Checkpoint::open(model_dir)?;
    let plan = Plan::new(&checkpoint, model_dir, &config, lora, options)?;
    if plan.tie_broken && matches!(config.family, Family::Gemma | Family::Gemma2) {
        tracing::warn!(
            "the export unties embed_tokens and lm_head (config.json tie_word_embeddings: \
             false); transformers loads it, but vLLM's Gemma and Gemma-2 require tied \
             embeddings — leave out the embed_tokens and lm_head deltas for a vLLM export"
        );
    }

    let mut staging = Staging::new(out_dir)?;
    let files = shard_files(&plan.tensors, options.max_shard_bytes);
    let single = files.len() == 1;
    let mut weight_map = BTreeMap::new();
    for (i, members) in files.iter().enumerate() {
        let name = if single {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, files.len())
        };
        let tensors: Vec<&OutTensor> = members.iter().map(|&t| &plan.tensors[t]).collect();
        let path = staging.create(&name);
        write_safetensors(&path, &tensors, &checkpoint)?;
        for t in &tensors {
            weight_map.insert(t.name.clone(), Value::from(name.clone()));
        }
        tracing::info!(file = %name, tensors = tensors.len(), "shard written");
    }
    if !single {
        let text = index_json(&plan.tensors, weight_map);
        staging.write(INDEX_FILE, text.as_bytes())?;
    }
    for name in COPIED_FILES {
        let src = model_dir.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| ModelError::io(&src, e))?;
            staging.write(name, &bytes)?;
        }
    }
    let config_bytes = std::fs::read(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
    let config_bytes = if plan.tie_broken {
        untied_config(&config_bytes, &config_path)?.into_bytes()
    } else {
        config_bytes
    };
    staging.write(CONFIG, &config_bytes)?;
    let (files, bytes_written) = staging.commit()?;

    let merged: Vec<String> = plan
        .tensors
        .iter()
        .filter(|t| matches!(t.source, Source::Merged { .. }))
        .map(|t| t.name.clone())
        .collect();
    Ok(MergeReport {
        copied: plan.tensors.len() - merged.len(),
        merged,
        left_out: plan.left_out,
        bytes_written,
        tie_broken: plan.tie_broken,
        files,
    })
}

/// transformers' `model.safetensors.index.json`: `json.dumps(index, indent=2,
/// sort_keys=True) + "\n"`. `total_parameters` is the model's parameter count, which counts a
/// tied matrix once — as it is written once.
fn index_json(tensors: &[OutTensor], weight_map: BTreeMap<String, Value>) -> String {
    let total_size: u64 = tensors.iter().map(|t| t.byte_len() as u64).sum();
    let total_parameters: u64 = tensors.iter().map(|t| t.numel() as u64).sum();
    // Inserted in sorted order ("metadata" < "weight_map", "total_parameters" <
    // "total_size", the weight map from a BTreeMap): serde_json keeps insertion order here.
    let mut metadata = serde_json::Map::new();
    metadata.insert("total_parameters".into(), total_parameters.into());
    metadata.insert("total_size".into(), total_size.into());
    let mut index = serde_json::Map::new();
    index.insert("metadata".into(), Value::Object(metadata));
    index.insert(
        "weight_map".into(),
        Value::Object(weight_map.into_iter().collect()),
    );
    pretty_json(&Value::Object(index))
}

/// Which LoRA tensor layout a delta has.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DeltaKind {
    /// A [R, in], B [out, R]: Δ [out, in] = s·B·A.
    Linear,
    /// A [R, V], B [C, R]: Δ [V, C] = s·(B·A)ᵀ, rounded to the weight's dtype before the add.
    Embedding,
}

/// One module's delta, its pair copied to host f32.
struct Delta {
    kind: DeltaKind,
    r: usize,
    a: Vec<f32>, // Linear: [R, in]; Embedding: [R, V]
    b: Vec<f32>, // Linear: [out, R]; Embedding: [C, R]
    /// Embedding only: Bᵀ [R, C], so that a row of Δ reads B contiguously.
    bt: Vec<f32>,
    /// B's rows and A's columns, as the adapter has them.
    b_rows: usize,
    a_cols: usize,
    scaling: f32,
}

impl Delta {
    fn new(kind: DeltaKind, pair: &LoraPair, scaling: f32, module: &str) -> Result<Delta> {
        let bad = |msg: String| ModelError::Input {
            what: "merge",
            msg: format!("adapter pair of {module}: {msg}"),
        };
        let (&[ra, a_cols], &[b_rows, rb]) = (pair.a.shape(), pair.b.shape()) else {
            return Err(bad(format!(
                "A {:?} and B {:?} are not matrices",
                pair.a.shape(),
                pair.b.shape()
            )));
        };
        if ra != rb {
            return Err(bad(format!(
                "A [{ra}, {a_cols}] and B [{b_rows}, {rb}] disagree on the rank"
            )));
        }
        let b = pair.b.to_vec()?;
        let bt = match kind {
            DeltaKind::Linear => Vec::new(),
            DeltaKind::Embedding => (0..ra)
                .flat_map(|k| (0..b_rows).map(move |c| (c, k)))
                .map(|(c, k)| b[c * ra + k])
                .collect(),
        };
        Ok(Delta {
            kind,
            r: ra,
            a: pair.a.to_vec()?,
            b,
            bt,
            b_rows,
            a_cols,
            scaling,
        })
    }

    /// The [rows, cols] of the weight this delta fits.
    fn weight_shape(&self) -> [usize; 2] {
        match self.kind {
            DeltaKind::Linear => [self.b_rows, self.a_cols],
            DeltaKind::Embedding => [self.a_cols, self.b_rows],
        }
    }

    /// Δ's row `row` into `out` ([cols] f32): `fl(fl(Σ_k ...) · s)`, k in order.
    fn row(&self, row: usize, out: &mut [f32]) {
        out.fill(0.0);
        let (r, cols) = (self.r, out.len());
        match self.kind {
            DeltaKind::Linear => {
                // Δ[o, i] = Σ_k B[o, k]·A[k, i]
                for k in 0..r {
                    let bk = self.b[row * r + k];
                    for (o, a) in out.iter_mut().zip(&self.a[k * cols..(k + 1) * cols]) {
                        *o += bk * a;
                    }
                }
            }
            DeltaKind::Embedding => {
                // Δ[v, c] = Σ_k A[k, v]·B[c, k] = Σ_k A[k, v]·Bᵀ[k, c]
                let v_len = self.a_cols;
                for k in 0..r {
                    let ak = self.a[k * v_len + row];
                    for (o, bt) in out.iter_mut().zip(&self.bt[k * cols..(k + 1) * cols]) {
                        *o += ak * bt;
                    }
                }
            }
        }
        for o in out.iter_mut() {
            *o *= self.scaling;
        }
    }
}

/// Where a written tensor's bytes come from.
enum Source {
    /// Checkpoint tensor `name`, bytes as stored.
    Stored(String),
    /// Checkpoint tensor `base` plus a delta.
    Merged { base: String, delta: Delta },
}

/// One tensor of the output.
struct OutTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    source: Source,
}

impl OutTensor {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn byte_len(&self) -> usize {
        self.numel() * self.dtype.bitsize() / 8
    }
}

/// Every tensor of the output and where it comes from, checked before anything is written.
struct Plan {
    tensors: Vec<OutTensor>, // in transformers' state-dict order
    left_out: Vec<String>,
    tie_broken: bool,
}

impl Plan {
    fn new(
        ck: &Checkpoint,
        model_dir: &Path,
        config: &ModelConfig,
        lora: &Lora,
        options: &MergeOptions,
    ) -> Result<Plan> {
        let scaling = lora.spec.scaling();
        let mut deltas: HashMap<String, Delta> = HashMap::new();
        let mut left_out = Vec::new();
        for (layer, target, pair) in lora.pairs() {
            let name = weight_name(layer, target);
            let skip = match target {
                LoraTarget::EmbedTokens => options.leave_out_embed_tokens,
                LoraTarget::LmHead => options.leave_out_lm_head,
                _ => false,
            };
            if skip {
                left_out.push(name);
                continue;
            }
            let kind = match target {
                LoraTarget::EmbedTokens => DeltaKind::Embedding,
                _ => DeltaKind::Linear,
            };
            let delta = Delta::new(kind, pair, scaling, &name)?;
            deltas.insert(name, delta);
        }

        let mut tensors = Vec::new();
        let mut tie_broken = false;
        if config.tie_word_embeddings {
            let head = deltas.remove(HEAD);
            tie_broken = match (deltas.get(EMBED), &head) {
                (None, None) => false,
                (Some(e), Some(h)) => !same_delta(e, h),
                _ => true,
            };
            if tie_broken {
                // The untied head starts from the embedding it was tied to.
                let source = match head {
                    Some(delta) => Source::Merged {
                        base: EMBED.to_string(),
                        delta,
                    },
                    None => Source::Stored(EMBED.to_string()),
                };
                tensors.push(out_tensor(ck, HEAD.to_string(), source)?);
            }
        }
        for name in ck.names() {
            if tie_broken && name == HEAD {
                continue; // a stale copy in a tied checkpoint: replaced above
            }
            let source = match deltas.remove(name) {
                Some(delta) => Source::Merged {
                    base: name.to_string(),
                    delta,
                },
                None => Source::Stored(name.to_string()),
            };
            tensors.push(out_tensor(ck, name.to_string(), source)?);
        }
        // A delta whose weight the checkpoint lacks (the sorted first, for a stable error).
        if let Some(name) = deltas.keys().min() {
            return Err(ModelError::MissingTensor {
                name: name.clone(),
                dir: model_dir.to_path_buf(),
            });
        }
        tensors.sort_by_cached_key(|t| natural_key(&t.name));
        Ok(Plan {
            tensors,
            left_out,
            tie_broken,
        })
    }
}

/// HF's checkpoint name of a LoRA target's weight.
fn weight_name(layer: Option<usize>, target: LoraTarget) -> String {
    match (layer, target) {
        (_, LoraTarget::EmbedTokens) => EMBED.to_string(),
        (_, LoraTarget::LmHead) => HEAD.to_string(),
        (layer, t) => {
            let block = match t {
                LoraTarget::GateProj | LoraTarget::UpProj | LoraTarget::DownProj => "mlp",
                _ => "self_attn",
            };
            format!("model.layers.{}.{block}.{t}.weight", layer.unwrap_or(0))
        }
    }
}

/// A head pair that is exactly the embedding pair transposed (A_h = B_eᵀ, B_h = A_eᵀ) adds
/// the same delta to the head as to the embedding.
fn same_delta(embed: &Delta, head: &Delta) -> bool {
    let r = embed.r;
    let (v, c) = (embed.a_cols, embed.b_rows);
    head.r == r
        && head.b_rows == v
        && head.a_cols == c
        && (0..r).all(|k| (0..c).all(|j| head.a[k * c + j] == embed.b[j * r + k]))
        && (0..v).all(|i| (0..r).all(|k| head.b[i * r + k] == embed.a[k * v + i]))
}

/// The output tensor `name` from `source`, its dtype and shape checked against the delta.
fn out_tensor(ck: &Checkpoint, name: String, source: Source) -> Result<OutTensor> {
    let base = match &source {
        Source::Stored(base) | Source::Merged { base, .. } => ck.stored(base)?,
    };
    if let Source::Merged {
        base: base_name,
        delta,
    } = &source
    {
        check_mergeable(&base, base_name, delta)?;
    }
    Ok(OutTensor {
        name,
        dtype: base.dtype,
        shape: base.shape.to_vec(),
        source,
    })
}

fn check_mergeable(base: &StoredTensor, name: &str, delta: &Delta) -> Result<()> {
    if float_dtype(base.dtype).is_none() {
        return Err(ModelError::TensorDtype {
            path: base.path.to_path_buf(),
            name: name.to_string(),
            got: format!("{:?}", base.dtype),
        });
    }
    let want = delta.weight_shape();
    if base.shape != want {
        return Err(ModelError::TensorShape {
            path: base.path.to_path_buf(),
            name: name.to_string(),
            expected: want.to_vec(),
            got: base.shape.to_vec(),
        });
    }
    Ok(())
}

/// transformers' `dot_natural_key`: split on ".", all-digit parts compare as numbers and
/// before text parts; a text part's trailing digits compare as a number after its text.
fn natural_key(name: &str) -> Vec<KeyPart> {
    name.split('.')
        .map(|part| {
            let digits = |s: &'_ str| {
                let s = s.trim_start_matches('0');
                (s.len(), s.to_string())
            };
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                return KeyPart::Number(digits(part));
            }
            let text = part.trim_end_matches(|c: char| c.is_ascii_digit());
            let tail = &part[text.len()..];
            KeyPart::Text(text.to_string(), (!tail.is_empty()).then(|| digits(tail)))
        })
        .collect()
}

/// One part of [`natural_key`]. Numbers are (digit count, digits) without leading zeros,
/// which orders them by value at any length. The derived order is Python's tuple order:
/// numbers first, and a text without trailing digits before the same text with them.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum KeyPart {
    Number((usize, String)),
    Text(String, Option<(usize, String)>),
}

/// huggingface_hub's `split_state_dict_into_shards_factory`: fill shards in order; a tensor
/// that would tip the current shard over the limit starts a new one; a tensor above the
/// limit on its own goes alone into a shard placed before the one being filled.
fn shard_files(tensors: &[OutTensor], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.byte_len() as u64;
        if size > max_bytes {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max_bytes {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes one safetensors file at `path` holding `tensors`, computing merged ones a block
/// of rows at a time.
fn write_safetensors(path: &Path, tensors: &[&OutTensor], ck: &Checkpoint) -> Result<()> {
    // The safetensors crate's layout: by descending dtype, then name.
    let mut order: Vec<&OutTensor> = tensors.to_vec();
    order.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name)));
    let mut offset = 0;
    let infos = order
        .iter()
        .map(|t| {
            let start = offset;
            offset += t.byte_len();
            let info = TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (start, offset),
            };
            (t.name.clone(), info)
        })
        .collect();
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    let header_error = |e: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg: format!("cannot build the header: {e}"),
    };
    let metadata = Metadata::new(Some(format), infos).map_err(|e| header_error(e.to_string()))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| header_error(e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let io = |e| ModelError::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut out = BufWriter::new(file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&header).map_err(io)?;
    for t in order {
        match &t.source {
            Source::Stored(name) => out.write_all(ck.stored(name)?.bytes).map_err(io)?,
            Source::Merged { base, delta } => {
                let base = ck.stored(base)?;
                let Some(dtype) = float_dtype(base.dtype) else {
                    return Err(ModelError::TensorDtype {
                        path: base.path.to_path_buf(),
                        name: t.name.clone(),
                        got: format!("{:?}", base.dtype),
                    });
                };
                write_merged(&mut out, &base, dtype, delta, &t.name).map_err(|e| match e {
                    MergeFailure::Io(e) => ModelError::io(path, e),
                    MergeFailure::NotFinite { row } => ModelError::Input {
                        what: "merge",
                        msg: format!(
                            "{}: tensor `{}` row {row}: the merged weight is not finite \
                             (the adapter overflows the {:?} range or holds NaN/inf)",
                            base.path.display(),
                            t.name,
                            base.dtype
                        ),
                    },
                })?;
            }
        }
    }
    let file = out
        .into_inner()
        .map_err(|e| ModelError::io(path, e.into_error()))?;
    file.sync_all().map_err(io)
}

enum MergeFailure {
    Io(std::io::Error),
    /// A merged element is NaN or infinite where the base one was finite.
    NotFinite {
        row: usize,
    },
}

/// Streams `base + delta` (rounded to base's dtype) to `out`, [`BLOCK_BYTES`] of f32 rows at
/// a time, the rows of a block in parallel.
fn write_merged(
    out: &mut impl Write,
    base: &StoredTensor,
    dtype: FloatDtype,
    delta: &Delta,
    name: &str,
) -> std::result::Result<(), MergeFailure> {
    let [rows, cols] = delta.weight_shape();
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let row_bytes = cols * dtype.width();
    let block_rows = (BLOCK_BYTES / (cols * 4)).clamp(1, rows);
    let mut buf = vec![0u8; block_rows * row_bytes];
    for row0 in (0..rows).step_by(block_rows) {
        let n = block_rows.min(rows - row0);
        let chunk = &mut buf[..n * row_bytes];
        let bad_row = chunk
            .par_chunks_mut(row_bytes)
            .enumerate()
            .map_init(
                || vec![0.0f32; cols],
                |d, (i, dst)| {
                    let row = row0 + i;
                    let src = &base.bytes[row * row_bytes..(row + 1) * row_bytes];
                    merge_row(dtype, delta.kind, src, delta, row, d, dst).then_some(row)
                },
            )
            .flatten()
            .min();
        if let Some(row) = bad_row {
            tracing::debug!(tensor = name, row, "merged value not finite");
            return Err(MergeFailure::NotFinite { row });
        }
        out.write_all(chunk).map_err(MergeFailure::Io)?;
    }
    Ok(())
}

/// Merges one row: `dst = round(src + Δ)` (linear) or `round(src + round(Δ))` (embedding).
/// True when a finite base element became NaN or infinite.
fn merge_row(
    dtype: FloatDtype,
    kind: DeltaKind,
    src: &[u8],
    delta: &Delta,
    row: usize,
    d: &mut [f32],
    dst: &mut [u8],
) -> bool {
    delta.row(row, d);
    let width = dtype.width();
    let mut bad = false;
    for ((s, o), &dv) in src
        .chunks_exact(width)
        .zip(dst.chunks_exact_mut(width))
        .zip(d.iter())
    {
        let w = dtype.read(s);
        let dv = match kind {
            DeltaKind::Linear => dv,
            DeltaKind::Embedding => dtype.round(dv),
        };
        let merged = dtype.round(w + dv);
        bad |= w.is_finite() && !merged.is_finite();
        dtype.write(merged, o);
    }
    bad
}

/// The stored float dtypes a delta can be merged into.
#[derive(Clone, Copy, Debug, PartialEq)]
enum FloatDtype {
    Bf16,
    F16,
    F32,
}

fn float_dtype(d: Dtype) -> Option<FloatDtype> {
    match d {
        Dtype::BF16 => Some(FloatDtype::Bf16),
        Dtype::F16 => Some(FloatDtype::F16),
        Dtype::F32 => Some(FloatDtype::F32),
        _ => None,
    }
}

impl FloatDtype {
    fn width(self) -> usize {
        match self {
            FloatDtype::Bf16 | FloatDtype::F16 => 2,
            FloatDtype::F32 => 4,
        }
    }

    /// One little-endian element as f32 (exact).
    fn read(self, s: &[u8]) -> f32 {
        match self {
            FloatDtype::Bf16 => f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16),
            FloatDtype::F16 => half::f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32(),
            FloatDtype::F32 => f32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        }
    }

    /// `x` rounded to this dtype, to nearest even (what torch's `.to(dtype)` does).
    fn round(self, x: f32) -> f32 {
        match self {
            FloatDtype::Bf16 => half::bf16::from_f32(x).to_f32(),
            FloatDtype::F16 => half::f16::from_f32(x).to_f32(),
            FloatDtype::F32 => x,
        }
    }

    /// Writes `x` (already representable) as one little-endian element.
    fn write(self, x: f32, out: &mut [u8]) {
        match self {
            FloatDtype::Bf16 => {
                out.copy_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes())
            }
            FloatDtype::F16 => out.copy_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes()),
            FloatDtype::F32 => out.copy_from_slice(&x.to_le_bytes()),
        }
    }
}

/// config.json with `tie_word_embeddings` false (inserted when the family default applied),
/// everything else in its order.
fn untied_config(bytes: &[u8], path: &Path) -> Result<String> {
    let mut value: Value = serde_json::from_slice(bytes).map_err(|error| ModelError::Json {
        path: path.to_path_buf(),
        error,
    })?;
    let Value::Object(map) = &mut value else {
        return Err(ModelError::config(path, "(root)", "expected a JSON object"));
    };
    map.insert("tie_word_embeddings".into(), Value::Bool(false));
    Ok(pretty_json(&value))
}

/// Python's `json.dumps(value, indent=2) + "\n"` for the ASCII keys we write.
fn pretty_json(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// Output files staged as hidden temp files in the output folder, renamed into place by
/// [`Staging::commit`]; dropped uncommitted, it removes them (and the folder, if it made it).
struct Staging {
    dir: PathBuf,
    created_dir: bool,
    /// (temp path, final name), in the order written.
    files: Vec<(PathBuf, String)>,
    committed: bool,
}

impl Staging {
    /// Checks `dir` is missing (then creates it) or empty.
    fn new(dir: &Path) -> Result<Staging> {
        let created_dir = match std::fs::read_dir(dir) {
            Ok(entries) => {
                let mut names: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                if !names.is_empty() {
                    names.sort();
                    let holds_model = names
                        .iter()
                        .any(|n| n == CONFIG || n.ends_with(".safetensors") || n == INDEX_FILE);
                    let what = if holds_model {
                        "already holds a model"
                    } else {
                        "is not empty"
                    };
                    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
                    return Err(ModelError::io(
                        dir,
                        std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            format!(
                                "the output folder {what} ({}{}); choose a new or empty folder",
                                shown.join(", "),
                                if names.len() > shown.len() {
                                    ", ..."
                                } else {
                                    ""
                                }
                            ),
                        ),
                    ));
                }
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
                true
            }
            Err(e) => return Err(ModelError::io(dir, e)),
        };
        Ok(Staging {
            dir: dir.to_path_buf(),
            created_dir,
            files: Vec::new(),
            committed: false,
        })
    }

    /// The temp path for final file `name`, registered for cleanup and renaming.
    fn create(&mut self, name: &str) -> PathBuf {
        let tmp = self.dir.join(format!(".{name}.prefer-tmp"));
        self.files.push((tmp.clone(), name.to_string()));
        tmp
    }

    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.create(name);
        let io = |e| ModelError::io(&tmp, e);
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// Renames every temp file into place, config.json last; the final names (sorted) and
    /// their total size.
    fn commit(mut self) -> Result<(Vec<String>, u64)> {
        self.files.sort_by_key(|(_, name)| name == CONFIG);
        let mut bytes = 0;
        for (tmp, _) in &self.files {
            bytes += std::fs::metadata(tmp)
                .map_err(|e| ModelError::io(tmp, e))?
                .len();
        }
        for (tmp, name) in &self.files {
            let dst = self.dir.join(name);
            std::fs::rename(tmp, &dst).map_err(|e| ModelError::io(&dst, e))?;
        }
        self.committed = true;
        let mut names: Vec<String> = self.files.iter().map(|(_, n)| n.clone()).collect();
        names.sort();
        Ok((names, bytes))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
        if self.created_dir {
            // Only if empty: never remove what someone else put there meanwhile.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::Tensor;

    fn delta(
        kind: DeltaKind,
        a: Vec<f32>,
        a_shape: [usize; 2],
        b: Vec<f32>,
        b_shape: [usize; 2],
        s: f32,
    ) -> Delta {
        let pair = LoraPair {
            a: Tensor::from_vec(a, &a_shape).unwrap(),
            b: Tensor::from_vec(b, &b_shape).unwrap(),
        };
        Delta::new(kind, &pair, s, "test").unwrap()
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Round-to-nearest-even f32 → bf16 by integer arithmetic (finite inputs): an
    /// independent reference for half's conversion.
    fn rne_bf16(x: f32) -> f32 {
        let u = x.to_bits();
        f32::from_bits(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16)
    }

    #[test]
    fn delta_rows_match_a_naive_f64_product() {
        let (r, s) = (3, 1.75);
        // Linear: A [R, in], B [out, R], Δ [out, in] = s·B·A.
        // Embedding: A [R, V], B [C, R], Δ [V, C] = s·(B·A)ᵀ.
        for (kind, [rows, cols], (seed_a, seed_b)) in [
            (DeltaKind::Linear, [5, 7], (1, 2)),
            (DeltaKind::Embedding, [6, 4], (3, 4)),
        ] {
            let (a_cols, b_rows) = match kind {
                DeltaKind::Linear => (cols, rows),
                DeltaKind::Embedding => (rows, cols),
            };
            let (a, b) = (values(r * a_cols, seed_a), values(b_rows * r, seed_b));
            let d = delta(kind, a.clone(), [r, a_cols], b.clone(), [b_rows, r], s);
            assert_eq!(d.weight_shape(), [rows, cols]);
            let mut row = vec![0.0; cols];
            for i in 0..rows {
                d.row(i, &mut row);
                for (j, &got) in row.iter().enumerate() {
                    // Δ[i, j] = s·Σ_k B[bi, k]·A[k, aj]: (i, j) for a linear, (j, i) for the
                    // embedding's transpose.
                    let (bi, aj) = match kind {
                        DeltaKind::Linear => (i, j),
                        DeltaKind::Embedding => (j, i),
                    };
                    let want: f64 = (0..r)
                        .map(|k| b[bi * r + k] as f64 * a[k * a_cols + aj] as f64)
                        .sum::<f64>()
                        * s as f64;
                    assert!((got as f64 - want).abs() <= 1e-6, "{kind:?} [{i}, {j}]");
                }
            }
        }
    }

    #[test]
    fn bf16_linear_rounds_once_and_embedding_twice_as_peft() {
        // W = 1, Δ = 2^-8 + 2^-17: W + Δ rounds up to 1 + 2^-7 (past the halfway point);
        // Δ rounded to bf16 first is exactly 2^-8, and 1 + 2^-8 ties to even: 1.
        let d = 2f32.powi(-8) + 2f32.powi(-17);
        let lin = delta(DeltaKind::Linear, vec![d], [1, 1], vec![1.0], [1, 1], 1.0);
        let emb = delta(
            DeltaKind::Embedding,
            vec![d],
            [1, 1],
            vec![1.0],
            [1, 1],
            1.0,
        );
        let w = half::bf16::from_f32(1.0).to_bits().to_le_bytes();
        let mut buf = [0.0f32];
        let mut out = [0u8; 2];
        assert!(!merge_row(
            FloatDtype::Bf16,
            DeltaKind::Linear,
            &w,
            &lin,
            0,
            &mut buf,
            &mut out
        ));
        assert_eq!(FloatDtype::Bf16.read(&out), 1.0 + 2f32.powi(-7));
        assert!(!merge_row(
            FloatDtype::Bf16,
            DeltaKind::Embedding,
            &w,
            &emb,
            0,
            &mut buf,
            &mut out
        ));
        assert_eq!(FloatDtype::Bf16.read(&out), 1.0);

        // Many values against the integer RNE reference, in both dtype paths.
        let n = 64;
        let base: Vec<f32> = values(n, 9).iter().map(|x| rne_bf16(x * 3.0)).collect();
        let bytes: Vec<u8> = base
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        let (a, b) = (values(2 * n, 5), values(2, 6));
        let lin = delta(
            DeltaKind::Linear,
            a.clone(),
            [2, n],
            b.clone(),
            [1, 2],
            0.37,
        );
        // bf16 weights: the f32 sum rounded to nearest even; f32 weights: plain f32
        // arithmetic.
        let f32_bytes: Vec<u8> = base.iter().flat_map(|x| x.to_le_bytes()).collect();
        let bf16_rounded: fn(f32) -> f32 = rne_bf16;
        let exact: fn(f32) -> f32 = |x| x;
        for (dtype, bytes, round) in [
            (FloatDtype::Bf16, &bytes, bf16_rounded),
            (FloatDtype::F32, &f32_bytes, exact),
        ] {
            let size = bytes.len() / n;
            let (mut d, mut out) = (vec![0.0; n], vec![0u8; bytes.len()]);
            merge_row(dtype, DeltaKind::Linear, bytes, &lin, 0, &mut d, &mut out);
            for i in 0..n {
                let delta = (b[0] * a[i] + b[1] * a[n + i]) * 0.37;
                let got = dtype.read(&out[size * i..size * (i + 1)]);
                assert_eq!(got, round(base[i] + delta), "{dtype:?} [{i}]");
            }
        }
    }

    #[test]
    fn overflow_is_reported_but_a_stored_inf_is_not() {
        let big = delta(
            DeltaKind::Linear,
            vec![1e30, 1e30],
            [1, 2],
            vec![1e30],
            [1, 1],
            1.0,
        );
        let w: Vec<u8> = [1.0f32, f32::INFINITY]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let (mut d, mut out) = (vec![0.0; 2], vec![0u8; 8]);
        assert!(merge_row(
            FloatDtype::F32,
            DeltaKind::Linear,
            &w,
            &big,
            0,
            &mut d,
            &mut out
        ));
        let small = delta(
            DeltaKind::Linear,
            vec![1.0, 1.0],
            [1, 2],
            vec![1.0],
            [1, 1],
            1.0,
        );
        assert!(!merge_row(
            FloatDtype::F32,
            DeltaKind::Linear,
            &w,
            &small,
            0,
            &mut d,
            &mut out
        ));
        // bf16 overflows where f32 does not.
        let b = delta(
            DeltaKind::Linear,
            vec![3.4e38], // finite in f32, past bf16's largest (≈ 3.39e38)
            [1, 1],
            vec![1.0],
            [1, 1],
            1.0,
        );
        let w = half::bf16::from_f32(0.0).to_bits().to_le_bytes();
        let mut out = [0u8; 2];
        assert!(merge_row(
            FloatDtype::Bf16,
            DeltaKind::Linear,
            &w,
            &b,
            0,
            &mut d[..1],
            &mut out
        ));
    }

    #[test]
    fn natural_key_orders_as_transformers() {
        let mut names = vec![
            "model.layers.10.mlp.up_proj.weight",
            "model.norm.weight",
            "model.layers.2.self_attn.q_proj.weight",
            "lm_head.weight",
            "model.layers.2.input_layernorm.weight",
            "model.embed_tokens.weight",
            "model.layers.2.self_attn.q_proj.bias",
            "x.shard11",
            "x.shard2",
            "x.shard",
            "x.7",
        ];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(
            names,
            vec![
                "lm_head.weight",
                "model.embed_tokens.weight",
                "model.layers.2.input_layernorm.weight",
                "model.layers.2.self_attn.q_proj.bias",
                "model.layers.2.self_attn.q_proj.weight",
                "model.layers.10.mlp.up_proj.weight",
                "model.norm.weight",
                "x.7",
                "x.shard",
                "x.shard2",
                "x.shard11",
            ]
        );
        // Leading zeros and lengths beyond u64 compare by value.
        assert!(natural_key("a.007") < natural_key("a.10"));
        assert!(
            natural_key("a.99999999999999999999999") < natural_key("a.100000000000000000000000")
        );
    }

    fn sized(bytes: &[usize]) -> Vec<OutTensor> {
        bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| OutTensor {
                name: format!("t{i}"),
                dtype: Dtype::U8,
                shape: vec![b],
                source: Source::Stored(String::new()),
            })
            .collect()
    }

    #[test]
    fn shards_fill_in_order_as_huggingface_hub() {
        // huggingface_hub's own example: [6, 6, 2, 6, 2, 2] at 10 → [6], [6+2], [6+2+2].
        let t = sized(&[6, 6, 2, 6, 2, 2]);
        assert_eq!(
            shard_files(&t, 10),
            vec![vec![0], vec![1, 2], vec![3, 4, 5]]
        );
        // A tensor above the limit goes alone, before the shard being filled.
        let t = sized(&[3, 12, 4, 5]);
        assert_eq!(shard_files(&t, 10), vec![vec![1], vec![0, 2], vec![3]]);
        assert_eq!(shard_files(&t, 100), vec![vec![0, 1, 2, 3]]);
        assert_eq!(shard_files(&[], 10), vec![Vec::<usize>::new()]);
    }

    #[test]
    fn same_delta_recognises_the_transposed_pair() {
        let (r, v, c) = (2, 5, 3);
        let (a, b) = (values(r * v, 1), values(c * r, 2));
        let emb = delta(
            DeltaKind::Embedding,
            a.clone(),
            [r, v],
            b.clone(),
            [c, r],
            2.0,
        );
        let t = |x: &[f32], rows: usize, cols: usize| -> Vec<f32> {
            (0..cols)
                .flat_map(|j| (0..rows).map(move |i| (i, j)))
                .map(|(i, j)| x[i * cols + j])
                .collect()
        };
        // Head: A [R, C] = Bᵀ, B [V, R] = Aᵀ.
        let head_with_b =
            |head_b: Vec<f32>| delta(DeltaKind::Linear, t(&b, c, r), [r, c], head_b, [v, r], 2.0);
        let head = head_with_b(t(&a, r, v));
        assert!(same_delta(&emb, &head));
        let mut other = t(&a, r, v);
        other[3] += 1.0;
        assert!(!same_delta(&emb, &head_with_b(other)));
        // Same delta row by row.
        let (mut x, mut y) = (vec![0.0; c], vec![0.0; c]);
        for row in 0..v {
            emb.row(row, &mut x);
            head.row(row, &mut y);
            for (p, q) in x.iter().zip(&y) {
                assert!((p - q).abs() <= 1e-6);
            }
        }
    }

    #[test]
    fn untied_config_keeps_every_other_field_in_order() {
        let path = Path::new("config.json");
        let text = br#"{"model_type": "gemma", "b": [1, 2], "a": {"x": null}}"#;
        let out = untied_config(text, path).unwrap();
        assert_eq!(
            out,
            "{\n  \"model_type\": \"gemma\",\n  \"b\": [\n    1,\n    2\n  ],\n  \"a\": {\n    \"x\": null\n  },\n  \"tie_word_embeddings\": false\n}\n"
        );
        let out = untied_config(br#"{"tie_word_embeddings": true, "z": 1}"#, path).unwrap();
        assert_eq!(out, "{\n  \"tie_word_embeddings\": false,\n  \"z\": 1\n}\n");
        let e = untied_config(b"[1]", path).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("object"), "{e}");
    }

    #[test]
    fn staging_renames_on_commit_and_cleans_up_otherwise() {
        let tmp = crate::testutil::temp_dir("merge-staging");
        let dir = tmp.join("out");
        let mut s = Staging::new(&dir).unwrap();
        s.write("config.json", b"{}").unwrap();
        s.write("a.txt", b"abc").unwrap();
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            2,
            "only temp files so far"
        );
        assert!(!dir.join("config.json").exists());
        let (files, bytes) = s.commit().unwrap();
        assert_eq!(files, vec!["a.txt", "config.json"]);
        assert_eq!(bytes, 5);
        assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"abc");

        // Not empty now.
        let e = Staging::new(&dir).err().unwrap().to_string();
        assert!(e.contains("already holds a model"), "{e}");
        // Dropped uncommitted: temp files and the folder it made are removed.
        let dir2 = tmp.join("out2");
        let mut s = Staging::new(&dir2).unwrap();
        s.write("x", b"1").unwrap();
        drop(s);
        assert!(!dir2.exists());
        // A file where the folder should be.
        std::fs::write(tmp.join("file"), "x").unwrap();
        assert!(Staging::new(&tmp.join("file")).is_err());
    }
}
