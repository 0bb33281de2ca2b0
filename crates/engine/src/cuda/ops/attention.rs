//! Attention on the GPU: one kernel per layer (kernels/attention.cu).
//!
//! The tensor-core kernel (FlashAttention-2 structure, GQA-packed rows) has instances for
//! head dims 64, 80, 96, 128 and 256, each with one or two 16-row m-tiles per warp; other
//! head dims up to 256 use the scalar kernel, which tests also run as an independent
//! cross-check.

use std::ffi::c_void;
use std::sync::Arc;

use super::{bf16_ptr, empty, to_i32};
use crate::cuda::arena::DeviceBuffer;
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::DType;
use crate::ops::{AttentionOut, AttentionParams, SeqLayout, check_attention_params};
use crate::{EngineError, Result, Tensor};

/// Which attention kernel to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// The tensor-core kernel when the head dim has an instance, else the scalar one.
    Auto,
    /// The tensor-core kernel (an error for head dims without an instance).
    TensorCore,
    /// The tensor-core instance with this many 16-row m-tiles per warp (1, or 2 for head
    /// dims 64, 80, 96), whatever the grid size; an error where there is none.
    TensorCoreMTiles(usize),
    /// The scalar one-warp-per-row kernel.
    Simple,
}

/// Must match `AttnArgs` in kernels/attention.cu field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnArgs {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    q_starts: u64,
    kv_starts: u64,
    tq: i32,
    batch: i32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    window: i32,
    scale: f32,
    softcap: f32,
}

/// A tensor-core instance: kernel name, 16-row m-tiles per warp, keys per tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Instance {
    name: &'static str,
    m_tiles: usize,
    block_keys: usize,
}

impl Instance {
    /// Rows of one block: 4 warps × m_tiles × 16.
    fn block_rows(self) -> usize {
        64 * self.m_tiles
    }

    /// Dynamic shared memory: the Q tile and double-buffered K and V tiles, rows padded by
    /// 8 elements.
    fn smem_bytes(self, d: usize) -> usize {
        (self.block_rows() + 4 * self.block_keys) * (d + 8) * 2
    }
}

/// The instances for a head dim: (one m-tile, two m-tiles) — see kernels/attention.cu.
fn instances(d: usize) -> Option<[Instance; 2]> {
    let i = |name, m_tiles, block_keys| Instance {
        name,
        m_tiles,
        block_keys,
    };
    Some(match d {
        64 => [
            i("attention_fwd_d64_m1", 1, 64),
            i("attention_fwd_d64_m2", 2, 64),
        ],
        80 => [
            i("attention_fwd_d80_m1", 1, 64),
            i("attention_fwd_d80_m2", 2, 64),
        ],
        96 => [
            i("attention_fwd_d96_m1", 1, 64),
            i("attention_fwd_d96_m2", 2, 32),
        ],
        // Two m-tiles of 128- or 256-wide accumulators spill or do not fit in registers.
        128 => [i("attention_fwd_d128_m1", 1, 64); 2],
        256 => [i("attention_fwd_d256_m1", 1, 32); 2],
        _ => return None,
    })
}

/// Two m-tiles per warp halve the shared-memory reads per MMA but double the rows a block
/// needs: take them while the grid still has at least two blocks per SM.
fn pick_instance(
    d: usize,
    max_rows: usize,
    blocks_per_tile: usize,
    sm_count: usize,
) -> Option<Instance> {
    let [one, two] = instances(d)?;
    let blocks = max_rows.div_ceil(two.block_rows()) * blocks_per_tile;
    Some(if blocks >= 2 * sm_count { two } else { one })
}

/// q: [Tq, H, D], k, v: [Tkv, Hkv, D] → out [Tq, H, D] (bf16) and lse [H, Tq] (f32).
pub(crate) fn attention(
    backend: &Arc<CudaBackend>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &SeqLayout,
    params: &AttentionParams,
    kernel: AttentionKernel,
) -> Result<AttentionOut> {
    const OP: &str = "attention";
    let [tq, h, d] = q.dims(OP, "q: [Tq, H, D]")?;
    let [tkv, hkv, dk] = k.dims(OP, "k: [Tkv, Hkv, D]")?;
    if dk != d || hkv == 0 || h % hkv != 0 {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("k: [Tkv, Hkv, {d}] with Hkv dividing H = {h}"),
            got: k.shape().to_vec(),
        });
    }
    v.expect_shape(OP, &[tkv, hkv, d])?;
    layout.validate(OP, tq, tkv)?;
    if d > 256 {
        return Err(EngineError::Unsupported {
            op: "attention with a head dim above 256",
            device: q.device().to_string(),
        });
    }
    check_attention_params(OP, params)?;
    let (pq, pk, pv) = (
        bf16_ptr(OP, "q", q)?,
        bf16_ptr(OP, "k", k)?,
        bf16_ptr(OP, "v", v)?,
    );
    let out = empty(backend, &[tq, h, d], DType::Bf16)?;
    let lse = empty(backend, &[h, tq], DType::F32)?;
    let batch = layout.num_seqs();
    if tq == 0 || h == 0 || batch == 0 {
        return Ok(AttentionOut { out, lse });
    }

    let (q_starts, kv_starts) = upload_starts(backend, OP, layout)?;
    let args = AttnArgs {
        q: pq,
        k: pk,
        v: pv,
        out: bf16_ptr(OP, "out", &out)?,
        lse: lse.cuda().map(|s| s.ptr()).unwrap_or(0),
        q_starts: q_starts.ptr(),
        kv_starts: kv_starts.ptr(),
        tq: to_i32(OP, "Tq", tq)?,
        batch: to_i32(OP, "B", batch)?,
        heads: to_i32(OP, "H", h)?,
        kv_heads: to_i32(OP, "Hkv", hkv)?,
        head_dim: to_i32(OP, "D", d)?,
        window: params.window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
        scale: params.scale,
        softcap: params.softcap.unwrap_or(0.0),
    };

    let group = h / hkv;
    let max_rows = (0..batch)
        .map(|b| (layout.q_starts[b + 1] - layout.q_starts[b]) * group)
        .max()
        .unwrap_or(0);
    let sm_count = backend.sm_count() as usize;
    let instance = match kernel {
        AttentionKernel::Simple => None,
        AttentionKernel::Auto => pick_instance(d, max_rows, hkv * batch, sm_count),
        AttentionKernel::TensorCore => Some(
            pick_instance(d, max_rows, hkv * batch, sm_count).ok_or(EngineError::Unsupported {
                op: "tensor-core attention for this head dim (64, 80, 96, 128, 256 have one)",
                device: q.device().to_string(),
            })?,
        ),
        AttentionKernel::TensorCoreMTiles(m) => Some(
            instances(d)
                .into_iter()
                .flatten()
                .find(|i| i.m_tiles == m)
                .ok_or(EngineError::Unsupported {
                    op: "tensor-core attention with this many m-tiles for this head dim",
                    device: q.device().to_string(),
                })?,
        ),
    };
    match instance {
        Some(inst) => {
            let tiles = u32::try_from(max_rows.div_ceil(inst.block_rows())).map_err(|_| {
                EngineError::Arg {
                    op: OP,
                    msg: format!("{max_rows} rows in one sequence exceed one launch's grid"),
                }
            })?;
            check_grid_yz(OP, &[("B", batch), ("Hkv", hkv)])?;
            let smem = inst.smem_bytes(d) as u32;
            let f = backend.kernel(Module::Attention, inst.name)?;
            // SAFETY: AttnArgs mirrors the kernel's struct; q, k, v, out, lse and both start
            // arrays hold the sizes their shapes give (layout validated above); the uploads
            // go back to the stream-ordered arena only after this launch is queued.
            unsafe {
                backend.launch(
                    &f,
                    (tiles, hkv as u32, batch as u32),
                    (128, 1, 1),
                    smem,
                    &mut params![args],
                )
            }?;
        }
        None => {
            check_grid_yz(OP, &[("H", h)])?;
            // SAFETY: as above; one warp per (query, head).
            unsafe {
                launch_warp_per_row(
                    backend,
                    Module::Attention,
                    "attention_simple",
                    [tq, h],
                    &args,
                )
            }?;
        }
    }
    Ok(AttentionOut { out, lse })
}

/// A layout's `q_starts` and `kv_starts` on the device as the kernels' i32, in that order.
pub(super) fn upload_starts(
    backend: &CudaBackend,
    op: &'static str,
    layout: &SeqLayout,
) -> Result<(DeviceBuffer, DeviceBuffer)> {
    let starts = |s: &[usize]| -> Result<Vec<i32>> {
        s.iter().map(|&x| to_i32(op, "a layout start", x)).collect()
    };
    let q_starts = backend.upload(&starts(&layout.q_starts)?)?;
    let kv_starts = backend.upload(&starts(&layout.kv_starts)?)?;
    Ok((q_starts, kv_starts))
}

/// Checks that each named dimension fits a grid's y or z extent (at most 65535), naming
/// them all in the error: "B = 70000 and Hkv = 8 must each be at most 65535".
pub(super) fn check_grid_yz(op: &'static str, dims: &[(&str, usize)]) -> Result<()> {
    if dims.iter().all(|&(_, n)| n <= 65535) {
        return Ok(());
    }
    let named: Vec<String> = dims
        .iter()
        .map(|(name, n)| format!("{name} = {n}"))
        .collect();
    let msg = match named.as_slice() {
        [one] => format!("{one} must be at most 65535"),
        [init @ .., last] => format!("{} and {last} must each be at most 65535", init.join(", ")),
        [] => unreachable!("an empty list has no dimension over the limit"),
    };
    Err(EngineError::Arg { op, msg })
}

/// Launches the scalar kernel `name` with one warp per (row, head): grid (rows, heads, 1),
/// 32 threads, no shared memory, `args` its one parameter. The caller checks `heads` with
/// [`check_grid_yz`].
///
/// # Safety
/// `A` must be the kernel's argument struct, and every buffer it points at must hold what
/// the kernel reads and writes for that grid.
pub(super) unsafe fn launch_warp_per_row<A>(
    backend: &CudaBackend,
    module: Module,
    name: &'static str,
    [rows, heads]: [usize; 2],
    args: &A,
) -> Result<()> {
    let f = backend.kernel(module, name)?;
    let mut params = [args as *const A as *mut c_void];
    // SAFETY: the caller's contract; `params` points at `args`, alive for the call.
    unsafe {
        backend.launch(
            &f,
            (rows as u32, heads as u32, 1),
            (32, 1, 1),
            0,
            &mut params,
        )
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_layout_matches_the_kernel_struct() {
        // 7 pointers, 6 ints, 2 floats, no padding: the C struct in kernels/attention.cu.
        assert_eq!(std::mem::size_of::<AttnArgs>(), 7 * 8 + 6 * 4 + 2 * 4);
        assert_eq!(std::mem::align_of::<AttnArgs>(), 8);
    }

    #[test]
    fn grid_limit_errors_name_every_dimension() {
        let msg = |dims: &[(&str, usize)]| match check_grid_yz("op", dims) {
            Err(EngineError::Arg { op: "op", msg }) => msg,
            other => panic!("{dims:?}: expected an Arg error, got {other:?}"),
        };
        assert_eq!(msg(&[("H", 65536)]), "H = 65536 must be at most 65535");
        assert_eq!(
            msg(&[("B", 1), ("Hkv", 70000)]),
            "B = 1 and Hkv = 70000 must each be at most 65535"
        );
        assert_eq!(
            msg(&[("B", 65536), ("Hkv", 2), ("H", 8)]),
            "B = 65536, Hkv = 2 and H = 8 must each be at most 65535"
        );
        assert!(check_grid_yz("op", &[("B", 65535), ("H", 0)]).is_ok());
    }

    #[test]
    fn every_instance_fits_hopper_shared_memory() {
        for d in [64, 80, 96, 128, 256] {
            for inst in instances(d).unwrap() {
                let smem = inst.smem_bytes(d);
                assert!(smem <= 227 * 1024, "{}: {smem} bytes", inst.name);
                assert!(inst.name.contains(&format!("d{d}_m{}", inst.m_tiles)));
            }
        }
        assert!(instances(40).is_none());
    }

    #[test]
    fn two_m_tiles_only_with_enough_blocks() {
        // 8 sequences of 1024 queries, GQA group 4, 8 kv heads: 32 × 64 blocks of 128 rows.
        assert_eq!(pick_instance(64, 4096, 64, 132).unwrap().m_tiles, 2);
        // One decode step: a handful of rows.
        assert_eq!(pick_instance(64, 4, 64, 132).unwrap().m_tiles, 1);
        assert_eq!(pick_instance(256, 4096, 64, 132).unwrap().m_tiles, 1);
        assert_eq!(pick_instance(128, 4096, 64, 132).unwrap().m_tiles, 1);
    }
}
