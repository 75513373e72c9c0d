#include "common.cuh"

// The shared expert's clamped SwiGLU, silu(min(g, c)) * clip(u, -c, c), in one pass: float32,
// each operation rounded as NumPy does (NaN passes through min and clip as there).
extern "C" __global__ void swiglu_clamped(const float* __restrict__ g, const float* __restrict__ u,
                                          float* __restrict__ out, long long n, float c) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gv = g[i], uv = u[i];
    const float m = gv > c ? c : gv;
    const float s = __fdiv_rn(m, __fadd_rn(1.0f, expf(-m)));
    const float cl = uv < -c ? -c : (uv > c ? c : uv);
    out[i] = __fmul_rn(s, cl);
}
