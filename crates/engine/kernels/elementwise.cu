// elementwise.cu — residual adds and scaling over bf16 tensors, f32 arithmetic; and the f32
// variants that LoRA's gradients (accumulated in f32) need.
//
// Bandwidth-bound: 16-byte vectors (8 bf16) per thread and a grid-stride loop; the scalar
// tail covers lengths that are not a multiple of 8. Pointers come from the arena (256-byte
// aligned), which the launcher checks. The f32 kernels are plain grid-stride loops
// (consecutive threads read consecutive words: coalesced).
#include "common.cuh"

// out[i] = a[i] + b[i]; out may alias a (the in-place add).
extern "C" __global__ void add_bf16(bf16 *out, const bf16 *a, const bf16 *b, i64 n) {
    const i64 nvec = n / 8;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < nvec; v += stride) {
        float x[8], y[8];
        unpack8(reinterpret_cast<const bf16x8 *>(a)[v], x);
        unpack8(reinterpret_cast<const bf16x8 *>(b)[v], y);
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] += y[i];
        reinterpret_cast<bf16x8 *>(out)[v] = pack8(x);
    }
    for (i64 i = nvec * 8 + (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
    }
}

// out[i] = x[i] * s.
extern "C" __global__ void scale_bf16(bf16 *out, const bf16 *x, float s, i64 n) {
    const i64 nvec = n / 8;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < nvec; v += stride) {
        float a[8];
        unpack8(reinterpret_cast<const bf16x8 *>(x)[v], a);
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] *= s;
        reinterpret_cast<bf16x8 *>(out)[v] = pack8(a);
    }
    for (i64 i = nvec * 8 + (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = f32_to_bf16(bf16_to_f32(x[i]) * s);
    }
}

// In-place soft-cap of f32 logits: x = c·tanh(x/c) (the `logits` op's final cap).
extern "C" __global__ void softcap_f32(float *x, float cap, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        x[i] = softcap(x[i], cap);
    }
}

// out[i] = a[i] + b[i] in f32; out may alias a (the in-place add).
extern "C" __global__ void add_f32(float *out, const float *a, const float *b, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = a[i] + b[i];
    }
}

// out[i] = a[i] + b[i] with a, out f32 and b bf16: an f32 accumulator taking a bf16 term.
extern "C" __global__ void add_f32_bf16(float *out, const float *a, const bf16 *b, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = a[i] + bf16_to_f32(b[i]);
    }
}

// out[i] = x[i] * s in f32.
extern "C" __global__ void scale_f32(float *out, const float *x, float s, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = x[i] * s;
    }
}

// out[i] = x[i] rounded to bf16 (round to nearest even).
extern "C" __global__ void cast_f32_bf16(bf16 *out, const float *x, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = f32_to_bf16(x[i]);
    }
}

// out[i] = x[i] widened to f32 (exact).
extern "C" __global__ void cast_bf16_f32(float *out, const bf16 *x, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = bf16_to_f32(x[i]);
    }
}
