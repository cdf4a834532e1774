// Group advantages (math and conventions: src/ops/advantages.rs), every
// mode in one launch of one block: rewards are few (P * G, hundreds to a
// million), and one block lets the batch statistics follow the group
// statistics without a second launch. f64 throughout and the CPU's
// operations in the CPU's order, so the two agree to f32 rounding, and a
// flat group (all rewards exactly equal, G = 1, or fewer than two scored)
// gets exactly 0. With `skip_nan` (NanRewards::Skip) a NaN component is
// left out of the sum and a completion with none scored is unscorable: its
// combined reward NaN, out of every statistic, advantage 0.
#include "common.cuh"

using namespace gk;

namespace {

constexpr int THREADS = ADVANTAGES_THREADS;
constexpr int WARPS = THREADS / 32;

struct MinF64 {
    __device__ double operator()(double a, double b) const { return fmin(a, b); }
};
struct MaxF64 {
    __device__ double operator()(double a, double b) const { return fmax(a, b); }
};

// How the kernel reads the rewards (AdvantageConfig's aggregation and NaN rule).
struct Combine {
    const float* values;   // [K * n] component-major
    const float* weights;  // [K] or null (one component of weight 1)
    const double* comp;    // NormalizeThenSum: [groups * K] (shift, scale) pairs, else null
    int64_t components, n, g;
    bool skip_nan;
};

// The combined reward of completion i, sum_k w_k z_k in f64 (k in order),
// z_k = values[k][i], or its group z-score with `comp`. NaN for an
// unscorable completion (skip_nan) or a non-finite component, which is
// raised (NaN only without skip_nan).
__device__ __forceinline__ double combined(const Combine& c, int64_t i, uint32_t* status) {
    const int64_t p = i / c.g;
    double r = 0.0;
    bool any = false;
    for (int64_t k = 0; k < c.components; ++k) {
        const float v = c.values[k * c.n + i];
        if (c.skip_nan && isnan(v)) continue;
        if (!isfinite(v)) {
            raise(status, OP_ADVANTAGES, NON_FINITE, k * c.n + i);
            return NAN;
        }
        double z = (double)v;
        if (c.comp != nullptr) z = (z - c.comp[2 * (p * c.components + k)]) * c.comp[2 * (p * c.components + k) + 1];
        r += (c.weights == nullptr ? 1.0 : (double)c.weights[k]) * z;
        any = true;
    }
    return any ? r : NAN;
}

// Standard deviation over the scored values; 0 for a flat group or a divisor of 0.
__device__ __forceinline__ double std_of(const GroupStats& s, bool unbiased) {
    const int64_t div = unbiased ? s.count - 1 : s.count;
    return s.flat || div <= 0 ? 0.0 : sqrt(s.sq_dev / (double)div);
}

// Statistics of the non-NaN values x(i), i < g, by one warp: count, sum,
// min and max, then the squared deviations from the mean. The mean of a
// flat group is its value exactly; NaN with no value.
template <typename X> __device__ GroupStats warp_stats(X x, int64_t g) {
    const int lane = threadIdx.x & 31;
    double sum = 0.0, lo = INFINITY, hi = -INFINITY;
    int64_t count = 0;
    for (int64_t i = lane; i < g; i += 32) {
        const double r = x(i);
        if (isnan(r)) continue;
        ++count;
        sum += r;
        lo = fmin(lo, r);
        hi = fmax(hi, r);
    }
    sum = warp_reduce(sum, Sum{});
    count = warp_reduce(count, Sum{});
    lo = warp_reduce(lo, MinF64{});
    hi = warp_reduce(hi, MaxF64{});
    const bool flat = count < 2 || lo == hi;
    const double mean = count == 0 ? NAN : lo == hi ? lo : sum / (double)count;
    double sq = 0.0;
    if (!flat)
        for (int64_t i = lane; i < g; i += 32) {
            const double r = x(i);
            if (!isnan(r)) sq += (r - mean) * (r - mean);
        }
    return {sum, mean, warp_reduce(sq, Sum{}), count, flat, false};
}

// A = (r - shift) * scale, as AdvantageConfig::group_affine: `batch` is
// read by the batch modes only; `verl`: a group of one has mean 0 and std 1
// (verl's convention), else 0.
__device__ __forceinline__ void affine(int mode, const GroupStats& s, int64_t g, float eps, bool unbiased, bool verl,
                                       const GroupStats& batch, double batch_std, double* shift, double* scale) {
    const double batch_scale = batch.flat ? 0.0 : 1.0 / (batch_std + (double)eps);
    *shift = s.mean;
    if (mode == NONE) {
        *shift = 0.0;
        *scale = 1.0;
    } else if (mode == WHITEN) {
        *shift = batch.mean;
        *scale = batch_scale;
    } else if (verl && g == 1) {
        *shift = 0.0;
        *scale = mode == GROUP_NORM ? 1.0 / (1.0 + (double)eps) : mode == BATCH_NORM ? batch_scale : 1.0;
    } else if (s.flat) {
        *scale = 0.0;
    } else if (mode == GROUP_NORM) {
        *scale = 1.0 / (std_of(s, unbiased) + (double)eps);
    } else if (mode == GROUP_MEAN) {
        *scale = 1.0;
    } else if (mode == BATCH_NORM) {
        *scale = batch_scale;
    } else {  // LEAVE_ONE_OUT, c >= 2 scored here
        *scale = (double)s.count / ((double)s.count - 1.0);
    }
}

}  // namespace

// values [K * n] component-major; weights [K] or null (one component, used
// as is); outputs advantages and combined rewards [n], group_mean and
// group_std [n / G]; stats [n / G] is scratch, and so is comp [2 K n / G]
// (given for NormalizeThenSum only: each component's group z-score map,
// unbiased std + agg_eps). One block of THREADS. `unbiased` is the std
// convention of the mode (true for modes without one); `skip_nan`:
// NanRewards::Skip; `verl_singletons`: a group of one has mean 0 and std 1.
extern "C" __global__ void __launch_bounds__(THREADS)
    group_advantages(const float* values, const float* weights, int64_t components, int64_t n, int64_t group_size,
                     AdvantageMode mode, float eps, int unbiased, int verl_singletons, int skip_nan, float agg_eps,
                     float* advantages, float* rewards, float* group_mean, float* group_std, GroupStats* stats,
                     double* comp, uint32_t* status) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t g = group_size, groups = n / group_size;
    const Combine c = {values, weights, comp, components, n, g, skip_nan != 0};

    // 0. NormalizeThenSum: each component's z-score map in each group, a
    //    warp per group (the same warp reads it in step 1).
    if (comp != nullptr)
        for (int64_t p = warp; p < groups; p += WARPS)
            for (int64_t k = 0; k < components; ++k) {
                const float* v = values + k * n + p * g;
                const GroupStats s = warp_stats([&](int64_t i) { return isfinite(v[i]) ? (double)v[i] : NAN; }, g);
                if (lane == 0) {
                    comp[2 * (p * components + k)] = s.count == 0 ? 0.0 : s.mean;
                    comp[2 * (p * components + k) + 1] = s.flat ? 0.0 : 1.0 / (std_of(s, true) + (double)agg_eps);
                }
            }
    __syncwarp();

    // 1. Group statistics, a warp per group; the combined rewards. Without
    //    skip_nan a NaN is a raised error and poisons its group's outputs.
    for (int64_t p = warp; p < groups; p += WARPS) {
        bool bad = false;
        for (int64_t i = lane; i < g; i += 32) bad |= !c.skip_nan && isnan(combined(c, p * g + i, status));
        GroupStats s = __any_sync(0xffffffffu, bad)
                           ? GroupStats{NAN, NAN, NAN, 0, false, false}
                           : warp_stats([&](int64_t i) { return combined(c, p * g + i, status); }, g);
        bool overflow = false;
        for (int64_t i = lane; i < g; i += 32) {
            const float r = (float)combined(c, p * g + i, status);
            if (isinf(r)) raise(status, OP_ADVANTAGES, NON_FINITE, p * g + i);  // overflows f32
            overflow |= isinf(r);
            rewards[p * g + i] = r;
        }
        s.overflow = __any_sync(0xffffffffu, overflow | bad);
        if (lane == 0) {
            stats[p] = s;
            group_mean[p] = (float)s.mean;
            const float sd = s.overflow ? NAN : (float)std_of(s, unbiased);
            if (isinf(sd)) raise(status, OP_ADVANTAGES, NON_FINITE, p);  // overflows f32
            group_std[p] = sd;
        }
    }

    // 2. Batch statistics from the group sums (Chan et al.: SS = sum_g SS_g
    //    + c_g (mean_g - mean)^2), for BatchNorm and Whiten only; the batch
    //    is flat when every group is, at one value, or under two are scored.
    GroupStats batch = {0.0, 0.0, 0.0, 0, true, false};
    double batch_std = 0.0;
    if (mode == BATCH_NORM || mode == WHITEN) {
        __shared__ double scratch[WARPS];
        __shared__ int64_t count_scratch[WARPS];
        __syncthreads();
        double sum = 0.0, lo = INFINITY, hi = -INFINITY;
        int64_t count = 0;
        for (int64_t p = threadIdx.x; p < groups; p += THREADS) {
            const GroupStats& s = stats[p];
            if (s.count == 0) continue;
            sum += s.sum;
            count += s.count;
            lo = fmin(lo, s.flat ? s.mean : -INFINITY);
            hi = fmax(hi, s.flat ? s.mean : INFINITY);
        }
        lo = block_reduce(lo, MinF64{}, scratch);
        hi = block_reduce(hi, MaxF64{}, scratch);
        count = block_reduce(count, Sum{}, count_scratch);
        sum = block_reduce(sum, Sum{}, scratch);
        batch.count = count;
        batch.flat = count < 2 || lo == hi;
        batch.mean = lo == hi ? lo : sum / (double)count;
        double sq = 0.0;
        for (int64_t p = threadIdx.x; p < groups; p += THREADS) {
            const GroupStats& s = stats[p];
            if (s.count == 0) continue;
            const double d = s.mean - batch.mean;
            sq += s.sq_dev + (double)s.count * d * d;
        }
        batch.sq_dev = block_reduce(sq, Sum{}, scratch);
        batch_std = std_of(batch, unbiased);
    }

    // 3. Advantages, each group's affine map of its rewards (0 for an
    //    unscorable completion). A warp reads the stats its own lane 0
    //    wrote (the batch modes have synced the block).
    __syncwarp();
    for (int64_t p = warp; p < groups; p += WARPS) {
        const GroupStats s = stats[p];
        double shift, scale;
        affine(mode, s, g, eps, unbiased, verl_singletons, batch, batch_std, &shift, &scale);
        for (int64_t i = lane; i < g; i += 32) {
            const double r = combined(c, p * g + i, status);
            const float a = s.overflow ? NAN : isnan(r) ? 0.f : (float)((r - shift) * scale);
            if (isinf(a)) raise(status, OP_ADVANTAGES, NON_FINITE, p * g + i);  // overflows f32
            advantages[p * g + i] = a;
        }
    }
}

// Tokens of sequence s, [begin, end), get per_seq[s]; cu_seqlens null means
// padded sequences of seq_len. Offsets outside [0, tokens] or decreasing
// raise BAD_LAYOUT and write nothing; a non-finite value raises NON_FINITE
// and writes NaN.
// grid (seqs), 256 threads.
extern "C" __global__ void broadcast_to_tokens(const float* per_seq, const uint32_t* cu_seqlens, int64_t seq_len,
                                               int64_t tokens, float* per_token, uint32_t* status) {
    const int64_t s = blockIdx.x;
    const int64_t begin = cu_seqlens ? cu_seqlens[s] : s * seq_len;
    const int64_t end = cu_seqlens ? cu_seqlens[s + 1] : begin + seq_len;
    if (begin > end || end > tokens || (s == 0 && begin != 0) || (s == gridDim.x - 1 && end != tokens)) {
        if (threadIdx.x == 0) raise(status, OP_ADVANTAGES, BAD_LAYOUT, s);
        return;
    }
    float v = per_seq[s];
    if (!isfinite(v)) {
        if (threadIdx.x == 0) raise(status, OP_ADVANTAGES, NON_FINITE, s);
        v = NAN;
    }
    for (int64_t t = begin + threadIdx.x; t < end; t += blockDim.x) per_token[t] = v;
}
