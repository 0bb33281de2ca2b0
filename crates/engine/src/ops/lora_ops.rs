//! The ops LoRA needs around the decoder's GEMMs: a module's column slice of a stacked
//! projection ([`columns`]) and the add of its delta back into it ([`add_into_columns`]),
//! [`transpose`] (the embedding pair's A is stored [R, V] as PEFT stores it), and
//! counter-based dropout ([`dropout_mask`], [`apply_dropout`], [`apply_dropout_backward`]).
//!
//! ## Dropout masks
//! A mask is a pure function of its [`DropoutKey`] (seed, step, layer, module) and the
//! element's row-major index: recomputing a layer in backward (gradient checkpointing) sees
//! the same mask without storing it, a resumed run draws the same masks as an uninterrupted
//! one, and the CPU and the GPU produce the same bits. With SplitMix64's finaliser
//! [`dropout_hash`] as `mix`:
//!
//! ```text
//! stream = mix(mix(mix(mix(seed) ^ step) ^ layer) ^ module)     (layer: 0xFFFF for none)
//! m_i    = 1 / (1 − p)  if mix(stream ^ i) ≥ ⌊p · 2⁶⁴⌋,  else 0
//! ```
//!
//! — exactly the masks the model crate's LoRA drew on the CPU before this op existed. They
//! cannot match torch's generator bit for bit; the distribution is the same (keep with
//! probability 1 − p, scale by 1 / (1 − p)).
//!
//! ## Devices and dtypes
//! Every op runs on the CPU (f32) and on a GPU, for bf16 and f32 tensors alike; an output
//! has its input's dtype, except [`dropout_mask`], which is f32 on both devices.
use rayon::prelude::*;

use crate::cuda::ops as cuda_ops;
use crate::{Device, EngineError, Result, Tensor};

/// Below this many elements a loop on one thread beats rayon's fork/join.
const PAR_MIN: usize = 1 << 15;
/// Elements per rayon task.
const PAR_CHUNK: usize = 1 << 13;

/// The `layer` value of the key of a module outside the decoder layers (the LM head).
const NO_LAYER: u64 = 0xFFFF;

/// Identifies one dropout mask: the probability of dropping an element and the coordinates
/// that make the mask unique (run seed, optimizer step, decoder layer, module).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutKey {
    /// Probability of dropping an element, in [0, 1).
    pub p: f32,
    pub seed: u64,
    pub step: u64,
    /// The decoder layer, or None for a module outside the layers (the LM head).
    pub layer: Option<usize>,
    /// Which module of the layer (the model crate numbers its LoRA targets).
    pub module: u64,
}

impl DropoutKey {
    /// The per-mask stream the element hashes start from:
    /// mix(mix(mix(mix(seed) ^ step) ^ layer) ^ module).
    pub fn stream(&self) -> u64 {
        let layer = self.layer.map_or(NO_LAYER, |l| l as u64);
        dropout_hash(
            dropout_hash(dropout_hash(dropout_hash(self.seed) ^ self.step) ^ layer) ^ self.module,
        )
    }

    /// ⌊p · 2⁶⁴⌋: an element is kept when its hash is at or above this.
    pub fn threshold(&self) -> u64 {
        // p < 1 (checked), so the product is below 2⁶⁴ and the cast does not saturate.
        (self.p as f64 * 18_446_744_073_709_551_616.0) as u64
    }

    /// The multiplier of a kept element, 1 / (1 − p) in f32.
    pub fn keep_scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// The multiplier of element `i` (row-major) of the mask.
    pub fn multiplier(&self, i: u64) -> f32 {
        multiplier(self.stream(), self.threshold(), self.keep_scale(), i)
    }

    /// p must be a probability below 1 (p = 1 would scale the kept nothing by infinity).
    fn check(&self, op: &'static str) -> Result<()> {
        if !(0.0..1.0).contains(&self.p) {
            return Err(EngineError::Arg {
                op,
                msg: format!("dropout probability p = {} must be in [0, 1)", self.p),
            });
        }
        Ok(())
    }
}

/// SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijective mix with good avalanche,
/// used as a counter-based generator. kernels/lora.cu has the same function.
pub fn dropout_hash(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn multiplier(stream: u64, cut: u64, keep: f32, i: u64) -> f32 {
    if dropout_hash(stream ^ i) >= cut {
        keep
    } else {
        0.0
    }
}

/// The multipliers of a [rows, cols] mask for `key` (each 0 or 1 / (1 − p)), as an f32
/// tensor on `device`: the same bits on every device.
pub fn dropout_mask(key: &DropoutKey, rows: usize, cols: usize, device: Device) -> Result<Tensor> {
    const OP: &str = "dropout_mask";
    key.check(OP)?;
    if let Device::Cuda(ordinal) = device {
        let backend = crate::cuda::CudaBackend::get(ordinal)?;
        return cuda_ops::lora_ops::dropout_mask(&backend, key, rows, cols);
    }
    let (stream, cut, keep) = (key.stream(), key.threshold(), key.keep_scale());
    let mut out = vec![0.0f32; rows * cols]; // [rows, cols]
    let fill = |start: usize, chunk: &mut [f32]| {
        for (j, m) in chunk.iter_mut().enumerate() {
            *m = multiplier(stream, cut, keep, (start + j) as u64);
        }
    };
    if out.len() < PAR_MIN {
        fill(0, &mut out);
    } else {
        out.par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| fill(c * PAR_CHUNK, chunk));
    }
    Tensor::from_vec(out, &[rows, cols])
}

/// x ∘ mask(key): each element of x (in row-major order, whatever x's shape) times its
/// multiplier, in x's dtype (on a GPU the mask is computed in the kernel, never stored).
pub fn apply_dropout(x: &Tensor, key: &DropoutKey) -> Result<Tensor> {
    dropout_op("apply_dropout", x, key)
}

/// The gradient of [`apply_dropout`]: dy ∘ mask(key), the same multiply (the mask is a
/// constant of the forward). dy has x's shape; the result is assigned, in dy's dtype.
pub fn apply_dropout_backward(dy: &Tensor, key: &DropoutKey) -> Result<Tensor> {
    dropout_op("apply_dropout_backward", dy, key)
}

fn dropout_op(op: &'static str, x: &Tensor, key: &DropoutKey) -> Result<Tensor> {
    key.check(op)?;
    if let Some(gpu) = cuda_ops::device_of(op, &[("x", x)])? {
        return cuda_ops::lora_ops::apply_dropout(&gpu, op, x, key);
    }
    let (stream, cut, keep) = (key.stream(), key.threshold(), key.keep_scale());
    let mut out = x.clone();
    let y = out.as_mut_slice()?;
    // A multiply, not a select: 0 · inf is NaN here as on the GPU.
    let run = |start: usize, chunk: &mut [f32]| {
        for (j, v) in chunk.iter_mut().enumerate() {
            *v *= multiplier(stream, cut, keep, (start + j) as u64);
        }
    };
    if y.len() < PAR_MIN {
        run(0, y);
    } else {
        y.par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| run(c * PAR_CHUNK, chunk));
    }
    Ok(out)
}

/// col0 + n ≤ width, or an error naming the op and the range.
fn check_column_range(
    op: &'static str,
    shape: &[usize],
    col0: usize,
    n: usize,
    width: usize,
) -> Result<()> {
    if col0.checked_add(n).is_none_or(|end| end > width) {
        return Err(EngineError::Arg {
            op,
            msg: format!(
                "columns {col0}..{} do not fit a tensor of shape {shape:?}",
                col0.saturating_add(n)
            ),
        });
    }
    Ok(())
}

/// Columns col0..col0 + n of x: [T, N] → [T, n] (a strided copy, in x's dtype).
pub fn columns(x: &Tensor, col0: usize, n: usize) -> Result<Tensor> {
    const OP: &str = "columns";
    let [t, width] = x.dims(OP, "x: [T, N]")?;
    check_column_range(OP, x.shape(), col0, n, width)?;
    if let Some(gpu) = cuda_ops::device_of(OP, &[("x", x)])? {
        return cuda_ops::lora_ops::columns(&gpu, x, col0, n);
    }
    let x = x.as_slice()?;
    let mut out = Vec::with_capacity(t * n); // [T, n]
    if n > 0 {
        for row in x.chunks_exact(width) {
            out.extend_from_slice(&row[col0..col0 + n]);
        }
    }
    Tensor::from_vec(out, &[t, n])
}

/// y[:, col0..col0 + n] += delta, in place; y: [T, N], delta: [T, n] (one dtype on a GPU).
pub fn add_into_columns(y: &mut Tensor, col0: usize, delta: &Tensor) -> Result<()> {
    const OP: &str = "add_into_columns";
    let [t, width] = y.dims(OP, "y: [T, N]")?;
    let [_, n] = delta.dims(OP, "delta: [T, n]")?;
    delta.expect_shape(OP, &[t, n])?;
    check_column_range(OP, y.shape(), col0, n, width)?;
    if let Some(gpu) = cuda_ops::device_of(OP, &[("y", y), ("delta", delta)])? {
        return cuda_ops::lora_ops::add_into_columns(&gpu, y, col0, delta);
    }
    if t * n == 0 {
        return Ok(());
    }
    let delta = delta.as_slice()?;
    let y = y.as_mut_slice()?;
    let add_rows = |rows: &mut [f32], deltas: &[f32]| {
        for (row, d) in rows.chunks_exact_mut(width).zip(deltas.chunks_exact(n)) {
            for (v, &d) in row[col0..col0 + n].iter_mut().zip(d) {
                *v += d;
            }
        }
    };
    if y.len() < PAR_MIN {
        add_rows(y, delta);
    } else {
        let rows_per_task = (PAR_CHUNK / width).max(1);
        y.par_chunks_mut(rows_per_task * width)
            .zip(delta.par_chunks(rows_per_task * n))
            .for_each(|(rows, deltas)| add_rows(rows, deltas));
    }
    Ok(())
}

/// x: [R, N] → [N, R] (in x's dtype).
pub fn transpose(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "transpose";
    let [r, n] = x.dims(OP, "x: [R, N]")?;
    if let Some(gpu) = cuda_ops::device_of(OP, &[("x", x)])? {
        return cuda_ops::lora_ops::transpose(&gpu, x);
    }
    let src = x.as_slice()?;
    let mut out = vec![0.0f32; r * n]; // [N, R]
    if r > 0 && n > 0 {
        // Output row j gathers column j of x.
        out.par_chunks_mut(r)
            .enumerate()
            .with_min_len((PAR_CHUNK / r).max(1))
            .for_each(|(j, row)| {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = src[i * n + j];
                }
            });
    }
    Tensor::from_vec(out, &[n, r])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

    fn tensor(data: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(data, shape).unwrap()
    }

    #[test]
    fn columns_copies_the_range_of_every_row() {
        let mut rng = Rng::new(40);
        // Enough rows for the parallel paths, a single row, and empty ranges.
        for (t, width, col0, n) in [
            (1, 1, 0, 1),
            (3, 10, 2, 5),
            (5, 10, 10, 0),
            (0, 4, 1, 2),
            (1000, 77, 30, 47),
        ] {
            let x = rng.vec(t * width, -1.0, 1.0);
            let got = columns(&tensor(x.clone(), &[t, width]), col0, n).unwrap();
            assert_eq!(got.shape(), &[t, n]);
            let got = got.as_slice().unwrap();
            for r in 0..t {
                for j in 0..n {
                    assert_eq!(got[r * n + j], x[r * width + col0 + j], "({r}, {j})");
                }
            }
        }
    }

    #[test]
    fn add_into_columns_adds_only_inside_the_range() {
        let mut rng = Rng::new(41);
        // Past the parallel threshold (1000 × 77), and small ones; an empty delta.
        for (t, width, col0, n) in [(1, 1, 0, 1), (4, 9, 3, 4), (3, 6, 6, 0), (1000, 77, 13, 50)] {
            let y0 = rng.vec(t * width, -1.0, 1.0);
            let delta = rng.vec(t * n, -1.0, 1.0);
            let mut y = tensor(y0.clone(), &[t, width]);
            let shared = y.clone();
            add_into_columns(&mut y, col0, &tensor(delta.clone(), &[t, n])).unwrap();
            let got = y.as_slice().unwrap();
            for r in 0..t {
                for c in 0..width {
                    let mut want = y0[r * width + c];
                    if (col0..col0 + n).contains(&c) {
                        want += delta[r * n + c - col0];
                    }
                    assert_eq!(got[r * width + c], want, "({r}, {c})");
                }
            }
            // Copy-on-write: a clone taken before keeps its values.
            assert_eq!(shared.as_slice().unwrap(), y0.as_slice());
        }
    }

    #[test]
    fn transpose_moves_every_element() {
        let mut rng = Rng::new(42);
        for (r, n) in [
            (1, 1),
            (1, 7),
            (7, 1),
            (16, 33),
            (3, 20_000),
            (0, 5),
            (5, 0),
        ] {
            let x = rng.vec(r * n, -1.0, 1.0);
            let got = transpose(&tensor(x.clone(), &[r, n])).unwrap();
            assert_eq!(got.shape(), &[n, r]);
            let got = got.as_slice().unwrap();
            for i in 0..r {
                for j in 0..n {
                    assert_eq!(got[j * r + i], x[i * n + j], "({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn column_ops_refuse_ranges_and_shapes_that_do_not_fit() {
        let x = Tensor::zeros(&[2, 5]);
        for (col0, n) in [(4, 2), (6, 0), (usize::MAX, 2)] {
            match columns(&x, col0, n) {
                Err(EngineError::Arg { msg, .. }) => assert!(msg.contains("[2, 5]"), "{msg}"),
                other => panic!("columns({col0}, {n}): {other:?}"),
            }
        }
        let mut y = Tensor::zeros(&[2, 5]);
        assert!(matches!(
            add_into_columns(&mut y, 3, &Tensor::zeros(&[2, 3])),
            Err(EngineError::Arg { .. })
        ));
        assert!(matches!(
            add_into_columns(&mut y, 0, &Tensor::zeros(&[3, 2])),
            Err(EngineError::Shape { .. })
        ));
        assert!(matches!(
            add_into_columns(&mut y, 0, &Tensor::zeros(&[4])),
            Err(EngineError::Shape { .. })
        ));
        assert!(matches!(
            columns(&Tensor::zeros(&[10]), 0, 1),
            Err(EngineError::Shape { .. })
        ));
        assert!(matches!(
            transpose(&Tensor::zeros(&[2, 2, 2])),
            Err(EngineError::Shape { .. })
        ));
    }

    /// SplitMix64 written out independently of [`dropout_hash`], as a generator: the state
    /// advances by the golden gamma and each output is the finaliser of the new state, so
    /// `mix(s)` is the first output of a generator seeded with `s`.
    fn splitmix_first(seed: u64) -> u64 {
        let s = seed.wrapping_add(0x9e3779b97f4a7c15);
        let a = (s ^ (s >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        let b = (a ^ (a >> 27)).wrapping_mul(0x94d049bb133111eb);
        b ^ (b >> 31)
    }

    #[test]
    fn dropout_hash_is_splitmix64() {
        // The published test vector of SplitMix64 for seed 1234567 (Vigna's splitmix64.c,
        // also Java's SplittableRandom): outputs k = 1.. are mix(seed + (k − 1)·γ).
        let gamma = 0x9E37_79B9_7F4A_7C15u64;
        let want = [
            6_457_827_717_110_365_317u64,
            3_203_168_211_198_807_973,
            9_817_491_932_198_370_423,
            4_593_380_528_125_082_431,
            16_408_922_859_458_223_821,
        ];
        for (k, &w) in want.iter().enumerate() {
            let state = 1_234_567u64.wrapping_add(gamma.wrapping_mul(k as u64));
            assert_eq!(dropout_hash(state), w, "output {k}");
        }
        let mut rng = Rng::new(43);
        for _ in 0..1000 {
            let z = rng.next_u64();
            assert_eq!(dropout_hash(z), splitmix_first(z));
        }
    }

    /// The model crate's mask (crates/model/src/lora.rs `Dropout::mask`) written out again
    /// from its formula: a key chain of four mixes, then one mix per element.
    fn model_mask(
        p: f32,
        seed: u64,
        step: u64,
        layer: Option<usize>,
        target: u64,
        n: usize,
    ) -> Vec<f32> {
        let keep = 1.0 / (1.0 - p);
        let cut = (p as f64 * 2f64.powi(64)) as u64;
        let layer = match layer {
            Some(l) => l as u64,
            None => 0xFFFF,
        };
        let mut module = splitmix_first(seed);
        module = splitmix_first(module ^ step);
        module = splitmix_first(module ^ layer);
        module = splitmix_first(module ^ target);
        (0..n)
            .map(|i| {
                if splitmix_first(module ^ i as u64) >= cut {
                    keep
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn dropout_mask_is_the_model_crates_mask() {
        let keys = [
            (0.05f32, 42u64, 0u64, Some(0usize), 1u64),
            (0.05, 42, 7, Some(3), 6),
            (0.1, 0, 123_456, None, 8),
            (0.5, u64::MAX, 1, Some(41), 4),
            (0.0, 9, 9, Some(9), 2),
        ];
        for (p, seed, step, layer, module) in keys {
            let key = DropoutKey {
                p,
                seed,
                step,
                layer,
                module,
            };
            let (rows, cols) = (37, 1001); // past the parallel threshold, odd sizes
            let got = dropout_mask(&key, rows, cols, Device::Cpu).unwrap();
            assert_eq!(got.shape(), &[rows, cols]);
            let want = model_mask(p, seed, step, layer, module, rows * cols);
            assert_eq!(got.as_slice().unwrap(), want.as_slice(), "{key:?}");
            for i in [0u64, 1, 999, 37 * 1001 - 1] {
                assert_eq!(key.multiplier(i), want[i as usize]);
            }
        }
    }

    #[test]
    fn dropout_mask_values_from_the_model_crate() {
        // The first multipliers of two masks as the model crate's `Dropout::mask` drew them
        // (its code run on its own in a scratch program): o_proj (LoraTarget 4) of layer 1,
        // p = 0.3, seed 7, step 2; and the LM head (no layer, LoraTarget 8), p = 0.5, seed 11,
        // step 5.
        let a = DropoutKey {
            p: 0.3,
            seed: 7,
            step: 2,
            layer: Some(1),
            module: 4,
        };
        let b = DropoutKey {
            p: 0.5,
            seed: 11,
            step: 5,
            layer: None,
            module: 8,
        };
        let keep_a = 1.0 / (1.0 - 0.3f32);
        let got_a = dropout_mask(&a, 1, 16, Device::Cpu).unwrap();
        let got_b = dropout_mask(&b, 2, 8, Device::Cpu).unwrap();
        let pattern = |mask: &Tensor, keep: f32| -> String {
            mask.as_slice()
                .unwrap()
                .iter()
                .map(|&m| {
                    assert!(m == 0.0 || m == keep, "{m}");
                    if m == 0.0 { '0' } else { '1' }
                })
                .collect()
        };
        assert_eq!(pattern(&got_a, keep_a), MODEL_PATTERN_A);
        assert_eq!(pattern(&got_b, 2.0), MODEL_PATTERN_B);
    }

    /// Kept (1) and dropped (0) elements of those two masks, in order.
    const MODEL_PATTERN_A: &str = "1111110101111001";
    const MODEL_PATTERN_B: &str = "0010100111011111";

    #[test]
    fn dropout_keeps_about_one_minus_p_and_preserves_the_mean() {
        let key = DropoutKey {
            p: 0.25,
            seed: 1,
            step: 2,
            layer: Some(3),
            module: 4,
        };
        let n = 200_000;
        let mask = dropout_mask(&key, 1, n, Device::Cpu).unwrap();
        let kept = mask
            .as_slice()
            .unwrap()
            .iter()
            .filter(|&&m| m != 0.0)
            .count();
        // Binomial(n, 0.75): σ ≈ 194; 6σ is far beyond chance.
        let expected = 0.75 * n as f64;
        assert!((kept as f64 - expected).abs() < 1200.0, "{kept} kept");
        // Different keys give different masks.
        let other = dropout_mask(&DropoutKey { step: 3, ..key }, 1, n, Device::Cpu).unwrap();
        assert_ne!(mask.as_slice().unwrap(), other.as_slice().unwrap());
    }

    #[test]
    fn apply_dropout_multiplies_by_the_mask_whatever_the_shape() {
        let mut rng = Rng::new(44);
        let key = DropoutKey {
            p: 0.05,
            seed: 3,
            step: 17,
            layer: Some(2),
            module: 6,
        };
        for shape in [vec![5usize, 7], vec![3, 4, 5], vec![40_000]] {
            let n: usize = shape.iter().product();
            let x = rng.vec(n, -2.0, 2.0);
            let xt = tensor(x.clone(), &shape);
            let mask = dropout_mask(&key, 1, n, Device::Cpu).unwrap();
            let want: Vec<f32> = x
                .iter()
                .zip(mask.as_slice().unwrap())
                .map(|(&v, &m)| v * m)
                .collect();
            let got = apply_dropout(&xt, &key).unwrap();
            assert_eq!(got.shape(), shape.as_slice());
            assert_eq!(got.as_slice().unwrap(), want.as_slice());
            let back = apply_dropout_backward(&xt, &key).unwrap();
            assert_eq!(back.as_slice().unwrap(), want.as_slice());
            // The input is untouched.
            assert_eq!(xt.as_slice().unwrap(), x.as_slice());
        }
    }

    #[test]
    fn dropout_refuses_probabilities_outside_zero_to_one() {
        for p in [-0.1f32, 1.0, 1.5, f32::NAN] {
            let key = DropoutKey {
                p,
                seed: 0,
                step: 0,
                layer: None,
                module: 0,
            };
            assert!(matches!(
                dropout_mask(&key, 2, 2, Device::Cpu),
                Err(EngineError::Arg { .. })
            ));
            assert!(matches!(
                apply_dropout(&Tensor::zeros(&[2]), &key),
                Err(EngineError::Arg { .. })
            ));
        }
    }
}
