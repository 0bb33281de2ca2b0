// logprobs.cu — online log-softmax statistics over vocabulary chunks.
//
// The lm_head GEMM writes one chunk of f32 logits [rows, vc] at a time into a scratch buffer;
// `logprob_chunk` folds that chunk into per-token running state, so [T × V] logits never
// exist. State per token (struct of arrays, each [T]):
//   m     running max of the (capped) logits
//   s     Σ exp(l − m)
//   sl    Σ exp(l − m) · l          (entropy = log Z − sl / s)
//   suml  Σ l                       (mean logit)
//   best, arg   running argmax (ties go to the lowest id)
//   tgt   the target token's logit
// `logprob_finish` turns the state into logp, entropy, mean logit and argmax.
//
// Backward (the gradient of Σ_t g_t · log p_t): after a statistics pass with the kernels
// above, each logits chunk is recomputed and `logprob_grad_chunk` turns it into dz, the
// gradient with respect to the logits before the soft-cap, as bf16 (the GEMMs that consume it
// take bf16 operands); `logprob_cast_bf16` rounds the f32 accumulator of d_hidden at the end.
#include "common.cuh"

struct Online {
    float m, s, sl, suml, best;
    u32 arg;
};

__device__ __forceinline__ void online_push(Online &o, float l, u32 id) {
    if (l > o.m) {
        const float r = __expf(o.m - l);  // 0 when m is still −inf
        o.s = o.s * r + 1.0f;
        o.sl = o.sl * r + l;
        o.m = l;
    } else {
        const float e = __expf(l - o.m);
        o.s += e;
        o.sl += e * l;
    }
    o.suml += l;
    if (l > o.best) {  // strict: the first (lowest) id wins ties within one thread
        o.best = l;
        o.arg = id;
    }
}

__device__ __forceinline__ void online_merge(Online &a, const Online &b) {
    const float m = fmaxf(a.m, b.m);
    if (m != NEG_INF) {
        const float ra = a.m == NEG_INF ? 0.0f : __expf(a.m - m);
        const float rb = b.m == NEG_INF ? 0.0f : __expf(b.m - m);
        a.s = a.s * ra + b.s * rb;
        a.sl = a.sl * ra + b.sl * rb;
        a.m = m;
    }
    a.suml += b.suml;
    if (b.best > a.best || (b.best == a.best && b.arg < a.arg)) {
        a.best = b.best;
        a.arg = b.arg;
    }
}

__device__ __forceinline__ Online online_shfl(const Online &o, int offset) {
    Online r;
    r.m = __shfl_xor_sync(0xffffffffu, o.m, offset);
    r.s = __shfl_xor_sync(0xffffffffu, o.s, offset);
    r.sl = __shfl_xor_sync(0xffffffffu, o.sl, offset);
    r.suml = __shfl_xor_sync(0xffffffffu, o.suml, offset);
    r.best = __shfl_xor_sync(0xffffffffu, o.best, offset);
    r.arg = __shfl_xor_sync(0xffffffffu, o.arg, offset);
    return r;
}

// Resets the state of `n` tokens.
extern "C" __global__ void logprob_init(float *m, float *s, float *sl, float *suml, float *best,
                                        u32 *arg, float *tgt, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        m[i] = NEG_INF;
        s[i] = 0.0f;
        sl[i] = 0.0f;
        suml[i] = 0.0f;
        best[i] = NEG_INF;
        arg[i] = 0xffffffffu;
        tgt[i] = __int_as_float(0x7fc00000);  // NaN until the target's chunk is seen
    }
}

// One block per token row of the chunk. logits: [rows, vc] f32 (vocab ids v0 .. v0 + vc);
// state and targets point at the chunk's first token. cap <= 0 means no soft-cap.
extern "C" __global__ void logprob_chunk(const float *logits, const u32 *targets, float *m,
                                         float *s, float *sl, float *suml, float *best, u32 *arg,
                                         float *tgt, i64 vc, u32 v0, float cap) {
    __shared__ Online partial[32];
    const i64 row = blockIdx.x;
    const float *lr = logits + row * vc;
    Online o = {NEG_INF, 0.0f, 0.0f, 0.0f, NEG_INF, 0xffffffffu};
    const bool capped = cap > 0.0f;
    if (vc % 4 == 0) {
        const float4 *l4 = reinterpret_cast<const float4 *>(lr);
        for (i64 v = threadIdx.x; v < vc / 4; v += blockDim.x) {
            const float4 q = l4[v];
            float l[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float x = capped ? softcap(l[i], cap) : l[i];
                online_push(o, x, v0 + (u32)(v * 4 + i));
            }
        }
    } else {
        for (i64 v = threadIdx.x; v < vc; v += blockDim.x) {
            const float x = capped ? softcap(lr[v], cap) : lr[v];
            online_push(o, x, v0 + (u32)v);
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) online_merge(o, online_shfl(o, off));
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = o;
    __syncthreads();
    if (threadIdx.x == 0) {
        const int nwarps = (blockDim.x + 31) >> 5;
        Online acc = partial[0];
        for (int w = 1; w < nwarps; ++w) online_merge(acc, partial[w]);
        Online st = {m[row], s[row], sl[row], suml[row], best[row], arg[row]};
        online_merge(st, acc);
        m[row] = st.m;
        s[row] = st.s;
        sl[row] = st.sl;
        suml[row] = st.suml;
        best[row] = st.best;
        arg[row] = st.arg;
        const u32 t = targets[row];
        if (t >= v0 && (i64)(t - v0) < vc) {
            tgt[row] = capped ? softcap(lr[t - v0], cap) : lr[t - v0];
        }
    }
}

// logp = tgt − log Z, entropy = log Z − sl / s, mean = suml / vocab, with log Z = m + log s.
extern "C" __global__ void logprob_finish(float *logp, float *entropy, float *mean,
                                          const float *m, const float *s, const float *sl,
                                          const float *suml, const float *tgt, i64 n,
                                          float vocab) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float log_z = m[i] + logf(s[i]);
        logp[i] = tgt[i] - log_z;
        entropy[i] = log_z - sl[i] / s[i];
        mean[i] = suml[i] / vocab;
    }
}

// One block per token row of the chunk. logits: [rows, vc] f32 before the soft-cap (vocab ids
// v0 .. v0 + vc); dz: [rows, vc] bf16, written. targets, g (the upstream gradient) and the
// row's final online state m, s point at the chunk's first token. cap <= 0 means no soft-cap.
//   lse = m + log s,  l = softcap(z),  p = exp(l − lse),  dl = g · (onehot(target) − p),
//   dz = dl · (1 − (l/c)²)   (d(c·tanh(z/c))/dz = 1 − tanh²(z/c)).
// A row with g = 0 gets exact zeros, whatever its logits hold (the CPU reference skips it).
extern "C" __global__ void logprob_grad_chunk(const float *logits, bf16 *dz, const u32 *targets,
                                              const float *g, const float *m, const float *s,
                                              i64 vc, u32 v0, float cap) {
    const i64 row = blockIdx.x;
    const float *lr = logits + row * vc;
    bf16 *out = dz + row * vc;
    const float gi = g[row];
    if (gi == 0.0f) {
        for (i64 v = threadIdx.x; v < vc; v += blockDim.x) out[v] = 0;
        return;
    }
    const float lse = m[row] + logf(s[row]);
    const i64 target = (i64)targets[row] - (i64)v0;  // outside 0 .. vc: not in this chunk
    const bool capped = cap > 0.0f;
    for (i64 v = threadIdx.x; v < vc; v += blockDim.x) {
        const float l = capped ? softcap(lr[v], cap) : lr[v];
        // expf, not __expf: p is a result here, not a rescale factor.
        const float p = expf(l - lse);
        float d = gi * ((v == target ? 1.0f : 0.0f) - p);
        if (capped) {
            const float r = l / cap;
            d *= 1.0f - r * r;
        }
        out[v] = f32_to_bf16(d);
    }
}

// out[i] = bf16(in[i]) for i < n, grid-stride: the f32 d_hidden accumulator of a token chunk
// into the bf16 gradient.
extern "C" __global__ void logprob_cast_bf16(bf16 *out, const float *in, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = f32_to_bf16(in[i]);
    }
}
