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
//  - paged_prefill_d{64,128,256}: the tensor-core loop of attention.cu (attention_tile.cuh:
//    same tiling, same GQA row packing), with K/V tiles gathered through the block table. It
//    takes the sequences with more rows than the decode kernel's R.
//  - paged_simple: one warp per (query, head), scalar f32, any head dim ≤ 256: the fallback
//    and an independent cross-check in tests.
// paged_kv_write: copies new keys and values [T, Hkv, D] into their slots (slot −1: skipped).
#include "attention_tile.cuh"

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
// Prefill (and chunked prefill): attention.cu's tensor-core loop (attention_tile.cuh), reading
// K/V tiles through the block table. A block of 4 warps owns 64 GQA-packed rows of one
// (sequence, kv head).

// K/V rows in the pools [num_blocks, block_size, Hkv, D], found through sequence b's block
// table; sequences of at most R (decode_max_rows) GQA-packed rows are the decode kernel's.
template <int D>
struct PagedKv {
    const PagedArgs &a;
    const int *table;  // [max_blocks]
    int hk;
    i64 row_stride;  // Hkv · D

    __device__ __forceinline__ static int kv_len(const PagedArgs &a, int b) { return a.kv_lens[b]; }
    __device__ __forceinline__ static bool other_kernel(const PagedArgs &a, int rows) {
        return rows <= a.decode_max_rows;
    }
    __device__ __forceinline__ PagedKv(const PagedArgs &a, int b, int hk, i64 row_stride)
        : a(a), table(a.block_tables + (i64)b * a.max_blocks), hk(hk), row_stride(row_stride) {}

    // Past the sequence nothing is read (zero fill): the table is not consulted.
    __device__ __forceinline__ i64 offset(int key, int col, bool ok) const {
        return ok ? pool_slot(table, key, a.block_size) * row_stride + (i64)hk * D + col : 0;
    }
    __device__ __forceinline__ const bf16 *k_src(i64 off, bool) const { return a.k_pool + off; }
    __device__ __forceinline__ const bf16 *v_src(i64 off, bool) const { return a.v_pool + off; }
};

// Instances: paged_prefill_d<D> with BN keys per tile, one m-tile per warp (as attention.cu's
// _m1 instances of these head dims; Q fragments in registers where they fit).
#define PREFILL_INSTANCE(D, BN, QREG)                                                      \
    extern "C" __global__ void __launch_bounds__(128) paged_prefill_d##D(PagedArgs a) {   \
        attention_tiles<D, BN, 1, QREG, PagedKv<D>>(a);                                   \
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
