//! Rotary position embedding on the GPU (kernels/rope.cu): in place, and fused into the
//! split of a fused QKV projection; and the backward of both. Every tensor is bf16.

use std::sync::Arc;

use super::{bf16_ptr, empty, grid_stride, to_i32};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::DType;
use crate::ops::Rope;
use crate::{EngineError, Indices, Result, Tensor};

/// The kernels of kernels/rope.cu.
pub(crate) const KERNELS: &[&str] = &[
    "rope_bf16",
    "rope_qkv_split_bf16",
    "rope_backward_bf16",
    "rope_qkv_split_backward_bf16",
];

const BLOCK: u32 = 256;

fn check_rope(
    op: &'static str,
    head_dim: usize,
    positions: &[u32],
    tokens: usize,
    rope: &Rope,
) -> Result<()> {
    if !head_dim.is_multiple_of(2) || rope.inv_freq.len() != head_dim / 2 {
        return Err(EngineError::Arg {
            op,
            msg: format!(
                "head dim {head_dim} needs an even size and {} inverse frequencies, got {}",
                head_dim / 2,
                rope.inv_freq.len()
            ),
        });
    }
    if positions.len() != tokens {
        return Err(EngineError::Arg {
            op,
            msg: format!("{} positions for {tokens} tokens", positions.len()),
        });
    }
    Ok(())
}

/// Rotates x: [T, heads, D] in place.
pub(crate) fn rope(
    backend: &Arc<CudaBackend>,
    x: &mut Tensor,
    positions: &[u32],
    rope: &Rope,
) -> Result<()> {
    turn_in_place(backend, "rope", "rope_bf16", x, positions, rope)
}

/// The backward of [`rope`], in place: grad holds dy: [T, heads, D] on entry and dx on exit
/// (each pair turned by the transpose of the forward's rotation).
pub(crate) fn rope_backward(
    backend: &Arc<CudaBackend>,
    grad: &mut Tensor,
    positions: &[u32],
    rope: &Rope,
) -> Result<()> {
    turn_in_place(
        backend,
        "rope_backward",
        "rope_backward_bf16",
        grad,
        positions,
        rope,
    )
}

/// Runs one of the in-place kernels (`rope_bf16` or `rope_backward_bf16`, which share their
/// parameters) on x: [T, heads, D].
fn turn_in_place(
    backend: &Arc<CudaBackend>,
    op: &'static str,
    kernel_name: &'static str,
    x: &mut Tensor,
    positions: &[u32],
    rope: &Rope,
) -> Result<()> {
    let [tokens, heads, d] = x.dims(op, "x: [T, heads, D]")?;
    check_rope(op, d, positions, tokens, rope)?;
    bf16_ptr(op, "x", x)?;
    if tokens * heads * d == 0 {
        return Ok(());
    }
    let len = x.len();
    if let Some(s) = x.cuda_mut() {
        s.make_exclusive(len)?;
    }
    let px = bf16_ptr(op, "x", x)?;
    let pos = backend.upload(positions)?;
    let freq = rope.device.get(backend, &rope.inv_freq)?;
    let (pp, pf) = (pos.ptr(), freq.ptr);
    let kernel = backend.kernel(Module::Rope, kernel_name)?;
    let tokens64 = tokens as i64;
    let heads32 = to_i32(op, "heads", heads)?;
    let d32 = to_i32(op, "head_dim", d)?;
    let scaling = rope.attention_scaling;
    let grid = grid_stride(backend, tokens * heads * d / 2, BLOCK);
    // SAFETY: x holds T·heads·D bf16, pos T u32, freq D/2 f32; the uploads return to the
    // arena only after the launch is queued.
    unsafe {
        backend.launch_1d(
            &kernel,
            grid,
            BLOCK,
            &mut params![px, pp, pf, tokens64, heads32, d32, scaling],
        )
    }?;
    Ok(())
}

/// Splits a fused projection qkv: [T, (H + 2·Hkv)·D] into q: [T, H, D], k, v: [T, Hkv, D],
/// rotating q and k: one pass instead of three copies and two RoPE passes.
pub(crate) fn rope_qkv_split(
    backend: &Arc<CudaBackend>,
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    positions: &Indices,
    rope: &Rope,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "rope_qkv_split";
    let [tokens, width] = qkv.dims(OP, "qkv: [T, (H + 2·Hkv)·D]")?;
    let all = heads + 2 * kv_heads;
    if all == 0 || width % all != 0 {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("qkv: [T, (H + 2·Hkv)·D] with H = {heads}, Hkv = {kv_heads}"),
            got: qkv.shape().to_vec(),
        });
    }
    let d = width / all;
    check_rope(OP, d, positions, tokens, rope)?;
    let pqkv = bf16_ptr(OP, "qkv", qkv)?;
    let q = empty(backend, &[tokens, heads, d], DType::Bf16)?;
    let k = empty(backend, &[tokens, kv_heads, d], DType::Bf16)?;
    let v = empty(backend, &[tokens, kv_heads, d], DType::Bf16)?;
    if tokens * d == 0 {
        return Ok((q, k, v));
    }
    let (pq, pk, pv) = (
        bf16_ptr(OP, "q", &q)?,
        bf16_ptr(OP, "k", &k)?,
        bf16_ptr(OP, "v", &v)?,
    );
    let dims = [tokens, heads, kv_heads, d];
    // SAFETY: qkv holds T·(H+2Hkv)·D bf16; q, k, v their shapes.
    unsafe {
        launch_qkv_split(
            backend,
            OP,
            "rope_qkv_split_bf16",
            [pq, pk, pv, pqkv],
            dims,
            positions,
            rope,
        )
    }?;
    Ok((q, k, v))
}

/// The gradient of [`rope_qkv_split`] w.r.t. qkv: dq: [T, H, D], dk, dv: [T, Hkv, D] bf16 →
/// dqkv: [T, (H + 2·Hkv)·D] bf16 (assigned), the q and k heads turned back, v copied. The
/// caller has checked the shapes.
pub(crate) fn rope_qkv_split_backward(
    backend: &Arc<CudaBackend>,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    positions: &Indices,
    rope: &Rope,
) -> Result<Tensor> {
    const OP: &str = "rope_qkv_split_backward";
    let [tokens, heads, d] = dq.dims(OP, "dq: [T, H, D]")?;
    let [_, kv_heads, _] = dk.dims(OP, "dk: [T, Hkv, D]")?;
    dk.expect_shape(OP, &[tokens, kv_heads, d])?;
    dv.expect_shape(OP, &[tokens, kv_heads, d])?;
    check_rope(OP, d, positions, tokens, rope)?;
    let (pdq, pdk, pdv) = (
        bf16_ptr(OP, "dq", dq)?,
        bf16_ptr(OP, "dk", dk)?,
        bf16_ptr(OP, "dv", dv)?,
    );
    let all = heads + 2 * kv_heads;
    let dqkv = empty(backend, &[tokens, all * d], DType::Bf16)?;
    if tokens * all * d == 0 {
        return Ok(dqkv);
    }
    let pdqkv = bf16_ptr(OP, "dqkv", &dqkv)?;
    let dims = [tokens, heads, kv_heads, d];
    // SAFETY: dqkv holds T·(H+2Hkv)·D bf16; dq, dk, dv their shapes.
    unsafe {
        launch_qkv_split(
            backend,
            OP,
            "rope_qkv_split_backward_bf16",
            [pdqkv, pdq, pdk, pdv],
            dims,
            positions,
            rope,
        )
    }?;
    Ok(dqkv)
}

/// Launches one of the fused split kernels (`rope_qkv_split_bf16` or its backward, which
/// share their parameters after the four tensors) over the T·(H + 2·Hkv)·D/2 rotated pairs,
/// with the positions and inverse frequencies on the device.
///
/// # Safety
/// `tensors` are the kernel's four bf16 tensor pointers in its parameter order, the packed
/// one holding T·(H+2Hkv)·D elements and the split ones T·H·D, T·Hkv·D, T·Hkv·D for
/// `[tokens, heads, kv_heads, d]`; `positions` and `rope` passed [`check_rope`].
unsafe fn launch_qkv_split(
    backend: &Arc<CudaBackend>,
    op: &'static str,
    kernel_name: &'static str,
    tensors: [u64; 4],
    [tokens, heads, kv_heads, d]: [usize; 4],
    positions: &Indices,
    rope: &Rope,
) -> Result<()> {
    let [p0, p1, p2, p3] = tensors;
    let pos = positions.on(backend)?;
    let freq = rope.device.get(backend, &rope.inv_freq)?;
    let (pp, pf) = (pos.ptr, freq.ptr);
    let kernel = backend.kernel(Module::Rope, kernel_name)?;
    let tokens64 = tokens as i64;
    let heads32 = to_i32(op, "heads", heads)?;
    let kv32 = to_i32(op, "kv_heads", kv_heads)?;
    let d32 = to_i32(op, "head_dim", d)?;
    let scaling = rope.attention_scaling;
    let all = heads + 2 * kv_heads;
    let grid = grid_stride(backend, tokens * all * d / 2, BLOCK);
    // SAFETY: the caller's contract for the four tensors; pos holds T u32 and freq D/2 f32.
    unsafe {
        backend.launch_1d(
            &kernel,
            grid,
            BLOCK,
            &mut params![
                p0, p1, p2, p3, pp, pf, tokens64, heads32, kv32, d32, scaling
            ],
        )
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::compile_without_spills;

    #[test]
    fn kernels_compile_without_spills() {
        let Some(compiled) = compile_without_spills(Module::Rope) else {
            return;
        };
        for name in KERNELS {
            assert!(compiled.log.contains(name), "{name} missing from the log");
        }
    }
}
