// attention.cu — causal attention, one kernel per layer: varlen (SeqLayout), GQA, sliding
// window, logit soft-cap; writes the output and each row's natural-log logsumexp [H, Tq]
// (what the backward pass needs).
//
// attention_fwd_d{64,80,96,128,256}_m{1,2}: FlashAttention-2 structure on tensor cores, the
// loop of attention_tile.cuh (its header says how it works) over packed K/V rows [Tkv, Hkv, D].
// attention_simple: one warp per (query, head), scalar f32. Any head_dim ≤ 256; the fallback
// for head dims without a tensor-core instance, and an independent cross-check in tests.
#include "attention_tile.cuh"

// Must match `AttnArgs` in src/cuda/ops/attention.rs field for field (#[repr(C)]).
struct AttnArgs {
    const bf16 *q;         // [Tq, H, D]
    const bf16 *k;         // [Tkv, Hkv, D]
    const bf16 *v;         // [Tkv, Hkv, D]
    bf16 *out;             // [Tq, H, D]
    float *lse;            // [H, Tq]
    const int *q_starts;   // [B + 1]
    const int *kv_starts;  // [B + 1]
    int tq;
    int batch;
    int heads;
    int kv_heads;
    int head_dim;
    int window;  // 0: none
    float scale;
    float softcap;  // 0: none
};

// K/V rows packed as [Tkv, Hkv, D]: sequence b's keys are rows kv_starts[b] ..
// kv_starts[b + 1] − 1.
template <int D>
struct PackedKv {
    const AttnArgs &a;
    int k0;  // the sequence's first row
    int hk;
    i64 row_stride;  // Hkv · D

    __device__ __forceinline__ static int kv_len(const AttnArgs &a, int b) {
        const int k0 = a.kv_starts[b];
        return a.kv_starts[b + 1] - k0;
    }
    __device__ __forceinline__ static bool other_kernel(const AttnArgs &, int) { return false; }
    __device__ __forceinline__ PackedKv(const AttnArgs &a, int b, int hk, i64 row_stride)
        : a(a), k0(a.kv_starts[b]), hk(hk), row_stride(row_stride) {}

    __device__ __forceinline__ i64 offset(int key, int col, bool) const {
        return (i64)(k0 + key) * row_stride + (i64)hk * D + col;
    }
    __device__ __forceinline__ const bf16 *k_src(i64 off, bool ok) const {
        return ok ? a.k + off : a.k;
    }
    __device__ __forceinline__ const bf16 *v_src(i64 off, bool ok) const {
        return ok ? a.v + off : a.v;
    }
};

// Instances: attention_fwd_d<D>_m<MT> with BN keys per tile; Q fragments stay in registers
// where they fit beside the accumulators. ptxas reports no spills for any of these (two
// m-tiles at D = 128 spilled, and at D = 256 cannot fit, so those have one).
#define ATTENTION_INSTANCE(D, MT, BN, QREG)                                                   \
    extern "C" __global__ void __launch_bounds__(128) attention_fwd_d##D##_m##MT(AttnArgs a) { \
        attention_tiles<D, BN, MT, QREG, PackedKv<D>>(a);                                     \
    }

ATTENTION_INSTANCE(64, 1, 64, true)
ATTENTION_INSTANCE(64, 2, 64, true)
ATTENTION_INSTANCE(80, 1, 64, true)
ATTENTION_INSTANCE(80, 2, 64, false)
ATTENTION_INSTANCE(96, 1, 64, true)
ATTENTION_INSTANCE(96, 2, 32, false)
ATTENTION_INSTANCE(128, 1, 64, true)
ATTENTION_INSTANCE(256, 1, 32, false)

// One warp per (query, head); lane owns dims lane, lane + 32, … (head_dim ≤ 256). Natural-log
// online softmax in f32 with accurate expf.
extern "C" __global__ void __launch_bounds__(32) attention_simple(AttnArgs a) {
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
    const int k0 = a.kv_starts[b];
    const int kv_len = a.kv_starts[b + 1] - k0;
    const int pos = kv_len - q_len + (qi - a.q_starts[b]);
    const int hk = h / (a.heads / a.kv_heads);
    const int first = a.window > 0 ? max(0, pos - a.window + 1) : 0;

    float q[8], acc[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int d = lane + 32 * c;
        q[c] = d < D ? bf16_to_f32(a.q[((i64)qi * a.heads + h) * D + d]) : 0.0f;
        acc[c] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int key = first; key <= pos; ++key) {
        const bf16 *kr = a.k + ((i64)(k0 + key) * a.kv_heads + hk) * D;
        const bf16 *vr = a.v + ((i64)(k0 + key) * a.kv_heads + hk) * D;
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
