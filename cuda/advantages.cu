// Group advantages (math and conventions: src/ops/advantages.rs), every
// mode in one launch of one block: rewards are few (P * G, hundreds to a
// million), and one block lets the batch statistics follow the group
// statistics without a second launch. f64 throughout and the CPU's
// operations in the CPU's order, so the two agree to f32 rounding, and a
// flat group (all rewards exactly equal, or G = 1) gets exactly 0.
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

// The combined reward of completion i, sum_k w_k values[k][i] in f64 (k in
// order); NaN when a component is not finite, which is raised.
__device__ __forceinline__ double combined(const float* values, const float* weights, int64_t components, int64_t n,
                                           int64_t i, uint32_t* status) {
    if (weights == nullptr) {
        const float v = values[i];
        if (!isfinite(v)) raise(status, OP_ADVANTAGES, NON_FINITE, i);
        return isfinite(v) ? (double)v : NAN;
    }
    double r = 0.0;
    for (int64_t k = 0; k < components; ++k) {
        const float v = values[k * n + i];
        if (!isfinite(v)) {
            raise(status, OP_ADVANTAGES, NON_FINITE, k * n + i);
            return NAN;
        }
        r += (double)weights[k] * v;
    }
    return r;
}

// Standard deviation over `count` rewards; 0 for a flat group or a divisor of 0.
__device__ __forceinline__ double std_of(const GroupStats& s, int64_t count, bool unbiased) {
    const int64_t div = unbiased ? count - 1 : count;
    return s.flat || div <= 0 ? 0.0 : sqrt(s.sq_dev / (double)div);
}

// A group's statistics by one warp: sum, min and max, then the squared
// deviations from the mean. The mean of a flat group is its value exactly.
__device__ GroupStats warp_group_stats(const float* values, const float* weights, int64_t components, int64_t n,
                                       int64_t start, int64_t g, uint32_t* status) {
    const int lane = threadIdx.x & 31;
    double sum = 0.0, lo = INFINITY, hi = -INFINITY;
    bool bad = false;
    for (int64_t i = lane; i < g; i += 32) {
        const double r = combined(values, weights, components, n, start + i, status);
        bad |= isnan(r);
        sum += r;
        lo = fmin(lo, r);
        hi = fmax(hi, r);
    }
    sum = warp_reduce(sum, Sum{});
    lo = warp_reduce(lo, MinF64{});
    hi = warp_reduce(hi, MaxF64{});
    if (__any_sync(0xffffffffu, bad)) return {NAN, NAN, NAN, false, false};
    const bool flat = lo == hi;
    const double mean = flat ? lo : sum / (double)g;
    double sq = 0.0;
    if (!flat)
        for (int64_t i = lane; i < g; i += 32) {
            const double d = combined(values, weights, components, n, start + i, status) - mean;
            sq += d * d;
        }
    return {sum, mean, warp_reduce(sq, Sum{}), flat, false};
}

// A = (r - shift) * scale, as AdvantageConfig::group_affine: `batch_mean`,
// `batch_std` and `batch_flat` are read by the batch modes only; `verl`:
// a group of one has mean 0 and std 1 (verl's convention), else 0.
__device__ __forceinline__ void affine(int mode, const GroupStats& s, int64_t g, float eps, bool unbiased, bool verl,
                                       double batch_mean, double batch_std, bool batch_flat, double* shift,
                                       double* scale) {
    const double batch_scale = batch_flat ? 0.0 : 1.0 / (batch_std + (double)eps);
    *shift = s.mean;
    if (mode == NONE) {
        *shift = 0.0;
        *scale = 1.0;
    } else if (mode == WHITEN) {
        *shift = batch_mean;
        *scale = batch_scale;
    } else if (verl && g == 1) {
        *shift = 0.0;
        *scale = mode == GROUP_NORM ? 1.0 / (1.0 + (double)eps) : mode == BATCH_NORM ? batch_scale : 1.0;
    } else if (s.flat) {
        *scale = 0.0;
    } else if (mode == GROUP_NORM) {
        *scale = 1.0 / (std_of(s, g, unbiased) + (double)eps);
    } else if (mode == GROUP_MEAN) {
        *scale = 1.0;
    } else if (mode == BATCH_NORM) {
        *scale = batch_scale;
    } else {  // LEAVE_ONE_OUT, G >= 2 here
        *scale = (double)g / ((double)g - 1.0);
    }
}

}  // namespace

// values [K * n] component-major; weights [K] or null (one component, used
// as is); outputs advantages and combined rewards [n], group_mean and
// group_std [n / G]; stats [n / G] is scratch. One block of THREADS.
// `unbiased` is the std convention of the mode (true for modes without one);
// `verl_singletons`: a group of one has mean 0 and std 1 (`Singletons::Verl`).
extern "C" __global__ void __launch_bounds__(THREADS)
    group_advantages(const float* values, const float* weights, int64_t components, int64_t n, int64_t group_size,
                     AdvantageMode mode, float eps, int unbiased, int verl_singletons, float* advantages,
                     float* rewards, float* group_mean, float* group_std, GroupStats* stats, uint32_t* status) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t g = group_size, groups = n / group_size;

    // 1. Group statistics, a warp per group; the combined rewards.
    for (int64_t p = warp; p < groups; p += WARPS) {
        GroupStats s = warp_group_stats(values, weights, components, n, p * g, g, status);
        bool overflow = false;
        for (int64_t i = lane; i < g; i += 32) {
            const float r = (float)combined(values, weights, components, n, p * g + i, status);
            if (isinf(r)) raise(status, OP_ADVANTAGES, NON_FINITE, p * g + i);  // overflows f32
            overflow |= isinf(r);
            rewards[p * g + i] = r;
        }
        s.overflow = __any_sync(0xffffffffu, overflow);
        if (lane == 0) {
            stats[p] = s;
            group_mean[p] = (float)s.mean;
            const float sd = s.overflow ? NAN : (float)std_of(s, g, unbiased);
            if (isinf(sd)) raise(status, OP_ADVANTAGES, NON_FINITE, p);  // overflows f32
            group_std[p] = sd;
        }
    }

    // 2. Batch mean and std from the group sums (Chan et al.: SS = sum_g
    //    SS_g + G (mean_g - mean)^2), for BatchNorm and Whiten only; the
    //    batch is flat when every group is, at one value (mean and std 0).
    double batch_mean = 0.0, batch_std = 0.0;
    bool batch_flat = false;
    if (mode == BATCH_NORM || mode == WHITEN) {
        __shared__ double scratch[WARPS];
        __syncthreads();
        double sum = 0.0, lo = INFINITY, hi = -INFINITY;
        for (int64_t p = threadIdx.x; p < groups; p += THREADS) {
            sum += stats[p].sum;
            lo = fmin(lo, stats[p].flat ? stats[p].mean : -INFINITY);
            hi = fmax(hi, stats[p].flat ? stats[p].mean : INFINITY);
        }
        lo = block_reduce(lo, MinF64{}, scratch);
        hi = block_reduce(hi, MaxF64{}, scratch);
        batch_flat = n < 2 || lo == hi;
        batch_mean = batch_flat ? lo : block_reduce(sum, Sum{}, scratch) / (double)n;
        double sq = 0.0;
        for (int64_t p = threadIdx.x; p < groups; p += THREADS) {
            const double d = stats[p].mean - batch_mean;
            sq += stats[p].sq_dev + (double)g * d * d;
        }
        sq = block_reduce(sq, Sum{}, scratch);
        const int64_t div = unbiased ? n - 1 : n;
        batch_std = batch_flat || div <= 0 ? 0.0 : sqrt(sq / (double)div);
    }

    // 3. Advantages, each group's affine map of its rewards. A warp reads
    //    the stats its own lane 0 wrote (BatchNorm has synced the block).
    __syncwarp();
    for (int64_t p = warp; p < groups; p += WARPS) {
        const GroupStats s = stats[p];
        double shift, scale;
        affine(mode, s, g, eps, unbiased, verl_singletons, batch_mean, batch_std, batch_flat, &shift, &scale);
        for (int64_t i = lane; i < g; i += 32) {
            const double r = combined(values, weights, components, n, p * g + i, status);
            const float a = s.overflow ? NAN : (float)((r - shift) * scale);
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
