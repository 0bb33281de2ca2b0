// rms_norm.cu — RMSNorm y = x / sqrt(mean(x²) + eps) · (offset + w), f32 math, bf16 out;
// and its backward (dx in bf16, dw in f32).
//
// One block per row. The fused variant first forms the residual sum s = bf16(x + r) — rounded
// to bf16 exactly as the unfused model stores it — writes s (the next residual), and
// normalises s, saving one full read and write of the hidden state per norm.
#include "common.cuh"

extern "C" __global__ void rms_norm_bf16(bf16 *out, const bf16 *x, const bf16 *w, i64 cols,
                                         float eps, float offset) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const bf16 *xr = x + row * cols;
    bf16 *yr = out + row * cols;
    const bool vec = cols % 8 == 0;
    float ss = 0.0f;
    if (vec) {
        for (i64 v = threadIdx.x; v < cols / 8; v += blockDim.x) {
            float a[8];
            unpack8(reinterpret_cast<const bf16x8 *>(xr)[v], a);
#pragma unroll
            for (int i = 0; i < 8; ++i) ss += a[i] * a[i];
        }
    } else {
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float a = bf16_to_f32(xr[c]);
            ss += a * a;
        }
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)cols + eps);
    if (vec) {
        for (i64 v = threadIdx.x; v < cols / 8; v += blockDim.x) {
            float a[8], g[8];
            unpack8(reinterpret_cast<const bf16x8 *>(xr)[v], a);
            unpack8(reinterpret_cast<const bf16x8 *>(w)[v], g);
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] = a[i] * inv * (offset + g[i]);
            reinterpret_cast<bf16x8 *>(yr)[v] = pack8(a);
        }
    } else {
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            yr[c] = f32_to_bf16(bf16_to_f32(xr[c]) * inv * (offset + bf16_to_f32(w[c])));
        }
    }
}

// sum = bf16(x + r); out = rms_norm(sum). `sum` may alias `x` or `r` (an in-place residual):
// each element is read before it is written, by the same thread.
extern "C" __global__ void add_rms_norm_bf16(bf16 *out, bf16 *sum, const bf16 *x, const bf16 *r,
                                             const bf16 *w, i64 cols, float eps, float offset) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const bf16 *xr = x + row * cols;
    const bf16 *rr = r + row * cols;
    bf16 *sr = sum + row * cols;
    bf16 *yr = out + row * cols;
    const bool vec = cols % 8 == 0;
    float ss = 0.0f;
    if (vec) {
        for (i64 v = threadIdx.x; v < cols / 8; v += blockDim.x) {
            float a[8], b[8];
            unpack8(reinterpret_cast<const bf16x8 *>(xr)[v], a);
            unpack8(reinterpret_cast<const bf16x8 *>(rr)[v], b);
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] += b[i];
            const bf16x8 s = pack8(a);
            reinterpret_cast<bf16x8 *>(sr)[v] = s;
            unpack8(s, a);  // normalise the rounded sum, as the unfused path would
#pragma unroll
            for (int i = 0; i < 8; ++i) ss += a[i] * a[i];
        }
    } else {
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const bf16 s = f32_to_bf16(bf16_to_f32(xr[c]) + bf16_to_f32(rr[c]));
            sr[c] = s;
            const float a = bf16_to_f32(s);
            ss += a * a;
        }
    }
    ss = block_sum(ss, scratch);  // its barriers also order the sum's writes before the reads
    const float inv = rsqrtf(ss / (float)cols + eps);
    if (vec) {
        for (i64 v = threadIdx.x; v < cols / 8; v += blockDim.x) {
            float a[8], g[8];
            unpack8(reinterpret_cast<const bf16x8 *>(sr)[v], a);
            unpack8(reinterpret_cast<const bf16x8 *>(w)[v], g);
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] = a[i] * inv * (offset + g[i]);
            reinterpret_cast<bf16x8 *>(yr)[v] = pack8(a);
        }
    } else {
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            yr[c] = f32_to_bf16(bf16_to_f32(sr[c]) * inv * (offset + bf16_to_f32(w[c])));
        }
    }
}

// Backward, per row: with r = 1/sqrt(mean(x²) + eps) and g = offset + w,
//   dx_k = r·g_k·dy_k − x_k·(r³/C)·Σ_j dy_j·g_j·x_j.
// One block per row; both row sums in one pass. r goes to inv_rms (f32, [T]) for the dw
// kernels. x, dy, dx: [T, C]; w: [C].
extern "C" __global__ void rms_norm_backward_bf16(bf16 *dx, float *inv_rms, const bf16 *x,
                                                  const bf16 *w, const bf16 *dy, i64 cols,
                                                  float eps, float offset) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const bf16 *xr = x + row * cols;
    const bf16 *dyr = dy + row * cols;
    bf16 *dxr = dx + row * cols;
    const bool vec = cols % 8 == 0;
    float ss = 0.0f, dot = 0.0f;
    if (vec) {
        for (i64 v = threadIdx.x; v < cols / 8; v += blockDim.x) {
            float a[8], g[8], d[8];
            unpack8(reinterpret_cast<const bf16x8 *>(xr)[v], a);
            unpack8(reinterpret_cast<const bf16x8 *>(w)[v], g);
            unpack8(reinterpret_cast<const bf16x8 *>(dyr)[v], d);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                ss += a[i] * a[i];
                dot += d[i] * (offset + g[i]) * a[i];
            }
        }
    } else {
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float a = bf16_to_f32(xr[c]);
            ss += a * a;
            dot += bf16_to_f32(dyr[c]) * (offset + bf16_to_f32(w[c])) * a;
        }
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);
    // Precise division and square root (not rsqrtf): the reference works in f64.
    const float r = 1.0f / sqrtf(ss / (float)cols + eps);
    const float through_r = r * r * r * dot / (float)cols;
    if (threadIdx.x == 0) inv_rms[row] = r;
    if (vec) {
        for (i64 v = threadIdx.x; v < cols / 8; v += blockDim.x) {
            float a[8], g[8], d[8];
            unpack8(reinterpret_cast<const bf16x8 *>(xr)[v], a);
            unpack8(reinterpret_cast<const bf16x8 *>(w)[v], g);
            unpack8(reinterpret_cast<const bf16x8 *>(dyr)[v], d);
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] = r * (offset + g[i]) * d[i] - a[i] * through_r;
            reinterpret_cast<bf16x8 *>(dxr)[v] = pack8(a);
        }
    } else {
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float a = bf16_to_f32(xr[c]);
            const float g = offset + bf16_to_f32(w[c]);
            dxr[c] = f32_to_bf16(r * g * bf16_to_f32(dyr[c]) - a * through_r);
        }
    }
}

// dw_j = Σ_t dy[t, j]·x[t, j]·r_t, in two deterministic stages (no atomics: the same bits on
// every run). Stage 1: partial[chunk, j] sums rows chunk·rows_per_chunk onward (at most
// rows_per_chunk of them) for one column per thread; grid (⌈C/block⌉, chunks). Consecutive
// threads read consecutive columns of a row: coalesced.
extern "C" __global__ void rms_norm_backward_dw_partial(float *partial, const bf16 *x,
                                                        const bf16 *dy, const float *inv_rms,
                                                        i64 rows, i64 cols, i64 rows_per_chunk) {
    const i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 chunk = blockIdx.y;
    if (c >= cols) return;
    const i64 t0 = chunk * rows_per_chunk;
    const i64 t1 = t0 + rows_per_chunk < rows ? t0 + rows_per_chunk : rows;
    float acc = 0.0f;
    for (i64 t = t0; t < t1; ++t) {
        acc += bf16_to_f32(dy[t * cols + c]) * bf16_to_f32(x[t * cols + c]) * inv_rms[t];
    }
    partial[chunk * cols + c] = acc;
}

// Stage 2: dw[j] = Σ_chunk partial[chunk, j], in chunk order.
extern "C" __global__ void rms_norm_backward_dw_finish(float *dw, const float *partial,
                                                       i64 chunks, i64 cols) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += stride) {
        float acc = 0.0f;
        for (i64 k = 0; k < chunks; ++k) acc += partial[k * cols + c];
        dw[c] = acc;
    }
}
