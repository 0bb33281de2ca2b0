//! Attention backward on the GPU (kernels/attention_backward.cu): dq, dk, dv from the
//! forward's inputs, its bf16 `out` and f32 `lse`, and the bf16 output gradient.
//!
//! One call queues three launches (four at head dim 256): Δ = rowsum(dO ∘ O) into an f32
//! scratch buffer, then dQ over tiles of query rows, then dK and dV over tiles of keys. The
//! passes never write the same element, so there are no atomics and the result is bitwise
//! reproducible (the kernel file's header says what that costs: seven tile products instead of
//! FlashAttention-2's five). Head dims 64, 80, 96, 128 and 256 run on tensor cores (mma.sync);
//! every other head dim up to 256 runs the scalar kernels, which tests also run as an
//! independent cross-check.
//!
//! Dtypes: q, k, v, out, d_out bf16; lse f32 (what the GPU forward returns); dq, dk, dv come
//! back bf16 (activation gradients), computed in f32 and rounded once.

use std::sync::Arc;

use super::attention::{check_grid_yz, launch_warp_per_row, upload_starts};
use super::{bf16_ptr, f32_ptr, grid_stride, to_i32};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::{CudaStorage, DType};
use crate::ops::{AttentionGrads, AttentionParams, SeqLayout, check_attention_params};
use crate::{EngineError, Result, Tensor};

/// Every kernel of kernels/attention_backward.cu (checked present after each compile).
pub(crate) const KERNELS: &[&str] = &[
    "attn_bwd_delta",
    "attn_bwd_dq_simple",
    "attn_bwd_dkdv_simple",
    "attn_bwd_dq_d64",
    "attn_bwd_dq_d80",
    "attn_bwd_dq_d96",
    "attn_bwd_dq_d128",
    "attn_bwd_dq_d256",
    "attn_bwd_dkdv_d64",
    "attn_bwd_dkdv_d80",
    "attn_bwd_dkdv_d96",
    "attn_bwd_dkdv_d128",
    "attn_bwd_dk_d256",
    "attn_bwd_dv_d256",
];

/// Must match `AttnBwdArgs` in kernels/attention_backward.cu field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnBwdArgs {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    d_out: u64,
    lse: u64,
    delta: u64,
    dq: u64,
    dk: u64,
    dv: u64,
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

/// Query rows (dQ kernel) or keys (dK/dV kernels) per block of every tensor-core kernel:
/// 4 warps × 16.
const BLOCK_ROWS: usize = 64;

/// The tensor-core kernels of one head dim.
#[derive(Clone, Copy, Debug)]
struct Instance {
    /// The dQ kernel and its keys per tile (BN).
    dq: (&'static str, usize),
    /// The dK/dV kernels (one, or dK and dV apart at D = 256) and their query rows per tile
    /// (BQ).
    dkdv: &'static [(&'static str, usize)],
}

/// Tile sizes as in the kernel file's instances (untuned: sizes that fit in registers without
/// spills).
fn instance(d: usize) -> Option<Instance> {
    let i = |dq, dkdv| Some(Instance { dq, dkdv });
    match d {
        64 => i(("attn_bwd_dq_d64", 64), &[("attn_bwd_dkdv_d64", 64)]),
        80 => i(("attn_bwd_dq_d80", 64), &[("attn_bwd_dkdv_d80", 64)]),
        96 => i(("attn_bwd_dq_d96", 64), &[("attn_bwd_dkdv_d96", 32)]),
        128 => i(("attn_bwd_dq_d128", 64), &[("attn_bwd_dkdv_d128", 32)]),
        256 => i(
            ("attn_bwd_dq_d256", 32),
            &[("attn_bwd_dk_d256", 32), ("attn_bwd_dv_d256", 32)],
        ),
        _ => None,
    }
}

/// Dynamic shared memory of the dQ kernel: Q and dO tiles, double-buffered K and V tiles,
/// rows padded by 8 elements.
fn dq_smem(d: usize, keys: usize) -> usize {
    (2 * BLOCK_ROWS + 4 * keys) * (d + 8) * 2
}

/// Dynamic shared memory of a dK/dV kernel: K and V tiles, double-buffered Q and dO tiles,
/// and per buffered row its position, lse and Δ (4 bytes each).
fn dkdv_smem(d: usize, rows: usize) -> usize {
    (2 * BLOCK_ROWS + 4 * rows) * (d + 8) * 2 + 2 * rows * 12
}

/// Which kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    TensorCore,
    Simple,
}

/// The tensor-core kernels when the head dim has an instance, else the scalar ones.
fn auto_path(d: usize) -> Path {
    if instance(d).is_some() {
        Path::TensorCore
    } else {
        Path::Simple
    }
}

/// q: [Tq, H, D], k, v: [Tkv, Hkv, D], out, d_out: [Tq, H, D] (bf16), lse: [H, Tq] (f32) →
/// dq [Tq, H, D], dk, dv [Tkv, Hkv, D] (bf16). `ops::attention_backward` checks the shapes,
/// layout and parameters first, with the rules the CPU path uses.
#[allow(clippy::too_many_arguments)] // The forward's inputs, its saved outputs, their gradient.
pub(crate) fn attention_backward(
    backend: &Arc<CudaBackend>,
    q: &Tensor,     // [Tq, H, D]
    k: &Tensor,     // [Tkv, Hkv, D]
    v: &Tensor,     // [Tkv, Hkv, D]
    out: &Tensor,   // [Tq, H, D]
    lse: &Tensor,   // [H, Tq]
    d_out: &Tensor, // [Tq, H, D]
    layout: &SeqLayout,
    params: &AttentionParams,
) -> Result<AttentionGrads> {
    let path = auto_path(q.shape().get(2).copied().unwrap_or(0));
    attention_backward_on(backend, q, k, v, out, lse, d_out, layout, params, path)
}

/// [`attention_backward`] on the chosen kernels (tests run both on the same inputs).
#[allow(clippy::too_many_arguments)]
fn attention_backward_on(
    backend: &Arc<CudaBackend>,
    q: &Tensor,     // [Tq, H, D]
    k: &Tensor,     // [Tkv, Hkv, D]
    v: &Tensor,     // [Tkv, Hkv, D]
    out: &Tensor,   // [Tq, H, D]
    lse: &Tensor,   // [H, Tq]
    d_out: &Tensor, // [Tq, H, D]
    layout: &SeqLayout,
    params: &AttentionParams,
    path: Path,
) -> Result<AttentionGrads> {
    const OP: &str = "attention_backward";
    // The caller's checks, repeated where a mistake would make a kernel read out of bounds.
    let [tq, h, d] = q.dims(OP, "q: [Tq, H, D]")?;
    let [tkv, hkv, _] = k.dims(OP, "k: [Tkv, Hkv, D]")?;
    if hkv == 0 || h % hkv != 0 {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("k: [Tkv, Hkv, {d}] with Hkv dividing H = {h}"),
            got: k.shape().to_vec(),
        });
    }
    k.expect_shape(OP, &[tkv, hkv, d])?;
    v.expect_shape(OP, &[tkv, hkv, d])?;
    out.expect_shape(OP, &[tq, h, d])?;
    d_out.expect_shape(OP, &[tq, h, d])?;
    lse.expect_shape(OP, &[h, tq])?;
    layout.validate(OP, tq, tkv)?;
    check_attention_params(OP, params)?;
    if d > 256 {
        return Err(EngineError::Unsupported {
            op: "attention_backward with a head dim above 256",
            device: q.device().to_string(),
        });
    }
    let ptrs = [
        bf16_ptr(OP, "q", q)?,
        bf16_ptr(OP, "k", k)?,
        bf16_ptr(OP, "v", v)?,
        bf16_ptr(OP, "out", out)?,
        bf16_ptr(OP, "d_out", d_out)?,
        f32_ptr(OP, "lse", lse)?,
    ];
    let [pq, pk, pv, pout, pdo, plse] = ptrs;

    let batch = layout.num_seqs();
    if tq == 0 || h == 0 || d == 0 || batch == 0 {
        // No query (keys cached from earlier steps get zero gradients), or nothing to
        // differentiate.
        let zeros = |shape: &[usize]| -> Result<Tensor> {
            let len = shape.iter().product();
            Ok(Tensor::from_cuda(
                shape,
                CudaStorage::zeroed(backend, len, DType::Bf16)?,
            ))
        };
        return Ok(AttentionGrads {
            dq: zeros(&[tq, h, d])?,
            dk: zeros(&[tkv, hkv, d])?,
            dv: zeros(&[tkv, hkv, d])?,
        });
    }
    let alloc = |shape: &[usize]| -> Result<Tensor> {
        let len = shape.iter().product();
        Ok(Tensor::from_cuda(
            shape,
            CudaStorage::alloc(backend, len, DType::Bf16)?,
        ))
    };
    let (dq, dk, dv) = (
        alloc(&[tq, h, d])?,
        alloc(&[tkv, hkv, d])?,
        alloc(&[tkv, hkv, d])?,
    );

    let group = h / hkv;
    let longest = |s: &[usize]| s.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let max_rows = longest(&layout.q_starts) * group;
    let max_keys = longest(&layout.kv_starts);
    // The kernels index a sequence's GQA-packed rows and keys with 32-bit ints.
    to_i32(OP, "a sequence's query rows × H/Hkv", max_rows)?;
    to_i32(OP, "Tkv", tkv)?;
    let (q_starts, kv_starts) = upload_starts(backend, OP, layout)?;
    let delta = backend.alloc(h * tq * std::mem::size_of::<f32>())?; // [H, Tq] f32
    let device_ptr = |t: &Tensor| t.cuda().map_or(0, |s| s.ptr());
    let args = AttnBwdArgs {
        q: pq,
        k: pk,
        v: pv,
        out: pout,
        d_out: pdo,
        lse: plse,
        delta: delta.ptr(),
        dq: device_ptr(&dq),
        dk: device_ptr(&dk),
        dv: device_ptr(&dv),
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

    // SAFETY (every launch below): AttnBwdArgs mirrors the kernel's struct; q, out, d_out and
    // dq hold Tq·H·D bf16, k, v, dk, dv Tkv·Hkv·D, lse and delta H·Tq f32, and both start
    // arrays B + 1 ints describing a validated layout; the scratch buffers go back to the
    // stream-ordered arena only after these launches are queued.
    let f = backend.kernel(Module::AttentionBackward, "attn_bwd_delta")?;
    // One warp per (token, head) row, 4 per block.
    unsafe { backend.launch_1d(&f, grid_stride(backend, tq * h, 4), 128, &mut params![args]) }?;
    match path {
        Path::TensorCore => {
            let inst = instance(d).ok_or(EngineError::Unsupported {
                op: "tensor-core attention_backward for this head dim (64, 80, 96, 128, 256 have one)",
                device: q.device().to_string(),
            })?;
            check_grid_yz(OP, &[("B", batch), ("Hkv", hkv)])?;
            let tiles = |n: usize| {
                u32::try_from(n.div_ceil(BLOCK_ROWS)).map_err(|_| EngineError::Arg {
                    op: OP,
                    msg: format!("{n} rows of one sequence exceed one launch's grid"),
                })
            };
            let (name, keys) = inst.dq;
            let f = backend.kernel(Module::AttentionBackward, name)?;
            // SAFETY: as above; grid (query row tiles, Hkv, B).
            unsafe {
                backend.launch(
                    &f,
                    (tiles(max_rows)?, hkv as u32, batch as u32),
                    (128, 1, 1),
                    dq_smem(d, keys) as u32,
                    &mut params![args],
                )
            }?;
            for &(name, rows) in inst.dkdv {
                let f = backend.kernel(Module::AttentionBackward, name)?;
                // SAFETY: as above; grid (key tiles, Hkv, B).
                unsafe {
                    backend.launch(
                        &f,
                        (tiles(max_keys)?, hkv as u32, batch as u32),
                        (128, 1, 1),
                        dkdv_smem(d, rows) as u32,
                        &mut params![args],
                    )
                }?;
            }
        }
        Path::Simple => {
            check_grid_yz(OP, &[("H", h)])?;
            let module = Module::AttentionBackward;
            // SAFETY: as above; one warp per (query, head), then per (key, kv head).
            unsafe {
                launch_warp_per_row(backend, module, "attn_bwd_dq_simple", [tq, h], &args)?;
                launch_warp_per_row(backend, module, "attn_bwd_dkdv_simple", [tkv, hkv], &args)
            }?;
        }
    }
    Ok(AttentionGrads { dq, dk, dv })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::compile_without_spills;

    #[test]
    fn args_layout_matches_the_kernel_struct() {
        // 12 pointers, 6 ints, 2 floats, no padding: the C struct in the kernel file.
        assert_eq!(std::mem::size_of::<AttnBwdArgs>(), 12 * 8 + 6 * 4 + 2 * 4);
        assert_eq!(std::mem::align_of::<AttnBwdArgs>(), 8);
    }

    #[test]
    fn every_instance_is_listed_and_fits_hopper_shared_memory() {
        for d in [64, 80, 96, 128, 256] {
            let inst = instance(d).unwrap();
            assert_eq!(auto_path(d), Path::TensorCore);
            let (name, keys) = inst.dq;
            assert!(KERNELS.contains(&name) && name.ends_with(&format!("_d{d}")));
            assert!(dq_smem(d, keys) <= 227 * 1024, "{name}");
            for &(name, rows) in inst.dkdv {
                assert!(KERNELS.contains(&name) && name.ends_with(&format!("_d{d}")));
                assert!(dkdv_smem(d, rows) <= 227 * 1024, "{name}");
            }
        }
        // D = 256 needs dK and dV apart (their accumulators would not fit in registers).
        assert_eq!(instance(256).unwrap().dkdv.len(), 2);
        for d in [1, 12, 24, 40, 100, 255] {
            assert_eq!(auto_path(d), Path::Simple, "{d}");
        }
    }

    /// Compiles the module with ptxas statistics (no GPU needed): no kernel may spill.
    #[test]
    fn kernels_compile_without_spills() {
        let Some(compiled) = compile_without_spills(Module::AttentionBackward) else {
            return;
        };
        for name in KERNELS {
            assert!(
                compiled.log.contains(name),
                "{name} missing from the ptxas log"
            );
        }
    }

    // ---- on the GPU: the scalar kernels at the tensor-core head dims ----

    use crate::Device;
    use crate::test_util::Rng;

    fn bf16_exact(rng: &mut Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| half::bf16::from_f32(rng.uniform(lo, hi)).to_f32())
            .collect();
        Tensor::from_vec(data, shape).unwrap()
    }

    /// max |got − want| over max |want|.
    fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
        let (got, want) = (got.to_vec().unwrap(), want.to_vec().unwrap());
        let scale = want.iter().fold(0.0f64, |m, &w| m.max(w.abs() as f64));
        let err = got
            .iter()
            .zip(&want)
            .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
        err / scale.max(f64::MIN_POSITIVE)
    }

    /// The integration tests (tests/cuda_attention_backward.rs) reach only the automatic
    /// choice, which never runs the scalar kernels at a tensor-core head dim: here both paths
    /// run on the same inputs against the CPU reference.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn both_paths_match_cpu_at_tensor_core_head_dims() {
        let gpu = Device::Cuda(0);
        let backend = CudaBackend::get(0).unwrap();
        let mut rng = Rng::new(91);
        let layout = SeqLayout {
            q_starts: vec![0, 7, 107, 108],
            kv_starts: vec![0, 7, 150, 170],
        };
        let (tq, tkv) = (108, 170);
        for (h, hkv, d) in [(8, 2, 64), (4, 4, 128), (4, 2, 256), (2, 1, 80), (3, 3, 96)] {
            for (window, softcap) in [(None, None), (Some(33), Some(2.0))] {
                let params = AttentionParams {
                    scale: 1.0 / (d as f32).sqrt(),
                    window,
                    softcap,
                };
                let q = bf16_exact(&mut rng, &[tq, h, d], -2.0, 2.0);
                let k = bf16_exact(&mut rng, &[tkv, hkv, d], -2.0, 2.0);
                let v = bf16_exact(&mut rng, &[tkv, hkv, d], -1.0, 1.0);
                let d_out = bf16_exact(&mut rng, &[tq, h, d], -1.0, 1.0);
                let up = |t: &Tensor| t.to_device(gpu).unwrap();
                let (gq, gk, gv, gdo) = (up(&q), up(&k), up(&v), up(&d_out));
                let fwd = crate::ops::attention(&gq, &gk, &gv, &layout, &params).unwrap();
                // The CPU reference reads the GPU forward's own out and lse.
                let out = fwd.out.to_device(Device::Cpu).unwrap();
                let lse = Tensor::from_vec(fwd.lse.to_vec().unwrap(), &[h, tq]).unwrap();
                let want = crate::ops::attention_backward(
                    &q, &k, &v, &out, &lse, &d_out, &layout, &params,
                )
                .unwrap();
                for (path, tol) in [(Path::Simple, 5e-3), (Path::TensorCore, 2e-2)] {
                    let got = attention_backward_on(
                        &backend, &gq, &gk, &gv, &fwd.out, &fwd.lse, &gdo, &layout, &params, path,
                    )
                    .unwrap();
                    for (name, got, want) in [
                        ("dq", &got.dq, &want.dq),
                        ("dk", &got.dk, &want.dk),
                        ("dv", &got.dv, &want.dv),
                    ] {
                        assert_eq!(got.dtype(), DType::Bf16);
                        let err = relative_error(got, want);
                        eprintln!("{path:?} ({h}, {hkv}, {d}) {params:?} {name}: {err:.2e}");
                        assert!(err <= tol, "{path:?} {name}: {err:.2e} > {tol:.0e}");
                    }
                }
            }
        }
    }
}
