// common.cuh — shared device helpers for every prefer kernel.
//
// NVRTC compiles these sources without the CUDA toolkit's headers (no cuda_bf16.h), so the
// kernels are self-contained: our own fixed-width types, bf16 <-> f32 conversion by bit
// operations (round-to-nearest-even, like torch), and warp reductions. The runtime hands this
// file to NVRTC as an in-memory header named "common.cuh".
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// bf16 values travel as their raw 16 bits; arithmetic always happens in f32.
typedef u16 bf16;

#define NEG_INF (__int_as_float(0xff800000))
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ float bf16_to_f32(bf16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Round-to-nearest-even on the 16 dropped bits; NaN stays a (quiet) NaN.
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// Two bf16 packed in one 32-bit word: the lower address (lower index) in the low half.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return ((u32)f32_to_bf16(hi) << 16) | (u32)f32_to_bf16(lo);
}

__device__ __forceinline__ float bf16x2_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16x2_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }

// 16-byte vector of 8 bf16: the unit of every bandwidth-bound load and store.
struct __align__(16) bf16x8 {
    u32 w[4];
};

__device__ __forceinline__ void unpack8(const bf16x8 &v, float out[8]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = bf16x2_lo(v.w[i]);
        out[2 * i + 1] = bf16x2_hi(v.w[i]);
    }
}

__device__ __forceinline__ bf16x8 pack8(const float in[8]) {
    bf16x8 v;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v.w[i] = pack_bf16x2(in[2 * i], in[2 * i + 1]);
    }
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of up to 1024 threads; every thread gets the result. `scratch` holds 32
// floats of shared memory; the trailing barrier lets callers reuse it right away.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = lane < nwarps ? scratch[lane] : 0.0f;
    total = warp_sum(total);
    __syncthreads();
    return total;
}

// Logit soft-cap c·tanh(x/c) (Gemma-2); accurate tanhf because the cap multiplies its error.
__device__ __forceinline__ float softcap(float x, float cap) {
    return cap * tanhf(x / cap);
}
