// top_k.cu — each row's k largest logits (value descending, ties to the lower id) and its
// log-sum-exp, so that sampling needs only [B, k] numbers on the host instead of [B, V].
//
// One pass over the logits (for k ≤ 32). Each thread keeps, in registers, the sorted list of
// the LIST best (value, id) pairs it has seen and an online (max, Σ exp(l − max)) for the lse;
// the row is read as float4, UNROLL = 4 loads in flight per thread. Then the block merges its
// threads' lists (block_top): each warp pulls its best `take` in rounds of a shuffle argmax
// over its lanes' list heads, the winner popping its head; warp 0 merges the warps' lists,
// parked in shared memory, the same way. LIST is a template parameter (registers can only be
// indexed by compile-time constants): 2, 8, 16 or 32, the launcher picks the smallest ≥ k.
// k > 32 takes ⌈k / 32⌉ passes, each ranking only the elements strictly after the previous
// pass's last pick in the op's strict order, so ties at a pass boundary split by id.
//
// When the rows alone cannot fill the GPU (small batches), each row is split into `slices`
// blocks (grid [B, slices]): each ranks its slice and writes its top k and its (max, sum, nan)
// to a scratch buffer; top_k_merge_k* then ranks those candidates per row — the row's top k
// is among them — and combines the sums. With one slice the rows kernel writes the result.
//
// NaN orders as −inf, but any NaN makes the row's lse NaN: the caller can tell the row is bad
// and read it whole. lse is the row's max (its first pick) when that is ±inf, else
// max + ln Σ exp(l − max), summed in f32 as the max grows (rescaling the sum by
// exp(old max − new max)); the tests hold it to the CPU's f64 sum within 5e-6 relative.
//
// At the end of the file, logits_at_least_f32: a listed row's tokens at or above a threshold,
// for rows whose candidates tie at the top-k cut.
#include "common.cuh"

#define NO_ID 0xffffffffu
// The running max starts at the lowest finite float, not −inf: exp(x − max) is then never
// exp(−inf − (−inf)) = NaN, and a −inf logit adds exp(−inf) = 0.
#define LOWEST_F32 (-3.40282347e38f)
// Threads of a merge block: it ranks at most 64 slices × k ≤ 8192 candidates.
#define MERGE_THREADS 128

// Whether (a, ia) comes before (b, ib): larger value first, then the lower id.
__device__ __forceinline__ bool ranks_before(float a, u32 ia, float b, u32 ib) {
    return a > b || (a == b && ia < ib);
}

__device__ __forceinline__ float nan_to_neg_inf(float x) { return x != x ? NEG_INF : x; }

// Keeps the earlier of (v, i) and the other lane's pair, across the warp.
__device__ __forceinline__ void warp_first(float &v, u32 &i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const u32 oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ranks_before(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

// One thread's best LIST (value, id) pairs, sorted in the op's order. (−inf, NO_ID) pads
// the unfilled tail: it ranks after every real element, −inf ones included.
template <int LIST>
struct Candidates {
    float val[LIST];
    u32 id[LIST];

    __device__ __forceinline__ void clear() {
#pragma unroll
        for (int j = 0; j < LIST; ++j) {
            val[j] = NEG_INF;
            id[j] = NO_ID;
        }
    }

    // Inserts (x, i) if it ranks before the last entry, dropping that one. Unrolled: every
    // slot is a register. `below` is "x ranks before the old slot j".
    __device__ __forceinline__ void offer(float x, u32 i) {
        if (!ranks_before(x, i, val[LIST - 1], id[LIST - 1])) return;
        bool below = true;
#pragma unroll
        for (int j = LIST - 1; j > 0; --j) {
            const bool up = ranks_before(x, i, val[j - 1], id[j - 1]);
            val[j] = up ? val[j - 1] : (below ? x : val[j]);
            id[j] = up ? id[j - 1] : (below ? i : id[j]);
            below = up;
        }
        if (below) {
            val[0] = x;
            id[0] = i;
        }
    }

    // Drops the head.
    __device__ __forceinline__ void pop() {
#pragma unroll
        for (int j = 0; j + 1 < LIST; ++j) {
            val[j] = val[j + 1];
            id[j] = id[j + 1];
        }
        val[LIST - 1] = NEG_INF;
        id[LIST - 1] = NO_ID;
    }
};

// ln Σ exp(x) over the logits seen, kept as (max, Σ exp(x − max)); NaN logits only set `nan`.
struct OnlineSum {
    float max;  // LOWEST_F32 until a larger logit comes
    float sum;
    int nan;

    __device__ __forceinline__ void clear() {
        max = LOWEST_F32;
        sum = 0.0f;
        nan = 0;
    }

    // One exp per logit: exp(x − max) when x does not raise the max, else the sum is
    // rescaled by exp(max − x) and x adds exp(0) = 1. (A NaN adds 1: the lse is NaN anyway.)
    __device__ __forceinline__ void add(float x) {
        nan |= x != x;
        const float hi = fmaxf(max, x);
        const float e = expf(fminf(max, x) - hi);
        sum = x > max ? fmaf(sum, e, 1.0f) : sum + e;
        max = hi;
    }

    // Folds in another (max, sum). Two +inf maxes give a NaN sum, never read: the lse of a
    // row holding +inf is +inf.
    __device__ __forceinline__ void merge(float omax, float osum) {
        const float hi = fmaxf(max, omax);
        sum = sum * expf(max - hi) + osum * expf(omax - hi);
        max = hi;
    }

    // The lse, given the row's first pick (its max, NaN as −inf).
    __device__ __forceinline__ float lse(float first) const {
        if (nan) return __int_as_float(0x7fc00000);
        if (first == NEG_INF || first == -NEG_INF) return first;
        return max + logf(sum);
    }
};

// The block's OnlineSum, in thread 0. s_max, s_sum: 32 floats of shared memory each.
__device__ __forceinline__ void block_online_sum(OnlineSum &acc, float *s_max, float *s_sum) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        acc.merge(__shfl_xor_sync(0xffffffffu, acc.max, o),
                  __shfl_xor_sync(0xffffffffu, acc.sum, o));
    }
    if (lane == 0) {
        s_max[warp] = acc.max;
        s_sum[warp] = acc.sum;
    }
    acc.nan = __syncthreads_or(acc.nan);  // also the barrier before warp 0 reads s_*
    if (warp == 0) {
        acc.max = lane < nwarps ? s_max[lane] : LOWEST_F32;
        acc.sum = lane < nwarps ? s_sum[lane] : 0.0f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            acc.merge(__shfl_xor_sync(0xffffffffu, acc.max, o),
                      __shfl_xor_sync(0xffffffffu, acc.sum, o));
        }
    }
}

// What block_top leaves in shared memory for every thread.
struct Picks {
    float first_val;  // the block's first pick
    float last_val;   // and its last, where the next pass resumes
    u32 last_id;
};

// Merges the block's per-thread lists (consumed) into the block's first `take` ≤ LIST pairs,
// written to out_val/out_id [take] by thread 0. s_val, s_id: [WARPS·LIST] shared memory.
// Ends with a barrier, after which `picks` holds the first and last pick.
template <int LIST, int WARPS>
__device__ __forceinline__ void block_top(Candidates<LIST> &c, int take, float *out_val,
                                          u32 *out_id, float *s_val, u32 *s_id, Picks *picks) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    // Round r: the warp's best head; lane r keeps it, its owner pops it. Ids are unique, so
    // only the owner matches — except padding (NO_ID), which any padded lane may pop.
    float mine_val = NEG_INF;
    u32 mine_id = NO_ID;
    for (int r = 0; r < take; ++r) {
        float bv = c.val[0];
        u32 bi = c.id[0];
        warp_first(bv, bi);
        if (lane == r) {
            mine_val = bv;
            mine_id = bi;
        }
        if (c.id[0] == bi) c.pop();
    }
    if (lane < LIST) {
        s_val[warp * LIST + lane] = mine_val;
        s_id[warp * LIST + lane] = mine_id;
    }
    __syncthreads();
    // Warp 0: lane w walks warp w's sorted list with a cursor.
    if (warp == 0) {
        int at = 0;
        for (int r = 0; r < take; ++r) {
            const bool has = lane < WARPS && at < take;
            const float hv = has ? s_val[lane * LIST + at] : NEG_INF;
            const u32 hi = has ? s_id[lane * LIST + at] : NO_ID;
            float bv = hv;
            u32 bi = hi;
            warp_first(bv, bi);
            if (has && hi == bi) ++at;
            if (lane == 0) {
                out_val[r] = bv;
                out_id[r] = bi;
                if (r == 0) picks->first_val = bv;
                if (r == take - 1) {
                    picks->last_val = bv;
                    picks->last_id = bi;
                }
            }
        }
    }
    __syncthreads();
}

// Whether (x, i) is offered in this pass: every element in the first, then only those
// strictly after the previous pass's last pick.
template <bool FIRST>
__device__ __forceinline__ bool in_pass(float x, u32 i, float after_val, u32 after_id) {
    return FIRST || ranks_before(after_val, after_id, x, i);
}

// One logit (not part of a float4 step): into the sum (first pass) and offered to the list.
template <int LIST, bool FIRST>
__device__ __forceinline__ void visit(float x, u32 i, Candidates<LIST> &c, OnlineSum &acc,
                                      float after_val, u32 after_id) {
    if (FIRST) acc.add(x);
    const float y = nan_to_neg_inf(x);
    if (in_pass<FIRST>(y, i, after_val, after_id)) c.offer(y, i);
}

// One step of the scan: UNROLL float4 per thread, quads q, q + THREADS, … of `quads`
// (all of them in range unless CHECK). Every logit is tested against the list's current
// last entry first; the few that beat it are inserted afterwards, one at a time through a
// single copy of the insertion code (offer tests again: the list may have moved up).
template <int LIST, int THREADS, int UNROLL, bool FIRST, bool CHECK>
__device__ __forceinline__ void scan_step(const float4 *quad, i64 q, i64 quads, u32 id0,
                                          Candidates<LIST> &c, OnlineSum &acc, float after_val,
                                          u32 after_id) {
    float x[4 * UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        float4 f = make_float4(NEG_INF, NEG_INF, NEG_INF, NEG_INF);
        if (!CHECK || q + u * THREADS < quads) f = __ldg(quad + q + u * THREADS);
        x[4 * u] = f.x;
        x[4 * u + 1] = f.y;
        x[4 * u + 2] = f.z;
        x[4 * u + 3] = f.w;
    }
    const float last_val = c.val[LIST - 1];
    const u32 last_id = c.id[LIST - 1];
    u32 hits = 0;
#pragma unroll
    for (int e = 0; e < 4 * UNROLL; ++e) {
        const int u = e >> 2;
        if (CHECK && q + u * THREADS >= quads) continue;
        const u32 i = id0 + (u32)(4 * u * THREADS + (e & 3));
        if (FIRST) acc.add(x[e]);
        x[e] = nan_to_neg_inf(x[e]);
        if (in_pass<FIRST>(x[e], i, after_val, after_id) &&
            ranks_before(x[e], i, last_val, last_id)) {
            hits |= 1u << e;
        }
    }
    while (hits) {
        const int e = __ffs(hits) - 1;
        hits &= hits - 1;
        float y = x[0];
#pragma unroll
        for (int j = 1; j < 4 * UNROLL; ++j) {
            if (j == e) y = x[j];
        }
        c.offer(y, id0 + (u32)(4 * (e >> 2) * THREADS + (e & 3)));
    }
}

// Offers every logit of row[lo, lo + n) to the thread's list (first pass: also to its sum).
// Thread t takes the 0–3 elements before the first 16-byte boundary if t is below their
// count, then float4 quads t, t + THREADS, …, then the 0–3 after the last whole quad.
template <int LIST, int THREADS, int UNROLL, bool FIRST>
__device__ __forceinline__ void scan(const float *row, i64 lo, i64 n, Candidates<LIST> &c,
                                     OnlineSum &acc, float after_val, u32 after_id) {
    const float *p = row + lo;
    const int t = threadIdx.x;
    const i64 head = min(n, (i64)(((16u - ((u32)(u64)p & 15u)) & 15u) >> 2));
    if (t < head) visit<LIST, FIRST>(p[t], (u32)(lo + t), c, acc, after_val, after_id);
    const i64 quads = (n - head) >> 2;
    const float4 *quad = (const float4 *)(p + head);
    i64 q = t;
    for (; q + (UNROLL - 1) * THREADS < quads; q += UNROLL * THREADS) {
        scan_step<LIST, THREADS, UNROLL, FIRST, false>(quad, q, quads, (u32)(lo + head + 4 * q),
                                                       c, acc, after_val, after_id);
    }
    if (q < quads) {
        scan_step<LIST, THREADS, UNROLL, FIRST, true>(quad, q, quads, (u32)(lo + head + 4 * q),
                                                      c, acc, after_val, after_id);
    }
    const i64 tail = head + 4 * quads;
    if (t < n - tail) {
        visit<LIST, FIRST>(p[tail + t], (u32)(lo + tail + t), c, acc, after_val, after_id);
    }
}

// Block (row b = blockIdx.x, slice blockIdx.y of gridDim.y): the top k of
// logits[b, lo .. lo + slice_len) (lo = blockIdx.y · slice_len).
// One slice: values, ids [B, k], stats = lse [B]. Several: values, ids [B, slices, k] and
// stats [B, slices, 3] = (max, sum, nan ? 1 : 0); a slice shorter than k pads its list with
// (−inf, NO_ID).
template <int LIST, int THREADS, int UNROLL>
__device__ __forceinline__ void rank_rows(const float *logits, float *values, u32 *ids,
                                          float *stats, i64 v, int k, i64 slice_len) {
    constexpr int WARPS = THREADS / 32;
    __shared__ float s_val[WARPS * LIST];
    __shared__ u32 s_id[WARPS * LIST];
    __shared__ float s_max[32];
    __shared__ float s_sum[32];
    __shared__ Picks picks;
    const i64 b = blockIdx.x;
    const int slices = gridDim.y;
    const i64 lo = (i64)blockIdx.y * slice_len;
    const i64 n = max((i64)0, min(slice_len, v - lo));
    const float *row = logits + b * v;
    const i64 part = b * slices + blockIdx.y;
    float *out_val = values + part * k;
    u32 *out_id = ids + part * k;

    Candidates<LIST> c;
    OnlineSum acc;
    c.clear();
    acc.clear();
    scan<LIST, THREADS, UNROLL, true>(row, lo, n, c, acc, 0.0f, NO_ID);
    block_online_sum(acc, s_max, s_sum);
    block_top<LIST, WARPS>(c, min(LIST, k), out_val, out_id, s_val, s_id, &picks);
    if (threadIdx.x == 0) {
        if (slices == 1) {
            stats[b] = acc.lse(picks.first_val);
        } else {
            stats[3 * part] = acc.max;
            stats[3 * part + 1] = acc.sum;
            stats[3 * part + 2] = acc.nan ? 1.0f : 0.0f;
        }
    }
    for (int done = LIST; done < k; done += LIST) {
        const float after_val = picks.last_val;
        const u32 after_id = picks.last_id;
        c.clear();
        scan<LIST, THREADS, UNROLL, false>(row, lo, n, c, acc, after_val, after_id);
        block_top<LIST, WARPS>(c, min(LIST, k - done), out_val + done, out_id + done, s_val,
                               s_id, &picks);
    }
}

// Block b: row b's top k among its slices' candidates part_val, part_id [B, slices, k], and
// its lse from their part_stats [B, slices, 3] (see rank_rows). values, ids: [B, k]; lse [B].
template <int LIST>
__device__ __forceinline__ void merge_slices(const float *part_val, const u32 *part_id,
                                             const float *part_stats, float *values, u32 *ids,
                                             float *lse, int slices, int k) {
    constexpr int WARPS = MERGE_THREADS / 32;
    __shared__ float s_val[WARPS * LIST];
    __shared__ u32 s_id[WARPS * LIST];
    __shared__ Picks picks;
    const i64 b = blockIdx.x;
    const int n = slices * k;
    const float *cand_val = part_val + b * n;
    const u32 *cand_id = part_id + b * n;
    float after_val = 0.0f;
    u32 after_id = NO_ID;
    Candidates<LIST> c;
    for (int done = 0; done < k; done += LIST) {
        c.clear();
        for (int j = threadIdx.x; j < n; j += MERGE_THREADS) {
            const float x = cand_val[j];
            const u32 i = cand_id[j];
            if (done == 0 || ranks_before(after_val, after_id, x, i)) c.offer(x, i);
        }
        block_top<LIST, WARPS>(c, min(LIST, k - done), values + b * k + done, ids + b * k + done,
                               s_val, s_id, &picks);
        if (done == 0 && threadIdx.x == 0) {
            OnlineSum acc;
            acc.clear();
            const float *st = part_stats + 3 * b * slices;
            for (int s = 0; s < slices; ++s) {
                acc.merge(st[3 * s], st[3 * s + 1]);
                acc.nan |= st[3 * s + 2] != 0.0f;
            }
            lse[b] = acc.lse(picks.first_val);
        }
        after_val = picks.last_val;
        after_id = picks.last_id;
    }
}

// The kernels per list length, named top_k_rows_k<LIST> and top_k_merge_k<LIST>. THREADS
// must match the launcher's block size (LISTS in cuda/ops/top_k.rs); two blocks fit on an SM
// (registers capped at 64 a thread for 512 threads, 128 for 256: the larger lists need more).
// Requires 1 ≤ k ≤ v < 2³² − 1 (checked by the launcher).
#define TOP_K_KERNELS(LIST, THREADS, UNROLL)                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS, 2)                                   \
        top_k_rows_k##LIST(const float *logits, float *values, u32 *ids, float *stats, i64 v, \
                           int k, i64 slice_len) {                                             \
        rank_rows<LIST, THREADS, UNROLL>(logits, values, ids, stats, v, k, slice_len);         \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(MERGE_THREADS)                                \
        top_k_merge_k##LIST(const float *part_val, const u32 *part_id,                         \
                            const float *part_stats, float *values, u32 *ids, float *lse,      \
                            int slices, int k) {                                               \
        merge_slices<LIST>(part_val, part_id, part_stats, values, ids, lse, slices, k);        \
    }

TOP_K_KERNELS(2, 512, 4)
TOP_K_KERNELS(8, 512, 4)
TOP_K_KERNELS(16, 256, 4)
TOP_K_KERNELS(32, 256, 4)

// ---------------------------------------------------------------------------------------
// logits_at_least_f32: for a few listed rows, every token whose logit is ≥ the row's
// threshold, in id order, with its logit — the tokens a top-k cut with ties may keep, when
// the candidates above could not prove the cut.
//
// One block per listed row. The row is read in tiles of blockDim consecutive ids (coalesced);
// each tile is compacted in id order: a warp ballot gives each hit its place in its warp, the
// warps' counts (in shared memory) its warp's place in the tile, and the running total the
// tile's place in the row. Every thread keeps the same total, so the early stop once the row
// has more than `slots` hits is block-uniform. NaN never compares ≥, so it never qualifies.
//
// logits: [B, v] f32; args: [2n] words — the rows [n], then the thresholds' f32 bits [n];
// counts: [n] (the row's hits, or the count that passed `slots` when the row stopped early);
// ids, values: [n, slots]. Grid (n), block a multiple of 32, ≤ 1024.
extern "C" __global__ void logits_at_least_f32(const float *logits, const u32 *args, u32 *counts,
                                               u32 *ids, float *values, i64 v, int n,
                                               u32 slots) {
    __shared__ u32 warp_hits[32];
    const int j = blockIdx.x;
    const float *row = logits + (i64)args[j] * v;
    const float t = __uint_as_float(args[n + j]);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    u32 *row_ids = ids + (i64)j * slots;
    float *row_values = values + (i64)j * slots;

    u32 total = 0;  // hits in the tiles before this one; the same in every thread
    for (i64 base = 0; base < v; base += blockDim.x) {
        const i64 i = base + threadIdx.x;
        const float x = i < v ? row[i] : NEG_INF;
        const bool hit = i < v && x >= t;
        const u32 ballot = __ballot_sync(0xffffffffu, hit);
        if (lane == 0) warp_hits[warp] = __popc(ballot);
        __syncthreads();
        u32 before = total + __popc(ballot & ((1u << lane) - 1u));
        u32 tile = 0;
        for (int w = 0; w < nwarps; ++w) {
            const u32 c = warp_hits[w];
            tile += c;
            if (w < warp) before += c;
        }
        if (hit && before < slots) {
            row_ids[before] = (u32)i;
            row_values[before] = x;
        }
        total += tile;
        // Everyone has read warp_hits before the next tile rewrites it.
        __syncthreads();
        if (total > slots) break;
    }
    if (threadIdx.x == 0) counts[j] = total;
}
