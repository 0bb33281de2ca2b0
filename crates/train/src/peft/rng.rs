//! A seeded random generator whose whole state is two numbers, for LoRA initialisation (and
//! anything else training draws at random) with an exact resume.
//!
//! ChaCha8 (rand_chacha) seeded from a u64: its position in the key stream (`word_pos`, in
//! 32-bit words) is the only thing that changes as it is used, so `(seed, word_pos)` restores
//! it exactly ([`SeededRng::state`], [`SeededRng::from_state`]). Its numbers cannot be
//! torch's (a Mersenne twister behind `torch.manual_seed`); the distributions are the same.
//!
//! Conversions, fixed so that a saved seed means the same values in every prefer version:
//! a uniform f64 in [0, 1) is the top 53 bits of one u64 over 2⁵³; a normal is Box–Muller's
//! cosine branch from two u64s (the sine branch is not kept, so no hidden state exists).

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

/// Everything needed to continue a [`SeededRng`] where it stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    /// Position in the ChaCha8 key stream, in 32-bit words.
    pub word_pos: u128,
}

/// ChaCha8 from a u64 seed, with saveable state.
#[derive(Clone, Debug)]
pub struct SeededRng {
    seed: u64,
    inner: ChaCha8Rng,
}

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        SeededRng {
            seed,
            inner: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn state(&self) -> RngState {
        RngState {
            seed: self.seed,
            word_pos: self.inner.get_word_pos(),
        }
    }

    pub fn from_state(state: &RngState) -> SeededRng {
        let mut rng = SeededRng::new(state.seed);
        rng.inner.set_word_pos(state.word_pos);
        rng
    }

    pub fn next_u32(&mut self) -> u32 {
        self.inner.next_u32()
    }

    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// Uniform in [0, 1), 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fills `out` with draws from U(low, high), each `low + (high − low)·u` in f64 (torch's
    /// `uniform_` formula) rounded to f32.
    pub fn fill_uniform(&mut self, out: &mut [f32], low: f64, high: f64) {
        for x in out {
            *x = (low + (high - low) * self.unit_f64()) as f32;
        }
    }

    /// A standard normal draw (Box–Muller, cosine branch).
    pub fn normal(&mut self) -> f64 {
        // u1 in (0, 1] keeps the logarithm finite.
        let u1 = 1.0 - self.unit_f64();
        let u2 = self.unit_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fills `out` with draws from N(mean, std²), rounded to f32.
    pub fn fill_normal(&mut self, out: &mut [f32], mean: f64, std: f64) {
        for x in out {
            *x = (mean + std * self.normal()) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_state_continues_the_same_stream() {
        let mut a = SeededRng::new(42);
        // Mixed widths so the position sits inside a ChaCha block and mid-u64.
        for _ in 0..37 {
            a.next_u32();
        }
        a.next_u64();
        let state = a.state();
        let mut b = SeededRng::from_state(&state);
        let from_a: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let from_b: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(from_a, from_b);
        // The state survives JSON.
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<RngState>(&json).unwrap(), state);
    }

    #[test]
    fn same_seed_same_numbers_different_seed_different_numbers() {
        let draw = |seed| {
            let mut r = SeededRng::new(seed);
            (0..8).map(|_| r.next_u32()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn uniform_and_normal_moments() {
        let mut r = SeededRng::new(1);
        let mut u = vec![0f32; 200_000];
        r.fill_uniform(&mut u, -0.5, 0.5);
        assert!(u.iter().all(|&x| (-0.5..=0.5).contains(&x)));
        let mean = u.iter().map(|&x| x as f64).sum::<f64>() / u.len() as f64;
        let var = u.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / u.len() as f64;
        assert!(
            mean.abs() < 3e-3 && (var - 1.0 / 12.0).abs() < 2e-3,
            "{mean} {var}"
        );

        let mut n = vec![0f32; 200_000];
        r.fill_normal(&mut n, 0.0, 1.0);
        let mean = n.iter().map(|&x| x as f64).sum::<f64>() / n.len() as f64;
        let var = n.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n.len() as f64;
        let kurt = n.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / n.len() as f64;
        assert!(
            mean.abs() < 1e-2 && (var - 1.0).abs() < 2e-2 && (kurt - 3.0).abs() < 0.1,
            "{mean} {var} {kurt}"
        );
    }
}
