//! RMSNorm on the GPU, plain and fused with the residual add, and its backward
//! (kernels/rms_norm.cu).

use std::sync::Arc;

use super::{bf16_ptr, empty, f32_ptr, grid_stride, row_block};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::{CudaStorage, DType};
use crate::{EngineError, Result, Tensor};

/// The kernels of kernels/rms_norm.cu.
pub(crate) const KERNELS: &[&str] = &[
    "rms_norm_bf16",
    "add_rms_norm_bf16",
    "rms_norm_backward_bf16",
    "rms_norm_backward_dw_partial",
    "rms_norm_backward_dw_finish",
];

/// Threads per block of the dw kernels (one column each).
const DW_BLOCK: u32 = 256;
/// Rows summed by one thread of the dw partial kernel, at least: long enough to amortise the
/// second stage, short enough that a few thousand tokens still fill the GPU.
const DW_MIN_ROWS_PER_CHUNK: usize = 32;
/// At most this many row chunks (the partial buffer is chunks × C f32; grid.y ≤ 65535).
const DW_MAX_CHUNKS: usize = 2048;

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

/// The row chunking of the dw reduction: (rows per chunk, chunks), both ≥ 1 for rows ≥ 1.
fn dw_chunks(rows: usize) -> (usize, usize) {
    let per = DW_MIN_ROWS_PER_CHUNK.max(rows.div_ceil(DW_MAX_CHUNKS));
    (per, rows.div_ceil(per))
}

/// The gradients of RMSNorm: x: [T, C] bf16, w: [C] bf16, dy: [T, C] bf16 →
/// (dx: [T, C] bf16, dw: [C] f32), both assigned. The caller has checked the shapes.
///
/// dw is reduced over the tokens in two stages without atomics (per-chunk partial sums, then
/// the chunks in order), so it is the same bits on every run.
pub(crate) fn rms_norm_backward(
    backend: &Arc<CudaBackend>,
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    weight_offset: f32,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "rms_norm_backward";
    let (rows, cols) = rows_of(OP, x, w)?;
    dy.expect_shape(OP, x.shape())?;
    let (px, pw, pdy) = (
        bf16_ptr(OP, "x", x)?,
        bf16_ptr(OP, "w", w)?,
        bf16_ptr(OP, "dy", dy)?,
    );
    let dx = empty(backend, x.shape(), DType::Bf16)?;
    if cols == 0 {
        return Ok((dx, empty(backend, &[0], DType::F32)?));
    }
    if rows == 0 {
        // No tokens: dw is a sum over nothing.
        let zeros = CudaStorage::zeroed(backend, cols, DType::F32)?;
        return Ok((dx, Tensor::from_cuda(&[cols], zeros)));
    }
    let inv_rms = empty(backend, &[rows as usize], DType::F32)?; // [T]
    let (pdx, pr) = (bf16_ptr(OP, "dx", &dx)?, f32_ptr(OP, "inv_rms", &inv_rms)?);
    let cols64 = cols as i64;
    let kernel = backend.kernel(Module::RmsNorm, "rms_norm_backward_bf16")?;
    // SAFETY: x, dy, dx hold T·C bf16, w holds C, inv_rms T f32.
    unsafe {
        backend.launch(
            &kernel,
            (rows, 1, 1),
            (row_block(cols), 1, 1),
            0,
            &mut params![pdx, pr, px, pw, pdy, cols64, eps, weight_offset],
        )
    }?;

    let (per, chunks) = dw_chunks(rows as usize);
    let partial = empty(backend, &[chunks, cols], DType::F32)?; // [chunks, C]
    let dw = empty(backend, &[cols], DType::F32)?; // [C]
    let (pp, pdw) = (f32_ptr(OP, "partial", &partial)?, f32_ptr(OP, "dw", &dw)?);
    let col_blocks =
        u32::try_from(cols.div_ceil(DW_BLOCK as usize)).map_err(|_| EngineError::Arg {
            op: OP,
            msg: format!("{cols} columns exceed one launch's grid"),
        })?;
    let (rows64, per64, chunks64) = (rows as i64, per as i64, chunks as i64);
    let kernel = backend.kernel(Module::RmsNorm, "rms_norm_backward_dw_partial")?;
    // SAFETY: x, dy hold T·C bf16, inv_rms T f32, partial chunks·C f32; chunks ≤
    // DW_MAX_CHUNKS fits grid.y, and chunks·per ≥ T so every row is summed once.
    unsafe {
        backend.launch(
            &kernel,
            (col_blocks, chunks as u32, 1),
            (DW_BLOCK, 1, 1),
            0,
            &mut params![pp, px, pdy, pr, rows64, cols64, per64],
        )
    }?;
    let kernel = backend.kernel(Module::RmsNorm, "rms_norm_backward_dw_finish")?;
    let grid = grid_stride(backend, cols, DW_BLOCK);
    // SAFETY: partial holds chunks·C f32, dw C f32.
    unsafe {
        backend.launch_1d(
            &kernel,
            grid,
            DW_BLOCK,
            &mut params![pdw, pp, chunks64, cols64],
        )
    }?;
    Ok((dx, dw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::compile_without_spills;

    #[test]
    fn kernels_compile_without_spills() {
        let Some(compiled) = compile_without_spills(Module::RmsNorm) else {
            return;
        };
        for name in KERNELS {
            assert!(compiled.log.contains(name), "{name} missing from the log");
        }
    }

    #[test]
    fn dw_chunks_cover_every_row_within_the_grid() {
        for rows in [1usize, 31, 32, 33, 1000, 65_536, 1 << 20, (1 << 24) + 3] {
            let (per, chunks) = dw_chunks(rows);
            assert!(per >= DW_MIN_ROWS_PER_CHUNK && chunks >= 1, "{rows}");
            assert!(chunks <= DW_MAX_CHUNKS, "{rows}: {chunks} chunks");
            // Every row in exactly one chunk, and no chunk empty.
            assert!(per * chunks >= rows && per * (chunks - 1) < rows, "{rows}");
        }
    }
}
