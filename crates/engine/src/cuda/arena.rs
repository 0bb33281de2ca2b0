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
//!
//! While a CUDA graph is being captured, allocations come from a [`GraphPool`] instead: a
//! captured graph keeps the addresses it was recorded with, so its memory must never be handed
//! to anyone else (or back to the driver) while the graph may still be replayed. The pool's
//! blocks return to the arena's cache only when the pool (and every graph holding it) is
//! dropped. Graphs that share one pool must never run concurrently (one stream: they don't).

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

/// Cached blocks by size.
type FreeList = BTreeMap<usize, Vec<sys::CUdeviceptr>>;

#[derive(Default)]
struct Pool {
    free: FreeList,
    stats: MemoryStats,
    /// Where allocations go while a graph is being captured.
    capture: Option<Arc<GraphPool>>,
}

/// The smallest cached block that fits `size` and wastes at most a quarter of itself,
/// removed from `free`: (its size, its address).
fn take_fit(free: &mut FreeList, size: usize) -> Option<(usize, sys::CUdeviceptr)> {
    let s = free
        .range(size..=size + size / 3)
        .find(|(_, v)| !v.is_empty())
        .map(|(&s, _)| s)?;
    let list = free.get_mut(&s)?;
    let ptr = list.pop()?;
    if list.is_empty() {
        free.remove(&s);
    }
    Some((s, ptr))
}

/// Device memory private to captured graphs (see the module doc). Its blocks count as live
/// in the arena's stats for as long as the pool holds them.
pub struct GraphPool {
    arena: Arc<Arena>,
    free: Mutex<FreeList>,
}

impl GraphPool {
    pub(crate) fn new(arena: Arc<Arena>) -> Arc<GraphPool> {
        Arc::new(GraphPool {
            arena,
            free: Mutex::new(FreeList::new()),
        })
    }

    fn lock_free(&self) -> MutexGuard<'_, FreeList> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for GraphPool {
    fn drop(&mut self) {
        // Every block of the pool is free now (a live buffer would hold the pool): hand
        // them to the arena's cache.
        let blocks = std::mem::take(&mut *self.lock_free());
        let mut pool = self.arena.lock();
        for (size, ptrs) in blocks {
            pool.stats.live -= size * ptrs.len();
            pool.stats.cached += size * ptrs.len();
            pool.free.entry(size).or_default().extend(ptrs);
        }
    }
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
    /// The graph pool the block belongs to, if it was allocated during a capture.
    graph: Option<Arc<GraphPool>>,
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
        if self.bytes == 0 {
            return;
        }
        if let Some(graph) = &self.graph {
            graph
                .lock_free()
                .entry(self.bytes)
                .or_default()
                .push(self.ptr);
        } else {
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

    /// `bytes` of uninitialised device memory (from the capturing graph's pool during a
    /// capture).
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> CudaResult<DeviceBuffer> {
        let buffer = |ptr, bytes, graph| DeviceBuffer {
            ptr,
            bytes,
            arena: self.clone(),
            graph,
        };
        if bytes == 0 {
            return Ok(buffer(0, 0, None));
        }
        let size = round_size(bytes);
        let mut pool = self.lock();
        let graph = pool.capture.clone();
        let reuse = graph
            .as_ref()
            .and_then(|g| take_fit(&mut g.lock_free(), size));
        if let Some((s, ptr)) = reuse {
            return Ok(buffer(ptr, s, graph));
        }
        if let Some((s, ptr)) = take_fit(&mut pool.free, size) {
            // A cached block; during a capture it moves to the graph's pool for good.
            pool.stats.cached -= s;
            pool.stats.live += s;
            pool.stats.peak_live = pool.stats.peak_live.max(pool.stats.live);
            return Ok(buffer(ptr, s, graph));
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
        Ok(buffer(ptr, size, graph))
    }

    /// Routes allocations to `graph` (a capture begins) or back to the arena (it ends).
    pub(crate) fn set_capture(&self, graph: Option<Arc<GraphPool>>) {
        self.lock().capture = graph;
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
