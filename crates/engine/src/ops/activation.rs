//! Gated MLP activation: `act(gate) * up`.
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

/// act(gu[:, ..I]) · gu[:, I..]; gu: [T, 2I] (gate columns first, as one fused gate+up
/// projection writes them) → [T, I].
pub fn gated_activation_packed(gu: &Tensor, act: Activation) -> Result<Tensor> {
    if let Some(gpu) = cuda_ops::device_of("gated_activation_packed", &[("gu", gu)])? {
        return cuda_ops::activation::gated_activation_packed(&gpu, gu, act);
    }
    const OP: &str = "gated_activation_packed";
    let [t, two_i] = gu.dims(OP, "gu: [T, 2I]")?;
    if two_i % 2 != 0 {
        return Err(EngineError::Shape {
            op: OP,
            expected: "gu: [T, 2I] (an even number of columns)".into(),
            got: gu.shape().to_vec(),
        });
    }
    let i = two_i / 2;
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
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let inner = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    0.5 * x * (1.0 + inner.tanh())
}

/// torch's gelu: 0.5·x·(1 + erf(x/√2)). `libm::erff` is accurate to about one ulp.
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{Rng, assert_close};

    /// erf in f64 from its Maclaurin series for |x| < 3 and the asymptotic complement beyond;
    /// independent of libm, good to ~1e-13 where the tests use it.
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
            // erfc(x) ≈ e^−x²/(x√π) · (1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶)); the first omitted
            // term is ≤ 1e-3 of erfc(3) ≈ 2.2e-5, so erf is off by ≤ 3e-8 absolute here.
            let x2 = a * a;
            let series =
                1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2);
            1.0 - (-x2).exp() / (a * std::f64::consts::PI.sqrt()) * series
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
        assert!((erf64(3.5) - 0.999_999_256_9).abs() < 1e-9);
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
        for act in [Activation::Silu, Activation::GeluTanh, Activation::Gelu] {
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

    #[test]
    fn packed_matches_separate_gate_and_up() {
        let mut rng = Rng::new(15);
        let (t, i) = (5, 13);
        let gu = rng.vec(t * 2 * i, -6.0, 6.0);
        let (gate, up): (Vec<f32>, Vec<f32>) = {
            let (mut g, mut u) = (vec![], vec![]);
            for row in gu.chunks(2 * i) {
                g.extend_from_slice(&row[..i]);
                u.extend_from_slice(&row[i..]);
            }
            (g, u)
        };
        let gt = Tensor::from_vec(gate, &[t, i]).unwrap();
        let ut = Tensor::from_vec(up, &[t, i]).unwrap();
        let gut = Tensor::from_vec(gu, &[t, 2 * i]).unwrap();
        for act in [Activation::Silu, Activation::GeluTanh, Activation::Gelu] {
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
        for act in [Activation::Silu, Activation::GeluTanh, Activation::Gelu] {
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
}
