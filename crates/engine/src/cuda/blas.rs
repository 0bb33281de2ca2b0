//! GEMMs through cuBLASLt: bf16 operands, f32 accumulation, bf16 or f32 output, and the
//! bias epilogue (qwen2's q/k/v biases) so a biased projection is still one kernel.
//!
//! Everything is phrased row-major, as the rest of the engine is:
//! `out[r, c] = Σ_k x[r, k] · w[c, k] (+ bias[c])`, i.e. `x · wᵀ` with HF's `[out, in]`
//! weights. cuBLASLt is column-major, so this is its "TN" problem with m = cols, n = rows.
//!
//! Descriptors, layouts and the heuristic's algorithm are built once per shape (and pointer
//! alignment class) and cached: a decoder runs the same handful of shapes every layer.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;

use super::error::{CudaError, CudaResult};

/// Element type of a GEMM's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutType {
    Bf16,
    F32,
}

/// One row-major GEMM `out[rows, cols] = x[rows, k] · w[cols, k]ᵀ (+ bias[cols])`.
/// Leading dimensions are in elements.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub rows: usize,
    pub cols: usize,
    pub k: usize,
    pub x: u64,
    pub ld_x: usize,
    pub w: u64,
    pub ld_w: usize,
    pub out: u64,
    pub ld_out: usize,
    pub out_type: OutType,
    /// bf16 for a bf16 output, f32 for an f32 output (cuBLASLt's default bias type).
    pub bias: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    rows: usize,
    cols: usize,
    k: usize,
    ld_x: usize,
    ld_w: usize,
    ld_out: usize,
    out_type: OutType,
    bias: bool,
    /// Alignment classes (bytes, ≤ 256) of x, w, out, bias: the heuristic may only pick
    /// kernels that the actual pointers satisfy.
    align: [u32; 4],
}

/// Owned cuBLASLt matrix layout.
struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    fn new(ty: sys::cudaDataType, rows: u64, cols: u64, ld: usize) -> CudaResult<Layout> {
        lt::create_matrix_layout(ty, rows, cols, ld as i64)
            .map(Layout)
            .map_err(blas_err("cublasLtMatrixLayoutCreate"))
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created in `Layout::new`, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

/// Owned cuBLASLt matmul descriptor.
struct Desc(sys::cublasLtMatmulDesc_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created in `Blas::build`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

/// Owned cuBLASLt preference (only needed while the heuristic runs).
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created in `Blas::build`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

struct Plan {
    desc: Desc,
    a: Layout,
    b: Layout,
    d: Layout,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// A cuBLASLt handle with its workspace and plan cache. Not shared between threads without
/// the backend's lock around it.
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    workspace_bytes: usize,
    plans: HashMap<PlanKey, Plan>,
}

// SAFETY: the handle and plans are plain cuBLASLt objects; the backend serialises all use
// through a Mutex.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle was created in `new` and is destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

fn blas_err(call: &'static str) -> impl Fn(lt::CublasError) -> CudaError {
    move |e| CudaError::Blas {
        call,
        msg: format!("{:?}", e.0),
    }
}

fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

impl Blas {
    /// A handle using `workspace` (device memory of `workspace_bytes`, owned by the caller
    /// for the handle's lifetime).
    pub(crate) fn new(workspace: u64, workspace_bytes: usize) -> CudaResult<Blas> {
        let handle = lt::create_handle().map_err(blas_err("cublasLtCreate"))?;
        Ok(Blas {
            handle,
            workspace,
            workspace_bytes,
            plans: HashMap::new(),
        })
    }

    fn plan(&mut self, key: PlanKey) -> CudaResult<&Plan> {
        if !self.plans.contains_key(&key) {
            let plan = self.build(&key)?;
            self.plans.insert(key, plan);
        }
        Ok(&self.plans[&key])
    }

    fn build(&self, key: &PlanKey) -> CudaResult<Plan> {
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let out_type = match key.out_type {
            OutType::Bf16 => bf16,
            OutType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        };
        let (m, n, k) = (key.cols as u64, key.rows as u64, key.k as u64);
        // Column-major: A is w stored k × cols (transposed), B is x stored k × rows.
        let a = Layout::new(bf16, k, m, key.ld_w)?;
        let b = Layout::new(bf16, k, n, key.ld_x)?;
        let d = Layout::new(out_type, m, n, key.ld_out)?;
        let desc = Desc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(blas_err("cublasLtMatmulDescCreate"))?,
        );
        let set_desc = |attr, value: *const c_void, size| {
            // SAFETY: `value` points at `size` readable bytes of the attribute's type.
            unsafe { lt::set_matmul_desc_attribute(desc.0, attr, value, size) }
                .map_err(blas_err("cublasLtMatmulDescSetAttribute"))
        };
        // cublasOperation_t (cublas_api.h; not in cudarc's cublasLt bindings).
        const CUBLAS_OP_N: i32 = 0;
        const CUBLAS_OP_T: i32 = 1;
        let (trans, no_trans) = (CUBLAS_OP_T, CUBLAS_OP_N);
        use sys::cublasLtMatmulDescAttributes_t as D;
        set_desc(
            D::CUBLASLT_MATMUL_DESC_TRANSA,
            &trans as *const i32 as *const c_void,
            size_of::<i32>(),
        )?;
        set_desc(
            D::CUBLASLT_MATMUL_DESC_TRANSB,
            &no_trans as *const i32 as *const c_void,
            size_of::<i32>(),
        )?;
        if key.bias {
            let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set_desc(
                D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const sys::cublasLtEpilogue_t as *const c_void,
                size_of::<sys::cublasLtEpilogue_t>(),
            )?;
        }

        let pref =
            Pref(lt::create_matmul_pref().map_err(blas_err("cublasLtMatmulPreferenceCreate"))?);
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let set_pref = |attr, value: *const c_void, size| {
            // SAFETY: `value` points at `size` readable bytes of the attribute's type.
            unsafe { lt::set_matmul_pref_attribute(pref.0, attr, value, size) }
                .map_err(blas_err("cublasLtMatmulPreferenceSetAttribute"))
        };
        let ws = self.workspace_bytes as u64;
        set_pref(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws as *const u64 as *const c_void,
            size_of::<u64>(),
        )?;
        let attrs = [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, // x is B
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, // w is A
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ];
        let aligns = [key.align[0], key.align[1], key.align[2], key.align[2]];
        for (attr, align) in attrs.into_iter().zip(aligns) {
            set_pref(
                attr,
                &align as *const u32 as *const c_void,
                size_of::<u32>(),
            )?;
        }
        // SAFETY: all handles are live; D uses the same layout as C (beta = 0).
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, d.0, d.0, pref.0)
        }
        .map_err(|e| CudaError::Blas {
            call: "cublasLtMatmulAlgoGetHeuristic",
            msg: format!(
                "{:?} for out[{}, {}] = x[{}, {}]·wᵀ ({:?} out, bias {})",
                e.0, key.rows, key.cols, key.rows, key.k, key.out_type, key.bias
            ),
        })?;
        Ok(Plan {
            desc,
            a,
            b,
            d,
            algo: heuristic.algo,
        })
    }

    /// Queues `g` on `stream`.
    ///
    /// # Safety
    /// Every pointer of `g` must address live device memory of the size its shape implies,
    /// and stay alive until the stream has run the GEMM.
    pub(crate) unsafe fn gemm(&mut self, g: &Gemm, stream: sys::cudaStream_t) -> CudaResult<()> {
        let key = PlanKey {
            rows: g.rows,
            cols: g.cols,
            k: g.k,
            ld_x: g.ld_x,
            ld_w: g.ld_w,
            ld_out: g.ld_out,
            out_type: g.out_type,
            bias: g.bias.is_some(),
            align: [
                alignment(g.x),
                alignment(g.w),
                alignment(g.out),
                g.bias.map(alignment).unwrap_or(256),
            ],
        };
        let (handle, workspace, workspace_bytes) =
            (self.handle, self.workspace, self.workspace_bytes);
        let plan = self.plan(key)?;
        if let Some(bias) = g.bias {
            // The pointer is per call; the rest of the descriptor is per shape.
            // SAFETY: the attribute is a device pointer, passed by address.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc.0,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias as *const u64 as *const c_void,
                    size_of::<u64>(),
                )
            }
            .map_err(blas_err("cublasLtMatmulDescSetAttribute"))?;
        }
        let alpha = 1.0f32;
        let beta = 0.0f32;
        // SAFETY: the caller guarantees the pointers; the plan's layouts match the shape.
        unsafe {
            lt::matmul(
                handle,
                plan.desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                g.w as *const c_void,
                plan.a.0,
                g.x as *const c_void,
                plan.b.0,
                g.out as *const c_void,
                plan.d.0,
                g.out as *mut c_void,
                plan.d.0,
                &plan.algo,
                workspace as *mut c_void,
                workspace_bytes,
                stream,
            )
        }
        .map_err(|e| CudaError::Blas {
            call: "cublasLtMatmul",
            msg: format!(
                "{:?} for out[{}, {}] = x[{}, {}]·wᵀ",
                e.0, g.rows, g.cols, g.rows, g.k
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_classes() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0), 256);
    }
}
