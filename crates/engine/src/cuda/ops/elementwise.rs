//! Residual adds and scaling on the GPU (kernels/elementwise.cu), in bf16 (activations) and
//! f32 (LoRA's parameters and gradient accumulators).
//!
//! Dtypes: `add` takes two tensors of one dtype and returns that dtype; `add_inplace`
//! accepts bf16 += bf16, f32 += f32 and f32 += bf16 (an f32 accumulator taking a bf16 term);
//! `scale` returns the dtype of its input. Arithmetic is f32 throughout.

use std::sync::Arc;

use super::{empty, grid_stride};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::DType;
use crate::{EngineError, Result, Tensor};

/// The kernels of kernels/elementwise.cu.
pub(crate) const KERNELS: &[&str] = &[
    "add_bf16",
    "scale_bf16",
    "softcap_f32",
    "add_f32",
    "add_f32_bf16",
    "scale_f32",
    "cast_f32_bf16",
    "cast_bf16_f32",
];

const BLOCK: u32 = 256;

/// The dtype of a GPU tensor, or an error naming it.
pub(crate) fn dtype_of(op: &'static str, name: &str, t: &Tensor) -> Result<DType> {
    t.cuda().map(|s| s.dtype).ok_or_else(|| EngineError::Arg {
        op,
        msg: format!("{name} must be on the GPU, it is on {}", t.device()),
    })
}

/// The device address of a GPU tensor of any dtype (checked by the caller).
pub(crate) fn any_ptr(op: &'static str, name: &str, t: &Tensor) -> Result<u64> {
    t.cuda().map(|s| s.ptr()).ok_or_else(|| EngineError::Arg {
        op,
        msg: format!("{name} must be on the GPU, it is on {}", t.device()),
    })
}

/// Queues `out = a + b` over `n` elements with the kernel for (dtype of out and a, dtype of
/// b); out may be a (in place).
fn launch_add(
    backend: &CudaBackend,
    out: u64,
    a: u64,
    b: u64,
    n: usize,
    dtypes: (DType, DType),
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let (name, grid) = match dtypes {
        // 8 bf16 per thread (16-byte vectors).
        (DType::Bf16, DType::Bf16) => ("add_bf16", grid_stride(backend, n / 8 + 1, BLOCK)),
        (DType::F32, DType::F32) => ("add_f32", grid_stride(backend, n, BLOCK)),
        (DType::F32, DType::Bf16) => ("add_f32_bf16", grid_stride(backend, n, BLOCK)),
        (acc, term) => {
            return Err(EngineError::Arg {
                op: "add",
                msg: format!(
                    "cannot add {term:?} into {acc:?} on the GPU (bf16 + bf16, f32 + f32 \
                     and f32 += bf16 are supported)"
                ),
            });
        }
    };
    let kernel = backend.kernel(Module::Elementwise, name)?;
    let n = n as i64;
    // SAFETY: out, a, b hold n elements of their dtypes (shapes and dtypes checked by the
    // caller); arena memory is 256-byte aligned, so the 16-byte vector accesses are aligned.
    unsafe { backend.launch_1d(&kernel, grid, BLOCK, &mut params![out, a, b, n]) }?;
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

/// a + b, same shapes and dtypes (bf16 or f32) → that dtype.
pub(crate) fn add(backend: &Arc<CudaBackend>, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "add";
    same_shape(a, b)?;
    let (da, db) = (dtype_of(OP, "a", a)?, dtype_of(OP, "b", b)?);
    if da != db {
        return Err(EngineError::Arg {
            op: OP,
            msg: format!("a is {da:?} but b is {db:?}; add_inplace adds bf16 into f32"),
        });
    }
    let (pa, pb) = (any_ptr(OP, "a", a)?, any_ptr(OP, "b", b)?);
    let out = empty(backend, a.shape(), da)?;
    launch_add(
        backend,
        any_ptr(OP, "out", &out)?,
        pa,
        pb,
        a.len(),
        (da, db),
    )?;
    Ok(out)
}

/// a += b, same shapes; bf16 += bf16, f32 += f32 or f32 += bf16. a's buffer is copied first
/// if it is shared.
pub(crate) fn add_inplace(backend: &Arc<CudaBackend>, a: &mut Tensor, b: &Tensor) -> Result<()> {
    const OP: &str = "add_inplace";
    same_shape(a, b)?;
    let (da, db) = (dtype_of(OP, "a", a)?, dtype_of(OP, "b", b)?);
    let pb = any_ptr(OP, "b", b)?;
    let len = a.len();
    if let Some(s) = a.cuda_mut() {
        s.make_exclusive(len)?;
    }
    let pa = any_ptr(OP, "a", a)?;
    launch_add(backend, pa, pa, pb, len, (da, db))
}

/// x · s, in x's dtype (bf16 or f32).
pub(crate) fn scale(backend: &Arc<CudaBackend>, x: &Tensor, s: f32) -> Result<Tensor> {
    const OP: &str = "scale";
    let dtype = dtype_of(OP, "x", x)?;
    let px = any_ptr(OP, "x", x)?;
    let out = empty(backend, x.shape(), dtype)?;
    let n = x.len();
    if n > 0 {
        let po = any_ptr(OP, "out", &out)?;
        let (name, grid) = match dtype {
            DType::Bf16 => ("scale_bf16", grid_stride(backend, n / 8 + 1, BLOCK)),
            DType::F32 => ("scale_f32", grid_stride(backend, n, BLOCK)),
        };
        let kernel = backend.kernel(Module::Elementwise, name)?;
        let n64 = n as i64;
        // SAFETY: out and x hold n elements of one dtype.
        unsafe { backend.launch_1d(&kernel, grid, BLOCK, &mut params![po, px, s, n64]) }?;
    }
    Ok(out)
}

/// x in `dtype`: a copy rounded to bf16 (nearest even) or widened to f32; x itself (shared)
/// when it has that dtype already.
pub(crate) fn cast(backend: &Arc<CudaBackend>, x: &Tensor, dtype: DType) -> Result<Tensor> {
    const OP: &str = "cast";
    let from = dtype_of(OP, "x", x)?;
    if from == dtype {
        return Ok(x.clone());
    }
    let px = any_ptr(OP, "x", x)?;
    let out = empty(backend, x.shape(), dtype)?;
    let n = x.len();
    if n > 0 {
        let po = any_ptr(OP, "out", &out)?;
        let name = match dtype {
            DType::Bf16 => "cast_f32_bf16",
            DType::F32 => "cast_bf16_f32",
        };
        let kernel = backend.kernel(Module::Elementwise, name)?;
        let grid = grid_stride(backend, n, BLOCK);
        let n64 = n as i64;
        // SAFETY: out holds n elements of `dtype`, x n elements of the other dtype.
        unsafe { backend.launch_1d(&kernel, grid, BLOCK, &mut params![po, px, n64]) }?;
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
    unsafe { backend.launch_1d(&kernel, grid, BLOCK, &mut params![ptr, cap, n64]) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::compile_without_spills;

    #[test]
    fn kernels_compile_without_spills() {
        let Some(compiled) = compile_without_spills(Module::Elementwise) else {
            return;
        };
        for name in KERNELS {
            assert!(compiled.log.contains(name), "{name} missing from the log");
        }
    }
}
