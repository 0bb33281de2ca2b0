//! [`CudaBackend`]: everything one GPU needs — its context and stream, the memory arena, the
//! cuBLASLt handle and the loaded kernel modules. One per ordinal, created on first use and
//! shared (`CudaBackend::get`).
//!
//! All work of a backend is queued on its single stream, which is what makes the arena's
//! reuse safe and keeps ops in program order without events.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaStream, DriverError, result, sys,
};

use super::arena::{Arena, DeviceBuffer, GraphPool, MemoryStats};
use super::blas::{Blas, Gemm};
use super::cache::KernelCache;
use super::error::{CudaError, CudaResult};
use super::kernels::Module;
use super::libs::{Library, require};
use super::nvrtc::Arch;

/// cuBLASLt's recommended workspace on Hopper.
const BLAS_WORKSPACE: usize = 32 << 20;

/// A kernel function ready to launch, with the dynamic shared memory it has been allowed.
#[derive(Clone)]
pub(crate) struct Kernel {
    func: CudaFunction,
    name: &'static str,
}

pub struct CudaBackend {
    ordinal: usize,
    arch: Arch,
    name: String,
    sm_count: u32,
    /// Largest dynamic shared memory a block may opt into.
    max_smem: u32,
    cache: KernelCache,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    kernels: Mutex<HashMap<&'static str, (Kernel, u32)>>,
    // Field order is drop order: the cuBLASLt handle goes before its workspace, both before
    // the arena and the stream they use.
    blas: Mutex<Blas>,
    _blas_workspace: DeviceBuffer,
    /// Set while the stream is being captured into a graph: host copies and waits are
    /// refused then (a captured copy would re-read host memory at every replay).
    capturing: AtomicBool,
    arena: Arc<Arena>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBackend(cuda:{}, {}, {})",
            self.ordinal, self.name, self.arch
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every guarded structure stays consistent across a panic (single-step updates).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Maps a driver error to a typed error naming the call and the device.
pub(crate) fn driver_err(call: &'static str, ordinal: usize) -> impl Fn(DriverError) -> CudaError {
    move |e| CudaError::Driver {
        call,
        ordinal,
        msg: e.to_string(),
    }
}

impl CudaBackend {
    /// The backend of GPU `ordinal`, created on first use (libraries checked, context,
    /// stream, arena, cuBLASLt). Later calls return the same backend.
    pub fn get(ordinal: usize) -> CudaResult<Arc<CudaBackend>> {
        static BACKENDS: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
        let mut all = lock(BACKENDS.get_or_init(|| Mutex::new(HashMap::new())));
        if let Some(b) = all.get(&ordinal) {
            return Ok(b.clone());
        }
        let backend = Arc::new(CudaBackend::create(ordinal, KernelCache::new(None))?);
        all.insert(ordinal, backend.clone());
        Ok(backend)
    }

    fn create(ordinal: usize, cache: KernelCache) -> CudaResult<CudaBackend> {
        require(&[Library::Driver, Library::Nvrtc, Library::CublasLt])?;
        let err = |call| driver_err(call, ordinal);
        result::init().map_err(|e| CudaError::Device {
            ordinal,
            msg: format!("cuInit failed ({e}): no usable NVIDIA GPU or driver"),
        })?;
        let count = CudaContext::device_count().map_err(err("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::Device {
                ordinal,
                msg: format!("no such GPU ({count} visible)"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(err("cuDevicePrimaryCtxRetain"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(err("cuDeviceGetAttribute"))?;
        let arch = Arch {
            major: major as u32,
            minor: minor as u32,
        };
        let name = ctx.name().map_err(err("cuDeviceGetName"))?;
        let attr = |a| ctx.attribute(a).map_err(err("cuDeviceGetAttribute"));
        let sm_count =
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_smem =
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
                as u32;
        let stream = ctx.new_stream().map_err(err("cuStreamCreate"))?;
        let arena = Arena::new(ctx.clone());
        let workspace = arena.alloc(BLAS_WORKSPACE)?;
        let blas = Blas::new(workspace.ptr(), workspace.bytes())?;
        Ok(CudaBackend {
            ordinal,
            arch,
            name,
            sm_count,
            max_smem,
            cache,
            modules: Mutex::new(HashMap::new()),
            kernels: Mutex::new(HashMap::new()),
            blas: Mutex::new(blas),
            _blas_workspace: workspace,
            capturing: AtomicBool::new(false),
            arena,
            stream,
            ctx,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's architecture (its compute capability), which kernels are compiled for.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The device's name, e.g. "NVIDIA H200".
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    pub fn memory_stats(&self) -> MemoryStats {
        self.arena.stats()
    }

    pub fn reset_peak_memory(&self) {
        self.arena.reset_peak()
    }

    /// Returns the arena's cached (free) blocks to the driver, e.g. between benchmarks.
    pub fn trim_memory(&self) {
        self.arena.trim()
    }

    /// Waits until every queued op has run; reports any error a kernel raised meanwhile.
    pub fn synchronize(&self) -> CudaResult<()> {
        self.refuse_in_capture("a wait for the stream")?;
        self.stream
            .synchronize()
            .map_err(driver_err("cuStreamSynchronize", self.ordinal))
    }

    /// GPU time of the work `f` queues, in milliseconds, measured with CUDA events.
    pub fn time_ms<E: From<CudaError>>(
        &self,
        mut f: impl FnMut() -> Result<(), E>,
    ) -> Result<f32, E> {
        let err = |call| driver_err(call, self.ordinal);
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(timing).map_err(err("cuEventCreate"))?;
        let end = self.ctx.new_event(timing).map_err(err("cuEventCreate"))?;
        start.record(&self.stream).map_err(err("cuEventRecord"))?;
        f()?;
        end.record(&self.stream).map_err(err("cuEventRecord"))?;
        Ok(start.elapsed_ms(&end).map_err(err("cuEventElapsedTime"))?)
    }

    pub(crate) fn bind(&self) -> CudaResult<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver_err("cuCtxSetCurrent", self.ordinal))
    }

    /// `bytes` of uninitialised device memory from the arena.
    pub(crate) fn alloc(&self, bytes: usize) -> CudaResult<DeviceBuffer> {
        self.arena.alloc(bytes)
    }

    /// Zero-filled device memory (queued on the stream).
    pub(crate) fn alloc_zeroed(&self, bytes: usize) -> CudaResult<DeviceBuffer> {
        let buf = self.alloc(bytes)?;
        if bytes > 0 {
            self.bind()?;
            // SAFETY: the buffer holds at least `bytes`.
            unsafe { result::memset_d8_async(buf.ptr(), 0, bytes, self.stream.cu_stream()) }
                .map_err(driver_err("cuMemsetD8Async", self.ordinal))?;
        }
        Ok(buf)
    }

    /// A device copy of `data`. Pageable host memory is staged by the driver before the call
    /// returns, so `data` may be dropped right after.
    pub(crate) fn upload<T: Copy>(&self, data: &[T]) -> CudaResult<DeviceBuffer> {
        let buf = self.alloc(std::mem::size_of_val(data))?;
        self.upload_into(&buf, data)?;
        Ok(buf)
    }

    /// Copies `data` into the start of `buf` (queued on the stream).
    pub(crate) fn upload_into<T: Copy>(&self, buf: &DeviceBuffer, data: &[T]) -> CudaResult<()> {
        let bytes = std::mem::size_of_val(data);
        assert!(
            bytes <= buf.bytes(),
            "upload of {bytes} bytes into a {} byte buffer",
            buf.bytes()
        );
        if bytes == 0 {
            return Ok(());
        }
        self.refuse_in_capture("a host-to-device copy")?;
        self.bind()?;
        // SAFETY: the destination holds at least `bytes`; the source is a live slice.
        unsafe { result::memcpy_htod_async(buf.ptr(), data, self.stream.cu_stream()) }
            .map_err(driver_err("cuMemcpyHtoDAsync", self.ordinal))
    }

    /// Copies the start of `buf` into `out`, waiting for all queued work first.
    pub(crate) fn download<T: Copy>(&self, buf: &DeviceBuffer, out: &mut [T]) -> CudaResult<()> {
        let bytes = std::mem::size_of_val(out);
        assert!(
            bytes <= buf.bytes(),
            "download of {bytes} bytes from a {} byte buffer",
            buf.bytes()
        );
        if bytes == 0 {
            return Ok(());
        }
        self.refuse_in_capture("a device-to-host copy")?;
        self.bind()?;
        // SAFETY: the source holds at least `bytes`; `out` stays borrowed until the
        // synchronize below has completed the copy.
        unsafe { result::memcpy_dtoh_async(out, buf.ptr(), self.stream.cu_stream()) }
            .map_err(driver_err("cuMemcpyDtoHAsync", self.ordinal))?;
        self.synchronize()
    }

    /// Queues a device-to-device copy of `bytes` from `src` to `dst`.
    pub(crate) fn copy(
        &self,
        dst: &DeviceBuffer,
        src: &DeviceBuffer,
        bytes: usize,
    ) -> CudaResult<()> {
        assert!(bytes <= dst.bytes() && bytes <= src.bytes());
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both buffers hold at least `bytes`.
        unsafe { result::memcpy_dtod_async(dst.ptr(), src.ptr(), bytes, self.stream.cu_stream()) }
            .map_err(driver_err("cuMemcpyDtoDAsync", self.ordinal))
    }

    /// The named kernel of `module`, compiling (or reading from the disk cache) and loading the
    /// module on first use.
    pub(crate) fn kernel(&self, module: Module, name: &'static str) -> CudaResult<Kernel> {
        if let Some((k, _)) = lock(&self.kernels).get(name) {
            return Ok(k.clone());
        }
        let loaded = {
            let mut modules = lock(&self.modules);
            match modules.get(&module) {
                Some(m) => m.clone(),
                None => {
                    let (cubin, _, _) = self.cache.load_or_compile(module, self.arch, false)?;
                    self.bind()?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                        .map_err(driver_err("cuModuleLoadData", self.ordinal))?;
                    modules.insert(module, m.clone());
                    m
                }
            }
        };
        let func = loaded.load_function(name).map_err(|e| CudaError::Driver {
            call: "cuModuleGetFunction",
            ordinal: self.ordinal,
            msg: format!("kernel {name} of kernels/{}.cu: {e}", module.name()),
        })?;
        let kernel = Kernel { func, name };
        lock(&self.kernels).insert(name, (kernel.clone(), 48 << 10));
        Ok(kernel)
    }

    /// Queues `kernel` on the stream.
    ///
    /// # Safety
    /// `params` must hold one pointer per kernel parameter, each to a value of exactly the
    /// parameter's type, and every device pointer among them must stay valid until the
    /// kernel has run.
    pub(crate) unsafe fn launch(
        &self,
        kernel: &Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: &mut [*mut c_void],
    ) -> CudaResult<()> {
        self.bind()?;
        if smem > 48 << 10 {
            let mut kernels = lock(&self.kernels);
            let allowed = kernels
                .get(kernel.name)
                .map(|(_, a)| *a)
                .unwrap_or(48 << 10);
            if smem > allowed {
                if smem > self.max_smem {
                    return Err(CudaError::Device {
                        ordinal: self.ordinal,
                        msg: format!(
                            "{} needs {smem} bytes of shared memory, the device allows {}",
                            kernel.name, self.max_smem
                        ),
                    });
                }
                kernel
                    .func
                    .set_attribute(
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem as i32,
                    )
                    .map_err(driver_err("cuFuncSetAttribute", self.ordinal))?;
                kernels.insert(kernel.name, (kernel.clone(), smem));
            }
        }
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            result::launch_kernel(
                kernel.func.cu_function(),
                grid,
                block,
                smem,
                self.stream.cu_stream(),
                params,
            )
        }
        .map_err(|e| CudaError::Driver {
            call: "cuLaunchKernel",
            ordinal: self.ordinal,
            msg: format!("{}: {e}", kernel.name),
        })
    }

    /// [`CudaBackend::launch`] on a 1-D grid of `blocks` blocks of `threads` threads, with no
    /// dynamic shared memory: how every grid-stride kernel is queued.
    ///
    /// # Safety
    /// As [`CudaBackend::launch`].
    pub(crate) unsafe fn launch_1d(
        &self,
        kernel: &Kernel,
        blocks: u32,
        threads: u32,
        params: &mut [*mut c_void],
    ) -> CudaResult<()> {
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.launch(kernel, (blocks, 1, 1), (threads, 1, 1), 0, params) }
    }

    /// Queues a cuBLASLt GEMM on the stream.
    ///
    /// # Safety
    /// As [`Blas::gemm`]: the pointers must cover the shapes and outlive the queued work.
    pub(crate) unsafe fn gemm(&self, g: &Gemm) -> CudaResult<()> {
        self.bind()?;
        let mut blas = lock(&self.blas);
        // SAFETY: forwarded from the caller's contract; the stream belongs to this context.
        unsafe { blas.gemm(g, self.stream.cu_stream() as _) }
    }

    /// A new pool for the memory of captured graphs; graphs that never run at the same time
    /// (all of one backend: one stream) can share one.
    pub fn graph_pool(&self) -> Arc<GraphPool> {
        GraphPool::new(self.arena.clone())
    }

    /// Records the work `f` queues into a CUDA graph instead of running it, allocating from
    /// `pool`, and returns the graph with `f`'s result (device tensors `f` returns live in
    /// `pool`; each [`Graph::launch`] rewrites them).
    ///
    /// `f` must queue only kernels, GEMMs and device-side copies: host copies and stream waits
    /// fail inside a capture (they would be baked into the graph), and so does `f` then. Every
    /// kernel argument is frozen at capture, so what varies between launches must be read by
    /// the kernels from device memory that the caller rewrites before each launch.
    pub fn capture<T, E: From<CudaError>>(
        &self,
        pool: &Arc<GraphPool>,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<(Graph, T), E> {
        let err = |call| driver_err(call, self.ordinal);
        self.refuse_in_capture("a nested capture")?;
        // Relaxed: allocating device memory (the pool growing) is allowed meanwhile.
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(err("cuStreamBeginCapture"))?;
        self.capturing.store(true, Ordering::SeqCst);
        self.arena.set_capture(Some(pool.clone()));
        let out = f();
        self.arena.set_capture(None);
        self.capturing.store(false, Ordering::SeqCst);
        // End the capture whatever `f` returned, so the stream is usable again.
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(err("cuStreamEndCapture"));
        let out = out?;
        let graph = graph?.ok_or_else(|| CudaError::Device {
            ordinal: self.ordinal,
            msg: "the stream capture returned no graph".into(),
        })?;
        Ok((
            Graph {
                graph,
                _pool: pool.clone(),
                ordinal: self.ordinal,
            },
            out,
        ))
    }

    fn refuse_in_capture(&self, what: &str) -> CudaResult<()> {
        if self.capturing.load(Ordering::SeqCst) {
            return Err(CudaError::Device {
                ordinal: self.ordinal,
                msg: format!("{what} cannot be captured into a CUDA graph"),
            });
        }
        Ok(())
    }
}

/// A captured CUDA graph (see [`CudaBackend::capture`]), replayed on its backend's stream.
pub struct Graph {
    graph: CudaGraph,
    /// The memory the graph's kernels use: it must outlive the graph.
    _pool: Arc<GraphPool>,
    ordinal: usize,
}

impl Graph {
    /// Queues one replay of the graph.
    pub fn launch(&self) -> CudaResult<()> {
        self.graph
            .launch()
            .map_err(driver_err("cuGraphLaunch", self.ordinal))
    }
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Graph(cuda:{})", self.ordinal)
    }
}

/// Kernel parameters for [`CudaBackend::launch`]: `params![a, b, c]` gives the array of
/// pointers to each argument. Only plain variables are accepted, so no pointer can outlive a
/// temporary; each variable's type must be exactly the kernel parameter's.
macro_rules! params {
    ($($arg:ident),* $(,)?) => {
        [$(&$arg as *const _ as *mut ::std::ffi::c_void),*]
    };
}
pub(crate) use params;
