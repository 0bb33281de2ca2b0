//! Each row's top k logits and lse on the GPU (kernels/top_k.cu): one block per row, then a
//! single download of the [B, k] values and ids and the [B] lse — the only bytes that cross.

use std::sync::Arc;

use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::DType;
use crate::ops::TopK;
use crate::{EngineError, Result, Tensor};

/// logits: [B, V] f32 on the device, already shape- and k-checked by `ops::top_k_candidates`.
pub(crate) fn top_k_candidates(
    backend: &Arc<CudaBackend>,
    logits: &Tensor,
    b: usize,
    v: usize,
    k: usize,
) -> Result<TopK> {
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
    if b == 0 {
        return Ok(TopK {
            k,
            ..TopK::default()
        });
    }
    // One buffer, one download: values [B, k] f32, ids [B, k] u32, lse [B] f32.
    let words = b * (2 * k + 1);
    let out = backend.alloc(words * 4)?;
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
    let mut host = vec![0u32; words];
    backend.download(&out, &mut host)?;
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
