//! Tensor storage on a GPU, and the host ↔ device transfers behind `Tensor::to_device`.
//!
//! Activations and weights are bf16 on the device (f32 math inside every kernel); a few
//! outputs stay f32 because their consumers need the precision: attention's logsumexp (the
//! backward pass exponentiates against it) and full logits for sampling.

use std::sync::Arc;

use half::bf16;
use rayon::prelude::*;

use super::arena::DeviceBuffer;
use super::device::CudaBackend;
use super::error::CudaResult;

/// Element type of a device tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// A tensor's elements on one GPU. Cloning shares the buffer (like the CPU storage's Arc).
#[derive(Clone)]
pub(crate) struct CudaStorage {
    pub(crate) buf: Arc<DeviceBuffer>,
    pub(crate) dtype: DType,
    pub(crate) backend: Arc<CudaBackend>,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaStorage(cuda:{}, {:?}, {:?})",
            self.backend.ordinal(),
            self.dtype,
            self.buf
        )
    }
}

/// Below this many elements a conversion is not worth rayon's fan-out.
const PAR_MIN: usize = 1 << 16;

/// f32 → bf16 bits, round-to-nearest-even (half's conversion; NaN stays NaN).
pub(crate) fn f32_to_bf16_bits(data: &[f32]) -> Vec<u16> {
    if data.len() < PAR_MIN {
        data.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
    } else {
        data.par_iter()
            .map(|&x| bf16::from_f32(x).to_bits())
            .collect()
    }
}

pub(crate) fn bf16_bits_to_f32(bits: &[u16]) -> Vec<f32> {
    if bits.len() < PAR_MIN {
        bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
    } else {
        bits.par_iter()
            .map(|&b| bf16::from_bits(b).to_f32())
            .collect()
    }
}

impl CudaStorage {
    /// Uninitialised storage for `len` elements.
    pub(crate) fn alloc(
        backend: &Arc<CudaBackend>,
        len: usize,
        dtype: DType,
    ) -> CudaResult<CudaStorage> {
        Ok(CudaStorage {
            buf: Arc::new(backend.alloc(len * dtype.size())?),
            dtype,
            backend: backend.clone(),
        })
    }

    /// Zero-filled storage for `len` elements.
    pub(crate) fn zeroed(
        backend: &Arc<CudaBackend>,
        len: usize,
        dtype: DType,
    ) -> CudaResult<CudaStorage> {
        Ok(CudaStorage {
            buf: Arc::new(backend.alloc_zeroed(len * dtype.size())?),
            dtype,
            backend: backend.clone(),
        })
    }

    /// bf16 storage holding `bits`.
    pub(crate) fn from_bf16_bits(
        backend: &Arc<CudaBackend>,
        bits: &[u16],
    ) -> CudaResult<CudaStorage> {
        Ok(CudaStorage {
            buf: Arc::new(backend.upload(bits)?),
            dtype: DType::Bf16,
            backend: backend.clone(),
        })
    }

    /// bf16 storage holding `data` rounded to bf16.
    pub(crate) fn from_f32(backend: &Arc<CudaBackend>, data: &[f32]) -> CudaResult<CudaStorage> {
        Self::from_bf16_bits(backend, &f32_to_bf16_bits(data))
    }

    /// f32 storage holding `data` exactly.
    pub(crate) fn from_f32_exact(
        backend: &Arc<CudaBackend>,
        data: &[f32],
    ) -> CudaResult<CudaStorage> {
        Ok(CudaStorage {
            buf: Arc::new(backend.upload(data)?),
            dtype: DType::F32,
            backend: backend.clone(),
        })
    }

    /// The first `len` elements as f32 on the host (waits for queued work).
    pub(crate) fn to_f32_vec(&self, len: usize) -> CudaResult<Vec<f32>> {
        match self.dtype {
            DType::F32 => {
                let mut out = vec![0.0f32; len];
                self.backend.download(&self.buf, &mut out)?;
                Ok(out)
            }
            DType::Bf16 => {
                let mut bits = vec![0u16; len];
                self.backend.download(&self.buf, &mut bits)?;
                Ok(bf16_bits_to_f32(&bits))
            }
        }
    }

    /// The device address.
    pub(crate) fn ptr(&self) -> u64 {
        self.buf.ptr()
    }

    /// Makes the buffer exclusively ours before an in-place op, copying it when it is shared
    /// (the same copy-on-write rule as the CPU storage's `Arc::make_mut`).
    pub(crate) fn make_exclusive(&mut self, len: usize) -> CudaResult<()> {
        if Arc::strong_count(&self.buf) > 1 {
            let fresh = self.backend.alloc(len * self.dtype.size())?;
            self.backend
                .copy(&fresh, &self.buf, len * self.dtype.size())?;
            self.buf = Arc::new(fresh);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1 + 2^-7: ties go to even (1.0).
        let halfway = 1.0f32 + 2f32.powi(-8);
        assert_eq!(f32_to_bf16_bits(&[halfway]), vec![0x3f80]);
        // Just above halfway rounds up.
        let above = f32::from_bits(halfway.to_bits() + 1);
        assert_eq!(f32_to_bf16_bits(&[above]), vec![0x3f81]);
        let big: Vec<f32> = (0..PAR_MIN + 3).map(|i| i as f32 * 0.25).collect();
        let back = bf16_bits_to_f32(&f32_to_bf16_bits(&big));
        for (a, b) in big.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() * 2f32.powi(-8), "{a} → {b}");
        }
        assert!(bf16_bits_to_f32(&f32_to_bf16_bits(&[f32::NAN]))[0].is_nan());
    }
}
