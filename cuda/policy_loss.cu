// Clipped policy loss with KL and aggregation (math: src/ops/policy_loss.rs).
//
// Forward: one block per sequence computes its tokens' losses and its
// partial sums; the last block to finish (a wrapping atomic ticket) folds
// the partials in sequence order into the summary: one launch, and
// deterministic, since no float is ever accumulated in a racy order.
// Backward: one block per sequence; the loss gradient is read from device
// memory, so an autograd backward never waits for the host.
#include "common.cuh"
#include "policy_loss.cuh"

using namespace gk;

namespace {

constexpr int THREADS = POLICY_LOSS_THREADS;

// The kernels' parameters and per-sequence sums, and the summary's order
// (`Summary`): abi.h; the sums' fold (`CombinePartial`): policy_loss.cuh.
using Params = PolicyLossParams;
using Partial = PolicyLossPartial;

__device__ __forceinline__ bool active(const Params& p, int64_t t) { return !p.mask || p.mask[t] != 0; }

__device__ __forceinline__ float log_ratio(const Params& p, int64_t t) {
    return p.old_logp ? p.logp[t] - p.old_logp[t] : 0.f;
}

struct CountSum {
    float count, lr_sum;
    __device__ __forceinline__ CountSum operator+(const CountSum& o) const { return {count + o.count, lr_sum + o.lr_sum}; }
};

// A sequence's values of the loss: its masked token count, and its
// log-ratio sum where the loss needs one (the raw sum for sequence-level
// importance sampling, GSPO; VESPO's sum of tokens clamped to +-20).
// Every thread gets both.
__device__ __forceinline__ CountSum seq_totals(const Params& p, int64_t begin, int64_t end) {
    __shared__ CountSum scratch[THREADS / 32];
    const bool vespo = p.objective == OBJ_VESPO;
    CountSum acc = {0.f, 0.f};
    for (int64_t t = begin + threadIdx.x; t < end; t += THREADS) {
        if (!active(p, t)) continue;
        const float lr = log_ratio(p, t);
        const float term = p.seq_level ? lr : vespo ? fminf(fmaxf(lr, -VESPO_TOKEN_CLAMP), VESPO_TOKEN_CLAMP) : 0.f;
        acc = acc + CountSum{1.f, term};
    }
    return block_reduce(acc, Sum{}, scratch);
}

// The sequence-level inputs of its tokens' losses: (mean log-ratio, VESPO's log w).
struct SeqInputs {
    float lr, log_w;
};

__device__ __forceinline__ SeqInputs seq_inputs(const CountSum& totals) {
    return {totals.lr_sum / fmaxf(totals.count, 1.f),
            fminf(fmaxf(totals.lr_sum, VESPO_LOG_W_MIN), VESPO_TOKEN_CLAMP)};
}

__device__ __forceinline__ TokenTerms token_terms(const Params& p, int64_t t, float adv, SeqInputs seq, bool* bad) {
    const float logp = p.logp[t];
    const float lr = p.seq_level ? seq.lr : log_ratio(p, t);
    const float pw = p.pg_weights ? p.pg_weights[t] : 1.f;
    *bad = !isfinite(logp) || !isfinite(lr) || !isfinite(adv) || !isfinite(pw) || pw < 0.f;  // a negative weight reads as bad data too
    const bool has_ref = p.ref_logp != nullptr;
    const float ref = has_ref ? p.ref_logp[t] : 0.f;
    *bad = *bad || (has_ref && !isfinite(ref));
    const TokenParams tp = {p.eps_low,  p.eps_high,  p.dual_clip, p.log_ratio_clamp, p.beta,
                            p.kl_kind,  p.objective, p.delta,     p.obj_a,           p.obj_b,
                            p.obj_c,    p.obj_d,     p.kl_bias_correction != 0};
    return token_loss(tp, {lr, adv, ref - logp, logp, pw, seq.log_w}, has_ref);
}

// The sequence-level statistics and divisor, folded over sequences by the
// last block: non-empty sequences, the sums of their clip fractions, the
// smallest low and the largest high fraction.
struct SeqStats {
    float nonempty, low_sum, high_sum, low_min, high_max;
};

struct CombineSeqStats {
    __device__ __forceinline__ SeqStats operator()(const SeqStats& a, const SeqStats& b) const {
        return {a.nonempty + b.nonempty, a.low_sum + b.low_sum, a.high_sum + b.high_sum, fminf(a.low_min, b.low_min),
                fmaxf(a.high_max, b.high_max)};
    }
};

// `S` of the SeqMean aggregations.
__device__ __forceinline__ float seq_divisor(const Params& p, float nonempty) {
    return p.exclude_empty_seqs ? fmaxf(nonempty, 1.f) : (float)p.seqs;
}

__device__ __forceinline__ float advantage(const Params& p, int64_t s, int64_t t) {
    return p.adv_tok ? p.adv_tok[t] : p.adv_seq[s];
}

}  // namespace

// grid (seqs), THREADS threads. `partials` holds [seqs] Partial; `ticket`
// a u32 that is 0 between launches.
extern "C" __global__ void __launch_bounds__(THREADS)
    policy_loss_fwd(const Params p, float* per_token, Partial* partials, float* summary, uint32_t* ticket,
                    uint32_t* status) {
    __shared__ Partial scratch[THREADS / 32];
    __shared__ bool is_last;
    const int64_t s = blockIdx.x;
    int64_t begin, end;
    seq_range(p, OP_POLICY_LOSS, s, &begin, &end, status);
    const SeqInputs seq = seq_inputs(seq_totals(p, begin, end));

    Partial acc = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, -INFINITY, 0.f};
    for (int64_t t = begin + threadIdx.x; t < end; t += THREADS) {
        if (!active(p, t)) {
            per_token[t] = 0.f;
            continue;
        }
        bool bad;
        const TokenTerms k = token_terms(p, t, advantage(p, s, t), seq, &bad);
        bad = bad || !isfinite(k.loss) || !isfinite(k.kl) || !isfinite(k.ratio);  // finite inputs can overflow f32
        if (bad) raise(status, OP_POLICY_LOSS, NON_FINITE, t);
        per_token[t] = bad ? NAN : k.loss;
        acc = CombinePartial{}(acc, {bad ? NAN : k.loss, 1.f, (float)k.clip_low, (float)k.clip_high, (float)k.dual,
                                     k.ratio, k.ratio, k.kl});
    }
    acc = block_reduce(acc, CombinePartial{}, scratch);
    if (threadIdx.x == 0) {
        partials[s] = acc;
        __threadfence();  // publish the partial before taking a ticket
        is_last = atomicInc(ticket, (uint32_t)(p.seqs - 1)) == (uint32_t)(p.seqs - 1);
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();

    // The last block: fold all partials in sequence order per thread, then
    // in thread order: the same sums on every run.
    Partial total = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, -INFINITY, 0.f};
    float seq_mean_sum = 0.f;  // sum over sequences of loss_s / max(1, L_s)
    SeqStats seq_stats = {0.f, 0.f, 0.f, INFINITY, -INFINITY};
    for (int64_t q = threadIdx.x; q < p.seqs; q += THREADS) {
        const Partial part = partials[q];
        total = CombinePartial{}(total, part);
        seq_mean_sum += part.loss / fmaxf(part.count, 1.f);
        if (part.count > 0.f) {
            const float low = part.clip_low / part.count, high = part.clip_high / part.count;
            seq_stats = CombineSeqStats{}(seq_stats, {1.f, low, high, low, high});
        }
    }
    total = block_reduce(total, CombinePartial{}, scratch);
    __shared__ float seq_scratch[THREADS / 32];
    seq_mean_sum = block_reduce(seq_mean_sum, Sum{}, seq_scratch);
    __shared__ SeqStats stats_scratch[THREADS / 32];
    seq_stats = block_reduce(seq_stats, CombineSeqStats{}, stats_scratch);
    if (threadIdx.x != 0) return;
    const float seqs = seq_divisor(p, seq_stats.nonempty), m = total.count, per = m > 0.f ? 1.f / m : 0.f;
    float loss;
    switch (p.aggregation) {
        case TOKEN_MEAN: loss = total.loss / (p.agg_constant > 0.f ? p.agg_constant : fmaxf(m, 1.f)); break;
        case SEQ_MEAN_TOKEN_MEAN: loss = seq_mean_sum / seqs; break;
        case SEQ_MEAN_TOKEN_SUM: loss = total.loss / seqs; break;
        default: loss = total.loss / (seqs * p.agg_constant); break;
    }
    // Finite token losses whose sum overflows (a token already raised makes it NaN).
    if (isinf(loss)) raise(status, OP_POLICY_LOSS, NON_FINITE, 0);
    summary[LOSS] = loss;
    summary[CLIP_LOW] = total.clip_low * per;
    summary[CLIP_HIGH] = total.clip_high * per;
    summary[DUAL_CLIP] = total.dual * per;
    summary[RATIO_MEAN] = total.ratio_sum * per;
    summary[RATIO_MAX] = m > 0.f ? total.ratio_max : 0.f;
    summary[KL_MEAN] = total.kl_sum * per;
    summary[TOKENS] = m;
    const float all_seqs = (float)p.seqs;
    summary[CLIP_LOW_SEQ] = seq_stats.low_sum / all_seqs;
    summary[CLIP_HIGH_SEQ] = seq_stats.high_sum / all_seqs;
    summary[CLIP_LOW_SEQ_MIN] = seq_stats.nonempty > 0.f ? seq_stats.low_min : 0.f;
    summary[CLIP_HIGH_SEQ_MAX] = seq_stats.nonempty > 0.f ? seq_stats.high_max : 0.f;
    summary[SEQS] = seqs;
}

// dlogp_t = m_t (g w_t + g_t) dl_t/dlogp_t, with g = grad_loss[0], g_t the
// optional per-token gradient, w_t the aggregation weight. Token-mean
// without an explicit normalizer reads the count from the forward's summary,
// the SeqMean aggregations their divisor S.
// grid (seqs), THREADS threads.
extern "C" __global__ void __launch_bounds__(THREADS)
    policy_loss_bwd(const Params p, const float* summary, const float* grad_loss, const float* grad_per_token,
                    float* dlogp, uint32_t* status) {
    const int64_t s = blockIdx.x;
    int64_t begin, end;
    seq_range(p, OP_POLICY_LOSS, s, &begin, &end, status);
    const CountSum totals = seq_totals(p, begin, end);
    const SeqInputs seq = seq_inputs(totals);
    const float seqs = summary[SEQS];
    float w;
    switch (p.aggregation) {
        case TOKEN_MEAN: w = 1.f / (p.agg_constant > 0.f ? p.agg_constant : fmaxf(summary[TOKENS], 1.f)); break;
        case SEQ_MEAN_TOKEN_MEAN: w = 1.f / (seqs * fmaxf(totals.count, 1.f)); break;
        case SEQ_MEAN_TOKEN_SUM: w = 1.f / seqs; break;
        default: w = 1.f / (seqs * p.agg_constant); break;
    }
    const float g = grad_loss[0] * w;
    if (!isfinite(grad_loss[0]) && s == 0 && threadIdx.x == 0) raise(status, OP_POLICY_LOSS, NON_FINITE, 0);
    for (int64_t t = begin + threadIdx.x; t < end; t += THREADS) {
        if (!active(p, t)) {
            dlogp[t] = 0.f;
            continue;
        }
        bool bad;
        const TokenTerms k = token_terms(p, t, advantage(p, s, t), seq, &bad);
        const float g_t = grad_per_token ? grad_per_token[t] : 0.f;
        bad = bad || !isfinite(g_t);
        const float d = (g + g_t) * k.dloss_dlogp;
        bad = bad || !isfinite(d);  // a non-finite grad_loss, or an overflow
        if (bad) raise(status, OP_POLICY_LOSS, NON_FINITE, t);
        dlogp[t] = bad ? NAN : d;
    }
}
