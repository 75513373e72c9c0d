// Softmax attention with a per-head sink, V = K (ds4-spec 3.3, "attention"), for any number of
// query tokens T over J key rows (the raw window, the new tokens and the visible compressed rows),
// in double like the reference: scores, max, exponentials and the weighted sum of keys, rounded
// to float once at the end. One block per (head, token, sequence); the J scores live in dynamic
// shared memory (8*J bytes + 256), so the caller falls back to array code for very long J.
//
// Two entry points share one body (attend_rows), which reads key row j through a Rows object:
//   attend_sink       keys [B, J, K] and mask [B, T, J] built by the caller (gathers, concatenations
//                     and a host-built mask, uploaded each step);
//   attend_sink_ring  the same rows read in place: the sliding-window ring [B, W, K], this call's
//                     rows [B, T, K], the compressed rows [B, Cs, K] with their visibility [B, T, C],
//                     the raw rows' visibility and each token's compressed-row count derived from
//                     the positions in device memory (what a captured decode step needs).
// Row j means the same key in both (ring rows in position order, then the new rows, then the
// compressed ones) and the arithmetic is the same, so the two give the same bits.
#include "common.cuh"

#define AT_THREADS 256
#define AT_BATCH 8                                    // key rows whose values a thread loads together

template <class Rows>
__device__ void attend_rows(const float* __restrict__ qv, const Rows& rows, int J, int K, double sink,
                            double scale, float* __restrict__ out) {
    extern __shared__ double sh[];
    double* s = sh;                                   // [J] scores, then exponentials
    double* red = sh + J;                             // [AT_THREADS / 32]
    const double ninf = __longlong_as_double(0xfff0000000000000ULL);
#ifdef DS4_FAULT_ATTN_SINK_DROPPED
    sink = ninf;                                      // injected fault (faults.py): no sink term
#endif
    const int lane = threadIdx.x % DS4_WARP, warp = threadIdx.x / DS4_WARP, nw = blockDim.x / DS4_WARP;
    for (int j = warp; j < J; j += nw) {              // one warp per key row
        const bool seen = rows.visible(j);
        const float* kr = rows.row(j);
        double acc = 0.0;
        if (seen)
            for (int k = lane; k < K; k += DS4_WARP) acc += (double)qv[k] * (double)kr[k];
        acc = warp_sum_d(acc);
        if (lane == 0) s[j] = seen ? acc * scale : ninf;
    }
    __syncthreads();
    double m = ninf;
    for (int j = threadIdx.x; j < J; j += blockDim.x) m = fmax(m, s[j]);
    m = fmax(block_reduce_d(m, red, 1), sink);
    double sum = 0.0;
    for (int j = threadIdx.x; j < J; j += blockDim.x) {
        double e = s[j] == ninf ? 0.0 : exp(s[j] - m);
        s[j] = e;
        sum += e;
    }
    const double den = block_reduce_d(sum, red, 0) + exp(sink - m);
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        double acc = 0.0;
        int j = 0;
        for (; j + AT_BATCH <= J; j += AT_BATCH) {    // the loads of AT_BATCH rows in flight at once,
            float v[AT_BATCH];                        // then the sum in the same order as one by one
#pragma unroll
            for (int u = 0; u < AT_BATCH; ++u) v[u] = rows.row(j + u)[k];
#pragma unroll
            for (int u = 0; u < AT_BATCH; ++u) acc += s[j + u] * (double)v[u];
        }
        for (; j < J; ++j) acc += s[j] * (double)rows.row(j)[k];
        out[k] = (float)(acc / den);
    }
}

struct ConcatRows {                                   // keys and mask laid out by the caller
    const float* keys;                                // [J, K] this sequence's keys
    const unsigned char* mask;                        // [J] this token's visibility
    int K;
    __device__ const float* row(int j) const { return keys + (long long)j * K; }
    __device__ bool visible(int j) const { return mask[j] != 0; }
};

struct RingRows {                                     // the run state read in place
    const float* raw;                                 // [W, K] ring, row = position % W
    const float* kv;                                  // [T, K] this call's rows
    const float* comp;                                // [Cs, K] compressed rows
    const unsigned char* cmask;                       // [C] this token's visible compressed rows
    long long p0, p;                                  // first position of the call, this token's
    int W, T, K;
    int r0;                                           // p0 % W in [0, W): the ring row of position p0 - W
    __device__ const float* row(int j) const {
        if (j < W) {                                  // position p0 - W + j, held at that position % W
            const int r = r0 + j;
            return raw + (long long)(r < W ? r : r - W) * K;
        }
        if (j < W + T) return kv + (long long)(j - W) * K;
        return comp + (long long)(j - W - T) * K;
    }
    __device__ bool visible(int j) const {
        if (j < W + T) {                              // within the window and not in the future
            const long long kpos = p0 - W + j;
#ifdef DS4_FAULT_ATTN_WINDOW
            return kpos >= 0 && kpos <= p && kpos >= p - W;       // injected fault (faults.py): W+1 keys
#else
            return kpos >= 0 && kpos <= p && kpos > p - W;
#endif
        }
        return cmask[j - W - T] != 0;
    }
};

// q [B, T, H, K], keys [B, J, K], mask [B, T, J] (1 = visible), sinks [H] -> o [B, T, H, K]
extern "C" __global__ void attend_sink(const float* __restrict__ q, const float* __restrict__ keys,
                                       const unsigned char* __restrict__ mask, const float* __restrict__ sinks,
                                       float* __restrict__ o, int T, int H, int J, int K, double scale) {
    const int h = blockIdx.x, t = blockIdx.y, b = blockIdx.z;
    const long long row = ((long long)b * T + t) * H + h;
    const ConcatRows rows{keys + (long long)b * J * K, mask + ((long long)b * T + t) * J, K};
    attend_rows(q + row * K, rows, J, K, (double)sinks[h], scale, o + row * K);
}

// q [B, T, H, K], raw [B, W, K], kv [B, T, K], comp [B, Cs, K] and cmask [B, T, C] (C <= Cs; with
// C == 0 neither is read), pos [B, T] int64 positions, sinks [H] -> o [B, T, H, K].
// A token at position p has (p + 1) / ratio compressed rows: the rows past that count are
// invisible to it, so they are not visited (C may be the state's whole capacity; shared memory
// is sized for C). Skipping them changes no bit: an invisible row adds exactly zero.
extern "C" __global__ void attend_sink_ring(const float* __restrict__ q, const float* __restrict__ raw,
                                            const float* __restrict__ kv, const float* __restrict__ comp,
                                            const unsigned char* __restrict__ cmask,
                                            const long long* __restrict__ pos, const float* __restrict__ sinks,
                                            float* __restrict__ o, int T, int H, int W, int C, int Cs, int K,
                                            double scale, int ratio) {
    const int h = blockIdx.x, t = blockIdx.y, b = blockIdx.z;
    const long long row = ((long long)b * T + t) * H + h;
    const long long p0 = pos[(long long)b * T], p = pos[(long long)b * T + t];
    const int r0 = (int)(((p0 % W) + W) % W);         // once here, not per row and element
    const long long seen = ratio > 0 ? (p + 1) / ratio : 0;
    const int n = (int)(seen < C ? seen : C);         // this token's compressed rows
    const RingRows rows{raw + (long long)b * W * K, kv + (long long)b * T * K, comp + (long long)b * Cs * K,
                        cmask + ((long long)b * T + t) * C, p0, p, W, T, K, r0};
    attend_rows(q + row * K, rows, W + T + n, K, (double)sinks[h], scale, o + row * K);
}
