//! Paged attention and the KV write on the GPU (kernels/paged_attention.cu).
//!
//! One call runs up to three kernels, each on its own share of the sequences: the split-K
//! decode kernel for sequences of at most R = 2, 4 or 8 GQA rows (q_len · H/Hkv), then
//! paged_combine when a sequence's keys were split over several blocks, and the tensor-core
//! kernel for the longer ones. Both read K/V in place through the block tables. The layout's
//! arrays go to the GPU once per [`PagedLayout`] and are reused by every layer's call.

use std::sync::Arc;

use super::attention::{check_grid_yz, launch_warp_per_row};
use super::{bf16_ptr, empty, grid_stride, to_i32};
use crate::cuda::arena::DeviceBuffer;
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::{CudaStorage, DType};
use crate::ops::paged_attention::{PagedDims, PagedKernel, PagedLayout, SlotMapping};
use crate::ops::{AttentionOut, AttentionParams};
use crate::{EngineError, Result, Tensor};

/// Every kernel of the module (checked present after each compile).
pub(crate) const KERNELS: &[&str] = &[
    "paged_decode_d64_r2",
    "paged_decode_d64_r4",
    "paged_decode_d64_r8",
    "paged_decode_d128_r2",
    "paged_decode_d128_r4",
    "paged_decode_d128_r8",
    "paged_decode_d256_r2",
    "paged_decode_d256_r4",
    "paged_decode_d256_r8",
    "paged_combine",
    "paged_prefill_d64",
    "paged_prefill_d128",
    "paged_prefill_d256",
    "paged_simple",
    "paged_kv_write",
];

/// Must match `PagedArgs` in kernels/paged_attention.cu field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct PagedArgs {
    q: u64,
    k_pool: u64,
    v_pool: u64,
    out: u64,
    lse: u64,
    q_starts: u64,
    kv_lens: u64,
    block_tables: u64,
    part_out: u64,
    part_ml: u64,
    tq: i32,
    batch: i32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    block_size: i32,
    max_blocks: i32,
    window: i32,
    decode_max_rows: i32,
    chunk: i32,
    num_splits: i32,
    scale: f32,
    softcap: f32,
    pad: i32,
}

/// Threads of a decode or combine block (DECODE_WARPS in the kernel).
const DECODE_THREADS: u32 = 128;
/// Keys per decode block at most (MAX_CHUNK in the kernel), and the least the automatic
/// choice goes down to.
const MAX_CHUNK: usize = 1024;
const MIN_CHUNK: usize = 64;
/// The decode kernel's row counts (R): GQA rows of one sequence it can hold.
const DECODE_ROWS: [usize; 3] = [2, 4, 8];

/// A zeroed bf16 pool on GPU `ordinal`.
pub(crate) fn zeroed_pool(ordinal: usize, shape: &[usize]) -> Result<Tensor> {
    let backend = CudaBackend::get(ordinal)?;
    let len = shape.iter().product();
    Ok(Tensor::from_cuda(
        shape,
        CudaStorage::zeroed(&backend, len, DType::Bf16)?,
    ))
}

/// Copies the new rows into their slots (shapes and slot range checked by the caller).
pub(crate) fn paged_kv_write(
    backend: &Arc<CudaBackend>,
    k_pool: &mut Tensor,
    v_pool: &mut Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    slots: &SlotMapping,
) -> Result<()> {
    const OP: &str = "paged_kv_write";
    let (pk_new, pv_new) = (bf16_ptr(OP, "k_new", k_new)?, bf16_ptr(OP, "v_new", v_new)?);
    bf16_ptr(OP, "k_pool", k_pool)?;
    bf16_ptr(OP, "v_pool", v_pool)?;
    let tokens = slots.len();
    if tokens == 0 || k_new.is_empty() {
        return Ok(());
    }
    let row = k_new.len() / tokens;
    let (k_len, v_len) = (k_pool.len(), v_pool.len());
    if let Some(s) = k_pool.cuda_mut() {
        s.make_exclusive(k_len)?;
    }
    if let Some(s) = v_pool.cuda_mut() {
        s.make_exclusive(v_len)?;
    }
    let (pk, pv) = (
        bf16_ptr(OP, "k_pool", k_pool)?,
        bf16_ptr(OP, "v_pool", v_pool)?,
    );
    let dev_slots = slots.device.get(backend, slots.as_slice())?;
    let ps = dev_slots.ptr;
    let (t32, row32) = (to_i32(OP, "T", tokens)?, to_i32(OP, "Hkv·D", row)?);
    let chunks = if row.is_multiple_of(8) { row / 8 } else { row };
    let grid = grid_stride(backend, tokens * chunks, 256);
    let kernel = backend.kernel(Module::PagedAttention, "paged_kv_write")?;
    // SAFETY: the pools hold every slot named (slots.end() ≤ capacity, checked by the op),
    // k_new and v_new hold T rows of `row` bf16; the slots buffer holds T i32 and lives in
    // the mapping's cache beyond this launch.
    unsafe {
        backend.launch_1d(
            &kernel,
            grid,
            256,
            &mut params![pk, pv, pk_new, pv_new, ps, t32, row32],
        )
    }?;
    Ok(())
}

/// The decode kernel's name for head dim `d` and `rows` GQA rows, if it has one.
fn decode_kernel(d: usize, rows: usize) -> Option<&'static str> {
    let r = *DECODE_ROWS.iter().find(|&&r| r >= rows)?;
    Some(match (d, r) {
        (64, 2) => "paged_decode_d64_r2",
        (64, 4) => "paged_decode_d64_r4",
        (64, 8) => "paged_decode_d64_r8",
        (128, 2) => "paged_decode_d128_r2",
        (128, 4) => "paged_decode_d128_r4",
        (128, 8) => "paged_decode_d128_r8",
        (256, 2) => "paged_decode_d256_r2",
        (256, 4) => "paged_decode_d256_r4",
        (256, 8) => "paged_decode_d256_r8",
        _ => return None,
    })
}

/// The tensor-core kernel for head dim `d`: its name and keys per tile (BN).
fn prefill_kernel(d: usize) -> Option<(&'static str, usize)> {
    match d {
        64 => Some(("paged_prefill_d64", 64)),
        128 => Some(("paged_prefill_d128", 64)),
        256 => Some(("paged_prefill_d256", 32)),
        _ => None,
    }
}

/// Dynamic shared memory of the tensor-core kernel: a 64-row Q tile and double-buffered K
/// and V tiles of `block_keys` rows, each row padded by 8 elements (as attention.cu).
fn prefill_smem(d: usize, block_keys: usize) -> usize {
    (64 + 4 * block_keys) * (d + 8) * 2
}

/// Keys per decode block: the largest (fewest splits to merge) that still gives the GPU two
/// blocks per SM, down to [`MIN_CHUNK`].
fn pick_chunk(seq_heads: usize, max_keys: usize, sm_count: usize) -> usize {
    let mut chunk = MAX_CHUNK;
    while chunk > MIN_CHUNK && seq_heads * max_keys.div_ceil(chunk) < 2 * sm_count {
        chunk /= 2;
    }
    chunk
}

/// The visible keys of sequence `b`: from its first query's window start to its end.
fn visible_keys(layout: &PagedLayout, b: usize, window: Option<usize>) -> usize {
    let kv_len = layout.kv_lens()[b];
    let q_len = layout.q_starts()[b + 1] - layout.q_starts()[b];
    let first = window.map_or(0, |w| (kv_len - q_len + 1).saturating_sub(w));
    kv_len - first
}

/// q: [Tq, H, D], pools [num_blocks, block_size, Hkv, D] (all checked by the caller)
/// → out [Tq, H, D] bf16, lse [H, Tq] f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn paged_attention(
    backend: &Arc<CudaBackend>,
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    layout: &PagedLayout,
    params: &AttentionParams,
    PagedDims { tq, h, hkv, d }: PagedDims,
    kernel: PagedKernel,
) -> Result<AttentionOut> {
    const OP: &str = "paged_attention";
    if d > 256 {
        return Err(EngineError::Unsupported {
            op: "paged attention with a head dim above 256",
            device: q.device().to_string(),
        });
    }
    let (pq, pk, pv) = (
        bf16_ptr(OP, "q", q)?,
        bf16_ptr(OP, "k_pool", k_pool)?,
        bf16_ptr(OP, "v_pool", v_pool)?,
    );
    let out = empty(backend, &[tq, h, d], DType::Bf16)?;
    let lse = empty(backend, &[h, tq], DType::F32)?;
    let batch = layout.num_seqs();
    if tq == 0 || h == 0 || batch == 0 {
        return Ok(AttentionOut { out, lse });
    }
    check_grid_yz(OP, &[("B", batch), ("Hkv", hkv), ("H", h)])?;
    let meta = layout.device.get(backend, layout.flat())?;
    let base = meta.ptr;
    let mut args = PagedArgs {
        q: pq,
        k_pool: pk,
        v_pool: pv,
        out: bf16_ptr(OP, "out", &out)?,
        lse: lse.cuda().map(|s| s.ptr()).unwrap_or(0),
        q_starts: base,
        kv_lens: base + 4 * (batch as u64 + 1),
        block_tables: base + 4 * (2 * batch as u64 + 1),
        part_out: 0,
        part_ml: 0,
        tq: to_i32(OP, "Tq", tq)?,
        batch: batch as i32,
        heads: h as i32,
        kv_heads: hkv as i32,
        head_dim: d as i32,
        block_size: to_i32(OP, "block_size", layout.block_size())?,
        max_blocks: to_i32(OP, "max_blocks", layout.max_blocks())?,
        window: params.window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
        decode_max_rows: 0,
        chunk: 0,
        num_splits: 1,
        scale: params.scale,
        softcap: params.softcap.unwrap_or(0.0),
        pad: 0,
    };

    let prefill = prefill_kernel(d);
    let use_simple = match kernel {
        PagedKernel::Simple => true,
        PagedKernel::TensorCore if prefill.is_none() => {
            return Err(EngineError::Unsupported {
                op: "tensor-core paged attention for this head dim (64, 128, 256 have one)",
                device: q.device().to_string(),
            });
        }
        PagedKernel::DecodeChunk(c) if !(1..=MAX_CHUNK).contains(&c) => {
            return Err(EngineError::Arg {
                op: OP,
                msg: format!("a decode chunk must hold 1..={MAX_CHUNK} keys, got {c}"),
            });
        }
        _ => prefill.is_none(),
    };
    if use_simple {
        // SAFETY: PagedArgs mirrors the kernel's struct; q, out, lse hold their shapes'
        // sizes; the layout arrays (validated against the pools by the op) stay alive in the
        // layout's device cache; one warp per (query, head).
        unsafe {
            launch_warp_per_row(
                backend,
                Module::PagedAttention,
                "paged_simple",
                [tq, h],
                &args,
            )
        }?;
        return Ok(AttentionOut { out, lse });
    }

    // Which sequences the decode kernel takes: all of at most 8 rows, unless forced off.
    let group = h / hkv;
    let rows = |b: usize| (layout.q_starts()[b + 1] - layout.q_starts()[b]) * group;
    let decode_rows = (0..batch)
        .map(rows)
        .filter(|&r| r <= DECODE_ROWS[2])
        .max()
        .unwrap_or(0);
    let decode = match kernel {
        PagedKernel::TensorCore => None,
        _ if decode_rows == 0 => None,
        _ => decode_kernel(d, decode_rows),
    };
    // Keep the split partial buffers alive until both kernels are queued.
    let mut _partials: Option<(DeviceBuffer, DeviceBuffer)> = None;
    if let Some(name) = decode {
        let r_cap = *DECODE_ROWS
            .iter()
            .find(|&&r| r >= decode_rows)
            .unwrap_or(&DECODE_ROWS[2]);
        let decode_seqs: Vec<usize> = (0..batch)
            .filter(|&b| (1..=r_cap).contains(&rows(b)))
            .collect();
        let max_keys = decode_seqs
            .iter()
            .map(|&b| visible_keys(layout, b, params.window))
            .max()
            .unwrap_or(1);
        let chunk = match kernel {
            PagedKernel::DecodeChunk(c) => c,
            _ => pick_chunk(
                decode_seqs.len() * hkv,
                max_keys,
                backend.sm_count() as usize,
            ),
        };
        let splits = max_keys.div_ceil(chunk).max(1);
        args.decode_max_rows = r_cap as i32;
        args.chunk = chunk as i32;
        args.num_splits = to_i32(OP, "decode splits", splits)?;
        if splits > 1 {
            let n = batch * hkv * r_cap * splits;
            let part_out = backend.alloc(n * d * 4)?;
            let part_ml = backend.alloc(n * 2 * 4)?;
            args.part_out = part_out.ptr();
            args.part_ml = part_ml.ptr();
            _partials = Some((part_out, part_ml));
        }
        let f = backend.kernel(Module::PagedAttention, name)?;
        // SAFETY: as above; the partial buffers hold B·Hkv·R·S rows of D (and 2) f32 and
        // are dropped only after the combine is queued.
        unsafe {
            backend.launch(
                &f,
                (splits as u32, hkv as u32, batch as u32),
                (DECODE_THREADS, 1, 1),
                0,
                &mut params![args],
            )
        }?;
        if splits > 1 {
            let f = backend.kernel(Module::PagedAttention, "paged_combine")?;
            // SAFETY: as above.
            unsafe {
                backend.launch(
                    &f,
                    (batch as u32, hkv as u32, 1),
                    (DECODE_THREADS, 1, 1),
                    0,
                    &mut params![args],
                )
            }?;
        }
    }

    // The rest through the tensor cores, 64 GQA rows per block.
    let max_rows = (0..batch)
        .map(rows)
        .filter(|&r| r > args.decode_max_rows as usize)
        .max()
        .unwrap_or(0);
    if let (Some((name, block_keys)), true) = (prefill, max_rows > 0) {
        let tiles = u32::try_from(max_rows.div_ceil(64)).map_err(|_| EngineError::Arg {
            op: OP,
            msg: format!("{max_rows} rows in one sequence exceed one launch's grid"),
        })?;
        let f = backend.kernel(Module::PagedAttention, name)?;
        // SAFETY: as above.
        unsafe {
            backend.launch(
                &f,
                (tiles, hkv as u32, batch as u32),
                (128, 1, 1),
                prefill_smem(d, block_keys) as u32,
                &mut params![args],
            )
        }?;
    }
    Ok(AttentionOut { out, lse })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::compile_without_spills;

    #[test]
    fn args_layout_matches_the_kernel_struct() {
        // 10 pointers, 11 ints, 2 floats, 1 pad int: the C struct in the kernel.
        assert_eq!(std::mem::size_of::<PagedArgs>(), 10 * 8 + 14 * 4);
        assert_eq!(std::mem::align_of::<PagedArgs>(), 8);
    }

    #[test]
    fn kernel_choice() {
        assert_eq!(decode_kernel(64, 1), Some("paged_decode_d64_r2"));
        assert_eq!(decode_kernel(64, 4), Some("paged_decode_d64_r4"));
        assert_eq!(decode_kernel(64, 7), Some("paged_decode_d64_r8"));
        assert_eq!(decode_kernel(256, 3), Some("paged_decode_d256_r4"));
        assert_eq!(decode_kernel(64, 9), None);
        assert_eq!(decode_kernel(80, 2), None);
        for d in [64, 128, 256] {
            let (name, bn) = prefill_kernel(d).unwrap();
            assert!(KERNELS.contains(&name));
            assert!(prefill_smem(d, bn) <= 227 * 1024);
            for r in 1..=8 {
                assert!(KERNELS.contains(&decode_kernel(d, r).unwrap()));
            }
        }
    }

    #[test]
    fn chunks_shrink_only_when_the_grid_is_small() {
        // Batch 256 × 8 kv heads: one chunk of the largest size.
        assert_eq!(pick_chunk(2048, 256, 132), MAX_CHUNK);
        // One sequence of 4096 keys on 8 kv heads: split down to the smallest chunk.
        assert_eq!(pick_chunk(8, 4096, 132), MIN_CHUNK);
        // 17 sequence-heads × 2048 keys: 16 splits of 128 give 272 ≥ 2 × 132 blocks.
        assert_eq!(pick_chunk(17, 2048, 132), 128);
        assert_eq!(pick_chunk(16, 2048, 132), 64);
    }

    /// Compiles the module with ptxas statistics (no GPU needed): no kernel may spill, and
    /// each kernel's registers are printed.
    #[test]
    fn kernels_compile_without_spills() {
        let Some(compiled) = compile_without_spills(Module::PagedAttention) else {
            return;
        };
        assert!(compiled.log.contains("paged_decode_d64_r4"));
    }
}
