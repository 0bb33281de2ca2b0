//! Rotary position embedding, HF's rotate_half convention (the two halves of each head are
//! the pair), with the inverse frequencies of the scaling kinds HF supports here.
//!
//! Everything is computed in f32 in the order torch evaluates HF's expressions
//! (`transformers.modeling_rope_utils`), so the tables agree with HF's to the ulp except
//! where libm's `powf`/`cos`/`sin` and torch's vectorised ones round differently.
use rayon::prelude::*;

use crate::cuda::copies::DeviceCopies;
use crate::cuda::ops as cuda_ops;
use crate::{EngineError, Indices, Result, Tensor};

/// `rope_scaling` / `rope_parameters` kinds.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain θ^(-2i/D).
    Default,
    /// Positions divided by `factor` (frequencies divided by factor).
    Linear { factor: f32 },
    /// Llama-3.1's frequency-band scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// Precomputed inverse frequencies for one head dim.
#[derive(Clone, Debug)]
pub struct Rope {
    pub inv_freq: Vec<f32>, // [D / 2]
    /// Multiplies cos and sin (HF's `attention_scaling`; 1 for the kinds above).
    pub attention_scaling: f32,
    /// `inv_freq` on each GPU that used it (uploaded once, not per layer).
    pub(crate) device: DeviceCopies,
}

impl Rope {
    /// Inverse frequencies as HF computes them (in f32 from an int64 arange, like torch).
    ///
    /// An odd `head_dim` yields `head_dim / 2` frequencies, which [`rope`] then rejects
    /// (HF cannot rotate an odd head either).
    pub fn new(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Rope {
        // HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), each step rounded to f32.
        let dim = head_dim as f32;
        let base: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim))
            .collect();
        let inv_freq = match *scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => llama3_inv_freq(
                &base,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            ),
        };
        Rope {
            inv_freq,
            attention_scaling: 1.0,
            device: DeviceCopies::default(),
        }
    }
}

/// HF `_compute_llama3_parameters`: low frequencies (wavelength above
/// `old_ctx / low_freq_factor`) are divided by `factor`, high ones (below
/// `old_ctx / high_freq_factor`) kept, and the band between blended linearly in
/// `old_ctx / wavelen`.
fn llama3_inv_freq(
    inv_freq: &[f32], // [D / 2]
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    old_ctx: usize,
) -> Vec<f32> {
    // The thresholds are Python floats that torch casts to f32 when comparing.
    let low_freq_wavelen = (old_ctx as f64 / low_freq_factor as f64) as f32;
    let high_freq_wavelen = (old_ctx as f64 / high_freq_factor as f64) as f32;
    let band = (high_freq_factor as f64 - low_freq_factor as f64) as f32;
    let two_pi = std::f64::consts::TAU as f32;
    let old_ctx = old_ctx as f32;
    inv_freq
        .iter()
        .map(|&f| {
            // torch evaluates `scalar / tensor` as `tensor.reciprocal() * scalar`.
            let wavelen = (1.0 / f) * two_pi;
            let scaled = if wavelen > low_freq_wavelen {
                f / factor
            } else {
                f
            };
            // HF: ~(wavelen < high) * ~(wavelen > low), the same for the finite wavelengths here.
            let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            if medium {
                let smooth = ((1.0 / wavelen) * old_ctx - low_freq_factor) / band;
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}

/// Rotates x: [T, heads, D] in place; `positions`: [T].
///
/// HF's `q * cos + rotate_half(q) * sin` with `rotate_half(q) = cat(-q2, q1)`: for i < D/2,
/// y_i = x_i·cos − x_{i+D/2}·sin and y_{i+D/2} = x_{i+D/2}·cos + x_i·sin, where the angle
/// is `inv_freq[i] · pos` rounded to f32 (HF's f32 matmul of one product).
pub fn rope(x: &mut Tensor, positions: &[u32], rope: &Rope) -> Result<()> {
    if let Some(gpu) = cuda_ops::device_of("rope", &[("x", x)])? {
        return cuda_ops::rope::rope(&gpu, x, positions, rope);
    }
    const OP: &str = "rope";
    let [t, heads, d] = x.dims(OP, "x: [T, heads, D]")?;
    check_head_dim(OP, "x", x.shape(), d, rope)?;
    check_positions(OP, positions, t)?;
    turn_heads(x, heads * d, heads, positions, rope, Turn::Forward)
}

/// The backward of [`rope`], in place: grad holds dy: [T, heads, D] on entry and dx on exit
/// (assigned); `positions`: [T].
///
/// Per (token, pair) the forward multiplies by s·[[cos, −sin], [sin, cos]] (s =
/// `attention_scaling`), so dx is the transpose applied to dy: the inverse rotation, scaled
/// by s. The same code as the forward turns the pairs, with sin negated. On a GPU grad is
/// bf16 (f32 math inside, as the forward).
pub fn rope_backward(grad: &mut Tensor, positions: &[u32], rope: &Rope) -> Result<()> {
    const OP: &str = "rope_backward";
    let [t, heads, d] = grad.dims(OP, "grad: [T, heads, D]")?;
    check_head_dim(OP, "grad", grad.shape(), d, rope)?;
    check_positions(OP, positions, t)?;
    if let Some(gpu) = cuda_ops::device_of(OP, &[("grad", grad)])? {
        return cuda_ops::rope::rope_backward(&gpu, grad, positions, rope);
    }
    turn_heads(grad, heads * d, heads, positions, rope, Turn::Transpose)
}

/// Which way [`turn_heads`] turns each pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Turn {
    /// The rotation by +angle: the forward.
    Forward,
    /// Its transpose (rotation by −angle, same scaling): the backward.
    Transpose,
}

/// Turns the first `turned` heads of each row of x: [T, width] (a row is a token's heads of
/// D = 2·inv_freq.len() each, then anything else up to `width`) by each token's angles.
///
/// The tensor's shape has been checked against `width`, `turned`, `rope` and `positions`.
fn turn_heads(
    x: &mut Tensor, // [T, width]
    width: usize,
    turned: usize,
    positions: &[u32], // [T]
    rope: &Rope,
    turn: Turn,
) -> Result<()> {
    let half = rope.inv_freq.len();
    let d = 2 * half;
    if width == 0 || turned == 0 || d == 0 || positions.is_empty() {
        return Ok(());
    }
    // Negating sin is exact, so the backward sees the very cos/sin values of the forward.
    let sin_sign = match turn {
        Turn::Forward => 1.0f32,
        Turn::Transpose => -1.0,
    };
    x.as_mut_slice()?
        .par_chunks_mut(width)
        .zip(positions.par_iter())
        .with_min_len(8)
        // cos/sin of one token are shared by its heads; the scratch is per rayon job.
        .for_each_init(
            || (vec![0.0f32; half], vec![0.0f32; half]),
            |(cos, sin), (row, &pos)| {
                let pos = pos as f32;
                for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&rope.inv_freq) {
                    let angle = f * pos;
                    *c = angle.cos() * rope.attention_scaling;
                    *s = angle.sin() * rope.attention_scaling * sin_sign;
                }
                for head in row[..turned * d].chunks_exact_mut(d) {
                    let (x1, x2) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (x1[i], x2[i]);
                        x1[i] = a * cos[i] - b * sin[i];
                        x2[i] = b * cos[i] + a * sin[i];
                    }
                }
            },
        );
    Ok(())
}

/// A head dim that `rope` cannot rotate (not twice its inverse frequencies) is a shape error
/// naming the tensor.
fn check_head_dim(
    op: &'static str,
    name: &str,
    shape: &[usize],
    d: usize,
    rope: &Rope,
) -> Result<()> {
    let half = rope.inv_freq.len();
    if d != 2 * half {
        return Err(EngineError::Shape {
            op,
            expected: format!(
                "{name}: [T, heads, D] with D = {} (twice the inverse frequencies)",
                2 * half
            ),
            got: shape.to_vec(),
        });
    }
    Ok(())
}

fn check_positions(op: &'static str, positions: &[u32], t: usize) -> Result<()> {
    if positions.len() != t {
        return Err(EngineError::Arg {
            op,
            msg: format!("{} positions for {t} tokens", positions.len()),
        });
    }
    Ok(())
}

/// Splits a fused projection qkv: [T, (H + 2·Hkv)·D] (q heads, then k heads, then v heads)
/// into q: [T, H, D] and k, v: [T, Hkv, D], rotating q and k with [`rope`].
pub fn rope_qkv_split(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    positions: &Indices,
    rope_t: &Rope,
) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(gpu) = cuda_ops::device_of("rope_qkv_split", &[("qkv", qkv)])? {
        return cuda_ops::rope::rope_qkv_split(&gpu, qkv, heads, kv_heads, positions, rope_t);
    }
    const OP: &str = "rope_qkv_split";
    let [t, width] = qkv.dims(OP, "qkv: [T, (H + 2·Hkv)·D]")?;
    let all = heads + 2 * kv_heads;
    if all == 0 || width % all != 0 {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("qkv: [T, (H + 2·Hkv)·D] with H = {heads}, Hkv = {kv_heads}"),
            got: qkv.shape().to_vec(),
        });
    }
    let d = width / all;
    let src = qkv.as_slice()?;
    let mut parts = [
        Vec::with_capacity(t * heads * d),
        Vec::with_capacity(t * kv_heads * d),
        Vec::with_capacity(t * kv_heads * d),
    ];
    for row in src.chunks_exact(width.max(1)).take(t) {
        let (q, kv) = row.split_at(heads * d);
        let (k, v) = kv.split_at(kv_heads * d);
        parts[0].extend_from_slice(q);
        parts[1].extend_from_slice(k);
        parts[2].extend_from_slice(v);
    }
    let [q, k, v] = parts;
    let mut q = Tensor::from_vec(q, &[t, heads, d])?;
    let mut k = Tensor::from_vec(k, &[t, kv_heads, d])?;
    let v = Tensor::from_vec(v, &[t, kv_heads, d])?;
    rope(&mut q, positions, rope_t)?;
    rope(&mut k, positions, rope_t)?;
    Ok((q, k, v))
}

/// The gradient of [`rope_qkv_split`] w.r.t. its fused input: dq: [T, H, D] and dk, dv:
/// [T, Hkv, D] → dqkv: [T, (H + 2·Hkv)·D] (assigned), laid out like qkv; `positions`: [T].
///
/// The forward copies q, k and v out of each row and rotates q and k, so the backward packs
/// the three gradients back into rows and turns the q and k heads (the first H + Hkv of each
/// row) the other way, as [`rope_backward`] does. On a GPU dq, dk, dv and dqkv are bf16.
pub fn rope_qkv_split_backward(
    dq: &Tensor, // [T, H, D]
    dk: &Tensor, // [T, Hkv, D]
    dv: &Tensor, // [T, Hkv, D]
    positions: &Indices,
    rope_t: &Rope,
) -> Result<Tensor> {
    const OP: &str = "rope_qkv_split_backward";
    let [t, heads, d] = dq.dims(OP, "dq: [T, H, D]")?;
    let [_, kv_heads, _] = dk.dims(OP, "dk: [T, Hkv, D]")?;
    dk.expect_shape(OP, &[t, kv_heads, d])?;
    dv.expect_shape(OP, &[t, kv_heads, d])?;
    if heads + 2 * kv_heads == 0 {
        return Err(EngineError::Shape {
            op: OP,
            expected: "dq: [T, H, D] and dk: [T, Hkv, D] with H + 2·Hkv > 0".into(),
            got: dq.shape().to_vec(),
        });
    }
    check_head_dim(OP, "dq", dq.shape(), d, rope_t)?;
    check_positions(OP, positions, t)?;
    if let Some(gpu) = cuda_ops::device_of(OP, &[("dq", dq), ("dk", dk), ("dv", dv)])? {
        return cuda_ops::rope::rope_qkv_split_backward(&gpu, dq, dk, dv, positions, rope_t);
    }
    let width = (heads + 2 * kv_heads) * d;
    let (dq_s, dk_s, dv_s) = (dq.as_slice()?, dk.as_slice()?, dv.as_slice()?);
    let mut dqkv = Vec::with_capacity(t * width); // [T, (H + 2·Hkv)·D]
    for row in 0..t {
        dqkv.extend_from_slice(&dq_s[row * heads * d..(row + 1) * heads * d]);
        dqkv.extend_from_slice(&dk_s[row * kv_heads * d..(row + 1) * kv_heads * d]);
        dqkv.extend_from_slice(&dv_s[row * kv_heads * d..(row + 1) * kv_heads * d]);
    }
    let mut dqkv = Tensor::from_vec(dqkv, &[t, width])?;
    turn_heads(
        &mut dqkv,
        width,
        heads + kv_heads,
        positions,
        rope_t,
        Turn::Transpose,
    )?;
    Ok(dqkv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::grad_check::{dot, numeric_grad, widen};
    use crate::test_util::{Rng, assert_close};

    /// The formulas of HF's default and llama3 inverse frequencies, in f64.
    fn inv_freq64(d: usize, theta: f64, scaling: &RopeScaling) -> Vec<f64> {
        let base: Vec<f64> = (0..d / 2)
            .map(|i| theta.powf(-((2 * i) as f64) / d as f64))
            .collect();
        match *scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f64).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, lo, hi) = (
                    factor as f64,
                    low_freq_factor as f64,
                    high_freq_factor as f64,
                );
                let ctx = original_max_position_embeddings as f64;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < ctx / hi {
                            f
                        } else if wavelen > ctx / lo {
                            f / factor
                        } else {
                            let s = (ctx / wavelen - lo) / (hi - lo);
                            (1.0 - s) * f / factor + s * f
                        }
                    })
                    .collect()
            }
        }
    }

    #[test]
    fn default_and_linear_inv_freq_match_formula() {
        for &(d, theta) in &[(64usize, 10_000.0f32), (96, 1e6), (256, 10_000.0), (6, 5e5)] {
            let r = Rope::new(d, theta, &RopeScaling::Default);
            assert_eq!(r.inv_freq.len(), d / 2);
            assert_eq!(r.inv_freq[0], 1.0);
            // powf in f32: a few ulps.
            assert_close(
                "default",
                &r.inv_freq,
                &inv_freq64(d, theta as f64, &RopeScaling::Default),
                0.0,
                1e-6,
            );
            let lin = RopeScaling::Linear { factor: 4.0 };
            let r = Rope::new(d, theta, &lin);
            assert_close(
                "linear",
                &r.inv_freq,
                &inv_freq64(d, theta as f64, &lin),
                0.0,
                1e-6,
            );
        }
    }

    #[test]
    fn llama3_inv_freq_matches_formula() {
        // Llama-3.2-1B's parameters, and one with a small context so that all three bands
        // (kept, blended, divided) appear at head_dim 64.
        let cases = [
            (64, 500_000.0, 32.0, 1.0, 4.0, 8192),
            (64, 500_000.0, 8.0, 1.0, 4.0, 8192),
            (128, 10_000.0, 8.0, 1.0, 4.0, 1000),
            (40, 10_000.0, 4.0, 2.0, 8.0, 512),
        ];
        for (d, theta, factor, lo, hi, ctx) in cases {
            let s = RopeScaling::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: ctx,
            };
            let r = Rope::new(d, theta, &s);
            let want = inv_freq64(d, theta as f64, &s);
            assert_close("llama3", &r.inv_freq, &want, 0.0, 2e-6);
            // Every case above has frequencies in each band.
            let ctx = ctx as f64;
            let wl: Vec<f64> = inv_freq64(d, theta as f64, &RopeScaling::Default)
                .iter()
                .map(|f| 2.0 * std::f64::consts::PI / f)
                .collect();
            assert!(wl.iter().any(|&w| w < ctx / hi as f64));
            assert!(wl.iter().any(|&w| w > ctx / lo as f64));
            assert!(
                wl.iter()
                    .any(|&w| w >= ctx / hi as f64 && w <= ctx / lo as f64)
            );
        }
    }

    #[test]
    fn llama3_hand_checked_value() {
        // D = 8, θ = 10⁴: inv_freq = [1, 0.1, 0.01, 0.001], wavelengths 2π·[1, 10, 100, 1000].
        // With old_ctx 1000, low 1, high 4, factor 8: 6.28 and 62.8 are below 250 (kept);
        // 6283 is above 1000 (0.001 / 8 = 1.25e-4); 628.3 is in the band:
        // smooth = (1000/628.3185 − 1)/3 = 0.197 183 1, and
        // (1 − smooth)·0.01/8 + smooth·0.01 = 0.001 003 521 + 0.001 971 831 = 0.002 975 352.
        let r = Rope::new(
            8,
            10_000.0,
            &RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 1000,
            },
        );
        let want = [1.0, 0.1, 0.002_975_352, 0.000_125];
        assert_close("hand", &r.inv_freq, &want, 0.0, 1e-6);
    }

    /// RoPE in f64 over x: [T, heads, D], a loop per (token, head, pair): the reference of
    /// the forward and, through finite differences, of the backwards.
    fn rope64(x: &[f64], positions: &[u32], rope_t: &Rope, heads: usize) -> Vec<f64> {
        let inv = &rope_t.inv_freq;
        let scaling = rope_t.attention_scaling as f64;
        let half = inv.len();
        let d = 2 * half;
        let mut y = vec![0.0f64; x.len()];
        for (t, &p) in positions.iter().enumerate() {
            for h in 0..heads {
                let o = (t * heads + h) * d;
                for i in 0..half {
                    // The angle as HF rounds it (one f32 product), then exact trigonometry.
                    let angle = (inv[i] * p as f32) as f64;
                    let (s, c) = angle.sin_cos();
                    let (a, b) = (x[o + i], x[o + i + half]);
                    y[o + i] = scaling * (a * c - b * s);
                    y[o + i + half] = scaling * (b * c + a * s);
                }
            }
        }
        y
    }

    #[test]
    fn rotation_matches_f64_reference() {
        let mut rng = Rng::new(6);
        // head_dim 48 (not a power of two), 3 heads, positions up to ~4000.
        let (t, heads, d) = (13, 3, 48);
        let mut rope_t = Rope::new(d, 10_000.0, &RopeScaling::Default);
        let x = rng.vec(t * heads * d, -1.0, 1.0);
        let positions: Vec<u32> = (0..t).map(|_| rng.below(4000) as u32).collect();
        // No kind sets attention_scaling ≠ 1 yet, but the op honours it: check that too.
        for scaling in [1.0, 1.25] {
            rope_t.attention_scaling = scaling;
            let mut xt = Tensor::from_vec(x.clone(), &[t, heads, d]).unwrap();
            rope(&mut xt, &positions, &rope_t).unwrap();
            // HF rounds the angle pos·inv_freq to f32 (at pos ~4000 that alone moves it by
            // up to ~2.4e-4 rad), so the reference takes the same f32 angle; what remains is
            // cos/sin (≤ 1 ulp), the scaling, and two products and a sum of values ≤ 1.25: a
            // few 1e-7.
            let want = rope64(&widen(&x), &positions, &rope_t, heads);
            assert_close("rope", xt.as_slice().unwrap(), &want, 1e-6, 0.0);
        }
        // Position 0 is the identity; a rotation keeps each pair's norm.
        rope_t.attention_scaling = 1.0;
        let mut z = Tensor::from_vec(x.clone(), &[t, heads, d]).unwrap();
        rope(&mut z, &vec![0; t], &rope_t).unwrap();
        assert_eq!(z.as_slice().unwrap(), x.as_slice());
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(27);
        for &(t, heads, d) in &[(1, 1, 2), (3, 2, 6), (5, 3, 10)] {
            let x = rng.vec(t * heads * d, -1.0, 1.0);
            let dy = rng.vec(t * heads * d, -1.0, 1.0);
            let positions: Vec<u32> = (0..t).map(|_| rng.below(5000) as u32).collect();
            for scaling in [1.0, 1.25] {
                let mut rope_t = Rope::new(d, 10_000.0, &RopeScaling::Default);
                rope_t.attention_scaling = scaling;
                let mut grad = Tensor::from_vec(dy.clone(), &[t, heads, d]).unwrap();
                rope_backward(&mut grad, &positions, &rope_t).unwrap();
                let want = numeric_grad(&widen(&x), 1e-5, |x| {
                    dot(&dy, &rope64(x, &positions, &rope_t, heads))
                });
                // Two f32 products and a sum of values ≤ 1.25 after f32 cos/sin; the
                // differences of this linear map are good to ~1e-10.
                let what = format!("{t}x{heads}x{d} scaling {scaling}");
                assert_close(&what, grad.as_slice().unwrap(), &want, 1e-6, 1e-6);
            }
        }
    }

    #[test]
    fn backward_undoes_an_unscaled_forward() {
        let mut rng = Rng::new(28);
        let (t, heads, d) = (19, 4, 14);
        let r = Rope::new(d, 500_000.0, &RopeScaling::Default);
        let x = rng.vec(t * heads * d, -1.0, 1.0);
        let positions: Vec<u32> = (0..t).map(|_| rng.below(100_000) as u32).collect();
        let mut y = Tensor::from_vec(x.clone(), &[t, heads, d]).unwrap();
        rope(&mut y, &positions, &r).unwrap();
        rope_backward(&mut y, &positions, &r).unwrap();
        // cos² + sin² = 1 up to a few f32 ulps.
        assert_close("round trip", y.as_slice().unwrap(), &widen(&x), 1e-6, 0.0);
    }

    /// rope_qkv_split in f64: the split, then [`rope64`] on q and k; returns q, k, v
    /// concatenated.
    fn qkv_split64(
        qkv: &[f64],
        [t, h, hkv, d]: [usize; 4],
        positions: &[u32],
        rope_t: &Rope,
    ) -> Vec<f64> {
        let width = (h + 2 * hkv) * d;
        let part = |lo: usize, n: usize| -> Vec<f64> {
            (0..t)
                .flat_map(|row| qkv[row * width + lo * d..row * width + (lo + n) * d].to_vec())
                .collect()
        };
        let mut out = rope64(&part(0, h), positions, rope_t, h);
        out.extend(rope64(&part(h, hkv), positions, rope_t, hkv));
        out.extend(part(h + hkv, hkv));
        out
    }

    #[test]
    fn qkv_split_backward_matches_finite_differences() {
        let mut rng = Rng::new(29);
        for [t, h, hkv, d] in [[1, 1, 1, 2], [3, 3, 1, 6], [4, 6, 2, 10]] {
            let r = Rope::new(d, 10_000.0, &RopeScaling::Linear { factor: 2.0 });
            let width = (h + 2 * hkv) * d;
            let qkv = rng.vec(t * width, -1.0, 1.0);
            let positions: Vec<u32> = (0..t).map(|_| rng.below(3000) as u32).collect();
            let (nq, nkv) = (t * h * d, t * hkv * d);
            let dy = rng.vec(nq + 2 * nkv, -1.0, 1.0); // dq, dk, dv end to end
            let dq = Tensor::from_vec(dy[..nq].to_vec(), &[t, h, d]).unwrap();
            let dk = Tensor::from_vec(dy[nq..nq + nkv].to_vec(), &[t, hkv, d]).unwrap();
            let dv = Tensor::from_vec(dy[nq + nkv..].to_vec(), &[t, hkv, d]).unwrap();
            let indices = Indices::from(&positions[..]);
            let dqkv = rope_qkv_split_backward(&dq, &dk, &dv, &indices, &r).unwrap();
            assert_eq!(dqkv.shape(), &[t, width]);
            let want = numeric_grad(&widen(&qkv), 1e-5, |x| {
                dot(&dy, &qkv_split64(x, [t, h, hkv, d], &positions, &r))
            });
            assert_close("dqkv", dqkv.as_slice().unwrap(), &want, 1e-6, 1e-6);
        }
    }

    #[test]
    fn qkv_split_forward_matches_f64_reference() {
        let mut rng = Rng::new(30);
        let [t, h, hkv, d] = [5, 3, 1, 6];
        let r = Rope::new(d, 10_000.0, &RopeScaling::Default);
        let qkv = rng.vec(t * (h + 2 * hkv) * d, -1.0, 1.0);
        let positions: Vec<u32> = (0..t).map(|_| rng.below(3000) as u32).collect();
        let qkv_t = Tensor::from_vec(qkv.clone(), &[t, (h + 2 * hkv) * d]).unwrap();
        let (q, k, v) = rope_qkv_split(&qkv_t, h, hkv, &Indices::from(&positions[..]), &r).unwrap();
        let mut got = q.to_vec().unwrap();
        got.extend(k.to_vec().unwrap());
        got.extend(v.to_vec().unwrap());
        let want = qkv_split64(&widen(&qkv), [t, h, hkv, d], &positions, &r);
        assert_close("qkv split", &got, &want, 1e-6, 0.0);
    }

    #[test]
    fn backward_bad_inputs_are_errors() {
        let r = Rope::new(8, 10_000.0, &RopeScaling::Default);
        let mut g = Tensor::zeros(&[2, 1, 6]);
        assert!(matches!(
            rope_backward(&mut g, &[0, 1], &r),
            Err(EngineError::Shape { .. })
        ));
        let mut g = Tensor::zeros(&[2, 1, 8]);
        assert!(matches!(
            rope_backward(&mut g, &[0], &r),
            Err(EngineError::Arg { .. })
        ));
        let pos = Indices::from(vec![0u32, 1]);
        let q = Tensor::zeros(&[2, 3, 8]);
        let kv = Tensor::zeros(&[2, 1, 8]);
        let cases = [
            // dk's head dim, dv's heads, dk's tokens, a head dim the rope cannot turn,
            // no heads at all.
            (q.clone(), Tensor::zeros(&[2, 1, 6]), kv.clone()),
            (q.clone(), kv.clone(), Tensor::zeros(&[2, 2, 8])),
            (q.clone(), Tensor::zeros(&[1, 1, 8]), kv.clone()),
            (
                Tensor::zeros(&[2, 3, 6]),
                Tensor::zeros(&[2, 1, 6]),
                Tensor::zeros(&[2, 1, 6]),
            ),
            (
                Tensor::zeros(&[2, 0, 8]),
                Tensor::zeros(&[2, 0, 8]),
                Tensor::zeros(&[2, 0, 8]),
            ),
        ];
        for (i, (dq, dk, dv)) in cases.iter().enumerate() {
            assert!(
                matches!(
                    rope_qkv_split_backward(dq, dk, dv, &pos, &r),
                    Err(EngineError::Shape { .. })
                ),
                "case {i}"
            );
        }
        assert!(matches!(
            rope_qkv_split_backward(&q, &kv, &kv, &Indices::from(vec![0u32]), &r),
            Err(EngineError::Arg { .. })
        ));
    }

    #[test]
    fn qkv_split_is_split_then_rope() {
        let mut rng = Rng::new(16);
        let (t, h, hkv, d) = (4, 6, 2, 10);
        let r = Rope::new(d, 10_000.0, &RopeScaling::Linear { factor: 2.0 });
        let width = (h + 2 * hkv) * d;
        let qkv = rng.vec(t * width, -1.0, 1.0);
        let positions = [3u32, 0, 17, 900];
        let (q, k, v) = rope_qkv_split(
            &Tensor::from_vec(qkv.clone(), &[t, width]).unwrap(),
            h,
            hkv,
            &Indices::from(&positions[..]),
            &r,
        )
        .unwrap();
        let part = |lo: usize, n: usize| -> Vec<f32> {
            qkv.chunks(width)
                .flat_map(|row| row[lo * d..(lo + n) * d].to_vec())
                .collect()
        };
        let mut want_q = Tensor::from_vec(part(0, h), &[t, h, d]).unwrap();
        let mut want_k = Tensor::from_vec(part(h, hkv), &[t, hkv, d]).unwrap();
        rope(&mut want_q, &positions, &r).unwrap();
        rope(&mut want_k, &positions, &r).unwrap();
        assert_eq!(q.as_slice().unwrap(), want_q.as_slice().unwrap());
        assert_eq!(k.as_slice().unwrap(), want_k.as_slice().unwrap());
        assert_eq!(v.shape(), &[t, hkv, d]);
        assert_eq!(v.as_slice().unwrap(), part(h + hkv, hkv).as_slice());
        // A width that is not (H + 2·Hkv)·D, and positions of the wrong length.
        let bad = Tensor::zeros(&[t, width + 1]);
        assert!(matches!(
            rope_qkv_split(&bad, h, hkv, &Indices::from(&positions[..]), &r),
            Err(EngineError::Shape { .. })
        ));
        let ok = Tensor::zeros(&[t, width]);
        assert!(matches!(
            rope_qkv_split(&ok, h, hkv, &Indices::from(&positions[..2]), &r),
            Err(EngineError::Arg { .. })
        ));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let r = Rope::new(8, 10_000.0, &RopeScaling::Default);
        let mut x = Tensor::zeros(&[2, 1, 6]);
        assert!(matches!(
            rope(&mut x, &[0, 1], &r),
            Err(EngineError::Shape { .. })
        ));
        let mut x = Tensor::zeros(&[2, 1, 8]);
        assert!(matches!(
            rope(&mut x, &[0], &r),
            Err(EngineError::Arg { .. })
        ));
        let mut x = Tensor::zeros(&[2, 8]);
        assert!(matches!(
            rope(&mut x, &[0, 1], &r),
            Err(EngineError::Shape { .. })
        ));
        // Odd head dims cannot be rotated.
        let odd = Rope::new(7, 10_000.0, &RopeScaling::Default);
        let mut x = Tensor::zeros(&[1, 1, 7]);
        assert!(matches!(
            rope(&mut x, &[0], &odd),
            Err(EngineError::Shape { .. })
        ));
    }
}
