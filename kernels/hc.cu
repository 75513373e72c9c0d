// Hyper-connection mixing (ds4-spec 3.3, "HC pre/post"), one launch per step instead of the
// dozens of small element-wise kernels the array code needs (Sinkhorn alone is 2*iters sums).
// Arithmetic follows the NumPy reference: float32 element-wise with explicit rounding per
// operation (no contraction into FMA), sums over streams in order, the stream mixes in double.
#include "common.cuh"

#define HC_MAX_STREAMS 8

__device__ __forceinline__ float hc_sigmoid(float x) {
    return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x)));
}

// mix [N, S*(S+2)] -> pre [N, S] (sigmoid + eps), post [N, S] (2 sigmoid), comb [N, S, S]
// (row softmax + eps, then Sinkhorn: `iters` column normalizations with iters-1 row ones between).
// One thread per token. SC > 0 fixes S at compile time (the loops unroll and the S x S matrix
// stays in registers; a runtime S keeps it in local memory, several times slower); the
// arithmetic and its order are the same either way.
template <int SC>
__device__ __forceinline__ void hc_weights_row(const float* __restrict__ m, const float* __restrict__ scale,
                                               const float* __restrict__ base, float* __restrict__ pre,
                                               float* __restrict__ post, float* __restrict__ comb,
                                               int S_rt, int iters, float eps) {
    const int S = SC > 0 ? SC : S_rt;
#ifdef DS4_FAULT_HC_SINKHORN
    iters = 1;                                        // injected fault (faults.py): one iteration only
#endif
    for (int s = 0; s < S; ++s) {
        pre[s] = __fadd_rn(hc_sigmoid(__fadd_rn(__fmul_rn(m[s], scale[0]), base[s])), eps);
        post[s] = __fmul_rn(2.0f, hc_sigmoid(__fadd_rn(__fmul_rn(m[S + s], scale[1]), base[S + s])));
    }
    float c[(SC > 0 ? SC : HC_MAX_STREAMS) * (SC > 0 ? SC : HC_MAX_STREAMS)];
#pragma unroll
    for (int i = 0; i < S; ++i) {                       // row i: softmax over columns j
        float mx = __int_as_float(0xff800000);           // -inf (NVRTC has no math.h macros)
#pragma unroll
        for (int j = 0; j < S; ++j) {
            int k = 2 * S + i * S + j;
            c[i * S + j] = __fadd_rn(__fmul_rn(m[k], scale[2]), base[k]);
            mx = fmaxf(mx, c[i * S + j]);
        }
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < S; ++j) {
            c[i * S + j] = expf(__fsub_rn(c[i * S + j], mx));
            sum = __fadd_rn(sum, c[i * S + j]);
        }
#pragma unroll
        for (int j = 0; j < S; ++j) c[i * S + j] = __fadd_rn(__fdiv_rn(c[i * S + j], sum), eps);
    }
    for (int it = 0; it < iters; ++it) {
        if (it > 0) {
#pragma unroll
            for (int i = 0; i < S; ++i) {
                float sum = 0.0f;
#pragma unroll
                for (int j = 0; j < S; ++j) sum = __fadd_rn(sum, c[i * S + j]);
                sum = __fadd_rn(sum, eps);
#pragma unroll
                for (int j = 0; j < S; ++j) c[i * S + j] = __fdiv_rn(c[i * S + j], sum);
            }
        }
#pragma unroll
        for (int j = 0; j < S; ++j) {
            float sum = 0.0f;
#pragma unroll
            for (int i = 0; i < S; ++i) sum = __fadd_rn(sum, c[i * S + j]);
            sum = __fadd_rn(sum, eps);
#pragma unroll
            for (int i = 0; i < S; ++i) c[i * S + j] = __fdiv_rn(c[i * S + j], sum);
        }
    }
#pragma unroll
    for (int k = 0; k < S * S; ++k) comb[k] = c[k];
}

extern "C" __global__ void hc_weights(const float* __restrict__ mix, const float* __restrict__ scale,
                                      const float* __restrict__ base, float* __restrict__ pre,
                                      float* __restrict__ post, float* __restrict__ comb,
                                      int N, int S, int iters, float eps) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N || S > HC_MAX_STREAMS) return;
    const float* m = mix + (long long)n * S * (S + 2);
    float* pn = pre + (long long)n * S;
    float* qn = post + (long long)n * S;
    float* cn = comb + (long long)n * S * S;
    if (S == 4) hc_weights_row<4>(m, scale, base, pn, qn, cn, S, iters, eps);     // DS4 Flash: 4 streams
    else hc_weights_row<0>(m, scale, base, pn, qn, cn, S, iters, eps);
}

// x [N, D] = sum_s pre[n, s] * X[n, s, :], in double, rounded once.
extern "C" __global__ void hc_collapse(const float* __restrict__ X, const float* __restrict__ pre,
                                       float* __restrict__ x, int N, int S, int D) {
    int d = blockIdx.x * blockDim.x + threadIdx.x, n = blockIdx.y;
    if (d >= D) return;
    double acc = 0.0;
    for (int s = 0; s < S; ++s) acc += (double)pre[n * S + s] * (double)X[((long long)n * S + s) * D + d];
    x[(long long)n * D + d] = (float)acc;
}

// out [N, S, D]: stream t = post[n, t] * y[n, :] + sum_s comb[n, s, t] * X[n, s, :]
// (the sum in double, rounded once, then the float32 product and sum).
extern "C" __global__ void hc_expand(const float* __restrict__ X, const float* __restrict__ y,
                                     const float* __restrict__ post, const float* __restrict__ comb,
                                     float* __restrict__ out, int N, int S, int D) {
    int d = blockIdx.x * blockDim.x + threadIdx.x, n = blockIdx.y;
    if (d >= D || S > HC_MAX_STREAMS) return;
    double xs[HC_MAX_STREAMS];
    for (int s = 0; s < S; ++s) xs[s] = (double)X[((long long)n * S + s) * D + d];
    float yv = y[(long long)n * D + d];
    for (int t = 0; t < S; ++t) {
        double acc = 0.0;
        for (int s = 0; s < S; ++s) acc += (double)comb[(n * S + s) * S + t] * xs[s];
        out[((long long)n * S + t) * D + d] = __fadd_rn(__fmul_rn(post[n * S + t], yv), (float)acc);
    }
}
