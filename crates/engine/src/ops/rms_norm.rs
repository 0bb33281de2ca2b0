//! RMSNorm: y = x / sqrt(mean(x²) + eps) · (offset + w), and its backward.
use rayon::prelude::*;

use super::elementwise::sum_over_rows;

use crate::cuda::ops as cuda_ops;
use crate::{Result, Tensor};

/// x: [T, C], w: [C] → [T, C]. `weight_offset` is 0 for llama/qwen2/mistral and 1 for
/// Gemma's `(1 + w)`. Computed in f32 as HF does (Gemma multiplies after the cast back,
/// which is the same in f32).
///
/// The mean of squares is accumulated in f64 and rounded once: torch reduces with pairwise
/// sums, so this is at least as close to the exact value as HF is.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32, weight_offset: f32) -> Result<Tensor> {
    if let Some(gpu) = cuda_ops::device_of("rms_norm", &[("x", x), ("w", w)])? {
        return cuda_ops::rms_norm::rms_norm(&gpu, x, w, eps, weight_offset);
    }
    const OP: &str = "rms_norm";
    let [t, c] = x.dims(OP, "x: [T, C]")?;
    w.expect_shape(OP, &[c])?;
    if c == 0 {
        return Ok(Tensor::zeros(&[t, 0]));
    }
    let x = x.as_slice()?;
    // HF: `(offset + w)` (Gemma) or `w`, in f32.
    let gain: Vec<f32> = w.as_slice()?.iter().map(|&w| weight_offset + w).collect(); // [C]
    let mut out = vec![0.0f32; t * c]; // [T, C]
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .with_min_len(16)
        .for_each(|(y, x)| {
            let ss: f64 = x.iter().map(|&e| e as f64 * e as f64).sum();
            let mean = (ss / c as f64) as f32;
            let r = 1.0 / (mean + eps).sqrt();
            for ((y, &x), &g) in y.iter_mut().zip(x).zip(&gain) {
                // HF's order: normalise, then multiply by the gain.
                *y = (x * r) * g;
            }
        });
    Tensor::from_vec(out, &[t, c])
}

/// (sum, normed) with sum = x + residual and normed = rms_norm(sum): the decoder's "add the
/// block output to the residual stream, normalise for the next block" in one call (one kernel
/// on the GPU). x, residual: [T, C], w: [C] → ([T, C], [T, C]).
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    w: &Tensor,
    eps: f32,
    weight_offset: f32,
) -> Result<(Tensor, Tensor)> {
    let on = [("x", x), ("residual", residual), ("w", w)];
    if let Some(gpu) = cuda_ops::device_of("add_rms_norm", &on)? {
        return cuda_ops::rms_norm::add_rms_norm(&gpu, x, residual, w, eps, weight_offset);
    }
    x.dims::<2>("add_rms_norm", "x: [T, C]")?;
    residual.expect_shape("add_rms_norm", x.shape())?;
    let sum = super::add(x, residual)?;
    let normed = rms_norm(&sum, w, eps, weight_offset)?;
    Ok((sum, normed))
}

/// The gradients of [`rms_norm`]: x: [T, C], w: [C], dy: [T, C] → (dx: [T, C], dw: [C]),
/// both assigned.
///
/// With r = 1/sqrt(mean(x²) + eps) and g = offset + w (rounded to f32 as the forward does),
/// y_j = x_j·r·g_j, so
/// - dw_j = Σ_t dy_j·x_j·r (summed over the tokens; `weight_offset` is a constant);
/// - dx_k = r·g_k·dy_k − x_k·(r³/C)·Σ_j dy_j·g_j·x_j (the second term is r's dependence on
///   every x of the row).
///
/// Each row is worked out in f64 (the forward's mean of squares is f64 too) and rounded once.
///
/// On a GPU (x, w, dy bf16): dx is bf16, dw f32, both from f32 math; dw is reduced over the
/// tokens in a fixed order (the same bits on every run).
pub fn rms_norm_backward(
    x: &Tensor, // [T, C]
    w: &Tensor, // [C]
    eps: f32,
    weight_offset: f32,
    dy: &Tensor, // [T, C]
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "rms_norm_backward";
    let [t, c] = x.dims(OP, "x: [T, C]")?;
    w.expect_shape(OP, &[c])?;
    dy.expect_shape(OP, &[t, c])?;
    if let Some(gpu) = cuda_ops::device_of(OP, &[("x", x), ("w", w), ("dy", dy)])? {
        return cuda_ops::rms_norm::rms_norm_backward(&gpu, x, w, eps, weight_offset, dy);
    }
    if c == 0 {
        return Ok((Tensor::zeros(&[t, 0]), Tensor::zeros(&[0])));
    }
    let (x, dy) = (x.as_slice()?, dy.as_slice()?);
    let gain: Vec<f64> = w
        .as_slice()?
        .iter()
        .map(|&w| (weight_offset + w) as f64)
        .collect(); // [C]
    let inv_rms: Vec<f64> = x
        .par_chunks(c)
        .with_min_len(16)
        .map(|row| {
            let ss: f64 = row.iter().map(|&e| e as f64 * e as f64).sum();
            1.0 / (ss / c as f64 + eps as f64).sqrt()
        })
        .collect(); // [T]
    let mut dx = vec![0.0f32; t * c]; // [T, C]
    dx.par_chunks_mut(c)
        .zip(x.par_chunks(c).zip(dy.par_chunks(c)))
        .zip(inv_rms.par_iter())
        .with_min_len(16)
        .for_each(|((dx, (x, dy)), &r)| {
            let dot: f64 = x
                .iter()
                .zip(dy)
                .zip(&gain)
                .map(|((&x, &dy), &g)| dy as f64 * g * x as f64)
                .sum();
            let through_r = r * r * r * dot / c as f64;
            for (((dx, &x), &dy), &g) in dx.iter_mut().zip(x).zip(dy).zip(&gain) {
                *dx = (r * g * dy as f64 - x as f64 * through_r) as f32;
            }
        });
    let dw = sum_over_rows(t, c, |row, acc| {
        let r = inv_rms[row];
        let span = row * c..(row + 1) * c;
        for ((acc, &x), &dy) in acc.iter_mut().zip(&x[span.clone()]).zip(&dy[span]) {
            *acc += dy as f64 * x as f64 * r;
        }
    });
    let dw = dw.into_iter().map(|v| v as f32).collect();
    Ok((Tensor::from_vec(dx, &[t, c])?, Tensor::from_vec(dw, &[c])?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EngineError;
    use crate::ops::grad_check::{dot, numeric_grad, widen};
    use crate::test_util::{Rng, assert_close};

    /// RMSNorm in f64, a loop per row: the reference of the forward and, through finite
    /// differences, of the backward.
    fn naive(x: &[f64], w: &[f64], eps: f64, offset: f64, c: usize) -> Vec<f64> {
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks(c) {
            let ms = row.iter().map(|&e| e.powi(2)).sum::<f64>() / c as f64;
            let r = 1.0 / (ms + eps).sqrt();
            y.extend(row.iter().zip(w).map(|(&e, &w)| e * r * (offset + w)));
        }
        y
    }

    #[test]
    fn matches_f64_reference() {
        let mut rng = Rng::new(3);
        for &(t, c) in &[(1, 1), (5, 7), (33, 129), (70, 1000)] {
            let x = rng.vec(t * c, -3.0, 3.0);
            let w = rng.vec(c, -1.0, 1.0);
            let xt = Tensor::from_vec(x.clone(), &[t, c]).unwrap();
            let wt = Tensor::from_vec(w.clone(), &[c]).unwrap();
            for (eps, offset) in [(1e-6f32, 0.0f32), (1e-5, 1.0)] {
                let y = rms_norm(&xt, &wt, eps, offset).unwrap();
                let want = naive(&widen(&x), &widen(&w), eps as f64, offset as f64, c);
                // A handful of f32 roundings per element.
                assert_close("rms_norm", y.as_slice().unwrap(), &want, 1e-6, 1e-6);
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(31);
        for &(t, c) in &[(1, 1), (3, 7), (4, 13), (2, 33)] {
            let x = rng.vec(t * c, -3.0, 3.0);
            let w = rng.vec(c, -1.0, 1.0);
            let dy = rng.vec(t * c, -1.0, 1.0);
            let xt = Tensor::from_vec(x.clone(), &[t, c]).unwrap();
            let wt = Tensor::from_vec(w.clone(), &[c]).unwrap();
            let dyt = Tensor::from_vec(dy.clone(), &[t, c]).unwrap();
            for (eps, offset) in [(1e-6f32, 0.0f32), (1e-5, 1.0)] {
                let (dx, dw) = rms_norm_backward(&xt, &wt, eps, offset, &dyt).unwrap();
                assert_eq!((dx.shape(), dw.shape()), (&[t, c][..], &[c][..]));
                // The forward's gain is `offset + w` rounded to f32: differentiate that.
                let gain: Vec<f64> = w.iter().map(|&w| (offset + w) as f64).collect();
                let (eps, x64) = (eps as f64, widen(&x));
                let want_dx = numeric_grad(&x64, 1e-5, |x| dot(&dy, &naive(x, &gain, eps, 0.0, c)));
                let want_dw = numeric_grad(&gain, 1e-5, |g| dot(&dy, &naive(&x64, g, eps, 0.0, c)));
                // The backward rounds an f64 value once (6e-8 relative); the differences are
                // good to ~1e-9; values are O(1).
                assert_close("dx", dx.as_slice().unwrap(), &want_dx, 1e-6, 1e-6);
                assert_close("dw", dw.as_slice().unwrap(), &want_dw, 1e-6, 1e-6);
            }
        }
    }

    #[test]
    fn backward_sums_dw_over_many_rows() {
        // Past several blocks of the row reduction, against the closed form in f64.
        let mut rng = Rng::new(32);
        let (t, c) = (203, 9);
        let (x, w, dy) = (
            rng.vec(t * c, -2.0, 2.0),
            rng.vec(c, -1.0, 1.0),
            rng.vec(t * c, -1.0, 1.0),
        );
        let (_, dw) = rms_norm_backward(
            &Tensor::from_vec(x.clone(), &[t, c]).unwrap(),
            &Tensor::from_vec(w, &[c]).unwrap(),
            1e-6,
            1.0,
            &Tensor::from_vec(dy.clone(), &[t, c]).unwrap(),
        )
        .unwrap();
        // y_j is linear in g_j, so dw_j = Σ_t dy_j·y_j/g_j = Σ_t dy_j·naive(g = 1)_j.
        let unit = naive(&widen(&x), &vec![1.0; c], 1e-6, 0.0, c);
        let mut want = vec![0.0f64; c];
        for (j, (&d, &u)) in dy.iter().zip(&unit).enumerate() {
            want[j % c] += d as f64 * u;
        }
        assert_close("dw", dw.as_slice().unwrap(), &want, 1e-5, 1e-6);
    }

    #[test]
    fn backward_bad_shapes_are_errors() {
        let x = Tensor::zeros(&[2, 5]);
        let w = Tensor::zeros(&[5]);
        for (w, dy) in [
            (Tensor::zeros(&[4]), Tensor::zeros(&[2, 5])),
            (w.clone(), Tensor::zeros(&[2, 4])),
            (w.clone(), Tensor::zeros(&[3, 5])),
        ] {
            assert!(matches!(
                rms_norm_backward(&x, &w, 1e-6, 0.0, &dy),
                Err(EngineError::Shape { .. })
            ));
        }
        let flat = Tensor::zeros(&[10]);
        assert!(matches!(
            rms_norm_backward(&flat, &w, 1e-6, 0.0, &flat),
            Err(EngineError::Shape { .. })
        ));
    }

    #[test]
    fn add_rms_norm_is_add_then_norm() {
        let mut rng = Rng::new(14);
        let (t, c) = (6, 37);
        let x = Tensor::from_vec(rng.vec(t * c, -2.0, 2.0), &[t, c]).unwrap();
        let r = Tensor::from_vec(rng.vec(t * c, -2.0, 2.0), &[t, c]).unwrap();
        let w = Tensor::from_vec(rng.vec(c, -1.0, 1.0), &[c]).unwrap();
        let (sum, normed) = add_rms_norm(&x, &r, &w, 1e-6, 1.0).unwrap();
        let want_sum = crate::ops::add(&x, &r).unwrap();
        assert_eq!(sum.as_slice().unwrap(), want_sum.as_slice().unwrap());
        let want = rms_norm(&want_sum, &w, 1e-6, 1.0).unwrap();
        assert_eq!(normed.as_slice().unwrap(), want.as_slice().unwrap());
        let short = Tensor::zeros(&[t - 1, c]);
        assert!(matches!(
            add_rms_norm(&x, &short, &w, 1e-6, 0.0),
            Err(EngineError::Shape { .. })
        ));
    }

    #[test]
    fn zero_row_is_finite() {
        // mean 0: only eps keeps rsqrt finite, so the output is exactly 0.
        let x = Tensor::zeros(&[2, 5]);
        let w = Tensor::from_vec(vec![1.0; 5], &[5]).unwrap();
        let y = rms_norm(&x, &w, 1e-6, 0.0).unwrap();
        assert!(y.as_slice().unwrap().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = Tensor::zeros(&[2, 5]);
        let w = Tensor::zeros(&[4]);
        assert!(matches!(
            rms_norm(&x, &w, 1e-6, 0.0),
            Err(EngineError::Shape { .. })
        ));
        let x = Tensor::zeros(&[10]);
        let w = Tensor::zeros(&[10]);
        assert!(matches!(
            rms_norm(&x, &w, 1e-6, 0.0),
            Err(EngineError::Shape { .. })
        ));
    }
}
