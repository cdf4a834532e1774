// Token log-probs: forward (log-prob, entropy, saved logsumexp) and backward
// (dlogits, optionally over the logits buffer). Math: src/ops/logprob.rs;
// the row math shared with fused linear is in logprob.cuh.
//
// Forward: one block per (row, vocab slice), one pass over the slice with
// 16-byte loads folding values into per-thread online softmax states, a
// block reduction, then either the row's outputs (one slice) or a partial
// state that `logprob_merge` folds (several slices, when rows are too few
// to fill the GPU). Backward: one read and one write per element.
#include "logprob.cuh"

using namespace gk;

namespace {

// grid (rows, splits), LOGPROB_THREADS threads.
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
            finish_row(spec, Softmax::empty(), 0.f, inv_t, row, logp, entropy, lse, status, OP_LOGPROB);
        return;
    }
    int64_t begin, end;
    slice_bounds<T>(vocab, splits, split, &begin, &end);
    const Softmax st = entropy ? slice_state<true>(row_logits, begin, end, inv_t)
                               : slice_state<false>(row_logits, begin, end, inv_t);
    if (threadIdx.x != 0) return;
    if (splits == 1)
        finish_row(spec, st, to_float(row_logits[spec.target]), inv_t, row, logp, entropy, lse, status, OP_LOGPROB);
    else
        partials[row * splits + split] = st;
}

// grid (rows, splits), LOGPROB_THREADS threads. `dlogits` may equal `logits`.
// A live row with a non-finite saved value or upstream gradient, or whose
// gradient could overflow T, raises NON_FINITE and gets NaN.
template <typename T, typename I>
__device__ void logprob_bwd(const T* logits, T* dlogits, const I* targets, const uint8_t* mask, int64_t vocab,
                            int64_t ignore_index, int has_ignore, float inv_t, int64_t splits, const float* lse,
                            const float* entropy, const float* grad_logp, const float* grad_entropy,
                            const float* grad_lse, uint32_t* status) {
    const int64_t row = blockIdx.x, split = blockIdx.y;
    const RowSpec spec = row_spec(targets, mask, row, vocab, ignore_index, has_ignore);
    const bool first = split == 0 && threadIdx.x == 0;
    if (!spec.in_range && first) raise(status, OP_LOGPROB, TOKEN_OUT_OF_RANGE, row);
    int64_t begin, end;
    slice_bounds<T>(vocab, splits, split, &begin, &end);
    const bool live = spec.target >= 0 && spec.in_range;
    const float l = live ? lse[row] : 0.f, h = live && grad_entropy ? entropy[row] : 0.f;
    const float g = live ? grad_logp[row] : 0.f, g_h = live && grad_entropy ? grad_entropy[row] : 0.f;
    const float g_l = live && grad_lse ? grad_lse[row] : 0.f;
    const bool bad = live && !backward_row_ok<T>(inv_t, l, h, g, g_h, g_l);
    if (bad && first) raise(status, OP_LOGPROB, NON_FINITE, row);
    backward_slice(logits + row * vocab, dlogits + row * vocab, spec, bad, 0, begin, end, inv_t, l, h, g, g_h, g_l);
}

}  // namespace

#define GK_LOGPROB_KERNELS(T, TN, I, IN)                                                                       \
    extern "C" __global__ void __launch_bounds__(LOGPROB_THREADS)                                              \
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
        merge_rows<T, I>(logits, nullptr, targets, mask, rows, vocab, ignore_index, has_ignore, inv_t, splits, \
                         partials, logp, entropy, lse, status, OP_LOGPROB);                                    \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(LOGPROB_THREADS) logprob_bwd_##TN##_##IN(                     \
        const T* logits, T* dlogits, const I* targets, const uint8_t* mask, int64_t vocab,                     \
        int64_t ignore_index, int has_ignore, float inv_t, int64_t splits, const float* lse,                   \
        const float* entropy, const float* grad_logp, const float* grad_entropy, const float* grad_lse,        \
        uint32_t* status) {                                                                                    \
        logprob_bwd<T, I>(logits, dlogits, targets, mask, vocab, ignore_index, has_ignore, inv_t, splits, lse, \
                          entropy, grad_logp, grad_entropy, grad_lse, status);                                 \
    }

GK_FOR_EACH_FLOAT_ID(GK_LOGPROB_KERNELS)
