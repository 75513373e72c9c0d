// Q8_0 weights: activation quantization, dp4a matmul (decode and token tiles, the quantization
// fused in or not), and the F16/F32 dequant-cache expansion. The F16-weight matmul is f16w.cu.
// A Q8_0 block is 34 bytes: f16 scale d, then 32 int8 values; w = d * q.
#include "common.cuh"

#define Q8_BLOCK_BYTES 34

// One Q8_0 block quantized by a warp, a value per lane: returns the lane's int8, sets the block
// scale d = amax/127; q = rint(x * (1/d)), clamped.
__device__ __forceinline__ signed char q8_quantize_lane(float v, float* d) {
    const float amax = warp_max(fabsf(v));
    const float dd = amax / 127.0f;
    const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
    float r = rintf(v * id);
    r = fminf(fmaxf(r, -128.0f), 127.0f);
    *d = dd;
    return (signed char)(int)r;
}

// x [rows, n] float -> q [rows, n] int8, d [rows, n/32]: d = amax/127, q = rint(x * (1/d)).
// grid (n/32, rows), block 32.
extern "C" __global__ void quantize_q8_0(const float* __restrict__ x, signed char* __restrict__ q,
                                         float* __restrict__ d, int n) {
    const long row = blockIdx.y, b = blockIdx.x;
    float dd;
    q[row * n + b * 32 + threadIdx.x] = q8_quantize_lane(x[row * n + b * 32 + threadIdx.x], &dd);
    if (threadIdx.x == 0) d[row * (n / 32) + b] = dd;
}

// The scale and the 8 quant words (4 int8 each, little-endian) of the Q8_0 block at blk. A block
// starts 2-byte aligned (34 bytes), so its words are taken from the 9 aligned 4-byte words that
// cover it, starting at blk or 2 bytes before: 9 loads, the same in every lane (no divergence),
// where 2-byte reads take 17. A block starting 4-byte aligned reads the 2 bytes after it (the
// next block's scale; allocations carry slack past a tensor's last block, backend.Placer).
__device__ __forceinline__ float q8_block_words(const unsigned char* blk, int* wq) {
    const bool mid = ((size_t)blk & 2) != 0;                         // starts 2 bytes into a word
    const unsigned int* w = (const unsigned int*)(blk - (mid ? 2 : 0));
    unsigned int u[9];
#pragma unroll
    for (int i = 0; i < 9; i++) u[i] = w[i];
#pragma unroll
    for (int j = 0; j < 8; j++) wq[j] = (int)(mid ? u[j + 1] : __funnelshift_r(u[j], u[j + 1], 16));
    return __half2float(__ushort_as_half((unsigned short)(mid ? u[0] >> 16 : u[0] & 0xffffu)));
}

// Injected faults (ds4bench/engine/faults.py; the NumPy twins in ops_ref.RefOps) of weight block b
// of `row`: they may change its scale dw and the activation block bx it is multiplied with.
// Every Q8_0 matmul applies them to every block it reads, so its faulted variant makes the same
// mistake as the others'.
__device__ __forceinline__ void q8_block_faults(const unsigned char* row, int b, double* dw, int* bx) {
#ifdef DS4_FAULT_Q8_SCALE_SUBSET
    if (b % 4 == 3) { int unused[8]; *dw = (double)q8_block_words(row + (b - 1) * Q8_BLOCK_BYTES, unused); }
#endif
#ifdef DS4_FAULT_Q8_SCALE_SUBSET_HEAD
    if (b % 8 == 7) { int unused[8]; *dw = (double)q8_block_words(row + (b - 1) * Q8_BLOCK_BYTES, unused); }
#endif
#ifdef DS4_FAULT_Q8_SCALE_DRIFT
    *dw = (double)((float)*dw * 1.015625f);     // exact: an f16 scale times 65/64
#endif
#ifdef DS4_FAULT_Q8_ACT_BLOCK
    if (b % 8 == 7) *bx = b - 1;
#endif
}

// A block's term d_w * dot(q_w, q_x) * d_x: the dot with __dp4a, then in double (d_w * dot is
// exact, one rounding for * d_x).
__device__ __forceinline__ double q8_term(double dw, const int* wq, const int* xv, float xs) {
    int s = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) s = __dp4a(wq[j], xv[j], s);
    return __dmul_rn(__dmul_rn(dw, (double)s), (double)xs);
}

// One Q8_0 weight row against a tile of quantized activations: lane l takes blocks l, l+32, ...;
// xq(i, b) points at token i's int8 block b, xd(i, b) is its scale. Block terms are formed and
// summed in double (see matmul_q8_0).
template <typename XQ, typename XD>
__device__ __forceinline__ void q8_row_tile(const unsigned char* __restrict__ row, int nb, int lane, int nt,
                                            XQ xq, XD xd, double* acc) {
    for (int b = lane; b < nb; b += DS4_WARP) {
        int wq[8];
        double dw = (double)q8_block_words(row + b * Q8_BLOCK_BYTES, wq);
        int bx = b;                                  // the activation block read (faults.py: q8-act-block)
        q8_block_faults(row, b, &dw, &bx);
#pragma unroll
        for (int i = 0; i < TOKEN_TILE; i++) {
            if (i < nt) acc[i] = __dadd_rn(acc[i], q8_term(dw, wq, (const int*)xq(i, bx), xd(i, bx)));
        }
    }
}

// y[t, o] = sum_b f16(d_w[o,b]) * d_x[t,b'] * dot(q_w[o,b], q_x[t,b']) with __dp4a.
// Block terms are formed and summed in double, as the NumPy reference does (d_w * dot is exact,
// one rounding for * d_x), then rounded once to float: the result matches the reference except
// when it lies within a double ulp of a float rounding boundary.
// Grouped projections: row o reads the activation slice of group o / rows_per_group, i.e. the
// K values at offset g*K inside a token's x_stride values (plain projections: one group).
// grid (ceil(O/8), ceil(T/TOKEN_TILE)), block 256: one warp per row, a tile of tokens per block.
extern "C" __global__ void matmul_q8_0(const unsigned char* __restrict__ W, const signed char* __restrict__ xq,
                                       const float* __restrict__ xd, float* __restrict__ y,
                                       int O, int K, int T, int rows_per_group, int x_stride) {
    const int warp = threadIdx.x / DS4_WARP, lane = threadIdx.x % DS4_WARP;
    const int o = blockIdx.x * 8 + warp;
    const int t0 = blockIdx.y * TOKEN_TILE;
    if (o >= O) return;
    const int nb = K / 32, g = o / rows_per_group;
    const int nt = min(TOKEN_TILE, T - t0);
    const unsigned char* row = W + (long)o * nb * Q8_BLOCK_BYTES;
    double acc[TOKEN_TILE];
#pragma unroll
    for (int i = 0; i < TOKEN_TILE; i++) acc[i] = 0.0;
    const long base = (long)g * K;
    q8_row_tile(row, nb, lane, nt,
                [&](int i, int b) { return xq + (long)(t0 + i) * x_stride + base + b * 32; },
                [&](int i, int b) { return xd[((long)(t0 + i) * x_stride + base + b * 32) / 32]; }, acc);
    store_row_tile(acc, lane, nt, y, t0, O, o);
}

// The Q8_0 -> F16 cache: each f16(d) * f16(q) product rounded to half, as ds4's cache kernel.
// One thread per element.
extern "C" __global__ void dequant_q8_0_f16(const unsigned char* __restrict__ W, __half* __restrict__ out, long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned char* blk = W + (i / 32) * Q8_BLOCK_BYTES;
    const __half d = *(const __half*)blk;
    const signed char q = (signed char)blk[2 + i % 32];
    out[i] = __hmul(d, __int2half_rn((int)q));
}

extern "C" __global__ void dequant_q8_0_f32(const unsigned char* __restrict__ W, float* __restrict__ out, long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned char* blk = W + (i / 32) * Q8_BLOCK_BYTES;
    out[i] = __half2float(*(const __half*)blk) * (float)(signed char)blk[2 + i % 32];
}

// quantize_q8_0 of nt tokens' K-slices x + i * x_stride (i < nt) into shared memory, a block per
// warp in turn: sq [nt][K] int8, sd [nt][K/32] scales. Every thread of the block must call it.
__device__ __forceinline__ void q8_quantize_slice(const float* __restrict__ x, int x_stride, int nt, int K,
                                                  signed char* sq, float* sd) {
    const int warp = threadIdx.x / DS4_WARP, lane = threadIdx.x % DS4_WARP, nw = blockDim.x / DS4_WARP;
    const int nb = K / 32;
    for (int blk = warp; blk < nt * nb; blk += nw) {
        const int i = blk / nb, b = blk % nb;
        float dd;
        sq[(long)i * K + b * 32 + lane] = q8_quantize_lane(x[(long)i * x_stride + b * 32 + lane], &dd);
        if (lane == 0) sd[i * nb + b] = dd;
    }
}

// matmul_q8_0 with the activation quantization fused in: each block first quantizes its token
// tile's activations (the K-slice of its rows' group) into shared memory with quantize_q8_0's
// arithmetic, then forms matmul_q8_0's dot products from there: one launch instead of two, the
// same bits. Needs rows_per_group % 8 == 0 (a block's 8 rows share a group) and dynamic shared
// memory of min(T, TOKEN_TILE) * (K + K / 8) bytes. grid (ceil(O/8), ceil(T/TOKEN_TILE)), block 256.
extern "C" __global__ void matmul_q8_0_fused(const unsigned char* __restrict__ W, const float* __restrict__ x,
                                             float* __restrict__ y, int O, int K, int T, int rows_per_group,
                                             int x_stride) {
    extern __shared__ int smq[];                                       // int-aligned
    const int warp = threadIdx.x / DS4_WARP, lane = threadIdx.x % DS4_WARP;
    const int t0 = blockIdx.y * TOKEN_TILE;
    const int nt = min(TOKEN_TILE, T - t0);
    const int nb = K / 32;
    const int g = (blockIdx.x * 8) / rows_per_group;
    signed char* sq = (signed char*)smq;                               // [nt][K]
    float* sd = (float*)(sq + (long)min(T, TOKEN_TILE) * K);           // [nt][nb]
    q8_quantize_slice(x + (long)t0 * x_stride + (long)g * K, x_stride, nt, K, sq, sd);
    __syncthreads();
    const int o = blockIdx.x * 8 + warp;
    if (o >= O) return;
    const unsigned char* row = W + (long)o * nb * Q8_BLOCK_BYTES;
    double acc[TOKEN_TILE];
#pragma unroll
    for (int i = 0; i < TOKEN_TILE; i++) acc[i] = 0.0;
    q8_row_tile(row, nb, lane, nt, [&](int i, int b) { return sq + (long)i * K + b * 32; },
                [&](int i, int b) { return sd[i * nb + b]; }, acc);
    store_row_tile(acc, lane, nt, y, t0, O, o);
}

// ---- the wide matvec: decode-sized token counts (T <= TOKEN_TILE), for bandwidth -------------------
// matmul_q8_0 leaves most of a small matrix's time to latency: a warp per row walks its row one
// block per lane at a time, each step waiting on its loads, a block of 8 rows per CTA (64 CTAs
// for attn_kv on 132 SMs), and it reduces all TOKEN_TILE sums whatever T is. Here S threads
// (a power of two, 1..Q8W_THREADS) share a row, each loading Q8W_BLOCKS blocks of it before
// using any; S is chosen on the host (kernels.q8_wide_split) so that a thread has at most
// Q8W_BLOCKS blocks and the grid has a CTA for every SM where the rows allow; the token count is
// a template parameter (matmul_q8_0_wide_<T>). Thread t of a row takes blocks t, t + S, ... in
// order, adds their terms in double as matmul_q8_0 does, and the row's S sums are added in double
// (shuffles within a warp, then the warps' sums in order through shared memory) and rounded once:
// the reference's result, with the double sum in another order (S = 32 is matmul_q8_0's order,
// so its bits). Blocks are read as matmul_q8_0 reads them (q8_block_words), activations 16 bytes
// at a time (xq must be 16-byte aligned; its rows are, K being a multiple of 32).
#define Q8W_BLOCKS 4
#define Q8W_THREADS 256

// A thread's blocks b0, b0 + S, ... (Q8W_BLOCKS of them, those below nb): every word loaded
// before any is used.
__device__ __forceinline__ void q8w_load(const unsigned char* row, int nb, int b0, int S, int (*wq)[8], float* dw) {
#pragma unroll
    for (int u = 0; u < Q8W_BLOCKS; u++) {
        const int b = b0 + u * S;
        if (b < nb) dw[u] = q8_block_words(row + b * Q8_BLOCK_BYTES, wq[u]);
    }
}

// The terms of the blocks q8w_load brought in, added to acc[i] for the NT tokens in block order.
template <int NT, typename XQ, typename XD>
__device__ __forceinline__ void q8w_use(const unsigned char* row, int nb, int b0, int S, int (*wq)[8],
                                        const float* dw, XQ xq, XD xd, double* acc) {
#pragma unroll
    for (int u = 0; u < Q8W_BLOCKS; u++) {
        const int b = b0 + u * S;
        if (b >= nb) continue;
        double d = (double)dw[u];
        int bx = b;
        q8_block_faults(row, b, &d, &bx);
#pragma unroll
        for (int i = 0; i < NT; i++) {
            const int4* xp = (const int4*)xq(i, bx);
            const int4 lo = xp[0], hi = xp[1];
            const int xv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
            acc[i] = __dadd_rn(acc[i], q8_term(d, wq[u], xv, xd(i, bx)));
        }
    }
}

// One CTA of the wide matvec: rows blockIdx.x * R + r, r < R = Q8W_THREADS / S, against NT
// tokens; with FUSED the activations x are quantized into shared memory first (as
// matmul_q8_0_fused does, while the first blocks' loads are in flight), else xq/xd are read.
template <int NT, bool FUSED>
__device__ __forceinline__ void q8w_rows(const unsigned char* __restrict__ W, const signed char* __restrict__ xq,
                                         const float* __restrict__ xd, const float* __restrict__ x,
                                         float* __restrict__ y, int O, int K, int rows_per_group, int x_stride,
                                         int S) {
    __shared__ double red[Q8W_THREADS / DS4_WARP][NT];
    extern __shared__ int4 q8w_smem[];                                 // FUSED: [NT][K] int8, [NT][K/32] f32
    const int R = Q8W_THREADS / S, r = threadIdx.x / S, t = threadIdx.x % S;
    const int o = blockIdx.x * R + r;
    const bool live = o < O;                                           // dead rows still reduce and sync
    const int nb = live ? K / 32 : 0;                                  // blocks read: none for a dead row
    const int g = (live ? o : 0) / rows_per_group;
    const unsigned char* row = W + (long)(live ? o : 0) * nb * Q8_BLOCK_BYTES;
    int wq[Q8W_BLOCKS][8];
    float dw[Q8W_BLOCKS];
    q8w_load(row, nb, t, S, wq, dw);
    signed char* sq = (signed char*)q8w_smem;
    float* sd = (float*)(sq + (long)NT * K);
    if (FUSED) {                                                       // rows_per_group % R == 0: one group
        q8_quantize_slice(x + (long)((blockIdx.x * R) / rows_per_group) * K, x_stride, NT, K, sq, sd);
        __syncthreads();
    }
    const long base = (long)g * K;
    auto aq = [&](int i, int b) {
        return FUSED ? sq + (long)i * K + b * 32 : xq + (long)i * x_stride + base + b * 32;
    };
    auto ad = [&](int i, int b) { return FUSED ? sd[i * (K / 32) + b] : xd[((long)i * x_stride + base + b * 32) / 32]; };
    double acc[NT];
#pragma unroll
    for (int i = 0; i < NT; i++) acc[i] = 0.0;
    for (int b0 = t;;) {
        q8w_use<NT>(row, nb, b0, S, wq, dw, aq, ad, acc);
        b0 += S * Q8W_BLOCKS;
        if (b0 >= nb) break;
        q8w_load(row, nb, b0, S, wq, dw);
    }
    const int lane = threadIdx.x % DS4_WARP, warp = threadIdx.x / DS4_WARP;
#pragma unroll
    for (int i = 0; i < NT; i++) {                                     // warp_sum_d's order when S = 32
        for (int off = min(S, DS4_WARP) / 2; off > 0; off >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
    }
    if (S > DS4_WARP) {                                                // the row's warps, in order
        if (lane == 0) {
#pragma unroll
            for (int i = 0; i < NT; i++) red[warp][i] = acc[i];
        }
        __syncthreads();
        if (t == 0) {
#pragma unroll
            for (int i = 0; i < NT; i++) {
                double v = red[warp][i];
                for (int w = 1; w < S / DS4_WARP; w++) v += red[warp + w][i];
                acc[i] = v;
            }
        }
    }
    if (t == 0 && live) {
#pragma unroll
        for (int i = 0; i < NT; i++) y[(long)i * O + o] = (float)acc[i];
    }
}

// matmul_q8_0_wide_<T>: matmul_q8_0 for T tokens, xq [T, x_stride], xd [T, x_stride / 32].
// matmul_q8_0_wide_fused_<T>: matmul_q8_0_fused for T tokens, x [T, x_stride] float; needs
// rows_per_group % (Q8W_THREADS / S) == 0 and T * (K + K / 8) bytes of dynamic shared memory
// (beside the static 8 * T * Q8W_THREADS / 32 of the reduction).
// grid ceil(O / (Q8W_THREADS / S)), block Q8W_THREADS; S a power of two, 1..Q8W_THREADS.
#define Q8W_KERNELS(T)                                                                                         \
    extern "C" __global__ void __launch_bounds__(Q8W_THREADS) matmul_q8_0_wide_##T(                          \
        const unsigned char* __restrict__ W, const signed char* __restrict__ xq, const float* __restrict__ xd, \
        float* __restrict__ y, int O, int K, int rows_per_group, int x_stride, int S) {                        \
        q8w_rows<T, false>(W, xq, xd, nullptr, y, O, K, rows_per_group, x_stride, S);                         \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(Q8W_THREADS) matmul_q8_0_wide_fused_##T(                    \
        const unsigned char* __restrict__ W, const float* __restrict__ x, float* __restrict__ y, int O, int K, \
        int rows_per_group, int x_stride, int S) {                                                             \
        q8w_rows<T, true>(W, nullptr, nullptr, x, y, O, K, rows_per_group, x_stride, S);                      \
    }

Q8W_KERNELS(1)
Q8W_KERNELS(2)
Q8W_KERNELS(3)
Q8W_KERNELS(4)
Q8W_KERNELS(5)
Q8W_KERNELS(6)
Q8W_KERNELS(7)
Q8W_KERNELS(8)
