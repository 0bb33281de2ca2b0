// attention_tile.cuh — the tensor-core (mma.sync) attention loop that attention.cu and
// paged_attention.cu share: FlashAttention-2 structure over GQA-packed rows of one
// (sequence, kv head), K/V tiles double-buffered through cp.async. The two modules differ only
// in where a sequence's K and V rows live (packed [Tkv, Hkv, D] rows, or pool slots found
// through a block table) and in which sequences the kernel takes, so the loop takes those as a
// policy class `Kv`; everything else is one piece of code, inlined into each kernel. ptxas
// turns it into the very code (same SASS, same registers) each module's own copy of the loop
// compiled to.
//
// The structure, for attention_tiles<D, BN, MT, Q_IN_REGS>:
//  - A block of 4 warps owns 64·MT "rows" of one (sequence, kv head). GQA packing: a row is
//    a (query i, head-in-group g) pair, row = i·G + g with G = H / Hkv, so the G query heads
//    that read one kv head share every K/V tile the block loads (and a decode step with
//    q_len = 1 still fills G rows of the MMA tile).
//  - Each warp owns MT m-tiles of 16 rows; S = Q·Kᵀ and O += P·V use mma.sync m16n8k16 (bf16
//    in, f32 accumulate); operands come from shared memory through ldmatrix (.trans for V),
//    and each K or V fragment feeds all MT m-tiles (MT = 2 halves shared-memory traffic per
//    MMA, which is what bounds mma.sync here).
//  - K/V tiles of BN keys are double-buffered with cp.async (zero-filled past the sequence),
//    smem rows padded by 16 bytes so ldmatrix is free of bank conflicts.
//  - Online softmax in base 2 (scale·log2 e folded into the scores); the row sums stay
//    per-thread partials until the end; only tiles that cross the causal diagonal or the
//    window edge pay for masking; tiles outside the block's [window start, diagonal] are not
//    loaded, and a warp skips the math of tiles outside its own rows' range.
//  - Blocks are issued heaviest-first (the last query tiles have the most keys).
// Launch: 128 threads, grid (row tiles, Hkv, B), dynamic shared memory
// (64·MT + 4·BN)·(D + 8)·2 bytes.
#pragma once
#include "common.cuh"

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

// The loop for one block of 4 warps: blockIdx.z is the sequence b, blockIdx.y the kv head hk.
// `a` is the module's argument struct; the loop reads its q [Tq, H, D], out [Tq, H, D],
// lse [H, Tq], q_starts [B + 1], tq, heads, kv_heads, window (0: none), scale and softcap
// (0: none). `Kv` is what differs between the modules: where K and V rows live.
//  - Kv::kv_len(a, b): sequence b's number of keys (its q_len queries are the last of them);
//  - Kv::other_kernel(a, rows): true for a sequence of `rows` GQA-packed rows that another
//    kernel of the module takes (the block returns at once);
//  - Kv(a, b, hk, row_stride): the K/V rows of sequence b, kv head hk (row_stride = Hkv · D);
//  - off = offset(key, col, ok), then k_src(off, ok) and v_src(off, ok): where elements
//    col .. col + 7 of key `key` lie in K and V. When `ok` is false (a key past the sequence)
//    cp.async reads nothing and zero-fills, so any valid address will do.
// Each piece is called where the code it stands for stood in the modules' own copies of the
// loop: moving one (say, building Kv before the early returns) changes what ptxas makes of the
// kernel, registers included.
template <int D, int BN, int MT, bool Q_IN_REGS, class Kv, class Args>
__device__ __forceinline__ void attention_tiles(const Args &a) {
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
    const int kv_len = Kv::kv_len(a, b);
    const int rows = q_len * group;
    if (Kv::other_kernel(a, rows)) return;
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
    const Kv kv_rows(a, b, hk, kv_row_stride);

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
            const i64 off = kv_rows.offset(key, col, ok);
            cp_async16(smem_u32(sK + (buf * BN + r) * STRIDE + col), kv_rows.k_src(off, ok), ok);
            cp_async16(smem_u32(sV + (buf * BN + r) * STRIDE + col), kv_rows.v_src(off, ok), ok);
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
