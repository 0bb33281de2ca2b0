// activation.cu — the gated MLP activation act(gate) · up, in f32, stored as bf16, and its
// backward dgate = dy·up·act′(gate), dup = dy·act(gate).
//
// `act`: 0 = SiLU, 1 = tanh-approximated GELU, 2 = exact (erf) GELU — the order of
// `ops::Activation`'s variants, mapped by the launcher. Two layouts: separate gate and up
// tensors [T, I], and one packed [T, 2I] tensor (gate columns first) from a fused gate+up GEMM.
#include "common.cuh"

__device__ __forceinline__ float activate(float x, int act) {
    if (act == 0) {
        return x / (1.0f + expf(-x));
    } else if (act == 1) {
        // HF gelu_pytorch_tanh: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        const float k = 0.7978845608028654f;
        return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
    } else {
        return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    }
}

// out[t, i] = act(gate[t, i]) · up[t, i]; all [T, I] (I % 8 == 0 is not required).
extern "C" __global__ void gated_act_bf16(bf16 *out, const bf16 *gate, const bf16 *up, i64 n,
                                          int act) {
    const i64 nvec = n / 8;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < nvec; v += stride) {
        float g[8], u[8];
        unpack8(reinterpret_cast<const bf16x8 *>(gate)[v], g);
        unpack8(reinterpret_cast<const bf16x8 *>(up)[v], u);
#pragma unroll
        for (int i = 0; i < 8; ++i) g[i] = activate(g[i], act) * u[i];
        reinterpret_cast<bf16x8 *>(out)[v] = pack8(g);
    }
    for (i64 i = nvec * 8 + (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = f32_to_bf16(activate(bf16_to_f32(gate[i]), act) * bf16_to_f32(up[i]));
    }
}

// out[t, i] = act(gu[t, i]) · gu[t, I + i]; gu: [T, 2I], out: [T, I].
extern "C" __global__ void gated_act_packed_bf16(bf16 *out, const bf16 *gu, i64 rows, i64 inter,
                                                 int act) {
    const i64 n = rows * inter;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    if (inter % 8 == 0) {
        const i64 per_row = inter / 8;
        for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < n / 8; v += stride) {
            const i64 t = v / per_row;
            const i64 c = v % per_row;
            const bf16x8 *row = reinterpret_cast<const bf16x8 *>(gu + t * 2 * inter);
            float g[8], u[8];
            unpack8(row[c], g);
            unpack8(row[per_row + c], u);
#pragma unroll
            for (int i = 0; i < 8; ++i) g[i] = activate(g[i], act) * u[i];
            reinterpret_cast<bf16x8 *>(out)[v] = pack8(g);
        }
    } else {
        for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
            const i64 t = i / inter;
            const i64 c = i % inter;
            const bf16 *row = gu + t * 2 * inter;
            out[i] = f32_to_bf16(activate(bf16_to_f32(row[c]), act) * bf16_to_f32(row[inter + c]));
        }
    }
}

// (act(x), act′(x)) by the formulas of the CPU reference (ops/activation.rs `silu_grad` and
// its siblings), so the slopes agree to a few f32 ulps and keep the same limits in the tails.
__device__ __forceinline__ void activate_with_slope(float x, int act, float &value,
                                                    float &slope) {
    if (act == 0) {
        // σ = 1/(1 + e^−x); silu′ = σ·(1 + x·(1 − σ)). Where e^−x overflows σ is 0, and so
        // is the slope.
        const float e = expf(-x);
        const float sigma = 1.0f / (1.0f + e);
        value = x / (1.0f + e);
        slope = sigma * (1.0f + x * (1.0f - sigma));
    } else if (act == 1) {
        const float k = 0.7978845608028654f;
        const float cubic = 0.044715f;
        const float tau = tanhf(k * (x + cubic * x * x * x));
        // (1 − τ)(1 + τ) keeps the small factor's relative accuracy; where it is 0 the tail
        // is skipped, as x² may overflow there (0·inf).
        const float sech2 = (1.0f - tau) * (1.0f + tau);
        const float tail =
            sech2 == 0.0f ? 0.0f : 0.5f * x * sech2 * k * (1.0f + 3.0f * cubic * x * x);
        value = 0.5f * x * (1.0f + tau);
        slope = 0.5f * (1.0f + tau) + tail;
    } else {
        // Φ(x) + x·φ(x), φ(x) = e^(−x²/2)/√(2π).
        const float cdf = 0.5f * (1.0f + erff(x * 0.7071067811865476f));
        const float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;
        value = 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
        slope = cdf + x * pdf;
    }
}

// gate, up, dy, dgate, dup: [T, I] (n = T·I elements).
extern "C" __global__ void gated_act_backward_bf16(bf16 *dgate, bf16 *dup, const bf16 *gate,
                                                   const bf16 *up, const bf16 *dy, i64 n,
                                                   int act) {
    const i64 nvec = n / 8;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < nvec; v += stride) {
        float g[8], u[8], d[8], dg[8], du[8];
        unpack8(reinterpret_cast<const bf16x8 *>(gate)[v], g);
        unpack8(reinterpret_cast<const bf16x8 *>(up)[v], u);
        unpack8(reinterpret_cast<const bf16x8 *>(dy)[v], d);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float value, slope;
            activate_with_slope(g[i], act, value, slope);
            dg[i] = d[i] * u[i] * slope;
            du[i] = d[i] * value;
        }
        reinterpret_cast<bf16x8 *>(dgate)[v] = pack8(dg);
        reinterpret_cast<bf16x8 *>(dup)[v] = pack8(du);
    }
    for (i64 i = nvec * 8 + (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float value, slope;
        activate_with_slope(bf16_to_f32(gate[i]), act, value, slope);
        const float d = bf16_to_f32(dy[i]);
        dgate[i] = f32_to_bf16(d * bf16_to_f32(up[i]) * slope);
        dup[i] = f32_to_bf16(d * value);
    }
}

// gu, dgu: [T, 2I] (gate columns first); dy: [T, I]. dgu[t, i] = dgate, dgu[t, I + i] = dup.
extern "C" __global__ void gated_act_packed_backward_bf16(bf16 *dgu, const bf16 *gu,
                                                          const bf16 *dy, i64 rows, i64 inter,
                                                          int act) {
    const i64 n = rows * inter;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    if (inter % 8 == 0) {
        const i64 per_row = inter / 8;
        for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < n / 8; v += stride) {
            const i64 t = v / per_row;
            const i64 c = v % per_row;
            const bf16x8 *row = reinterpret_cast<const bf16x8 *>(gu + t * 2 * inter);
            bf16x8 *drow = reinterpret_cast<bf16x8 *>(dgu + t * 2 * inter);
            float g[8], u[8], d[8], dg[8], du[8];
            unpack8(row[c], g);
            unpack8(row[per_row + c], u);
            unpack8(reinterpret_cast<const bf16x8 *>(dy)[v], d);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float value, slope;
                activate_with_slope(g[i], act, value, slope);
                dg[i] = d[i] * u[i] * slope;
                du[i] = d[i] * value;
            }
            drow[c] = pack8(dg);
            drow[per_row + c] = pack8(du);
        }
    } else {
        for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
            const i64 t = i / inter;
            const i64 c = i % inter;
            const bf16 *row = gu + t * 2 * inter;
            bf16 *drow = dgu + t * 2 * inter;
            float value, slope;
            activate_with_slope(bf16_to_f32(row[c]), act, value, slope);
            const float d = bf16_to_f32(dy[i]);
            drow[c] = f32_to_bf16(d * bf16_to_f32(row[inter + c]) * slope);
            drow[inter + c] = f32_to_bf16(d * value);
        }
    }
}
