//! [`Tensor`]: a dense, row-major array on a device.
//!
//! The CPU storage is f32 (the reference precision). The CUDA backend adds a bf16 device
//! storage variant; ops dispatch on [`Tensor::device`], so code above the engine never
//! matches on storage itself.

use std::sync::Arc;

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
        }
    }

    /// The elements of a CPU tensor.
    pub fn as_slice(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.as_slice()),
        }
    }

    /// Mutable elements of a CPU tensor; copies the storage first if it is shared.
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::Cpu(v) => Ok(Arc::make_mut(v).as_mut_slice()),
        }
    }

    /// A host copy of the elements, whatever the device.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        Ok(self.as_slice()?.to_vec())
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
