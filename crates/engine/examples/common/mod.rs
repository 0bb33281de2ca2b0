//! What the engine's GPU benchmarks (cuda_bench, paged_bench) share: reproducible random
//! inputs on the GPU and timing with CUDA events.
//!
//! Each example compiles this module on its own (`mod common;`) and uses a subset of it. It
//! lives in a folder so that Cargo does not take it for an example of its own.
#![allow(dead_code)]

use engine::cuda::CudaBackend;
use engine::{Device, EngineError, Tensor};

pub const GPU: Device = Device::Cuda(0);

pub type Result<T> = std::result::Result<T, EngineError>;

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

    /// 0 .. n in a random order (Fisher–Yates).
    pub fn shuffled(&mut self, n: usize) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            ids.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
        ids
    }
}

/// A GPU tensor of random bf16 values uniform in [-a, a).
pub fn random(rng: &mut Rng, shape: &[usize], a: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let bits: Vec<u16> = (0..n)
        .map(|_| {
            let u = (rng.next() >> 40) as f32 / (1u64 << 24) as f32;
            half::bf16::from_f32((2.0 * u - 1.0) * a).to_bits()
        })
        .collect();
    Tensor::from_bf16_bits(&bits, shape, GPU)
}

/// Mean GPU milliseconds of `f` over `iters` runs after `warmup` untimed ones.
pub fn time(
    backend: &CudaBackend,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    backend.synchronize()?;
    let ms = backend.time_ms(|| {
        for _ in 0..iters {
            f()?;
        }
        Ok::<(), EngineError>(())
    })?;
    Ok(ms as f64 / iters as f64)
}
