// rope.cu — rotary position embedding, HF rotate_half convention (element i pairs with i + D/2).
//
// The angle is pos · inv_freq[i] in f32 (one exact product, as HF's f32 matmul computes it),
// cos/sin by the accurate sincosf (angles reach thousands of radians), times HF's
// attention_scaling. Two kernels: in place on one [T, heads, D] tensor, and the fused QKV
// epilogue that splits a fused projection [T, (H + 2·Hkv)·D] into q, k, v while rotating q, k.
//
// The backwards apply the transpose of each pair's rotation: the same cos and sin with sin
// negated (exact), i.e. sin_sign = −1 — in place on a gradient [T, heads, D], and the packing
// of dq, dk, dv back into one fused row [T, (H + 2·Hkv)·D].
#include "common.cuh"

__device__ __forceinline__ void rotate_pair(float x1, float x2, float c, float s, float &o1,
                                            float &o2) {
    o1 = x1 * c - x2 * s;
    o2 = x2 * c + x1 * s;
}

// The scaled cos and (sign ·) sin of token position `p` at frequency `f`.
__device__ __forceinline__ void rope_angle(u32 p, float f, float attn_scaling, float sin_sign,
                                           float &c, float &s) {
    sincosf((float)p * f, &s, &c);
    c *= attn_scaling;
    s *= attn_scaling * sin_sign;
}

// x: [T, heads, D] in place; pos: [T]; inv_freq: [D/2]. One thread per (t, head, i < D/2).
__device__ __forceinline__ void rope_in_place(bf16 *x, const u32 *pos, const float *inv_freq,
                                              i64 tokens, int heads, int head_dim,
                                              float attn_scaling, float sin_sign) {
    const int half = head_dim / 2;
    const i64 n = tokens * heads * half;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += stride) {
        const int i = (int)(idx % half);
        const i64 th = idx / half;  // t * heads + head
        const i64 t = th / heads;
        float s, c;
        rope_angle(pos[t], inv_freq[i], attn_scaling, sin_sign, c, s);
        bf16 *row = x + th * head_dim;
        float o1, o2;
        rotate_pair(bf16_to_f32(row[i]), bf16_to_f32(row[i + half]), c, s, o1, o2);
        row[i] = f32_to_bf16(o1);
        row[i + half] = f32_to_bf16(o2);
    }
}

extern "C" __global__ void rope_bf16(bf16 *x, const u32 *pos, const float *inv_freq, i64 tokens,
                                     int heads, int head_dim, float attn_scaling) {
    rope_in_place(x, pos, inv_freq, tokens, heads, head_dim, attn_scaling, 1.0f);
}

// grad: [T, heads, D] holds dy on entry and dx on exit.
extern "C" __global__ void rope_backward_bf16(bf16 *grad, const u32 *pos, const float *inv_freq,
                                              i64 tokens, int heads, int head_dim,
                                              float attn_scaling) {
    rope_in_place(grad, pos, inv_freq, tokens, heads, head_dim, attn_scaling, -1.0f);
}

// qkv: [T, (H + 2·Hkv)·D] (q heads, then k heads, then v heads, as HF's q/k/v projections
// concatenated) → q: [T, H, D] and k: [T, Hkv, D] rotated, v: [T, Hkv, D] copied.
extern "C" __global__ void rope_qkv_split_bf16(bf16 *q, bf16 *k, bf16 *v, const bf16 *qkv,
                                               const u32 *pos, const float *inv_freq, i64 tokens,
                                               int heads, int kv_heads, int head_dim,
                                               float attn_scaling) {
    const int half = head_dim / 2;
    const int all_heads = heads + 2 * kv_heads;
    const i64 n = tokens * all_heads * half;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += stride) {
        const int i = (int)(idx % half);
        const i64 th = idx / half;
        const int h = (int)(th % all_heads);
        const i64 t = th / all_heads;
        const bf16 *src = qkv + th * head_dim;
        if (h >= heads + kv_heads) {
            bf16 *dst = v + (t * kv_heads + (h - heads - kv_heads)) * head_dim;
            dst[i] = src[i];
            dst[i + half] = src[i + half];
            continue;
        }
        bf16 *dst = h < heads ? q + (t * heads + h) * head_dim
                              : k + (t * kv_heads + (h - heads)) * head_dim;
        float s, c;
        rope_angle(pos[t], inv_freq[i], attn_scaling, 1.0f, c, s);
        float o1, o2;
        rotate_pair(bf16_to_f32(src[i]), bf16_to_f32(src[i + half]), c, s, o1, o2);
        dst[i] = f32_to_bf16(o1);
        dst[i + half] = f32_to_bf16(o2);
    }
}

// dq: [T, H, D], dk, dv: [T, Hkv, D] → dqkv: [T, (H + 2·Hkv)·D] laid out like qkv: the q and
// k heads turned back (sin negated), the v heads copied. Every element of dqkv is written.
extern "C" __global__ void rope_qkv_split_backward_bf16(bf16 *dqkv, const bf16 *dq,
                                                        const bf16 *dk, const bf16 *dv,
                                                        const u32 *pos, const float *inv_freq,
                                                        i64 tokens, int heads, int kv_heads,
                                                        int head_dim, float attn_scaling) {
    const int half = head_dim / 2;
    const int all_heads = heads + 2 * kv_heads;
    const i64 n = tokens * all_heads * half;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += stride) {
        const int i = (int)(idx % half);
        const i64 th = idx / half;
        const int h = (int)(th % all_heads);
        const i64 t = th / all_heads;
        bf16 *dst = dqkv + th * head_dim;
        if (h >= heads + kv_heads) {
            const bf16 *src = dv + (t * kv_heads + (h - heads - kv_heads)) * head_dim;
            dst[i] = src[i];
            dst[i + half] = src[i + half];
            continue;
        }
        const bf16 *src = h < heads ? dq + (t * heads + h) * head_dim
                                    : dk + (t * kv_heads + (h - heads)) * head_dim;
        float s, c;
        rope_angle(pos[t], inv_freq[i], attn_scaling, -1.0f, c, s);
        float o1, o2;
        rotate_pair(bf16_to_f32(src[i]), bf16_to_f32(src[i + half]), c, s, o1, o2);
        dst[i] = f32_to_bf16(o1);
        dst[i + half] = f32_to_bf16(o2);
    }
}
