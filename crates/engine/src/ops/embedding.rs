//! Token embedding lookup, and its backward (a scatter-add into the table's gradient).
use rayon::prelude::*;

use crate::cuda::ops as cuda_ops;
use crate::{EngineError, Indices, Result, Tensor};

/// table: [V, C], ids: [T] → [T, C], each row multiplied by `scale` (Gemma: sqrt(C); else 1).
/// An id ≥ V is an [`crate::EngineError::Index`] error.
///
/// HF computes Gemma's scale in the model dtype; a caller matching a bf16 model passes the
/// bf16-rounded value.
pub fn embedding(table: &Tensor, ids: &[u32], scale: f32) -> Result<Tensor> {
    if table.device() != crate::Device::Cpu {
        return embedding_indices(table, &Indices::from(ids), scale);
    }
    embedding_cpu(table, ids, scale)
}

/// [`embedding`] with ids whose device copy may already be on the table's GPU (staged, or
/// shared by several calls).
pub fn embedding_indices(table: &Tensor, ids: &Indices, scale: f32) -> Result<Tensor> {
    if let Some(gpu) = cuda_ops::device_of("embedding", &[("table", table)])? {
        return cuda_ops::embedding::embedding(&gpu, table, ids, scale);
    }
    embedding_cpu(table, ids, scale)
}

fn embedding_cpu(table: &Tensor, ids: &[u32], scale: f32) -> Result<Tensor> {
    const OP: &str = "embedding";
    let [v, c] = table.dims(OP, "table: [V, C]")?;
    let table = table.as_slice()?;
    let mut out = Vec::with_capacity(ids.len() * c); // [T, C]
    for &id in ids {
        let id = id as usize;
        if id >= v {
            return Err(EngineError::Index {
                op: OP,
                index: id,
                limit: v,
            });
        }
        let row = &table[id * c..(id + 1) * c];
        if scale == 1.0 {
            out.extend_from_slice(row);
        } else {
            out.extend(row.iter().map(|&e| e * scale));
        }
    }
    Tensor::from_vec(out, &[ids.len(), c])
}

/// The gradient of [`embedding`] w.r.t. its table: ids: [T], dy: [T, C] → d_table: [V, C]
/// (assigned; V = `rows`), `d_table[v] = scale · Σ_{t: ids[t] = v} dy[t]`. Repeated ids
/// accumulate; rows no id names stay zero. An id ≥ V is an error naming its position.
///
/// The positions are bucketed by id first (a counting sort keeps them in order), so each
/// table row is summed by one task in position order: parallel over rows, and the same bits
/// whatever the thread count. On the CPU the sums are f64; on a GPU dy is bf16, d_table f32,
/// and each (row, column) is summed in f32 by one thread — deterministic too (no atomics).
pub fn embedding_backward(ids: &[u32], dy: &Tensor, rows: usize, scale: f32) -> Result<Tensor> {
    const OP: &str = "embedding_backward";
    let [t, c] = dy.dims(OP, "dy: [T, C]")?;
    if ids.len() != t {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("dy: [T, C] with T = {} (one row per id)", ids.len()),
            got: dy.shape().to_vec(),
        });
    }
    let buckets = IdBuckets::new(OP, ids, rows)?;
    if let Some(gpu) = cuda_ops::device_of(OP, &[("dy", dy)])? {
        return cuda_ops::embedding::embedding_backward(&gpu, &buckets, dy, rows, scale);
    }
    let IdBuckets { starts, order } = &buckets;
    let dy = dy.as_slice()?;
    let mut d_table = vec![0.0f32; rows * c]; // [V, C]
    if c > 0 {
        d_table
            .par_chunks_mut(c)
            .enumerate()
            .with_min_len(64)
            .for_each_init(
                || vec![0.0f64; c],
                |acc, (v, out)| {
                    let bucket = &order[starts[v]..starts[v + 1]];
                    if bucket.is_empty() {
                        return;
                    }
                    acc.fill(0.0);
                    for &pos in bucket {
                        for (a, &g) in acc.iter_mut().zip(&dy[pos * c..(pos + 1) * c]) {
                            *a += g as f64;
                        }
                    }
                    for (o, &a) in out.iter_mut().zip(acc.iter()) {
                        *o = (a * scale as f64) as f32;
                    }
                },
            );
    }
    Tensor::from_vec(d_table, &[rows, c])
}

/// Token positions grouped by id (a counting sort, positions in increasing order within
/// each id): what both devices' [`embedding_backward`] sum over.
#[derive(Clone, Debug)]
pub(crate) struct IdBuckets {
    /// starts[v]..starts[v + 1] is id v's range in `order`; [V + 1].
    pub starts: Vec<usize>,
    /// Positions 0..T grouped by id; [T].
    pub order: Vec<usize>,
}

impl IdBuckets {
    /// Buckets `ids` for a table of `rows` rows; an id ≥ rows is an error naming its position.
    fn new(op: &'static str, ids: &[u32], rows: usize) -> Result<IdBuckets> {
        let mut starts = vec![0usize; rows + 1]; // [V + 1]
        for (pos, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= rows {
                return Err(EngineError::Arg {
                    op,
                    msg: format!("ids[{pos}] = {id} is out of range for a table of {rows} rows"),
                });
            }
            starts[id + 1] += 1;
        }
        for v in 0..rows {
            starts[v + 1] += starts[v];
        }
        let mut order = vec![0usize; ids.len()]; // [T]
        let mut next = starts.clone();
        for (pos, &id) in ids.iter().enumerate() {
            order[next[id as usize]] = pos;
            next[id as usize] += 1;
        }
        Ok(IdBuckets { starts, order })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::grad_check::{dot, numeric_grad, widen};
    use crate::test_util::{Rng, assert_close};

    /// The lookup in f64: row ids[t] of table: [V, C], times scale. The reference of the
    /// forward and, through finite differences, of the backward.
    fn naive(table: &[f64], ids: &[u32], c: usize, scale: f64) -> Vec<f64> {
        let mut y = Vec::with_capacity(ids.len() * c);
        for &id in ids {
            for j in 0..c {
                y.push(table[id as usize * c + j] * scale);
            }
        }
        y
    }

    #[test]
    fn gathers_and_scales_rows() {
        let mut rng = Rng::new(2);
        let (v, c) = (11, 7);
        let table = rng.vec(v * c, -2.0, 2.0);
        let t = Tensor::from_vec(table.clone(), &[v, c]).unwrap();
        let ids = [3u32, 0, 10, 3, 5];
        for scale in [1.0f32, 2.645_751_3] {
            let y = embedding(&t, &ids, scale).unwrap();
            assert_eq!(y.shape(), &[ids.len(), c]);
            let y = y.as_slice().unwrap();
            for (r, &id) in ids.iter().enumerate() {
                for j in 0..c {
                    // One f32 multiply per element: exactly what HF's `embeds * normalizer` does.
                    assert_eq!(y[r * c + j], table[id as usize * c + j] * scale);
                }
            }
        }
    }

    #[test]
    fn empty_ids_give_empty_output() {
        let t = Tensor::zeros(&[4, 3]);
        assert_eq!(embedding(&t, &[], 1.0).unwrap().shape(), &[0, 3]);
    }

    #[test]
    fn out_of_range_id_is_an_index_error() {
        let t = Tensor::zeros(&[4, 3]);
        match embedding(&t, &[1, 4], 1.0) {
            Err(EngineError::Index { index, limit, .. }) => assert_eq!((index, limit), (4, 4)),
            other => panic!("expected an index error, got {other:?}"),
        }
        let bad = Tensor::zeros(&[12]);
        assert!(matches!(
            embedding(&bad, &[0], 1.0),
            Err(EngineError::Shape { .. })
        ));
    }

    #[test]
    fn forward_matches_f64_reference() {
        let mut rng = Rng::new(35);
        let (v, c) = (13, 9);
        let table = rng.vec(v * c, -2.0, 2.0);
        let ids: Vec<u32> = (0..21).map(|_| rng.below(v) as u32).collect();
        let t = Tensor::from_vec(table.clone(), &[v, c]).unwrap();
        for scale in [1.0f32, 2.645_751_3] {
            let y = embedding(&t, &ids, scale).unwrap();
            let want = naive(&widen(&table), &ids, c, scale as f64);
            // One f32 rounding of the product.
            assert_close("embedding", y.as_slice().unwrap(), &want, 0.0, 6e-8);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(36);
        // Repeated ids, unused rows, a single row; T and C not multiples of 8.
        for (v, c, ids) in [
            (1usize, 1usize, vec![0u32]),
            (5, 3, vec![4, 1, 4, 0, 4, 1, 2]),
            (11, 7, (0..13).map(|_| rng.below(6) as u32 * 2).collect()),
        ] {
            let table = widen(&rng.vec(v * c, -2.0, 2.0));
            let dy = rng.vec(ids.len() * c, -1.0, 1.0);
            let dyt = Tensor::from_vec(dy.clone(), &[ids.len(), c]).unwrap();
            for scale in [1.0f32, 2.645_751_3] {
                let d_table = embedding_backward(&ids, &dyt, v, scale).unwrap();
                assert_eq!(d_table.shape(), &[v, c]);
                let want = numeric_grad(&table, 1e-5, |tb| {
                    dot(&dy, &naive(tb, &ids, c, scale as f64))
                });
                // An f64 sum of at most 4 terms rounded once; the map is linear, so the
                // differences are exact up to f64 rounding.
                assert_close("d_table", d_table.as_slice().unwrap(), &want, 1e-6, 1e-6);
            }
        }
    }

    #[test]
    fn backward_scatter_adds_many_ids_over_a_large_table() {
        // Enough rows for many rayon jobs, most of them empty; ids heavily repeated.
        let mut rng = Rng::new(37);
        let (v, c, t) = (3001, 5, 700);
        let ids: Vec<u32> = (0..t).map(|_| rng.below(40) as u32 * 75).collect();
        let dy = rng.vec(t * c, -1.0, 1.0);
        let d_table = embedding_backward(
            &ids,
            &Tensor::from_vec(dy.clone(), &[t, c]).unwrap(),
            v,
            0.5,
        )
        .unwrap();
        let mut want = vec![0.0f64; v * c];
        for (pos, &id) in ids.iter().enumerate() {
            for j in 0..c {
                want[id as usize * c + j] += 0.5 * dy[pos * c + j] as f64;
            }
        }
        assert_close("d_table", d_table.as_slice().unwrap(), &want, 1e-6, 1e-6);
    }

    #[test]
    fn backward_bad_inputs_are_errors() {
        let dy = Tensor::zeros(&[3, 2]);
        match embedding_backward(&[0, 1, 4], &dy, 4, 1.0) {
            Err(EngineError::Arg { msg, .. }) => {
                assert!(
                    msg.contains("ids[2] = 4") && msg.contains("4 rows"),
                    "{msg}"
                )
            }
            other => panic!("expected an argument error, got {other:?}"),
        }
        assert!(matches!(
            embedding_backward(&[0, 1], &dy, 4, 1.0),
            Err(EngineError::Shape { .. })
        ));
        assert!(matches!(
            embedding_backward(&[0, 1, 2], &Tensor::zeros(&[6]), 4, 1.0),
            Err(EngineError::Shape { .. })
        ));
        // No ids: a zero gradient of the table's shape.
        let empty = embedding_backward(&[], &Tensor::zeros(&[0, 2]), 3, 1.0).unwrap();
        assert_eq!(empty.as_slice().unwrap(), &[0.0; 6]);
    }
}
