//! LoRA's low-rank projection of one module, fused: [`lora_project`] adds the module's delta
//! straight into its column range of a (stacked) projection's output, and
//! [`lora_project_backward`] reads that range of the output gradient in place and adds into
//! the input gradient and the pair's f32 gradient accumulators.
//!
//! ```text
//! forward   xd = dropout(x)            x [T, in], mask from `DropoutKey` (or xd = x)
//!           u  = xd · Aᵀ               A [R, in]            → returned, [T, R]
//!           y[:, c0..c0+out] += s · u · Bᵀ                  B [out, R], y [T, N]
//! backward  dy_m = dy[:, c0..c0+out]   read in place (row stride N), never copied
//!           grad_b += s · dy_mᵀ · u                          [out, R]
//!           du      = s · dy_m · B                           [T, R]
//!           grad_a += duᵀ · xd         xd recomputed from x and the key   [R, in]
//!           dx     += mask ∘ (du · A)  (du · A without dropout)           [T, in]
//! ```
//!
//! `s` is LoRA's scaling (alpha / R, or alpha / √R with rsLoRA). The mask is a pure function
//! of the key ([`super::apply_dropout`]), so the forward keeps only u, and xd exists only
//! while an op runs. Every output is accumulated (`+=`), never assigned, except u.
//!
//! This is the composition of `apply_dropout`, `linear`, `scale` and `add_into_columns` (the
//! forward) and of `columns`, `scale`, `linear_backward_input` / `_weight`, `add_inplace` and
//! `apply_dropout_backward` (the backward), without the intermediate tensors and with fewer
//! launches: on a GPU the forward is (dropout,) two GEMMs, the second writing into y's
//! columns through cuBLASLt with alpha = s and beta = 1; the backward is four GEMMs (beta = 1
//! into grad_b, grad_a and, without dropout, dx) plus, with dropout, the recomputed xd and one
//! masked-add kernel (`kernels/lora_fused.cu`).
//!
//! ## Dtypes
//! CPU: f32 throughout. GPU: x, A, B, y, dy, u and dx are bf16 (f32 accumulation inside the
//! GEMMs; u is returned bf16, du is a bf16 temporary); grad_a and grad_b are f32 (what LoRA's
//! optimizer reads).
//!
//! ## Alignment (GPU)
//! The column range starts `2·c0` bytes into each row of y or dy, so its pointer may be only
//! 2-byte aligned (c0 odd) and its rows N elements apart. cuBLASLt is told the actual
//! alignment (part of the plan key); if its heuristic has no kernel for it, the op falls back
//! to a dense temporary: a delta added with `add_into_columns` in the forward, a `columns`
//! copy of dy's range in the backward. Same results, one more kernel. Every other operand is
//! a whole arena allocation (256-byte aligned).
use gemm::Parallelism;

use super::linear::{Strided, StridedRef, gemm_strided};
use super::{add_inplace, apply_dropout, apply_dropout_backward};
use crate::cuda::ops as cuda_ops;
use crate::ops::DropoutKey;
use crate::{EngineError, Result, Tensor};

/// One LoRA'd module's dimensions, checked against every tensor an op was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LoraDims {
    /// Tokens.
    pub(crate) t: usize,
    /// The module's input features.
    pub(crate) inp: usize,
    /// LoRA rank.
    pub(crate) r: usize,
    /// The module's output features: the width of its column range.
    pub(crate) out: usize,
    /// The width N of the (stacked) projection output y / dy.
    pub(crate) width: usize,
    /// The module's first column in y / dy.
    pub(crate) col0: usize,
}

/// y[:, col0..col0 + out] += scaling · (dropout(x) · Aᵀ) · Bᵀ, in place, and returns
/// u = dropout(x) · Aᵀ (what [`lora_project_backward`] needs).
///
/// x: [T, in], a: [R, in], b: [out, R], y: [T, N] with col0 + out ≤ N → u: [T, R]. With
/// `dropout`, x is multiplied by the key's mask first (the mask is recomputed in backward,
/// never stored). Columns of y outside the range are not touched; y's storage is copied
/// first if it is shared. GPU: every tensor bf16 (u too).
pub fn lora_project(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f32,
    dropout: Option<&DropoutKey>,
    y: &mut Tensor,
    col0: usize,
) -> Result<Tensor> {
    const OP: &str = "lora_project";
    let d = check_module(OP, x, a, b, ("y", y), col0, scaling, dropout)?;
    let gpu = cuda_ops::device_of(OP, &[("x", x), ("a", a), ("b", b), ("y", y)])?;
    if let Some(gpu) = gpu {
        let pair = cuda_ops::lora_fused::LoraInputs {
            x,
            a,
            b,
            scaling,
            dropout,
        };
        return cuda_ops::lora_fused::lora_project(&gpu, &pair, y, d);
    }
    let xd = dropped(x, dropout)?;
    // u = xd · Aᵀ.
    let mut u = vec![0.0f32; d.t * d.r]; // [T, R]
    let (xd, a_t) = (
        StridedRef::rows(xd.as_slice()?, d.inp),
        StridedRef::transposed(a.as_slice()?, d.inp),
    );
    product(
        Strided::rows(&mut u, d.r),
        xd,
        a_t,
        [d.t, d.r, d.inp],
        false,
        1.0,
    );
    if d.t > 0 && d.out > 0 {
        // y[:, col0..col0 + out] += s · u · Bᵀ, the range as a strided view: its row t
        // starts at t·N + col0.
        let (b_t, y) = (
            StridedRef::transposed(b.as_slice()?, d.r),
            y.as_mut_slice()?,
        );
        let range = Strided::rows(&mut y[d.col0..], d.width);
        product(
            range,
            StridedRef::rows(&u, d.r),
            b_t,
            [d.t, d.out, d.r],
            true,
            scaling,
        );
    }
    Tensor::from_vec(u, &[d.t, d.r])
}

/// The backward of [`lora_project`] given dy, the gradient of the whole projection output
/// y: [T, N]; reads the module's columns col0..col0 + out of dy in place and accumulates:
///
/// - grad_b += scaling · dy_mᵀ · u                 grad_b: [out, R]
/// - grad_a += duᵀ · dropout(x), du = scaling · dy_m · B      grad_a: [R, in]
/// - dx += mask ∘ (du · A)  (du · A without dropout)          dx: [T, in]
///
/// x, a, b, scaling and dropout are the forward's; u: [T, R] is what it returned. Each
/// accumulator's storage is copied first if it is shared. GPU: dy, x, a, b, u and dx bf16;
/// grad_a and grad_b f32.
#[allow(clippy::too_many_arguments)] // The forward's inputs and output, dy, three gradients.
pub fn lora_project_backward(
    dy: &Tensor,
    col0: usize,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    u: &Tensor,
    scaling: f32,
    dropout: Option<&DropoutKey>,
    dx: &mut Tensor,
    grad_a: &mut Tensor,
    grad_b: &mut Tensor,
) -> Result<()> {
    const OP: &str = "lora_project_backward";
    let d = check_module(OP, x, a, b, ("dy", dy), col0, scaling, dropout)?;
    expect(OP, "u", u, [d.t, d.r], "[T, R]")?;
    expect(OP, "dx", dx, [d.t, d.inp], "[T, in]")?;
    expect(OP, "grad_a", grad_a, [d.r, d.inp], "[R, in]")?;
    expect(OP, "grad_b", grad_b, [d.out, d.r], "[out, R]")?;
    let on = [
        ("dy", dy),
        ("x", x),
        ("a", a),
        ("b", b),
        ("u", u),
        ("dx", &*dx),
        ("grad_a", &*grad_a),
        ("grad_b", &*grad_b),
    ];
    if let Some(gpu) = cuda_ops::device_of(OP, &on)? {
        let pair = cuda_ops::lora_fused::LoraInputs {
            x,
            a,
            b,
            scaling,
            dropout,
        };
        let grads = cuda_ops::lora_fused::LoraGrads { dx, grad_a, grad_b };
        return cuda_ops::lora_fused::lora_project_backward(&gpu, &pair, dy, u, grads, d);
    }
    let xd = dropped(x, dropout)?;
    let (dy, u) = (dy.as_slice()?, u.as_slice()?);
    let (a, b) = (a.as_slice()?, b.as_slice()?);
    let mut du = vec![0.0f32; d.t * d.r]; // [T, R]
    if d.t > 0 && d.out > 0 {
        // dy_m's row t starts at t·N + col0; element (i, t) of dy_mᵀ is at t·N + col0 + i.
        let range = &dy[d.col0..];
        let dy_m = StridedRef::rows(range, d.width);
        let dy_m_t = StridedRef::transposed(range, d.width);
        // du = s · dy_m · B.
        let du_view = Strided::rows(&mut du, d.r);
        product(
            du_view,
            dy_m,
            StridedRef::rows(b, d.r),
            [d.t, d.r, d.out],
            false,
            scaling,
        );
        // grad_b += s · dy_mᵀ · u.
        let gb = Strided::rows(grad_b.as_mut_slice()?, d.r);
        product(
            gb,
            dy_m_t,
            StridedRef::rows(u, d.r),
            [d.out, d.r, d.t],
            true,
            scaling,
        );
    }
    // grad_a += duᵀ · xd.
    let ga = Strided::rows(grad_a.as_mut_slice()?, d.inp);
    let xd_view = StridedRef::rows(xd.as_slice()?, d.inp);
    product(
        ga,
        StridedRef::transposed(&du, d.r),
        xd_view,
        [d.r, d.inp, d.t],
        true,
        1.0,
    );
    let (du, a) = (StridedRef::rows(&du, d.r), StridedRef::rows(a, d.inp));
    match dropout {
        // dx += du · A.
        None => {
            let dx = Strided::rows(dx.as_mut_slice()?, d.inp);
            product(dx, du, a, [d.t, d.inp, d.r], true, 1.0);
        }
        // dx += mask ∘ (du · A), through the dropout op's own backward.
        Some(key) => {
            let mut dxd = vec![0.0f32; d.t * d.inp]; // [T, in]
            product(
                Strided::rows(&mut dxd, d.inp),
                du,
                a,
                [d.t, d.inp, d.r],
                false,
                1.0,
            );
            let dxd = apply_dropout_backward(&Tensor::from_vec(dxd, &[d.t, d.inp])?, key)?;
            add_inplace(dx, &dxd)?;
        }
    }
    Ok(())
}

/// dst[m×n] = (dst if `accumulate`) + scale · lhs[m×k] · rhs[k×n], on all cores.
fn product(
    dst: Strided<'_>,
    lhs: StridedRef<'_>,
    rhs: StridedRef<'_>,
    mnk: [usize; 3],
    accumulate: bool,
    scale: f32,
) {
    gemm_strided(dst, lhs, rhs, mnk, accumulate, scale, Parallelism::Rayon(0));
}

/// x with the key's mask applied, or x itself.
fn dropped(x: &Tensor, key: Option<&DropoutKey>) -> Result<Tensor> {
    match key {
        Some(key) => apply_dropout(x, key),
        None => Ok(x.clone()),
    }
}

/// The argument rules both ops and both devices share: x [T, in], a [R, in], b [out, R], the
/// projection output (y or dy) [T, N] with col0 + out ≤ N, a finite scaling and a dropout
/// probability in [0, 1).
#[allow(clippy::too_many_arguments)]
fn check_module(
    op: &'static str,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    (y_name, y): (&str, &Tensor),
    col0: usize,
    scaling: f32,
    dropout: Option<&DropoutKey>,
) -> Result<LoraDims> {
    let [t, inp] = x.dims(op, "x: [T, in]")?;
    let [r, _] = a.dims(op, "a: [R, in]")?;
    expect(op, "a", a, [r, inp], "[R, in] with in from x")?;
    let [out, _] = b.dims(op, "b: [out, R]")?;
    expect(op, "b", b, [out, r], "[out, R] with R from a")?;
    let [_, width] = y.dims(op, &format!("{y_name}: [T, N]"))?;
    expect(op, y_name, y, [t, width], "[T, N] with T from x")?;
    if col0.checked_add(out).is_none_or(|end| end > width) {
        return Err(EngineError::Arg {
            op,
            msg: format!(
                "the module's columns {col0}..{} (b has {out} rows) do not fit {y_name} of \
                 shape {:?}",
                col0.saturating_add(out),
                y.shape()
            ),
        });
    }
    if !scaling.is_finite() {
        return Err(EngineError::Arg {
            op,
            msg: format!("scaling must be finite, got {scaling}"),
        });
    }
    // The rule of `DropoutKey`'s own check (private to lora_ops): checked here too so that
    // nothing is written before a bad key is refused.
    if let Some(key) = dropout
        && !(0.0..1.0).contains(&key.p)
    {
        return Err(EngineError::Arg {
            op,
            msg: format!("dropout probability p = {} must be in [0, 1)", key.p),
        });
    }
    Ok(LoraDims {
        t,
        inp,
        r,
        out,
        width,
        col0,
    })
}

/// `t` has shape `want`, or a shape error naming it and what its dims mean.
fn expect<const N: usize>(
    op: &'static str,
    name: &str,
    t: &Tensor,
    want: [usize; N],
    legend: &str,
) -> Result<()> {
    if t.shape() != want {
        return Err(EngineError::Shape {
            op,
            expected: format!("{name}: {want:?} ({legend})"),
            got: t.shape().to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::grad_check::{numeric_grad, widen};
    use crate::ops::{add_into_columns, columns, linear, linear_backward_input};
    use crate::ops::{linear_backward_weight, scale};
    use crate::test_util::Rng;

    fn tensor(data: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(data, shape).unwrap()
    }

    fn rand(rng: &mut Rng, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        tensor(rng.vec(n, -1.0, 1.0), shape)
    }

    fn key(p: f32, module: u64) -> DropoutKey {
        DropoutKey {
            p,
            seed: 7,
            step: 3,
            layer: Some(2),
            module,
        }
    }

    fn max_abs(v: &[f32]) -> f32 {
        v.iter().fold(0.0f32, |m, &x| m.max(x.abs()))
    }

    /// |got − want| ≤ 1e-5 · (scale + |want|) elementwise: the fused op and the composition
    /// sum the same f32 products in other orders and round the scaling in at another step,
    /// O(k · ε_f32) of the terms' magnitude `scale`.
    fn assert_near(what: &str, got: &[f32], want: &[f32], scale: f32) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-5 * (scale + w.abs());
            assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
        }
    }

    /// (T, in, R, out, N, col0): the range inside, at the start, at the end and all of y;
    /// odd sizes; a larger case through gemm's parallel paths; empty T, out, R and in.
    const CASES: &[[usize; 6]] = &[
        [5, 7, 3, 4, 11, 2],
        [3, 6, 2, 5, 5, 0],
        [4, 5, 3, 2, 9, 7],
        [1, 1, 1, 1, 3, 1],
        [9, 13, 4, 5, 17, 3],
        [300, 96, 16, 40, 136, 64],
        [0, 4, 2, 3, 6, 1],
        [4, 5, 3, 0, 6, 6],
        [4, 5, 0, 3, 6, 2],
        [4, 0, 3, 3, 6, 2],
    ];

    /// The composition the fused forward replaces: (u, y after the add).
    fn reference_forward(
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        s: f32,
        key: Option<&DropoutKey>,
        y: &Tensor,
        col0: usize,
    ) -> (Tensor, Tensor) {
        let xd = match key {
            Some(k) => apply_dropout(x, k).unwrap(),
            None => x.clone(),
        };
        let u = linear(&xd, a, None).unwrap();
        let delta = scale(&linear(&u, b, None).unwrap(), s).unwrap();
        let mut y = y.clone();
        add_into_columns(&mut y, col0, &delta).unwrap();
        (u, y)
    }

    #[test]
    fn forward_matches_the_composition_of_the_unfused_ops() {
        let mut rng = Rng::new(60);
        for &[t, inp, r, out, n, col0] in CASES {
            for p in [None, Some(0.3f32)] {
                let what = format!("T{t} in{inp} R{r} out{out} N{n} col0 {col0} p {p:?}");
                let (x, a, b) = (
                    rand(&mut rng, &[t, inp]),
                    rand(&mut rng, &[r, inp]),
                    rand(&mut rng, &[out, r]),
                );
                let y0 = rand(&mut rng, &[t, n]);
                let k = p.map(|p| key(p, 4));
                let s = 1.75;
                let (want_u, want_y) = reference_forward(&x, &a, &b, s, k.as_ref(), &y0, col0);
                let mut y = y0.clone();
                let u = lora_project(&x, &a, &b, s, k.as_ref(), &mut y, col0).unwrap();
                assert_eq!(u.shape(), &[t, r], "{what}");
                let u_scale = max_abs(want_u.as_slice().unwrap());
                assert_near(
                    &what,
                    u.as_slice().unwrap(),
                    want_u.as_slice().unwrap(),
                    u_scale,
                );
                let (got, want, y0) = (
                    y.as_slice().unwrap(),
                    want_y.as_slice().unwrap(),
                    y0.as_slice().unwrap(),
                );
                let delta_scale = s * u_scale * (r as f32);
                for row in 0..t {
                    for c in 0..n {
                        let i = row * n + c;
                        if (col0..col0 + out).contains(&c) {
                            assert_near(
                                &format!("{what} y[{row}, {c}]"),
                                &got[i..=i],
                                &want[i..=i],
                                delta_scale + 1.0,
                            );
                        } else {
                            assert_eq!(
                                got[i], y0[i],
                                "{what}: y[{row}, {c}] outside the range changed"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn forward_writes_only_its_own_copy_of_a_shared_output() {
        let mut rng = Rng::new(61);
        let (x, a, b) = (
            rand(&mut rng, &[4, 6]),
            rand(&mut rng, &[2, 6]),
            rand(&mut rng, &[3, 2]),
        );
        let y0 = rand(&mut rng, &[4, 8]);
        let mut y = y0.clone();
        let shared = y.clone();
        lora_project(&x, &a, &b, 2.0, None, &mut y, 5).unwrap();
        assert_eq!(shared.as_slice().unwrap(), y0.as_slice().unwrap());
        assert_ne!(y.as_slice().unwrap(), y0.as_slice().unwrap());
    }

    /// The composition the fused backward replaces, accumulating into copies of the given
    /// accumulators: (dx, grad_a, grad_b).
    #[allow(clippy::too_many_arguments)]
    fn reference_backward(
        dy: &Tensor,
        col0: usize,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        u: &Tensor,
        s: f32,
        key: Option<&DropoutKey>,
        acc: [&Tensor; 3],
    ) -> [Tensor; 3] {
        let [mut dx, mut ga, mut gb] = acc.map(|t| t.clone());
        let dy_m = columns(dy, col0, b.shape()[0]).unwrap();
        let ds = scale(&dy_m, s).unwrap();
        let du = linear_backward_input(&ds, b).unwrap();
        add_inplace(&mut gb, &linear_backward_weight(&ds, u).unwrap()).unwrap();
        let xd = match key {
            Some(k) => apply_dropout(x, k).unwrap(),
            None => x.clone(),
        };
        add_inplace(&mut ga, &linear_backward_weight(&du, &xd).unwrap()).unwrap();
        let mut dxd = linear_backward_input(&du, a).unwrap();
        if let Some(k) = key {
            dxd = apply_dropout_backward(&dxd, k).unwrap();
        }
        add_inplace(&mut dx, &dxd).unwrap();
        [dx, ga, gb]
    }

    #[test]
    fn backward_matches_the_composition_of_the_unfused_ops() {
        let mut rng = Rng::new(62);
        for &[t, inp, r, out, n, col0] in CASES {
            for p in [None, Some(0.25f32)] {
                let what = format!("T{t} in{inp} R{r} out{out} N{n} col0 {col0} p {p:?}");
                let (x, a, b) = (
                    rand(&mut rng, &[t, inp]),
                    rand(&mut rng, &[r, inp]),
                    rand(&mut rng, &[out, r]),
                );
                let (dy, u) = (rand(&mut rng, &[t, n]), rand(&mut rng, &[t, r]));
                // Nonzero accumulators: the op must add to them, not overwrite them.
                let acc = [
                    rand(&mut rng, &[t, inp]),
                    rand(&mut rng, &[r, inp]),
                    rand(&mut rng, &[out, r]),
                ];
                let k = p.map(|p| key(p, 6));
                let s = 0.6;
                let want = reference_backward(
                    &dy,
                    col0,
                    &x,
                    &a,
                    &b,
                    &u,
                    s,
                    k.as_ref(),
                    [&acc[0], &acc[1], &acc[2]],
                );
                let [mut dx, mut ga, mut gb] = acc.clone();
                let shared = [dx.clone(), ga.clone(), gb.clone()];
                lora_project_backward(
                    &dy,
                    col0,
                    &x,
                    &a,
                    &b,
                    &u,
                    s,
                    k.as_ref(),
                    &mut dx,
                    &mut ga,
                    &mut gb,
                )
                .unwrap();
                // Bounds on the magnitude of each increment: a sum of k products of values
                // in ±1 (times s where it applies).
                let du_scale = s * out as f32;
                let scales = [du_scale * r as f32, du_scale * t as f32, s * t as f32];
                for (i, (name, got)) in [("dx", &dx), ("grad_a", &ga), ("grad_b", &gb)]
                    .into_iter()
                    .enumerate()
                {
                    assert_eq!(got.shape(), want[i].shape(), "{what} {name}");
                    assert_near(
                        &format!("{what} {name}"),
                        got.as_slice().unwrap(),
                        want[i].as_slice().unwrap(),
                        scales[i] + 1.0,
                    );
                    // Copy-on-write: the clones taken before keep their values.
                    assert_eq!(shared[i].as_slice().unwrap(), acc[i].as_slice().unwrap());
                }
            }
        }
    }

    /// Σ dy · y of the forward as a naive f64 loop over the definition (mask multipliers
    /// from the key itself), for finite differences.
    #[allow(clippy::too_many_arguments)]
    fn loss(
        x: &[f64],
        a: &[f64],
        b: &[f64],
        dy: &[f32],
        s: f64,
        key: Option<&DropoutKey>,
        [t, inp, r, out, n, col0]: [usize; 6],
    ) -> f64 {
        let mut total = 0.0;
        for row in 0..t {
            let xd: Vec<f64> = (0..inp)
                .map(|j| {
                    let i = row * inp + j;
                    x[i] * key.map_or(1.0, |k| k.multiplier(i as u64) as f64)
                })
                .collect();
            let u: Vec<f64> = (0..r)
                .map(|q| (0..inp).map(|j| xd[j] * a[q * inp + j]).sum())
                .collect();
            for o in 0..out {
                let delta: f64 = s * (0..r).map(|q| u[q] * b[o * r + q]).sum::<f64>();
                total += dy[row * n + col0 + o] as f64 * delta;
            }
        }
        total
    }

    #[test]
    fn backward_is_the_gradient_of_the_forward() {
        let mut rng = Rng::new(63);
        let dims @ [t, inp, r, out, n, col0] = [3, 5, 2, 4, 9, 3];
        let (x, a, b) = (
            rand(&mut rng, &[t, inp]),
            rand(&mut rng, &[r, inp]),
            rand(&mut rng, &[out, r]),
        );
        let dy = rand(&mut rng, &[t, n]);
        let s = 1.5f32;
        for k in [None, Some(key(0.4, 1))] {
            let k = k.as_ref();
            let mut y = Tensor::zeros(&[t, n]);
            let u = lora_project(&x, &a, &b, s, k, &mut y, col0).unwrap();
            let (mut dx, mut ga, mut gb) = (
                Tensor::zeros(&[t, inp]),
                Tensor::zeros(&[r, inp]),
                Tensor::zeros(&[out, r]),
            );
            lora_project_backward(&dy, col0, &x, &a, &b, &u, s, k, &mut dx, &mut ga, &mut gb)
                .unwrap();
            let (xw, aw, bw) = (
                widen(x.as_slice().unwrap()),
                widen(a.as_slice().unwrap()),
                widen(b.as_slice().unwrap()),
            );
            let dyv = dy.as_slice().unwrap();
            let s = s as f64;
            let want_dx = numeric_grad(&xw, 1e-5, |x| loss(x, &aw, &bw, dyv, s, k, dims));
            let want_ga = numeric_grad(&aw, 1e-5, |a| loss(&xw, a, &bw, dyv, s, k, dims));
            let want_gb = numeric_grad(&bw, 1e-5, |b| loss(&xw, &aw, b, dyv, s, k, dims));
            for (name, got, want) in [
                ("dx", &dx, want_dx),
                ("grad_a", &ga, want_ga),
                ("grad_b", &gb, want_gb),
            ] {
                crate::test_util::assert_close(name, got.as_slice().unwrap(), &want, 1e-4, 1e-4);
            }
        }
    }

    #[test]
    fn bad_arguments_are_refused_before_anything_is_written() {
        let (x, a, b) = (
            Tensor::zeros(&[2, 5]),
            Tensor::zeros(&[3, 5]),
            Tensor::zeros(&[4, 3]),
        );
        let y0 = tensor((0..16).map(|i| i as f32).collect(), &[2, 8]);
        let mut y = y0.clone();
        let shape = |r: Result<Tensor>, name: &str| match r {
            Err(EngineError::Shape { expected, .. }) => {
                assert!(expected.contains(name), "{expected}")
            }
            other => panic!("{name}: {other:?}"),
        };
        shape(
            lora_project(&Tensor::zeros(&[2, 5, 1]), &a, &b, 1.0, None, &mut y, 0),
            "x",
        );
        shape(
            lora_project(&x, &Tensor::zeros(&[3, 6]), &b, 1.0, None, &mut y, 0),
            "a",
        );
        shape(
            lora_project(&x, &a, &Tensor::zeros(&[4, 2]), 1.0, None, &mut y, 0),
            "b",
        );
        shape(
            lora_project(&x, &a, &b, 1.0, None, &mut Tensor::zeros(&[3, 8]), 0),
            "y",
        );
        // The range must fit: 5 + 4 > 8, and an overflowing col0.
        for col0 in [5, usize::MAX] {
            match lora_project(&x, &a, &b, 1.0, None, &mut y, col0) {
                Err(EngineError::Arg { msg, .. }) => assert!(msg.contains("[2, 8]"), "{msg}"),
                other => panic!("col0 {col0}: {other:?}"),
            }
        }
        for (s, p) in [
            (f32::NAN, 0.1),
            (f32::INFINITY, 0.1),
            (1.0, 1.0),
            (1.0, -0.5),
        ] {
            let r = lora_project(&x, &a, &b, s, Some(&key(p, 0)), &mut y, 1);
            assert!(
                matches!(r, Err(EngineError::Arg { .. })),
                "s {s} p {p}: {r:?}"
            );
        }
        assert_eq!(y.as_slice().unwrap(), y0.as_slice().unwrap());

        // The backward's extra tensors are named too; nothing is accumulated on a refusal.
        let dy = Tensor::zeros(&[2, 8]);
        let u = Tensor::zeros(&[2, 3]);
        let ones = |shape: &[usize]| tensor(vec![1.0; shape.iter().product()], shape);
        let call = |u: &Tensor, [dx, ga, gb]: [&[usize]; 3], col0: usize, p: f32| {
            let (mut dx, mut ga, mut gb) = (ones(dx), ones(ga), ones(gb));
            let k = key(p, 0);
            let r = lora_project_backward(
                &dy,
                col0,
                &x,
                &a,
                &b,
                u,
                1.0,
                Some(&k),
                &mut dx,
                &mut ga,
                &mut gb,
            );
            for g in [&dx, &ga, &gb] {
                assert!(g.as_slice().unwrap().iter().all(|&v| v == 1.0), "written");
            }
            r
        };
        let named = |r: Result<()>, name: &str| match r {
            Err(EngineError::Shape { expected, .. }) => {
                assert!(expected.starts_with(name), "{expected}")
            }
            other => panic!("{name}: {other:?}"),
        };
        let good: [&[usize]; 3] = [&[2, 5], &[3, 5], &[4, 3]];
        named(call(&Tensor::zeros(&[2, 2]), good, 2, 0.1), "u");
        named(call(&u, [&[2, 4], &[3, 5], &[4, 3]], 2, 0.1), "dx");
        named(call(&u, [&[2, 5], &[3, 4], &[4, 3]], 2, 0.1), "grad_a");
        named(call(&u, [&[2, 5], &[3, 5], &[3, 3]], 2, 0.1), "grad_b");
        // A good call succeeds (dy is zero, so the accumulators keep their ones).
        call(&u, good, 2, 0.1).unwrap();
        let (mut dx, mut ga, mut gb) = (ones(&[2, 5]), ones(&[3, 5]), ones(&[4, 3]));
        let bad_dy = Tensor::zeros(&[3, 8]);
        named(
            lora_project_backward(
                &bad_dy, 0, &x, &a, &b, &u, 1.0, None, &mut dx, &mut ga, &mut gb,
            ),
            "dy",
        );
        assert!(matches!(
            call(&u, good, 2, 1.0),
            Err(EngineError::Arg { .. })
        ));
        assert!(matches!(
            call(&u, good, 6, 0.1),
            Err(EngineError::Arg { .. })
        ));
    }
}
