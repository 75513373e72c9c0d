// Low-precision round trips that are part of the DS4 model (ds4-spec 3.3 steps 6-8, 4.4):
// FP8 e4m3 on the "nope" dims of stored KV rows, F16 rounding of the whole row, and the
// indexer's Hadamard rotation followed by an FP4 e2m1 round trip. Bit-compatible with formats.py.
#include "common.cuh"

// The FP8 grid of kv_round: round to nearest even, or (injected fault fp8-kv-truncate, faults.py)
// the magnitude truncated toward zero, as formats._round_to_grid(..., trunc=True).
#ifdef DS4_FAULT_FP8_KV_TRUNCATE
__device__ __forceinline__ float fp8_grid(float v) {
    const float a = fabsf(v);
    int e = a > 0.0f ? ilogbf(a) : -1;
    if (e < -6) e = -6;
    const float step = ldexpf(1.0f, e - 3);
    const float r = truncf(a / step) * step;
    return v < 0.0f ? -r : r;
}
#else
__device__ __forceinline__ float fp8_grid(float v) { return round_to_grid(v, 3, -6); }
#endif

// x [rows, K] in place: dims < nope in blocks of 64 get the FP8 round trip; then every dim is
// rounded to F16. grid (nope/64 + 1, rows), block 64: the last block of a row does the RoPE dims.
extern "C" __global__ void kv_round(float* __restrict__ x, int K, int nope) {
    __shared__ float red[2];
    float* row = x + (long)blockIdx.y * K;
    const int nblk = nope / 64;
    if ((int)blockIdx.x == nblk) {
        for (int i = nope + threadIdx.x; i < K; i += blockDim.x) row[i] = __half2float(__float2half_rn(row[i]));
        return;
    }
    const int i = blockIdx.x * 64 + threadIdx.x;
    const float v = row[i];
    const float m = warp_max(fabsf(v));
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
    __syncthreads();
    const float amax = fmaxf(fmaxf(red[0], red[1]), 1e-4f);
    const float scale = ldexpf(1.0f, (int)ceilf(log2f(amax / 448.0f)));
    const float s = fminf(fmaxf(v / scale, -448.0f), 448.0f);
    const float r = fp8_grid(s) * scale;
    row[i] = __half2float(__float2half_rn(r));
}

// x [rows, n] in place: y = H x (butterflies of stride 1, 2, 4, ...) * inv_sqrt_n, then FP4 e2m1
// per 32 with scale 2^ceil(log2(amax/6)), amax floored at 2^-126 as ds4 does.
// grid rows, block n (n a power of two, <= 1024, multiple of 32).
extern "C" __global__ void indexer_round(float* __restrict__ x, int n, float inv_sqrt_n) {
    extern __shared__ float y[];
    float* row = x + (long)blockIdx.x * n;
    const int i = threadIdx.x;
    y[i] = row[i];
    __syncthreads();
    for (int s = 1; s < n; s <<= 1) {
        float a = 0.0f, b = 0.0f;
        const bool lo = (i & s) == 0;
        if (lo) { a = y[i]; b = y[i + s]; }
        __syncthreads();
        if (lo) { y[i] = a + b; y[i + s] = a - b; }
        __syncthreads();
    }
    const float v = y[i] * inv_sqrt_n;
    const float amax = fmaxf(warp_max(fabsf(v)), 7.052966104933725e-38f);
    const float scale = ldexpf(1.0f, (int)ceilf(log2f(amax / 6.0f)));
    const float s = fminf(fmaxf(v / scale, -6.0f), 6.0f);
    row[i] = round_to_grid(s, 1, 0) * scale;
}
