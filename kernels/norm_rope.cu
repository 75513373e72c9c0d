// RMS norm and RoPE, one launch each (the array code needs six to eight small launches and, for
// RoPE, host-side cos/sin tables copied in per call), in ds4's arithmetic as model.rms_norm and
// model.rope are (docs/fidelity.md). Element-wise ops are float32 rounded one by one as in the
// NumPy reference (no FMA contraction). The squares are summed in double (exact terms; only the
// order of the sum differs from the reference's) and the mean rounded once to float. RoPE angles
// are float32 as in ds4's rope_tail_ext_inplace: the position as float, times theta_scale once per
// pair, YaRN-blended; cos/sin of that float angle are taken in double and rounded to float.
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
    // a mean past FLT_MAX: ds4 scales by 1/inf = 0; model.rms_norm's "rescale" takes it in double
    if (mean > 3.402823466e+38f) inv = (float)(1.0 / sqrt(acc / (double)n + (double)eps));
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = __fmul_rn(xr[i], inv);
        yr[i] = has_w ? __fmul_rn(v, w[i]) : v;
    }
}

// Rotate the last 2*npair of the K dims of each row r in adjacent pairs (GPT-J) by the angle of
// pos[r / pdiv] (pdiv rows share a position: the heads of one token); the other dims are copied.
// Pair j's angle is model.RopeFreq.angles: (float)pos times theta_scale j times, then, with YaRN,
// freq_scale*t*(1 - mix) + t*mix with ds4's ramp over [corr_lo, corr_hi]. sgn = -1 rotates back
// (the inverse RoPE of the attention output).
extern "C" __global__ void rope(const float* __restrict__ x, float* __restrict__ y,
                                const long long* __restrict__ pos, int K, int npair,
                                float theta_scale, float freq_scale, int yarn, float corr_lo,
                                float corr_hi, float mscale, float sgn, int pdiv) {
    const long long r = blockIdx.x;
    const float* xr = x + r * K;
    float* yr = y + r * K;
    const int first = K - 2 * npair;
    for (int i = threadIdx.x; i < first; i += blockDim.x) yr[i] = xr[i];
    const float p = (float)pos[r / pdiv];
    for (int j = threadIdx.x; j < npair; j += blockDim.x) {
        float t = p;
        for (int k = 0; k < j; ++k) t = __fmul_rn(t, theta_scale);
        float ang = __fmul_rn(freq_scale, t);
        if (yarn) {
            float ramp = __fdiv_rn(__fsub_rn((float)j, corr_lo), fmaxf(0.001f, __fsub_rn(corr_hi, corr_lo)));
            float mix = __fsub_rn(1.0f, fminf(1.0f, fmaxf(0.0f, ramp)));
            ang = __fadd_rn(__fmul_rn(ang, __fsub_rn(1.0f, mix)), __fmul_rn(t, mix));
        }
        float c = __fmul_rn((float)cos((double)ang), mscale);
        float s = __fmul_rn(__fmul_rn(sgn, (float)sin((double)ang)), mscale);
        float x0 = xr[first + 2 * j], x1 = xr[first + 2 * j + 1];
        yr[first + 2 * j] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        yr[first + 2 * j + 1] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
    }
}
