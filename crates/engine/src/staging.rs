//! [`Staging`]: one step's small host arrays (token ids, positions, the paged layout and its
//! slots) packed into one device buffer with one host-to-device copy, each array's device
//! copy then pointing into it.
//!
//! Why: a decode step of a small model is bound by the host's launch work, and each
//! separate small upload costs a driver call and a staging copy. And a CUDA graph reads its
//! inputs at fixed addresses: staging every step into the same buffer is how a replayed
//! graph sees the new step's arrays (the buffer only moves when it must grow —
//! [`Staging::stage`] says so, and graphs captured before are then stale).
//!
//! An array staged here must not be used after the next `stage` call: its device copy then
//! holds the next step's data.

use std::sync::Arc;

use crate::cuda::copies::DeviceCopies;
use crate::cuda::{CudaBackend, DeviceBuffer};
use crate::{Device, Result};

/// Something whose host words can be staged and whose device copy can be bound.
pub trait Staged {
    /// Appends the array as the kernels read it, 32-bit words.
    fn write_words(&self, out: &mut Vec<u32>);
    #[doc(hidden)]
    fn copies(&self) -> &DeviceCopies;
}

impl Staged for crate::Indices {
    fn write_words(&self, out: &mut Vec<u32>) {
        out.extend_from_slice(self.as_slice());
    }
    fn copies(&self) -> &DeviceCopies {
        &self.device
    }
}

/// Where one device's steps stage their arrays.
pub struct Staging {
    device: Device,
    buf: Option<Arc<DeviceBuffer>>,
    words: Vec<u32>,
}

/// Each array starts on a 16-byte boundary (the kernels read some as int4).
const ALIGN_WORDS: usize = 4;

impl Staging {
    pub fn new(device: Device) -> Staging {
        Staging {
            device,
            buf: None,
            words: Vec::new(),
        }
    }

    /// The device address of the buffer (0 before the first stage on a GPU, and on the CPU).
    pub fn address(&self) -> u64 {
        self.buf.as_ref().map_or(0, |b| b.ptr())
    }

    /// Copies `arrays` to the device in one copy and binds each one's device copy to its
    /// range. Returns true when the buffer had to grow (it moved: graphs that read the old
    /// address are stale). On the CPU nothing happens.
    pub fn stage(&mut self, arrays: &[&dyn Staged]) -> Result<bool> {
        let Device::Cuda(ordinal) = self.device else {
            return Ok(false);
        };
        let backend = CudaBackend::get(ordinal)?;
        self.words.clear();
        let mut offsets = Vec::with_capacity(arrays.len());
        for a in arrays {
            self.words
                .resize(self.words.len().next_multiple_of(ALIGN_WORDS), 0);
            offsets.push(self.words.len() * 4);
            a.write_words(&mut self.words);
        }
        let bytes = (self.words.len() * 4).max(4);
        let (buf, moved) = match &self.buf {
            Some(b) if b.bytes() >= bytes => (b.clone(), false),
            _ => {
                // Room to grow by half again, so a slowly growing batch moves it rarely.
                let b = Arc::new(backend.alloc(bytes + bytes / 2)?);
                self.buf = Some(b.clone());
                (b, true)
            }
        };
        backend.upload_into(&buf, &self.words)?;
        for (a, &offset) in arrays.iter().zip(&offsets) {
            a.copies().bind(ordinal, buf.clone(), offset);
        }
        Ok(moved)
    }
}
