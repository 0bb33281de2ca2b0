//! Elementwise ops: residual adds and scaling; and [`sum_over_rows`], the deterministic
//! reduction over tokens that the backwards use for weight and bias gradients.
//!
//! On a GPU these take bf16 (activations) and f32 tensors (LoRA's parameters and gradient
//! accumulators); see each function for the dtype of its output.
use rayon::prelude::*;

use crate::cuda::DType;
use crate::cuda::ops as cuda_ops;
use crate::{EngineError, Result, Tensor};

/// Below this many elements a loop on one thread beats rayon's fork/join.
const PAR_MIN: usize = 1 << 15;
/// Elements per rayon task: large enough to amortise the task, small enough to balance.
const PAR_CHUNK: usize = 1 << 13;

/// a + b, same shapes. On a GPU a and b share one dtype (bf16 or f32), the sum's.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(gpu) = cuda_ops::device_of("add", &[("a", a), ("b", b)])? {
        return cuda_ops::elementwise::add(&gpu, a, b);
    }
    let mut out = a.clone();
    add_inplace(&mut out, b)?;
    Ok(out)
}

/// a += b, same shapes. On a GPU: bf16 += bf16, f32 += f32, or f32 += bf16 (an f32
/// accumulator taking a bf16 term); a's dtype is kept.
pub fn add_inplace(a: &mut Tensor, b: &Tensor) -> Result<()> {
    if let Some(gpu) = cuda_ops::device_of("add", &[("a", a), ("b", b)])? {
        return cuda_ops::elementwise::add_inplace(&gpu, a, b);
    }
    if a.shape() != b.shape() {
        return Err(EngineError::Shape {
            op: "add",
            expected: format!("b of a's shape {:?}", a.shape()),
            got: b.shape().to_vec(),
        });
    }
    let b = b.as_slice()?;
    let a = a.as_mut_slice()?;
    let kernel = |a: &mut [f32], b: &[f32]| a.iter_mut().zip(b).for_each(|(a, &b)| *a += b);
    if a.len() < PAR_MIN {
        kernel(a, b);
    } else {
        a.par_chunks_mut(PAR_CHUNK)
            .zip(b.par_chunks(PAR_CHUNK))
            .for_each(|(a, b)| kernel(a, b));
    }
    Ok(())
}

/// x · s, in x's dtype (bf16 or f32 on a GPU).
pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    if let Some(gpu) = cuda_ops::device_of("scale", &[("x", x)])? {
        return cuda_ops::elementwise::scale(&gpu, x, s);
    }
    let mut out = x.clone();
    let y = out.as_mut_slice()?;
    let kernel = |y: &mut [f32]| y.iter_mut().for_each(|y| *y *= s);
    if y.len() < PAR_MIN {
        kernel(y);
    } else {
        y.par_chunks_mut(PAR_CHUNK).for_each(kernel);
    }
    Ok(out)
}

/// x in `dtype` on its device: on a GPU a bf16 copy (rounded to nearest even) or an f32 one
/// (exact), or x itself when it has that dtype. CPU tensors are always f32: `Bf16` rounds
/// their values to bf16 (what a GPU copy would hold) and keeps them in f32.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if let Some(gpu) = cuda_ops::device_of("cast", &[("x", x)])? {
        return cuda_ops::elementwise::cast(&gpu, x, dtype);
    }
    match dtype {
        DType::F32 => Ok(x.clone()),
        DType::Bf16 => {
            let mut out = x.clone();
            for v in out.as_mut_slice()? {
                *v = half::bf16::from_f32(*v).to_f32();
            }
            Ok(out)
        }
    }
}

/// Rows per block of [`sum_over_rows`]: fixed, so that the order of the additions (and so
/// every bit of the result) does not depend on the number of threads.
const ROWS_PER_BLOCK: usize = 32;

/// Σ over t in 0..rows of a [C] contribution that `add_row(t, acc)` adds into `acc`, in f64.
///
/// Blocks of rows are reduced in parallel and the block sums added in block order: a
/// parameter gradient summed over thousands of tokens comes out the same on every run and
/// every machine (training resumes exactly), and f64 keeps the long sum well inside f32
/// precision.
pub(crate) fn sum_over_rows(
    rows: usize,
    c: usize,
    add_row: impl Fn(usize, &mut [f64]) + Sync,
) -> Vec<f64> {
    let blocks: Vec<Vec<f64>> = (0..rows.div_ceil(ROWS_PER_BLOCK))
        .into_par_iter()
        .map(|block| {
            let mut acc = vec![0.0f64; c]; // [C]
            let start = block * ROWS_PER_BLOCK;
            for t in start..(start + ROWS_PER_BLOCK).min(rows) {
                add_row(t, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0.0f64; c]; // [C]
    for block in &blocks {
        total.iter_mut().zip(block).for_each(|(t, &b)| *t += b);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

    #[test]
    fn cast_on_the_cpu_rounds_to_bf16_values_or_copies() {
        // 1 + 2⁻⁸ is halfway between two bf16 values: nearest even rounds it down to 1;
        // 1 + 3·2⁻⁸ rounds up to 1 + 2⁻⁶.
        let x =
            Tensor::from_vec(vec![1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5, 0.1], &[4]).unwrap();
        let b = cast(&x, DType::Bf16).unwrap().to_vec().unwrap();
        assert_eq!(b[0], 1.0);
        assert_eq!(b[1], 1.0 + 4.0 / 256.0);
        assert_eq!(b[2], -2.5);
        // 0.1 = 0x3DCCCCCD: the low half 0xCCCD is above halfway, so it rounds up.
        assert_eq!(b[3].to_bits(), 0x3DCD_0000);
        assert_eq!(
            cast(&x, DType::F32).unwrap().to_vec().unwrap(),
            x.to_vec().unwrap()
        );
    }

    #[test]
    fn add_and_scale_match_a_plain_loop() {
        let mut rng = Rng::new(4);
        // One size below and one above the parallel threshold, neither a multiple of the chunk.
        for n in [7usize, PAR_MIN + 12_345] {
            let a = rng.vec(n, -1.0, 1.0);
            let b = rng.vec(n, -1.0, 1.0);
            let at = Tensor::from_vec(a.clone(), &[n]).unwrap();
            let bt = Tensor::from_vec(b.clone(), &[n]).unwrap();
            let sum = add(&at, &bt).unwrap();
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            assert_eq!(sum.as_slice().unwrap(), want.as_slice());
            // `add` must not touch its input (the storage is shared until written).
            assert_eq!(at.as_slice().unwrap(), a.as_slice());
            let mut acc = at.clone();
            add_inplace(&mut acc, &bt).unwrap();
            assert_eq!(acc.as_slice().unwrap(), want.as_slice());
            let scaled = scale(&at, -0.37).unwrap();
            let want: Vec<f32> = a.iter().map(|x| x * -0.37).collect();
            assert_eq!(scaled.as_slice().unwrap(), want.as_slice());
        }
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let a = Tensor::zeros(&[2, 3]);
        let b = Tensor::zeros(&[3, 2]);
        assert!(matches!(add(&a, &b), Err(EngineError::Shape { .. })));
        let mut a = a;
        assert!(matches!(
            add_inplace(&mut a, &b),
            Err(EngineError::Shape { .. })
        ));
    }

    #[test]
    fn sum_over_rows_matches_a_loop_whatever_the_thread_count() {
        let mut rng = Rng::new(24);
        // Rows not a multiple of the block, and fewer rows than one block.
        for (rows, c) in [(0usize, 3usize), (5, 4), (3 * ROWS_PER_BLOCK + 7, 11)] {
            let x = rng.vec(rows * c, -1.0, 1.0);
            let add_row = |t: usize, acc: &mut [f64]| {
                for (a, &v) in acc.iter_mut().zip(&x[t * c..(t + 1) * c]) {
                    *a += v as f64;
                }
            };
            let got = sum_over_rows(rows, c, add_row);
            // A plain loop in f64; the two orders differ by a few f64 ulps at most.
            let mut want = vec![0.0f64; c];
            for row in x.chunks(c.max(1)) {
                for (w, &v) in want.iter_mut().zip(row) {
                    *w += v as f64;
                }
            }
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-12, "{g} vs {w}");
            }
            // One thread gives the same bits as the default pool.
            let single = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| sum_over_rows(rows, c, add_row));
            assert_eq!(single, got);
        }
    }
}
