// lora.cu — the small data movements LoRA needs around the decoder's GEMMs, for bf16 and
// f32 tensors (LoRA's parameters and gradients stay f32 on the GPU, activations are bf16).
//
// - columns: out[t, j] = x[t, col0 + j], a strided copy of a column range (one module's
//   slice of a stacked projection);
// - add_into_columns: y[t, col0 + j] += delta[t, j] (one module's delta into the stack);
// - transpose: out[j, i] = x[i, j], through 32×32 shared-memory tiles so that both the
//   reads and the writes are coalesced;
// - dropout: out[i] = x[i] · m_i with m_i = keep when mix(key ^ i) ≥ cut, else 0: the
//   counter-based mask of ops::lora_ops (SplitMix64's finaliser in 64-bit integer math), the
//   same bits as the CPU reference for the same key. The host derives key, cut and keep.
//
// Copies move raw elements (no conversion); arithmetic happens in f32, stored back in the
// tensor's type. Every kernel is a grid-stride loop, so any grid size covers any length.
#include "common.cuh"
#include "dropout.cuh"

__device__ __forceinline__ float load_f32(const bf16 *p, i64 i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ float load_f32(const float *p, i64 i) { return p[i]; }
__device__ __forceinline__ void store_f32(bf16 *p, i64 i, float v) { p[i] = f32_to_bf16(v); }
__device__ __forceinline__ void store_f32(float *p, i64 i, float v) { p[i] = v; }

// out: [rows, n], x: [rows, width]; out[t, j] = x[t, col0 + j].
template <typename T>
__device__ __forceinline__ void columns_impl(T *out, const T *x, i64 rows, i64 width, i64 col0,
                                             i64 n) {
    const i64 total = rows * n;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const i64 t = idx / n;
        const i64 j = idx % n;
        out[idx] = x[t * width + col0 + j];
    }
}

extern "C" __global__ void columns_bf16(bf16 *out, const bf16 *x, i64 rows, i64 width, i64 col0,
                                        i64 n) {
    columns_impl(out, x, rows, width, col0, n);
}

extern "C" __global__ void columns_f32(float *out, const float *x, i64 rows, i64 width, i64 col0,
                                       i64 n) {
    columns_impl(out, x, rows, width, col0, n);
}

// y: [rows, width], delta: [rows, n]; y[t, col0 + j] += delta[t, j]. Each element of y is
// read and written by one thread: no races.
template <typename T>
__device__ __forceinline__ void add_into_columns_impl(T *y, const T *delta, i64 rows, i64 width,
                                                      i64 col0, i64 n) {
    const i64 total = rows * n;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const i64 t = idx / n;
        const i64 j = idx % n;
        const i64 at = t * width + col0 + j;
        store_f32(y, at, load_f32(y, at) + load_f32(delta, idx));
    }
}

extern "C" __global__ void add_into_columns_bf16(bf16 *y, const bf16 *delta, i64 rows, i64 width,
                                                 i64 col0, i64 n) {
    add_into_columns_impl(y, delta, rows, width, col0, n);
}

extern "C" __global__ void add_into_columns_f32(float *y, const float *delta, i64 rows,
                                                i64 width, i64 col0, i64 n) {
    add_into_columns_impl(y, delta, rows, width, col0, n);
}

// x: [rows, cols] → out: [cols, rows]. Block (32, 8); each block walks 32×32 tiles (a
// grid-stride loop over tiles, so the grid never exceeds its limits). The tile's extra column
// keeps the column reads of the second phase off a single shared-memory bank.
#define TILE 32
#define TILE_ROWS 8

template <typename T>
__device__ __forceinline__ void transpose_impl(T *out, const T *x, i64 rows, i64 cols) {
    __shared__ T tile[TILE][TILE + 1];
    const i64 tiles_r = (rows + TILE - 1) / TILE;
    const i64 tiles_c = (cols + TILE - 1) / TILE;
    const i64 tiles = tiles_r * tiles_c;
    // The loop bound is the same for every thread of the block, so the barriers inside it
    // are reached by all of them.
    for (i64 tile_idx = blockIdx.x; tile_idx < tiles; tile_idx += gridDim.x) {
        const i64 r0 = (tile_idx / tiles_c) * TILE;
        const i64 c0 = (tile_idx % tiles_c) * TILE;
        for (int k = threadIdx.y; k < TILE; k += TILE_ROWS) {
            const i64 r = r0 + k;
            const i64 c = c0 + threadIdx.x;
            if (r < rows && c < cols) tile[k][threadIdx.x] = x[r * cols + c];
        }
        __syncthreads();
        for (int k = threadIdx.y; k < TILE; k += TILE_ROWS) {
            const i64 c = c0 + k;           // the output's row
            const i64 r = r0 + threadIdx.x;  // the output's column
            if (c < cols && r < rows) out[c * rows + r] = tile[threadIdx.x][k];
        }
        __syncthreads();  // the tile is rewritten by the next iteration
    }
}

extern "C" __global__ void transpose_bf16(bf16 *out, const bf16 *x, i64 rows, i64 cols) {
    transpose_impl(out, x, rows, cols);
}

extern "C" __global__ void transpose_f32(float *out, const float *x, i64 rows, i64 cols) {
    transpose_impl(out, x, rows, cols);
}

extern "C" __global__ void dropout_mask_f32(float *out, i64 n, u64 key, u64 cut, float keep) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = dropout_multiplier(key, cut, keep, i);
    }
}

// out[i] = x[i] · m_i, a multiply (not a select) as on the CPU, so 0·inf stays NaN there too.
template <typename T>
__device__ __forceinline__ void dropout_impl(T *out, const T *x, i64 n, u64 key, u64 cut,
                                             float keep) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        store_f32(out, i, load_f32(x, i) * dropout_multiplier(key, cut, keep, i));
    }
}

extern "C" __global__ void dropout_bf16(bf16 *out, const bf16 *x, i64 n, u64 key, u64 cut,
                                        float keep) {
    dropout_impl(out, x, n, key, cut, keep);
}

extern "C" __global__ void dropout_f32(float *out, const float *x, i64 n, u64 key, u64 cut,
                                       float keep) {
    dropout_impl(out, x, n, key, cut, keep);
}
