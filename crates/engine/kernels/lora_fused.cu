// lora_fused.cu — the one step of the fused LoRA projection backward (ops::lora_fused) that a
// GEMM cannot do: with dropout, the gradient of the pair's input is masked,
//
//     dx[i] += term[i] · m_i,   term = du · A (a bf16 temporary), m the dropout mask,
//
// with m_i = keep when mix(key ^ i) ≥ cut, else 0: the counter-based mask of ops::lora_ops
// (kernels/dropout.cuh, shared with lora.cu; the host derives key, cut and keep from the
// DropoutKey). One read of dx and term, one write of dx, one bf16 rounding.
#include "common.cuh"
#include "dropout.cuh"

// dx, term: [n] bf16, distinct buffers. Each element is read and written by one thread.
// 16-byte vectors of 8 when both pointers allow them (arena buffers always do), then the
// tail (or everything) one element at a time; both are grid-stride loops, so any grid covers
// any n.
extern "C" __global__ void masked_add_bf16(bf16 *dx, const bf16 *term, i64 n, u64 key, u64 cut,
                                           float keep) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const bool aligned = ((((u64)dx) | ((u64)term)) & 15ull) == 0;
    const i64 nvec = aligned ? n / 8 : 0;
    for (i64 v = first; v < nvec; v += stride) {
        float acc[8], add[8];
        unpack8(reinterpret_cast<const bf16x8 *>(dx)[v], acc);
        unpack8(reinterpret_cast<const bf16x8 *>(term)[v], add);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            acc[j] += add[j] * dropout_multiplier(key, cut, keep, v * 8 + j);
        }
        reinterpret_cast<bf16x8 *>(dx)[v] = pack8(acc);
    }
    for (i64 i = nvec * 8 + first; i < n; i += stride) {
        const float m = dropout_multiplier(key, cut, keep, i);
        dx[i] = f32_to_bf16(bf16_to_f32(dx[i]) + bf16_to_f32(term[i]) * m);
    }
}
