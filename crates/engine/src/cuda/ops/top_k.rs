//! Each row's top k logits and lse on the GPU (kernels/top_k.cu): one block per row, then a
//! single download of the [B, k] values and ids and the [B] lse — the only bytes that cross.
//!
//! The launch and the download are apart ([`queue`], [`QueuedTopK::fetch`]): the sampler can
//! queue the ranking behind the forward and wait once, and a CUDA graph that captured the
//! launch rewrites the same output buffer on every replay, which a later fetch reads.

use std::sync::Arc;

use crate::cuda::arena::DeviceBuffer;
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::DType;
use crate::ops::TopK;
use crate::{EngineError, Result, Tensor};

/// A launched `top_k_candidates_f32` and the buffer it writes: values [B, k] f32, then
/// ids [B, k] u32, then lse [B] f32, one download.
pub(crate) struct QueuedTopK {
    backend: Arc<CudaBackend>,
    out: DeviceBuffer, // [B·(2k + 1)] words
    b: usize,
    k: usize,
}

impl std::fmt::Debug for QueuedTopK {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QueuedTopK(B {}, k {}, {:?})", self.b, self.k, self.out)
    }
}

impl QueuedTopK {
    /// Downloads the buffer as it is now (waiting for the stream first) and splits it.
    pub(crate) fn fetch(&self) -> Result<TopK> {
        let (b, k) = (self.b, self.k);
        if b == 0 {
            return Ok(TopK {
                k,
                ..TopK::default()
            });
        }
        let mut host = vec![0u32; b * (2 * k + 1)];
        self.backend.download(&self.out, &mut host)?;
        let lse = host[2 * b * k..]
            .iter()
            .map(|&w| f32::from_bits(w))
            .collect();
        let ids = host[b * k..2 * b * k].to_vec();
        let values = host[..b * k].iter().map(|&w| f32::from_bits(w)).collect();
        Ok(TopK {
            k,
            values,
            ids,
            lse,
        })
    }
}

/// Queues the ranking of logits: [B, V] f32 on the device, already shape- and k-checked by
/// `ops::top_k_candidates_queued`. Nothing waits: the stream orders the kernel after the
/// work that writes the logits, and the arena keeps their memory from being reused before
/// the kernel has read it (see `cuda::arena`).
pub(crate) fn queue(
    backend: &Arc<CudaBackend>,
    logits: &Tensor,
    b: usize,
    v: usize,
    k: usize,
) -> Result<QueuedTopK> {
    const OP: &str = "top_k_candidates";
    let pl = match logits.cuda() {
        Some(s) if s.dtype == DType::F32 => s.ptr(),
        Some(s) => {
            return Err(EngineError::Arg {
                op: OP,
                msg: format!("logits must be f32, got {:?}", s.dtype),
            });
        }
        None => {
            return Err(EngineError::Arg {
                op: OP,
                msg: "logits must be on the GPU".into(),
            });
        }
    };
    let words = b * (2 * k + 1);
    let out = backend.alloc(words * 4)?;
    if b > 0 {
        let (pv, pi, ps) = (
            out.ptr(),
            out.ptr() + (b * k * 4) as u64,
            out.ptr() + (2 * b * k * 4) as u64,
        );
        let kernel = backend.kernel(Module::TopK, "top_k_candidates_f32")?;
        let threads = (v.div_ceil(32) * 32).clamp(32, 1024) as u32;
        let (v64, k32) = (v as i64, k as i32);
        // SAFETY: logits hold B·V f32; the output buffer B·(2k + 1) words, split as above.
        unsafe {
            backend.launch(
                &kernel,
                (b as u32, 1, 1),
                (threads, 1, 1),
                0,
                &mut params![pl, pv, pi, ps, v64, k32],
            )
        }?;
    }
    Ok(QueuedTopK {
        backend: backend.clone(),
        out,
        b,
        k,
    })
}
