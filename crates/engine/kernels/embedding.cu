// embedding.cu — token embedding gather: out[t, :] = table[ids[t], :] · scale; and its
// backward, the scatter-add of dy into the table's gradient.
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

// Backward: d_table[v, c] = scale · Σ_{t: ids[t] = v} dy[t, c], f32 out, dy bf16 [T, C].
//
// Deterministic without atomics: the host buckets the positions by id (a counting sort, in
// position order) and uploads `uniq` [U] (the ids that occur), `starts` [U + 1] (each one's
// range in `order`) and `order` [T] (positions grouped by id). One thread per (unique id,
// column) sums its bucket in position order, so every run gives the same bits; rows no id
// names are zeroed by the launcher. Consecutive threads take consecutive columns of one id:
// coalesced reads of dy's rows and writes of d_table's.
extern "C" __global__ void embedding_backward_f32(float *d_table, const bf16 *dy, const u32 *uniq,
                                                  const u32 *starts, const u32 *order,
                                                  i64 n_uniq, i64 cols, float scale) {
    const i64 total = n_uniq * cols;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const i64 u = idx / cols;
        const i64 c = idx % cols;
        float acc = 0.0f;
        for (u32 k = starts[u]; k < starts[u + 1]; ++k) {
            acc += bf16_to_f32(dy[(i64)order[k] * cols + c]);
        }
        d_table[(i64)uniq[u] * cols + c] = acc * scale;
    }
}
