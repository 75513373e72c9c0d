// The indexer (ds4-spec 3.3, "indexer"). indexer_score: for every token and every visible
// compressed row, sum over heads j of w_j * relu(q_j . k), in double like the reference. One
// block per token; its queries (J x I, rows padded against bank conflicts) and head weights sit
// in shared memory, and each warp scores one key row at a time, a lane per head. topk_keep: the
// k best visible rows per token.
#include "common.cuh"

// iq [B, T, J, I], ik rows of length I with batch stride ik_bstride (a slice of the key cache),
// wt [B, T, J] -> score [B, T, C] (double). grid (T, B), block 256; dynamic shared memory
// 4 * (J * (I + 1) + 8 * I + J) bytes.
// With counted != 0, pos [B, T] gives each token's row count (p + 1) / ratio: rows past it, and
// every row of a token whose count is at most min_rows (it keeps all its rows, top-k or not),
// score -inf without being computed. C can then be the key cache's whole capacity.
extern "C" __global__ void indexer_score(const float* __restrict__ iq, const float* __restrict__ ik,
                                         const float* __restrict__ wt, double* __restrict__ score,
                                         int T, int J, int I, int C, long long ik_bstride,
                                         const long long* __restrict__ pos, int counted, int ratio, int min_rows) {
    extern __shared__ float shf[];
    const int t = blockIdx.x, b = blockIdx.y;
    const int warp = threadIdx.x / DS4_WARP, lane = threadIdx.x % DS4_WARP, nw = blockDim.x / DS4_WARP;
    float* qs = shf;                                  // [J][I + 1]
    float* ks = qs + J * (I + 1);                     // [nw][I]: each warp's key row
    float* ws = ks + nw * I;                          // [J]
    const long long tok = (long long)b * T + t;
    int n = C;                                        // rows scored
    if (counted) {
        const long long seen = (pos[tok] + 1) / ratio;
        n = seen <= min_rows ? 0 : (int)(seen < C ? seen : C);
        const double ninf = __longlong_as_double(0xfff0000000000000ULL);
        for (int c = n + threadIdx.x; c < C; c += blockDim.x) score[tok * C + c] = ninf;
        if (n == 0) return;                           // the whole block agrees: no barrier is skipped
    }
    for (int x = threadIdx.x; x < J * I; x += blockDim.x) qs[(x / I) * (I + 1) + x % I] = iq[tok * J * I + x];
    for (int j = threadIdx.x; j < J; j += blockDim.x) ws[j] = wt[tok * J + j];
    __syncthreads();
    float* kr = ks + warp * I;
    for (int c = warp; c < n; c += nw) {
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

// The k best visible entries of each row of score [R, C] (double), as a stable sort of the
// negated scores with the invisible ones at -inf would pick them: larger first, ties to the lower
// index, NaN after every number. Entry c is kept when it is visible and fewer than k entries
// come before it. Each block ranks one row by counting, so it needs no sort, no scratch beyond
// shared memory and no host sync (a captured decode step runs it). grid R, block 256, dynamic
// shared memory 8 * C bytes.
__device__ __forceinline__ bool tk_before(double a, int ia, double b, int ib) {
    const bool na = isnan(a), nb = isnan(b);
    if (na != nb) return nb;                          // numbers before NaN
    if (!na && a != b) return a > b;
    return ia < ib;
}

extern "C" __global__ void topk_keep(const double* __restrict__ score, const unsigned char* __restrict__ visible,
                                     unsigned char* __restrict__ keep, int C, int k) {
    extern __shared__ double sc[];
    const long long r = blockIdx.x;
#ifdef DS4_FAULT_INDEXER_TOPK
    k = k - 1;                                        // injected fault (faults.py): k-1 rows kept
#endif
    const double ninf = __longlong_as_double(0xfff0000000000000ULL);
    for (int c = threadIdx.x; c < C; c += blockDim.x) sc[c] = visible[r * C + c] ? score[r * C + c] : ninf;
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        unsigned char kept = 0;
        if (visible[r * C + c]) {
            const double v = sc[c];
            int rank = 0;
            for (int d = 0; d < C && rank < k; ++d) rank += tk_before(sc[d], d, v, c);
            kept = rank < k;
        }
        keep[r * C + c] = kept;
    }
}
