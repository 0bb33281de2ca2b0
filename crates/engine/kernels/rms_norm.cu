// rms_norm.cu — RMSNorm y = x / sqrt(mean(x²) + eps) · (offset + w), f32 math, bf16 out.
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
