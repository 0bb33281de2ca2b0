//! GEMMs through cuBLASLt: bf16 operands, f32 accumulation, bf16 or f32 output, the bias
//! epilogue (qwen2's q/k/v biases) so a biased projection is still one kernel, either operand
//! read transposed (the backward's `dy · W` and `dyᵀ · x`), and accumulation into the output
//! (beta = 1: a gradient summed over vocabulary or token chunks), scaled by `alpha` (LoRA's
//! scaling folded into the GEMM instead of a separate scale kernel).
//!
//! Everything is phrased row-major, as the rest of the engine is:
//! `out[r, c] (+)= Σ_k X[r, k] · Y[k, c] (+ bias[c])`, where X [rows, k] is read from `x`
//! stored `[rows, k]` or `[k, rows]`, and Y [k, cols] from `w` stored `[cols, k]` (HF's
//! `[out, in]` weights: the forward's `x · wᵀ`) or `[k, cols]` — see [`KAxis`]. cuBLASLt is
//! column-major, and a row-major `[r, c]` matrix is a column-major `[c, r]` one with the
//! same leading dimension, so it computes `outᵀ = Yᵀ · Xᵀ` with m = cols, n = rows: A is w,
//! B is x. The forward's layouts make that cuBLASLt's "TN" problem; each `KAxis::First`
//! operand flips its transpose flag.
//!
//! Descriptors, layouts and the heuristic's algorithm are built once per shape (and pointer
//! alignment class) and cached: a decoder runs the same handful of shapes every layer. alpha
//! and beta are launch arguments, not part of a plan.
//!
//! Strided views are GEMM operands like any other: a column range `[:, c0..c0 + n]` of a
//! row-major `[T, N]` matrix is the pointer `base + c0` elements with leading dimension N. Such
//! a pointer may be aligned to as little as one element (2 bytes for bf16); the plan key
//! carries the alignment class, so the heuristic only picks kernels the pointer satisfies. If
//! it finds none, [`Blas::gemm`] fails with an error that [`no_algorithm`] recognises (and the
//! shape is remembered, so a caller that falls back pays for the heuristic once).

use std::collections::{HashMap, HashSet};
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

/// Where the reduction axis k lies in an operand stored row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KAxis {
    /// x: [rows, k], w: [cols, k] — the forward's `x · wᵀ` with HF's `[out, in]` weights.
    Last,
    /// x: [k, rows], w: [k, cols] — a backward's operands: `dy · W` reads W `[out, in]` as
    /// [k, cols]; `dyᵀ · x` reads dy `[T, out]` as [k, rows] and x `[T, in]` as [k, cols].
    First,
}

impl KAxis {
    /// How an operand with `outer` rows (x) or cols (w) enters the product, for messages:
    /// its stored shape, marked ᵀ when it is read transposed.
    fn operand(self, name: &str, outer: usize, k: usize, stored_as_used: KAxis) -> String {
        let shape = match self {
            KAxis::Last => format!("[{outer}, {k}]"),
            KAxis::First => format!("[{k}, {outer}]"),
        };
        let mark = if self == stored_as_used { "" } else { "ᵀ" };
        format!("{name}{shape}{mark}")
    }
}

/// One row-major GEMM `out[rows, cols] (+)= alpha · X[rows, k] · Y[k, cols] (+ bias[cols])`, X
/// read from `x` and Y from `w`, each stored as its [`KAxis`] says. Leading dimensions are in
/// elements: the row stride of each matrix as stored.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub rows: usize,
    pub cols: usize,
    pub k: usize,
    pub x: u64,
    pub ld_x: usize,
    /// `Last`: x is [rows, k]; `First`: x is [k, rows].
    pub x_k: KAxis,
    pub w: u64,
    pub ld_w: usize,
    /// `Last`: w is [cols, k]; `First`: w is [k, cols].
    pub w_k: KAxis,
    pub out: u64,
    pub ld_out: usize,
    pub out_type: OutType,
    /// Adds the product to what `out` holds (beta = 1) instead of overwriting it (beta = 0).
    pub accumulate: bool,
    /// bf16 for a bf16 output, f32 for an f32 output (cuBLASLt's default bias type).
    pub bias: Option<u64>,
    /// Multiplies the product (not the bias, not what `out` held): cuBLASLt's alpha. 1 unless
    /// set with [`Gemm::scaled`]; a launch argument, so it shares the plan of its shape.
    pub alpha: f32,
}

impl Gemm {
    /// `out = x · wᵀ` with x [rows, k] and w [cols, k], both dense, and a dense output: the
    /// forward's GEMM, the starting point the other forms are written from.
    pub(crate) fn nt(
        [rows, cols, k]: [usize; 3],
        x: u64,
        w: u64,
        out: u64,
        out_type: OutType,
    ) -> Gemm {
        Gemm {
            rows,
            cols,
            k,
            x,
            ld_x: k,
            x_k: KAxis::Last,
            w,
            ld_w: k,
            w_k: KAxis::Last,
            out,
            ld_out: cols,
            out_type,
            accumulate: false,
            bias: None,
            alpha: 1.0,
        }
    }

    /// `out[rows, cols] (+)= x[rows, k] · w[k, cols]`, all dense (e.g. dx = dy · W).
    pub(crate) fn nn(
        [rows, cols, k]: [usize; 3],
        x: u64,
        w: u64,
        out: u64,
        out_type: OutType,
    ) -> Gemm {
        Gemm {
            ld_w: cols,
            w_k: KAxis::First,
            ..Gemm::nt([rows, cols, k], x, w, out, out_type)
        }
    }

    /// `out[rows, cols] (+)= x[k, rows]ᵀ · w[k, cols]`, all dense: a sum over the k rows the
    /// operands share (e.g. dW = dyᵀ · x over the tokens).
    pub(crate) fn tn(
        [rows, cols, k]: [usize; 3],
        x: u64,
        w: u64,
        out: u64,
        out_type: OutType,
    ) -> Gemm {
        Gemm {
            ld_x: rows,
            x_k: KAxis::First,
            ..Gemm::nn([rows, cols, k], x, w, out, out_type)
        }
    }

    /// The same GEMM adding into `out` (beta = 1) when `accumulate`.
    pub(crate) fn accumulating(self, accumulate: bool) -> Gemm {
        Gemm { accumulate, ..self }
    }

    /// The same GEMM with its product multiplied by `alpha`.
    pub(crate) fn scaled(self, alpha: f32) -> Gemm {
        Gemm { alpha, ..self }
    }

    /// The plan this GEMM runs with.
    fn key(&self) -> PlanKey {
        PlanKey {
            rows: self.rows,
            cols: self.cols,
            k: self.k,
            ld_x: self.ld_x,
            ld_w: self.ld_w,
            ld_out: self.ld_out,
            x_k: self.x_k,
            w_k: self.w_k,
            out_type: self.out_type,
            accumulate: self.accumulate,
            bias: self.bias.is_some(),
            align: [
                alignment(self.x),
                alignment(self.w),
                alignment(self.out),
                self.bias.map(alignment).unwrap_or(256),
            ],
        }
    }
}

/// What a plan depends on: the shape, layouts and types, and the pointers' alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    rows: usize,
    cols: usize,
    k: usize,
    ld_x: usize,
    ld_w: usize,
    ld_out: usize,
    x_k: KAxis,
    w_k: KAxis,
    out_type: OutType,
    /// beta = 1 (C, the output itself, is read). The heuristic is not told beta; keeping it
    /// in the key only means a plan is never shared between the two, at one more plan.
    accumulate: bool,
    bias: bool,
    /// Alignment classes (bytes, ≤ 256) of x, w, out, bias: the heuristic may only pick
    /// kernels that the actual pointers satisfy.
    align: [u32; 4],
}

/// One GEMM operand as cuBLASLt sees it: a column-major `rows × cols` matrix with leading
/// dimension `ld`, read transposed or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Operand {
    rows: u64,
    cols: u64,
    ld: usize,
    trans: bool,
}

impl PlanKey {
    /// A (from w) and B (from x) for cuBLASLt's `D = op(A) · op(B)`, with D = outᵀ seen
    /// column-major: m = cols, n = rows. A row-major [r, c] matrix is column-major [c, r],
    /// so op(A) must be m × k and op(B) k × n:
    /// - w [cols, k] is stored k × m (transpose it), w [k, cols] is stored m × k;
    /// - x [rows, k] is stored k × n, x [k, rows] is stored n × k (transpose it).
    fn operands(&self) -> (Operand, Operand) {
        let (m, n, k) = (self.cols as u64, self.rows as u64, self.k as u64);
        let operand = |stored: (u64, u64), ld, trans| Operand {
            rows: stored.0,
            cols: stored.1,
            ld,
            trans,
        };
        let a = match self.w_k {
            KAxis::Last => operand((k, m), self.ld_w, true),
            KAxis::First => operand((m, k), self.ld_w, false),
        };
        let b = match self.x_k {
            KAxis::Last => operand((k, n), self.ld_x, false),
            KAxis::First => operand((n, k), self.ld_x, true),
        };
        (a, b)
    }

    /// `out[rows, cols] (+)= x · w` with the operands' stored shapes, for error messages.
    fn describe(&self) -> String {
        let (r, c, k) = (self.rows, self.cols, self.k);
        format!(
            "out[{r}, {c}] {} {} · {} ({:?} out{})",
            if self.accumulate { "+=" } else { "=" },
            // The product reads x as [rows, k] and w as [k, cols].
            self.x_k.operand("x", r, k, KAxis::Last),
            self.w_k.operand("w", c, k, KAxis::First),
            self.out_type,
            if self.bias { ", bias" } else { "" }
        )
    }
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
    /// Shapes the heuristic found no algorithm for: refused again without asking it.
    unsupported: HashSet<PlanKey>,
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

/// The call named by the error of a GEMM the heuristic found no algorithm for.
const HEURISTIC: &str = "cublasLtMatmulAlgoGetHeuristic";
/// How that error's message starts (cudarc reports "no algorithm" as NOT_SUPPORTED).
const NOT_SUPPORTED: &str = "CUBLAS_STATUS_NOT_SUPPORTED";

/// The error of a GEMM that cuBLASLt has no algorithm for: a layout or pointer alignment its
/// kernels do not handle (a caller may fall back to dense, aligned copies).
fn no_algorithm_err(key: &PlanKey) -> CudaError {
    CudaError::Blas {
        call: HEURISTIC,
        msg: format!(
            "{NOT_SUPPORTED}: no algorithm for {} with leading dimensions x {}, w {}, out {} \
             and pointers aligned to x {}, w {}, out {} bytes",
            key.describe(),
            key.ld_x,
            key.ld_w,
            key.ld_out,
            key.align[0],
            key.align[1],
            key.align[2]
        ),
    }
}

/// Whether `e` says that cuBLASLt has no algorithm for a GEMM's shape, layouts and pointer
/// alignment (as opposed to a failure that a fallback would meet too).
pub(crate) fn no_algorithm(e: &CudaError) -> bool {
    matches!(e, CudaError::Blas { call, msg } if *call == HEURISTIC && msg.starts_with(NOT_SUPPORTED))
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
            unsupported: HashSet::new(),
        })
    }

    fn plan(&mut self, key: PlanKey) -> CudaResult<&Plan> {
        if self.unsupported.contains(&key) {
            return Err(no_algorithm_err(&key));
        }
        if !self.plans.contains_key(&key) {
            let plan = match self.build(&key) {
                Ok(plan) => plan,
                Err(e) => {
                    if no_algorithm(&e) {
                        self.unsupported.insert(key);
                    }
                    return Err(e);
                }
            };
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
        let (m, n) = (key.cols as u64, key.rows as u64);
        // cublasOperation_t (cublas_api.h; not in cudarc's cublasLt bindings).
        const CUBLAS_OP_N: i32 = 0;
        const CUBLAS_OP_T: i32 = 1;
        let op = |o: &Operand| if o.trans { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let (wa, xb) = key.operands();
        let (a, trans_a) = (Layout::new(bf16, wa.rows, wa.cols, wa.ld)?, op(&wa));
        let (b, trans_b) = (Layout::new(bf16, xb.rows, xb.cols, xb.ld)?, op(&xb));
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
        use sys::cublasLtMatmulDescAttributes_t as D;
        set_desc(
            D::CUBLASLT_MATMUL_DESC_TRANSA,
            &trans_a as *const i32 as *const c_void,
            size_of::<i32>(),
        )?;
        set_desc(
            D::CUBLASLT_MATMUL_DESC_TRANSB,
            &trans_b as *const i32 as *const c_void,
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
        // SAFETY: all handles are live; C is D (same buffer, same layout), read only when
        // accumulating (beta = 1).
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, d.0, d.0, pref.0)
        }
        .map_err(|e| match e.0 {
            // cudarc's answer when the heuristic returns no algorithm at all.
            sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => no_algorithm_err(key),
            status => CudaError::Blas {
                call: HEURISTIC,
                msg: format!("{status:?} for {}", key.describe()),
            },
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
        let key = g.key();
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
        let alpha = g.alpha;
        let beta = if g.accumulate { 1.0f32 } else { 0.0 };
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
            msg: format!("{:?} for {}", e.0, key.describe()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLASLt's semantics on host arrays: D (column-major m × n, leading dimension ld_d)
    /// (+)= op(A) · op(B), with each operand's layout checked as cuBLASLt checks it (ld ≥ its
    /// stored rows) and every read bounds-checked by the slice.
    fn column_major_gemm(key: &PlanKey, a: &[f64], b: &[f64], d: &mut [f64]) {
        let (wa, xb) = key.operands();
        let (m, n, k) = (key.cols, key.rows, key.k);
        assert!(wa.ld as u64 >= wa.rows && xb.ld as u64 >= xb.rows && key.ld_out >= m);
        // op(A) is m × k and op(B) is k × n, whatever the transposes.
        let (a_dims, b_dims) = ((wa.rows, wa.cols), (xb.rows, xb.cols));
        let want_a = if wa.trans { (k, m) } else { (m, k) };
        let want_b = if xb.trans { (n, k) } else { (k, n) };
        assert_eq!(a_dims, (want_a.0 as u64, want_a.1 as u64), "A layout");
        assert_eq!(b_dims, (want_b.0 as u64, want_b.1 as u64), "B layout");
        let at = |o: &Operand, data: &[f64], i: usize, j: usize| {
            if o.trans {
                data[j + i * o.ld]
            } else {
                data[i + j * o.ld]
            }
        };
        for i in 0..m {
            for j in 0..n {
                let sum: f64 = (0..k).map(|p| at(&wa, a, i, p) * at(&xb, b, p, j)).sum();
                let dst = &mut d[i + j * key.ld_out];
                *dst = if key.accumulate { *dst + sum } else { sum };
            }
        }
    }

    #[test]
    fn operands_map_each_row_major_product_onto_cublaslt() {
        // Distinct values, so a transposed or misplaced read changes the result.
        let fill = |n: usize, seed: f64| -> Vec<f64> {
            (0..n).map(|i| ((i as f64 + seed) * 0.37).sin()).collect()
        };
        let (rows, cols, k) = (3, 5, 4);
        // Stored row-major with padded rows (ld > the dense width) to catch ld mix-ups.
        let pad = 2;
        let cases = [
            // x [rows, k], w [cols, k]: out = x · wᵀ.
            (KAxis::Last, KAxis::Last),
            // x [rows, k], w [k, cols]: out = x · w.
            (KAxis::Last, KAxis::First),
            // x [k, rows], w [k, cols]: out = xᵀ · w.
            (KAxis::First, KAxis::First),
            // x [k, rows], w [cols, k]: out = xᵀ · wᵀ.
            (KAxis::First, KAxis::Last),
        ];
        for (x_k, w_k) in cases {
            let (x_rows, x_width) = match x_k {
                KAxis::Last => (rows, k),
                KAxis::First => (k, rows),
            };
            let (w_rows, w_width) = match w_k {
                KAxis::Last => (cols, k),
                KAxis::First => (k, cols),
            };
            let (ld_x, ld_w, ld_out) = (x_width + pad, w_width + pad, cols + pad);
            let x = fill(x_rows * ld_x, 1.0);
            let w = fill(w_rows * ld_w, 2.0);
            let xv = |r: usize, p: usize| match x_k {
                KAxis::Last => x[r * ld_x + p],
                KAxis::First => x[p * ld_x + r],
            };
            let wv = |p: usize, c: usize| match w_k {
                KAxis::Last => w[c * ld_w + p],
                KAxis::First => w[p * ld_w + c],
            };
            for accumulate in [false, true] {
                let key = Gemm {
                    rows,
                    cols,
                    k,
                    x: 0,
                    ld_x,
                    x_k,
                    w: 0,
                    ld_w,
                    w_k,
                    out: 0,
                    ld_out,
                    out_type: OutType::F32,
                    accumulate,
                    bias: None,
                    alpha: 1.0,
                }
                .key();
                let before = fill(rows * ld_out, 3.0);
                let mut out = before.clone();
                column_major_gemm(&key, &w, &x, &mut out);
                for r in 0..rows {
                    for c in 0..cols {
                        let prod: f64 = (0..k).map(|p| xv(r, p) * wv(p, c)).sum();
                        let want = if accumulate {
                            before[r * ld_out + c] + prod
                        } else {
                            prod
                        };
                        let got = out[r * ld_out + c];
                        assert!(
                            (got - want).abs() < 1e-12,
                            "{} at [{r}, {c}]: {got} vs {want}",
                            key.describe()
                        );
                    }
                    // The padding past `cols` is never written.
                    for c in cols..ld_out {
                        assert_eq!(out[r * ld_out + c], before[r * ld_out + c]);
                    }
                }
            }
        }
    }

    #[test]
    fn constructors_describe_the_products_they_set_up() {
        let nt = Gemm::nt([3, 5, 7], 0, 0, 0, OutType::Bf16);
        assert_eq!((nt.ld_x, nt.ld_w, nt.ld_out), (7, 7, 5));
        assert_eq!(
            nt.key().describe(),
            "out[3, 5] = x[3, 7] · w[5, 7]ᵀ (Bf16 out)"
        );
        let nn = Gemm::nn([3, 5, 7], 0, 0, 0, OutType::F32);
        assert_eq!((nn.ld_x, nn.ld_w, nn.ld_out), (7, 5, 5));
        assert_eq!(
            nn.key().describe(),
            "out[3, 5] = x[3, 7] · w[7, 5] (F32 out)"
        );
        let tn = Gemm::tn([3, 5, 7], 0, 0, 0, OutType::F32).accumulating(true);
        assert_eq!((tn.ld_x, tn.ld_w, tn.ld_out), (3, 5, 5));
        assert_eq!(
            tn.key().describe(),
            "out[3, 5] += x[7, 3]ᵀ · w[7, 5] (F32 out)"
        );
        // The forward's plan key is what it was before transposes existed.
        assert_eq!(
            (nt.x_k, nt.w_k, nt.accumulate),
            (KAxis::Last, KAxis::Last, false)
        );
    }

    #[test]
    fn alpha_defaults_to_one_and_shares_the_plan_of_its_shape() {
        let base = Gemm::tn([3, 5, 7], 0, 0, 0, OutType::F32).accumulating(true);
        for g in [
            Gemm::nt([3, 5, 7], 0, 0, 0, OutType::Bf16),
            Gemm::nn([3, 5, 7], 0, 0, 0, OutType::F32),
            base,
        ] {
            assert_eq!(g.alpha, 1.0);
        }
        let scaled = base.scaled(0.25);
        assert_eq!(scaled.alpha, 0.25);
        // Everything else is kept, and the plan (the key) is the unscaled GEMM's.
        assert_eq!(scaled.key(), base.key());
        assert_eq!(scaled.scaled(1.0).key(), base.key());
    }

    #[test]
    fn a_missing_algorithm_is_told_apart_from_other_failures() {
        // A column range at element 3 of a bf16 row: out is only 2-byte aligned.
        let g = Gemm {
            ld_out: 11,
            ..Gemm::nt([4, 5, 3], 0x1000, 0x2000, 0x3000 + 3 * 2, OutType::Bf16)
        };
        let key = g.key();
        assert_eq!(key.align[2], 2);
        let e = no_algorithm_err(&key);
        assert!(no_algorithm(&e));
        let text = e.to_string();
        assert!(text.contains("out[4, 5] = x[4, 3] · w[5, 3]ᵀ"), "{text}");
        assert!(
            text.contains("out 11 and") && text.contains("out 2 bytes"),
            "{text}"
        );
        let other = CudaError::Blas {
            call: HEURISTIC,
            msg: "CUBLAS_STATUS_INVALID_VALUE for out[4, 5]".into(),
        };
        assert!(!no_algorithm(&other));
        let launch = CudaError::Blas {
            call: "cublasLtMatmul",
            msg: format!("{NOT_SUPPORTED} for out[4, 5]"),
        };
        assert!(!no_algorithm(&launch));
    }

    #[test]
    fn alignment_classes() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0), 256);
    }
}
