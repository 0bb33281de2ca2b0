//! Token embedding lookup.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

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
}
