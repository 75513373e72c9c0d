// Matmuls over F16 weights with float activations: the F16 model tensors (HC, router, compressor,
// indexer) and the f16 mode's Q8_0->F16 cache (q8_0.cu dequant_q8_0_f16). Products are exact in
// double and summed in double, then rounded once, as the reference's float64 matmul.
#include "common.cuh"

// One F16 weight pair (columns 2k, 2k+1) times each tile token's activations, products exact in
// double, added to the token's accumulator; x_at(i) points at token i's activation slice.
template <typename XA>
__device__ __forceinline__ void f16w_pair(const __half2* __restrict__ row, int k, int nt, XA x_at, double* acc) {
    const float2 w = __half22float2(row[k]);
#pragma unroll
    for (int i = 0; i < TOKEN_TILE; i++) {
        if (i < nt) {
            const float2 xv = *(const float2*)(x_at(i) + 2 * k);
            acc[i] = __dadd_rn(acc[i], __dmul_rn((double)w.x, (double)xv.x));
            acc[i] = __dadd_rn(acc[i], __dmul_rn((double)w.y, (double)xv.y));
        }
    }
}

// F16 weight row o against a tile of tokens: this thread's share of the K/2 column pairs (k0,
// k0 + step, ...) into acc, which it zeroes first. Both F16-weight matmuls use it.
__device__ __forceinline__ void f16w_row_tile(const __half* __restrict__ W, const float* __restrict__ x, int o,
                                              int K, int g, int t0, int nt, int x_stride, int k0, int step,
                                              double* acc) {
    const __half2* row = (const __half2*)(W + (long)o * K);
#pragma unroll
    for (int i = 0; i < TOKEN_TILE; i++) acc[i] = 0.0;
    auto x_at = [&](int i) { return x + (long)(t0 + i) * x_stride + (long)g * K; };
    for (int k = k0; k < K / 2; k += step) f16w_pair(row, k, nt, x_at, acc);
}

// y[t, o] = sum_k f32(W[o, k]) * x[t, g*K + k]. Same geometry and grouping as q8_0.cu
// matmul_q8_0. K must be even.
extern "C" __global__ void matmul_f16w(const __half* __restrict__ W, const float* __restrict__ x,
                                       float* __restrict__ y, int O, int K, int T, int rows_per_group,
                                       int x_stride) {
    const int warp = threadIdx.x / DS4_WARP, lane = threadIdx.x % DS4_WARP;
    const int o = blockIdx.x * 8 + warp;
    const int t0 = blockIdx.y * TOKEN_TILE;
    if (o >= O) return;
    const int nt = min(TOKEN_TILE, T - t0);
    double acc[TOKEN_TILE];
    f16w_row_tile(W, x, o, K, o / rows_per_group, t0, nt, x_stride, lane, DS4_WARP, acc);
    store_row_tile(acc, lane, nt, y, t0, O, o);
}

// matmul_f16w for few output rows (HC mixers: 24 rows of 16384, the router: 256 of 4096): one
// block per row and token tile, its 256 threads splitting K, so a 24-row projection keeps more
// than 24 warps busy. Same arithmetic (exact products, sums in double, one rounding); only the
// order of the double sums differs. grid (O, ceil(T/TOKEN_TILE)), block 256.
extern "C" __global__ void matmul_f16w_splitk(const __half* __restrict__ W, const float* __restrict__ x,
                                              float* __restrict__ y, int O, int K, int T, int rows_per_group,
                                              int x_stride) {
    __shared__ double red[TOKEN_TILE][256 / DS4_WARP];
    const int o = blockIdx.x, t0 = blockIdx.y * TOKEN_TILE;
    const int warp = threadIdx.x / DS4_WARP, lane = threadIdx.x % DS4_WARP, nw = blockDim.x / DS4_WARP;
    const int nt = min(TOKEN_TILE, T - t0);
    double acc[TOKEN_TILE];
    f16w_row_tile(W, x, o, K, o / rows_per_group, t0, nt, x_stride, threadIdx.x, blockDim.x, acc);
#pragma unroll
    for (int i = 0; i < TOKEN_TILE; i++) {
        const double v = warp_sum_d(acc[i]);
        if (lane == 0) red[i][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < nt) {
        double v = 0.0;
        for (int w8 = 0; w8 < nw; w8++) v += red[threadIdx.x][w8];
        y[(long)(t0 + threadIdx.x) * O + o] = (float)v;
    }
}
