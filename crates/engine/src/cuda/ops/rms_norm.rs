//! RMSNorm on the GPU, plain and fused with the residual add (kernels/rms_norm.cu).

use std::sync::Arc;

use super::{bf16_ptr, empty, row_block};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::DType;
use crate::{EngineError, Result, Tensor};

fn rows_of(op: &'static str, x: &Tensor, w: &Tensor) -> Result<(u32, usize)> {
    let [rows, cols] = x.dims(op, "x: [T, C]")?;
    w.expect_shape(op, &[cols])?;
    let rows = u32::try_from(rows).map_err(|_| EngineError::Arg {
        op,
        msg: format!("{rows} rows exceed one launch's grid"),
    })?;
    Ok((rows, cols))
}

/// x: [T, C], w: [C] → [T, C].
pub(crate) fn rms_norm(
    backend: &Arc<CudaBackend>,
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    weight_offset: f32,
) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    let (rows, cols) = rows_of(OP, x, w)?;
    let (px, pw) = (bf16_ptr(OP, "x", x)?, bf16_ptr(OP, "w", w)?);
    let out = empty(backend, x.shape(), DType::Bf16)?;
    if rows == 0 || cols == 0 {
        return Ok(out);
    }
    let po = bf16_ptr(OP, "out", &out)?;
    let kernel = backend.kernel(Module::RmsNorm, "rms_norm_bf16")?;
    let cols64 = cols as i64;
    // SAFETY: x and out hold T·C bf16, w holds C.
    unsafe {
        backend.launch(
            &kernel,
            (rows, 1, 1),
            (row_block(cols), 1, 1),
            0,
            &mut params![po, px, pw, cols64, eps, weight_offset],
        )
    }?;
    Ok(out)
}

/// (sum, normed) with sum = x + residual (rounded to bf16) and normed = rms_norm(sum): the
/// decoder's "add the block output to the residual stream, normalise for the next block".
pub(crate) fn add_rms_norm(
    backend: &Arc<CudaBackend>,
    x: &Tensor,
    residual: &Tensor,
    w: &Tensor,
    eps: f32,
    weight_offset: f32,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "add_rms_norm";
    let (rows, cols) = rows_of(OP, x, w)?;
    residual.expect_shape(OP, x.shape())?;
    let (px, pr, pw) = (
        bf16_ptr(OP, "x", x)?,
        bf16_ptr(OP, "residual", residual)?,
        bf16_ptr(OP, "w", w)?,
    );
    let sum = empty(backend, x.shape(), DType::Bf16)?;
    let out = empty(backend, x.shape(), DType::Bf16)?;
    if rows == 0 || cols == 0 {
        return Ok((sum, out));
    }
    let (ps, po) = (bf16_ptr(OP, "sum", &sum)?, bf16_ptr(OP, "out", &out)?);
    let kernel = backend.kernel(Module::RmsNorm, "add_rms_norm_bf16")?;
    let cols64 = cols as i64;
    // SAFETY: x, residual, sum and out hold T·C bf16, w holds C.
    unsafe {
        backend.launch(
            &kernel,
            (rows, 1, 1),
            (row_block(cols), 1, 1),
            0,
            &mut params![po, ps, px, pr, pw, cols64, eps, weight_offset],
        )
    }?;
    Ok((sum, out))
}
