// embedding.cu — token embedding gather: out[t, :] = table[ids[t], :] · scale.
//
// One block row per token; ids were range-checked on the host. 16-byte vectors when the
// hidden size allows (C % 8 == 0), scalar otherwise.
#include "common.cuh"

extern "C" __global__ void embedding_bf16(bf16 *out, const bf16 *table, const u32 *ids, i64 cols,
                                          float scale) {
    const i64 t = blockIdx.x;
    const bf16 *src = table + (i64)ids[t] * cols;
    bf16 *dst = out + t * cols;
    if (cols % 8 == 0) {
        const bf16x8 *s8 = reinterpret_cast<const bf16x8 *>(src);
        bf16x8 *d8 = reinterpret_cast<bf16x8 *>(dst);
        for (i64 v = threadIdx.x; v < cols / 8; v += blockDim.x) {
            float x[8];
            unpack8(s8[v], x);
#pragma unroll
            for (int i = 0; i < 8; ++i) x[i] *= scale;
            d8[v] = pack8(x);
        }
    } else {
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            dst[c] = f32_to_bf16(bf16_to_f32(src[c]) * scale);
        }
    }
}
