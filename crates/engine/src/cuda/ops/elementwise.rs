//! Residual adds and scaling on the GPU (kernels/elementwise.cu).

use std::sync::Arc;

use super::{bf16_ptr, empty, grid_stride};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::DType;
use crate::{EngineError, Result, Tensor};

const BLOCK: u32 = 256;

fn launch_add(backend: &CudaBackend, out: u64, a: u64, b: u64, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let kernel = backend.kernel(Module::Elementwise, "add_bf16")?;
    let n = n as i64;
    let grid = grid_stride(backend, n as usize / 8 + 1, BLOCK);
    // SAFETY: out, a, b hold n bf16 each (shapes checked by the caller); arena memory is
    // 256-byte aligned, so the 16-byte vector accesses are aligned.
    unsafe {
        backend.launch(
            &kernel,
            (grid, 1, 1),
            (BLOCK, 1, 1),
            0,
            &mut params![out, a, b, n],
        )
    }?;
    Ok(())
}

fn same_shape(a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(EngineError::Shape {
            op: "add",
            expected: format!("b of a's shape {:?}", a.shape()),
            got: b.shape().to_vec(),
        });
    }
    Ok(())
}

/// a + b, same shapes.
pub(crate) fn add(backend: &Arc<CudaBackend>, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "add";
    same_shape(a, b)?;
    let (pa, pb) = (bf16_ptr(OP, "a", a)?, bf16_ptr(OP, "b", b)?);
    let out = empty(backend, a.shape(), DType::Bf16)?;
    launch_add(backend, bf16_ptr(OP, "out", &out)?, pa, pb, a.len())?;
    Ok(out)
}

/// a += b, same shapes; a's buffer is copied first if it is shared.
pub(crate) fn add_inplace(backend: &Arc<CudaBackend>, a: &mut Tensor, b: &Tensor) -> Result<()> {
    const OP: &str = "add_inplace";
    same_shape(a, b)?;
    bf16_ptr(OP, "a", a)?;
    let pb = bf16_ptr(OP, "b", b)?;
    let len = a.len();
    if let Some(s) = a.cuda_mut() {
        s.make_exclusive(len)?;
    }
    let pa = bf16_ptr(OP, "a", a)?;
    launch_add(backend, pa, pa, pb, len)
}

/// x · s.
pub(crate) fn scale(backend: &Arc<CudaBackend>, x: &Tensor, s: f32) -> Result<Tensor> {
    const OP: &str = "scale";
    let px = bf16_ptr(OP, "x", x)?;
    let out = empty(backend, x.shape(), DType::Bf16)?;
    let n = x.len();
    if n > 0 {
        let po = bf16_ptr(OP, "out", &out)?;
        let kernel = backend.kernel(Module::Elementwise, "scale_bf16")?;
        let n64 = n as i64;
        let grid = grid_stride(backend, n / 8 + 1, BLOCK);
        // SAFETY: out and x hold n bf16 each.
        unsafe {
            backend.launch(
                &kernel,
                (grid, 1, 1),
                (BLOCK, 1, 1),
                0,
                &mut params![po, px, s, n64],
            )
        }?;
    }
    Ok(out)
}

/// In-place soft-cap c·tanh(x/c) of an f32 device buffer of `n` elements.
pub(crate) fn softcap_f32(backend: &CudaBackend, ptr: u64, n: usize, cap: f32) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let kernel = backend.kernel(Module::Elementwise, "softcap_f32")?;
    let n64 = n as i64;
    let grid = grid_stride(backend, n, BLOCK);
    // SAFETY: the caller's buffer holds n f32.
    unsafe {
        backend.launch(
            &kernel,
            (grid, 1, 1),
            (BLOCK, 1, 1),
            0,
            &mut params![ptr, cap, n64],
        )
    }?;
    Ok(())
}
