//! Linear layers on the GPU: one cuBLASLt GEMM, with the bias fused as its epilogue; and
//! their backward, one GEMM per gradient with the operands read transposed as needed
//! (`dx = dy · W`, `dW = dyᵀ · x`, `db = 1ᵀ · dy`).
//!
//! Dtypes: every input is bf16 (f32 accumulation inside the GEMM). dx is an activation
//! gradient and comes back bf16; dW and db are parameter gradients (what LoRA's optimizer
//! reads) and come back f32. The backward launchers take the dimensions `crate::ops::linear`
//! has already checked, so both devices refuse the same inputs with the same errors.

use std::sync::Arc;

use super::{bf16_ptr, empty, f32_ptr};
use crate::cuda::blas::{Gemm, OutType};
use crate::cuda::device::CudaBackend;
use crate::cuda::storage::{CudaStorage, DType};
use crate::{EngineError, Result, Tensor};

/// x: [T, K], w: [N, K], bias: [N] → [T, N] (bf16 out, f32 accumulation).
pub(crate) fn linear(
    backend: &Arc<CudaBackend>,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "linear";
    let [rows, k] = x.dims(OP, "x: [T, K]")?;
    let [cols, kw] = w.dims(OP, "w: [N, K]")?;
    if kw != k {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("w: [N, {k}]"),
            got: w.shape().to_vec(),
        });
    }
    if let Some(b) = bias {
        b.expect_shape(OP, &[cols])?;
    }
    let (px, pw) = (bf16_ptr(OP, "x", x)?, bf16_ptr(OP, "w", w)?);
    let pb = bias.map(|b| bf16_ptr(OP, "bias", b)).transpose()?;
    let out = empty(backend, &[rows, cols], DType::Bf16)?;
    if rows == 0 || cols == 0 {
        return Ok(out);
    }
    if k == 0 {
        // An empty sum: every row is the bias (or zero); cuBLASLt does not promise this.
        let row = match bias {
            Some(b) => b.to_vec()?,
            None => vec![0.0; cols],
        };
        let data: Vec<f32> = (0..rows).flat_map(|_| row.iter().copied()).collect();
        return Ok(Tensor::from_cuda(
            &[rows, cols],
            CudaStorage::from_f32(backend, &data)?,
        ));
    }
    let po = bf16_ptr(OP, "out", &out)?;
    let g = Gemm {
        bias: pb,
        ..Gemm::nt([rows, cols, k], px, pw, po, OutType::Bf16)
    };
    // SAFETY: x holds rows·k, w cols·k, out rows·cols and bias cols bf16 elements, all
    // arena buffers that stay alive (or return to the stream-ordered arena) past the GEMM.
    unsafe { backend.gemm(&g) }?;
    Ok(out)
}

/// dx = dy · W: dy [T, N], w [N, K] (both bf16) → dx [T, K] bf16. `[t, n, k]` are the
/// checked dimensions.
pub(crate) fn linear_backward_input(
    backend: &Arc<CudaBackend>,
    dy: &Tensor,
    w: &Tensor,
    [t, n, k]: [usize; 3],
) -> Result<Tensor> {
    const OP: &str = "linear_backward_input";
    let (pdy, pw) = (bf16_ptr(OP, "dy", dy)?, bf16_ptr(OP, "w", w)?);
    if n == 0 {
        // An empty sum over the output features; cuBLASLt does not promise zeros for k = 0.
        return zeros(backend, &[t, k], DType::Bf16);
    }
    let dx = empty(backend, &[t, k], DType::Bf16)?;
    if t == 0 || k == 0 {
        return Ok(dx);
    }
    let pdx = bf16_ptr(OP, "dx", &dx)?;
    // Row-major dx[T, K] = dy[T, N] · W[N, K]: W is read as stored, k = N first.
    let g = Gemm::nn([t, k, n], pdy, pw, pdx, OutType::Bf16);
    // SAFETY: dy holds T·N, w N·K and dx T·K bf16 elements, arena buffers that outlive the
    // queued GEMM (their memory returns to the stream-ordered arena only after it).
    unsafe { backend.gemm(&g) }?;
    Ok(dx)
}

/// dW = dyᵀ · x: dy [T, N], x [T, K] (both bf16) → dw [N, K] f32, summed over the T tokens.
/// `[t, n, k]` are the checked dimensions.
pub(crate) fn linear_backward_weight(
    backend: &Arc<CudaBackend>,
    dy: &Tensor,
    x: &Tensor,
    [t, n, k]: [usize; 3],
) -> Result<Tensor> {
    const OP: &str = "linear_backward_weight";
    let (pdy, px) = (bf16_ptr(OP, "dy", dy)?, bf16_ptr(OP, "x", x)?);
    if t == 0 {
        return zeros(backend, &[n, k], DType::F32);
    }
    let dw = empty(backend, &[n, k], DType::F32)?;
    if n == 0 || k == 0 {
        return Ok(dw);
    }
    let pdw = f32_ptr(OP, "dw", &dw)?;
    // Row-major dW[N, K] = dy[T, N]ᵀ · x[T, K]: both read with the token axis (k = T) first.
    let g = Gemm::tn([n, k, t], pdy, px, pdw, OutType::F32);
    // SAFETY: dy holds T·N and x T·K bf16 elements, dw N·K f32; all outlive the GEMM.
    unsafe { backend.gemm(&g) }?;
    Ok(dw)
}

/// db = Σ_t dy: dy [T, N] bf16 → db [N] f32. `[t, n]` are the checked dimensions.
///
/// A GEMM against a row of ones (`db[1, N] = 1[1, T] · dy[T, N]`): a column sum with f32
/// accumulation that reads dy once, coalesced, without a kernel of its own.
pub(crate) fn bias_backward(
    backend: &Arc<CudaBackend>,
    dy: &Tensor,
    [t, n]: [usize; 2],
) -> Result<Tensor> {
    const OP: &str = "bias_backward";
    let pdy = bf16_ptr(OP, "dy", dy)?;
    if t == 0 {
        return zeros(backend, &[n], DType::F32);
    }
    let db = empty(backend, &[n], DType::F32)?;
    if n == 0 {
        return Ok(db);
    }
    const BF16_ONE: u16 = 0x3f80;
    let ones = backend.upload(&vec![BF16_ONE; t])?; // [1, T]
    let pdb = f32_ptr(OP, "db", &db)?;
    let g = Gemm::nn([1, n, t], ones.ptr(), pdy, pdb, OutType::F32);
    // SAFETY: ones holds T bf16, dy T·N bf16, db N f32. `ones` goes back to the arena when
    // dropped below, which is stream-ordered: the GEMM queued before it has read it first.
    unsafe { backend.gemm(&g) }?;
    Ok(db)
}

/// A zero-filled device tensor: the gradient of an empty sum.
fn zeros(backend: &Arc<CudaBackend>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let len = shape.iter().product();
    Ok(Tensor::from_cuda(
        shape,
        CudaStorage::zeroed(backend, len, dtype)?,
    ))
}
