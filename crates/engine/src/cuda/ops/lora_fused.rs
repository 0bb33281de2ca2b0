//! The fused LoRA projection on the GPU (see `crate::ops::lora_fused` for the math): cuBLASLt
//! GEMMs that read and write the module's column range of the stacked projection in place
//! (pointer `base + col0` elements, leading dimension N), fold the scaling in as alpha and
//! accumulate with beta = 1; plus, with dropout, the recomputed dropped input and one
//! masked-add kernel (kernels/lora_fused.cu).
//!
//! Launches per module: forward (dropout,) 2 GEMMs; backward 4 GEMMs, plus the dropout and the
//! masked add when dropout is on. Without a cuBLASLt algorithm for a column range's alignment
//! (see `crate::cuda::blas`), a dense copy stands in for it: the forward's delta goes through
//! a temporary and `add_into_columns`, the backward reads a `columns` copy of dy's range.
//!
//! Dtypes: x, A, B, y, dy, u and dx bf16 (u returned bf16; du a bf16 temporary); grad_a and
//! grad_b f32. Shapes, the scaling and the key are checked by `crate::ops::lora_fused` before
//! it hands over; these launchers check devices' dtypes, all before anything is queued.

use std::sync::Arc;

use super::lora_ops::{add_into_columns, apply_dropout, columns};
use super::{bf16_ptr, empty, f32_ptr, grid_stride};
use crate::cuda::blas::{Gemm, OutType, no_algorithm};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::storage::{CudaStorage, DType};
use crate::ops::DropoutKey;
use crate::ops::lora_fused::LoraDims;
use crate::{Result, Tensor};

/// The kernels of kernels/lora_fused.cu.
pub(crate) const KERNELS: &[&str] = &["masked_add_bf16"];

const BLOCK: u32 = 256;
/// Bytes per bf16 element: a column offset in bytes.
const BF16_BYTES: u64 = 2;

/// One module's forward inputs (also what its backward recomputes from).
pub(crate) struct LoraInputs<'a> {
    pub(crate) x: &'a Tensor, // [T, in]
    pub(crate) a: &'a Tensor, // [R, in]
    pub(crate) b: &'a Tensor, // [out, R]
    pub(crate) scaling: f32,
    pub(crate) dropout: Option<&'a DropoutKey>,
}

/// The backward's accumulators.
pub(crate) struct LoraGrads<'a> {
    pub(crate) dx: &'a mut Tensor,     // [T, in] bf16
    pub(crate) grad_a: &'a mut Tensor, // [R, in] f32
    pub(crate) grad_b: &'a mut Tensor, // [out, R] f32
}

/// y[:, col0..col0 + out] += s · (xd · Aᵀ) · Bᵀ → u = xd · Aᵀ [T, R] bf16.
pub(crate) fn lora_project(
    backend: &Arc<CudaBackend>,
    m: &LoraInputs<'_>,
    y: &mut Tensor,
    d: LoraDims,
) -> Result<Tensor> {
    project(backend, m, y, d, true)
}

/// [`lora_project`], choosing between writing y's column range in place (`in_place`, the
/// fallback when cuBLASLt has no algorithm for it) and always going through a dense delta
/// (tests force this to check the fallback).
fn project(
    backend: &Arc<CudaBackend>,
    m: &LoraInputs<'_>,
    y: &mut Tensor,
    d: LoraDims,
    in_place: bool,
) -> Result<Tensor> {
    const OP: &str = "lora_project";
    let px = bf16_ptr(OP, "x", m.x)?;
    let pa = bf16_ptr(OP, "a", m.a)?;
    let pb = bf16_ptr(OP, "b", m.b)?;
    bf16_ptr(OP, "y", y)?;
    let LoraDims {
        t,
        inp,
        r,
        out,
        width,
        col0,
    } = d;

    // xd lives until the GEMM that reads it is queued; the arena is stream-ordered, so its
    // memory is reused only by work queued after that GEMM.
    let xd = m
        .dropout
        .map(|k| apply_dropout(backend, OP, m.x, k))
        .transpose()?;
    let pxd = match &xd {
        Some(xd) => bf16_ptr(OP, "xd", xd)?,
        None => px,
    };
    let u = if inp == 0 {
        // An empty sum; cuBLASLt does not promise zeros for k = 0.
        zeros(backend, &[t, r], DType::Bf16)?
    } else {
        empty(backend, &[t, r], DType::Bf16)?
    };
    let pu = bf16_ptr(OP, "u", &u)?;
    if t > 0 && r > 0 && inp > 0 {
        // u[T, R] = xd[T, in] · A[R, in]ᵀ.
        let g = Gemm::nt([t, r, inp], pxd, pa, pu, OutType::Bf16);
        // SAFETY: xd holds T·in, A R·in and u T·R bf16 elements; all outlive the queued GEMM.
        unsafe { backend.gemm(&g) }?;
    }
    drop(xd);
    if t == 0 || out == 0 || r == 0 {
        // Nothing to add (R = 0: the low-rank product is an empty sum).
        return Ok(u);
    }
    let len = y.len();
    if let Some(s) = y.cuda_mut() {
        s.make_exclusive(len)?;
    }
    let py = bf16_ptr(OP, "y", y)?;
    // y[:, col0..col0 + out] += s · u[T, R] · B[out, R]ᵀ, written in place: the range is a
    // [T, out] matrix at y + col0 with rows N apart.
    let into_range = Gemm {
        ld_out: width,
        ..Gemm::nt(
            [t, out, r],
            pu,
            pb,
            py + col0 as u64 * BF16_BYTES,
            OutType::Bf16,
        )
    }
    .accumulating(true)
    .scaled(m.scaling);
    // SAFETY: u holds T·R and B out·R bf16 elements; the range's last element is at
    // (T − 1)·N + col0 + out − 1 < T·N (col0 + out ≤ N, checked by the caller).
    if in_place && unsafe { try_gemm(backend, &into_range) }? {
        return Ok(u);
    }
    let delta = empty(backend, &[t, out], DType::Bf16)?;
    let pdelta = bf16_ptr(OP, "delta", &delta)?;
    let g = Gemm::nt([t, out, r], pu, pb, pdelta, OutType::Bf16).scaled(m.scaling);
    // SAFETY: u holds T·R, B out·R and delta T·out bf16 elements.
    unsafe { backend.gemm(&g) }?;
    add_into_columns(backend, y, col0, &delta)?;
    Ok(u)
}

/// The backward of [`lora_project`]: grad_b += s · dy_mᵀ·u, du = s · dy_m·B,
/// grad_a += duᵀ·xd, dx += mask ∘ (du·A), with dy_m = dy[:, col0..col0 + out] read in place.
pub(crate) fn lora_project_backward(
    backend: &Arc<CudaBackend>,
    m: &LoraInputs<'_>,
    dy: &Tensor,
    u: &Tensor,
    grads: LoraGrads<'_>,
    d: LoraDims,
) -> Result<()> {
    backward(backend, m, dy, u, grads, d, true)
}

/// [`lora_project_backward`], reading dy's range in place when `in_place` (else, as the
/// fallback does, from a dense copy; tests force this).
fn backward(
    backend: &Arc<CudaBackend>,
    m: &LoraInputs<'_>,
    dy: &Tensor,
    u: &Tensor,
    grads: LoraGrads<'_>,
    d: LoraDims,
    in_place: bool,
) -> Result<()> {
    const OP: &str = "lora_project_backward";
    let LoraGrads { dx, grad_a, grad_b } = grads;
    // Every dtype first: a refusal leaves the accumulators untouched.
    let px = bf16_ptr(OP, "x", m.x)?;
    let pa = bf16_ptr(OP, "a", m.a)?;
    let pb = bf16_ptr(OP, "b", m.b)?;
    bf16_ptr(OP, "dy", dy)?;
    let pu = bf16_ptr(OP, "u", u)?;
    bf16_ptr(OP, "dx", dx)?;
    f32_ptr(OP, "grad_a", grad_a)?;
    f32_ptr(OP, "grad_b", grad_b)?;
    let LoraDims {
        t,
        inp,
        r,
        out,
        width,
        col0,
    } = d;
    if t == 0 || r == 0 || out == 0 {
        // Every increment is an empty sum (or du = 0): no accumulator changes.
        return Ok(());
    }
    let mut dy_m = ColumnRange {
        backend,
        dy,
        col0,
        cols: out,
        width,
        in_place,
        copy: None,
    };

    // grad_b[out, R] += s · dy_m[T, out]ᵀ · u[T, R]: both read with the token axis first.
    let pgb = exclusive_ptr(grad_b, DType::F32)?;
    dy_m.gemm(|pdy, ld| {
        Gemm {
            ld_x: ld,
            ..Gemm::tn([out, r, t], pdy, pu, pgb, OutType::F32)
        }
        .accumulating(true)
        .scaled(m.scaling)
    })?;
    // du[T, R] = s · dy_m[T, out] · B[out, R] (B read as stored, k = out first).
    let du = empty(backend, &[t, r], DType::Bf16)?;
    let pdu = bf16_ptr(OP, "du", &du)?;
    dy_m.gemm(|pdy, ld| {
        Gemm {
            ld_x: ld,
            ..Gemm::nn([t, r, out], pdy, pb, pdu, OutType::Bf16)
        }
        .scaled(m.scaling)
    })?;
    drop(dy_m);
    if inp == 0 {
        return Ok(());
    }

    // grad_a[R, in] += du[T, R]ᵀ · xd[T, in], xd recomputed from x and the key.
    let xd = m
        .dropout
        .map(|k| apply_dropout(backend, OP, m.x, k))
        .transpose()?;
    let pxd = match &xd {
        Some(xd) => bf16_ptr(OP, "xd", xd)?,
        None => px,
    };
    let pga = exclusive_ptr(grad_a, DType::F32)?;
    let g = Gemm::tn([r, inp, t], pdu, pxd, pga, OutType::F32).accumulating(true);
    // SAFETY: du holds T·R and xd T·in bf16 elements, grad_a R·in f32; all outlive the GEMM.
    unsafe { backend.gemm(&g) }?;
    drop(xd);

    // dx[T, in] += mask ∘ (du[T, R] · A[R, in]).
    let pdx = exclusive_ptr(dx, DType::Bf16)?;
    let n = t * inp;
    match m.dropout {
        None => {
            let g = Gemm::nn([t, inp, r], pdu, pa, pdx, OutType::Bf16).accumulating(true);
            // SAFETY: du holds T·R, A R·in and dx T·in bf16 elements.
            unsafe { backend.gemm(&g) }?;
        }
        Some(key) => {
            let term = empty(backend, &[t, inp], DType::Bf16)?;
            let pterm = bf16_ptr(OP, "du·A", &term)?;
            let g = Gemm::nn([t, inp, r], pdu, pa, pterm, OutType::Bf16);
            // SAFETY: du holds T·R, A R·in and the term T·in bf16 elements.
            unsafe { backend.gemm(&g) }?;
            masked_add(backend, pdx, pterm, n, key)?;
        }
    }
    Ok(())
}

/// dy's columns col0..col0 + cols as a GEMM operand: read in place (dy + col0, leading
/// dimension N) while cuBLASLt has an algorithm for that, else from a dense copy made once.
struct ColumnRange<'a> {
    backend: &'a Arc<CudaBackend>,
    dy: &'a Tensor, // [T, N]
    col0: usize,
    cols: usize,
    width: usize,
    in_place: bool,
    copy: Option<Tensor>, // [T, cols]
}

impl ColumnRange<'_> {
    /// Queues the GEMM that `make(ptr, ld)` builds around the range at `ptr` with leading
    /// dimension `ld`.
    fn gemm(&mut self, make: impl Fn(u64, usize) -> Gemm) -> Result<()> {
        const OP: &str = "lora_project_backward";
        if self.copy.is_none() {
            if self.in_place {
                let base = bf16_ptr(OP, "dy", self.dy)?;
                let g = make(base + self.col0 as u64 * BF16_BYTES, self.width);
                // SAFETY: the range's last element is at (T − 1)·N + col0 + cols − 1 < T·N;
                // the other operands are the caller's, sized for the GEMM it builds.
                if unsafe { try_gemm(self.backend, &g) }? {
                    return Ok(());
                }
            }
            self.copy = Some(columns(self.backend, self.dy, self.col0, self.cols)?);
        }
        if let Some(copy) = &self.copy {
            let g = make(bf16_ptr(OP, "dy columns", copy)?, self.cols);
            // SAFETY: the copy holds T·cols bf16 elements; the rest as above.
            unsafe { self.backend.gemm(&g) }?;
        }
        Ok(())
    }
}

/// Queues `g`; Ok(false), with nothing queued, when cuBLASLt has no algorithm for its
/// layouts and pointer alignments.
///
/// # Safety
/// As [`CudaBackend::gemm`]: the pointers must cover the shapes and outlive the queued work.
unsafe fn try_gemm(backend: &CudaBackend, g: &Gemm) -> Result<bool> {
    // SAFETY: forwarded from the caller's contract.
    match unsafe { backend.gemm(g) } {
        Ok(()) => Ok(true),
        Err(e) if no_algorithm(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// dx[i] += term[i] · m_i over n bf16 elements, m the key's dropout multipliers.
fn masked_add(backend: &CudaBackend, dx: u64, term: u64, n: usize, key: &DropoutKey) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let kernel = backend.kernel(Module::LoraFused, "masked_add_bf16")?;
    let (stream, cut, keep) = (key.stream(), key.threshold(), key.keep_scale());
    let n64 = n as i64;
    // 8 elements per thread on the vector path.
    let grid = grid_stride(backend, n.div_ceil(8), BLOCK);
    // SAFETY: dx and term hold n bf16 elements each (distinct buffers); the kernel's
    // grid-stride loops bound every index by n.
    unsafe {
        backend.launch(
            &kernel,
            (grid, 1, 1),
            (BLOCK, 1, 1),
            0,
            &mut params![dx, term, n64, stream, cut, keep],
        )
    }?;
    Ok(())
}

/// The pointer of an accumulator of `dtype`, its buffer made exclusive first (copy-on-write).
fn exclusive_ptr(t: &mut Tensor, dtype: DType) -> Result<u64> {
    const OP: &str = "lora_project_backward";
    let len = t.len();
    if let Some(s) = t.cuda_mut() {
        s.make_exclusive(len)?;
    }
    match dtype {
        DType::Bf16 => bf16_ptr(OP, "dx", t),
        DType::F32 => f32_ptr(OP, "gradient", t),
    }
}

/// A zero-filled device tensor: the result of an empty sum.
fn zeros(backend: &Arc<CudaBackend>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let len = shape.iter().product();
    Ok(Tensor::from_cuda(
        shape,
        CudaStorage::zeroed(backend, len, dtype)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;
    use crate::cuda::kernels::compile_without_spills;
    use crate::test_util::Rng;

    #[test]
    fn kernels_compile_without_spills() {
        let Some(compiled) = compile_without_spills(Module::LoraFused) else {
            return;
        };
        for name in KERNELS {
            assert!(compiled.log.contains(name), "{name} missing from the log");
        }
    }

    fn rand_gpu(rng: &mut Rng, shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        let cpu = Tensor::from_vec(rng.vec(n, -1.0, 1.0), shape).unwrap();
        match dtype {
            DType::Bf16 => cpu.to_device(Device::Cuda(0)).unwrap(),
            DType::F32 => cpu.to_device_f32(Device::Cuda(0)).unwrap(),
        }
    }

    /// The fallback paths (a dense delta; a copy of dy's range) against the in-place ones, on
    /// a range at an odd column (2-byte aligned). The two compute the same products in the
    /// same GEMM shapes, so they agree to bf16 rounding of the output (one ulp).
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn fallback_paths_match_the_in_place_ones() {
        let backend = CudaBackend::get(0).unwrap();
        let mut rng = Rng::new(70);
        let d = LoraDims {
            t: 37,
            inp: 24,
            r: 4,
            out: 5,
            width: 13,
            col0: 3,
        };
        let bf = DType::Bf16;
        let x = rand_gpu(&mut rng, &[d.t, d.inp], bf);
        let a = rand_gpu(&mut rng, &[d.r, d.inp], bf);
        let b = rand_gpu(&mut rng, &[d.out, d.r], bf);
        let y0 = rand_gpu(&mut rng, &[d.t, d.width], bf);
        let key = DropoutKey {
            p: 0.2,
            seed: 1,
            step: 2,
            layer: Some(0),
            module: 3,
        };
        for dropout in [None, Some(&key)] {
            let m = LoraInputs {
                x: &x,
                a: &a,
                b: &b,
                scaling: 1.5,
                dropout,
            };
            let (mut y1, mut y2) = (y0.clone(), y0.clone());
            let u1 = project(&backend, &m, &mut y1, d, true).unwrap();
            let u2 = project(&backend, &m, &mut y2, d, false).unwrap();
            assert_eq!(u1.to_vec().unwrap(), u2.to_vec().unwrap());
            let close = |what: &str, p: &Tensor, q: &Tensor| {
                for (i, (g, w)) in p
                    .to_vec()
                    .unwrap()
                    .iter()
                    .zip(q.to_vec().unwrap())
                    .enumerate()
                {
                    assert!(
                        (g - w).abs() <= 1e-2 * w.abs().max(1.0),
                        "{what}[{i}]: {g} vs {w}"
                    );
                }
            };
            close("y", &y1, &y2);

            let dy = rand_gpu(&mut rng, &[d.t, d.width], bf);
            let acc = [
                rand_gpu(&mut rng, &[d.t, d.inp], bf),
                rand_gpu(&mut rng, &[d.r, d.inp], DType::F32),
                rand_gpu(&mut rng, &[d.out, d.r], DType::F32),
            ];
            let run = |in_place: bool| {
                let [mut dx, mut ga, mut gb] = acc.clone();
                let grads = LoraGrads {
                    dx: &mut dx,
                    grad_a: &mut ga,
                    grad_b: &mut gb,
                };
                backward(&backend, &m, &dy, &u1, grads, d, in_place).unwrap();
                [dx, ga, gb]
            };
            let (p, q) = (run(true), run(false));
            for (name, (p, q)) in ["dx", "grad_a", "grad_b"].iter().zip(p.iter().zip(&q)) {
                close(name, p, q);
            }
        }
    }
}
