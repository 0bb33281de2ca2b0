//! Test helpers: a tiny deterministic RNG and tolerance checks against f64 references.
//!
//! SplitMix64 is enough here: tests need reproducible, well-spread inputs, not statistical
//! quality, and it keeps `rand` out of the dependency tree.

/// SplitMix64 (Steele, Lea & Flood 2014): one u64 of state, full period.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 bits, so every value is exactly an f32.
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [lo, hi).
    pub(crate) fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform in 0..n.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `n` values uniform in [lo, hi).
    pub(crate) fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// Asserts `|got - want| <= abs + rel·|want|` elementwise, naming the first bad index.
pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f64], abs: f64, rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= abs + rel * w.abs(),
            "{what}[{i}]: got {g}, want {w} (|err| {err:e} > {abs:e} + {rel:e}·|want|)"
        );
    }
}

/// Asserts that a CUBIN defines every kernel in `names`: each name appears NUL-terminated in
/// its string table (the ptxas log does not list kernels it compiled without statistics).
#[track_caller]
pub(crate) fn assert_cubin_has_kernels(cubin: &[u8], names: &[&str]) {
    for name in names {
        let needle = [b"\0", name.as_bytes(), b"\0"].concat();
        assert!(
            cubin.windows(needle.len()).any(|w| w == needle.as_slice()),
            "the CUBIN has no kernel named {name}"
        );
    }
}
