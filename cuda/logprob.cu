// Token log-probs: forward (log-prob, entropy, saved logsumexp) and backward
// (dlogits, optionally over the logits buffer). Math: src/ops/logprob.rs.
//
// Forward: one block per (row, vocab slice), one pass over the slice with
// 16-byte loads folding values into per-thread online softmax states, a
// block reduction, then either the row's outputs (one slice) or a partial
// state that `logprob_merge` folds (several slices, when rows are too few
// to fill the GPU). The same partial/merge pair serves the fused linear
// op, whose vocab chunks are slices of a row it never stores.
// Backward: one read and one write per element, no reduction.
#include "common.cuh"

using namespace gk;

namespace {

constexpr int THREADS = 512;
constexpr int UNROLL = 4;

struct RowSpec {
    int64_t target;  // -1 when the row is skipped
    bool in_range;
};

template <typename I>
__device__ __forceinline__ RowSpec row_spec(const I* targets, const uint8_t* mask, int64_t row, int64_t vocab,
                                            int64_t ignore_index, int has_ignore) {
    const int64_t y = to_id(targets[row]);
    const bool active = (mask == nullptr || mask[row] != 0) && !(has_ignore && y == ignore_index);
    if (!active) return {-1, true};
    return {y, y >= 0 && y < vocab};
}

// Slice `split` of `splits` over [0, vocab), in whole 16-byte vectors.
template <typename T>
__device__ __forceinline__ void slice_bounds(int64_t vocab, int64_t splits, int64_t split, int64_t* begin,
                                             int64_t* end) {
    constexpr int N = VecOf<T>::N;
    const int64_t per = ((vocab + splits - 1) / splits + N - 1) / N * N;
    *begin = min(vocab, split * per);
    *end = min(vocab, *begin + per);
}

// Writes a row's outputs from its complete softmax state.
template <typename T>
__device__ __forceinline__ void finish_row(const T* row_logits, RowSpec spec, Softmax st, float inv_t, int64_t row,
                                           float* logp, float* entropy, float* lse, uint32_t* status) {
    if (spec.target < 0) {
        logp[row] = 0.f;
        lse[row] = 0.f;
        if (entropy) entropy[row] = 0.f;
        return;
    }
    if (!spec.in_range || !st.finite()) {
        raise(status, OP_LOGPROB, spec.in_range ? NON_FINITE : TOKEN_OUT_OF_RANGE, row);
        logp[row] = lse[row] = NAN;
        if (entropy) entropy[row] = NAN;
        return;
    }
    const float l = st.lse();
    lse[row] = l;
    logp[row] = to_float(row_logits[spec.target]) * inv_t - l;
    if (entropy) entropy[row] = st.entropy();
}

}  // namespace

// Base-2 online softmax state of one slice of one row: the block's threads
// sweep the slice, then reduce. Used by the forward here and by fused linear.
template <bool ENTROPY, typename T>
__device__ __forceinline__ Softmax slice_state(const T* row_logits, int64_t begin, int64_t end, float inv_t) {
    __shared__ Softmax scratch[32];
    Softmax st = Softmax::empty();
    for_each_in_row<T, UNROLL>(row_logits, begin, end, inv_t * LOG2E, -INFINITY,
                               [&](const float(&y)[VecOf<T>::N], int64_t, int) { st.add<ENTROPY>(y); });
    return block_reduce(st, MergeSoftmax{}, scratch);
}

// grid (rows, splits), THREADS threads.
template <typename T, typename I>
__device__ void logprob_fwd(const T* logits, const I* targets, const uint8_t* mask, int64_t vocab,
                            int64_t ignore_index, int has_ignore, float inv_t, int64_t splits, float* logp,
                            float* entropy, float* lse, Softmax* partials, uint32_t* status) {
    const int64_t row = blockIdx.x, split = blockIdx.y;
    const RowSpec spec = row_spec(targets, mask, row, vocab, ignore_index, has_ignore);
    const T* row_logits = logits + row * vocab;
    if (spec.target < 0 || !spec.in_range) {
        // Never read: the merge (or the lone slice) writes the outputs.
        if (splits == 1 && threadIdx.x == 0)
            finish_row(row_logits, spec, Softmax::empty(), inv_t, row, logp, entropy, lse, status);
        return;
    }
    int64_t begin, end;
    slice_bounds<T>(vocab, splits, split, &begin, &end);
    const Softmax st = entropy ? slice_state<true>(row_logits, begin, end, inv_t)
                               : slice_state<false>(row_logits, begin, end, inv_t);
    if (threadIdx.x != 0) return;
    if (splits == 1)
        finish_row(row_logits, spec, st, inv_t, row, logp, entropy, lse, status);
    else
        partials[row * splits + split] = st;
}

// One warp per row: folds the row's `splits` partial states. grid
// ceil(rows / 8), 256 threads.
template <typename T, typename I>
__device__ void logprob_merge(const T* logits, const I* targets, const uint8_t* mask, int64_t rows, int64_t vocab,
                              int64_t ignore_index, int has_ignore, float inv_t, int64_t splits,
                              const Softmax* partials, float* logp, float* entropy, float* lse, uint32_t* status) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const RowSpec spec = row_spec(targets, mask, row, vocab, ignore_index, has_ignore);
    Softmax st = Softmax::empty();
    if (spec.target >= 0 && spec.in_range)
        for (int64_t k = lane; k < splits; k += 32) st = st.merge(partials[row * splits + k]);
    st = warp_reduce(st, MergeSoftmax{});
    if (lane == 0) finish_row(logits + row * vocab, spec, st, inv_t, row, logp, entropy, lse, status);
}

// dz_j = (p_j (c - g_H l_j) + g 1[j = y]) / T with c = g_L - g - g_H H and
// l_j = log p_j = z_j / T - lse (no large terms cancel; see the CPU docs).
// In base 2: t_j = l_j log2(e) = z_j k - lse log2(e), k = log2(e) / T, p_j = 2^t_j.
// grid (rows, splits), THREADS threads. `dlogits` may equal `logits`.
template <typename T, typename I>
__device__ void logprob_bwd(const T* logits, T* dlogits, const I* targets, const uint8_t* mask, int64_t vocab,
                            int64_t ignore_index, int has_ignore, float inv_t, int64_t splits, const float* lse,
                            const float* entropy, const float* grad_logp, const float* grad_entropy,
                            const float* grad_lse, uint32_t* status) {
    const int64_t row = blockIdx.x, split = blockIdx.y;
    const RowSpec spec = row_spec(targets, mask, row, vocab, ignore_index, has_ignore);
    int64_t begin, end;
    slice_bounds<T>(vocab, splits, split, &begin, &end);
    const T* x = logits + row * vocab;
    T* dx = dlogits + row * vocab;
    if (spec.target < 0 || !spec.in_range) {
        if (!spec.in_range && split == 0 && threadIdx.x == 0) raise(status, OP_LOGPROB, TOKEN_OUT_OF_RANGE, row);
        const float fill = spec.in_range ? 0.f : NAN;
        map_row(x, dx, begin, end, 1.f, [=](float, int64_t) { return fill; });
        return;
    }
    const float g = grad_logp[row], g_h = grad_entropy ? grad_entropy[row] : 0.f;
    const float h = grad_entropy ? entropy[row] : 0.f;
    const float lse2 = lse[row] * LOG2E;
    // d = p (c - g_H ln2 t) / T, folded: p (c' - g' t).
    const float c = ((grad_lse ? grad_lse[row] : 0.f) - g - g_h * h) * inv_t;
    const float g_t = g_h * LN2 * inv_t, g_y = g * inv_t;
    const int64_t y = spec.target;
    map_row(x, dx, begin, end, inv_t * LOG2E, [=](float v, int64_t j) {
        const float t = v - lse2, p = exp2_approx(t);
        const float d = p > 0.f ? p * (c - g_t * t) : 0.f;  // p = 0 where v = -inf
        return j == y ? d + g_y : d;
    });
}

#define GK_LOGPROB_KERNELS(T, TN, I, IN)                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        logprob_fwd_##TN##_##IN(const T* logits, const I* targets, const uint8_t* mask, int64_t vocab,         \
                                int64_t ignore_index, int has_ignore, float inv_t, int64_t splits, float* logp, \
                                float* entropy, float* lse, Softmax* partials, uint32_t* status) {             \
        logprob_fwd<T, I>(logits, targets, mask, vocab, ignore_index, has_ignore, inv_t, splits, logp, entropy, \
                          lse, partials, status);                                                              \
    }                                                                                                          \
    extern "C" __global__ void logprob_merge_##TN##_##IN(                                                      \
        const T* logits, const I* targets, const uint8_t* mask, int64_t rows, int64_t vocab,                   \
        int64_t ignore_index, int has_ignore, float inv_t, int64_t splits, const Softmax* partials,            \
        float* logp, float* entropy, float* lse, uint32_t* status) {                                           \
        logprob_merge<T, I>(logits, targets, mask, rows, vocab, ignore_index, has_ignore, inv_t, splits,       \
                            partials, logp, entropy, lse, status);                                             \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS) logprob_bwd_##TN##_##IN(                             \
        const T* logits, T* dlogits, const I* targets, const uint8_t* mask, int64_t vocab,                     \
        int64_t ignore_index, int has_ignore, float inv_t, int64_t splits, const float* lse,                   \
        const float* entropy, const float* grad_logp, const float* grad_entropy, const float* grad_lse,        \
        uint32_t* status) {                                                                                    \
        logprob_bwd<T, I>(logits, dlogits, targets, mask, vocab, ignore_index, has_ignore, inv_t, splits, lse, \
                          entropy, grad_logp, grad_entropy, grad_lse, status);                                 \
    }

GK_FOR_EACH_FLOAT_ID(GK_LOGPROB_KERNELS)
