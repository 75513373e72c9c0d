// Softmax attention with a per-head sink, V = K (ds4-spec 3.3, "attention"), for any number of
// query tokens T over J key rows (the raw window, the new tokens and the visible compressed rows),
// in double like the reference: scores, max, exponentials and the weighted sum of keys, rounded
// to float once at the end. One block per (head, token, sequence); the J scores live in dynamic
// shared memory (8*J bytes + 256), so the caller falls back to array code for very long J.
#include "common.cuh"

#define AT_THREADS 256

// q [B, T, H, K], keys [B, J, K], mask [B, T, J] (1 = visible), sinks [H] -> o [B, T, H, K]
extern "C" __global__ void attend_sink(const float* __restrict__ q, const float* __restrict__ keys,
                                       const unsigned char* __restrict__ mask, const float* __restrict__ sinks,
                                       float* __restrict__ o, int T, int H, int J, int K, double scale) {
    extern __shared__ double sh[];
    double* s = sh;                                   // [J] scores, then exponentials
    double* red = sh + J;                             // [AT_THREADS / 32]
    const int h = blockIdx.x, t = blockIdx.y, b = blockIdx.z;
    const long long row = ((long long)b * T + t) * H + h;
    const float* qv = q + row * K;
    const float* kb = keys + (long long)b * J * K;
    const unsigned char* mk = mask + ((long long)b * T + t) * J;
    const double ninf = __longlong_as_double(0xfff0000000000000ULL);
    const int lane = threadIdx.x % DS4_WARP, warp = threadIdx.x / DS4_WARP, nw = blockDim.x / DS4_WARP;
    for (int j = warp; j < J; j += nw) {              // one warp per key row
        double acc = 0.0;
        if (mk[j])
            for (int k = lane; k < K; k += DS4_WARP) acc += (double)qv[k] * (double)kb[(long long)j * K + k];
        acc = warp_sum_d(acc);
        if (lane == 0) s[j] = mk[j] ? acc * scale : ninf;
    }
    __syncthreads();
    double m = ninf;
    for (int j = threadIdx.x; j < J; j += blockDim.x) m = fmax(m, s[j]);
    m = fmax(block_reduce_d(m, red, 1), (double)sinks[h]);
    double sum = 0.0;
    for (int j = threadIdx.x; j < J; j += blockDim.x) {
        double e = s[j] == ninf ? 0.0 : exp(s[j] - m);
        s[j] = e;
        sum += e;
    }
    const double den = block_reduce_d(sum, red, 0) + exp((double)sinks[h] - m);
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        double acc = 0.0;
        for (int j = 0; j < J; ++j) acc += s[j] * (double)kb[(long long)j * K + k];
        o[row * K + k] = (float)(acc / den);
    }
}
