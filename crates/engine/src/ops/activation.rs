//! Gated MLP activation: `act(gate) * up`, and its backward.
use rayon::prelude::*;

use crate::cuda::ops as cuda_ops;
use crate::{EngineError, Result, Tensor};

/// The activation a config names (`hidden_act` / `hidden_activation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// x·σ(x) — HF "silu" / "swish".
    Silu,
    /// tanh-approximated GELU — HF "gelu_pytorch_tanh" / "gelu_new" / "gelu_fast".
    GeluTanh,
    /// exact erf GELU — HF "gelu".
    Gelu,
}

/// Elements per rayon task.
const PAR_CHUNK: usize = 1 << 12;

/// `act(gate) * up`. gate, up: [T, I] → [T, I].
pub fn gated_activation(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    if let Some(gpu) = cuda_ops::device_of("gated_activation", &[("gate", gate), ("up", up)])? {
        return cuda_ops::activation::gated_activation(&gpu, gate, up, act);
    }
    const OP: &str = "gated_activation";
    let [t, i] = gate.dims(OP, "gate: [T, I]")?;
    up.expect_shape(OP, &[t, i])?;
    let (gate, up) = (gate.as_slice()?, up.as_slice()?);
    let mut out = vec![0.0f32; t * i]; // [T, I]
    out.par_chunks_mut(PAR_CHUNK)
        .zip(gate.par_chunks(PAR_CHUNK).zip(up.par_chunks(PAR_CHUNK)))
        .for_each(|(o, (g, u))| match act {
            Activation::Silu => run(o, g, u, silu),
            Activation::GeluTanh => run(o, g, u, gelu_tanh),
            Activation::Gelu => run(o, g, u, gelu_erf),
        });
    Tensor::from_vec(out, &[t, i])
}

/// [T, I] of a packed gu: [T, 2I], or a shape error when gu is not a matrix with an even
/// number of columns.
fn packed_dims(op: &'static str, gu: &Tensor) -> Result<[usize; 2]> {
    let [t, two_i] = gu.dims(op, "gu: [T, 2I]")?;
    if two_i % 2 != 0 {
        return Err(EngineError::Shape {
            op,
            expected: "gu: [T, 2I] (an even number of columns)".into(),
            got: gu.shape().to_vec(),
        });
    }
    Ok([t, two_i / 2])
}

/// act(gu[:, ..I]) · gu[:, I..]; gu: [T, 2I] (gate columns first, as one fused gate+up
/// projection writes them) → [T, I].
pub fn gated_activation_packed(gu: &Tensor, act: Activation) -> Result<Tensor> {
    if let Some(gpu) = cuda_ops::device_of("gated_activation_packed", &[("gu", gu)])? {
        return cuda_ops::activation::gated_activation_packed(&gpu, gu, act);
    }
    let [t, i] = packed_dims("gated_activation_packed", gu)?;
    let two_i = 2 * i;
    let gu = gu.as_slice()?;
    let mut out = vec![0.0f32; t * i]; // [T, I]
    if i > 0 {
        out.par_chunks_mut(i)
            .zip(gu.par_chunks(two_i))
            .with_min_len((PAR_CHUNK / i).max(1))
            .for_each(|(o, row)| {
                let (g, u) = row.split_at(i);
                match act {
                    Activation::Silu => run(o, g, u, silu),
                    Activation::GeluTanh => run(o, g, u, gelu_tanh),
                    Activation::Gelu => run(o, g, u, gelu_erf),
                }
            });
    }
    Tensor::from_vec(out, &[t, i])
}

/// The gradients of [`gated_activation`]: gate, up, dy: [T, I] → (dgate, dup): [T, I], both
/// assigned. dgate = dy·up·act′(gate), dup = dy·act(gate), in f32 like the forward, with
/// act′ the derivative of the forward's own formula (`silu_grad` and its siblings).
/// On a GPU every tensor is bf16 (f32 math inside).
pub fn gated_activation_backward(
    gate: &Tensor, // [T, I]
    up: &Tensor,   // [T, I]
    act: Activation,
    dy: &Tensor, // [T, I]
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "gated_activation_backward";
    let [t, i] = gate.dims(OP, "gate: [T, I]")?;
    up.expect_shape(OP, &[t, i])?;
    dy.expect_shape(OP, &[t, i])?;
    let on = [("gate", gate), ("up", up), ("dy", dy)];
    if let Some(gpu) = cuda_ops::device_of(OP, &on)? {
        return cuda_ops::activation::gated_activation_backward(&gpu, gate, up, act, dy);
    }
    let (gate, up, dy) = (gate.as_slice()?, up.as_slice()?, dy.as_slice()?);
    let mut dgate = vec![0.0f32; t * i]; // [T, I]
    let mut dup = vec![0.0f32; t * i]; // [T, I]
    dgate
        .par_chunks_mut(PAR_CHUNK)
        .zip(dup.par_chunks_mut(PAR_CHUNK))
        .zip(gate.par_chunks(PAR_CHUNK).zip(up.par_chunks(PAR_CHUNK)))
        .zip(dy.par_chunks(PAR_CHUNK))
        .for_each(|(((dg, du), (g, u)), dy)| run_backward(act, [dg, du], [g, u], dy));
    Ok((
        Tensor::from_vec(dgate, &[t, i])?,
        Tensor::from_vec(dup, &[t, i])?,
    ))
}

/// The gradient of [`gated_activation_packed`]: gu: [T, 2I], dy: [T, I] → dgu: [T, 2I]
/// (assigned), packed like gu: dgate in the first I columns, dup in the last I. On a GPU
/// every tensor is bf16.
pub fn gated_activation_packed_backward(
    gu: &Tensor, // [T, 2I]
    act: Activation,
    dy: &Tensor, // [T, I]
) -> Result<Tensor> {
    const OP: &str = "gated_activation_packed_backward";
    let [t, i] = packed_dims(OP, gu)?;
    let two_i = 2 * i;
    dy.expect_shape(OP, &[t, i])?;
    if let Some(gpu) = cuda_ops::device_of(OP, &[("gu", gu), ("dy", dy)])? {
        return cuda_ops::activation::gated_activation_packed_backward(&gpu, gu, act, dy);
    }
    let (gu, dy) = (gu.as_slice()?, dy.as_slice()?);
    let mut dgu = vec![0.0f32; t * two_i]; // [T, 2I]
    if i > 0 {
        dgu.par_chunks_mut(two_i)
            .zip(gu.par_chunks(two_i).zip(dy.par_chunks(i)))
            .with_min_len((PAR_CHUNK / i).max(1))
            .for_each(|(d, (row, dy))| {
                let (dg, du) = d.split_at_mut(i);
                let (g, u) = row.split_at(i);
                run_backward(act, [dg, du], [g, u], dy);
            });
    }
    Tensor::from_vec(dgu, &[t, two_i])
}

/// dgate = dy·up·act′(gate) and dup = dy·act(gate) elementwise; the match is outside the
/// loop, so each loop body is one inlined function (as in [`run`]).
fn run_backward(act: Activation, [dg, du]: [&mut [f32]; 2], [g, u]: [&[f32]; 2], dy: &[f32]) {
    match act {
        Activation::Silu => run_grad([dg, du], [g, u], dy, silu_grad),
        Activation::GeluTanh => run_grad([dg, du], [g, u], dy, gelu_tanh_grad),
        Activation::Gelu => run_grad([dg, du], [g, u], dy, gelu_erf_grad),
    }
}

/// The loop of [`run_backward`] for one `f` = (act, act′).
fn run_grad(
    [dg, du]: [&mut [f32]; 2],
    [g, u]: [&[f32]; 2],
    dy: &[f32],
    f: impl Fn(f32) -> (f32, f32),
) {
    for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
        let (value, slope) = f(g);
        *dg = dy * u * slope;
        *du = dy * value;
    }
}

/// out = f(gate) · up elementwise; one match per chunk outside, so this loop body is a single
/// inlined function.
fn run(out: &mut [f32], gate: &[f32], up: &[f32], f: impl Fn(f32) -> f32) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = f(g) * u;
    }
}

/// torch's silu: x / (1 + e^−x). For x → −∞ the denominator overflows to inf and the result
/// is −0, as in torch.
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// torch's gelu(approximate="tanh"): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + gelu_tanh_inner(x).tanh())
}

/// √(2/π) rounded to f32, and the cubic coefficient of the tanh approximation.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// The argument of tanh in [`gelu_tanh`]: √(2/π)·(x + 0.044715·x³).
fn gelu_tanh_inner(x: f32) -> f32 {
    SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)
}

/// torch's gelu: 0.5·x·(1 + erf(x/√2)). `libm::erff` is accurate to about one ulp.
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// (silu(x), silu′(x)) with σ = 1/(1 + e^−x): silu′ = σ·(1 + x·(1 − σ)). Finite for every
/// finite x: where e^−x overflows σ is 0 and so is the slope.
fn silu_grad(x: f32) -> (f32, f32) {
    let sigma = 1.0 / (1.0 + (-x).exp());
    (silu(x), sigma * (1.0 + x * (1.0 - sigma)))
}

/// (gelu_tanh(x), its derivative): with u = √(2/π)·(x + 0.044715·x³) and τ = tanh u,
/// 0.5·(1 + τ) + 0.5·x·(1 − τ²)·√(2/π)·(1 + 3·0.044715·x²).
fn gelu_tanh_grad(x: f32) -> (f32, f32) {
    let tau = gelu_tanh_inner(x).tanh();
    // (1 − τ)(1 + τ) rather than 1 − τ² keeps the small factor's relative accuracy; and
    // where it is exactly 0 the tail term is skipped, as x² may overflow there (0·inf).
    let sech2 = (1.0 - tau) * (1.0 + tau);
    let tail = if sech2 == 0.0 {
        0.0
    } else {
        0.5 * x * sech2 * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x)
    };
    // The value from the same τ, in the forward's order of operations: the same bits.
    (0.5 * x * (1.0 + tau), 0.5 * (1.0 + tau) + tail)
}

/// (gelu(x), gelu′(x)) for the exact GELU: Φ(x) + x·φ(x) with Φ(x) = 0.5·(1 + erf(x/√2))
/// and φ(x) = e^(−x²/2)/√(2π).
fn gelu_erf_grad(x: f32) -> (f32, f32) {
    // 1/√(2π), rounded to f32.
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() * INV_SQRT_2PI;
    (gelu_erf(x), cdf + x * pdf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::grad_check::{dot, numeric_grad, widen};
    use crate::test_util::{Rng, assert_close};

    const ALL: [Activation; 3] = [Activation::Silu, Activation::GeluTanh, Activation::Gelu];

    /// erf in f64 from its Maclaurin series for |x| < 3 and a continued fraction for the
    /// complement beyond; independent of libm, good to ~1e-13 everywhere, so its finite
    /// differences see no seam at 3.
    fn erf64(x: f64) -> f64 {
        let a = x.abs();
        let v = if a < 3.0 {
            // erf(x) = 2/√π Σ (−1)^n x^(2n+1) / (n! (2n+1))
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(x) = e^−x²/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …)))), evaluated from
            // the bottom; at x ≥ 3, 60 levels converge far below f64 rounding.
            let mut f = a;
            for n in (1..=60).rev() {
                f = a + (n as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
        };
        v.copysign(x)
    }

    fn reference(g: f64, act: Activation) -> f64 {
        match act {
            Activation::Silu => g / (1.0 + (-g).exp()),
            Activation::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * g * (1.0 + (k * (g + 0.044715 * g.powi(3))).tanh())
            }
            Activation::Gelu => 0.5 * g * (1.0 + erf64(g / 2f64.sqrt())),
        }
    }

    #[test]
    fn erf_reference_hits_known_values() {
        // Tabulated values (Abramowitz & Stegun, table 7.1).
        for (x, want) in [
            (0.5, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (2.0, 0.995_322_265_0),
        ] {
            assert!((erf64(x) - want).abs() < 1e-9, "erf({x})");
        }
        // erfc either side of the switch at 3, to 1e-13 (values from CPython's math.erfc,
        // which is independent of both branches here).
        for (x, erfc) in [
            (2.9, 4.109_787_809_945_886e-5),
            (3.0, 2.209_049_699_858_543_8e-5),
            (3.5, 7.430_983_723_414_128e-7),
            (4.5, 1.966_160_441_542_887_3e-10),
        ] {
            assert!((1.0 - erf64(x) - erfc).abs() < 1e-13, "erfc({x})");
        }
    }

    #[test]
    fn matches_f64_reference() {
        let mut rng = Rng::new(5);
        // Odd I, and a T·I past one rayon chunk; gate spans both tails of the curves.
        let (t, i) = (9, 1001);
        let gate = rng.vec(t * i, -9.0, 9.0);
        let up = rng.vec(t * i, -2.0, 2.0);
        let gt = Tensor::from_vec(gate.clone(), &[t, i]).unwrap();
        let ut = Tensor::from_vec(up.clone(), &[t, i]).unwrap();
        for act in ALL {
            let y = gated_activation(&gt, &ut, act).unwrap();
            let want: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(&g, &u)| reference(g as f64, act) * u as f64)
                .collect();
            // A few ulps from exp/tanh/erf plus the products; values are O(10).
            assert_close(
                &format!("{act:?}"),
                y.as_slice().unwrap(),
                &want,
                2e-6,
                2e-6,
            );
        }
    }

    /// A packed gu: [T, 2I] as its separate gate and up halves, each [T, I].
    fn split_gate_up(gu: &[f32], t: usize, i: usize) -> (Tensor, Tensor) {
        let half = |lo: usize| {
            let v: Vec<f32> = gu
                .chunks(2 * i)
                .flat_map(|row| row[lo..lo + i].to_vec())
                .collect();
            Tensor::from_vec(v, &[t, i]).unwrap()
        };
        (half(0), half(i))
    }

    #[test]
    fn packed_matches_separate_gate_and_up() {
        let mut rng = Rng::new(15);
        let (t, i) = (5, 13);
        let gu = rng.vec(t * 2 * i, -6.0, 6.0);
        let (gt, ut) = split_gate_up(&gu, t, i);
        let gut = Tensor::from_vec(gu, &[t, 2 * i]).unwrap();
        for act in ALL {
            let want = gated_activation(&gt, &ut, act).unwrap();
            let got = gated_activation_packed(&gut, act).unwrap();
            assert_eq!(got.shape(), &[t, i]);
            assert_eq!(got.as_slice().unwrap(), want.as_slice().unwrap(), "{act:?}");
        }
        let odd = Tensor::zeros(&[2, 7]);
        assert!(matches!(
            gated_activation_packed(&odd, Activation::Silu),
            Err(EngineError::Shape { .. })
        ));
    }

    #[test]
    fn extreme_inputs_stay_finite() {
        let g = Tensor::from_vec(vec![-1e4, -100.0, 0.0, 100.0, 1e4], &[1, 5]).unwrap();
        let u = Tensor::from_vec(vec![1.0; 5], &[1, 5]).unwrap();
        for act in ALL {
            let y = gated_activation(&g, &u, act).unwrap();
            let y = y.as_slice().unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{act:?}: {y:?}");
            assert_eq!(&y[2..], &[0.0, 100.0, 1e4], "{act:?}");
            assert!(y[0].abs() < 1e-30 && y[1].abs() < 1e-30, "{act:?}: {y:?}");
        }
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let g = Tensor::zeros(&[2, 3]);
        let u = Tensor::zeros(&[2, 4]);
        assert!(matches!(
            gated_activation(&g, &u, Activation::Silu),
            Err(EngineError::Shape { .. })
        ));
        let g = Tensor::zeros(&[6]);
        let u = Tensor::zeros(&[6]);
        assert!(matches!(
            gated_activation(&g, &u, Activation::Gelu),
            Err(EngineError::Shape { .. })
        ));
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(25);
        for &(t, i) in &[(1, 1), (3, 7), (4, 13), (2, 37)] {
            // gate spans both tails of every curve; up and dy are O(1).
            let gate = rng.vec(t * i, -9.0, 9.0);
            let up = rng.vec(t * i, -2.0, 2.0);
            let dy = rng.vec(t * i, -1.0, 1.0);
            let tensor = |v: &[f32]| Tensor::from_vec(v.to_vec(), &[t, i]).unwrap();
            let (g64, u64) = (widen(&gate), widen(&up));
            for act in ALL {
                let forward = |g: &[f64], u: &[f64]| -> Vec<f64> {
                    g.iter()
                        .zip(u)
                        .map(|(&g, &u)| reference(g, act) * u)
                        .collect()
                };
                let (dg, du) =
                    gated_activation_backward(&tensor(&gate), &tensor(&up), act, &tensor(&dy))
                        .unwrap();
                let want_dg = numeric_grad(&g64, 1e-5, |g| dot(&dy, &forward(g, &u64)));
                let want_du = numeric_grad(&u64, 1e-5, |u| dot(&dy, &forward(&g64, u)));
                // f32 formulas: a few ulps of O(1) slopes (1 − τ² and 1 + τ lose their
                // relative accuracy in the tails, which the absolute term covers), times
                // |dy·up| ≤ 2; the differences are good to ~1e-9.
                let what = format!("{act:?} {t}x{i}");
                assert_close(
                    &format!("{what} dgate"),
                    dg.as_slice().unwrap(),
                    &want_dg,
                    2e-6,
                    1e-5,
                );
                assert_close(
                    &format!("{what} dup"),
                    du.as_slice().unwrap(),
                    &want_du,
                    2e-6,
                    1e-5,
                );
            }
        }
    }

    #[test]
    fn packed_backward_is_the_separate_backward_packed() {
        let mut rng = Rng::new(26);
        // A row count and width that give several rayon jobs of a few rows.
        let (t, i) = (37, 301);
        let gu = rng.vec(t * 2 * i, -6.0, 6.0);
        let dy = rng.vec(t * i, -1.0, 1.0);
        let (gate, up) = split_gate_up(&gu, t, i);
        let gut = Tensor::from_vec(gu.clone(), &[t, 2 * i]).unwrap();
        let dyt = Tensor::from_vec(dy, &[t, i]).unwrap();
        for act in ALL {
            let (dg, du) = gated_activation_backward(&gate, &up, act, &dyt).unwrap();
            let dgu = gated_activation_packed_backward(&gut, act, &dyt).unwrap();
            assert_eq!(dgu.shape(), &[t, 2 * i]);
            let (dg, du) = (dg.as_slice().unwrap(), du.as_slice().unwrap());
            for (r, row) in dgu.as_slice().unwrap().chunks(2 * i).enumerate() {
                assert_eq!(&row[..i], &dg[r * i..(r + 1) * i], "{act:?} dgate row {r}");
                assert_eq!(&row[i..], &du[r * i..(r + 1) * i], "{act:?} dup row {r}");
            }
        }
    }

    #[test]
    fn backward_of_extreme_inputs_is_finite_with_the_limit_slopes() {
        // Far left every slope is 0, far right 1 (and |x| = 1e20 squares past f32's range).
        let g = Tensor::from_vec(vec![-1e20, -1e4, -100.0, 100.0, 1e4, 1e20], &[1, 6]).unwrap();
        let ones = Tensor::from_vec(vec![1.0; 6], &[1, 6]).unwrap();
        for act in ALL {
            let (dg, _) = gated_activation_backward(&g, &ones, act, &ones).unwrap();
            let dg = dg.as_slice().unwrap();
            assert_eq!(dg, &[0.0, 0.0, 0.0, 1.0, 1.0, 1.0], "{act:?}");
        }
    }

    #[test]
    fn backward_bad_shapes_are_errors() {
        let g = Tensor::zeros(&[2, 3]);
        for (up, dy) in [
            (Tensor::zeros(&[2, 4]), Tensor::zeros(&[2, 3])),
            (Tensor::zeros(&[2, 3]), Tensor::zeros(&[3, 3])),
        ] {
            assert!(matches!(
                gated_activation_backward(&g, &up, Activation::Silu, &dy),
                Err(EngineError::Shape { .. })
            ));
        }
        let gu = Tensor::zeros(&[2, 6]);
        for (gu, dy) in [
            (Tensor::zeros(&[2, 7]), Tensor::zeros(&[2, 3])),
            (gu.clone(), Tensor::zeros(&[2, 6])),
            (gu, Tensor::zeros(&[1, 3])),
        ] {
            assert!(matches!(
                gated_activation_packed_backward(&gu, Activation::Gelu, &dy),
                Err(EngineError::Shape { .. })
            ));
        }
    }
}
