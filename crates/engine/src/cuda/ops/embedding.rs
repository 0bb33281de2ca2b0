//! Token embedding gather on the GPU (kernels/embedding.cu).

use std::sync::Arc;

use super::{bf16_ptr, empty, row_block};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::DType;
use crate::{EngineError, Indices, Result, Tensor};

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
