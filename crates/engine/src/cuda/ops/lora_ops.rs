//! LoRA's data movements on the GPU (kernels/lora.cu): column slices of a stacked
//! projection, adds into them, transposes and counter-based dropout. bf16 and f32 tensors
//! alike; each output has its input's dtype, except the dropout mask (always f32, so that it
//! is bit-identical to the CPU's).
//!
//! Shapes and keys are checked by the `crate::ops::lora_ops` functions before they hand over
//! here; these launchers check dtypes and devices.

use std::sync::Arc;

use super::elementwise::{any_ptr, dtype_of};
use super::{empty, f32_ptr, grid_stride};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::DType;
use crate::ops::DropoutKey;
use crate::{EngineError, Result, Tensor};

/// The kernels of kernels/lora.cu.
pub(crate) const KERNELS: &[&str] = &[
    "columns_bf16",
    "columns_f32",
    "add_into_columns_bf16",
    "add_into_columns_f32",
    "transpose_bf16",
    "transpose_f32",
    "dropout_mask_f32",
    "dropout_bf16",
    "dropout_f32",
];

const BLOCK: u32 = 256;

/// The kernel for `dtype` among a (bf16, f32) pair.
fn pick(dtype: DType, [bf16, f32]: [&'static str; 2]) -> &'static str {
    match dtype {
        DType::Bf16 => bf16,
        DType::F32 => f32,
    }
}

/// Columns col0..col0 + n of x: [T, N] → [T, n] in x's dtype.
pub(crate) fn columns(
    backend: &Arc<CudaBackend>,
    x: &Tensor,
    col0: usize,
    n: usize,
) -> Result<Tensor> {
    const OP: &str = "columns";
    let [rows, width] = x.dims(OP, "x: [T, N]")?;
    let dtype = dtype_of(OP, "x", x)?;
    let px = any_ptr(OP, "x", x)?;
    let out = empty(backend, &[rows, n], dtype)?;
    if rows * n == 0 {
        return Ok(out);
    }
    let po = any_ptr(OP, "out", &out)?;
    let name = pick(dtype, ["columns_bf16", "columns_f32"]);
    // SAFETY: x holds T·N elements and col0 + n ≤ N (checked by the caller); out T·n.
    unsafe { launch_columns(backend, name, [po, px], [rows, width, col0, n]) }?;
    Ok(out)
}

/// y[:, col0..col0 + n] += delta; y: [T, N], delta: [T, n], one dtype. y's buffer is copied
/// first if it is shared.
pub(crate) fn add_into_columns(
    backend: &Arc<CudaBackend>,
    y: &mut Tensor,
    col0: usize,
    delta: &Tensor,
) -> Result<()> {
    const OP: &str = "add_into_columns";
    let [rows, width] = y.dims(OP, "y: [T, N]")?;
    let [_, n] = delta.dims(OP, "delta: [T, n]")?;
    let (dy, dd) = (dtype_of(OP, "y", y)?, dtype_of(OP, "delta", delta)?);
    if dy != dd {
        return Err(EngineError::Arg {
            op: OP,
            msg: format!("y is {dy:?} but delta is {dd:?}; pass one dtype"),
        });
    }
    let pd = any_ptr(OP, "delta", delta)?;
    if rows * n == 0 {
        return Ok(());
    }
    let len = y.len();
    if let Some(s) = y.cuda_mut() {
        s.make_exclusive(len)?;
    }
    let py = any_ptr(OP, "y", y)?;
    let name = pick(dy, ["add_into_columns_bf16", "add_into_columns_f32"]);
    // SAFETY: y holds T·N elements and col0 + n ≤ N; delta T·n (checked by the caller).
    unsafe { launch_columns(backend, name, [py, pd], [rows, width, col0, n]) }?;
    Ok(())
}

/// Launches a column kernel (`columns_*` or `add_into_columns_*`, which share their
/// parameters) over the T·n elements of columns col0..col0 + n of a [T, N] matrix.
///
/// # Safety
/// `ptrs` are the kernel's two tensor pointers in its parameter order, one of a [T, N]
/// matrix and one of a [T, n] slice, in the kernel's dtype, and col0 + n ≤ N.
unsafe fn launch_columns(
    backend: &Arc<CudaBackend>,
    name: &'static str,
    [p0, p1]: [u64; 2],
    [rows, width, col0, n]: [usize; 4],
) -> Result<()> {
    let kernel = backend.kernel(Module::Lora, name)?;
    let (rows64, width64, col064, n64) = (rows as i64, width as i64, col0 as i64, n as i64);
    let grid = grid_stride(backend, rows * n, BLOCK);
    // SAFETY: the caller's contract.
    unsafe {
        backend.launch_1d(
            &kernel,
            grid,
            BLOCK,
            &mut params![p0, p1, rows64, width64, col064, n64],
        )
    }?;
    Ok(())
}

/// x: [R, N] → [N, R] in x's dtype.
pub(crate) fn transpose(backend: &Arc<CudaBackend>, x: &Tensor) -> Result<Tensor> {
    const OP: &str = "transpose";
    let [rows, cols] = x.dims(OP, "x: [R, N]")?;
    let dtype = dtype_of(OP, "x", x)?;
    let px = any_ptr(OP, "x", x)?;
    let out = empty(backend, &[cols, rows], dtype)?;
    if rows * cols == 0 {
        return Ok(out);
    }
    let po = any_ptr(OP, "out", &out)?;
    let kernel = backend.kernel(
        Module::Lora,
        pick(dtype, ["transpose_bf16", "transpose_f32"]),
    )?;
    let tiles = rows.div_ceil(32) * cols.div_ceil(32);
    // One 32×32 tile per block and iteration (block 32 × 8, kernels/lora.cu).
    let grid = grid_stride(backend, tiles, 1);
    let (rows64, cols64) = (rows as i64, cols as i64);
    // SAFETY: x holds R·N elements, out N·R; the kernel bounds-checks every index.
    unsafe {
        backend.launch(
            &kernel,
            (grid, 1, 1),
            (32, 8, 1),
            0,
            &mut params![po, px, rows64, cols64],
        )
    }?;
    Ok(out)
}

/// The key's kernel arguments: (module stream, cut, keep multiplier).
fn key_args(key: &DropoutKey) -> (u64, u64, f32) {
    (key.stream(), key.threshold(), key.keep_scale())
}

/// The f32 multipliers of a [rows, cols] dropout mask (0 or 1 / (1 − p)), the same bits as
/// the CPU's for the same key.
pub(crate) fn dropout_mask(
    backend: &Arc<CudaBackend>,
    key: &DropoutKey,
    rows: usize,
    cols: usize,
) -> Result<Tensor> {
    const OP: &str = "dropout_mask";
    let out = empty(backend, &[rows, cols], DType::F32)?;
    let n = rows * cols;
    if n == 0 {
        return Ok(out);
    }
    let po = f32_ptr(OP, "mask", &out)?;
    let kernel = backend.kernel(Module::Lora, "dropout_mask_f32")?;
    let (stream, cut, keep) = key_args(key);
    let n64 = n as i64;
    let grid = grid_stride(backend, n, BLOCK);
    // SAFETY: out holds n f32.
    unsafe {
        backend.launch_1d(
            &kernel,
            grid,
            BLOCK,
            &mut params![po, n64, stream, cut, keep],
        )
    }?;
    Ok(out)
}

/// x ∘ mask(key) over x's elements in row-major order, in x's dtype.
pub(crate) fn apply_dropout(
    backend: &Arc<CudaBackend>,
    op: &'static str,
    x: &Tensor,
    key: &DropoutKey,
) -> Result<Tensor> {
    let dtype = dtype_of(op, "x", x)?;
    let px = any_ptr(op, "x", x)?;
    let out = empty(backend, x.shape(), dtype)?;
    let n = x.len();
    if n == 0 {
        return Ok(out);
    }
    let po = any_ptr(op, "out", &out)?;
    let kernel = backend.kernel(Module::Lora, pick(dtype, ["dropout_bf16", "dropout_f32"]))?;
    let (stream, cut, keep) = key_args(key);
    let n64 = n as i64;
    let grid = grid_stride(backend, n, BLOCK);
    // SAFETY: out and x hold n elements of one dtype.
    unsafe {
        backend.launch_1d(
            &kernel,
            grid,
            BLOCK,
            &mut params![po, px, n64, stream, cut, keep],
        )
    }?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::compile_without_spills;

    #[test]
    fn kernels_compile_without_spills() {
        let Some(compiled) = compile_without_spills(Module::Lora) else {
            return;
        };
        for name in KERNELS {
            assert!(compiled.log.contains(name), "{name} missing from the log");
        }
    }
}
