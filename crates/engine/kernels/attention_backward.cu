// attention_backward.cu — the input gradients of attention.cu's forward: dq, dk, dv from q, k,
// v, the forward's out and lse, and d_out. Same layout and masks as the forward: packed varlen
// rows (SeqLayout), GQA, causal by position (a sequence's queries are the last q_len of its
// kv_len keys), sliding window (q_pos − k_pos < W), logit soft-cap.
//
// The math (per query row i of head h, visible key j; x = scale·q_i·k_j, s = c·tanh(x/c), or
// s = x without a cap):
//   P_ij = exp(s_ij − lse_i)            (recomputed, never stored)
//   Δ_i  = Σ_d dO_i·O_i                  (attn_bwd_delta, f32 [H, Tq])
//   dP_ij = dO_i·V_j,  dS_ij = P_ij·(dP_ij − Δ_i)·(1 − (s_ij/c)²)
//   dQ_i = scale·Σ_j dS_ij·K_j,  dK_j = scale·Σ_i dS_ij·Q_i,  dV_j = Σ_i P_ij·dO_i
// with the dK/dV sums also running over every query head of the kv head's group.
//
// Why two passes and no atomics: FlashAttention-2 accumulates dQ with f32 atomicAdd from the
// kv-block kernel; the order of those adds changes from run to run, and so would every
// gradient and the trained adapter. Here one kernel owns a tile of query rows and computes dQ
// (S, dP and dS·K: three products), another owns a tile of keys and computes dK and dV (S,
// dP, Pᵀ·dO and dSᵀ·Q: four). Seven products instead of five, but every output element is
// written once by one thread in a fixed order: the backward is deterministic, needs no f32
// dQ buffer and no conversion pass. GQA needs no atomics either: a kv tile's block loops over
// the GQA-packed rows (query i, head-in-group g) → row i·G + g of all G heads it serves.
//
// Kernels (launch: src/cuda/ops/attention_backward.rs):
//  - attn_bwd_delta: Δ, one warp per (token, head).
//  - attn_bwd_dq_d<D>: tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate), 4 warps ×
//    16 GQA-packed query rows; loops over K/V tiles of BN keys (double-buffered cp.async),
//    S = Q·Kᵀ and dP = dO·Vᵀ, dS elementwise, dQ += dS·K. Grid (row tiles, Hkv, B).
//  - attn_bwd_dkdv_d<D> (D ≤ 128), attn_bwd_dk_d256 and attn_bwd_dv_d256: 4 warps × 16 keys;
//    loops over tiles of BQ GQA-packed query rows (double-buffered), Sᵀ = K·Qᵀ, Pᵀ,
//    dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ, dK += dSᵀ·Q. At D = 256 the two f32 accumulators
//    [16 × 256] of a warp need 256 registers per thread, so dK and dV are separate launches
//    (each recomputes Sᵀ). Grid (key tiles, Hkv, B).
//  - attn_bwd_dq_simple, attn_bwd_dkdv_simple: one warp per (query, head) / (key, kv head),
//    scalar f32 with P and dS kept in f32; any head dim ≤ 256. The fallback for head dims
//    without a tensor-core instance, and an independent cross-check in tests.
// The tensor-core kernels use the forward's proven fragment layouts (attention_tile.cuh):
// operands through ldmatrix from smem rows padded by 16 bytes; a C fragment of n-tiles 2k,
// 2k+1 reused as the A fragment of k-step k (P, dS).
//
// Dtypes: q, k, v, out, d_out, dq, dk, dv bf16; lse and Δ f32; all math in f32.
#include "attention_tile.cuh"

// Must match `AttnBwdArgs` in src/cuda/ops/attention_backward.rs field for field.
struct AttnBwdArgs {
    const bf16 *q;         // [Tq, H, D]
    const bf16 *k;         // [Tkv, Hkv, D]
    const bf16 *v;         // [Tkv, Hkv, D]
    const bf16 *out;       // [Tq, H, D], the forward's output
    const bf16 *d_out;     // [Tq, H, D]
    const float *lse;      // [H, Tq], the forward's natural-log logsumexp
    float *delta;          // [H, Tq], written by attn_bwd_delta
    bf16 *dq;              // [Tq, H, D]
    bf16 *dk;              // [Tkv, Hkv, D]
    bf16 *dv;              // [Tkv, Hkv, D]
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

// Whether a query at position `pos` sees the key at `key`: causal, and inside the window.
// Rows past the end of a tile carry pos = −1, which sees nothing.
__device__ __forceinline__ bool visible(int key, int pos, int window) {
    return key <= pos && (window == 0 || pos - key < window);
}

// P and the cap's chain factor of one score: x = q·k (unscaled), lse2 = lse·log2 e.
// Returns P·(1 − t²) (t = tanh(scale·x / c); 1 without a cap) and sets p = P.
__device__ __forceinline__ float prob_and_capped(float x, float lse2, const AttnBwdArgs &a,
                                                 float &p) {
    float sc2, chain = 1.0f;
    if (a.softcap > 0.0f) {
        const float t = tanhf(x * a.scale / a.softcap);
        sc2 = a.softcap * t * LOG2E;
        chain = 1.0f - t * t;
    } else {
        sc2 = x * (a.scale * LOG2E);
    }
    p = fast_exp2(sc2 - lse2);
    return p * chain;
}

// ---------------------------------------------------------------------------------------------
// Δ = rowsum(dO ∘ O): one warp per (token, head), 4 per block, grid-stride over rows.

extern "C" __global__ void __launch_bounds__(128) attn_bwd_delta(AttnBwdArgs a) {
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const i64 rows = (i64)a.tq * a.heads;
    // `row` depends only on the warp: the whole warp stays in the loop together.
    for (i64 row = (i64)blockIdx.x * 4 + warp; row < rows; row += (i64)gridDim.x * 4) {
        // row = t·H + h, the memory order of out and d_out.
        const bf16 *o = a.out + row * a.head_dim;
        const bf16 *g = a.d_out + row * a.head_dim;
        float part = 0.0f;
        for (int c = lane; c < a.head_dim; c += 32) part += bf16_to_f32(o[c]) * bf16_to_f32(g[c]);
        part = warp_sum(part);
        if (lane == 0) {
            const i64 t = row / a.heads;
            const int h = (int)(row % a.heads);
            a.delta[(i64)h * a.tq + t] = part;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar kernels: one warp per row, lane owns dims lane, lane + 32, … (head_dim ≤ 256).

// The last b in [0, batch) with starts[b] ≤ x: the sequence whose packed range holds row x
// (empty sequences before it share its start and are skipped).
__device__ __forceinline__ int seq_of(const int *starts, int batch, int x) {
    int lo = 0, hi = batch - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (starts[mid] <= x) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// dQ of one (query, head): grid (Tq, H), 32 threads.
extern "C" __global__ void __launch_bounds__(32) attn_bwd_dq_simple(AttnBwdArgs a) {
    const int qi = blockIdx.x;
    const int h = blockIdx.y;
    const int lane = threadIdx.x;
    const int D = a.head_dim;
    const int b = seq_of(a.q_starts, a.batch, qi);
    const int q_len = a.q_starts[b + 1] - a.q_starts[b];
    const int k0 = a.kv_starts[b];
    const int kv_len = a.kv_starts[b + 1] - k0;
    const int pos = kv_len - q_len + (qi - a.q_starts[b]);
    const int hk = h / (a.heads / a.kv_heads);
    const int first = a.window > 0 ? max(0, pos - a.window + 1) : 0;
    const float lse = a.lse[(i64)h * a.tq + qi];
    const float delta = a.delta[(i64)h * a.tq + qi];
    const i64 row = ((i64)qi * a.heads + h) * D;

    float q[8], g[8], acc[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int d = lane + 32 * c;
        q[c] = d < D ? bf16_to_f32(a.q[row + d]) : 0.0f;
        g[c] = d < D ? bf16_to_f32(a.d_out[row + d]) : 0.0f;
        acc[c] = 0.0f;
    }
    for (int key = first; key <= pos; ++key) {
        const bf16 *kr = a.k + ((i64)(k0 + key) * a.kv_heads + hk) * D;
        const bf16 *vr = a.v + ((i64)(k0 + key) * a.kv_heads + hk) * D;
        float qk = 0.0f, gv = 0.0f;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const int d = lane + 32 * c;
            if (d < D) {
                qk += q[c] * bf16_to_f32(kr[d]);
                gv += g[c] * bf16_to_f32(vr[d]);
            }
        }
        float x = warp_sum(qk) * a.scale;
        const float dp = warp_sum(gv);
        float chain = 1.0f;
        if (a.softcap > 0.0f) {
            const float t = tanhf(x / a.softcap);
            x = a.softcap * t;
            chain = 1.0f - t * t;
        }
        const float ds = expf(x - lse) * (dp - delta) * chain;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const int d = lane + 32 * c;
            if (d < D) acc[c] += ds * bf16_to_f32(kr[d]);
        }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int d = lane + 32 * c;
        if (d < D) a.dq[row + d] = f32_to_bf16(acc[c] * a.scale);
    }
}

// dK and dV of one (key, kv head), summed over the heads of its group: grid (Tkv, Hkv),
// 32 threads.
extern "C" __global__ void __launch_bounds__(32) attn_bwd_dkdv_simple(AttnBwdArgs a) {
    const int kr = blockIdx.x;
    const int hk = blockIdx.y;
    const int lane = threadIdx.x;
    const int D = a.head_dim;
    const int b = seq_of(a.kv_starts, a.batch, kr);
    const int k0 = a.kv_starts[b];
    const int kv_len = a.kv_starts[b + 1] - k0;
    const int q0 = a.q_starts[b];
    const int q_len = a.q_starts[b + 1] - q0;
    const int past = kv_len - q_len;  // query i sits at position past + i
    const int j = kr - k0;            // this key's position
    const int group = a.heads / a.kv_heads;
    // Queries that see key j: position ≥ j and, with a window, < j + W.
    const int i_lo = max(0, j - past);
    int i_hi = q_len - 1;
    if (a.window > 0) i_hi = (int)min((i64)i_hi, (i64)j + a.window - 1 - past);
    const i64 krow = ((i64)kr * a.kv_heads + hk) * D;

    float kk[8], vv[8], dk[8], dv[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int d = lane + 32 * c;
        kk[c] = d < D ? bf16_to_f32(a.k[krow + d]) : 0.0f;
        vv[c] = d < D ? bf16_to_f32(a.v[krow + d]) : 0.0f;
        dk[c] = dv[c] = 0.0f;
    }
    for (int gh = 0; gh < group; ++gh) {
        const int h = hk * group + gh;
        for (int i = i_lo; i <= i_hi; ++i) {
            const int qi = q0 + i;
            const i64 row = ((i64)qi * a.heads + h) * D;
            float qk = 0.0f, gv = 0.0f;
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                const int d = lane + 32 * c;
                if (d < D) {
                    qk += bf16_to_f32(a.q[row + d]) * kk[c];
                    gv += bf16_to_f32(a.d_out[row + d]) * vv[c];
                }
            }
            float x = warp_sum(qk) * a.scale;
            const float dp = warp_sum(gv);
            float chain = 1.0f;
            if (a.softcap > 0.0f) {
                const float t = tanhf(x / a.softcap);
                x = a.softcap * t;
                chain = 1.0f - t * t;
            }
            const i64 stat = (i64)h * a.tq + qi;
            const float p = expf(x - a.lse[stat]);
            const float ds = p * (dp - a.delta[stat]) * chain;
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                const int d = lane + 32 * c;
                if (d < D) {
                    dv[c] += p * bf16_to_f32(a.d_out[row + d]);
                    dk[c] += ds * bf16_to_f32(a.q[row + d]);
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int d = lane + 32 * c;
        if (d < D) {
            a.dk[krow + d] = f32_to_bf16(dk[c] * a.scale);
            a.dv[krow + d] = f32_to_bf16(dv[c]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernels. Fragment conventions (mma.sync m16n8k16; g = lane / 4, t4 = lane % 4):
// A (16×16, row) a[0..3] = (row g, cols 2t4..+1), (g + 8, 2t4), (g, 8 + 2t4), (g + 8, 8 + 2t4);
// B (16×8) b0 = (k 2t4..+1, col g), b1 = (k 8 + 2t4..+1, col g); C (16×8) c[0..1] = (row g,
// cols 2t4..+1), c[2..3] = (row g + 8, same cols). ldmatrix lane offsets inside a 16×16 tile
// of a row-major smem matrix M (rows × STRIDE), each as in attention_tile.cuh:
//  - A_OFF: A = M (rows are the m dim).
//  - BN_OFF: B with B[k][n] = M[n][k] (rows are the n dim), no .trans; registers 0, 1 are
//    n-tile rows 0–7, registers 2, 3 rows 8–15.
//  - BK_OFF with .trans: B with B[k][n] = M[k][n] (rows are the k dim); registers 0, 1 are
//    n-tile cols 0–7, registers 2, 3 cols 8–15.

template <int STRIDE>
struct Offsets {
    int a, bn, bk;
    __device__ __forceinline__ Offsets(int lane) {
        const int mat = lane >> 3;
        a = ((lane & 7) + (mat & 1) * 8) * STRIDE + (mat >> 1) * 8;
        bn = ((lane & 7) + (mat >> 1) * 8) * STRIDE + (mat & 1) * 8;
        bk = ((lane & 7) + (mat & 1) * 8) * STRIDE + (mat >> 1) * 8;
    }
};

// Copies a GQA-packed tile of query rows (q or d_out) into smem: tile row r is packed row
// R = r0 + r (query R / G, head hk·G + R % G of sequence b), zero-filled where R ≥ r_end.
template <int D, int ROWS, int NT>
__device__ __forceinline__ void load_rows(bf16 *dst, const bf16 *src, int r0, int r_end,
                                          int q0, int group, int hk, i64 row_stride) {
    constexpr int STRIDE = D + 8;
    constexpr int CHUNKS = D / 8;
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NT) {
        const int r = c / CHUNKS;
        const int col = (c % CHUNKS) * 8;
        const int R = r0 + r;
        const bool ok = R < r_end;
        const bf16 *from =
            ok ? src + (i64)(q0 + R / group) * row_stride + (i64)(hk * group + R % group) * D + col
               : src;
        cp_async16(smem_u32(dst + r * STRIDE + col), from, ok);
    }
}

// Copies key rows key0 .. key0 + ROWS − 1 of kv head hk (sequence rows from k0) into smem,
// zero-filled at and past kv_len.
template <int D, int ROWS, int NT>
__device__ __forceinline__ void load_keys(bf16 *dst, const bf16 *src, int key0, int kv_len,
                                          int k0, int hk, i64 row_stride) {
    constexpr int STRIDE = D + 8;
    constexpr int CHUNKS = D / 8;
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NT) {
        const int r = c / CHUNKS;
        const int col = (c % CHUNKS) * 8;
        const int key = key0 + r;
        const bool ok = key < kv_len;
        const bf16 *from = ok ? src + (i64)(k0 + key) * row_stride + (i64)hk * D + col : src;
        cp_async16(smem_u32(dst + r * STRIDE + col), from, ok);
    }
}

// Stores 16 rows of f32 C fragments acc[D/8][4] (rows g, g + 8 of n-tile dt: cols dt·8 + 2t4)
// times `mul` as bf16, through `stage` (the warp's own 16 smem rows, which no other warp
// reads): rows whose `dst_row(r)` is negative are skipped.
template <int D, class DstRow>
__device__ __forceinline__ void store_rows(bf16 *stage, const float (&acc)[D / 8][4], float mul,
                                           bf16 *out, DstRow dst_row) {
    constexpr int STRIDE = D + 8;
    constexpr int CHUNKS = D / 8;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int t4 = lane & 3;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<u32 *>(stage + g * STRIDE + dt * 8 + 2 * t4) =
            cvt_bf16x2(acc[dt][0] * mul, acc[dt][1] * mul);
        *reinterpret_cast<u32 *>(stage + (g + 8) * STRIDE + dt * 8 + 2 * t4) =
            cvt_bf16x2(acc[dt][2] * mul, acc[dt][3] * mul);
    }
    __syncwarp();
    for (int c = lane; c < 16 * CHUNKS; c += 32) {
        const int r = c / CHUNKS;
        const int col = (c % CHUNKS) * 8;
        const i64 at = dst_row(r);
        if (at >= 0) {
            *reinterpret_cast<bf16x8 *>(out + at + col) =
                *reinterpret_cast<const bf16x8 *>(stage + r * STRIDE + col);
        }
    }
}

// dQ for one block of 4 warps: BM = 64 GQA-packed query rows of (sequence blockIdx.z, kv head
// blockIdx.y), keys in tiles of BN. Dynamic smem: (2·64 + 4·BN)·(D + 8)·2 bytes.
template <int D, int BN>
__device__ __forceinline__ void dq_tiles(const AttnBwdArgs &a) {
    constexpr int BM = 64;
    constexpr int NT = 128;
    constexpr int STRIDE = D + 8;
    extern __shared__ __align__(16) u8 smem[];
    bf16 *sQ = reinterpret_cast<bf16 *>(smem);  // [BM][STRIDE]
    bf16 *sG = sQ + BM * STRIDE;                // [BM][STRIDE], d_out
    bf16 *sK = sG + BM * STRIDE;                // [2][BN][STRIDE]
    bf16 *sV = sK + 2 * BN * STRIDE;            // [2][BN][STRIDE]

    const int b = blockIdx.z;
    const int hk = blockIdx.y;
    const int group = a.heads / a.kv_heads;
    const int q0 = a.q_starts[b];
    const int q_len = a.q_starts[b + 1] - q0;
    const int k0 = a.kv_starts[b];
    const int kv_len = a.kv_starts[b + 1] - k0;
    const int rows = q_len * group;
    const int r0 = (gridDim.x - 1 - blockIdx.x) * BM;  // heaviest tiles first
    if (r0 >= rows) return;
    const int past = kv_len - q_len;
    const int i_first = r0 / group;
    const int i_last = (min(r0 + BM, rows) - 1) / group;
    const int key_hi = past + i_last;  // inclusive
    const int key_lo = a.window > 0 ? max(0, past + i_first - a.window + 1) : 0;
    const int tile_lo = key_lo / BN;
    const int tile_hi = key_hi / BN;

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const i64 q_row_stride = (i64)a.heads * D;
    const i64 kv_row_stride = (i64)a.kv_heads * D;

    load_rows<D, BM, NT>(sQ, a.q, r0, rows, q0, group, hk, q_row_stride);
    load_rows<D, BM, NT>(sG, a.d_out, r0, rows, q0, group, hk, q_row_stride);
    load_keys<D, BN, NT>(sK, a.k, tile_lo * BN, kv_len, k0, hk, kv_row_stride);
    load_keys<D, BN, NT>(sV, a.v, tile_lo * BN, kv_len, k0, hk, kv_row_stride);
    cp_async_commit();

    const Offsets<STRIDE> off(lane);
    const u32 sQ_a = smem_u32(sQ + warp * 16 * STRIDE + off.a);
    const u32 sG_a = smem_u32(sG + warp * 16 * STRIDE + off.a);
    const u32 sK_bn = smem_u32(sK + off.bn);  // K as B of S = Q·Kᵀ
    const u32 sV_bn = smem_u32(sV + off.bn);  // V as B of dP = dO·Vᵀ
    const u32 sK_bk = smem_u32(sK + off.bk);  // K as B of dQ = dS·K (.trans)

    // My rows g and g + 8 of the warp's 16: position (−1 past the end), lse·log2 e, Δ.
    int pos[2];
    float lse2[2], delta[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int R = r0 + warp * 16 + g + 8 * half;
        if (R < rows) {
            const int qi = q0 + R / group;
            const i64 stat = (i64)(hk * group + R % group) * a.tq + qi;
            pos[half] = past + R / group;
            lse2[half] = a.lse[stat] * LOG2E;
            delta[half] = a.delta[stat];
        } else {
            pos[half] = -1;
            lse2[half] = 0.0f;
            delta[half] = 0.0f;
        }
    }
    // The warp's own key range: tiles wholly outside it contribute nothing to its rows.
    const int w_first = r0 + warp * 16;
    const bool w_valid = w_first < rows;
    const int w_key_hi = past + (min(w_first + 16, rows) - 1) / group;
    const int w_key_lo = a.window > 0 ? past + w_first / group - a.window + 1 : 0;

    float dq[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.0f;

    for (int tile = tile_lo; tile <= tile_hi; ++tile) {
        const int buf = (tile - tile_lo) & 1;
        if (tile < tile_hi) {
            load_keys<D, BN, NT>(sK + (buf ^ 1) * BN * STRIDE, a.k, (tile + 1) * BN, kv_len, k0,
                                 hk, kv_row_stride);
            load_keys<D, BN, NT>(sV + (buf ^ 1) * BN * STRIDE, a.v, (tile + 1) * BN, kv_len, k0,
                                 hk, kv_row_stride);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const int kb = tile * BN;
        if (w_valid && kb <= w_key_hi && kb + BN - 1 >= w_key_lo) {
            // S = Q·Kᵀ and dP = dO·Vᵀ for the warp's 16 rows × BN keys.
            float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) {
                s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
                dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.0f;
            }
            const u32 kbuf = sK_bn + buf * BN * STRIDE * 2;
            const u32 vbuf = sV_bn + buf * BN * STRIDE * 2;
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                u32 qa[4], ga[4];
                ldsm_x4(qa, sQ_a + ks * 16 * 2);
                ldsm_x4(ga, sG_a + ks * 16 * 2);
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    u32 kf[4], vf[4];
                    ldsm_x4(kf, kbuf + (np * 16 * STRIDE + ks * 16) * 2);
                    mma_bf16(s[2 * np], qa, kf[0], kf[1]);
                    mma_bf16(s[2 * np + 1], qa, kf[2], kf[3]);
                    ldsm_x4(vf, vbuf + (np * 16 * STRIDE + ks * 16) * 2);
                    mma_bf16(dp[2 * np], ga, vf[0], vf[1]);
                    mma_bf16(dp[2 * np + 1], ga, vf[2], vf[3]);
                }
            }
            // dS = P·(dP − Δ)·chain, masked, packed as the A fragments of dS·K.
            u32 dsf[BN / 16][4];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    float ds[2];
#pragma unroll
                    for (int e2 = 0; e2 < 2; ++e2) {
                        const int e = 2 * half + e2;
                        const int key = kb + nt * 8 + 2 * t4 + e2;
                        float p;
                        const float pc = prob_and_capped(s[nt][e], lse2[half], a, p);
                        ds[e2] = visible(key, pos[half], a.window) ? pc * (dp[nt][e] - delta[half])
                                                                   : 0.0f;
                    }
                    dsf[nt / 2][(nt & 1) * 2 + half] = cvt_bf16x2(ds[0], ds[1]);
                }
            }
            // dQ += dS·K.
            const u32 ktbuf = sK_bk + buf * BN * STRIDE * 2;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
                for (int dn = 0; dn < D / 16; ++dn) {
                    u32 kf[4];
                    ldsm_x4_trans(kf, ktbuf + (kk * 16 * STRIDE + dn * 16) * 2);
                    mma_bf16(dq[2 * dn], dsf[kk], kf[0], kf[1]);
                    mma_bf16(dq[2 * dn + 1], dsf[kk], kf[2], kf[3]);
                }
            }
        }
        __syncthreads();  // everyone is done with `buf` before the next prefetch overwrites it
    }

    // The warp's own sQ rows are free now (only it read them): stage dQ there.
    store_rows<D>(sQ + warp * 16 * STRIDE, dq, a.scale, a.dq, [&](int r) -> i64 {
        const int R = w_first + r;
        if (R >= rows) return -1;
        return (i64)(q0 + R / group) * q_row_stride + (i64)(hk * group + R % group) * D;
    });
}

// dK and/or dV for one block of 4 warps: 64 keys of (sequence blockIdx.z, kv head blockIdx.y),
// 16 per warp; GQA-packed query rows in tiles of BQ. Dynamic smem:
// (2·64 + 4·BQ)·(D + 8)·2 + 2·BQ·12 bytes.
template <int D, int BQ, bool DO_DK, bool DO_DV>
__device__ __forceinline__ void dkdv_tiles(const AttnBwdArgs &a) {
    constexpr int BN = 64;
    constexpr int NT = 128;
    constexpr int STRIDE = D + 8;
    constexpr int CHUNKS = D / 8;
    static_assert(BQ <= NT, "one thread per tile row loads the row statistics");
    extern __shared__ __align__(16) u8 smem[];
    bf16 *sK = reinterpret_cast<bf16 *>(smem);  // [BN][STRIDE]
    bf16 *sV = sK + BN * STRIDE;                // [BN][STRIDE]
    bf16 *sQ = sV + BN * STRIDE;                // [2][BQ][STRIDE]
    bf16 *sG = sQ + 2 * BQ * STRIDE;            // [2][BQ][STRIDE], d_out
    float *sL = reinterpret_cast<float *>(sG + 2 * BQ * STRIDE);  // [2][BQ] lse·log2 e
    float *sD = sL + 2 * BQ;                                      // [2][BQ] Δ
    int *sP = reinterpret_cast<int *>(sD + 2 * BQ);               // [2][BQ] position, −1: none

    const int b = blockIdx.z;
    const int hk = blockIdx.y;
    const int group = a.heads / a.kv_heads;
    const int q0 = a.q_starts[b];
    const int q_len = a.q_starts[b + 1] - q0;
    const int k0 = a.kv_starts[b];
    const int kv_len = a.kv_starts[b + 1] - k0;
    const int kb = blockIdx.x * BN;
    if (kb >= kv_len) return;
    const int past = kv_len - q_len;
    const int key_last = min(kb + BN, kv_len) - 1;
    // Queries that see some key of the block: position ≥ kb and, with a window, at most
    // key_last + W − 1. As GQA-packed rows: r_lo .. r_end − 1.
    const int i_lo = max(0, kb - past);
    int i_hi = q_len - 1;
    if (a.window > 0) i_hi = (int)min((i64)i_hi, (i64)key_last + a.window - 1 - past);
    const int r_lo = i_lo * group;
    const int r_end = i_hi >= i_lo ? (i_hi + 1) * group : r_lo;
    const int n_tiles = (r_end - r_lo + BQ - 1) / BQ;

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const i64 q_row_stride = (i64)a.heads * D;
    const i64 kv_row_stride = (i64)a.kv_heads * D;
    const int wk_first = kb + warp * 16;  // the warp's first key

    // The packed output row of the warp's key r (−1 past the sequence).
    auto key_row = [&](int r) -> i64 {
        const int key = wk_first + r;
        if (key >= kv_len) return -1;
        return (i64)(k0 + key) * kv_row_stride + (i64)hk * D;
    };

    if (n_tiles == 0) {
        // No query sees these keys: their gradients are zero.
        for (int c = tid; c < BN * CHUNKS; c += NT) {
            const int key = kb + c / CHUNKS;
            if (key < kv_len) {
                const i64 at = (i64)(k0 + key) * kv_row_stride + (i64)hk * D + (c % CHUNKS) * 8;
                bf16x8 zero;
                zero.w[0] = zero.w[1] = zero.w[2] = zero.w[3] = 0u;
                if (DO_DK) *reinterpret_cast<bf16x8 *>(a.dk + at) = zero;
                if (DO_DV) *reinterpret_cast<bf16x8 *>(a.dv + at) = zero;
            }
        }
        return;
    }

    auto load_queries = [&](int tile, int buf) {
        const int r0 = r_lo + tile * BQ;
        load_rows<D, BQ, NT>(sQ + buf * BQ * STRIDE, a.q, r0, r_end, q0, group, hk, q_row_stride);
        load_rows<D, BQ, NT>(sG + buf * BQ * STRIDE, a.d_out, r0, r_end, q0, group, hk,
                             q_row_stride);
        if (tid < BQ) {
            const int R = r0 + tid;
            if (R < r_end) {
                const i64 stat = (i64)(hk * group + R % group) * a.tq + q0 + R / group;
                sP[buf * BQ + tid] = past + R / group;
                sL[buf * BQ + tid] = a.lse[stat] * LOG2E;
                sD[buf * BQ + tid] = a.delta[stat];
            } else {
                sP[buf * BQ + tid] = -1;
                sL[buf * BQ + tid] = 0.0f;
                sD[buf * BQ + tid] = 0.0f;
            }
        }
    };
    load_keys<D, BN, NT>(sK, a.k, kb, kv_len, k0, hk, kv_row_stride);
    if (DO_DK) load_keys<D, BN, NT>(sV, a.v, kb, kv_len, k0, hk, kv_row_stride);
    load_queries(0, 0);
    cp_async_commit();

    const Offsets<STRIDE> off(lane);
    const u32 sK_a = smem_u32(sK + warp * 16 * STRIDE + off.a);  // K rows as A of Sᵀ = K·Qᵀ
    const u32 sV_a = smem_u32(sV + warp * 16 * STRIDE + off.a);  // V rows as A of dPᵀ = V·dOᵀ
    const u32 sQ_bn = smem_u32(sQ + off.bn);  // Q as B of Sᵀ
    const u32 sG_bn = smem_u32(sG + off.bn);  // dO as B of dPᵀ
    const u32 sQ_bk = smem_u32(sQ + off.bk);  // Q as B of dK = dSᵀ·Q (.trans)
    const u32 sG_bk = smem_u32(sG + off.bk);  // dO as B of dV = Pᵀ·dO (.trans)

    const int my_key[2] = {wk_first + g, wk_first + g + 8};
    const bool w_valid = wk_first < kv_len;
    const int wk_last = min(wk_first + 15, key_last);

    float dk[DO_DK ? D / 8 : 1][4], dv[DO_DV ? D / 8 : 1][4];
#pragma unroll
    for (int i = 0; i < (DO_DK ? D / 8 : 1); ++i) dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.0f;
#pragma unroll
    for (int i = 0; i < (DO_DV ? D / 8 : 1); ++i) dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.0f;

    for (int tile = 0; tile < n_tiles; ++tile) {
        const int buf = tile & 1;
        if (tile + 1 < n_tiles) {
            load_queries(tile + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        // Positions of the tile's rows: skip the math when none sees the warp's keys.
        const int r0 = r_lo + tile * BQ;
        const int p_first = past + r0 / group;
        const int p_last = past + (min(r0 + BQ, r_end) - 1) / group;
        if (w_valid && p_last >= wk_first && (a.window == 0 || p_first - wk_last < a.window)) {
            const int *pos = sP + buf * BQ;
            const float *lse2 = sL + buf * BQ;
            const float *delta = sD + buf * BQ;
            // Sᵀ = K·Qᵀ: the warp's 16 keys × BQ rows.
            float st[BQ / 8][4];
#pragma unroll
            for (int i = 0; i < BQ / 8; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.0f;
            const u32 qbuf = sQ_bn + buf * BQ * STRIDE * 2;
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                u32 ka[4];
                ldsm_x4(ka, sK_a + ks * 16 * 2);
#pragma unroll
                for (int np = 0; np < BQ / 16; ++np) {
                    u32 qf[4];
                    ldsm_x4(qf, qbuf + (np * 16 * STRIDE + ks * 16) * 2);
                    mma_bf16(st[2 * np], ka, qf[0], qf[1]);
                    mma_bf16(st[2 * np + 1], ka, qf[2], qf[3]);
                }
            }
            // Pᵀ (masked) as A fragments for dV; st keeps P·chain in f32 for dSᵀ.
            u32 pf[DO_DV ? BQ / 16 : 1][4];
#pragma unroll
            for (int nt = 0; nt < BQ / 8; ++nt) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    float pv[2];
#pragma unroll
                    for (int e2 = 0; e2 < 2; ++e2) {
                        const int e = 2 * half + e2;
                        const int col = nt * 8 + 2 * t4 + e2;
                        float p;
                        const float pc = prob_and_capped(st[nt][e], lse2[col], a, p);
                        const bool vis = visible(my_key[half], pos[col], a.window);
                        pv[e2] = vis ? p : 0.0f;
                        st[nt][e] = vis ? pc : 0.0f;
                    }
                    if constexpr (DO_DV) pf[nt / 2][(nt & 1) * 2 + half] = cvt_bf16x2(pv[0], pv[1]);
                }
            }
            if constexpr (DO_DV) {
                // dV += Pᵀ·dO.
                const u32 gbuf = sG_bk + buf * BQ * STRIDE * 2;
#pragma unroll
                for (int kk = 0; kk < BQ / 16; ++kk) {
#pragma unroll
                    for (int dn = 0; dn < D / 16; ++dn) {
                        u32 gf[4];
                        ldsm_x4_trans(gf, gbuf + (kk * 16 * STRIDE + dn * 16) * 2);
                        mma_bf16(dv[2 * dn], pf[kk], gf[0], gf[1]);
                        mma_bf16(dv[2 * dn + 1], pf[kk], gf[2], gf[3]);
                    }
                }
            }
            if constexpr (DO_DK) {
                // dPᵀ = V·dOᵀ, then dSᵀ = P·chain·(dP − Δ) and dK += dSᵀ·Q.
                float dpt[BQ / 8][4];
#pragma unroll
                for (int i = 0; i < BQ / 8; ++i)
                    dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.0f;
                const u32 gbuf = sG_bn + buf * BQ * STRIDE * 2;
#pragma unroll
                for (int ks = 0; ks < D / 16; ++ks) {
                    u32 va[4];
                    ldsm_x4(va, sV_a + ks * 16 * 2);
#pragma unroll
                    for (int np = 0; np < BQ / 16; ++np) {
                        u32 gf[4];
                        ldsm_x4(gf, gbuf + (np * 16 * STRIDE + ks * 16) * 2);
                        mma_bf16(dpt[2 * np], va, gf[0], gf[1]);
                        mma_bf16(dpt[2 * np + 1], va, gf[2], gf[3]);
                    }
                }
                u32 dsf[BQ / 16][4];
#pragma unroll
                for (int nt = 0; nt < BQ / 8; ++nt) {
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int col = nt * 8 + 2 * t4;
                        const float ds0 = st[nt][2 * half] * (dpt[nt][2 * half] - delta[col]);
                        const float ds1 =
                            st[nt][2 * half + 1] * (dpt[nt][2 * half + 1] - delta[col + 1]);
                        dsf[nt / 2][(nt & 1) * 2 + half] = cvt_bf16x2(ds0, ds1);
                    }
                }
                const u32 qtbuf = sQ_bk + buf * BQ * STRIDE * 2;
#pragma unroll
                for (int kk = 0; kk < BQ / 16; ++kk) {
#pragma unroll
                    for (int dn = 0; dn < D / 16; ++dn) {
                        u32 qf[4];
                        ldsm_x4_trans(qf, qtbuf + (kk * 16 * STRIDE + dn * 16) * 2);
                        mma_bf16(dk[2 * dn], dsf[kk], qf[0], qf[1]);
                        mma_bf16(dk[2 * dn + 1], dsf[kk], qf[2], qf[3]);
                    }
                }
            }
        }
        __syncthreads();  // everyone is done with `buf` before the next prefetch overwrites it
    }

    // The warp's own sK / sV rows are free now (only it read them): stage the results there.
    if constexpr (DO_DK) store_rows<D>(sK + warp * 16 * STRIDE, dk, a.scale, a.dk, key_row);
    if constexpr (DO_DV) store_rows<D>(sV + warp * 16 * STRIDE, dv, 1.0f, a.dv, key_row);
}

// Instances: keys per dQ tile (BN), query rows per dK/dV tile (BQ). Not tuned on hardware yet:
// each is a size ptxas fits in registers without spills (≤ 245 registers at 128 threads;
// src/cuda/ops/attention_backward.rs's kernels_compile_without_spills checks).
#define ATTN_BWD_DQ(D, BN)                                                                  \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq_d##D(AttnBwdArgs a) {     \
        dq_tiles<D, BN>(a);                                                                 \
    }
#define ATTN_BWD_DKDV(NAME, D, BQ, DK, DV)                                                  \
    extern "C" __global__ void __launch_bounds__(128) NAME(AttnBwdArgs a) {                 \
        dkdv_tiles<D, BQ, DK, DV>(a);                                                       \
    }

ATTN_BWD_DQ(64, 64)
ATTN_BWD_DQ(80, 64)
ATTN_BWD_DQ(96, 64)
ATTN_BWD_DQ(128, 64)
ATTN_BWD_DQ(256, 32)
ATTN_BWD_DKDV(attn_bwd_dkdv_d64, 64, 64, true, true)
ATTN_BWD_DKDV(attn_bwd_dkdv_d80, 80, 64, true, true)
ATTN_BWD_DKDV(attn_bwd_dkdv_d96, 96, 32, true, true)
ATTN_BWD_DKDV(attn_bwd_dkdv_d128, 128, 32, true, true)
ATTN_BWD_DKDV(attn_bwd_dk_d256, 256, 32, true, false)
ATTN_BWD_DKDV(attn_bwd_dv_d256, 256, 32, false, true)
