//! Optional per-op timing of a forward pass, for benchmarks: how much of the time goes to
//! GEMMs, attention, norms, ...
//!
//! Off by default and then nearly free (one atomic load per op). When on, every op of the
//! forward is timed on its own: on a GPU with CUDA events around it (each op then waits for
//! the one before, so a profiled pass is slower than a plain one, but each op's GPU time is
//! its own), on the CPU with a wall clock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use engine::cuda::CudaBackend;
use engine::{Device, EngineError};

use crate::error::{ModelError, Result};

/// What an op of the forward is, for the breakdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    Embedding,
    /// RMSNorm, alone or fused with the residual add.
    Norm,
    /// The layers' linear projections (q/k/v, o, gate/up, down).
    Gemm,
    /// RoPE (fused with the q/k/v split).
    Rope,
    Attention,
    /// The gated MLP activation.
    Activation,
    /// Residual adds not fused into a norm.
    Add,
    /// Picking the hidden rows whose next token is scored.
    Gather,
    /// The chunked LM-head log-probs (its GEMMs and the softmax fold together).
    LmHead,
    /// Full logits of a few rows (the LM head GEMM and the final soft-cap), for sampling.
    Logits,
    /// Training: LoRA's low-rank products in the forward and their backward.
    Lora,
    /// Training: the frozen projections' input gradients (dy·W).
    GemmBackward,
    /// Training: attention's backward.
    AttentionBackward,
    /// Training: the chunked LM-head log-prob backward.
    LmHeadBackward,
    /// Training: the backward of norms, RoPE, the activation and the embedding.
    ElementwiseBackward,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Embedding => "embedding",
            OpKind::Norm => "norm",
            OpKind::Gemm => "gemm",
            OpKind::Rope => "rope",
            OpKind::Attention => "attention",
            OpKind::Activation => "activation",
            OpKind::Add => "add",
            OpKind::Gather => "gather",
            OpKind::LmHead => "lm_head_logprobs",
            OpKind::Logits => "logits",
            OpKind::Lora => "lora",
            OpKind::GemmBackward => "gemm_backward",
            OpKind::AttentionBackward => "attention_backward",
            OpKind::LmHeadBackward => "lm_head_backward",
            OpKind::ElementwiseBackward => "elementwise_backward",
        }
    }
}

/// Time spent per op kind: milliseconds and number of calls.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpTimes {
    pub by_kind: BTreeMap<OpKind, (f64, usize)>,
}

impl OpTimes {
    /// Milliseconds over all kinds.
    pub fn total_ms(&self) -> f64 {
        self.by_kind.values().map(|(ms, _)| ms).sum()
    }

    /// Adds `other`'s times and calls to these.
    pub fn add(&mut self, other: &OpTimes) {
        for (kind, (ms, calls)) in &other.by_kind {
            let e = self.by_kind.entry(*kind).or_default();
            e.0 += ms;
            e.1 += calls;
        }
    }

    /// Milliseconds of one kind (0 if it never ran).
    pub fn ms(&self, kind: OpKind) -> f64 {
        self.by_kind.get(&kind).map_or(0.0, |(ms, _)| *ms)
    }
}

/// The switch and the accumulated times. Clones share them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Profiler {
    on: Arc<AtomicBool>,
    times: Arc<Mutex<OpTimes>>,
}

impl Profiler {
    pub fn start(&self) {
        *self.lock() = OpTimes::default();
        self.on.store(true, Ordering::SeqCst);
    }

    /// Stops profiling and returns what was measured since [`Profiler::start`].
    pub fn stop(&self) -> OpTimes {
        self.on.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpTimes> {
        // The times are plain numbers: a panic elsewhere leaves them usable.
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `op` (which runs on `device`), timing it as `kind` when profiling is on. `op` may
    /// fail with an engine or a model error.
    pub fn run<T, E>(
        &self,
        kind: OpKind,
        device: Device,
        op: impl FnOnce() -> std::result::Result<T, E>,
    ) -> Result<T>
    where
        ModelError: From<E>,
    {
        if !self.on.load(Ordering::Relaxed) {
            return Ok(op()?);
        }
        let (out, ms) = match device {
            Device::Cpu => {
                let start = Instant::now();
                let out = op()?;
                (out, start.elapsed().as_secs_f64() * 1e3)
            }
            Device::Cuda(ordinal) => {
                let backend = CudaBackend::get(ordinal).map_err(EngineError::from)?;
                let mut op = Some(op);
                let mut out = None;
                let ms = backend.time_ms(|| -> std::result::Result<(), EngineError> {
                    if let Some(op) = op.take() {
                        out = Some(op());
                    }
                    Ok(())
                })?;
                let out = out.ok_or_else(|| EngineError::Arg {
                    op: "profile",
                    msg: "the timed op did not run".into(),
                })??;
                (out, ms as f64)
            }
        };
        let mut times = self.lock();
        let entry = times.by_kind.entry(kind).or_default();
        entry.0 += ms;
        entry.1 += 1;
        Ok(out)
    }
}

/// An on/off switch from the environment (`PREFER_PROFILE`, `PREFER_CUDA_GRAPHS`): `1` or
/// `0`, `default` when unset or empty; any other value is an error saying what was expected
/// (the caller names the variable).
pub fn env_switch(name: &str, default: bool) -> std::result::Result<bool, String> {
    match std::env::var(name).as_deref() {
        Err(_) | Ok("") => Ok(default),
        Ok("1") => Ok(true),
        Ok("0") => Ok(false),
        Ok(other) => Err(format!("{name}={other:?}: expected 1 (on) or 0 (off)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_switches_take_1_or_0_and_name_a_bad_value() {
        // A variable no other test reads, so setting it cannot race with them.
        const NAME: &str = "PREFER_TEST_ENV_SWITCH";
        let set = |v: &str| {
            // SAFETY: only this test reads or writes NAME.
            unsafe { std::env::set_var(NAME, v) }
        };
        set("");
        assert!(env_switch(NAME, true).unwrap());
        assert!(!env_switch(NAME, false).unwrap());
        set("1");
        assert!(env_switch(NAME, false).unwrap());
        set("0");
        assert!(!env_switch(NAME, true).unwrap());
        set("off");
        let e = env_switch(NAME, true).unwrap_err().to_string();
        assert!(e.contains(NAME) && e.contains("\"off\""), "{e}");
        // SAFETY: as above.
        unsafe { std::env::remove_var(NAME) };
        assert!(env_switch(NAME, true).unwrap());
    }

    #[test]
    fn counts_only_while_on() {
        let p = Profiler::default();
        let cpu = Device::Cpu;
        assert_eq!(
            p.run(OpKind::Gemm, cpu, || Ok::<_, EngineError>(1))
                .unwrap(),
            1
        );
        p.start();
        for _ in 0..3 {
            p.run(OpKind::Gemm, cpu, || {
                std::thread::sleep(std::time::Duration::from_millis(2));
                Ok::<_, EngineError>(())
            })
            .unwrap();
        }
        p.run(OpKind::Norm, cpu, || Ok::<_, EngineError>(()))
            .unwrap();
        let times = p.stop();
        let (ms, calls) = times.by_kind[&OpKind::Gemm];
        assert_eq!(calls, 3);
        assert!(ms >= 6.0, "{ms}");
        assert_eq!(times.by_kind[&OpKind::Norm].1, 1);
        assert!((times.total_ms() - ms - times.ms(OpKind::Norm)).abs() < 1e-9);
        // Off again: nothing is recorded, and errors pass through.
        p.run(OpKind::Gemm, cpu, || Ok::<_, EngineError>(()))
            .unwrap();
        assert!(p.stop().by_kind.is_empty());
        let e = p
            .run(
                OpKind::Gemm,
                cpu,
                || -> std::result::Result<(), EngineError> {
                    Err(EngineError::Arg {
                        op: "x",
                        msg: "boom".into(),
                    })
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("boom"));
    }
}
