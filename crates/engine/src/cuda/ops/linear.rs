//! Linear layers on the GPU: one cuBLASLt GEMM, with the bias fused as its epilogue.

use std::sync::Arc;

use super::{bf16_ptr, empty};
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
        rows,
        cols,
        k,
        x: px,
        ld_x: k,
        w: pw,
        ld_w: k,
        out: po,
        ld_out: cols,
        out_type: OutType::Bf16,
        bias: pb,
    };
    // SAFETY: x holds rows·k, w cols·k, out rows·cols and bias cols bf16 elements, all
    // arena buffers that stay alive (or return to the stream-ordered arena) past the GEMM.
    unsafe { backend.gemm(&g) }?;
    Ok(out)
}
