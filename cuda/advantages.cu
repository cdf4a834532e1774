// Group advantages (math: src/ops/advantages.rs), all modes in one launch of
// one block: rewards are few (P * G, hundreds to a million), and one block
// lets the batch statistics follow the group statistics without a second
// launch. f64 accumulation, as on the CPU.
#include "common.cuh"

using namespace gk;

namespace {

constexpr int THREADS = 1024;

enum Mode : int { GROUP_NORM = 0, GROUP_MEAN = 1, BATCH_NORM = 2, LEAVE_ONE_OUT = 3, NONE = 4 };

struct MeanVar {
    double mean, std;
};

// Mean and standard deviation of x[0..n) by one warp (two passes, f64).
__device__ __forceinline__ MeanVar warp_mean_std(const float* x, int64_t n, bool unbiased) {
    const int lane = threadIdx.x & 31;
    double sum = 0.0;
    for (int64_t i = lane; i < n; i += 32) sum += x[i];
    const double mean = warp_reduce(sum, Sum{}) / (double)n;
    double sq = 0.0;
    for (int64_t i = lane; i < n; i += 32) sq += (x[i] - mean) * (x[i] - mean);
    sq = warp_reduce(sq, Sum{});
    const double dof = unbiased ? (double)n - 1.0 : (double)n;
    return {mean, dof > 0.0 ? sqrt(sq / dof) : 0.0};
}

}  // namespace

// values [K * n] component-major, weights [K]; outputs advantages and
// rewards [n], group_mean and group_std [n / G]. One block of THREADS.
extern "C" __global__ void __launch_bounds__(THREADS)
    group_advantages(const float* values, const float* weights, int64_t components, int64_t n, int64_t group_size,
                     int mode, float eps, int unbiased, float* advantages, float* rewards, float* group_mean,
                     float* group_std, uint32_t* status) {
    // 1. Weighted sum of the components.
    for (int64_t i = threadIdx.x; i < n; i += THREADS) {
        double r = 0.0;
        for (int64_t k = 0; k < components; ++k) {
            const float v = values[k * n + i];
            if (!isfinite(v)) raise(status, OP_ADVANTAGES, NON_FINITE, k * n + i);
            r += (double)weights[k] * v;
        }
        rewards[i] = (float)r;
    }
    __syncthreads();

    // 2. Group statistics (a warp per group) and, for the group modes, the
    //    advantages. A group of one, or whose rewards are all equal, has
    //    r - mean = 0 exactly in f64, hence advantage 0.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t groups = n / group_size, g_size = group_size;
    for (int64_t g = warp; g < groups; g += THREADS / 32) {
        const float* r = rewards + g * g_size;
        const MeanVar mv = warp_mean_std(r, g_size, unbiased);
        if (lane == 0) {
            group_mean[g] = (float)mv.mean;
            group_std[g] = (float)mv.std;
        }
        if (mode == BATCH_NORM) continue;
        for (int64_t i = lane; i < g_size; i += 32) {
            const double centered = r[i] - mv.mean;
            double a;
            switch (mode) {
                case GROUP_NORM: a = centered / (mv.std + eps); break;
                case GROUP_MEAN: a = centered; break;
                case LEAVE_ONE_OUT: a = g_size > 1 ? centered * g_size / (g_size - 1.0) : 0.0; break;
                default: a = r[i]; break;
            }
            advantages[g * g_size + i] = (float)a;
        }
    }
    if (mode != BATCH_NORM) return;

    // 3. Batch standard deviation of the rewards, then centered by group.
    __shared__ double scratch[THREADS / 32];
    __syncthreads();
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += THREADS) sum += rewards[i];
    const double mean = block_reduce(sum, Sum{}, scratch) / (double)n;
    double sq = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += THREADS) sq += (rewards[i] - mean) * (rewards[i] - mean);
    sq = block_reduce(sq, Sum{}, scratch);
    const double dof = unbiased ? (double)n - 1.0 : (double)n;
    const double batch_std = dof > 0.0 ? sqrt(sq / dof) : 0.0;
    for (int64_t i = threadIdx.x; i < n; i += THREADS) {
        const double centered = rewards[i] - (double)group_mean[i / g_size];
        advantages[i] = (float)(centered / (batch_std + eps));
    }
}

// tokens of sequence s = [start, end) get per_seq[s]; cu_seqlens null means
// padded sequences of seq_len. Offsets outside [0, tokens] or decreasing
// raise BAD_LAYOUT and write nothing. grid (seqs), 256 threads.
extern "C" __global__ void broadcast_to_tokens(const float* per_seq, const uint32_t* cu_seqlens, int64_t seq_len,
                                               int64_t tokens, float* per_token, uint32_t* status) {
    const int64_t s = blockIdx.x;
    const int64_t begin = cu_seqlens ? cu_seqlens[s] : s * seq_len;
    const int64_t end = cu_seqlens ? cu_seqlens[s + 1] : begin + seq_len;
    if (begin > end || end > tokens || (s == 0 && begin != 0) || (s == gridDim.x - 1 && end != tokens)) {
        if (threadIdx.x == 0) raise(status, OP_ADVANTAGES, BAD_LAYOUT, s);
        return;
    }
    const float v = per_seq[s];
    for (int64_t t = begin + threadIdx.x; t < end; t += blockDim.x) per_token[t] = v;
}
