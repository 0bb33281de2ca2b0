//! Every token of a few chosen rows whose logit reaches a threshold, in id order, with its
//! logit: what the sampler needs when a row's top-k candidates tie at the cut.
//!
//! vLLM's top_k keeps every token tied with the k-th largest logit, so a row whose (k+1)-th
//! candidate ties the k-th may keep more tokens than any fixed k reports. Those tokens are
//! exactly the ones at or above a threshold the sampler knows (the k-th value), and there
//! are usually few of them: this op returns them, up to `cap` per row, instead of the whole
//! [B, V] row set crossing to the host.
//!
//! The comparison is `logit ≥ threshold` on the f32 values as stored: exact, no tolerance,
//! the same values `top_k_candidates` ranked. A NaN logit never qualifies (every comparison
//! with NaN is false), so a NaN threshold selects nothing and a −inf threshold selects every
//! non-NaN token. A row with more than `cap` qualifying tokens gives `None`, so the caller
//! takes the whole row instead (the kernel stops reading such a row early).
//!
//! The CPU reference is a filter over each row; the CUDA kernel (kernels/top_k.cu,
//! `logits_at_least_f32`) compacts each row block-wide, tile by tile, which keeps id order.

use rayon::prelude::*;

use crate::cuda::ops as cuda_ops;
use crate::{EngineError, Result, Tensor};

/// One row's qualifying tokens: (token id, logit), ids ascending.
pub type RowTokens = Vec<(u32, f32)>;

/// logits: [B, V] f32; for each `rows[j]` (an index into B, any order, repeats allowed) the
/// tokens whose logit ≥ `thresholds[j]`, in id order — `None` for a row with more than `cap`.
pub fn logits_at_least(
    logits: &Tensor,
    rows: &[usize],     // [N]
    thresholds: &[f32], // [N]
    cap: usize,
) -> Result<Vec<Option<RowTokens>>> {
    const OP: &str = "logits_at_least";
    let [b, v] = logits.dims(OP, "logits: [B, V]")?;
    check_args(OP, b, v, rows, thresholds)?;
    if let Some(gpu) = cuda_ops::device_of(OP, &[("logits", logits)])? {
        return cuda_ops::logits_at_least::logits_at_least(
            &gpu, logits, b, v, rows, thresholds, cap,
        );
    }
    let data = logits.as_slice()?;
    Ok(rows
        .par_iter()
        .zip(thresholds.par_iter())
        .map(|(&r, &t)| row_at_least(&data[r * v..(r + 1) * v], t, cap))
        .collect())
}

/// One list entry per row, each row inside the batch, and ids that fit the kernel's u32.
fn check_args(
    op: &'static str,
    b: usize,
    v: usize,
    rows: &[usize],
    thresholds: &[f32],
) -> Result<()> {
    let arg = |msg: String| Err(EngineError::Arg { op, msg });
    if rows.len() != thresholds.len() {
        return arg(format!(
            "{} rows but {} thresholds: expected one threshold per row",
            rows.len(),
            thresholds.len()
        ));
    }
    if let Some((j, &r)) = rows.iter().enumerate().find(|&(_, &r)| r >= b) {
        return arg(format!("rows[{j}] = {r}: expected a row below B = {b}"));
    }
    if v >= u32::MAX as usize {
        return arg(format!(
            "V = {v} does not fit the kernel's 32-bit token ids"
        ));
    }
    Ok(())
}

/// The tokens of `row` with logit ≥ `t`, or None past `cap` of them.
fn row_at_least(row: &[f32], t: f32, cap: usize) -> Option<RowTokens> {
    let mut out = Vec::new();
    for (i, &x) in row.iter().enumerate() {
        if x >= t {
            if out.len() == cap {
                return None;
            }
            out.push((i as u32, x));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

    /// The definition, written out apart from the op: count first, then collect.
    fn naive(row: &[f32], t: f32, cap: usize) -> Option<RowTokens> {
        let hits: RowTokens = (0..row.len())
            .filter(|&i| !row[i].is_nan() && !t.is_nan() && row[i] >= t)
            .map(|i| (i as u32, row[i]))
            .collect();
        (hits.len() <= cap).then_some(hits)
    }

    #[test]
    fn matches_the_definition_on_rows_with_ties() {
        let mut rng = Rng::new(5);
        for case in 0..80 {
            // Vocabularies that are not multiples of a block or a warp, and tiny ones.
            let (b, v) = (1 + rng.below(6), 1 + rng.below(3000));
            let distinct = [2usize, 9, 1 << 20][case % 3];
            let data: Vec<f32> = (0..b * v)
                .map(|_| rng.below(distinct) as f32 / distinct as f32 * 10.0 - 5.0)
                .collect();
            let n = rng.below(2 * b + 1);
            let rows: Vec<usize> = (0..n).map(|_| rng.below(b)).collect();
            // Thresholds at values present in the row (ties), between values, at the ends.
            let thresholds: Vec<f32> = rows
                .iter()
                .map(|&r| match rng.below(4) {
                    0 => data[r * v + rng.below(v)],
                    1 => rng.uniform(-6.0, 6.0),
                    2 => f32::NEG_INFINITY,
                    _ => 5.0,
                })
                .collect();
            let cap = [0usize, 1, 7, 100, 5000][case % 5];
            let t = Tensor::from_vec(data.clone(), &[b, v]).unwrap();
            let got = logits_at_least(&t, &rows, &thresholds, cap).unwrap();
            assert_eq!(got.len(), n);
            for (j, (&r, &th)) in rows.iter().zip(&thresholds).enumerate() {
                let want = naive(&data[r * v..(r + 1) * v], th, cap);
                assert_eq!(got[j], want, "case {case} entry {j} (row {r}, t {th})");
            }
        }
    }

    #[test]
    fn infinities_nan_and_signed_zeros() {
        let (ninf, inf, nan) = (f32::NEG_INFINITY, f32::INFINITY, f32::NAN);
        let data = vec![
            ninf, 1.0, nan, 1.0, -0.0, // row 0
            0.0, inf, ninf, nan, -2.0, // row 1
        ];
        let t = Tensor::from_vec(data, &[2, 5]).unwrap();
        let ask = |rows: &[usize], th: &[f32], cap| logits_at_least(&t, rows, th, cap).unwrap();
        // NaN never qualifies; −inf qualifies at a −inf threshold; −0.0 ≥ 0.0.
        assert_eq!(
            ask(&[0], &[ninf], 10),
            vec![Some(vec![(0, ninf), (1, 1.0), (3, 1.0), (4, -0.0)])]
        );
        assert_eq!(
            ask(&[1, 0], &[0.0, 1.0], 10),
            vec![
                Some(vec![(0, 0.0), (1, inf)]),
                Some(vec![(1, 1.0), (3, 1.0)])
            ]
        );
        // A NaN threshold selects nothing; +inf selects only +inf.
        assert_eq!(
            ask(&[0, 1], &[nan, inf], 10),
            vec![Some(vec![]), Some(vec![(1, inf)])]
        );
        // Over the cap: None; exactly at it: all of them.
        assert_eq!(
            ask(&[0, 0], &[ninf, 1.0], 2),
            vec![None, Some(vec![(1, 1.0), (3, 1.0)])]
        );
        assert_eq!(ask(&[], &[], 2), vec![]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let t = Tensor::zeros(&[2, 5]);
        let e = logits_at_least(&t, &[0, 2], &[0.0, 0.0], 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rows[1] = 2") && e.contains("B = 2"), "{e}");
        let e = logits_at_least(&t, &[0], &[0.0, 1.0], 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 rows but 2 thresholds"), "{e}");
        assert!(logits_at_least(&Tensor::zeros(&[5]), &[0], &[0.0], 4).is_err());
    }
}
