//! [`Indices`]: a host array of u32 indices (token ids, positions) that an op on a GPU
//! uploads once and then reuses — every layer of a forward reads the same positions — or
//! finds already staged there ([`crate::Staging`]).

use crate::cuda::copies::{DeviceCopies, DevicePtr};
use crate::cuda::{CudaBackend, CudaError};

/// u32 indices, [N], with their device copies.
#[derive(Clone, Debug, Default)]
pub struct Indices {
    host: Vec<u32>, // [N]
    pub(crate) device: DeviceCopies,
}

impl Indices {
    pub fn new(host: Vec<u32>) -> Indices {
        Indices {
            host,
            device: DeviceCopies::default(),
        }
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.host
    }

    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// The device copy on `backend`'s GPU (uploaded on first use).
    pub(crate) fn on(&self, backend: &CudaBackend) -> Result<DevicePtr, CudaError> {
        self.device.get(backend, &self.host)
    }
}

impl From<Vec<u32>> for Indices {
    fn from(host: Vec<u32>) -> Indices {
        Indices::new(host)
    }
}

impl From<&[u32]> for Indices {
    fn from(host: &[u32]) -> Indices {
        Indices::new(host.to_vec())
    }
}

impl std::ops::Deref for Indices {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.host
    }
}
