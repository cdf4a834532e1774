// Token log-prob row math on the GPU, shared by the plain op (logprob.cu)
// and the fused linear op (fused_linear.cu, whose vocab chunks are slices
// of rows it never stores). Math: src/ops/logprob.rs.
#pragma once

#include "common.cuh"

namespace gk {

constexpr int LOGPROB_UNROLL = 4;

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

// Slice `split` of `splits` over [0, vocab), in whole 16-byte vectors of T.
template <typename T>
__device__ __forceinline__ void slice_bounds(int64_t vocab, int64_t splits, int64_t split, int64_t* begin,
                                             int64_t* end) {
    constexpr int N = VecOf<T>::N;
    const int64_t per = ((vocab + splits - 1) / splits + N - 1) / N * N;
    *begin = min(vocab, split * per);
    *end = min(vocab, *begin + per);
}

// Writes a row's outputs from its complete state and its target's logit. A
// target log-prob that is not finite (a -inf target logit, or one more than
// f32's range below the lse) raises NON_FINITE and is NaN.
__device__ __forceinline__ void finish_row(RowSpec spec, Softmax st, float target_logit, float inv_t, int64_t row,
                                           float* logp, float* entropy, float* lse, uint32_t* status, OpId op) {
    if (spec.target < 0) {
        logp[row] = 0.f;
        lse[row] = 0.f;
        if (entropy) entropy[row] = 0.f;
        return;
    }
    if (!spec.in_range || !st.finite()) {
        raise(status, op, spec.in_range ? NON_FINITE : TOKEN_OUT_OF_RANGE, row);
        logp[row] = lse[row] = NAN;
        if (entropy) entropy[row] = NAN;
        return;
    }
    const float l = st.lse();
    const float lp = target_logit * inv_t - l;
    if (!isfinite(lp)) raise(status, op, NON_FINITE, row);
    lse[row] = l;
    logp[row] = isfinite(lp) ? lp : NAN;
    if (entropy) entropy[row] = st.entropy();
}

// Base-2 online softmax state of one slice of one row: the block's threads
// sweep the slice, then reduce.
template <bool ENTROPY, typename T>
__device__ __forceinline__ Softmax slice_state(const T* row_logits, int64_t begin, int64_t end, float inv_t) {
    __shared__ Softmax scratch[32];
    Softmax st = Softmax::empty();
    for_each_in_row<T, LOGPROB_UNROLL>(row_logits, begin, end, inv_t * LOG2E, -INFINITY,
                                       [&](const float(&y)[VecOf<T>::N], int64_t, int) { st.add<ENTROPY>(y); });
    return block_reduce(st, MergeSoftmax{}, scratch);
}

// One warp per row folds the row's `splits` partial states and finishes the
// row. The target logit comes from `target_logits[row]` when given (fused
// linear), else from the logits. grid ceil(rows / 8), 256 threads.
template <typename T, typename I>
__device__ __forceinline__ void merge_rows(const T* logits, const float* target_logits, const I* targets,
                                           const uint8_t* mask, int64_t rows, int64_t vocab, int64_t ignore_index,
                                           int has_ignore, float inv_t, int64_t splits, const Softmax* partials,
                                           float* logp, float* entropy, float* lse, uint32_t* status, OpId op) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const RowSpec spec = row_spec(targets, mask, row, vocab, ignore_index, has_ignore);
    const bool live = spec.target >= 0 && spec.in_range;
    Softmax st = Softmax::empty();
    if (live)
        for (int64_t k = lane; k < splits; k += 32) st = st.merge(partials[row * splits + k]);
    st = warp_reduce(st, MergeSoftmax{});
    if (lane != 0) return;
    const float zy = !live ? 0.f : target_logits ? target_logits[row] : to_float(logits[row * vocab + spec.target]);
    finish_row(spec, st, zy, inv_t, row, logp, entropy, lse, status, op);
}

// Whether a live row's backward may run: its saved values and upstream
// gradients are finite, and its gradient's bound (src/ops/logprob.rs:
// |dz_j| <= (|c| + 87.4 |g_H| + |g|) / T) fits Tout, and its intermediate
// c - g_H log p fits f32. In double, as the CPU checks it.
template <typename Tout>
__device__ __forceinline__ bool backward_row_ok(float inv_t, float lse, float entropy, float g, float g_h, float g_l) {
    if (!isfinite(lse) || !isfinite(entropy) || !isfinite(g) || !isfinite(g_h) || !isfinite(g_l)) return false;
    const float c = g_l - g - g_h * entropy;
    const double inner = fabs((double)c) + 87.4 * fabs((double)g_h);
    const double bound = (inner + fabs((double)g)) * (double)inv_t, margin = 1.0 + 1e-5;
    return isfinite(c) && inner * margin <= 3.4028234663852886e38 && bound * margin <= (double)max_finite<Tout>();
}

// Backward over one slice of one row (of `vocab` columns, starting at
// column `col0` of a row of `full_vocab`):
// dz_j = (p_j (c - g_H l_j) + g 1[j = y]) / T with c = g_L - g - g_H H and
// l_j = log p_j = z_j / T - lse (no large terms cancel; see the CPU docs).
// In base 2: t_j = l_j log2(e) = z_j k - lse log2(e), k = log2(e) / T,
// taken as at most 0 (so p_j <= 1 whatever lse is passed). A row that is
// out of range or failed backward_row_ok (`bad`) gets NaN.
// `x` and `dx` may alias when Tin == Tout (in place).
template <typename Tin, typename Tout>
__device__ __forceinline__ void backward_slice(const Tin* x, Tout* dx, RowSpec spec, bool bad, int64_t col0,
                                               int64_t begin, int64_t end, float inv_t, float lse, float entropy,
                                               float g, float g_h, float g_l) {
    if (spec.target < 0 || !spec.in_range || bad) {
        const float fill = spec.in_range && !bad ? 0.f : NAN;
        map_row(x, dx, begin, end, 1.f, [=](float, int64_t) { return fill; });
        return;
    }
    const float lse2 = lse * LOG2E;
    // d = p (c - g_H ln2 t) / T, folded into p (c' - g' t).
    const float c = (g_l - g - g_h * entropy) * inv_t;
    const float g_t = g_h * LN2 * inv_t, g_y = g * inv_t;
    const int64_t y = spec.target - col0;
    map_row(x, dx, begin, end, inv_t * LOG2E, [=](float v, int64_t j) {
        const float t = fminf(v - lse2, 0.f), p = exp2_approx(t);
        const float d = p > 0.f ? p * (c - g_t * t) : 0.f;  // p = 0 where v = -inf
        return j == y ? d + g_y : d;
    });
}

}  // namespace gk
