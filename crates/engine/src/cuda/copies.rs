//! Device copies of small host arrays (token ids, positions, slot mappings, block tables,
//! RoPE frequencies): uploaded on a GPU's first use and kept, so the layers of one forward
//! share one copy; or bound to a range of a caller's buffer ([`crate::Staging`]), which is
//! how one step's arrays reach the GPU in one copy, at addresses a captured graph can read.

use std::sync::{Arc, Mutex};

use super::arena::DeviceBuffer;
use super::device::CudaBackend;
use super::error::CudaResult;

/// An address inside a kept device buffer.
pub(crate) struct DevicePtr {
    pub ptr: u64,
    _keep: Arc<DeviceBuffer>,
}

/// One host array's copies, one per device ordinal: (ordinal, buffer, byte offset).
#[derive(Default)]
pub struct DeviceCopies(Mutex<Vec<(usize, Arc<DeviceBuffer>, usize)>>);

impl DeviceCopies {
    /// The copy of `data` on `backend`'s GPU, uploading it the first time.
    pub(crate) fn get<T: Copy>(&self, backend: &CudaBackend, data: &[T]) -> CudaResult<DevicePtr> {
        let mut copies = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, buf, offset)) = copies.iter().find(|(o, ..)| *o == backend.ordinal()) {
            return Ok(DevicePtr {
                ptr: buf.ptr() + *offset as u64,
                _keep: buf.clone(),
            });
        }
        // An empty upload would be a zero-byte allocation; kernels never read it then.
        let buf = Arc::new(if data.is_empty() {
            backend.upload(&[0u32])?
        } else {
            backend.upload(data)?
        });
        copies.push((backend.ordinal(), buf.clone(), 0));
        Ok(DevicePtr {
            ptr: buf.ptr(),
            _keep: buf,
        })
    }

    /// Makes `buf` at `offset` bytes this array's copy on GPU `ordinal` (the caller has
    /// queued the upload of the array's data there).
    pub(crate) fn bind(&self, ordinal: usize, buf: Arc<DeviceBuffer>, offset: usize) {
        let mut copies = self.0.lock().unwrap_or_else(|e| e.into_inner());
        copies.retain(|(o, ..)| *o != ordinal);
        copies.push((ordinal, buf, offset));
    }
}

/// A clone is a new host array as far as devices go: it uploads its own copies.
impl Clone for DeviceCopies {
    fn clone(&self) -> DeviceCopies {
        DeviceCopies::default()
    }
}

impl std::fmt::Debug for DeviceCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |c| c.len());
        write!(f, "DeviceCopies({n} devices)")
    }
}
