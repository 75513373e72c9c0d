// Routed experts (ds4-spec 3.3 step 15): Q8_K activation quantizer, gate/up + clamped SwiGLU,
// down projection summed over the A selected experts. The NumPy reference is
// ds4bench/engine/ops_ref.py `RefOps.experts` with formats.quantize_act_q8_k and formats.int_matmul.
//
// Integer-dot semantics (formats.int_matmul), per 256-element block b of a weight row:
//   S = Σ_sub sc·Σ q_w·q_x,  M = Σ_sub m·bsum_sub   (exact int32)
//   term_b = d_x·(d_w·S − dmin_w·M)                   (float64, as the reference)
//   y = f32(((term_0 + term_1) + term_2) + …)         (blocks in order, float64)
// Every product d_w·S and dmin_w·M is exact in float64, so the only roundings are the
// subtraction, ·d_x and the additions, in the reference's order: g and u come out bit for bit.
// The _rn intrinsics keep the compiler from contracting those steps into FMAs.
//
// Geometry: one warp per output row; each lane owns 8 consecutive elements of every 256-block
// (lane l: elements 8l..8l+7, which always lie inside one sub-block of 16 or 32). The kernels
// take 8 blocks at a time: every lane forms its integer parts of all 8 (independent
// loads, 8-byte vector reads of x and of the IQ2 grid), one transposing warp reduction leaves
// block k's S and M with lanes 4k..4k+3, lane 4k forms block k's term, and the terms are added
// in block order from there.
// Legend: N tokens, A selected experts per token, P = N·A (token, slot) pairs, E experts,
// F expert hidden size, D model dim.
#include <cuda_fp16.h>

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned int u32;
typedef long long i64;

#define QK_K 256
#define IQ2_GRID_BYTES 2048                       // 256 grid entries × 8 magnitudes {8, 25, 43}
#define IQ2_TABLE_BYTES (IQ2_GRID_BYTES + 128)    // grid, then ksigns[128]

// ---------------------------------------------------------------------------------- helpers

__device__ __forceinline__ float f16_at(const u8* p) {     // little-endian f16, any alignment
    return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}

__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

// d_x·(d_w·S − dmin_w·M) with the reference's roundings (see the header).
__device__ __forceinline__ double block_term(int S, int M, float dw, float dmin, float dx) {
    const double t = __dadd_rn(__dmul_rn((double)dw, (double)S), -__dmul_rn((double)dmin, (double)M));
    return __dmul_rn(t, (double)dx);
}

// ---------------------------------------------------------------------------------- formats

// Each format gives sm, one lane's share of one 256-block (S over its 8 elements, read as vectors
// from x8, the lane's 8 activations; M over the sub-blocks it owns the min of), and scales, the
// block's d and dmin.

// Injected faults (ds4bench/engine/faults.py; the NumPy twins in ops_ref.RefOps): iq2-sign drops the
// eighth (parity) sign of each group of 8; q2k-dmin reads a Q2_K block's dmin from d's bytes.
#ifdef DS4_FAULT_IQ2_SIGN
#define IQ2_SIGNS(s) ((s) & 127)
#else
#define IQ2_SIGNS(s) (s)
#endif
#ifdef DS4_FAULT_Q2K_DMIN
#define Q2K_DMIN_AT 80
#else
#define Q2K_DMIN_AT 82
#endif

// IQ2_XXS, 66 bytes: f16 d; per sub-block ib of 32, u32 a0 (4 grid indices), u32 a1 (4 × 7-bit
// ksigns indices, ls in bits 28..31). Element 32ib+8k+j = d/8·(2ls+1)·grid[a0 byte k][j]·σ.
// Lane l: ib = l/4, k = l%4.
struct FmtIQ2_XXS {
    static constexpr int BYTES = 66;
    static constexpr bool TABLES = true;
    static constexpr bool HAS_MIN = false;
    // tab 8-byte aligned
    static __device__ __forceinline__ void sm(const u8* b, const i8* x8, const int* bs, int lane,
                                              const u8* tab, int& s, int& m) {
        const u8* qs = b + 2;
        const int ib = lane >> 2, k = lane & 3;
        const unsigned short* a1h = (const unsigned short*)(qs + 8 * ib + 4);   // 2-byte aligned
        const u32 a1 = (u32)a1h[0] | ((u32)a1h[1] << 16);
        const uint2 g = *(const uint2*)(tab + 8 * qs[8 * ib + k]);
        const int signs = IQ2_SIGNS(tab[IQ2_GRID_BYTES + ((a1 >> (7 * k)) & 127)]);
        const int2 xv = *(const int2*)x8;
        int sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int v = (int)(((j < 4 ? g.x : g.y) >> (8 * (j & 3))) & 255);
            const int xj = (int)(signed char)(((j < 4 ? xv.x : xv.y) >> (8 * (j & 3))) & 255);
            sum += ((signs >> j) & 1 ? -v : v) * xj;
        }
        s = (2 * (int)(a1 >> 28) + 1) * sum;
        m = 0;
    }
    static __device__ __forceinline__ void scales(const u8* b, float& d, float& dmin) {
        d = f16_at(b) * 0.125f;
        dmin = 0.0f;
    }
};

// Q2_K, 84 bytes: scales[16] (low nibble sc, high m, per 16), qs[64], f16 d, f16 dmin.
// Element i = 128h + 32j + l (l < 32): q = (qs[32h + l] >> 2j) & 3, sub-block i/16.
// Lane l: elements 8l..8l+7, sub-block l/2; lanes 0..15 own the min of sub-block l.
struct FmtQ2_K {
    static constexpr int BYTES = 84;
    static constexpr bool TABLES = false;
    static constexpr bool HAS_MIN = true;
    static __device__ __forceinline__ void sm(const u8* b, const i8* x8, const int* bs, int lane,
                                              const u8*, int& s, int& m) {
        const int i0 = 8 * lane;
        const int h = i0 >> 7, j = (i0 >> 5) & 3, l0 = i0 & 31;
        const u32* q = (const u32*)(b + 16 + 32 * h + l0);        // 4-byte aligned (84 = 4·21)
        const u32 q0 = q[0], q1 = q[1];
        const int2 xv = *(const int2*)x8;
        int sum = 0;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            const u32 qb = ((t < 4 ? q0 : q1) >> (8 * (t & 3))) & 255;
            const int xt = (int)(signed char)(((t < 4 ? xv.x : xv.y) >> (8 * (t & 3))) & 255);
            sum += (int)((qb >> (2 * j)) & 3) * xt;
        }
        s = (b[lane >> 1] & 15) * sum;
        m = lane < 16 ? (b[lane] >> 4) * bs[lane] : 0;
    }
    static __device__ __forceinline__ void scales(const u8* b, float& d, float& dmin) {
        d = f16_at(b + 80);
        dmin = f16_at(b + Q2K_DMIN_AT);
    }
};

// GGML get_scale_min_k4: 6-bit scale and min of Q4_K sub-block s from the 12 packed bytes.
__device__ __forceinline__ void scale_min_k4(int s, const u8* q, int& sc, int& m) {
    if (s < 4) {
        sc = q[s] & 63;
        m = q[s + 4] & 63;
    } else {
        sc = (q[s + 4] & 15) | ((q[s - 4] >> 6) << 4);
        m = (q[s + 4] >> 4) | ((q[s] >> 6) << 4);
    }
}

// Q4_K, 144 bytes: f16 d, f16 dmin, scales[12] (get_scale_min_k4), qs[128].
// Element i = 64c + 32k + l (l < 32): q = (qs[32c + l] >> 4k) & 15, sub-block 2c + k.
// Lane l: sub-block s = l/4 (c = s/2, k = s%2), positions 8(l%4)..+7; lanes 0..7 own the min of
// sub-block l, whose bsum is bsums[2l] + bsums[2l+1].
struct FmtQ4_K {
    static constexpr int BYTES = 144;
    static constexpr bool TABLES = false;
    static constexpr bool HAS_MIN = true;
    static __device__ __forceinline__ void sm(const u8* b, const i8* x8, const int* bs, int lane,
                                              const u8*, int& s, int& m) {
        const u8* scales = b + 4;
        const int sb = lane >> 2, c = sb >> 1, k = sb & 1, l0 = 8 * (lane & 3);
        const uint2 q = *(const uint2*)(b + 16 + 32 * c + l0);    // 8-byte aligned (144 = 8·18)
        const int2 xv = *(const int2*)x8;
        int sum = 0;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            const u32 qb = ((t < 4 ? q.x : q.y) >> (8 * (t & 3))) & 255;
            const int xt = (int)(signed char)(((t < 4 ? xv.x : xv.y) >> (8 * (t & 3))) & 255);
            sum += (int)((qb >> (4 * k)) & 15) * xt;
        }
        int sc, mn;
        scale_min_k4(sb, scales, sc, mn);
        s = sc * sum;
        m = 0;
        if (lane < 8) {
            scale_min_k4(lane, scales, sc, mn);
            m = mn * (bs[2 * lane] + bs[2 * lane + 1]);
        }
    }
    static __device__ __forceinline__ void scales(const u8* b, float& d, float& dmin) {
        d = f16_at(b);
        dmin = f16_at(b + 2);
    }
};

// ---------------------------------------------------------------------------------- dots

// Warp sums of 8 per-lane ints at once: lane l gets the sum over the warp of v[l >> 2]. Each
// round sends half of what a lane still holds to its partner (4, 2, 1 values), then two plain
// rounds: 9 shuffles where 8 separate sums take 40. Integer sums are exact in any order.
__device__ __forceinline__ int warp_sum8(const int (&v)[8], int lane) {
    const bool h4 = lane & 16, h3 = lane & 8, h2 = lane & 4;
    int a[4], b[2];
#pragma unroll
    for (int i = 0; i < 4; ++i)                                    // a[i]: block 4·h4 + i
        a[i] = (h4 ? v[i + 4] : v[i]) + __shfl_xor_sync(0xffffffffu, h4 ? v[i] : v[i + 4], 16);
#pragma unroll
    for (int i = 0; i < 2; ++i)                                    // b[i]: block 4·h4 + 2·h3 + i
        b[i] = (h3 ? a[i + 2] : a[i]) + __shfl_xor_sync(0xffffffffu, h3 ? a[i] : a[i + 2], 8);
    int c = (h2 ? b[1] : b[0]) + __shfl_xor_sync(0xffffffffu, h2 ? b[0] : b[1], 4);   // block l >> 2
    c += __shfl_xor_sync(0xffffffffu, c, 2);
    return c + __shfl_xor_sync(0xffffffffu, c, 1);
}

// One weight row against one token's Q8_K activations, 8 blocks at a time (see the header):
// returns Σ_b term_b in double, blocks in order, in every lane. w: the row's blocks; xr: the
// lane's 8 activations of block 0; dr, br: the token's block scales and 16-sums.
template <class Fmt>
__device__ __forceinline__ double row_dot8(const u8* w, const i8* xr, const float* dr, const int* br,
                                           int nb, int lane, const u8* tab) {
    double acc = 0.0;
    for (int b0 = 0; b0 < nb; b0 += 8) {
        int sv[8], mv[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            sv[k] = mv[k] = 0;
            if (b0 + k < nb)                                            // uniform over the warp
                Fmt::sm(w + (b0 + k) * Fmt::BYTES, xr + (b0 + k) * QK_K, br + (b0 + k) * 16, lane, tab,
                        sv[k], mv[k]);
        }
        const int S = warp_sum8(sv, lane);
        const int M = Fmt::HAS_MIN ? warp_sum8(mv, lane) : 0;
        const int bk = b0 + (lane >> 2);
        double t = 0.0;
        if (bk < nb) {
            float d, dmin;
            Fmt::scales(w + bk * Fmt::BYTES, d, dmin);
            t = block_term(S, M, d, dmin, dr[bk]);
        }
#pragma unroll
        for (int k = 0; k < 8; ++k)
            if (b0 + k < nb) acc = __dadd_rn(acc, __shfl_sync(0xffffffffu, t, 4 * k));
    }
    return acc;
}

// ---------------------------------------------------------------------------------- Q8_K

// One CTA of 256 threads per 256-block of x [rows, n] (blockIdx.x = row·n/256 + block, which is
// also the flat block index of q, d and bsums). As formats.quantize_act_q8_k: mx = the signed x
// at the first largest |x|, iscale = −127/mx, q = rint(iscale·x) clipped to [−128, 127] (rintf
// rounds half to even, as np.rint), d = 1/iscale; an all-zero block gives d = 0, q = 0.
extern "C" __global__ void q8k_quantize(const float* x, i8* q, float* d, int* bsums, int rows, int n) {
    __shared__ float s_amax[QK_K];
    __shared__ int s_idx[QK_K];
    __shared__ int s_q[QK_K];
    const i64 blk = blockIdx.x;
    if (blk >= (i64)rows * (n / QK_K)) return;             // uniform over the CTA
    const int t = threadIdx.x;
    const float v = x[blk * QK_K + t];
    s_amax[t] = fabsf(v);
    s_idx[t] = t;
    __syncthreads();
    for (int s = QK_K / 2; s > 0; s >>= 1) {                // argmax |x|, ties to the lower index
        if (t < s) {
            const float a = s_amax[t], b = s_amax[t + s];
            const int ib = s_idx[t + s];
            if (b > a || (b == a && ib < s_idx[t])) {
                s_amax[t] = b;
                s_idx[t] = ib;
            }
        }
        __syncthreads();
    }
    const float mx = x[blk * QK_K + s_idx[0]];
    const float iscale = mx != 0.0f ? __fdiv_rn(-127.0f, mx) : 0.0f;
    const float r = fminf(fmaxf(rintf(__fmul_rn(iscale, v)), -128.0f), 127.0f);
    const int qi = (int)r;
    q[blk * QK_K + t] = (i8)qi;
    s_q[t] = qi;
    if (t == 0) d[blk] = mx != 0.0f ? __fdiv_rn(1.0f, iscale) : 0.0f;
    __syncthreads();
    if (t < QK_K / 16) {
        int sum = 0;
        for (int j = 0; j < 16; ++j) sum += s_q[16 * t + j];
        bsums[blk * (QK_K / 16) + t] = sum;
    }
}

// ---------------------------------------------------------------------------------- gate/up

// Copy GGML's IQ2_XXS grid and ksigns to shared memory (every thread of the CTA takes part).
__device__ __forceinline__ void stage_tables(u8* dst, const u8* src) {
    for (int i = threadIdx.x; i < IQ2_TABLE_BYTES; i += blockDim.x) dst[i] = src[i];
    __syncthreads();
}

// grid (P, ceil(F / warps)), block warps·32. Warp w of CTA (p, fy) computes row f = fy·warps + w
// of expert e = sel[p] for pair p = n·A + a:
//   g = min(Wg[e, f]·x[n], clamp), u = clip(Wu[e, f]·x[n], ±clamp),
//   mid[p, f] = (g / (1 + exp(−g))) · u · w[p]                  (float32, the reference's order)
// Weights: [E, F, D] raw blocks, row e·F + f of D/256 blocks. x as Q8_K: xq [N, D], xd [N, D/256],
// xb [N, D/16]. An expert id outside 0..E−1 writes NaN.
template <class Fmt>
__device__ __forceinline__ void gate_up(const u8* Wg, const u8* Wu, const u8* tab, const i8* xq,
                                        const float* xd, const int* xb, const int* sel,
                                        const float* wts, float* mid, int P, int A, int E, int F,
                                        int D, float clamp) {
    const int p = blockIdx.x;
    const int f = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (p >= P || f >= F) return;                           // uniform over the warp
    const int e = sel[p];
    float* out = mid + (i64)p * F + f;
    if (e < 0 || e >= E) {
        if (lane == 0) *out = nan_f32();
        return;
    }
    const int n = p / A, nb = D / QK_K;
    const i64 rb = (i64)nb * Fmt::BYTES;
    const i8* xr = xq + (i64)n * D + 8 * lane;
    const float* dr = xd + (i64)n * nb;
    const int* br = xb + (i64)n * (D / 16);
    const double ag = row_dot8<Fmt>(Wg + ((i64)e * F + f) * rb, xr, dr, br, nb, lane, tab);
    const double au = row_dot8<Fmt>(Wu + ((i64)e * F + f) * rb, xr, dr, br, nb, lane, tab);
    if (lane == 0) {
        const float g = fminf((float)ag, clamp);
        const float u = fminf(fmaxf((float)au, -clamp), clamp);
        const float silu = __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
#ifdef DS4_FAULT_MOE_WRONG_WEIGHT
        const float wp = wts[p - p % A + (p % A + 1) % A];    // the next slot's weight (injected fault)
#else
        const float wp = wts[p];
#endif
        *out = __fmul_rn(__fmul_rn(silu, u), wp);
    }
}

#define GATE_UP_KERNEL(name, Fmt)                                                                  \
    extern "C" __global__ void name(const u8* Wg, const u8* Wu, const u8* tables, const i8* xq,    \
                                    const float* xd, const int* xb, const int* sel,                \
                                    const float* wts, float* mid, int P, int A, int E, int F,      \
                                    int D, float clamp) {                                          \
        __shared__ __align__(16) u8 s_tab[Fmt::TABLES ? IQ2_TABLE_BYTES : 1];                      \
        if (Fmt::TABLES) stage_tables(s_tab, tables);                                              \
        gate_up<Fmt>(Wg, Wu, s_tab, xq, xd, xb, sel, wts, mid, P, A, E, F, D, clamp);              \
    }

GATE_UP_KERNEL(moe_gate_up_iq2_xxs, FmtIQ2_XXS)
GATE_UP_KERNEL(moe_gate_up_q2_k, FmtQ2_K)
GATE_UP_KERNEL(moe_gate_up_q4_k, FmtQ4_K)

// ---------------------------------------------------------------------------------- down

// grid (N, ceil(D / warps)), block warps·32. Warp w of CTA (n, oy) computes output o = oy·warps + w:
//   y[n, o] = Σ_{a = 0..A−1, in order, float32} f32(Wd[sel[n·A + a], o]·mid[n·A + a])
// with mid as Q8_K: mq [P, F], md [P, F/256], mb [P, F/16] (the router weight is inside mid).
// Weights: [E, D, F] raw blocks, row e·D + o of F/256 blocks. A bad expert id gives NaN.
template <class Fmt>
__device__ __forceinline__ void down(const u8* Wd, const u8* tab, const i8* mq, const float* md,
                                     const int* mb, const int* sel, float* y, int N, int A, int E,
                                     int F, int D) {
    const int n = blockIdx.x;
    const int o = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (n >= N || o >= D) return;                           // uniform over the warp
    const int nb = F / QK_K;
    const i64 rb = (i64)nb * Fmt::BYTES;
    float tot = 0.0f;
    for (int a = 0; a < A; ++a) {
        const int p = n * A + a;
        const int e = sel[p];
        if (e < 0 || e >= E) {
            tot = nan_f32();
            continue;
        }
        const double acc = row_dot8<Fmt>(Wd + ((i64)e * D + o) * rb, mq + (i64)p * F + 8 * lane,
                                         md + (i64)p * nb, mb + (i64)p * (F / 16), nb, lane, tab);
        const float ya = (float)acc;
        tot = a == 0 ? ya : __fadd_rn(tot, ya);
    }
    if (lane == 0) y[(i64)n * D + o] = tot;
}

#define DOWN_KERNEL(name, Fmt)                                                                     \
    extern "C" __global__ void name(const u8* Wd, const u8* tables, const i8* mq, const float* md, \
                                    const int* mb, const int* sel, float* y, int N, int A, int E,  \
                                    int F, int D) {                                                \
        __shared__ __align__(16) u8 s_tab[Fmt::TABLES ? IQ2_TABLE_BYTES : 1];                      \
        if (Fmt::TABLES) stage_tables(s_tab, tables);                                              \
        down<Fmt>(Wd, s_tab, mq, md, mb, sel, y, N, A, E, F, D);                                   \
    }

DOWN_KERNEL(moe_down_iq2_xxs, FmtIQ2_XXS)
DOWN_KERNEL(moe_down_q2_k, FmtQ2_K)
DOWN_KERNEL(moe_down_q4_k, FmtQ4_K)
