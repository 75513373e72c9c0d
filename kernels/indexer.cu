// Indexer scores (ds4-spec 3.3, "indexer"): for every token and every visible compressed row,
// sum over heads j of w_j * relu(q_j . k), in double like the reference. One block per token;
// its queries (J x I, rows padded against bank conflicts) and head weights sit in shared memory,
// and each warp scores one key row at a time, a lane per head.
#include "common.cuh"

// iq [B, T, J, I], ik rows of length I with batch stride ik_bstride (a slice of the key cache),
// wt [B, T, J] -> score [B, T, C] (double). grid (T, B), block 256; dynamic shared memory
// 4 * (J * (I + 1) + 8 * I + J) bytes.
extern "C" __global__ void indexer_score(const float* __restrict__ iq, const float* __restrict__ ik,
                                         const float* __restrict__ wt, double* __restrict__ score,
                                         int T, int J, int I, int C, long long ik_bstride) {
    extern __shared__ float shf[];
    const int t = blockIdx.x, b = blockIdx.y;
    const int warp = threadIdx.x / DS4_WARP, lane = threadIdx.x % DS4_WARP, nw = blockDim.x / DS4_WARP;
    float* qs = shf;                                  // [J][I + 1]
    float* ks = qs + J * (I + 1);                     // [nw][I]: each warp's key row
    float* ws = ks + nw * I;                          // [J]
    const long long tok = (long long)b * T + t;
    for (int x = threadIdx.x; x < J * I; x += blockDim.x) qs[(x / I) * (I + 1) + x % I] = iq[tok * J * I + x];
    for (int j = threadIdx.x; j < J; j += blockDim.x) ws[j] = wt[tok * J + j];
    __syncthreads();
    float* kr = ks + warp * I;
    for (int c = warp; c < C; c += nw) {
        const float* krow = ik + (long long)b * ik_bstride + (long long)c * I;
        for (int i = lane; i < I; i += DS4_WARP) kr[i] = krow[i];
        __syncwarp();
        double part = 0.0;
        for (int j = lane; j < J; j += DS4_WARP) {
            double dot = 0.0;
            for (int i = 0; i < I; ++i) dot += (double)qs[j * (I + 1) + i] * (double)kr[i];
            part += (double)ws[j] * (dot > 0.0 ? dot : 0.0);
        }
        part = warp_sum_d(part);
        if (lane == 0) score[tok * C + c] = part;
        __syncwarp();
    }
}
