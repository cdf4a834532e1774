// Per-token corrections of the policy-gradient term (math and TRL
// references: src/ops/corrections.rs). Every kernel multiplies its weights
// into `weights` (the `_into` contract), so corrections compose in place.
//
// corr_sampler_is, corr_off_policy: one block per sequence; sums in double,
// reduced in a fixed order (deterministic). The IS statistics leave one
// partial per sequence, which the host folds in sequence order as the CPU
// does.
// corr_entropy_select: one block finds torch.quantile's two order statistics
// of the masked-in entropies by radix selection over order-preserving u32
// keys (a pass counting the values, four 8-bit digit passes for the lower
// statistic, at most one more for the upper), then interpolates as torch's
// CPU lerp; corr_entropy_apply then masks elementwise. Cost: about six
// reads of entropy + mask by one SM, O(N), no sort and no scratch beyond
// shared memory.
#include "common.cuh"

using namespace gk;

namespace {

constexpr int THREADS = CORRECTIONS_THREADS;
constexpr int SELECT_THREADS = ENTROPY_SELECT_THREADS;
using Params = CorrectionParams;

__device__ __forceinline__ bool active(const uint8_t* mask, int64_t t) { return !mask || mask[t] != 0; }

// torch.nan_to_num(x, nan=0.0) in f32.
__device__ __forceinline__ float nan_to_num(float x) {
    return isnan(x) ? 0.f : fminf(fmaxf(x, -3.40282347e38f), 3.40282347e38f);
}

// A masked-in token's log-probs are usable: the trainer's finite, the
// sampler's finite or NaN (not scored). Raises NON_FINITE otherwise.
__device__ __forceinline__ void check_logps(const Params& p, int64_t t, uint32_t* status) {
    if (!isfinite(p.logp[t]) || isinf(p.sampler_logp[t])) raise(status, OP_CORRECTIONS, NON_FINITE, t);
}

// The weight of an importance ratio: torch.clamp, or 0 outside the bounds.
__device__ __forceinline__ float is_weight(const Params& p, float r) {
    if (p.mode == IS_TOKEN_MASK || p.mode == IS_SEQUENCE_MASK) return (r < p.clip_min || r > p.clip_max) ? 0.f : r;
    return fminf(fmaxf(r, p.clip_min), p.clip_max);
}

struct Partial {
    double ratio_sum, diff_sum, seq_sum;
    unsigned long long ratio_count, diff_count;
    float ratio_min, ratio_max, diff_max;
};

struct CombinePartial {
    __device__ __forceinline__ Partial operator()(const Partial& a, const Partial& b) const {
        return {a.ratio_sum + b.ratio_sum, a.diff_sum + b.diff_sum,     a.seq_sum + b.seq_sum,
                a.ratio_count + b.ratio_count, a.diff_count + b.diff_count, fminf(a.ratio_min, b.ratio_min),
                fmaxf(a.ratio_max, b.ratio_max), fmaxf(a.diff_max, b.diff_max)};
    }
};

__device__ __forceinline__ void multiply(float* weights, int64_t t, float w, uint32_t* status) {
    const float x = weights[t] * w;
    if (!isfinite(x)) raise(status, OP_CORRECTIONS, NON_FINITE, t);
    weights[t] = x;
}

struct SumCount {
    double sum;
    unsigned long long count;
    __device__ __forceinline__ SumCount operator+(const SumCount& o) const { return {sum + o.sum, count + o.count}; }
};

// Order-preserving keys of floats: a < b (total order, -0 < +0) iff key(a) < key(b).
__device__ __forceinline__ uint32_t key_of(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : b | 0x80000000u;
}
__device__ __forceinline__ float float_of(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? k & 0x7FFFFFFFu : ~k);
}

struct MinKey {
    __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const { return a < b ? a : b; }
};

}  // namespace

// grid (p.seqs), THREADS threads. weights: [p.tokens], multiplied by the
// sampler importance weights; partials: [p.seqs].
extern "C" __global__ void __launch_bounds__(THREADS)
    corr_sampler_is(Params p, float* weights, IsSeqPartial* partials, uint32_t* status) {
    __shared__ Partial scratch[THREADS / 32];
    const int64_t s = blockIdx.x;
    int64_t begin, end;
    seq_range(p, OP_CORRECTIONS, s, &begin, &end, status);
    const bool seq_level = p.mode == IS_SEQUENCE_TRUNCATE || p.mode == IS_SEQUENCE_MASK;
    Partial acc = {0.0, 0.0, 0.0, 0ull, 0ull, INFINITY, -INFINITY, -INFINITY};
    for (int64_t t = begin + threadIdx.x; t < end; t += THREADS) {
        if (!active(p.mask, t)) {
            if (!seq_level) multiply(weights, t, is_weight(p, 1.f), status);
            continue;
        }
        check_logps(p, t, status);
        const float delta = p.logp[t] - p.sampler_logp[t];
        if (!isnan(delta)) {
            acc.diff_sum += fabsf(delta);
            acc.diff_count += 1;
            acc.diff_max = fmaxf(acc.diff_max, fabsf(delta));
        }
        acc.seq_sum += nan_to_num(delta);
        if (!seq_level) {
            const float r = is_weight(p, expf(nan_to_num(delta)));
            acc.ratio_sum += r;
            acc.ratio_count += 1;
            acc.ratio_min = fminf(acc.ratio_min, r);
            acc.ratio_max = fmaxf(acc.ratio_max, r);
            multiply(weights, t, r, status);
        }
    }
    acc = block_reduce(acc, CombinePartial{}, scratch);
    if (seq_level) {
        const float r = is_weight(p, expf((float)acc.seq_sum));
        for (int64_t t = begin + threadIdx.x; t < end; t += THREADS) multiply(weights, t, r, status);
        acc.ratio_sum = r;
        acc.ratio_count = 1;
        acc.ratio_min = acc.ratio_max = r;
    }
    if (threadIdx.x == 0)
        partials[s] = {acc.ratio_sum, acc.diff_sum,  acc.ratio_count, acc.diff_count,
                       acc.ratio_min, acc.ratio_max, acc.diff_max,    0.f};
}

// grid (p.seqs), THREADS threads. weights: [p.tokens], zeroed on the tokens
// of every sequence OPSM drops.
extern "C" __global__ void __launch_bounds__(THREADS) corr_off_policy(Params p, float* weights, uint32_t* status) {
    __shared__ SumCount scratch[THREADS / 32];
    const int64_t s = blockIdx.x;
    int64_t begin, end;
    seq_range(p, OP_CORRECTIONS, s, &begin, &end, status);
    const float adv = p.advantages[s];
    if (threadIdx.x == 0 && !isfinite(adv)) raise(status, OP_CORRECTIONS, NON_FINITE, s);
    SumCount acc = {0.0, 0ull};
    for (int64_t t = begin + threadIdx.x; t < end; t += THREADS) {
        if (!active(p.mask, t)) continue;
        check_logps(p, t, status);
        acc = acc + SumCount{(double)nan_to_num(p.sampler_logp[t] - p.logp[t]), 1ull};
    }
    acc = block_reduce(acc, Sum{}, scratch);
    const float mean = (float)acc.sum / (float)(acc.count > 0 ? acc.count : 1ull);
    const bool keep = adv >= 0.f || mean <= p.threshold;
    for (int64_t t = begin + threadIdx.x; t < end; t += THREADS) multiply(weights, t, keep ? 1.f : 0.f, status);
}

// One block of SELECT_THREADS. threshold: [2], written: torch.quantile(q) of
// the masked-in entropies (n of them), and 1 (0 with none: then [0] is 0).
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
    corr_entropy_select(const float* entropy, const uint8_t* mask, int64_t n, float q, float* threshold,
                        uint32_t* status) {
    __shared__ unsigned long long counts[SELECT_THREADS / 32];
    __shared__ uint32_t keys[SELECT_THREADS / 32];
    __shared__ unsigned int hist[256];
    __shared__ uint32_t prefix_s;
    __shared__ unsigned long long rank_s, bucket_s;
    unsigned long long local = 0;
    for (int64_t i = threadIdx.x; i < n; i += SELECT_THREADS) {
        if (!active(mask, i)) continue;
        if (!isfinite(entropy[i])) raise(status, OP_CORRECTIONS, NON_FINITE, i);
        local += 1;
    }
    const unsigned long long m = block_reduce(local, Sum{}, counts);
    if (m == 0) {
        if (threadIdx.x == 0) threshold[0] = threshold[1] = 0.f;
        return;
    }
    const double rank = (double)q * (double)(m - 1);
    const unsigned long long below = (unsigned long long)rank;
    const unsigned long long above = min((unsigned long long)ceil(rank), m - 1);
    const float w = (float)(rank - (double)below);
    // The key of the `below`-th smallest, eight bits at a time from the top.
    uint32_t prefix = 0, known = 0;
    unsigned long long k = below, in_bucket = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += SELECT_THREADS) hist[b] = 0;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < n; i += SELECT_THREADS) {
            if (!active(mask, i)) continue;
            const uint32_t key = key_of(entropy[i]);
            if ((key & known) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned long long before = 0;
            int d = 0;
            while (d < 255 && before + hist[d] <= k) before += hist[d++];
            prefix_s = prefix | ((uint32_t)d << shift);
            rank_s = k - before;
            bucket_s = hist[d];
        }
        __syncthreads();
        prefix = prefix_s;
        k = rank_s;
        in_bucket = bucket_s;
        known |= 255u << shift;
    }
    const float lo = float_of(prefix);
    float hi = lo;
    // The next order statistic is a tie of `lo` unless `lo` was the last of its value.
    if (above != below && k + 1 >= in_bucket) {
        uint32_t next = 0xFFFFFFFFu;
        for (int64_t i = threadIdx.x; i < n; i += SELECT_THREADS) {
            if (!active(mask, i)) continue;
            const uint32_t key = key_of(entropy[i]);
            if (key > prefix && key < next) next = key;
        }
        hi = float_of(block_reduce(next, MinKey{}, keys));
    }
    if (threadIdx.x == 0) {
        // torch's CPU lerp, fused as the CPU op's.
        threshold[0] = fabsf(w) < 0.5f ? fmaf(w, hi - lo, lo) : fmaf(w - 1.f, hi - lo, hi);
        threshold[1] = 1.f;
    }
}

// Grid-stride, any grid and block: weights[i] *= [mask_i and entropy_i >=
// threshold[0]], 0 everywhere when threshold[1] == 0. Buffers: [n].
extern "C" __global__ void corr_entropy_apply(const float* entropy, const uint8_t* mask, int64_t n,
                                              const float* threshold, float* weights, uint32_t* status) {
    const float t = threshold[0];
    const bool any = threshold[1] != 0.f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const bool keep = any && active(mask, i) && entropy[i] >= t;
        multiply(weights, i, keep ? 1.f : 0.f, status);
    }
}
