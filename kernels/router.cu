// MoE router (ds4-spec 3.3, "routing") in one launch per layer: sqrt(softplus) scores, the
// optional bias, top-k experts best first (ties to the lower index, as a stable sort), their
// weights normalized by max(sum, floor) and scaled. Hash layers pass the experts in (sel_in)
// and get only the weights. float32 element-wise, each operation rounded as NumPy does it;
// softplus follows NumPy's logaddexp(0, x): log1p(exp(-|x|)) + max(x, 0).
#include "common.cuh"

#define RT_MAX_USED 16

__device__ __forceinline__ float softplus_np(float x) {
    if (x == 0.0f) return 0.6931471805599453f;
    return x < 0.0f ? log1pf(expf(x)) : __fadd_rn(x, log1pf(expf(-x)));
}

// better of two (value, index) candidates: larger value, then lower index
__device__ __forceinline__ void rt_pick(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 >= 0 && (i < 0 || i2 < i))) { v = v2; i = i2; }
}

// logits [N, E] -> sel [N, A] (int64), w [N, A]; one block per token (blockDim a multiple of 32);
// dynamic shared memory: 2 * E floats.
extern "C" __global__ void route_topk(const float* __restrict__ logits, const float* __restrict__ bias,
                                      const long long* __restrict__ sel_in, long long* __restrict__ sel,
                                      float* __restrict__ w, int E, int A, int has_bias, int has_sel,
                                      int norm, float floor_, float scale) {
    extern __shared__ float sm[];
    float* p = sm;                       // [E] sqrt(softplus)
    float* sc = sm + E;                  // [E] selection scores, -inf once taken
    __shared__ float rv[32];
    __shared__ int ri[32];
    __shared__ int chosen[RT_MAX_USED];
    const long long n = blockIdx.x;
    const float ninf = __int_as_float(0xff800000);
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float v = __fsqrt_rn(softplus_np(logits[n * E + e]));
        p[e] = v;
        sc[e] = has_bias ? __fadd_rn(v, bias[e]) : v;
    }
    __syncthreads();
    const int lane = threadIdx.x % DS4_WARP, warp = threadIdx.x / DS4_WARP, nw = blockDim.x / DS4_WARP;
    for (int a = 0; a < A && a < RT_MAX_USED; ++a) {
        if (has_sel) {
            if (threadIdx.x == 0) chosen[a] = (int)sel_in[n * A + a];
            continue;
        }
        float v = ninf;
        int i = -1;
        for (int e = threadIdx.x; e < E; e += blockDim.x) rt_pick(v, i, sc[e], e);
        for (int o = 16; o > 0; o >>= 1) {
            float v2 = __shfl_xor_sync(0xffffffffu, v, o);
            int i2 = __shfl_xor_sync(0xffffffffu, i, o);
            rt_pick(v, i, v2, i2);
        }
        if (lane == 0) { rv[warp] = v; ri[warp] = i; }
        __syncthreads();
        if (threadIdx.x == 0) {
            float bv = rv[0];
            int bi = ri[0];
            for (int k = 1; k < nw; ++k) rt_pick(bv, bi, rv[k], ri[k]);
            if (bi < 0) bi = 0;          // every score -inf or NaN: expert 0, as argsort would not say
            chosen[a] = bi;
            sc[bi] = ninf;
        }
        __syncthreads();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float wa[RT_MAX_USED];
        float sum = 0.0f;
        for (int a = 0; a < A && a < RT_MAX_USED; ++a) {
            wa[a] = p[chosen[a]];
            sum = __fadd_rn(sum, wa[a]);
        }
        const float den = fmaxf(sum, floor_);
        for (int a = 0; a < A && a < RT_MAX_USED; ++a) {
            float x = norm ? __fdiv_rn(wa[a], den) : wa[a];
            sel[n * A + a] = chosen[a];
            w[n * A + a] = __fmul_rn(x, scale);
        }
    }
}
