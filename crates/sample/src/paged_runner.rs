//! [`PagedRunner`]: a [`model::Model`] on any device — a GPU above all — behind the engine's
//! [`StepModel`] trait, its KV cache in the engine's paged pools (`engine::ops::kv_pool`:
//! bf16 on a GPU, f32 on the CPU), one K and one V pool `[num_blocks, block_size, Hkv, D]`
//! per layer.
//!
//! One step:
//! 1. the scheduler's block tables → one [`PagedLayout`] (slots of the new tokens, tables,
//!    context lengths), built once and shared by every layer;
//! 2. the model's cached forward over the packed batch (prefill chunks and decode tokens
//!    together): each layer writes its new keys and values into their slots with
//!    `paged_kv_write`, then `paged_attention` reads every position of each sequence through
//!    the block tables in place (or, with `PREFER_PAGED_KV=gather`, from a gathered packed
//!    copy: see [`KvRead`] and [`PagedView`]);
//! 3. the last hidden row of each sequence, gathered on the device, through the LM head:
//!    logits [B, V], f32 on the device;
//! 4. when every sampling row's parameters allow it (`StepModel::step_top`), the device ranks
//!    each row (`engine::ops::top_k_candidates`) and only the top candidates and the lse
//!    cross to the host, where `candidates.rs` draws exactly what the full pipeline would;
//!    else (penalties, min_p, min_tokens, no top_k, or a row the candidates cannot decide)
//!    one copy of the whole logits, where the engine's CPU sampler (the reference semantics
//!    of every processor) draws the next tokens.
//!
//! On the CPU the same code runs the engine's f32 reference ops, so the CI tests of this
//! runner (HF greedy parity on every fixture model) check the slot mapping, the block
//! tables and the layout that the GPU kernels read.
//!
//! GPU memory ([`plan_gpu_memory`]) is sized as vLLM sizes it: profile the largest step
//! (a prefill of `max_num_batched_tokens` tokens, then `max_num_seqs` rows of logits), then
//! the pools get `total × gpu_memory_utilization` minus everything in use at that point
//! (weights, the arena's cached activations, cuBLASLt's workspace, the context), less one
//! layer's share kept for the gathered-copy path.
//!
//! `PREFER_STEP_TRACE=FILE` makes the runner write one tab-separated line per step (batch
//! size, new tokens, context tokens, host enqueue time, GPU wait, logits copy): what the
//! benchmark's decode-limit ratio and launch-overhead figures are computed from.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use engine::cuda::CudaBackend;
use engine::ops::{self, AttentionOut, AttentionParams, PagedLayout, RowTokens, SeqLayout};
use engine::{Device, EngineError, Indices, Staging, Tensor};
use model::{KvCache, Model, ModelError, OpTimes};

use crate::decode_graph::DecodeGraphs;
use crate::engine::{KvGeometry, StepBatch, StepLogits, StepModel};
use crate::error::{Result, SampleError};
use crate::model_runner::pool_and_context;

/// The environment variable naming the per-step trace file.
pub const STEP_TRACE_ENV: &str = "PREFER_STEP_TRACE";

/// The environment variable that turns CUDA graphs off (`0`), like `--enforce-eager`.
pub const CUDA_GRAPHS_ENV: &str = "PREFER_CUDA_GRAPHS";

/// The environment variable (`1`) that times every op of the decode steps (CUDA graphs off,
/// each op waiting for the one before): where a decode step's GPU time goes, in the time
/// summary.
pub const PROFILE_ENV: &str = "PREFER_PROFILE";

/// One layer's keys and values.
pub(crate) struct LayerPool {
    k: Tensor, // [num_blocks, block_size, Hkv, D]
    v: Tensor, // [num_blocks, block_size, Hkv, D]
}

/// Where a runner's time went, summed over its steps (seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunnerTimes {
    pub steps: u64,
    /// Host time to build the layout and queue the forward and the LM head (on a GPU the
    /// kernels run meanwhile; when this is close to `enqueue + wait`, the step is bound by
    /// kernel launches, not by the GPU).
    pub enqueue: f64,
    /// Waiting for the GPU to finish the queued work (only measured with a step trace; else
    /// part of `copy`).
    pub wait: f64,
    /// Copying the logits to the host (or, in candidate steps, ranking them on the device
    /// and copying each row's top candidates).
    pub copy: f64,
    /// Steps that copied only each row's top candidates (`StepModel::step_top` on a GPU).
    pub candidate_steps: u64,
    /// Candidate steps that then copied the whole logits too, for rows the candidates could
    /// not decide.
    pub full_copies: u64,
    /// Steps run as one launch of a captured CUDA graph.
    pub graph_steps: u64,
    /// Graphs captured.
    pub graph_captures: u64,
}

pub struct PagedRunner {
    model: Model,
    device: Device,
    pools: Vec<LayerPool>, // [L]
    block_size: usize,
    num_blocks: usize,
    max_model_len: usize,
    read: KvRead,
    trace: Option<StepTrace>,
    times: RunnerTimes,
    /// The last candidate step's device logits [≥ B, V], for `last_full_logits`, and B.
    last_logits: Option<(Tensor, usize)>,
    /// One copy per step of its small arrays (ids, positions, layout, slots).
    staging: Staging,
    /// Decode steps as CUDA graphs (a GPU, unless turned off).
    graphs: Option<DecodeGraphs>,
    /// The decode steps' time per op kind, when profiling ([`PROFILE_ENV`]).
    profile: Option<(OpTimes, u64)>,
}

impl PagedRunner {
    /// A runner with `num_blocks` blocks of `block_size` positions, allocated on the
    /// model's device. The context is the config's `max_position_embeddings`, or
    /// `max_model_len` if given and smaller.
    pub fn new(
        model: Model,
        block_size: usize,
        num_blocks: usize,
        max_model_len: Option<usize>,
    ) -> Result<Self> {
        let max_model_len = pool_and_context(&model, block_size, num_blocks, max_model_len)?;
        let device = model.device();
        let c = model.config();
        let (hkv, d) = (c.num_kv_heads, c.head_dim);
        let pools = (0..c.num_layers)
            .map(|_| {
                Ok(LayerPool {
                    k: ops::kv_pool(num_blocks, block_size, hkv, d, device)?,
                    v: ops::kv_pool(num_blocks, block_size, hkv, d, device)?,
                })
            })
            .collect::<std::result::Result<Vec<_>, engine::EngineError>>()
            .map_err(SampleError::model)?;
        let profile = env_switch(PROFILE_ENV, false)?;
        let trace = match std::env::var_os(STEP_TRACE_ENV) {
            Some(path) if !path.is_empty() => Some(StepTrace::create(PathBuf::from(path))?),
            _ => None,
        };
        Ok(Self {
            model,
            device,
            pools,
            block_size,
            num_blocks,
            max_model_len,
            read: KvRead::from_env()?,
            trace,
            times: RunnerTimes::default(),
            last_logits: None,
            staging: Staging::new(device),
            graphs: match device {
                Device::Cuda(n) if env_switch(CUDA_GRAPHS_ENV, true)? && !profile => {
                    Some(DecodeGraphs::new(n)?)
                }
                _ => None,
            },
            profile: profile.then(|| (OpTimes::default(), 0)),
        })
    }

    /// Turns CUDA graphs for decode steps on or off (on by default on a GPU, unless
    /// `PREFER_CUDA_GRAPHS=0`); off, every step runs its kernels one by one (vLLM's
    /// `--enforce-eager`).
    pub fn set_cuda_graphs(&mut self, on: bool) -> Result<()> {
        self.graphs = match (on, self.device) {
            (true, Device::Cuda(n)) => match self.graphs.take() {
                Some(g) => Some(g),
                None => Some(DecodeGraphs::new(n)?),
            },
            _ => None,
        };
        Ok(())
    }

    /// Bytes one block of `block_size` positions takes over all layers, keys and values, in
    /// the precision of `device` (bf16 on a GPU, f32 on the CPU).
    pub fn bytes_per_block(model: &Model, block_size: usize) -> usize {
        let c = model.config();
        let elem = match model.device() {
            Device::Cpu => 4,
            Device::Cuda(_) => 2,
        };
        2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * elem
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// How the layers read the cache (from `PREFER_PAGED_KV` at construction).
    pub fn kv_read(&self) -> KvRead {
        self.read
    }

    /// Overrides how the layers read the cache.
    pub fn set_kv_read(&mut self, read: KvRead) {
        self.read = read;
    }

    /// Where the steps' time went so far.
    pub fn times(&self) -> RunnerTimes {
        self.times
    }

    /// The device's stream, to wait on (None on the CPU).
    fn backend(&self) -> Result<Option<std::sync::Arc<CudaBackend>>> {
        match self.device {
            Device::Cpu => Ok(None),
            Device::Cuda(n) => CudaBackend::get(n)
                .map(Some)
                .map_err(|e| SampleError::model(engine::EngineError::from(e))),
        }
    }
}

impl StepModel for PagedRunner {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    fn kv_geometry(&self) -> KvGeometry {
        KvGeometry {
            block_size: self.block_size,
            num_blocks: self.num_blocks,
        }
    }

    fn time_summary(&self) -> Option<String> {
        let t = self.times;
        let n = t.steps.max(1) as f64;
        let wait = if self.trace.is_some() {
            format!(", GPU wait {:.2} ms", 1e3 * t.wait / n)
        } else {
            String::new()
        };
        Some(
            format!(
                "{} model steps on {}: host enqueue {:.2} ms{wait}, logits copy {:.2} ms per step \
             ({} steps copied top-k candidates only, {} of them the full logits too; {} steps \
             were CUDA graph launches, {} graphs captured; KV read: {:?})",
                t.steps,
                self.device,
                1e3 * t.enqueue / n,
                1e3 * t.copy / n,
                t.candidate_steps,
                t.full_copies,
                t.graph_steps,
                t.graph_captures,
                self.read
            ) + &self.profile_summary(),
        )
    }

    fn step(&mut self, batch: &StepBatch) -> Result<Vec<f32>> {
        if self.graphs.is_some() && self.read == KvRead::InPlace {
            // A decode step through its graph (ranking one candidate, unused), then the
            // whole logits.
            match self.graph_step(batch, 1) {
                Ok(Some(_)) => return self.kept_logits(),
                Ok(None) => {}
                Err(e) => self.graphs_failed(e),
            }
        }
        self.run_step(batch, |logits| {
            Ok((logits.to_vec().map_err(SampleError::model)?, None))
        })
    }

    fn step_top(&mut self, batch: &StepBatch, candidates: usize) -> Result<StepLogits> {
        if self.device == Device::Cpu {
            // The logits are on the host already: the engine's host sampler is as fast.
            return self.step(batch).map(StepLogits::Full);
        }
        if self.graphs.is_some() && self.read == KvRead::InPlace {
            match self.graph_step(batch, candidates) {
                Ok(Some(top)) => return Ok(StepLogits::Candidates(top)),
                Ok(None) => {}
                Err(e) => self.graphs_failed(e),
            }
        }
        self.run_step(batch, |logits| {
            let top = ops::top_k_candidates(&logits, candidates).map_err(SampleError::model)?;
            Ok((StepLogits::Candidates(top), Some(logits)))
        })
    }

    fn logits_at_least(
        &mut self,
        rows: &[usize],
        thresholds: &[f32],
        cap: usize,
    ) -> Result<Option<Vec<Option<RowTokens>>>> {
        // Kept, not taken: `last_full_logits` may follow for rows over the cap.
        let Some((logits, _)) = self.last_logits.as_ref() else {
            return Ok(None);
        };
        ops::logits_at_least(logits, rows, thresholds, cap)
            .map(Some)
            .map_err(SampleError::model)
    }

    fn last_full_logits(&mut self) -> Result<Vec<f32>> {
        self.times.full_copies += 1;
        self.kept_logits()
    }
}

impl PagedRunner {
    /// One step: the forward and the LM head, then `fetch` brings what the sampler needs
    /// from the device logits [B, V] to the host; logits it hands back are kept for
    /// [`StepModel::last_full_logits`] until the next step starts.
    fn run_step<T>(
        &mut self,
        batch: &StepBatch,
        fetch: impl FnOnce(Tensor) -> Result<(T, Option<Tensor>)>,
    ) -> Result<T> {
        let _span = tracing::debug_span!(
            "paged step",
            seqs = batch.seqs.len(),
            tokens = batch.ids.len()
        )
        .entered();
        // Free the previous step's logits before this step's activations need the memory.
        self.last_logits = None;
        let t0 = Instant::now();
        let inputs = StepInputs {
            ids: Indices::from(batch.ids.as_slice()),
            positions: Indices::from(batch.positions.as_slice()),
            layout: step_layout(batch)?,
        };
        inputs.stage(&mut self.staging)?;
        let profiled = self.profile.is_some() && batch.is_decode();
        if profiled {
            self.model.start_profile();
        }
        // Decode-only steps need no gather: their rows are the sequences' last tokens.
        let last: Option<Vec<usize>> = (!batch.is_decode())
            .then(|| batch.q_starts()[1..].iter().map(|&end| end - 1).collect());
        let logits = forward_logits(
            &self.model,
            &mut self.pools,
            self.read,
            &inputs,
            last.as_deref(),
        )?; // [B, V], f32
        let t1 = Instant::now();
        wait_for(self.traced_backend()?.as_deref())?;
        let t2 = Instant::now();
        if profiled && let Some((times, steps)) = self.profile.as_mut() {
            times.add(&self.model.stop_profile());
            *steps += 1;
        }
        let (out, kept) = fetch(logits)?;
        self.times.candidate_steps += u64::from(kept.is_some());
        self.last_logits = kept.map(|l| (l, batch.seqs.len()));
        let t3 = Instant::now();
        self.record_times(batch, [t0, t1, t2, t3])?;
        Ok(out)
    }

    /// The profiled decode steps' GPU time per op kind, for the time summary ("" when not
    /// profiling).
    fn profile_summary(&self) -> String {
        let Some((times, steps)) = &self.profile else {
            return String::new();
        };
        let n = (*steps).max(1) as f64;
        let parts: Vec<String> = times
            .by_kind
            .iter()
            .map(|(k, (ms, calls))| {
                format!(
                    "{} {:.3} ms ({} calls)",
                    k.name(),
                    ms / n,
                    *calls as f64 / n
                )
            })
            .collect();
        format!(
            "; profiled decode steps ({steps}, each op timed alone), per step: total {:.3} ms = {}",
            times.total_ms() / n,
            parts.join(", ")
        )
    }

    /// The last step's kept device logits, on the host: [B, V].
    fn kept_logits(&mut self) -> Result<Vec<f32>> {
        let (logits, rows) = self.last_logits.take().ok_or(SampleError::EngineConfig {
            name: "last_full_logits",
            msg: "no step kept its logits (the last step returned full rows)".into(),
        })?;
        let mut all = logits.to_vec().map_err(SampleError::model)?;
        // A graph's logits have padding rows after the batch's.
        all.truncate(rows * self.model.config().vocab_size);
        Ok(all)
    }

    /// A graph step failed: correct either way — this step runs eagerly, and so do the
    /// next ones.
    fn graphs_failed(&mut self, e: SampleError) {
        tracing::warn!("CUDA graphs turned off for this run: {e}");
        self.graphs = None;
    }

    /// A decode step as one CUDA graph launch, if `batch` is one (else `None`).
    fn graph_step(
        &mut self,
        batch: &StepBatch,
        candidates: usize,
    ) -> Result<Option<engine::ops::TopK>> {
        let Some(key) = DecodeGraphs::key(batch, candidates, self.max_model_len) else {
            return Ok(None);
        };
        let traced = self.traced_backend()?;
        let Some(graphs) = self.graphs.as_mut() else {
            return Ok(None);
        };
        self.last_logits = None;
        let t0 = Instant::now();
        graphs.launch(key, batch, &self.model, &mut self.pools)?;
        let t1 = Instant::now();
        wait_for(traced.as_deref())?;
        let t2 = Instant::now();
        let (top, logits) = graphs.fetch(key, batch.seqs.len())?;
        self.times.graph_captures = graphs.captures;
        self.times.graph_steps += 1;
        self.times.candidate_steps += 1;
        self.last_logits = Some((logits, batch.seqs.len()));
        let t3 = Instant::now();
        self.record_times(batch, [t0, t1, t2, t3])?;
        Ok(Some(top))
    }

    /// The GPU to wait for between queuing a step and copying its result, so that the GPU
    /// time is measured apart from the copy: only with a step trace (the wait costs time).
    fn traced_backend(&self) -> Result<Option<std::sync::Arc<CudaBackend>>> {
        match self.trace {
            Some(_) => self.backend(),
            None => Ok(None),
        }
    }

    /// Adds one step's times: [start, queued, GPU done (with a trace), result on the host].
    fn record_times(&mut self, batch: &StepBatch, [t0, t1, t2, t3]: [Instant; 4]) -> Result<()> {
        let secs = |a: Instant, b: Instant| (b - a).as_secs_f64();
        self.times.steps += 1;
        self.times.enqueue += secs(t0, t1);
        self.times.wait += secs(t1, t2);
        self.times.copy += secs(t2, t3);
        if let Some(trace) = &mut self.trace {
            let kv_tokens: usize = batch.seqs.iter().map(|s| s.start + s.len).sum();
            trace.record(
                batch.seqs.len(),
                batch.ids.len(),
                kv_tokens,
                [secs(t0, t1), secs(t1, t2), secs(t2, t3)],
            )?;
        }
        Ok(())
    }
}

/// Waits for `gpu`'s queued work, if there is a GPU to wait for.
fn wait_for(gpu: Option<&CudaBackend>) -> Result<()> {
    match gpu {
        Some(gpu) => gpu
            .synchronize()
            .map_err(|e| SampleError::model(engine::EngineError::from(e))),
        None => Ok(()),
    }
}

/// One step's arrays as the kernels read them.
pub(crate) struct StepInputs {
    pub ids: Indices,       // [Tq]
    pub positions: Indices, // [Tq]
    pub layout: PagedLayout,
}

impl StepInputs {
    /// Copies every array to the device in one copy through `staging`; true when its buffer
    /// moved (graphs reading the old address are stale).
    pub fn stage(&self, staging: &mut Staging) -> Result<bool> {
        let l = &self.layout;
        staging
            .stage(&[&self.ids, &self.positions, l, l.slots()])
            .map_err(SampleError::model)
    }
}

/// The forward of one step through the pools and the LM head: logits [B, V] f32 of the
/// rows `last` of the new tokens (all of them when `None`).
pub(crate) fn forward_logits(
    model: &Model,
    pools: &mut [LayerPool],
    read: KvRead,
    inputs: &StepInputs,
    last: Option<&[usize]>,
) -> Result<Tensor> {
    let layout = &inputs.layout;
    let packed = layout.packed();
    let mut view = PagedView::new(pools, layout, read);
    let hidden = model
        .forward_cached_indexed(&inputs.ids, &inputs.positions, &packed, &mut view)
        .map_err(SampleError::model)?; // [Tq, C]
    drop(view);
    let rows = match last {
        Some(last) => model
            .select_rows(&hidden, last)
            .map_err(SampleError::model)?, // [B, C]
        None => hidden,
    };
    model.logits(&rows).map_err(SampleError::model)
}

/// [`model::env_switch`] with the sample crate's error.
fn env_switch(name: &'static str, default: bool) -> Result<bool> {
    model::env_switch(name, default).map_err(|msg| SampleError::EngineConfig { name, msg })
}

/// The step's [`PagedLayout`]: sequence `b`'s queries are its `len` new tokens, its context
/// `start + len` positions, its blocks the scheduler's table.
fn step_layout(batch: &StepBatch) -> Result<PagedLayout> {
    let q_starts = batch.q_starts();
    let kv_lens: Vec<usize> = batch.seqs.iter().map(|s| s.start + s.len).collect();
    let tables: Vec<&[u32]> = batch
        .seqs
        .iter()
        .map(|s| s.block_table.as_slice())
        .collect();
    PagedLayout::from_tables(batch.block_size, &q_starts, &kv_lens, &tables)
        .map_err(SampleError::model)
}

/// How the layers read the cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvRead {
    /// `engine::ops::paged_attention` reads the pools through the block tables in place
    /// (the default).
    InPlace,
    /// Every position of each sequence is gathered from the pools into packed tensors for
    /// the model's own attention (an extra copy of the step's keys and values per layer):
    /// the fallback, and a check of the paged kernels (`PREFER_PAGED_KV=gather`).
    Gather,
}

impl KvRead {
    /// The environment's choice (`PREFER_PAGED_KV`: `in-place` or `gather`).
    pub fn from_env() -> Result<KvRead> {
        match std::env::var(KV_READ_ENV).as_deref() {
            Err(_) | Ok("") | Ok("in-place") => Ok(KvRead::InPlace),
            Ok("gather") => Ok(KvRead::Gather),
            Ok(other) => Err(SampleError::EngineConfig {
                name: KV_READ_ENV,
                msg: format!("{other:?}: expected in-place or gather"),
            }),
        }
    }
}

/// The environment variable that picks [`KvRead`].
pub const KV_READ_ENV: &str = "PREFER_PAGED_KV";

/// The pools seen through one step's layout: the model's [`KvCache`].
///
/// With [`KvRead::InPlace`] each layer calls `attend`: the new keys and values go into
/// their slots (`paged_kv_write`) and `paged_attention` reads the pools through the block
/// tables. With [`KvRead::Gather`] each layer calls `append`, which writes the same way and
/// returns every position of each sequence, gathered from the pools on the device (an
/// embedding lookup of the pool's rows by slot: exact), in [`PagedLayout::packed`] order.
pub(crate) struct PagedView<'a> {
    pools: &'a mut [LayerPool],
    layout: &'a PagedLayout,
    read: KvRead,
    /// The pool slot of every position of every sequence, sequence after sequence: the
    /// gather's row ids. Built on first use.
    gather: Option<Vec<u32>>, // [Tkv]
}

impl<'a> PagedView<'a> {
    pub(crate) fn new(pools: &'a mut [LayerPool], layout: &'a PagedLayout, read: KvRead) -> Self {
        Self {
            pools,
            layout,
            read,
            gather: None,
        }
    }

    /// Layer `layer`'s pools, after checking that the model's layout is the step's.
    fn pool(
        &mut self,
        layer: usize,
        layout: &SeqLayout,
    ) -> std::result::Result<&mut LayerPool, EngineError> {
        const OP: &str = "paged kv cache";
        if layout.q_starts.as_slice() != self.layout.q_starts()
            || layout.kv_starts.len() != self.layout.num_seqs() + 1
            || layout
                .kv_starts
                .windows(2)
                .zip(self.layout.kv_lens())
                .any(|(w, &l)| w[1].checked_sub(w[0]) != Some(l))
        {
            return Err(EngineError::Arg {
                op: OP,
                msg: "the layout does not describe the step's batch".into(),
            });
        }
        let n = self.pools.len();
        self.pools.get_mut(layer).ok_or_else(|| EngineError::Arg {
            op: OP,
            msg: format!("layer {layer} out of range ({n} layers)"),
        })
    }

    fn gather_ids(&mut self) -> &[u32] {
        let l = self.layout;
        self.gather.get_or_insert_with(|| {
            let (bs, width) = (l.block_size(), l.max_blocks());
            let mut ids = Vec::new();
            for (b, &kv_len) in l.kv_lens().iter().enumerate() {
                // The layout checked that every position of a sequence has a block.
                let table = &l.block_tables()[b * width..(b + 1) * width];
                ids.extend((0..kv_len).map(|p| (table[p / bs] as usize * bs + p % bs) as u32));
            }
            ids
        })
    }
}

impl KvCache for PagedView<'_> {
    fn append(
        &mut self,
        layer: usize,
        layout: &SeqLayout,
        k: &Tensor, // [Tq, Hkv, D]
        v: &Tensor, // [Tq, Hkv, D]
    ) -> std::result::Result<(Tensor, Tensor), ModelError> {
        let ids = self.gather_ids().to_vec();
        let slots = self.layout.slots();
        let pool = self.pool(layer, layout)?;
        ops::paged_kv_write(&mut pool.k, &mut pool.v, k, v, slots)?;
        let [nb, bs, hkv, d] = pool
            .k
            .dims::<4>("paged kv gather", "pool: [num_blocks, block_size, Hkv, D]")?;
        let shape = [ids.len(), hkv, d];
        let gather = |p: &Tensor| -> std::result::Result<Tensor, ModelError> {
            let rows = p.reshape(&[nb * bs, hkv * d])?; // [slots, Hkv·D]
            Ok(ops::embedding(&rows, &ids, 1.0)?.reshape(&shape)?)
        };
        Ok((gather(&pool.k)?, gather(&pool.v)?))
    }

    fn attends_in_place(&self) -> bool {
        self.read == KvRead::InPlace
    }

    fn attend(
        &mut self,
        layer: usize,
        layout: &SeqLayout,
        q: &Tensor, // [Tq, H, D]
        k: &Tensor, // [Tq, Hkv, D]
        v: &Tensor, // [Tq, Hkv, D]
        params: &AttentionParams,
    ) -> std::result::Result<AttentionOut, EngineError> {
        let paged = self.layout;
        let pool = self.pool(layer, layout)?;
        ops::paged_kv_write(&mut pool.k, &mut pool.v, k, v, paged.slots())?;
        ops::paged_attention(q, &pool.k, &pool.v, paged, params)
    }
}

/// The per-step trace file (see the module doc).
struct StepTrace {
    path: PathBuf,
    out: BufWriter<File>,
}

impl StepTrace {
    fn create(path: PathBuf) -> Result<Self> {
        let io = |source| SampleError::OutputIo {
            path: path.clone(),
            source,
        };
        let mut out = BufWriter::new(File::create(&path).map_err(io)?);
        writeln!(
            out,
            "seqs\tq_tokens\tkv_tokens\tenqueue_ms\twait_ms\tcopy_ms"
        )
        .map_err(io)?;
        Ok(Self { path, out })
    }

    fn record(&mut self, seqs: usize, q: usize, kv: usize, secs: [f64; 3]) -> Result<()> {
        let [a, b, c] = secs.map(|s| s * 1e3);
        // Flushed per line: a run killed by a time limit still leaves whole lines.
        writeln!(self.out, "{seqs}\t{q}\t{kv}\t{a:.3}\t{b:.3}\t{c:.3}")
            .and_then(|()| self.out.flush())
            .map_err(|source| SampleError::OutputIo {
                path: self.path.clone(),
                source,
            })
    }
}

/// How the GPU's memory was split (bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuMemoryPlan {
    pub total: u64,
    /// In use after loading the weights and profiling the largest step.
    pub in_use: u64,
    /// `total × gpu_memory_utilization`.
    pub budget: u64,
    /// Given to the KV pools.
    pub kv_bytes: u64,
    pub bytes_per_block: usize,
    pub num_blocks: usize,
}

/// Sizes the KV pools of `model` (on a GPU) from `gpu_memory_utilization`, as vLLM does:
/// runs the largest step the engine will ask for — a prefill of `max_num_batched_tokens`
/// tokens (in sequences of at most `max_model_len`), then the LM head on `max_num_seqs`
/// rows — so that the arena holds its peak activations, then gives the pools what is left of
/// `total × utilization`. Until the model's layers attend through the pools in place, each
/// layer's attention reads a gathered copy of the step's keys and values, at most one
/// layer's share of the pool: that is held back too.
pub fn plan_gpu_memory(
    model: &Model,
    block_size: usize,
    utilization: f64,
    max_num_batched_tokens: usize,
    max_num_seqs: usize,
    max_model_len: usize,
) -> Result<GpuMemoryPlan> {
    let Device::Cuda(ordinal) = model.device() else {
        return Err(SampleError::EngineConfig {
            name: "gpu_memory_utilization",
            msg: "sizes a GPU's KV cache; the model is on the CPU".into(),
        });
    };
    if !(utilization > 0.0 && utilization <= 1.0) {
        return Err(SampleError::EngineConfig {
            name: "gpu_memory_utilization",
            msg: format!("{utilization}: expected a fraction in (0, 1]"),
        });
    }
    profile_largest_step(model, max_num_batched_tokens, max_num_seqs, max_model_len)?;
    let (free, total) = mem_info(ordinal)?;
    let (free, total) = (free as u64, total as u64);
    let in_use = total.saturating_sub(free);
    let budget = (total as f64 * utilization) as u64;
    let layers = model.config().num_layers as u64;
    // kv + kv / L (the gathered copy of one layer) must fit in what is left.
    let kv_bytes = budget.saturating_sub(in_use) * layers / (layers + 1);
    let bytes_per_block = PagedRunner::bytes_per_block(model, block_size);
    let num_blocks = (kv_bytes / bytes_per_block.max(1) as u64) as usize;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if num_blocks == 0 {
        return Err(SampleError::EngineConfig {
            name: "gpu_memory_utilization",
            msg: format!(
                "{utilization} of the GPU's {:.1} GiB is {:.1} GiB, but the weights and the \
                 largest step's activations already use {:.1} GiB: nothing is left for the KV \
                 cache (raise --gpu-memory-utilization, or lower --max-num-batched-tokens / \
                 --max-num-seqs)",
                gib(total),
                gib(budget),
                gib(in_use)
            ),
        });
    }
    Ok(GpuMemoryPlan {
        total,
        in_use,
        budget,
        kv_bytes,
        bytes_per_block,
        num_blocks,
    })
}

/// Runs (and waits for) the largest step, leaving its activations cached in the arena.
fn profile_largest_step(
    model: &Model,
    tokens: usize,
    rows: usize,
    max_model_len: usize,
) -> Result<()> {
    let _span = tracing::info_span!("profile step", tokens, rows).entered();
    let tokens = tokens.max(1);
    let seq = max_model_len.clamp(1, tokens);
    let mut lens = vec![seq; tokens / seq];
    if !tokens.is_multiple_of(seq) {
        lens.push(tokens % seq);
    }
    let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
    let ids = vec![0u32; tokens];
    let hidden = model
        .forward(&ids, &positions, &SeqLayout::prefill(&lens))
        .map_err(SampleError::model)?; // [T, C]
    let last: Vec<usize> = (0..rows.clamp(1, tokens)).map(|i| tokens - 1 - i).collect();
    let selected = model
        .select_rows(&hidden, &last)
        .map_err(SampleError::model)?;
    let logits = model.logits(&selected).map_err(SampleError::model)?;
    drop((hidden, selected, logits));
    if let Device::Cuda(n) = model.device() {
        CudaBackend::get(n)
            .and_then(|b| b.synchronize())
            .map_err(|e| SampleError::model(engine::EngineError::from(e)))?;
    }
    Ok(())
}

/// (free, total) bytes of GPU `ordinal`, as the driver sees them.
fn mem_info(ordinal: usize) -> Result<(usize, usize)> {
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| SampleError::EngineConfig {
        name: "gpu_memory_utilization",
        msg: format!("cannot open GPU {ordinal} to read its memory: {e}"),
    })?;
    ctx.mem_get_info().map_err(|e| SampleError::EngineConfig {
        name: "gpu_memory_utilization",
        msg: format!("cuMemGetInfo on GPU {ordinal}: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SeqStep;

    fn batch() -> StepBatch {
        StepBatch {
            ids: vec![0; 4],
            positions: vec![0, 1, 2, 5],
            seqs: vec![
                SeqStep {
                    seq: 3,
                    start: 0,
                    len: 3,
                    block_table: vec![4, 1],
                },
                SeqStep {
                    seq: 8,
                    start: 5,
                    len: 1,
                    block_table: vec![0, 2, 3],
                },
            ],
            block_size: 2,
        }
    }

    /// The layout's slots and the gather's row ids both follow the block tables.
    #[test]
    fn layout_and_gather_follow_the_block_tables() {
        let b = batch();
        let layout = step_layout(&b).unwrap();
        // seq 3: positions 0, 1, 2 → blocks 4, 4, 1; seq 8: position 5 → block 3, slot 1.
        assert_eq!(layout.slots().as_slice(), &[8, 9, 2, 7]);
        assert_eq!(layout.kv_lens(), &[3, 6]);
        let mut pools = Vec::new();
        let mut view = PagedView::new(&mut pools, &layout, KvRead::Gather);
        assert_eq!(view.gather_ids(), &[8, 9, 2, 0, 1, 4, 5, 6, 7]);
    }

    /// Keys written in one step come back, through the gather, in later steps, in position
    /// order, from interleaved blocks; a layout that does not match the batch is refused.
    #[test]
    fn append_writes_then_gathers_every_position() {
        let (hkv, d) = (1, 2);
        let mut pools = vec![LayerPool {
            k: ops::kv_pool(6, 2, hkv, d, Device::Cpu).unwrap(),
            v: ops::kv_pool(6, 2, hkv, d, Device::Cpu).unwrap(),
        }];
        let rows = |t: usize, base: f32| {
            Tensor::from_vec((0..t * 2).map(|i| base + i as f32).collect(), &[t, hkv, d]).unwrap()
        };
        // Step 1: seq 3 prefills 3 tokens (blocks 4, 1), seq 8 prefills 5 (blocks 0, 2, 3).
        let step1 = StepBatch {
            ids: vec![0; 8],
            positions: vec![0, 1, 2, 0, 1, 2, 3, 4],
            seqs: vec![
                SeqStep {
                    seq: 3,
                    start: 0,
                    len: 3,
                    block_table: vec![4, 1],
                },
                SeqStep {
                    seq: 8,
                    start: 0,
                    len: 5,
                    block_table: vec![0, 2, 3],
                },
            ],
            block_size: 2,
        };
        let layout = step_layout(&step1).unwrap();
        let (k, v) = PagedView::new(&mut pools, &layout, KvRead::Gather)
            .append(0, &layout.packed(), &rows(8, 0.0), &rows(8, 100.0))
            .unwrap();
        assert_eq!(
            k.to_vec().unwrap(),
            (0..16).map(|i| i as f32).collect::<Vec<_>>()
        );
        assert_eq!(v.to_vec().unwrap()[15], 115.0);
        // Step 2: one decode token each, in the other order.
        let step2 = StepBatch {
            ids: vec![0; 2],
            positions: vec![5, 3],
            seqs: vec![
                SeqStep {
                    seq: 8,
                    start: 5,
                    len: 1,
                    block_table: vec![0, 2, 3],
                },
                SeqStep {
                    seq: 3,
                    start: 3,
                    len: 1,
                    block_table: vec![4, 1],
                },
            ],
            block_size: 2,
        };
        let layout = step_layout(&step2).unwrap();
        let (k, _) = PagedView::new(&mut pools, &layout, KvRead::Gather)
            .append(0, &layout.packed(), &rows(2, 50.0), &rows(2, 150.0))
            .unwrap();
        let k = k.to_vec().unwrap();
        let mut want: Vec<f32> = (6..16).map(|i| i as f32).collect(); // seq 8's 5 rows
        want.extend([50.0, 51.0]);
        want.extend((0..6).map(|i| i as f32)); // seq 3's 3 rows
        want.extend([52.0, 53.0]);
        assert_eq!(k, want);

        let mut wrong = layout.packed();
        wrong.kv_starts = vec![0, 2, 4];
        let e = PagedView::new(&mut pools, &layout, KvRead::Gather)
            .append(0, &wrong, &rows(2, 0.0), &rows(2, 0.0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not describe"), "{e}");
        let e = PagedView::new(&mut pools, &layout, KvRead::Gather)
            .append(3, &layout.packed(), &rows(2, 0.0), &rows(2, 0.0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 3 out of range"), "{e}");
    }

    /// The in-place path agrees with the gathered one: same keys, same attention.
    #[test]
    fn attend_in_place_equals_attention_over_the_gathered_keys() {
        let (h, hkv, d) = (4, 2, 3);
        let mut pools = vec![LayerPool {
            k: ops::kv_pool(8, 2, hkv, d, Device::Cpu).unwrap(),
            v: ops::kv_pool(8, 2, hkv, d, Device::Cpu).unwrap(),
        }];
        let mut x = 1u64;
        let mut rand = |n: usize| {
            (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect::<Vec<f32>>()
        };
        let b = batch();
        // Fill every slot first (earlier positions of the two sequences).
        let layout = step_layout(&b).unwrap();
        let params = ops::AttentionParams {
            scale: 0.5,
            window: Some(3),
            softcap: None,
        };
        let q = Tensor::from_vec(rand(4 * h * d), &[4, h, d]).unwrap();
        let k = Tensor::from_vec(rand(4 * hkv * d), &[4, hkv, d]).unwrap();
        let v = Tensor::from_vec(rand(4 * hkv * d), &[4, hkv, d]).unwrap();
        let mut view = PagedView::new(&mut pools, &layout, KvRead::InPlace);
        assert!(view.attends_in_place());
        let paged = view
            .attend(0, &layout.packed(), &q, &k, &v, &params)
            .unwrap();
        let (kg, vg) = PagedView::new(&mut pools, &layout, KvRead::Gather)
            .append(0, &layout.packed(), &k, &v)
            .unwrap();
        let packed = ops::attention(&q, &kg, &vg, &layout.packed(), &params).unwrap();
        let (a, p) = (paged.out.to_vec().unwrap(), packed.out.to_vec().unwrap());
        for (x, y) in a.iter().zip(&p) {
            assert!((x - y).abs() <= 1e-6, "{a:?} vs {p:?}");
        }
    }
}
