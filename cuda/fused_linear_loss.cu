// The fused LM-head + GRPO loss (math: src/ops/fused_linear_loss.rs): the
// kernels that run between cuBLAS GEMMs (host loops:
// src/cuda/fused_linear_loss.rs). Per row chunk the host keeps the chunk's
// [rows, V] f32 logits, stored as one [rows, cols] block per vocab chunk:
// GEMM 1 writes each block and `fll_tile_fwd` folds it into per-row softmax
// partials; `fll_rows` merges them, finishes each row's log-prob and its
// token loss (policy_loss.cuh's token_loss, the policy loss kernels' own)
// and leaves dL/dlogp in `coef`; `fll_tile_dz` turns each block into dz (in
// the GEMM dtype) for GEMMs 2 and 3. Three GEMMs per tile, not four.
// Sequence counts come first (`fll_counts`, `fll_total`): every token's
// aggregation weight is known before the pass; `fll_summary` folds the
// per-row statistics in row order (deterministic).
#include "logprob.cuh"
#include "policy_loss.cuh"

using namespace gk;

namespace {

constexpr int THREADS = FUSED_LOSS_THREADS;

// The row parameters, the per-row statistics (a policy loss partial per
// row, folded by CombinePartial), the aggregation and the summary's order:
// abi.h.
using RowParams = FusedLossRowParams;
using RowStats = PolicyLossPartial;

__device__ __forceinline__ float token_weight(const RowParams& p, int64_t s) {
    const float seqs = (float)p.seqs;
    switch (p.aggregation) {
        case TOKEN_MEAN: return 1.f / (p.agg_constant > 0.f ? p.agg_constant : fmaxf(p.total[0], 1.f));
        case SEQ_MEAN_TOKEN_MEAN: return 1.f / (seqs * fmaxf(p.counts[s], 1.f));
        case SEQ_MEAN_TOKEN_SUM: return 1.f / seqs;
        default: return 1.f / (seqs * p.agg_constant);
    }
}

template <typename I>
__device__ void counts(const I* targets, const uint8_t* mask, int64_t ignore_index, int has_ignore,
                       const uint32_t* cu_seqlens, int64_t seq_len, int64_t seqs, int64_t rows, float* counts,
                       int32_t* seq_of, uint32_t* status) {
    __shared__ float scratch[THREADS / 32];
    const int64_t s = blockIdx.x;
    int64_t begin, end;
    seq_range(cu_seqlens, seq_len, seqs, rows, s, OP_FUSED_LINEAR_LOSS, &begin, &end, status);
    float n = 0.f;
    for (int64_t t = begin + threadIdx.x; t < end; t += THREADS) {
        seq_of[t] = (int32_t)s;
        n += row_spec(targets, mask, t, INT64_MAX, ignore_index, has_ignore).target >= 0 ? 1.f : 0.f;
    }
    n = block_reduce(n, Sum{}, scratch);
    if (threadIdx.x == 0) counts[s] = n;
}

// One row's softmax state over its block of the chunk's logits.
template <typename I>
__device__ void tile_fwd(const float* tile, int64_t cols, int64_t col0, int64_t vocab, int64_t row0,
                         const I* targets, const uint8_t* mask, int64_t ignore_index, int has_ignore, float inv_t,
                         int entropy, int64_t chunk, int64_t chunks, Softmax* partials, float* target_logits) {
    const int64_t row = row0 + blockIdx.x;
    const RowSpec spec = row_spec(targets, mask, row, vocab, ignore_index, has_ignore);
    if (spec.target < 0 || !spec.in_range) return;  // fll_rows reports and fills these rows
    const float* x = tile + blockIdx.x * cols;
    const Softmax st = entropy ? slice_state<true>(x, 0, cols, inv_t) : slice_state<false>(x, 0, cols, inv_t);
    if (threadIdx.x != 0) return;
    partials[blockIdx.x * chunks + chunk] = st;
    const int64_t y = spec.target - col0;
    if (y >= 0 && y < cols) target_logits[row] = x[y];
}

// One warp per row of the chunk [row0, row0 + n): the row's log-prob (as
// the fused linear forward finishes it), its token loss and dL/dlogp =
// w dl/dlogp into coef[row]; NaN coef for a bad row (raised once).
template <typename I>
__device__ void rows_loss(const RowParams p, const float* target_logits, const I* targets, const uint8_t* mask,
                          int64_t ignore_index, int has_ignore, int64_t row0, int64_t n, int64_t chunks,
                          const Softmax* partials, float* logp, float* entropy, float* lse, float* per_token,
                          float* coef, RowStats* stats, uint32_t* status) {
    const int64_t local = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (local >= n) return;
    const int64_t row = row0 + local;
    const RowSpec spec = row_spec(targets, mask, row, p.vocab, ignore_index, has_ignore);
    const bool live = spec.target >= 0 && spec.in_range;
    Softmax st = Softmax::empty();
    if (live)
        for (int64_t k = lane; k < chunks; k += 32) st = st.merge(partials[local * chunks + k]);
    st = warp_reduce(st, MergeSoftmax{});
    if (lane != 0) return;
    finish_row(spec, st, live ? target_logits[row] : 0.f, p.inv_t, row, logp, entropy, lse, status,
               OP_FUSED_LINEAR_LOSS);
    RowStats out = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, -INFINITY, 0.f};
    if (spec.target < 0) {
        per_token[row] = 0.f;
        coef[row] = 0.f;
        stats[row] = out;
        return;
    }
    const float lp = logp[row];
    const int32_t s = p.seq_of[row];
    const float adv = p.adv_tok ? p.adv_tok[row] : p.adv_seq[s];
    const float lr = p.old_logp ? lp - p.old_logp[row] : 0.f;
    const bool has_ref = p.ref_logp != nullptr;
    const float ref = has_ref ? p.ref_logp[row] : 0.f;
    bool bad = !isfinite(lp) || !isfinite(lr) || !isfinite(adv) || (has_ref && !isfinite(ref));
    const TokenParams tp = {p.eps_low, p.eps_high, p.dual_clip, p.log_ratio_clamp, p.beta, p.kl_kind};
    const TokenTerms k = token_loss(tp, {lr, adv, ref - lp, lp, 1.f, 0.f}, has_ref);
    const float w = token_weight(p, s), g = w * k.dloss_dlogp;
    // |dz_j| <= 2 |g| / T must fit f32 (the tile's type) and T (dz's).
    bad = bad || !isfinite(k.loss) || !isfinite(k.kl) || !isfinite(k.ratio) || !isfinite(g) ||
          2.0 * fabs((double)g) * (double)p.inv_t * (1.0 + 1e-5) > 3.4028234663852886e38;
    if (bad && spec.in_range && isfinite(lp)) raise(status, OP_FUSED_LINEAR_LOSS, NON_FINITE, row);
    per_token[row] = bad ? NAN : k.loss;
    coef[row] = bad ? NAN : g;
    out = {bad ? NAN : w * k.loss, 1.f, (float)k.clip_low, (float)k.clip_high, (float)k.dual, k.ratio, k.ratio, k.kl};
    stats[row] = out;
}

// dz for one row's block of the chunk's logits, into the GEMM dtype:
// dz_j = g (1[j = y] - p_j) / T (logprob.cuh's backward_slice with only a
// log-prob gradient); zero for skipped rows, NaN for bad ones.
template <typename T, typename I>
__device__ void tile_dz(const float* tile, T* dtile, int64_t cols, int64_t col0, int64_t vocab, int64_t row0,
                        const I* targets, const uint8_t* mask, int64_t ignore_index, int has_ignore, float inv_t,
                        const float* lse, const float* coef) {
    const int64_t row = row0 + blockIdx.x;
    const RowSpec spec = row_spec(targets, mask, row, vocab, ignore_index, has_ignore);
    const bool live = spec.target >= 0 && spec.in_range;
    const float l = live ? lse[row] : 0.f, g = live ? coef[row] : 0.f;
    const bool bad = live && (!isfinite(l) || !isfinite(g));
    const int64_t local = blockIdx.x;
    backward_slice(tile + local * cols, dtile + local * cols, spec, bad, col0, 0, cols, inv_t, l, 0.f, g, 0.f, 0.f);
}

}  // namespace

// grid 1, THREADS threads: total[0] = sum of counts, in a fixed order.
extern "C" __global__ void __launch_bounds__(THREADS) fll_total(const float* counts, int64_t seqs, float* total) {
    __shared__ float scratch[THREADS / 32];
    float n = 0.f;
    for (int64_t s = threadIdx.x; s < seqs; s += THREADS) n += counts[s];
    n = block_reduce(n, Sum{}, scratch);
    if (threadIdx.x == 0) total[0] = n;
}

// grid 1, THREADS threads: the loss and statistics from the per-row
// statistics, folded in row order per thread, then in thread order.
extern "C" __global__ void __launch_bounds__(THREADS)
    fll_summary(const RowStats* stats, int64_t rows, const float* total, float* summary, uint32_t* status) {
    __shared__ RowStats scratch[THREADS / 32];
    RowStats acc = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, -INFINITY, 0.f};
    for (int64_t r = threadIdx.x; r < rows; r += THREADS) acc = CombinePartial{}(acc, stats[r]);
    acc = block_reduce(acc, CombinePartial{}, scratch);
    if (threadIdx.x != 0) return;
    const float m = total[0], per = m > 0.f ? 1.f / m : 0.f;
    // Finite token losses whose sum overflows (a bad row already raised makes it NaN).
    if (isinf(acc.loss)) raise(status, OP_FUSED_LINEAR_LOSS, NON_FINITE, 0);
    summary[LOSS] = acc.loss;
    summary[CLIP_LOW] = acc.clip_low * per;
    summary[CLIP_HIGH] = acc.clip_high * per;
    summary[DUAL_CLIP] = acc.dual * per;
    summary[RATIO_MEAN] = acc.ratio_sum * per;
    summary[RATIO_MAX] = m > 0.f ? acc.ratio_max : 0.f;
    summary[KL_MEAN] = acc.kl_sum * per;
    summary[TOKENS] = m;
    // Sequence-level statistics are not computed by the fused loss.
    for (int i = TOKENS + 1; i < SUMMARY_LEN; ++i) summary[i] = 0.f;
}

// fll_counts: grid (seqs), THREADS threads. fll_tile_fwd: grid (chunk rows),
// LOGPROB_THREADS. fll_rows: a warp a row, any number of whole warps a block
// (the host launches 8), blocks covering the chunk's rows.
#define GK_FLL_ID_KERNELS(I, IN)                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS) fll_counts_##IN(                                     \
        const I* targets, const uint8_t* mask, int64_t ignore_index, int has_ignore, const uint32_t* cu_seqlens, \
        int64_t seq_len, int64_t seqs, int64_t rows, float* counts_out, int32_t* seq_of, uint32_t* status) {   \
        counts<I>(targets, mask, ignore_index, has_ignore, cu_seqlens, seq_len, seqs, rows, counts_out, seq_of, \
                  status);                                                                                     \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(LOGPROB_THREADS) fll_tile_fwd_##IN(                           \
        const float* tile, int64_t cols, int64_t col0, int64_t vocab, int64_t row0, const I* targets,          \
        const uint8_t* mask, int64_t ignore_index, int has_ignore, float inv_t, int entropy, int64_t chunk,    \
        int64_t chunks, Softmax* partials, float* target_logits) {                                             \
        tile_fwd<I>(tile, cols, col0, vocab, row0, targets, mask, ignore_index, has_ignore, inv_t, entropy,    \
                    chunk, chunks, partials, target_logits);                                                   \
    }                                                                                                          \
    extern "C" __global__ void fll_rows_##IN(const RowParams p, const float* target_logits, const I* targets,  \
                                             const uint8_t* mask, int64_t ignore_index, int has_ignore,        \
                                             int64_t row0, int64_t n, int64_t chunks, const Softmax* partials, \
                                             float* logp, float* entropy, float* lse, float* per_token,        \
                                             float* coef, RowStats* stats, uint32_t* status) {                 \
        rows_loss<I>(p, target_logits, targets, mask, ignore_index, has_ignore, row0, n, chunks, partials,     \
                     logp, entropy, lse, per_token, coef, stats, status);                                      \
    }

// grid (chunk rows), LOGPROB_THREADS.
#define GK_FLL_DZ_KERNEL(T, TN, I, IN)                                                                         \
    extern "C" __global__ void __launch_bounds__(LOGPROB_THREADS) fll_tile_dz_##TN##_##IN(                     \
        const float* tile, T* dtile, int64_t cols, int64_t col0, int64_t vocab, int64_t row0, const I* targets, \
        const uint8_t* mask, int64_t ignore_index, int has_ignore, float inv_t, const float* lse,              \
        const float* coef) {                                                                                   \
        tile_dz<T, I>(tile, dtile, cols, col0, vocab, row0, targets, mask, ignore_index, has_ignore, inv_t,    \
                      lse, coef);                                                                              \
    }

// A non-finite element of a finished gradient (dz W and dz^T h can
// overflow where dz does not) raises NON_FINITE with its index, unless a
// row already raised (its NaN would be reported again at another index).
#define GK_FLL_FLOAT_KERNELS(T, TN)                                                                            \
    extern "C" __global__ void fll_check_finite_##TN(const T* x, int64_t n, uint32_t* status) {                \
        if (status[0] & (0xFu << (4u * OP_FUSED_LINEAR_LOSS))) return;                                         \
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) \
            if (!isfinite(to_float(x[i]))) raise(status, OP_FUSED_LINEAR_LOSS, NON_FINITE, i);                 \
    }

GK_FOR_EACH_FLOAT(GK_FLL_FLOAT_KERNELS)
GK_FLL_ID_KERNELS(uint32_t, u32)
GK_FLL_ID_KERNELS(int32_t, i32)
GK_FLL_ID_KERNELS(int64_t, i64)
GK_FOR_EACH_FLOAT_ID(GK_FLL_DZ_KERNEL)
