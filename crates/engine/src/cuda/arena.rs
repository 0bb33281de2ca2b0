//! A stream-ordered caching allocator: device memory is taken from the driver once and then
//! recycled, so a steady-state forward makes no cuMemAlloc/cuMemFree calls at all.
//!
//! Why reuse without events is safe: every kernel and copy of a backend runs on its one
//! stream. When a buffer is dropped on the host, work that still reads it is already queued;
//! whoever gets the block next can only queue work *behind* that on the same stream.
//!
//! Blocks are not split: a request is rounded up (512 B granules below 1 MiB, 2 MiB above)
//! and served by the smallest cached block that fits and wastes at most a quarter of itself.
//! When the driver reports out-of-memory, every cached block is returned and the allocation
//! retried once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaContext, result, sys};

use super::error::{CudaError, CudaResult};

/// Memory counters of one device's arena, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Handed out and not yet dropped.
    pub live: usize,
    /// Held from the driver but free for reuse.
    pub cached: usize,
    /// The highest `live` seen since the last
    /// [`CudaBackend::reset_peak_memory`](super::CudaBackend::reset_peak_memory).
    pub peak_live: usize,
    /// The highest `live + cached` (what the driver sees) since the last reset.
    pub peak_reserved: usize,
    /// cuMemAlloc calls so far (a hot loop should stop adding to this).
    pub driver_allocs: usize,
}

#[derive(Default)]
struct Pool {
    free: BTreeMap<usize, Vec<sys::CUdeviceptr>>,
    stats: MemoryStats,
}

pub struct Arena {
    ctx: Arc<CudaContext>,
    pool: Mutex<Pool>,
}

/// Device memory owned by the arena; returned to it on drop.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    arena: Arc<Arena>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl DeviceBuffer {
    /// The device address (0 for an empty buffer).
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    /// The usable size in bytes (what was asked for, rounded up).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut pool = self.arena.lock();
            pool.stats.live -= self.bytes;
            pool.stats.cached += self.bytes;
            pool.free.entry(self.bytes).or_default().push(self.ptr);
        }
    }
}

const SMALL: usize = 1 << 20;

fn round_size(bytes: usize) -> usize {
    let granule = if bytes < SMALL { 512 } else { 2 << 20 };
    bytes.div_ceil(granule) * granule
}

impl Arena {
    pub(crate) fn new(ctx: Arc<CudaContext>) -> Arc<Arena> {
        Arc::new(Arena {
            ctx,
            pool: Mutex::new(Pool::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        // A panic while holding the lock leaves the pool consistent (every update is a
        // single step), so a poisoned lock is still usable.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `bytes` of uninitialised device memory.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> CudaResult<DeviceBuffer> {
        if bytes == 0 {
            return Ok(DeviceBuffer {
                ptr: 0,
                bytes: 0,
                arena: self.clone(),
            });
        }
        let size = round_size(bytes);
        let mut pool = self.lock();
        // Smallest cached block that fits and wastes at most a quarter of itself.
        let hit = pool
            .free
            .range(size..=size + size / 3)
            .find(|(_, v)| !v.is_empty())
            .map(|(&s, _)| s);
        if let Some(s) = hit {
            let list = pool.free.get_mut(&s).expect("the key was just found");
            let ptr = list.pop().expect("the list was just checked non-empty");
            if list.is_empty() {
                pool.free.remove(&s);
            }
            pool.stats.cached -= s;
            pool.stats.live += s;
            pool.stats.peak_live = pool.stats.peak_live.max(pool.stats.live);
            return Ok(DeviceBuffer {
                ptr,
                bytes: s,
                arena: self.clone(),
            });
        }
        let ptr = match self.driver_alloc(size) {
            Ok(p) => p,
            Err(_) => {
                // Give every cached block back to the driver and try once more.
                self.release_cached(&mut pool);
                self.driver_alloc(size)
                    .map_err(|_| CudaError::OutOfMemory {
                        ordinal: self.ctx.ordinal(),
                        requested: size,
                        live: pool.stats.live,
                    })?
            }
        };
        pool.stats.driver_allocs += 1;
        pool.stats.live += size;
        pool.stats.peak_live = pool.stats.peak_live.max(pool.stats.live);
        pool.stats.peak_reserved = pool
            .stats
            .peak_reserved
            .max(pool.stats.live + pool.stats.cached);
        Ok(DeviceBuffer {
            ptr,
            bytes: size,
            arena: self.clone(),
        })
    }

    fn driver_alloc(&self, size: usize) -> Result<sys::CUdeviceptr, result::DriverError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: a plain allocation in the bound context.
        unsafe { result::malloc_sync(size) }
    }

    fn release_cached(&self, pool: &mut Pool) {
        if pool.free.is_empty() {
            return;
        }
        // Queued work may still use these blocks: wait for the device before freeing.
        let _ = self.ctx.bind_to_thread();
        let _ = self.ctx.synchronize();
        for (_, ptrs) in std::mem::take(&mut pool.free) {
            for p in ptrs {
                // SAFETY: `p` came from cuMemAlloc and is in no live buffer.
                let _ = unsafe { result::free_sync(p) };
            }
        }
        pool.stats.cached = 0;
    }

    /// Returns every cached block to the driver.
    pub fn trim(&self) {
        let mut pool = self.lock();
        self.release_cached(&mut pool);
    }

    pub fn stats(&self) -> MemoryStats {
        self.lock().stats
    }

    /// Restarts the peak counters from the current usage.
    pub fn reset_peak(&self) {
        let mut pool = self.lock();
        pool.stats.peak_live = pool.stats.live;
        pool.stats.peak_reserved = pool.stats.live + pool.stats.cached;
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let pool = self.pool.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut pool = std::mem::take(pool);
        self.release_cached(&mut pool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_to_granules() {
        assert_eq!(round_size(1), 512);
        assert_eq!(round_size(512), 512);
        assert_eq!(round_size(513), 1024);
        assert_eq!(round_size(SMALL - 1), SMALL);
        assert_eq!(round_size(SMALL), 2 << 20);
        assert_eq!(round_size((2 << 20) + 1), 4 << 20);
    }
}
