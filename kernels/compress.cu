// The compressor's pooling (ds4-spec 3.3, "compressor"): for each window that completes, softmax
// over its candidate rows of the scores, per dim, and the score-weighted sum of the kv rows.
// Candidates are read in place from the ring (positions before this call, row = pos % L) and
// the call's new rows, so no timeline is gathered. Ratio 4 pools 8 candidates per dim: the
// previous window's first half (columns [0, width)), masked out for the first window, and the
// current window's second half (columns [width, 2 width)); other ratios pool the current window.
// float32 throughout, sums in candidate order, as the NumPy reference reduces that axis.
#include "common.cuh"

__device__ __forceinline__ void cp_candidate(int r, int ratio, int width, int d, long long pe, bool first,
                                             long long* p, int* col, bool* masked) {
    if (ratio == 4) {
#ifdef DS4_FAULT_COMPRESSOR_OVERLAP
        if (r < 4) { *p = pe - 7 + r; *col = d; *masked = true; }   // injected fault (faults.py)
#else
        if (r < 4) { *p = pe - 7 + r; *col = d; *masked = first; }
#endif
        else { *p = pe - 3 + (r - 4); *col = width + d; *masked = false; }
    } else {
        *p = pe - ratio + 1 + r; *col = d; *masked = false;
    }
}

// Where candidate r's value sits: the call's new rows (fresh) or the ring; its offset there.
__device__ __forceinline__ long long cp_where(int r, int ratio, int width, int d, long long pe, bool first,
                                              long long b, long long p0, int L, int T, int w,
                                              bool* fresh, bool* masked) {
    long long p; int c;
    cp_candidate(r, ratio, width, d, pe, first, &p, &c, masked);
    *fresh = p >= p0;
    return *fresh ? (b * T + (p - p0)) * w + c : (b * L + ((p % L) + L) % L) * w + c;
}

// ring_k/ring_s [B, L, w], ck/cs [B, T, w], window ends (eb[e], et[e]), pos0[b] = the call's first
// position -> out [nE, width]. grid (ceil(width/128), nE), block 128.
extern "C" __global__ void compress_pool(const float* __restrict__ ring_k, const float* __restrict__ ring_s,
                                         const float* __restrict__ ck, const float* __restrict__ cs,
                                         const long long* __restrict__ eb, const long long* __restrict__ et,
                                         const long long* __restrict__ pos0, float* __restrict__ out,
                                         int L, int T, int w, int ratio, int width) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x, e = blockIdx.y;
    if (d >= width) return;
    const long long b = eb[e], p0 = pos0[b], pe = p0 + et[e];
    const bool first = pe + 1 - ratio == 0;
    const int R = ratio == 4 ? 8 : ratio;
    const float ninf = __int_as_float(0xff800000);
    float mx = ninf;
    bool fresh, masked;
    for (int r = 0; r < R; ++r) {
        const long long off = cp_where(r, ratio, width, d, pe, first, b, p0, L, T, w, &fresh, &masked);
        if (!masked) mx = fmaxf(mx, (fresh ? cs : ring_s)[off]);
    }
    float sum = 0.0f;
    for (int r = 0; r < R; ++r) {
        const long long off = cp_where(r, ratio, width, d, pe, first, b, p0, L, T, w, &fresh, &masked);
        if (!masked) sum = __fadd_rn(sum, expf(__fsub_rn((fresh ? cs : ring_s)[off], mx)));
    }
    float acc = 0.0f;
    for (int r = 0; r < R; ++r) {
        const long long off = cp_where(r, ratio, width, d, pe, first, b, p0, L, T, w, &fresh, &masked);
        if (masked) continue;
        const float sv = (fresh ? cs : ring_s)[off], k = (fresh ? ck : ring_k)[off];
        acc = __fadd_rn(acc, __fmul_rn(__fdiv_rn(expf(__fsub_rn(sv, mx)), sum), k));
    }
    out[(long long)e * width + d] = acc;
}
