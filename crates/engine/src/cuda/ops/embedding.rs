//! Token embedding gather on the GPU, and its backward scatter-add (kernels/embedding.cu).

use std::sync::Arc;

use super::{bf16_ptr, empty, f32_ptr, grid_stride, row_block};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::{CudaStorage, DType};
use crate::ops::IdBuckets;
use crate::{EngineError, Indices, Result, Tensor};

/// The kernels of kernels/embedding.cu.
pub(crate) const KERNELS: &[&str] = &["embedding_bf16", "embedding_backward_f32"];

const BACKWARD_BLOCK: u32 = 256;

/// table: [V, C], ids: [T] → [T, C] scaled by `scale`.
pub(crate) fn embedding(
    backend: &Arc<CudaBackend>,
    table: &Tensor,
    ids: &Indices,
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "embedding";
    let [vocab, cols] = table.dims(OP, "table: [V, C]")?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(EngineError::Index {
            op: OP,
            index: bad as usize,
            limit: vocab,
        });
    }
    let pt = bf16_ptr(OP, "table", table)?;
    let out = empty(backend, &[ids.len(), cols], DType::Bf16)?;
    if ids.is_empty() || cols == 0 {
        return Ok(out);
    }
    let po = bf16_ptr(OP, "out", &out)?;
    let ids_dev = ids.on(backend)?;
    let pi = ids_dev.ptr;
    let kernel = backend.kernel(Module::Embedding, "embedding_bf16")?;
    let cols64 = cols as i64;
    let rows = u32::try_from(ids.len()).map_err(|_| EngineError::Arg {
        op: OP,
        msg: format!("{} tokens exceed one launch's grid", ids.len()),
    })?;
    // SAFETY: table holds V·C bf16 and every id < V (checked above); out holds T·C; ids_dev
    // holds T u32 and is kept alive until this launch is queued.
    unsafe {
        backend.launch(
            &kernel,
            (rows, 1, 1),
            (row_block(cols).min(256), 1, 1),
            0,
            &mut params![po, pt, pi, cols64, scale],
        )
    }?;
    Ok(out)
}

/// The gradient of the lookup w.r.t. the table: dy: [T, C] bf16 → d_table: [V, C] f32
/// (V = `rows`, assigned): `d_table[v] = scale · Σ_{t: ids[t] = v} dy[t]`. `buckets` holds
/// the ids' positions grouped by id (checked against V and T by the caller).
///
/// Deterministic: each (id, column) is summed by one thread in position order, in f32.
pub(crate) fn embedding_backward(
    backend: &Arc<CudaBackend>,
    buckets: &IdBuckets,
    dy: &Tensor,
    rows: usize,
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "embedding_backward";
    let [tokens, cols] = dy.dims(OP, "dy: [T, C]")?;
    let pdy = bf16_ptr(OP, "dy", dy)?;
    // Rows no id names stay zero; the kernel writes only the named ones.
    let d_table = Tensor::from_cuda(
        &[rows, cols],
        CudaStorage::zeroed(backend, rows * cols, DType::F32)?,
    );
    if tokens == 0 || cols == 0 {
        return Ok(d_table);
    }
    let to_u32 = |what: &str, n: usize| {
        u32::try_from(n).map_err(|_| EngineError::Arg {
            op: OP,
            msg: format!("{what} = {n} exceeds the kernel's 32-bit indices"),
        })
    };
    to_u32("tokens", tokens)?;
    to_u32("rows", rows)?;
    // One upload: uniq [U], starts [U + 1], order [T] (all < 2³² by the checks above).
    let mut uniq = Vec::new();
    let mut starts = vec![0u32];
    for (v, range) in buckets.starts.windows(2).enumerate() {
        if range[1] > range[0] {
            uniq.push(v as u32);
            starts.push(range[1] as u32);
        }
    }
    let n_uniq = uniq.len();
    let mut packed = uniq;
    packed.extend_from_slice(&starts);
    packed.extend(buckets.order.iter().map(|&pos| pos as u32));
    let table = backend.upload(&packed)?;
    let pu = table.ptr();
    let ps = pu + 4 * n_uniq as u64;
    let po = ps + 4 * (n_uniq as u64 + 1);
    let pd = f32_ptr(OP, "d_table", &d_table)?;
    let kernel = backend.kernel(Module::Embedding, "embedding_backward_f32")?;
    let (n_uniq64, cols64) = (n_uniq as i64, cols as i64);
    let grid = grid_stride(backend, n_uniq * cols, BACKWARD_BLOCK);
    // SAFETY: d_table holds V·C f32 and every uniq id < V; dy holds T·C bf16 and every
    // position in order < T; starts is non-decreasing up to T. The upload returns to the
    // arena only after the launch is queued.
    unsafe {
        backend.launch_1d(
            &kernel,
            grid,
            BACKWARD_BLOCK,
            &mut params![pd, pdy, pu, ps, po, n_uniq64, cols64, scale],
        )
    }?;
    Ok(d_table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::compile_without_spills;

    #[test]
    fn kernels_compile_without_spills() {
        let Some(compiled) = compile_without_spills(Module::Embedding) else {
            return;
        };
        for name in KERNELS {
            assert!(compiled.log.contains(name), "{name} missing from the log");
        }
    }
}
