// activation.cu — the gated MLP activation act(gate) · up, in f32, stored as bf16.
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
