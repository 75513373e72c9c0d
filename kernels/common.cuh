// Shared helpers for ds4bench kernels. NVRTC-safe: no standard library headers.
#pragma once
#include <cuda_fp16.h>

#define DS4_WARP 32

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Round |v| to nearest (ties to even) on a minifloat grid with `mbits` mantissa bits and minimum
// normal exponent `emin`; the sign is kept. Matches formats._round_to_grid.
__device__ __forceinline__ float round_to_grid(float v, int mbits, int emin) {
    float a = fabsf(v);
    int e = a > 0.0f ? ilogbf(a) : -1;
    if (e < emin) e = emin;
    float step = ldexpf(1.0f, e - mbits);
    float r = rintf(a / step) * step;
    return v < 0.0f ? -r : r;
}

__device__ __forceinline__ double warp_max_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// op 0: sum, 1: max, over the block (every thread gets the result); `red` holds one double per
// warp. Every thread of the block must call it.
__device__ __forceinline__ double block_reduce_d(double v, double* red, int op) {
    v = op ? warp_max_d(v) : warp_sum_d(v);
    int lane = threadIdx.x % DS4_WARP, warp = threadIdx.x / DS4_WARP;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + DS4_WARP - 1) / DS4_WARP;
    const double none = op ? __longlong_as_double(0xfff0000000000000ULL) : 0.0;
    v = threadIdx.x < nw ? red[threadIdx.x] : none;
    if (warp == 0) v = op ? warp_max_d(v) : warp_sum_d(v);
    if (threadIdx.x == 0) red[0] = v;
    __syncthreads();
    v = red[0];
    __syncthreads();
    return v;
}

// ---- token tiles of the matmuls (q8_0.cu, f16w.cu): a block takes TOKEN_TILE tokens at once

#define TOKEN_TILE 8

// A warp's per-token double sums rounded once into y[t0 + i, o] by lane 0.
__device__ __forceinline__ void store_row_tile(double* acc, int lane, int nt, float* __restrict__ y,
                                               int t0, int O, int o) {
#pragma unroll
    for (int i = 0; i < TOKEN_TILE; i++) {
        const double v = warp_sum_d(acc[i]);
        if (lane == 0 && i < nt) y[(long)(t0 + i) * O + o] = (float)v;
    }
}
