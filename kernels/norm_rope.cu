// RMS norm and RoPE, one launch each (the array code needs six to eight small launches and, for
// RoPE, host-side cos/sin tables copied in per call). Element-wise ops are float32 rounded one by
// one as in the NumPy reference (no FMA contraction). The mean of squares is summed in double and
// rounded once, where the reference sums float32: the two agree to float32 rounding, not bit for
// bit. RoPE angles and their cos/sin are computed in double and rounded to float, as on the host.
#include "common.cuh"

#define NR_THREADS 256

// y[r, :] = x[r, :] * (1 / sqrt(mean(x[r, :]^2) + eps)) [* w]; one block per row of n.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ y, int n, float eps, int has_w) {
    __shared__ double red[NR_THREADS / DS4_WARP];
    const float* xr = x + (long long)blockIdx.x * n;
    float* yr = y + (long long)blockIdx.x * n;
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        double v = (double)xr[i];
        acc += v * v;
    }
    acc = block_reduce_d(acc, red, 0);
    float mean = (float)(acc / (double)n);
    float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = __fmul_rn(xr[i], inv);
        yr[i] = has_w ? __fmul_rn(v, w[i]) : v;
    }
}

// Rotate the last 2*npair of the K dims of each row r in adjacent pairs (GPT-J) by
// pos[r / pdiv]*freq (pdiv rows share a position: the heads of one token); the other dims are
// copied. sgn = -1 rotates back (the inverse RoPE of the attention output).
extern "C" __global__ void rope(const float* __restrict__ x, float* __restrict__ y,
                                const long long* __restrict__ pos, const double* __restrict__ inv_freq,
                                int K, int npair, float sgn, int pdiv) {
    const long long r = blockIdx.x;
    const float* xr = x + r * K;
    float* yr = y + r * K;
    const int first = K - 2 * npair;
    for (int i = threadIdx.x; i < first; i += blockDim.x) yr[i] = xr[i];
    const double p = (double)pos[r / pdiv];
    for (int j = threadIdx.x; j < npair; j += blockDim.x) {
        double ang = p * inv_freq[j];
        float c = (float)cos(ang), s = __fmul_rn(sgn, (float)sin(ang));
        float x0 = xr[first + 2 * j], x1 = xr[first + 2 * j + 1];
        yr[first + 2 * j] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        yr[first + 2 * j + 1] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
    }
}
