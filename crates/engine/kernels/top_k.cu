// top_k.cu — each row's k largest logits (value descending, ties to the lower id) and its
// log-sum-exp, so that sampling needs only [B, k] numbers on the host instead of [B, V].
//
// One block per row. Pass 1 reads the row for its max (and whether it holds a NaN), pass 2
// for Σ exp(l − max): lse = max + ln(sum), the normaliser of the raw log-probs. Then k rounds
// of a block-wide argmax over the elements strictly after the previous pick in the strict
// total order (value desc, id asc): nothing is marked, each round rereads the row (from L2
// when it fits). k is small (≤ 128), V up to a few 100k: k·V reads per row is cheap next to
// copying the row to the host.
//
// NaN orders as −inf (so every round finds an element while picks remain), but any NaN makes
// the row's lse NaN: the caller can tell the row is bad and read it whole.
//
// At the end of the file, logits_at_least_f32: a listed row's tokens at or above a threshold,
// for rows whose candidates tie at the top-k cut.
#include "common.cuh"

#define NO_ID 0xffffffffu

// Whether (a, ia) comes before (b, ib): larger value first, then the lower id.
__device__ __forceinline__ bool ranks_before(float a, u32 ia, float b, u32 ib) {
    return a > b || (a == b && ia < ib);
}

__device__ __forceinline__ float nan_to_neg_inf(float x) { return x != x ? NEG_INF : x; }

// Max over a block of up to 1024 threads; every thread gets it. Same scratch contract as
// block_sum.
__device__ __forceinline__ float block_max_f32(float v, float *scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = lane < nwarps ? scratch[lane] : NEG_INF;
    m = warp_max(m);
    __syncthreads();
    return m;
}

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

// logits: [B, v] f32; values, ids: [B, k]; lse: [B]. Grid (B), block a multiple of 32, ≤ 1024.
// Requires 1 ≤ k ≤ v < 2³² − 1 (checked by the launcher).
extern "C" __global__ void top_k_candidates_f32(const float *logits, float *values, u32 *ids,
                                                float *lse, i64 v, int k) {
    __shared__ float scratch[32];
    __shared__ float warp_val[32];
    __shared__ u32 warp_id[32];
    __shared__ float pick_val;
    __shared__ u32 pick_id;
    const i64 b = blockIdx.x;
    const float *row = logits + b * v;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;

    // Pass 1: the max of the non-NaN logits, and whether any is NaN.
    float m = NEG_INF;
    int nan = 0;
    for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
        const float x = row[i];
        if (x != x) {
            nan = 1;
        } else {
            m = fmaxf(m, x);
        }
    }
    m = block_max_f32(m, scratch);
    nan = __syncthreads_or(nan);
    // Pass 2: Σ exp(l − max), only when max is finite (else lse is ±inf itself).
    const bool finite_max = m > NEG_INF && m < -NEG_INF;
    float s = 0.0f;
    if (finite_max) {
        for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
            const float x = row[i];
            if (x == x) s += expf(x - m);  // exp(−inf) = 0
        }
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        float r = m;
        if (nan) {
            r = __int_as_float(0x7fc00000);
        } else if (finite_max) {
            r = m + logf(s);
        }
        lse[b] = r;
    }

    // k rounds: the first element strictly after the previous pick.
    float prev_val = 0.0f;
    u32 prev_id = NO_ID;  // NO_ID: nothing picked yet, every element qualifies
    for (int r = 0; r < k; ++r) {
        float best_val = NEG_INF;
        u32 best_id = NO_ID;  // loses to every real element, −inf ones included
        for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
            const float x = nan_to_neg_inf(row[i]);
            const u32 id = (u32)i;
            const bool after = prev_id == NO_ID || ranks_before(prev_val, prev_id, x, id);
            if (after && ranks_before(x, id, best_val, best_id)) {
                best_val = x;
                best_id = id;
            }
        }
        warp_first(best_val, best_id);
        if (lane == 0) {
            warp_val[warp] = best_val;
            warp_id[warp] = best_id;
        }
        __syncthreads();
        if (warp == 0) {
            best_val = lane < nwarps ? warp_val[lane] : NEG_INF;
            best_id = lane < nwarps ? warp_id[lane] : NO_ID;
            warp_first(best_val, best_id);
            if (lane == 0) {
                values[b * k + r] = best_val;
                ids[b * k + r] = best_id;
                pick_val = best_val;
                pick_id = best_id;
            }
        }
        // Everyone reads the pick before the next round's warp_val writes, which come after
        // that round's barrier: one barrier per round is enough for pick_*, and warp 0 read
        // warp_val before this one.
        __syncthreads();
        prev_val = pick_val;
        prev_id = pick_id;
    }
}

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
