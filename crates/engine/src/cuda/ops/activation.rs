//! Gated MLP activation on the GPU (kernels/activation.cu).

use std::sync::Arc;

use super::{bf16_ptr, empty, grid_stride};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::DType;
use crate::ops::Activation;
use crate::{Result, Tensor};

const BLOCK: u32 = 256;

/// The kernel's activation code (kernels/activation.cu `activate`).
fn code(act: Activation) -> i32 {
    match act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
        Activation::Gelu => 2,
    }
}

/// act(gate) · up; gate, up: [T, I] → [T, I].
pub(crate) fn gated_activation(
    backend: &Arc<CudaBackend>,
    gate: &Tensor,
    up: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    const OP: &str = "gated_activation";
    let [t, i] = gate.dims(OP, "gate: [T, I]")?;
    up.expect_shape(OP, &[t, i])?;
    let (pg, pu) = (bf16_ptr(OP, "gate", gate)?, bf16_ptr(OP, "up", up)?);
    let out = empty(backend, gate.shape(), DType::Bf16)?;
    let n = gate.len();
    if n > 0 {
        let po = bf16_ptr(OP, "out", &out)?;
        let kernel = backend.kernel(Module::Activation, "gated_act_bf16")?;
        let (n64, act) = (n as i64, code(act));
        let grid = grid_stride(backend, n / 8 + 1, BLOCK);
        // SAFETY: out, gate, up hold n bf16 each.
        unsafe {
            backend.launch(
                &kernel,
                (grid, 1, 1),
                (BLOCK, 1, 1),
                0,
                &mut params![po, pg, pu, n64, act],
            )
        }?;
    }
    Ok(out)
}

/// act(gu[:, ..I]) · gu[:, I..]; gu: [T, 2I] from one fused gate+up GEMM → [T, I].
pub(crate) fn gated_activation_packed(
    backend: &Arc<CudaBackend>,
    gu: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    const OP: &str = "gated_activation_packed";
    let [rows, two_i] = gu.dims(OP, "gu: [T, 2I]")?;
    if !two_i.is_multiple_of(2) {
        return Err(crate::EngineError::Shape {
            op: OP,
            expected: "gu: [T, 2I] (an even number of columns)".into(),
            got: gu.shape().to_vec(),
        });
    }
    let inter = two_i / 2;
    let pg = bf16_ptr(OP, "gu", gu)?;
    let out = empty(backend, &[rows, inter], DType::Bf16)?;
    let n = rows * inter;
    if n > 0 {
        let po = bf16_ptr(OP, "out", &out)?;
        let kernel = backend.kernel(Module::Activation, "gated_act_packed_bf16")?;
        let (rows64, inter64, act) = (rows as i64, inter as i64, code(act));
        let grid = grid_stride(backend, n / 8 + 1, BLOCK);
        // SAFETY: gu holds rows·2I bf16, out rows·I.
        unsafe {
            backend.launch(
                &kernel,
                (grid, 1, 1),
                (BLOCK, 1, 1),
                0,
                &mut params![po, pg, rows64, inter64, act],
            )
        }?;
    }
    Ok(out)
}
