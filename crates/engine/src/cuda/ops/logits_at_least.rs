//! `ops::logits_at_least` on the GPU (kernels/top_k.cu, `logits_at_least_f32`): one block per
//! listed row compacts the row's qualifying tokens in id order; one download brings back the
//! counts [N] and up to `cap` (id, logit) pairs per row.

use std::sync::Arc;

use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::ops::{f32_ptr, to_i32};
use crate::ops::RowTokens;
use crate::{EngineError, Result, Tensor};

/// logits: [B, V] f32 on the device; `rows` and `thresholds` already checked by
/// `ops::logits_at_least` (one threshold per row, every row below B, V < 2³² − 1).
pub(crate) fn logits_at_least(
    backend: &Arc<CudaBackend>,
    logits: &Tensor,
    b: usize,
    v: usize,
    rows: &[usize],     // [N]
    thresholds: &[f32], // [N]
    cap: usize,
) -> Result<Vec<Option<RowTokens>>> {
    const OP: &str = "logits_at_least";
    let pl = f32_ptr(OP, "logits", logits)?;
    let n = rows.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let grid = u32::try_from(n).map_err(|_| EngineError::Arg {
        op: OP,
        msg: format!("{n} rows exceed the kernel's grid"),
    })?;
    // No row can have more than V tokens: a larger cap only wastes the output buffer.
    let slots = cap.min(v);
    // The row list in one upload: row indices [N] u32, then the thresholds' bits [N].
    let args: Vec<u32> = rows
        .iter()
        .map(|&r| r as u32)
        .chain(thresholds.iter().map(|t| t.to_bits()))
        .collect();
    debug_assert!(rows.iter().all(|&r| r < b));
    let args = backend.upload(&args)?;
    // Output, one download: counts [N] u32, ids [N, slots] u32, values [N, slots] f32.
    let words = n * (2 * slots + 1);
    let out = backend.alloc(words * 4)?;
    let (pa, pc, pi, pv) = (
        args.ptr(),
        out.ptr(),
        out.ptr() + (n * 4) as u64,
        out.ptr() + (n * (slots + 1) * 4) as u64,
    );
    let kernel = backend.kernel(Module::TopK, "logits_at_least_f32")?;
    let threads = (v.div_ceil(32) * 32).clamp(32, 1024) as u32;
    let (v64, n32, slots32) = (v as i64, to_i32(OP, "rows", n)?, slots as u32);
    // SAFETY: logits hold B·V f32 and every listed row is below B; args hold 2N words; the
    // output buffer N·(2·slots + 1) words, split as above.
    unsafe {
        backend.launch_1d(
            &kernel,
            grid,
            threads,
            &mut params![pl, pa, pc, pi, pv, v64, n32, slots32],
        )
    }?;
    let mut host = vec![0u32; words];
    backend.download(&out, &mut host)?;
    let (counts, rest) = host.split_at(n);
    let (ids, values) = rest.split_at(n * slots);
    Ok(counts
        .iter()
        .enumerate()
        .map(|(j, &count)| {
            let count = count as usize;
            // The kernel counts past the cap before it stops: more than `cap` is None.
            (count <= cap).then(|| {
                let at = j * slots;
                ids[at..at + count]
                    .iter()
                    .zip(&values[at..at + count])
                    .map(|(&id, &x)| (id, f32::from_bits(x)))
                    .collect()
            })
        })
        .collect())
}
