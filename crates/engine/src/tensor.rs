//! [`Tensor`]: a dense, row-major array on a device.
//!
//! The CPU storage is f32 (the reference precision). The CUDA backend adds a bf16 device
//! storage variant; ops dispatch on [`Tensor::device`], so code above the engine never
//! matches on storage itself.

use std::sync::Arc;

use crate::cuda::storage::CudaStorage;
use crate::cuda::{CudaBackend, DType};
use crate::error::{EngineError, Result};

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Storage {
    /// Shared so that weights loaded once can be viewed by several owners without copies.
    Cpu(Arc<Vec<f32>>),
    /// bf16 (or, for a few outputs, f32) on a GPU; see [`crate::cuda`].
    Cuda(CudaStorage),
}

/// A dense row-major tensor. Cloning is cheap (the storage is shared).
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// A CPU tensor from data laid out row-major for `shape`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(EngineError::Len {
                shape: shape.to_vec(),
                expected,
                got: data.len(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(Arc::new(data)),
        })
    }

    /// A CPU tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(Arc::new(vec![0.0; n])),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.backend.ordinal()),
        }
    }

    /// The elements of a CPU tensor.
    pub fn as_slice(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.as_slice()),
            Storage::Cuda(_) => Err(Self::not_on_cpu("as_slice", self.device())),
        }
    }

    /// Mutable elements of a CPU tensor; copies the storage first if it is shared.
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::Cpu(v) => Ok(Arc::make_mut(v).as_mut_slice()),
            Storage::Cuda(s) => Err(Self::not_on_cpu(
                "as_mut_slice",
                Device::Cuda(s.backend.ordinal()),
            )),
        }
    }

    /// A host copy of the elements, whatever the device.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.to_vec()),
            Storage::Cuda(s) => Ok(s.to_f32_vec(self.len())?),
        }
    }

    /// Element type of the storage: always f32 on the CPU; bf16 on a GPU except for the few
    /// f32 outputs (attention's logsumexp, full logits).
    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(_) => DType::F32,
            Storage::Cuda(s) => s.dtype,
        }
    }

    /// A copy on `device` (the same tensor, shared, if it is already there). To a GPU the
    /// values are rounded to bf16 (round-to-nearest-even); f32 device tensors stay f32.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let storage = match device {
            Device::Cpu => Storage::Cpu(Arc::new(self.to_vec()?)),
            Device::Cuda(ordinal) => {
                let backend = CudaBackend::get(ordinal)?;
                match &self.storage {
                    Storage::Cpu(v) => Storage::Cuda(CudaStorage::from_f32(&backend, v)?),
                    Storage::Cuda(s) => {
                        let host = s.to_f32_vec(self.len())?;
                        Storage::Cuda(match s.dtype {
                            DType::Bf16 => CudaStorage::from_f32(&backend, &host)?,
                            DType::F32 => CudaStorage::from_f32_exact(&backend, &host)?,
                        })
                    }
                }
            }
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            storage,
        })
    }

    /// A copy on `device` that keeps f32 precision on a GPU too (logits, statistics): what
    /// [`Tensor::to_device`] gives for tensors the GPU keeps in f32 (e.g. `ops::logits`).
    pub fn to_device_f32(&self, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => self.to_device(device),
            Device::Cuda(ordinal) => {
                let backend = CudaBackend::get(ordinal)?;
                let host = self.to_vec()?;
                Ok(Tensor {
                    shape: self.shape.clone(),
                    storage: Storage::Cuda(CudaStorage::from_f32_exact(&backend, &host)?),
                })
            }
        }
    }

    /// A tensor on `device` from raw bf16 bits (what safetensors stores for bf16 weights):
    /// uploaded as is to a GPU, widened to f32 on the CPU.
    pub fn from_bf16_bits(bits: &[u16], shape: &[usize], device: Device) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if expected != bits.len() {
            return Err(EngineError::Len {
                shape: shape.to_vec(),
                expected,
                got: bits.len(),
            });
        }
        let storage = match device {
            Device::Cpu => Storage::Cpu(Arc::new(crate::cuda::storage::bf16_bits_to_f32(bits))),
            Device::Cuda(ordinal) => Storage::Cuda(CudaStorage::from_bf16_bits(
                &CudaBackend::get(ordinal)?,
                bits,
            )?),
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            storage,
        })
    }

    /// A GPU tensor around existing storage (the CUDA launchers' outputs).
    pub(crate) fn from_cuda(shape: &[usize], storage: CudaStorage) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cuda(storage),
        }
    }

    /// The GPU storage, if the tensor is on a GPU.
    pub(crate) fn cuda(&self) -> Option<&CudaStorage> {
        match &self.storage {
            Storage::Cuda(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }

    pub(crate) fn cuda_mut(&mut self) -> Option<&mut CudaStorage> {
        match &mut self.storage {
            Storage::Cuda(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }

    fn not_on_cpu(what: &'static str, device: Device) -> EngineError {
        EngineError::Arg {
            op: what,
            msg: format!(
                "the tensor is on {device}; copy it to the CPU first (to_device or to_vec)"
            ),
        }
    }

    /// The same elements viewed with another shape of equal size.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if expected != self.len() {
            return Err(EngineError::Len {
                shape: shape.to_vec(),
                expected,
                got: self.len(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
        })
    }

    /// Checks that the shape is `expected`, naming the op in the error.
    pub fn expect_shape(&self, op: &'static str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(EngineError::Shape {
                op,
                expected: format!("{expected:?}"),
                got: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// Checks the rank and returns the dims, naming the op and the dims' meaning in the error.
    pub fn dims<const N: usize>(&self, op: &'static str, legend: &str) -> Result<[usize; N]> {
        self.shape
            .as_slice()
            .try_into()
            .map_err(|_| EngineError::Shape {
                op,
                expected: legend.to_string(),
                got: self.shape.clone(),
            })
    }
}
