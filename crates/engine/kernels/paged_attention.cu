// paged_attention.cu — attention over a paged KV cache, and the write of new keys and values
// into it (vLLM's PagedAttention memory layout).
//
// Pools, per layer: K and V of [num_blocks, block_size, Hkv, D] bf16. Sequence b's position
// p lives in slot table[b][p / block_size] · block_size + p % block_size, where table is the
// [B, max_blocks] i32 block table. Query i of sequence b sits at position kv_len − q_len + i
// (its queries are the last q_len of its kv_len positions) and attends causally, with GQA,
// an optional sliding window (p − key < W) and an optional logit soft-cap, like
// attention.cu. Outputs: out [Tq, H, D] bf16 and each row's natural-log logsumexp [H, Tq].
//
// Three attention kernels share PagedArgs:
//  - paged_decode_d{64,128,256}_r{2,4,8}: for sequences whose q_len·G rows (G = H / Hkv query
//    heads per kv head) fit the instance's R (decode, q_len = 1, or tiny chunks). A block of 4
//    warps owns one (sequence, kv head, chunk of keys): all R rows of the GQA group share
//    each K/V row it reads, so the cache is read once per kv head. Lanes work in groups of
//    D/8, each lane owning 8 dims (one 16-byte load per key); the scores of the chunk go to
//    shared memory, a plain softmax over them, then P·V. A sequence longer than one chunk is
//    split over several blocks (flash-decoding); paged_combine merges their partial results.
//  - paged_prefill_d{64,128,256}: the tensor-core kernel of attention.cu (same tiling, same
//    GQA row packing), with K/V tiles gathered through the block table. It takes the
//    sequences with more rows than the decode kernel's R.
//  - paged_simple: one warp per (query, head), scalar f32, any head dim ≤ 256: the fallback
//    and an independent cross-check in tests.
// paged_kv_write: copies new keys and values [T, Hkv, D] into their slots (slot −1: skipped).
#include "common.cuh"

// Must match `PagedArgs` in src/cuda/ops/paged_attention.rs field for field (#[repr(C)]).
struct PagedArgs {
    const bf16 *q;             // [Tq, H, D]
    const bf16 *k_pool;        // [num_blocks, block_size, Hkv, D]
    const bf16 *v_pool;        // [num_blocks, block_size, Hkv, D]
    bf16 *out;                 // [Tq, H, D]
    float *lse;                // [H, Tq]
    const int *q_starts;       // [B + 1]
    const int *kv_lens;        // [B]
    const int *block_tables;   // [B, max_blocks]
    float *part_out;           // [B, Hkv, R, S, D]: unnormalised partial outputs (S > 1)
    float *part_ml;            // [B, Hkv, R, S, 2]: partial (max, sum) in natural-log units
    int tq;
    int batch;
    int heads;
    int kv_heads;
    int head_dim;
    int block_size;
    int max_blocks;
    int window;           // 0: none
    int decode_max_rows;  // R: sequences with q_len·G ≤ R are the decode kernel's
    int chunk;            // keys per decode block
    int num_splits;       // S: decode blocks per (sequence, kv head)
    float scale;
    float softcap;  // 0: none
    int pad_;
};

// The pool row (Hkv · D elements) of position `key` of a sequence whose block table is
// `table`. Power-of-two block sizes (16, the usual one) take shifts instead of an integer
// division per key; the branch is uniform over the launch.
__device__ __forceinline__ i64 pool_slot(const int *table, int key, int block_size) {
    if ((block_size & (block_size - 1)) == 0) {
        const int shift = __ffs(block_size) - 1;
        return ((i64)table[key >> shift] << shift) + (key & (block_size - 1));
    }
    return (i64)table[key / block_size] * block_size + key % block_size;
}

__device__ __forceinline__ u32 smem_u32(const void *p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// c += a · b for one m16n8k16 tile: a 16×16 (row), b 16×8 (col), c 16×8 f32.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 → bf16x2 with round-to-nearest-even in one instruction (lo in the low half).
__device__ __forceinline__ u32 cvt_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// ---------------------------------------------------------------------------------------
// Decode: one block of 4 warps per (chunk of keys, kv head, sequence).

#define DECODE_WARPS 4
// Keys per decode block at most: the chunk's scores of all R rows stay in shared memory.
#define MAX_CHUNK 1024

// Index of (sequence b, kv head hk, row r, split) in the partial buffers.
__device__ __forceinline__ i64 part_index(const PagedArgs &a, int b, int hk, int r, int split) {
    return (((i64)b * a.kv_heads + hk) * a.decode_max_rows + r) * a.num_splits + split;
}

template <int D, int MAXR>
__device__ __forceinline__ void paged_decode(const PagedArgs &a) {
    constexpr int GS = D / 8;          // lanes per key: each owns 8 dims (16 bytes)
    constexpr int KPW = 32 / GS;       // keys a warp reads at once
    constexpr int NG = DECODE_WARPS * KPW;  // key groups in the block
    constexpr int UNROLL = 4;          // keys in flight per group (loads issued before use)
    constexpr int LOGIT_FLOATS = MAXR * MAX_CHUNK;
    constexpr int RED_FLOATS = DECODE_WARPS * MAXR * D;
    constexpr int SMEM_FLOATS = LOGIT_FLOATS > RED_FLOATS ? LOGIT_FLOATS : RED_FLOATS;
    // The scores [MAXR][MAX_CHUNK] (then probabilities), later reused for the cross-warp sum
    // of the outputs [DECODE_WARPS][MAXR][D].
    __shared__ float smem[SMEM_FLOATS];
    __shared__ float s_max[MAXR], s_sum[MAXR];

    const int split = blockIdx.x;
    const int hk = blockIdx.y;
    const int b = blockIdx.z;
    const int group = a.heads / a.kv_heads;
    const int q0 = a.q_starts[b];
    const int q_len = a.q_starts[b + 1] - q0;
    const int rows = q_len * group;  // row r: query r / G, head hk·G + r % G
    if (rows == 0 || rows > a.decode_max_rows) return;
    const int kv_len = a.kv_lens[b];
    const int past = kv_len - q_len;  // query i sits at position past + i
    // The first key any row sees; chunks start there so no block reads only masked keys.
    const int key_lo = a.window > 0 ? max(0, past - a.window + 1) : 0;
    const int c0 = key_lo + split * a.chunk;
    const int n = min(a.chunk, kv_len - c0);
    const bool partial = a.num_splits > 1;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int lig = lane % GS;   // dims lig·8 .. lig·8 + 7
    const int kslot = lane / GS;  // which of the warp's KPW keys

    if (n <= 0) {
        // A split past this sequence's keys (the grid is sized for the longest): an empty
        // partial, which paged_combine skips.
        if (partial) {
            for (int r = tid; r < rows; r += DECODE_WARPS * 32) {
                const i64 pi = part_index(a, b, hk, r, split);
                a.part_ml[2 * pi] = NEG_INF;
                a.part_ml[2 * pi + 1] = 0.0f;
            }
        }
        return;
    }

    // My 8 dims of every row's query, scaled.
    float q[MAXR][8];
#pragma unroll
    for (int r = 0; r < MAXR; ++r) {
        if (r < rows) {
            const bf16 *src =
                a.q + ((i64)(q0 + r / group) * a.heads + hk * group + r % group) * D + lig * 8;
            unpack8(*reinterpret_cast<const bf16x8 *>(src), q[r]);
#pragma unroll
            for (int e = 0; e < 8; ++e) q[r][e] *= a.scale;
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) q[r][e] = 0.0f;
        }
    }

    const i64 slot_stride = (i64)a.kv_heads * D;
    const int *table = a.block_tables + (i64)b * a.max_blocks;
    const bf16 *k_base = a.k_pool + (i64)hk * D + lig * 8;
    const bf16 *v_base = a.v_pool + (i64)hk * D + lig * 8;
    const bool capped = a.softcap > 0.0f;
    float *logits = smem;  // [MAXR][MAX_CHUNK]

    // Scores. The loop bound depends on the warp only, so every lane reaches the shuffles.
    for (int j0 = warp * KPW; j0 < n; j0 += NG * UNROLL) {
        bf16x8 kv[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int j = j0 + u * NG + kslot;
            if (j < n) {
                kv[u] = *reinterpret_cast<const bf16x8 *>(
                    k_base + pool_slot(table, c0 + j, a.block_size) * slot_stride);
            } else {
                kv[u].w[0] = kv[u].w[1] = kv[u].w[2] = kv[u].w[3] = 0u;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int j = j0 + u * NG + kslot;
            const int key = c0 + j;
            float kf[8];
            unpack8(kv[u], kf);
#pragma unroll
            for (int r = 0; r < MAXR; ++r) {
                float s = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; ++e) s = fmaf(q[r][e], kf[e], s);
#pragma unroll
                for (int o = GS / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                if (lig == 0 && j < n && r < rows) {
                    const int pos = past + r / group;
                    const bool visible = key <= pos && (a.window == 0 || pos - key < a.window);
                    if (capped) s = softcap(s, a.softcap);
                    logits[r * MAX_CHUNK + j] = visible ? s : NEG_INF;
                }
            }
        }
    }
    __syncthreads();

    // Softmax of each row over the chunk: a warp per row. A row that sees no key of this
    // chunk (possible for a split) keeps max −inf and sum 0.
    for (int r = warp; r < rows; r += DECODE_WARPS) {
        float *row = logits + r * MAX_CHUNK;
        float mx = NEG_INF;
        for (int j = lane; j < n; j += 32) mx = fmaxf(mx, row[j]);
        mx = warp_max(mx);
        const float mu = mx == NEG_INF ? 0.0f : mx;
        float sum = 0.0f;
        for (int j = lane; j < n; j += 32) {
            const float p = expf(row[j] - mu);
            row[j] = p;
            sum += p;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            s_max[r] = mx;
            s_sum[r] = sum;
        }
    }
    __syncthreads();

    // O = P · V: each group sums its keys for its 8 dims of every row.
    float acc[MAXR][8];
#pragma unroll
    for (int r = 0; r < MAXR; ++r)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] = 0.0f;
    for (int j0 = warp * KPW; j0 < n; j0 += NG * UNROLL) {
        bf16x8 vv[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int j = j0 + u * NG + kslot;
            if (j < n) {
                vv[u] = *reinterpret_cast<const bf16x8 *>(
                    v_base + pool_slot(table, c0 + j, a.block_size) * slot_stride);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int j = j0 + u * NG + kslot;
            if (j < n) {
                float vf[8];
                unpack8(vv[u], vf);
#pragma unroll
                for (int r = 0; r < MAXR; ++r) {
                    if (r < rows) {
                        const float p = logits[r * MAX_CHUNK + j];
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(p, vf[e], acc[r][e]);
                    }
                }
            }
        }
    }
    // Sum over the warp's key groups (lanes lig, lig + GS, ...), then over the warps.
#pragma unroll
    for (int r = 0; r < MAXR; ++r)
#pragma unroll
        for (int e = 0; e < 8; ++e)
#pragma unroll
            for (int o = GS; o < 32; o <<= 1)
                acc[r][e] += __shfl_xor_sync(0xffffffffu, acc[r][e], o);
    __syncthreads();  // every warp is done with the probabilities: reuse smem
    float *red = smem;  // [DECODE_WARPS][MAXR][D]
    if (kslot == 0) {
#pragma unroll
        for (int r = 0; r < MAXR; ++r) {
            if (r < rows) {
#pragma unroll
                for (int e = 0; e < 8; ++e) red[(warp * MAXR + r) * D + lig * 8 + e] = acc[r][e];
            }
        }
    }
    __syncthreads();
    for (int idx = tid; idx < rows * D; idx += DECODE_WARPS * 32) {
        const int r = idx / D;
        const int d = idx % D;
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; ++w) o += red[(w * MAXR + r) * D + d];
        if (partial) {
            a.part_out[part_index(a, b, hk, r, split) * D + d] = o;
        } else {
            const i64 qh = (i64)(q0 + r / group) * a.heads + hk * group + r % group;
            // One chunk holds every visible key, so the row's own key makes the sum > 0.
            a.out[qh * D + d] = f32_to_bf16(o / s_sum[r]);
        }
    }
    if (tid < rows) {
        const int r = tid;
        if (partial) {
            const i64 pi = part_index(a, b, hk, r, split);
            a.part_ml[2 * pi] = s_max[r];
            a.part_ml[2 * pi + 1] = s_sum[r];
        } else {
            const int h = hk * group + r % group;
            a.lse[(i64)h * a.tq + q0 + r / group] = s_max[r] + logf(s_sum[r]);
        }
    }
}

#define DECODE_INSTANCE(D, R)                                                               \
    extern "C" __global__ void __launch_bounds__(DECODE_WARPS * 32)                          \
        paged_decode_d##D##_r##R(PagedArgs a) {                                             \
        paged_decode<D, R>(a);                                                              \
    }

DECODE_INSTANCE(64, 2)
DECODE_INSTANCE(64, 4)
DECODE_INSTANCE(64, 8)
DECODE_INSTANCE(128, 2)
DECODE_INSTANCE(128, 4)
DECODE_INSTANCE(128, 8)
DECODE_INSTANCE(256, 2)
DECODE_INSTANCE(256, 4)
DECODE_INSTANCE(256, 8)

// Merges the decode splits of one (sequence, kv head): a warp per row, rescaling each
// split's partial by exp(m_p − M).
extern "C" __global__ void __launch_bounds__(DECODE_WARPS * 32) paged_combine(PagedArgs a) {
    const int b = blockIdx.x;
    const int hk = blockIdx.y;
    const int group = a.heads / a.kv_heads;
    const int q0 = a.q_starts[b];
    const int rows = (a.q_starts[b + 1] - q0) * group;
    if (rows == 0 || rows > a.decode_max_rows) return;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int S = a.num_splits;
    const int D = a.head_dim;
    for (int r = warp; r < rows; r += DECODE_WARPS) {
        const i64 base = part_index(a, b, hk, r, 0);
        const float *ml = a.part_ml + 2 * base;
        float mx = NEG_INF;
        for (int p = lane; p < S; p += 32)
            if (ml[2 * p + 1] > 0.0f) mx = fmaxf(mx, ml[2 * p]);
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int p = lane; p < S; p += 32)
            if (ml[2 * p + 1] > 0.0f) sum += expf(ml[2 * p] - mx) * ml[2 * p + 1];
        sum = warp_sum(sum);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        const i64 qh = (i64)(q0 + r / group) * a.heads + hk * group + r % group;
        for (int d = lane; d < D; d += 32) {
            float o = 0.0f;
            for (int p = 0; p < S; ++p)
                if (ml[2 * p + 1] > 0.0f) o += expf(ml[2 * p] - mx) * a.part_out[(base + p) * D + d];
            a.out[qh * D + d] = f32_to_bf16(o * inv);
        }
        if (lane == 0) {
            const int h = hk * group + r % group;
            a.lse[(i64)h * a.tq + q0 + r / group] = sum > 0.0f ? mx + logf(sum) : NEG_INF;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Prefill (and chunked prefill): attention.cu's tensor-core kernel, reading K/V tiles through
// the block table. A block of 4 warps owns 64 GQA-packed rows of one (sequence, kv head).
template <int D, int BN, int MT, bool Q_IN_REGS>
__device__ __forceinline__ void paged_prefill(const PagedArgs &a) {
    constexpr int WR = 16 * MT;        // rows per warp: MT m-tiles of 16
    constexpr int BM = 4 * WR;         // rows per block: 4 warps
    constexpr int NT = 128;            // threads
    constexpr int STRIDE = D + 8;      // smem row stride (elements): +16 bytes
    constexpr int CHUNKS = D / 8;      // 16-byte chunks per row
    extern __shared__ __align__(16) u8 smem[];
    bf16 *sQ = reinterpret_cast<bf16 *>(smem);  // [BM][STRIDE]
    bf16 *sK = sQ + BM * STRIDE;                // [2][BN][STRIDE]
    bf16 *sV = sK + 2 * BN * STRIDE;            // [2][BN][STRIDE]

    const int b = blockIdx.z;
    const int hk = blockIdx.y;
    const int group = a.heads / a.kv_heads;
    const int q0 = a.q_starts[b];
    const int q_len = a.q_starts[b + 1] - q0;
    const int kv_len = a.kv_lens[b];
    const int rows = q_len * group;
    if (rows <= a.decode_max_rows) return;  // the decode kernel's sequence
    const int r0 = (gridDim.x - 1 - blockIdx.x) * BM;  // heaviest tiles first
    if (r0 >= rows) return;
    const int past = kv_len - q_len;  // query i sits at position past + i
    const int i_first = r0 / group;
    const int i_last = (min(r0 + BM, rows) - 1) / group;
    const int key_hi = past + i_last;  // inclusive
    const int key_lo = a.window > 0 ? max(0, past + i_first - a.window + 1) : 0;
    const int tile_lo = key_lo / BN;
    const int tile_hi = key_hi / BN;

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;  // fragment row (and row + 8)
    const int t4 = lane & 3;  // fragment column pair

    const i64 q_row_stride = (i64)a.heads * D;
    const i64 kv_row_stride = (i64)a.kv_heads * D;
    const int *table = a.block_tables + (i64)b * a.max_blocks;

    // Q tile → smem (zero rows past the sequence).
    for (int c = tid; c < BM * CHUNKS; c += NT) {
        const int r = c / CHUNKS;
        const int col = (c % CHUNKS) * 8;
        const int R = r0 + r;
        const bool ok = R < rows;
        const bf16 *src = ok ? a.q + (i64)(q0 + R / group) * q_row_stride +
                                   (i64)(hk * group + R % group) * D + col
                             : a.q;
        cp_async16(smem_u32(sQ + r * STRIDE + col), src, ok);
    }
    auto load_kv = [&](int tile, int buf) {
        const int kb = tile * BN;
        for (int c = tid; c < BN * CHUNKS; c += NT) {
            const int r = c / CHUNKS;
            const int col = (c % CHUNKS) * 8;
            const int key = kb + r;
            const bool ok = key < kv_len;
            // Past the sequence nothing is read (zero fill): the table is not consulted.
            const i64 off =
                ok ? pool_slot(table, key, a.block_size) * kv_row_stride + (i64)hk * D + col : 0;
            cp_async16(smem_u32(sK + (buf * BN + r) * STRIDE + col), a.k_pool + off, ok);
            cp_async16(smem_u32(sV + (buf * BN + r) * STRIDE + col), a.v_pool + off, ok);
        }
    };
    load_kv(tile_lo, 0);
    cp_async_commit();

    // Per-lane ldmatrix offsets (elements) inside a 16×16 operand tile.
    const int mat = lane >> 3;
    const int a_off = ((lane & 7) + (mat & 1) * 8) * STRIDE + (mat >> 1) * 8;  // Q (A operand)
    const int k_off = ((lane & 7) + (mat >> 1) * 8) * STRIDE + (mat & 1) * 8;  // K (B, no trans)
    const int v_off = ((lane & 7) + (mat & 1) * 8) * STRIDE + (mat >> 1) * 8;  // V (B, trans)
    const u32 sQ_base = smem_u32(sQ + warp * WR * STRIDE + a_off);
    const u32 sK_base = smem_u32(sK + k_off);
    const u32 sV_base = smem_u32(sV + v_off);

    // My rows: for m-tile mt, warp·WR + mt·16 + g (index 2·mt) and + 8 (index 2·mt + 1).
    int pos[2 * MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int R = r0 + warp * WR + mt * 16 + g;
        pos[2 * mt] = past + R / group;
        pos[2 * mt + 1] = past + (R + 8) / group;
    }
    // The warp's own key range: tiles wholly outside it are all masked for its rows.
    const int w_first = r0 + warp * WR;
    const bool w_valid = w_first < rows;
    const int w_key_hi = past + (min(w_first + WR, rows) - 1) / group;
    const int w_key_lo = a.window > 0 ? past + w_first / group - a.window + 1 : 0;

    const bool capped = a.softcap > 0.0f;
    const float scale_log2 = a.scale * LOG2E;

    float o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < D / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.0f;
    float m[2 * MT], l[2 * MT];  // running max (log2 units), this thread's share of the sum
#pragma unroll
    for (int r = 0; r < 2 * MT; ++r) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
    }
    u32 qf[Q_IN_REGS ? MT : 1][Q_IN_REGS ? D / 16 : 1][4];

    for (int tile = tile_lo; tile <= tile_hi; ++tile) {
        const int buf = (tile - tile_lo) & 1;
        if (tile < tile_hi) {
            load_kv(tile + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if constexpr (Q_IN_REGS) {
            if (tile == tile_lo) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int ks = 0; ks < D / 16; ++ks)
                        ldsm_x4(qf[mt][ks], sQ_base + (mt * 16 * STRIDE + ks * 16) * 2);
            }
        }
        const int kb = tile * BN;
        if (w_valid && kb <= w_key_hi && kb + BN - 1 >= w_key_lo) {
            // S = Q · Kᵀ for this warp's WR rows × BN keys; each K fragment feeds MT m-tiles.
            float s[MT][BN / 8][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int i = 0; i < BN / 8; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.0f;
            const u32 kbuf = sK_base + buf * BN * STRIDE * 2;
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                u32 qa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if constexpr (Q_IN_REGS) {
                        qa[mt][0] = qf[mt][ks][0];
                        qa[mt][1] = qf[mt][ks][1];
                        qa[mt][2] = qf[mt][ks][2];
                        qa[mt][3] = qf[mt][ks][3];
                    } else {
                        ldsm_x4(qa[mt], sQ_base + (mt * 16 * STRIDE + ks * 16) * 2);
                    }
                }
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    u32 kf[4];
                    ldsm_x4(kf, kbuf + (np * 16 * STRIDE + ks * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_bf16(s[mt][2 * np], qa[mt], kf[0], kf[1]);
                        mma_bf16(s[mt][2 * np + 1], qa[mt], kf[2], kf[3]);
                    }
                }
            }

            // Scale (+ soft-cap) into log2 units; mask where the tile crosses an edge.
            const bool need_mask = kb + BN - 1 > past + i_first ||
                                   (a.window > 0 && past + i_last - kb >= a.window);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float x = s[mt][nt][e];
                        x = capped ? softcap(x * a.scale, a.softcap) * LOG2E : x * scale_log2;
                        if (need_mask) {
                            const int key = kb + nt * 8 + 2 * t4 + (e & 1);
                            const int p = pos[2 * mt + (e >> 1)];
                            if (key > p || (a.window > 0 && p - key >= a.window)) x = NEG_INF;
                        }
                        s[mt][nt][e] = x;
                    }

            // Online softmax update, row by row (r = 2·mt + half).
            u32 p[MT][BN / 16][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int r = 2 * mt + half;
                    float mx = NEG_INF;
#pragma unroll
                    for (int nt = 0; nt < BN / 8; ++nt)
                        mx = fmaxf(mx, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float mn = fmaxf(m[r], mx);
                    // A row with no visible key yet keeps max −inf; subtract 0 then so exp2
                    // gives 0, not NaN.
                    const float mu = mn == NEG_INF ? 0.0f : mn;
                    const float corr = fast_exp2(m[r] - mu);
                    m[r] = mn;
                    l[r] *= corr;
#pragma unroll
                    for (int i = 0; i < D / 8; ++i) {
                        o[mt][i][2 * half] *= corr;
                        o[mt][i][2 * half + 1] *= corr;
                    }
#pragma unroll
                    for (int nt = 0; nt < BN / 8; ++nt) {
                        const float p0 = fast_exp2(s[mt][nt][2 * half] - mu);
                        const float p1 = fast_exp2(s[mt][nt][2 * half + 1] - mu);
                        l[r] += p0 + p1;
                        // The S accumulator layout of n-tiles 2kk, 2kk+1 is the A layout of
                        // k-step kk: registers (row g: n-tile 2kk, row g+8: 2kk, row g:
                        // 2kk+1, row g+8: 2kk+1).
                        p[mt][nt / 2][(nt & 1) * 2 + half] = cvt_bf16x2(p0, p1);
                    }
                }
            }

            // O += P · V; each V fragment feeds MT m-tiles.
            const u32 vbuf = sV_base + buf * BN * STRIDE * 2;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    u32 vf[4];
                    ldsm_x4_trans(vf, vbuf + (kk * 16 * STRIDE + dp * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_bf16(o[mt][2 * dp], p[mt][kk], vf[0], vf[1]);
                        mma_bf16(o[mt][2 * dp + 1], p[mt][kk], vf[2], vf[3]);
                    }
                }
            }
        }
        __syncthreads();  // everyone is done with `buf` before the next prefetch overwrites it
    }

    // Finish: full row sums, normalise, stage the warp's rows in its own sQ rows, then store
    // 16-byte chunks.
    bf16 *stage = sQ + warp * WR * STRIDE;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = 2 * mt + half;
            float sum = l[r];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
            const int row = mt * 16 + half * 8 + g;  // within the warp
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                *reinterpret_cast<u32 *>(stage + row * STRIDE + dt * 8 + 2 * t4) =
                    cvt_bf16x2(o[mt][dt][2 * half] * inv, o[mt][dt][2 * half + 1] * inv);
            }
            const int R = w_first + row;
            if (t4 == 0 && R < rows) {
                const int h = hk * group + R % group;
                a.lse[(i64)h * a.tq + q0 + R / group] =
                    sum > 0.0f ? (m[r] + __log2f(sum)) * LN2 : NEG_INF;
            }
        }
    }
    __syncwarp();
    for (int c = lane; c < WR * CHUNKS; c += 32) {
        const int r = c / CHUNKS;
        const int col = (c % CHUNKS) * 8;
        const int R = w_first + r;
        if (R < rows) {
            bf16 *dst = a.out + (i64)(q0 + R / group) * q_row_stride +
                        (i64)(hk * group + R % group) * D + col;
            *reinterpret_cast<bf16x8 *>(dst) =
                *reinterpret_cast<const bf16x8 *>(stage + r * STRIDE + col);
        }
    }
}

// Instances: paged_prefill_d<D> with BN keys per tile, one m-tile per warp (as attention.cu's
// _m1 instances of these head dims; Q fragments in registers where they fit).
#define PREFILL_INSTANCE(D, BN, QREG)                                                      \
    extern "C" __global__ void __launch_bounds__(128) paged_prefill_d##D(PagedArgs a) {   \
        paged_prefill<D, BN, 1, QREG>(a);                                                 \
    }

PREFILL_INSTANCE(64, 64, true)
PREFILL_INSTANCE(128, 64, true)
PREFILL_INSTANCE(256, 32, false)

// ---------------------------------------------------------------------------------------
// One warp per (query, head); lane owns dims lane, lane + 32, … (head_dim ≤ 256).
// Natural-log online softmax in f32 with accurate expf. Every sequence, whatever its rows.
extern "C" __global__ void __launch_bounds__(32) paged_simple(PagedArgs a) {
    const int qi = blockIdx.x;  // global query index
    const int h = blockIdx.y;
    const int lane = threadIdx.x;
    const int D = a.head_dim;
    // Sequence of this query: the last b with q_starts[b] <= qi (binary search).
    int lo = 0, hi = a.batch - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (a.q_starts[mid] <= qi) lo = mid; else hi = mid - 1;
    }
    const int b = lo;
    const int q_len = a.q_starts[b + 1] - a.q_starts[b];
    const int kv_len = a.kv_lens[b];
    const int pos = kv_len - q_len + (qi - a.q_starts[b]);
    const int hk = h / (a.heads / a.kv_heads);
    const int first = a.window > 0 ? max(0, pos - a.window + 1) : 0;
    const int *table = a.block_tables + (i64)b * a.max_blocks;
    const i64 slot_stride = (i64)a.kv_heads * D;

    float q[8], acc[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int d = lane + 32 * c;
        q[c] = d < D ? bf16_to_f32(a.q[((i64)qi * a.heads + h) * D + d]) : 0.0f;
        acc[c] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int key = first; key <= pos; ++key) {
        const i64 row = pool_slot(table, key, a.block_size) * slot_stride + (i64)hk * D;
        const bf16 *kr = a.k_pool + row;
        const bf16 *vr = a.v_pool + row;
        float part = 0.0f;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const int d = lane + 32 * c;
            if (d < D) part += q[c] * bf16_to_f32(kr[d]);
        }
        float sc = warp_sum(part) * a.scale;
        if (a.softcap > 0.0f) sc = softcap(sc, a.softcap);
        const float mn = fmaxf(m, sc);
        const float corr = expf(m - mn);  // 0 on the first key (m = −inf)
        const float p = expf(sc - mn);
        l = l * corr + p;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const int d = lane + 32 * c;
            acc[c] = acc[c] * corr + (d < D ? p * bf16_to_f32(vr[d]) : 0.0f);
        }
        m = mn;
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int d = lane + 32 * c;
        if (d < D) a.out[((i64)qi * a.heads + h) * D + d] = f32_to_bf16(acc[c] * inv);
    }
    if (lane == 0) a.lse[(i64)h * a.tq + qi] = l > 0.0f ? m + logf(l) : NEG_INF;
}

// ---------------------------------------------------------------------------------------
// k_pool[slots[t]] = k_new[t], v_pool[slots[t]] = v_new[t] for every t with slots[t] ≥ 0;
// a row is Hkv·D elements. Grid-stride over 16-byte chunks when rows are a multiple of 8
// elements (every model head dim), single elements otherwise.
extern "C" __global__ void paged_kv_write(bf16 *k_pool, bf16 *v_pool, const bf16 *k_new,
                                          const bf16 *v_new, const int *slots, int tokens,
                                          int row) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row % 8 == 0) {
        const int chunks = row / 8;
        const i64 total = (i64)tokens * chunks;
        for (i64 i = first; i < total; i += stride) {
            const int t = (int)(i / chunks);
            const int slot = slots[t];
            if (slot < 0) continue;
            const i64 src = (i64)t * row + (i % chunks) * 8;
            const i64 dst = (i64)slot * row + (i % chunks) * 8;
            *reinterpret_cast<bf16x8 *>(k_pool + dst) = *reinterpret_cast<const bf16x8 *>(k_new + src);
            *reinterpret_cast<bf16x8 *>(v_pool + dst) = *reinterpret_cast<const bf16x8 *>(v_new + src);
        }
    } else {
        const i64 total = (i64)tokens * row;
        for (i64 i = first; i < total; i += stride) {
            const int t = (int)(i / row);
            const int slot = slots[t];
            if (slot < 0) continue;
            const i64 dst = (i64)slot * row + i % row;
            k_pool[dst] = k_new[i];
            v_pool[dst] = v_new[i];
        }
    }
}
