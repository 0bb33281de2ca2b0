//! What the engine's GPU test binaries (cuda_parity, cuda_paged, cuda_top_k, the backward
//! ones) share: the device, its lock, reproducible random inputs, packed sequence layouts,
//! and the `abs + rel·U·|want|` comparison.
//!
//! Each binary compiles this module on its own (`mod common;`) and uses a subset of it.
#![allow(dead_code)]

use engine::ops::{RopeScaling, SeqLayout};
use engine::{Device, Tensor};

pub const GPU: Device = Device::Cuda(0);
/// bf16 unit roundoff.
pub const U: f64 = 1.0 / 256.0;

/// GPU tests share one device backend (its arena counters included): run them one at a time
/// whatever `--test-threads` says.
pub fn gpu_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// SplitMix64: reproducible inputs without a rand dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// `n` bf16-exact values uniform in [lo, hi).
    pub fn bf16_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| bf16_round(self.uniform(lo, hi))).collect()
    }

    /// A random permutation of `0..n` (Fisher–Yates).
    pub fn shuffled(&mut self, n: usize) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            ids.swap(i, self.below(i + 1));
        }
        ids
    }
}

pub fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// A CPU tensor of bf16-exact values uniform in [lo, hi).
pub fn rand_tensor(rng: &mut Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rng.bf16_vec(n, lo, hi), shape).unwrap()
}

pub fn gpu(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

/// Whether a comparison excuses a non-finite pair that the tolerance cannot judge.
#[derive(Clone, Copy)]
pub enum NonFinite {
    /// NaN against NaN, and equal infinities, pass.
    SameIsEqual,
    /// Any NaN fails (pools hold NaN in unused slots: reading one must fail loudly).
    Fails,
}

/// Asserts |got − want| ≤ abs + rel·U·|want| elementwise; names the first failure and
/// prints the largest error.
pub fn assert_close_slices(
    what: &str,
    got: &[f32],
    want: &[f32],
    abs: f64,
    rel: f64,
    non_finite: NonFinite,
) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w as f64).abs();
        let tol = abs + rel * U * (w as f64).abs();
        let excused = match non_finite {
            NonFinite::SameIsEqual => (g.is_nan() && w.is_nan()) || g == w,
            NonFinite::Fails => false,
        };
        assert!(
            err <= tol || excused,
            "{what}[{i}]: got {g}, want {w}, |err| {err:.3e} > {tol:.3e}"
        );
        if err > worst.0 {
            worst = (err, i);
        }
    }
    eprintln!("{what}: max |err| {:.3e} at {}", worst.0, worst.1);
}

/// [`assert_close_slices`] on two tensors of the same shape.
pub fn assert_close_tensors(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    abs: f64,
    rel: f64,
    non_finite: NonFinite,
) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (g, w) = (got.to_vec().unwrap(), want.to_vec().unwrap());
    assert_close_slices(what, &g, &w, abs, rel, non_finite);
}

/// The largest |value|: the scale that absolute tolerances are stated against (terms that
/// cancel leave f32 errors of the terms' size, not the result's).
pub fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()))
}

/// Llama 3's RoPE scaling (factor 32, original context 8192), as its config.json gives it.
pub fn llama3() -> RopeScaling {
    RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    }
}

/// Where each of sequences of these lengths starts when packed: [0, l0, l0 + l1, …].
pub fn starts(lens: &[usize]) -> Vec<usize> {
    let mut s = vec![0];
    for l in lens {
        s.push(s.last().unwrap() + l);
    }
    s
}

/// The packed layout of sequences with `q_lens` queries over `kv_lens` keys, and its total
/// query and key counts (Tq, Tkv).
pub fn seq_layout(q_lens: &[usize], kv_lens: &[usize]) -> (SeqLayout, usize, usize) {
    let layout = SeqLayout {
        q_starts: starts(q_lens),
        kv_starts: starts(kv_lens),
    };
    let (tq, tkv) = (
        *layout.q_starts.last().unwrap(),
        *layout.kv_starts.last().unwrap(),
    );
    (layout, tq, tkv)
}
