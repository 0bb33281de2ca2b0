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

use crate::error::Result;

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

    /// Runs `op` (which runs on `device`), timing it as `kind` when profiling is on.
    pub fn run<T>(
        &self,
        kind: OpKind,
        device: Device,
        op: impl FnOnce() -> std::result::Result<T, EngineError>,
    ) -> Result<T> {
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
                        out = Some(op()?);
                    }
                    Ok(())
                })?;
                let out = out.ok_or_else(|| EngineError::Arg {
                    op: "profile",
                    msg: "the timed op did not run".into(),
                })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_while_on() {
        let p = Profiler::default();
        let cpu = Device::Cpu;
        assert_eq!(p.run(OpKind::Gemm, cpu, || Ok(1)).unwrap(), 1);
        p.start();
        for _ in 0..3 {
            p.run(OpKind::Gemm, cpu, || {
                std::thread::sleep(std::time::Duration::from_millis(2));
                Ok(())
            })
            .unwrap();
        }
        p.run(OpKind::Norm, cpu, || Ok(())).unwrap();
        let times = p.stop();
        let (ms, calls) = times.by_kind[&OpKind::Gemm];
        assert_eq!(calls, 3);
        assert!(ms >= 6.0, "{ms}");
        assert_eq!(times.by_kind[&OpKind::Norm].1, 1);
        assert!((times.total_ms() - ms - times.ms(OpKind::Norm)).abs() < 1e-9);
        // Off again: nothing is recorded, and errors pass through.
        p.run(OpKind::Gemm, cpu, || Ok(())).unwrap();
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
