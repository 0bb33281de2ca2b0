//! Linear layer (HF layout): y = x · Wᵀ + b.
//!
//! The product goes through the `gemm` crate (packed, SIMD, rayon-parallel). [`matmul_nt`] is
//! the shared `A · Bᵀ` kernel that the chunked log-prob op reuses on vocabulary slices.
use gemm::Parallelism;

use crate::cuda::ops as cuda_ops;
use crate::{EngineError, Result, Tensor};

/// x: [T, K], w: [N, K], bias: [N] → [T, N].
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let on: &[(&str, &Tensor)] = match bias {
        Some(b) => &[("x", x), ("w", w), ("bias", b)],
        None => &[("x", x), ("w", w)],
    };
    if let Some(gpu) = cuda_ops::device_of("linear", on)? {
        return cuda_ops::linear::linear(&gpu, x, w, bias);
    }
    const OP: &str = "linear";
    let [t, k] = x.dims(OP, "x: [T, K]")?;
    let [n, kw] = w.dims(OP, "w: [N, K]")?;
    if kw != k {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("w: [N, K] with K = {k} (x's last dim)"),
            got: w.shape().to_vec(),
        });
    }
    let mut out = vec![0.0f32; t * n]; // [T, N]
    let accumulate = match bias {
        Some(b) => {
            b.expect_shape(OP, &[n])?;
            let b = b.as_slice()?;
            for row in out.chunks_exact_mut(n.max(1)) {
                row.copy_from_slice(b);
            }
            true
        }
        None => false,
    };
    matmul_nt(
        &mut out,
        x.as_slice()?,
        w.as_slice()?,
        [t, n, k],
        accumulate,
        Parallelism::Rayon(0),
    );
    Tensor::from_vec(out, &[t, n])
}

/// dst[m×n] (+)= a[m×k] · b[n×k]ᵀ, all row-major and contiguous.
///
/// `accumulate` adds to what `dst` holds (used to start from a bias); otherwise `dst` is
/// overwritten.
pub(crate) fn matmul_nt(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    [m, n, k]: [usize; 3],
    accumulate: bool,
    parallelism: Parallelism,
) {
    // bᵀ[kk, j] is b[j, kk], at j·k + kk: row stride 1, column stride k.
    gemm_strided(
        Strided {
            data: dst,
            row: n,
            col: 1,
        },
        StridedRef {
            data: a,
            row: k,
            col: 1,
        },
        StridedRef {
            data: b,
            row: 1,
            col: k,
        },
        [m, n, k],
        accumulate,
        1.0,
        parallelism,
    );
}

/// A mutable matrix view: element (i, j) at `data[i·row + j·col]`.
pub(crate) struct Strided<'a> {
    pub(crate) data: &'a mut [f32],
    pub(crate) row: usize,
    pub(crate) col: usize,
}

/// A matrix view: element (i, j) at `data[i·row + j·col]`.
pub(crate) struct StridedRef<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) row: usize,
    pub(crate) col: usize,
}

/// dst[m×n] = (dst if `accumulate`) + scale · lhs[m×k] · rhs[k×n], on strided views.
///
/// Panics if a view is too short for its dimensions (a bug in the caller, which derives them
/// from shapes it has checked): gemm reads raw pointers, so this is checked here, once.
pub(crate) fn gemm_strided(
    dst: Strided<'_>,
    lhs: StridedRef<'_>,
    rhs: StridedRef<'_>,
    [m, n, k]: [usize; 3],
    accumulate: bool,
    scale: f32,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last =
        |rows: usize, cols: usize, row: usize, col: usize| (rows - 1) * row + (cols - 1) * col;
    assert!(
        last(m, n, dst.row, dst.col) < dst.data.len(),
        "gemm: dst view too short"
    );
    if k == 0 {
        // An empty sum; gemm is not asked to handle it.
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst.data[i * dst.row + j * dst.col] = 0.0;
                }
            }
        }
        return;
    }
    assert!(
        last(m, k, lhs.row, lhs.col) < lhs.data.len(),
        "gemm: lhs view too short"
    );
    assert!(
        last(k, n, rhs.row, rhs.col) < rhs.data.len(),
        "gemm: rhs view too short"
    );
    // SAFETY: the asserts above bound the largest index gemm touches in each view; dst does
    // not alias lhs or rhs (&mut vs &); strides fit isize as they index existing slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.col as isize,
            dst.row as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col as isize,
            lhs.row as isize,
            rhs.data.as_ptr(),
            rhs.col as isize,
            rhs.row as isize,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{Rng, assert_close};

    fn naive(x: &[f32], w: &[f32], b: Option<&[f32]>, t: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; t * n];
        for i in 0..t {
            for j in 0..n {
                let mut acc = b.map_or(0.0, |b| b[j] as f64);
                for kk in 0..k {
                    acc += x[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
                y[i * n + j] = acc;
            }
        }
        y
    }

    #[test]
    fn matches_f64_reference_at_awkward_sizes() {
        let mut rng = Rng::new(1);
        // Odd sizes, a single row, a single column, and sizes past gemm's blocking.
        for &(t, n, k) in &[
            (1, 1, 1),
            (7, 13, 33),
            (1, 130, 97),
            (65, 1, 200),
            (37, 291, 517),
        ] {
            let x = rng.vec(t * k, -1.0, 1.0);
            let w = rng.vec(n * k, -1.0, 1.0);
            let b = rng.vec(n, -1.0, 1.0);
            let xt = Tensor::from_vec(x.clone(), &[t, k]).unwrap();
            let wt = Tensor::from_vec(w.clone(), &[n, k]).unwrap();
            let bt = Tensor::from_vec(b.clone(), &[n]).unwrap();
            // f32 accumulation of k products of magnitude ≤ 1: error grows like √k·eps.
            let tol = 1e-6 * (k as f64).sqrt() * 4.0;
            let y = linear(&xt, &wt, None).unwrap();
            assert_eq!(y.shape(), &[t, n]);
            assert_close(
                "no bias",
                y.as_slice().unwrap(),
                &naive(&x, &w, None, t, n, k),
                tol,
                1e-5,
            );
            let y = linear(&xt, &wt, Some(&bt)).unwrap();
            let want = naive(&x, &w, Some(&b), t, n, k);
            assert_close("bias", y.as_slice().unwrap(), &want, tol, 1e-5);
        }
    }

    #[test]
    fn empty_dims() {
        let x = Tensor::zeros(&[0, 4]);
        let w = Tensor::from_vec(vec![1.0; 12], &[3, 4]).unwrap();
        assert_eq!(linear(&x, &w, None).unwrap().shape(), &[0, 3]);
        // K = 0: the product is an empty sum, so the output is the bias.
        let x = Tensor::zeros(&[2, 0]);
        let w = Tensor::zeros(&[3, 0]);
        let b = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3]).unwrap();
        let y = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.as_slice().unwrap(), &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        let y = linear(&x, &w, None).unwrap();
        assert_eq!(y.as_slice().unwrap(), &[0.0; 6]);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = Tensor::zeros(&[2, 4]);
        let w = Tensor::zeros(&[3, 5]);
        assert!(matches!(
            linear(&x, &w, None),
            Err(EngineError::Shape { .. })
        ));
        let w = Tensor::zeros(&[3, 4]);
        let b = Tensor::zeros(&[4]);
        assert!(matches!(
            linear(&x, &w, Some(&b)),
            Err(EngineError::Shape { .. })
        ));
        let x3 = Tensor::zeros(&[1, 2, 4]);
        assert!(matches!(
            linear(&x3, &w, None),
            Err(EngineError::Shape { .. })
        ));
    }
}
