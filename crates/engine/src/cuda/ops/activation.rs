//! Gated MLP activation on the GPU, and its backward (kernels/activation.cu). Every tensor
//! here is bf16; the arithmetic is f32.

use std::ffi::c_void;
use std::sync::Arc;

use super::{bf16_ptr, empty, grid_stride};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::DType;
use crate::ops::Activation;
use crate::{Result, Tensor};

/// The kernels of kernels/activation.cu.
pub(crate) const KERNELS: &[&str] = &[
    "gated_act_bf16",
    "gated_act_packed_bf16",
    "gated_act_backward_bf16",
    "gated_act_packed_backward_bf16",
];

const BLOCK: u32 = 256;

/// The kernel's activation code (kernels/activation.cu `activate`).
fn code(act: Activation) -> i32 {
    match act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
        Activation::Gelu => 2,
    }
}

/// Launches kernel `name` of kernels/activation.cu over `n` outputs, 8 per thread.
///
/// # Safety
/// `params` are the kernel's arguments (from `params!`, so each points at a live variable of
/// the parameter's type), and the buffers they address hold what the kernel reads and writes
/// for `n` outputs.
unsafe fn launch(
    backend: &CudaBackend,
    name: &'static str,
    n: usize,
    params: &mut [*mut c_void],
) -> Result<()> {
    let kernel = backend.kernel(Module::Activation, name)?;
    let grid = grid_stride(backend, n / 8 + 1, BLOCK);
    // SAFETY: the caller's contract.
    unsafe { backend.launch_1d(&kernel, grid, BLOCK, params) }?;
    Ok(())
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
        let (n64, act) = (n as i64, code(act));
        // SAFETY: out, gate, up hold n bf16 each.
        unsafe {
            launch(
                backend,
                "gated_act_bf16",
                n,
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
        let (rows64, inter64, act) = (rows as i64, inter as i64, code(act));
        // SAFETY: gu holds rows·2I bf16, out rows·I.
        unsafe {
            launch(
                backend,
                "gated_act_packed_bf16",
                n,
                &mut params![po, pg, rows64, inter64, act],
            )
        }?;
    }
    Ok(out)
}

/// The gradients of act(gate) · up: gate, up, dy: [T, I] bf16 → (dgate, dup): [T, I] bf16,
/// assigned. The caller has checked the shapes.
pub(crate) fn gated_activation_backward(
    backend: &Arc<CudaBackend>,
    gate: &Tensor,
    up: &Tensor,
    act: Activation,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "gated_activation_backward";
    let (pg, pu, pdy) = (
        bf16_ptr(OP, "gate", gate)?,
        bf16_ptr(OP, "up", up)?,
        bf16_ptr(OP, "dy", dy)?,
    );
    let dgate = empty(backend, gate.shape(), DType::Bf16)?;
    let dup = empty(backend, gate.shape(), DType::Bf16)?;
    let n = gate.len();
    if n > 0 {
        let (pdg, pdu) = (bf16_ptr(OP, "dgate", &dgate)?, bf16_ptr(OP, "dup", &dup)?);
        let (n64, act) = (n as i64, code(act));
        // SAFETY: dgate, dup, gate, up, dy hold n bf16 each (arena buffers, 256-byte aligned
        // for the 16-byte vectors).
        unsafe {
            launch(
                backend,
                "gated_act_backward_bf16",
                n,
                &mut params![pdg, pdu, pg, pu, pdy, n64, act],
            )
        }?;
    }
    Ok((dgate, dup))
}

/// The gradient of the packed activation: gu: [T, 2I] bf16, dy: [T, I] bf16 → dgu: [T, 2I]
/// bf16 (dgate in the first I columns, dup in the last I), assigned. The caller has checked
/// the shapes.
pub(crate) fn gated_activation_packed_backward(
    backend: &Arc<CudaBackend>,
    gu: &Tensor,
    act: Activation,
    dy: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "gated_activation_packed_backward";
    let [rows, two_i] = gu.dims(OP, "gu: [T, 2I]")?;
    let inter = two_i / 2;
    dy.expect_shape(OP, &[rows, inter])?;
    let (pgu, pdy) = (bf16_ptr(OP, "gu", gu)?, bf16_ptr(OP, "dy", dy)?);
    let dgu = empty(backend, gu.shape(), DType::Bf16)?;
    let n = rows * inter;
    if n > 0 {
        let pdgu = bf16_ptr(OP, "dgu", &dgu)?;
        let (rows64, inter64, act) = (rows as i64, inter as i64, code(act));
        // SAFETY: gu and dgu hold rows·2I bf16, dy rows·I.
        unsafe {
            launch(
                backend,
                "gated_act_packed_backward_bf16",
                n,
                &mut params![pdgu, pgu, pdy, rows64, inter64, act],
            )
        }?;
    }
    Ok(dgu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::compile_without_spills;

    #[test]
    fn kernels_compile_without_spills() {
        let Some(compiled) = compile_without_spills(Module::Activation) else {
            return;
        };
        for name in KERNELS {
            assert!(compiled.log.contains(name), "{name} missing from the log");
        }
    }
}
