//! Linear layer (HF layout): y = x · Wᵀ + b, and its backward.
//!
//! The products go through the `gemm` crate (packed, SIMD, rayon-parallel, f32 accumulate).
//! [`matmul_nt`] is the shared `A · Bᵀ` kernel that the chunked log-prob op reuses on
//! vocabulary slices; the backward adds `A · B` and `Aᵀ · B`.
use gemm::Parallelism;

use super::elementwise::sum_over_rows;
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

/// dx = dy · W, the input gradient of [`linear`]: dy: [T, N], w: [N, K] → dx: [T, K]
/// (assigned). The bias, if any, does not enter it. On the GPU: bf16 in, bf16 out.
pub fn linear_backward_input(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    const OP: &str = "linear_backward_input";
    let gpu = cuda_ops::device_of(OP, &[("dy", dy), ("w", w)])?;
    let [t, n] = dy.dims(OP, "dy: [T, N]")?;
    let [nw, k] = w.dims(OP, "w: [N, K]")?;
    if nw != n {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("w: [N, K] with N = {n} (dy's last dim)"),
            got: w.shape().to_vec(),
        });
    }
    if let Some(gpu) = gpu {
        return cuda_ops::linear::linear_backward_input(&gpu, dy, w, [t, n, k]);
    }
    let mut dx = vec![0.0f32; t * k]; // [T, K]
    matmul_nn(&mut dx, dy.as_slice()?, w.as_slice()?, [t, k, n]);
    Tensor::from_vec(dx, &[t, k])
}

/// dW = dyᵀ · x, the weight gradient of [`linear`]: dy: [T, N], x: [T, K] → dw: [N, K]
/// (assigned), summed over the T tokens in f32 by gemm. On the GPU: bf16 in, f32 out (a
/// parameter gradient).
pub fn linear_backward_weight(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    const OP: &str = "linear_backward_weight";
    let gpu = cuda_ops::device_of(OP, &[("dy", dy), ("x", x)])?;
    let [t, n] = dy.dims(OP, "dy: [T, N]")?;
    let [tx, k] = x.dims(OP, "x: [T, K]")?;
    if tx != t {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("x: [T, K] with T = {t} (dy's first dim)"),
            got: x.shape().to_vec(),
        });
    }
    if let Some(gpu) = gpu {
        return cuda_ops::linear::linear_backward_weight(&gpu, dy, x, [t, n, k]);
    }
    let mut dw = vec![0.0f32; n * k]; // [N, K]
    matmul_tn(&mut dw, dy.as_slice()?, x.as_slice()?, [n, k, t]);
    Tensor::from_vec(dw, &[n, k])
}

/// db = Σ_t dy, the bias gradient of [`linear`]: dy: [T, N] → db: [N] (assigned), summed in
/// f64 in a fixed order (`sum_over_rows`: the same bits whatever the thread count) and rounded
/// once. On the GPU: bf16 in, f32 out, summed in f32 (a GEMM against ones).
pub fn bias_backward(dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "bias_backward";
    let gpu = cuda_ops::device_of(OP, &[("dy", dy)])?;
    let [t, n] = dy.dims(OP, "dy: [T, N]")?;
    if let Some(gpu) = gpu {
        return cuda_ops::linear::bias_backward(&gpu, dy, [t, n]);
    }
    let dy = dy.as_slice()?;
    let db = sum_over_rows(t, n, |row, acc| {
        for (acc, &v) in acc.iter_mut().zip(&dy[row * n..(row + 1) * n]) {
            *acc += v as f64;
        }
    });
    Tensor::from_vec(db.into_iter().map(|v| v as f32).collect(), &[n])
}

/// dst[m×n] = a[m×k] · b[k×n], all row-major and contiguous.
fn matmul_nn(dst: &mut [f32], a: &[f32], b: &[f32], [m, n, k]: [usize; 3]) {
    gemm_strided(
        Strided::rows(dst, n),
        StridedRef::rows(a, k),
        StridedRef::rows(b, n),
        [m, n, k],
        false,
        1.0,
        Parallelism::Rayon(0),
    );
}

/// dst[m×n] = a[k×m]ᵀ · b[k×n], all row-major and contiguous (a sum over the k rows that a
/// and b share: the tokens, for a weight gradient).
fn matmul_tn(dst: &mut [f32], a: &[f32], b: &[f32], [m, n, k]: [usize; 3]) {
    // aᵀ[i, kk] is a[kk, i], at kk·m + i.
    gemm_strided(
        Strided::rows(dst, n),
        StridedRef::transposed(a, m),
        StridedRef::rows(b, n),
        [m, n, k],
        false,
        1.0,
        Parallelism::Rayon(0),
    );
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
    // bᵀ[kk, j] is b[j, kk], at j·k + kk.
    gemm_strided(
        Strided::rows(dst, n),
        StridedRef::rows(a, k),
        StridedRef::transposed(b, k),
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

impl<'a> Strided<'a> {
    /// A row-major matrix whose rows start `stride` elements apart: (i, j) at
    /// `data[i·stride + j]`.
    pub(crate) fn rows(data: &'a mut [f32], stride: usize) -> Self {
        Strided {
            data,
            row: stride,
            col: 1,
        }
    }
}

impl<'a> StridedRef<'a> {
    /// A row-major matrix whose rows start `stride` elements apart: (i, j) at
    /// `data[i·stride + j]`.
    pub(crate) fn rows(data: &'a [f32], stride: usize) -> Self {
        StridedRef {
            data,
            row: stride,
            col: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows start `stride` elements apart: (i, j)
    /// at `data[j·stride + i]`, row stride 1, column stride `stride`.
    pub(crate) fn transposed(data: &'a [f32], stride: usize) -> Self {
        StridedRef {
            data,
            row: 1,
            col: stride,
        }
    }
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
    use crate::ops::grad_check::{dot, numeric_grad, widen};
    use crate::test_util::{Rng, assert_close};

    /// x·Wᵀ + b in f64, a loop per output: the reference of the forward and, through finite
    /// differences, of the backward.
    fn naive(x: &[f64], w: &[f64], b: Option<&[f64]>, t: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; t * n];
        for i in 0..t {
            for j in 0..n {
                let mut acc = b.map_or(0.0, |b| b[j]);
                for kk in 0..k {
                    acc += x[i * k + kk] * w[j * k + kk];
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
                &naive(&widen(&x), &widen(&w), None, t, n, k),
                tol,
                1e-5,
            );
            let y = linear(&xt, &wt, Some(&bt)).unwrap();
            let want = naive(&widen(&x), &widen(&w), Some(&widen(&b)), t, n, k);
            assert_close("bias", y.as_slice().unwrap(), &want, tol, 1e-5);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(33);
        for &(t, n, k) in &[(1, 1, 1), (3, 5, 7), (4, 9, 17), (2, 13, 3)] {
            let (x, w, b) = (
                rng.vec(t * k, -1.0, 1.0),
                rng.vec(n * k, -1.0, 1.0),
                rng.vec(n, -1.0, 1.0),
            );
            let dy = rng.vec(t * n, -1.0, 1.0);
            let dyt = Tensor::from_vec(dy.clone(), &[t, n]).unwrap();
            let dx = linear_backward_input(&dyt, &Tensor::from_vec(w.clone(), &[n, k]).unwrap());
            let dw = linear_backward_weight(&dyt, &Tensor::from_vec(x.clone(), &[t, k]).unwrap());
            let db = bias_backward(&dyt).unwrap();
            let (x, w, b) = (widen(&x), widen(&w), widen(&b));
            let loss = |x: &[f64], w: &[f64], b: &[f64]| dot(&dy, &naive(x, w, Some(b), t, n, k));
            let want_dx = numeric_grad(&x, 1e-5, |x| loss(x, &w, &b));
            let want_dw = numeric_grad(&w, 1e-5, |w| loss(&x, w, &b));
            let want_db = numeric_grad(&b, 1e-5, |b| loss(&x, &w, b));
            // f32 sums of at most 13 products of values ≤ 1; the map is linear, so the
            // differences are exact up to f64 rounding.
            let what = format!("{t}x{n}x{k}");
            assert_close(&what, dx.unwrap().as_slice().unwrap(), &want_dx, 1e-6, 1e-6);
            assert_close(&what, dw.unwrap().as_slice().unwrap(), &want_dw, 1e-6, 1e-6);
            assert_close(&what, db.as_slice().unwrap(), &want_db, 1e-6, 1e-6);
        }
    }

    #[test]
    fn backward_matches_f64_products_past_gemm_blocking() {
        // Too large for finite differences in a test: the two products and the bias sum
        // written out as f64 loops instead.
        let mut rng = Rng::new(34);
        for &(t, n, k) in &[(65, 1, 200), (37, 291, 517), (301, 17, 9)] {
            let (x, w, dy) = (
                rng.vec(t * k, -1.0, 1.0),
                rng.vec(n * k, -1.0, 1.0),
                rng.vec(t * n, -1.0, 1.0),
            );
            let dyt = Tensor::from_vec(dy.clone(), &[t, n]).unwrap();
            let dx = linear_backward_input(&dyt, &Tensor::from_vec(w.clone(), &[n, k]).unwrap())
                .unwrap();
            let dw = linear_backward_weight(&dyt, &Tensor::from_vec(x.clone(), &[t, k]).unwrap())
                .unwrap();
            let db = bias_backward(&dyt).unwrap();
            let (mut want_dx, mut want_dw, mut want_db) =
                (vec![0.0f64; t * k], vec![0.0f64; n * k], vec![0.0f64; n]);
            for i in 0..t {
                for j in 0..n {
                    let g = dy[i * n + j] as f64;
                    want_db[j] += g;
                    for kk in 0..k {
                        want_dx[i * k + kk] += g * w[j * k + kk] as f64;
                        want_dw[j * k + kk] += g * x[i * k + kk] as f64;
                    }
                }
            }
            // f32 accumulation of up to 301 products of magnitude ≤ 1: like the forward's
            // bound, √(terms)·eps-ish with margin.
            let tol = |terms: usize| 1e-6 * (terms as f64).sqrt() * 4.0;
            assert_close("dx", dx.as_slice().unwrap(), &want_dx, tol(n), 1e-5);
            assert_close("dw", dw.as_slice().unwrap(), &want_dw, tol(t), 1e-5);
            // f64 sums rounded once.
            assert_close("db", db.as_slice().unwrap(), &want_db, 1e-6, 1e-6);
        }
    }

    #[test]
    fn backward_bad_shapes_are_errors() {
        let dy = Tensor::zeros(&[2, 3]);
        let bad = [
            linear_backward_input(&dy, &Tensor::zeros(&[4, 5])),
            linear_backward_input(&dy, &Tensor::zeros(&[3])),
            linear_backward_input(&Tensor::zeros(&[6]), &Tensor::zeros(&[3, 5])),
            linear_backward_weight(&dy, &Tensor::zeros(&[3, 5])),
            linear_backward_weight(&dy, &Tensor::zeros(&[2, 5, 1])),
            bias_backward(&Tensor::zeros(&[6])),
        ];
        for (i, r) in bad.into_iter().enumerate() {
            assert!(
                matches!(r, Err(EngineError::Shape { .. })),
                "case {i}: {r:?}"
            );
        }
        // Empty dims give empty or zero gradients, not errors.
        let dx = linear_backward_input(&Tensor::zeros(&[2, 0]), &Tensor::zeros(&[0, 4])).unwrap();
        assert_eq!(dx.as_slice().unwrap(), &[0.0; 8]);
        let dw = linear_backward_weight(&Tensor::zeros(&[0, 3]), &Tensor::zeros(&[0, 2])).unwrap();
        assert_eq!(dw.as_slice().unwrap(), &[0.0; 6]);
        let db = bias_backward(&Tensor::zeros(&[0, 3])).unwrap();
        assert_eq!(db.as_slice().unwrap(), &[0.0; 3]);
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
