//! [`Model`]: a loaded decoder — embedding, layers, final norm, LM head — with the forward
//! passes the scorer, the sampler and the trainer build on.
//!
//! On the CPU the weights are f32; on a GPU they are bf16 (as an HF model loaded with
//! `dtype=torch.bfloat16`) and every activation stays on the device: the forward is the same
//! sequence of engine ops on both (see `decoder.rs`), only the completion log-probs come back.

use std::path::{Path, PathBuf};

use engine::cuda::CudaBackend;
use engine::ops::{self, LogProbChunks, Rope, SeqLayout, TokenStats};
use engine::{Device, EngineError, Indices, Tensor};

use crate::config::ModelConfig;
use crate::decoder::{DecoderLayer, LayerCtx};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::profile::{OpKind, OpTimes, Profiler};
use crate::weights::Checkpoint;

/// A decoder-only language model of one of the supported families: f32 weights on the CPU,
/// bf16 on a GPU.
#[derive(Clone, Debug)]
pub struct Model {
    config: ModelConfig,
    dir: PathBuf,
    rope: Rope,
    /// The embedding multiplier in the weights' precision (Gemma's sqrt(C) is rounded to bf16
    /// on a GPU, as HF rounds it to the model dtype); 1 for the other families.
    embed_scale: f32,
    pub(crate) embed_tokens: Tensor,      // [V, C]
    pub(crate) layers: Vec<DecoderLayer>, // [L]
    pub(crate) norm: Tensor,              // [C]
    /// The embedding table itself when tied (shared storage, not a copy).
    pub(crate) lm_head: Tensor, // [V, C]
    pub(crate) chunks: LogProbChunks,
    pub(crate) profiler: Profiler,
}

impl Model {
    /// Loads `dir`'s config.json and safetensors checkpoint onto `device`.
    ///
    /// On `Device::Cuda(n)` the GPU is set up first (a missing CUDA library or GPU is the
    /// engine's error, naming it), then each weight is uploaded as bf16 straight from the
    /// memory-mapped checkpoint, one tensor at a time.
    pub fn load(dir: &Path, device: Device) -> Result<Model> {
        let _span = tracing::info_span!("load model", dir = %dir.display(), %device).entered();
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        if let Device::Cuda(ordinal) = device {
            let backend = CudaBackend::get(ordinal).map_err(|e| ModelError::Device {
                device,
                error: EngineError::from(e),
            })?;
            tracing::info!(gpu = backend.name(), arch = %backend.arch(), "CUDA device ready");
        }
        let mut ck = Checkpoint::open(dir)?;
        let (v, c) = (config.vocab_size, config.hidden_size);
        let embed_tokens = ck.tensor_on("model.embed_tokens.weight", &[v, c], device)?;
        let layers = (0..config.num_layers)
            .map(|i| DecoderLayer::load(&mut ck, &config, i, device))
            .collect::<Result<Vec<_>>>()?;
        let norm = ck.tensor_on("model.norm.weight", &[c], device)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            ck.tensor_on("lm_head.weight", &[v, c], device)?
        };
        ck.warn_unused();
        let rope = Rope::new(config.head_dim, config.rope_theta, &config.rope_scaling);
        let embed_scale = match device {
            Device::Cpu => config.arch.embed_scale,
            Device::Cuda(_) => half::bf16::from_f32(config.arch.embed_scale).to_f32(),
        };
        tracing::info!(
            family = %config.family,
            layers = config.num_layers,
            hidden = c,
            vocab = v,
            "model loaded"
        );
        Ok(Model {
            config,
            dir: dir.to_path_buf(),
            rope,
            embed_scale,
            embed_tokens,
            layers,
            norm,
            lm_head,
            chunks: LogProbChunks::default(),
            profiler: Profiler::default(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The directory the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// The LM head's weight, [V, C] (the embedding table when tied).
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The multiplier applied to the embeddings (see [`crate::Arch::embed_scale`]), in the
    /// precision the forward uses on this model's device.
    pub fn embed_scale(&self) -> f32 {
        self.embed_scale
    }

    /// Starts timing every op of the forwards that follow (clones of this model share the
    /// switch); see [`Model::stop_profile`].
    pub fn start_profile(&self) {
        self.profiler.start();
    }

    /// Stops timing and returns the time per op kind since [`Model::start_profile`].
    pub fn stop_profile(&self) -> OpTimes {
        self.profiler.stop()
    }

    /// Token ids → scaled embeddings, [T, C]. Ids must be < V.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        self.embed_indexed(&ids.into())
    }

    fn embed_indexed(&self, ids: &Indices) -> Result<Tensor> {
        self.check_ids(ids)?;
        self.profiler.run(OpKind::Embedding, self.device(), || {
            ops::embedding_indices(&self.embed_tokens, ids, self.embed_scale)
        })
    }

    pub(crate) fn ctx<'a>(&'a self, positions: &'a Indices, layout: &'a SeqLayout) -> LayerCtx<'a> {
        LayerCtx {
            cfg: &self.config,
            rope: &self.rope,
            positions,
            layout,
            prof: &self.profiler,
        }
    }

    /// Decoder layer `layer` on x: [Tq, C] → [Tq, C]. A function of its inputs (and the cache
    /// it appends to), so a trainer can recompute it from the saved layer input.
    pub fn layer_forward(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &[u32],
        layout: &SeqLayout,
        cache: Option<&mut dyn KvCache>,
    ) -> Result<Tensor> {
        let l = self.layers.get(layer).ok_or_else(|| ModelError::Input {
            what: "layer_forward",
            msg: format!(
                "layer {layer} out of range (the model has {})",
                self.layers.len()
            ),
        })?;
        let positions = Indices::from(positions);
        l.forward(&self.ctx(&positions, layout), x, cache)
    }

    /// The final norm, [T, C] → [T, C].
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.ctx(&Indices::default(), &SeqLayout::prefill(&[]))
            .norm(x, &self.norm)
    }

    /// Prefill forward of whole packed sequences: ids, positions: [T] → final-normed hidden
    /// states [T, C]. `layout` must have queries == keys (use [`SeqLayout::prefill`]).
    pub fn forward(&self, ids: &[u32], positions: &[u32], layout: &SeqLayout) -> Result<Tensor> {
        self.check_layout(ids, positions, layout, false)?;
        let _span = tracing::debug_span!("forward", tokens = ids.len()).entered();
        self.run_layers(&ids.into(), &positions.into(), layout, None)
    }

    /// Forward of new tokens against a KV cache (prefill, chunked prefill or decode): each
    /// sequence's queries are the last `q_len` of its `kv_len` positions. Returns the
    /// final-normed hidden states of the new tokens, [Tq, C].
    pub fn forward_cached(
        &self,
        ids: &[u32],
        positions: &[u32],
        layout: &SeqLayout,
        cache: &mut dyn KvCache,
    ) -> Result<Tensor> {
        self.forward_cached_indexed(&ids.into(), &positions.into(), layout, cache)
    }

    /// [`Model::forward_cached`] with ids and positions whose device copies may be staged
    /// already (`engine::Staging`): a step then makes no uploads of its own, which is what
    /// lets a runner capture it into a CUDA graph.
    pub fn forward_cached_indexed(
        &self,
        ids: &Indices,
        positions: &Indices,
        layout: &SeqLayout,
        cache: &mut dyn KvCache,
    ) -> Result<Tensor> {
        self.check_layout(ids, positions, layout, true)?;
        self.run_layers(ids, positions, layout, Some(cache))
    }

    /// Embedding, every layer, final norm. Each residual add is fused with the norm that
    /// follows it (the next layer's input norm, or the final norm).
    fn run_layers(
        &self,
        ids: &Indices,
        positions: &Indices,
        layout: &SeqLayout,
        mut cache: Option<&mut dyn KvCache>,
    ) -> Result<Tensor> {
        let ctx = self.ctx(positions, layout);
        let mut x = self.embed_indexed(ids)?; // [T, C]
        let Some(first) = self.layers.first() else {
            return ctx.norm(&x, &self.norm);
        };
        let mut h = ctx.norm(&x, &first.input_layernorm)?; // [T, C]
        for (i, layer) in self.layers.iter().enumerate() {
            let _span = tracing::trace_span!("layer", index = layer.index).entered();
            let next_norm = match self.layers.get(i + 1) {
                Some(next) => &next.input_layernorm,
                None => &self.norm,
            };
            let (x_out, h_out) = layer.forward_normed(
                &ctx,
                &x,
                h,
                cache.as_mut().map(|c| &mut **c as &mut dyn KvCache),
                Some(next_norm),
                None,
                None,
            )?;
            x = x_out;
            h = h_out.ok_or_else(|| ModelError::Input {
                what: "forward",
                msg: "a layer did not return the normed output it was asked for".into(),
            })?;
        }
        Ok(h)
    }

    /// Log-prob of each target under the next-token distribution of each hidden row, plus
    /// entropy, mean logit and argmax (the final soft-cap applied). hidden: [T, C], targets: [T].
    pub fn token_stats(&self, hidden: &Tensor, targets: &[u32]) -> Result<TokenStats> {
        self.check_ids(targets)?;
        self.profiler.run(OpKind::LmHead, hidden.device(), || {
            ops::token_logprobs(
                hidden,
                &self.lm_head,
                targets,
                self.config.arch.final_softcap,
                self.chunks,
            )
        })
    }

    /// Full (soft-capped) logits of a few rows, for sampling: hidden [B, C] → [B, V].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.profiler.run(OpKind::Logits, hidden.device(), || {
            ops::logits(hidden, &self.lm_head, self.config.arch.final_softcap)
        })
    }

    /// Rows `rows` of x: [T, C] → [rows.len(), C], on x's device (a gather on the GPU: the
    /// rows never pass through the host).
    pub fn select_rows(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let [t, _] = x.dims::<2>("select_rows", "x: [T, C]")?;
        let rows = rows
            .iter()
            .map(|&r| {
                u32::try_from(r)
                    .ok()
                    .filter(|_| r < t)
                    .ok_or_else(|| ModelError::Input {
                        what: "select_rows",
                        msg: format!("row {r} out of range ({t} rows)"),
                    })
            })
            .collect::<Result<Vec<u32>>>()?;
        // A gather of rows is an embedding lookup in x with scale 1 (exact).
        self.profiler
            .run(OpKind::Gather, x.device(), || ops::embedding(x, &rows, 1.0))
    }

    /// Scores `(prompt, completion)` pairs packed into one forward: for each, the stats of
    /// its completion tokens, log p(c_t | prompt, c_<t). Prompts must not be empty (the first
    /// completion token needs a context); an empty completion gets empty stats.
    ///
    /// Only the hidden rows whose next token is a completion token go through the LM head
    /// (gathered on the model's device); a [T × V] logits tensor never exists.
    pub fn completion_stats(&self, seqs: &[(&[u32], &[u32])]) -> Result<Vec<TokenStats>> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut lens = Vec::with_capacity(seqs.len());
        let mut rows = Vec::new(); // hidden rows whose next token is a completion token
        let mut targets = Vec::new();
        for (b, (prompt, completion)) in seqs.iter().enumerate() {
            if prompt.is_empty() {
                return Err(ModelError::Input {
                    what: "completion_stats",
                    msg: format!(
                        "sequence {b} has an empty prompt: its first completion token has no context"
                    ),
                });
            }
            let start = ids.len();
            let len = prompt.len() + completion.len();
            rows.extend((0..completion.len()).map(|t| start + prompt.len() - 1 + t));
            targets.extend_from_slice(completion);
            ids.extend_from_slice(prompt);
            ids.extend_from_slice(completion);
            positions.extend(0..len as u32);
            lens.push(len);
        }
        let mut out = Vec::with_capacity(seqs.len());
        if targets.is_empty() {
            out.resize(seqs.len(), TokenStats::default());
            return Ok(out);
        }
        let hidden = self.forward(&ids, &positions, &SeqLayout::prefill(&lens))?;
        let selected = self.select_rows(&hidden, &rows)?; // [rows, C]
        drop(hidden);
        let stats = self.token_stats(&selected, &targets)?;
        let mut at = 0;
        for (_, completion) in seqs {
            let n = completion.len();
            out.push(TokenStats {
                logp: stats.logp[at..at + n].to_vec(),
                entropy: stats.entropy[at..at + n].to_vec(),
                mean_logit: stats.mean_logit[at..at + n].to_vec(),
                argmax: stats.argmax[at..at + n].to_vec(),
            });
            at += n;
        }
        Ok(out)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.config.vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(&id) => Err(ModelError::TokenOutOfVocab { id, vocab }),
            None => Ok(()),
        }
    }

    /// Ids, positions and layout must describe the same tokens; without a cache the layout
    /// must be a prefill.
    fn check_layout(
        &self,
        ids: &[u32],
        positions: &[u32],
        layout: &SeqLayout,
        cached: bool,
    ) -> Result<()> {
        let bad = |msg: String| ModelError::Input {
            what: "forward",
            msg,
        };
        if ids.len() != positions.len() {
            return Err(bad(format!(
                "{} ids but {} positions",
                ids.len(),
                positions.len()
            )));
        }
        let (q, kv) = (&layout.q_starts, &layout.kv_starts);
        if q.is_empty() || q.len() != kv.len() || q[0] != 0 || kv[0] != 0 {
            return Err(bad(
                "layout needs q_starts and kv_starts of equal length, starting at 0".into(),
            ));
        }
        for b in 0..q.len() - 1 {
            if q[b + 1] < q[b] || kv[b + 1] < kv[b] || q[b + 1] - q[b] > kv[b + 1] - kv[b] {
                return Err(bad(format!(
                    "sequence {b}: starts must not decrease and q_len must be <= kv_len"
                )));
            }
        }
        if q[q.len() - 1] != ids.len() {
            return Err(bad(format!(
                "layout covers {} query tokens but {} ids were given",
                q[q.len() - 1],
                ids.len()
            )));
        }
        if !cached && q != kv {
            return Err(bad(
                "a forward without a KV cache needs a prefill layout (queries == keys)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::CpuKvCache;
    use crate::reference::reference_completion;
    use crate::testutil::{Rng, Store, family_configs, temp_dir, write_random_model};

    fn random_model(name: &str, config: &serde_json::Value, store: Store) -> Model {
        let dir = temp_dir(&format!("model-{name}"));
        write_random_model(&dir, config, 11, store);
        Model::load(&dir, Device::Cpu).unwrap()
    }

    fn random_ids(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| ((rng.next() + 1.0) * 0.5 * vocab as f32) as u32 % vocab as u32)
            .collect()
    }

    /// Prompt/completion pairs of assorted lengths, longer than the test windows.
    fn pairs(rng: &mut Rng, vocab: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
        [(1, 5), (4, 3), (7, 0), (2, 8), (3, 1)]
            .iter()
            .map(|&(p, c)| (random_ids(rng, p, vocab), random_ids(rng, c, vocab)))
            .collect()
    }

    fn as_refs(pairs: &[(Vec<u32>, Vec<u32>)]) -> Vec<(&[u32], &[u32])> {
        pairs
            .iter()
            .map(|(p, c)| (p.as_slice(), c.as_slice()))
            .collect()
    }

    /// Every family's packed forward + chunked log-softmax against the naive f64 decoder:
    /// log-probs within 1e-4 (f32 accumulation over these small sizes stays far below), and
    /// the argmax identical.
    #[test]
    fn completion_stats_match_the_f64_reference_in_every_family() {
        let mut failures = Vec::new();
        for (name, config) in family_configs() {
            for store in [Store::F32, Store::Bf16] {
                let model = random_model(name, &config, store);
                let mut rng = Rng::new(5);
                let pairs = pairs(&mut rng, model.config().vocab_size);
                let stats = model.completion_stats(&as_refs(&pairs)).unwrap();
                for ((prompt, completion), got) in pairs.iter().zip(&stats) {
                    let (logp, argmax) = reference_completion(&model, prompt, completion);
                    assert_eq!(got.logp.len(), completion.len());
                    for (t, (g, w)) in got.logp.iter().zip(&logp).enumerate() {
                        if (*g as f64 - w).abs() >= 1e-4 {
                            failures.push(format!(
                                "{name} (prompt {}): token {t}: {g} vs {w}",
                                prompt.len()
                            ));
                        }
                    }
                    if got.argmax != argmax {
                        failures.push(format!("{name}: argmax {:?} vs {argmax:?}", got.argmax));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn packing_does_not_change_scores() {
        for (name, config) in family_configs() {
            let model = random_model(name, &config, Store::F32);
            let mut rng = Rng::new(9);
            let pairs = pairs(&mut rng, model.config().vocab_size);
            let together = model.completion_stats(&as_refs(&pairs)).unwrap();
            for (pair, joint) in pairs.iter().zip(&together) {
                let alone = model.completion_stats(&[(&pair.0, &pair.1)]).unwrap();
                for (a, b) in alone[0].logp.iter().zip(&joint.logp) {
                    assert!((a - b).abs() < 1e-5, "{name}: {a} vs {b}");
                }
            }
        }
    }

    fn assert_close(a: &Tensor, b: &[f32], what: &str) {
        let a = a.as_slice().unwrap();
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-4, "{what}: element {i}: {x} vs {y}");
        }
    }

    /// Prefill of whole sequences == prefill of a part, a chunk, then token-by-token decode
    /// through the KV cache, for two sequences of different lengths in one batch.
    #[test]
    fn kv_cache_steps_equal_full_prefill() {
        for (name, config) in family_configs() {
            let model = random_model(name, &config, Store::F32);
            let c = model.config().hidden_size;
            let mut rng = Rng::new(2);
            let a = random_ids(&mut rng, 9, model.config().vocab_size);
            let b = random_ids(&mut rng, 6, model.config().vocab_size);
            let full = |ids: &[u32]| {
                let pos: Vec<u32> = (0..ids.len() as u32).collect();
                model
                    .forward(ids, &pos, &SeqLayout::prefill(&[ids.len()]))
                    .unwrap()
                    .to_vec()
                    .unwrap()
            };
            let (full_a, full_b) = (full(&a), full(&b));
            let mut cache = CpuKvCache::new(model.config(), 2);
            // Steps: (tokens of a, tokens of b) per forward.
            let steps: [(usize, usize); 6] = [(3, 2), (2, 1), (1, 1), (1, 1), (1, 1), (1, 0)];
            let (mut done_a, mut done_b) = (0, 0);
            for (na, nb) in steps {
                let ids: Vec<u32> = a[done_a..done_a + na]
                    .iter()
                    .chain(&b[done_b..done_b + nb])
                    .copied()
                    .collect();
                let pos: Vec<u32> = (done_a..done_a + na)
                    .chain(done_b..done_b + nb)
                    .map(|p| p as u32)
                    .collect();
                let layout = SeqLayout {
                    q_starts: vec![0, na, na + nb],
                    kv_starts: vec![0, done_a + na, done_a + na + done_b + nb],
                };
                let h = model
                    .forward_cached(&ids, &pos, &layout, &mut cache)
                    .unwrap();
                let want: Vec<f32> = full_a[done_a * c..(done_a + na) * c]
                    .iter()
                    .chain(&full_b[done_b * c..(done_b + nb) * c])
                    .copied()
                    .collect();
                assert_close(
                    &h,
                    &want,
                    &format!("{name}: step at a={done_a}, b={done_b}"),
                );
                done_a += na;
                done_b += nb;
            }
            assert_eq!((done_a, done_b), (a.len(), b.len()));
            assert_eq!((cache.seq_len(0), cache.seq_len(1)), (9, 6));
        }
    }

    #[test]
    fn kv_cache_rejects_inconsistent_layouts() {
        let (name, config) = &family_configs()[0];
        let model = random_model(name, config, Store::F32);
        let mut cache = CpuKvCache::new(model.config(), 1);
        // kv_len 3 but nothing cached and 1 new token.
        let layout = SeqLayout {
            q_starts: vec![0, 1],
            kv_starts: vec![0, 3],
        };
        let e = model
            .forward_cached(&[1], &[2], &layout, &mut cache)
            .unwrap_err()
            .to_string();
        assert!(e.contains("kv cache") && e.contains("kv_len"), "{e}");
        let e = model
            .forward_cached(&[1, 2], &[0, 1], &SeqLayout::prefill(&[1, 1]), &mut cache)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 sequences"), "{e}");
    }

    #[test]
    fn input_errors() {
        let (name, config) = &family_configs()[0];
        let model = random_model(name, config, Store::F32);
        let v = model.config().vocab_size as u32;
        let e = model
            .completion_stats(&[(&[1], &[v])])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("token id {v}")) && e.contains("vocab"),
            "{e}"
        );
        let e = model
            .completion_stats(&[(&[], &[1])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty prompt"), "{e}");
        let e = model
            .forward(&[1, 2], &[0], &SeqLayout::prefill(&[2]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("positions"), "{e}");
        let layout = SeqLayout {
            q_starts: vec![0, 1],
            kv_starts: vec![0, 2],
        };
        let e = model.forward(&[1], &[1], &layout).unwrap_err().to_string();
        assert!(e.contains("prefill layout"), "{e}");
        // Only empty completions: no forward needed.
        let out = model.completion_stats(&[(&[1], &[])]).unwrap();
        assert_eq!(out, vec![TokenStats::default()]);
    }

    /// Without CUDA libraries (CI, a CPU machine) loading onto a GPU is a clear error naming
    /// the missing library, not a panic; with them, the model lands on the GPU.
    #[test]
    fn cuda_load_without_a_gpu_is_a_clear_error() {
        let (name, config) = &family_configs()[0];
        let dir = temp_dir(&format!("cuda-{name}"));
        write_random_model(&dir, config, 3, Store::F32);
        match Model::load(&dir, Device::Cuda(0)) {
            Ok(model) => assert_eq!(model.device(), Device::Cuda(0)),
            Err(e) => {
                let e = e.to_string();
                assert!(e.starts_with("device cuda:0: "), "{e}");
                if !engine::cuda::Library::Driver.is_present() {
                    assert!(e.contains("libcuda.so not found"), "{e}");
                }
            }
        }
    }

    fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
        let path = dir.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(v.as_object_mut().unwrap());
        std::fs::write(&path, v.to_string()).unwrap();
    }

    #[test]
    fn load_errors_name_the_tensor() {
        let (_, config) = &family_configs()[0];
        let dir = temp_dir("load-shape");
        write_random_model(&dir, config, 1, Store::F32);
        edit_config(&dir, |m| {
            m.insert("intermediate_size".into(), 41.into());
        });
        let e = Model::load(&dir, Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[41, 24]"),
            "{e}"
        );

        // A tied checkpoint loaded as untied lacks lm_head.weight.
        let (_, tied) = &family_configs()[1];
        let dir = temp_dir("load-untied");
        write_random_model(&dir, tied, 1, Store::F32);
        edit_config(&dir, |m| {
            m.insert("tie_word_embeddings".into(), false.into());
        });
        let e = Model::load(&dir, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");

        let dir = temp_dir("load-noconfig");
        let e = Model::load(&dir, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
    }

    #[test]
    fn tied_head_is_the_embedding() {
        let (name, config) = &family_configs()[1];
        let model = random_model(name, config, Store::F32);
        assert!(model.config().tie_word_embeddings);
        assert_eq!(
            model.lm_head().as_slice().unwrap().as_ptr(),
            model.embed_tokens.as_slice().unwrap().as_ptr()
        );
    }

    #[test]
    fn logits_agree_with_token_stats() {
        let (name, config) = &family_configs()[5]; // gemma2: final soft-cap on
        let model = random_model(name, config, Store::F32);
        let ids = [3u32, 9, 27, 4];
        let pos = [0u32, 1, 2, 3];
        let h = model
            .forward(&ids, &pos, &SeqLayout::prefill(&[4]))
            .unwrap();
        let logits = model.logits(&h).unwrap().to_vec().unwrap();
        let targets = [1u32, 2, 3, 4];
        let stats = model.token_stats(&h, &targets).unwrap();
        let v = model.config().vocab_size;
        for t in 0..4 {
            let row = &logits[t * v..(t + 1) * v];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + row.iter().map(|l| (l - m).exp()).sum::<f32>().ln();
            assert!((row[targets[t] as usize] - lse - stats.logp[t]).abs() < 1e-5);
        }
    }
}
