//! RMSNorm: y = x / sqrt(mean(x²) + eps) · (offset + w).
use rayon::prelude::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EngineError;
    use crate::test_util::{Rng, assert_close};

    fn naive(x: &[f32], w: &[f32], eps: f64, offset: f64, c: usize) -> Vec<f64> {
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks(c) {
            let ms = row.iter().map(|&e| (e as f64).powi(2)).sum::<f64>() / c as f64;
            let r = 1.0 / (ms + eps).sqrt();
            y.extend(
                row.iter()
                    .zip(w)
                    .map(|(&e, &w)| e as f64 * r * (offset + w as f64)),
            );
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
                let want = naive(&x, &w, eps as f64, offset as f64, c);
                // A handful of f32 roundings per element.
                assert_close("rms_norm", y.as_slice().unwrap(), &want, 1e-6, 1e-6);
            }
        }
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
