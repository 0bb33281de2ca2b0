//! The CUDA side of every op in [`crate::ops`]: shape checks, output allocation and the
//! kernel or GEMM launch. Each `crate::ops` function calls [`device_of`] and, when its inputs
//! live on a GPU, hands over to the function of the same name here.

pub(crate) mod activation;
pub(crate) mod attention;
pub(crate) mod attention_backward;
pub(crate) mod elementwise;
pub(crate) mod embedding;
pub(crate) mod linear;
pub(crate) mod logits_at_least;
pub(crate) mod logprobs;
pub(crate) mod lora_fused;
pub(crate) mod lora_ops;
pub(crate) mod paged_attention;
pub(crate) mod rms_norm;
pub(crate) mod rope;
pub(crate) mod top_k;

use std::sync::Arc;

use super::device::CudaBackend;
use super::storage::{CudaStorage, DType};
use crate::{Device, EngineError, Result, Tensor};

/// The GPU all `inputs` live on, None when they are all on the CPU, and an error naming the
/// culprits when they are split across devices.
pub(crate) fn device_of(
    op: &'static str,
    inputs: &[(&str, &Tensor)],
) -> Result<Option<Arc<CudaBackend>>> {
    let Some((first_name, first)) = inputs.first() else {
        return Ok(None);
    };
    for (name, t) in &inputs[1..] {
        if t.device() != first.device() {
            return Err(EngineError::Arg {
                op,
                msg: format!(
                    "{first_name} is on {} but {name} is on {}; move them to one device",
                    first.device(),
                    t.device()
                ),
            });
        }
    }
    match first.device() {
        Device::Cpu => Ok(None),
        Device::Cuda(_) => Ok(first.cuda().map(|s| s.backend.clone())),
    }
}

/// The device address of a bf16 CUDA tensor, or an error naming the tensor.
pub(crate) fn bf16_ptr(op: &'static str, name: &str, t: &Tensor) -> Result<u64> {
    typed_ptr(op, name, t, DType::Bf16)
}

/// The device address of an f32 CUDA tensor, or an error naming the tensor.
pub(crate) fn f32_ptr(op: &'static str, name: &str, t: &Tensor) -> Result<u64> {
    typed_ptr(op, name, t, DType::F32)
}

fn typed_ptr(op: &'static str, name: &str, t: &Tensor, dtype: DType) -> Result<u64> {
    match t.cuda() {
        Some(s) if s.dtype == dtype => Ok(s.ptr()),
        Some(s) => Err(EngineError::Arg {
            op,
            msg: format!(
                "{name} must be {} on the GPU, got {:?}",
                format!("{dtype:?}").to_lowercase(),
                s.dtype
            ),
        }),
        None => Err(EngineError::Arg {
            op,
            msg: format!("{name} must be on the GPU, it is on {}", t.device()),
        }),
    }
}

/// A new, uninitialised device tensor.
pub(crate) fn empty(backend: &Arc<CudaBackend>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let len = shape.iter().product();
    Ok(Tensor::from_cuda(
        shape,
        CudaStorage::alloc(backend, len, dtype)?,
    ))
}

/// Blocks for a grid-stride loop over `n` items: enough to fill the GPU, no more.
pub(crate) fn grid_stride(backend: &CudaBackend, n: usize, block: u32) -> u32 {
    let wanted = n.div_ceil(block as usize).max(1);
    wanted.min(backend.sm_count() as usize * 16) as u32
}

/// Threads for a one-block-per-row kernel over rows of `cols` elements read 8 at a time.
pub(crate) fn row_block(cols: usize) -> u32 {
    (cols.div_ceil(8).div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// Converts a count to the i32 a kernel takes, or an error naming it.
pub(crate) fn to_i32(op: &'static str, what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| EngineError::Arg {
        op,
        msg: format!("{what} = {n} exceeds the kernel's 32-bit range"),
    })
}
