// Fused token sampling (semantics: src/ops/sampling.rs): temperature,
// top-k, top-p, min-p, and a Gumbel-max draw keyed by Philox4x32-10 on
// (seed, row, step, token), so that the CPU and this kernel pick the same
// token. One block per row; no sort of V.
//
// Every filter keeps {j : x_j >= tau} (x = z / T), so sampling is: find tau,
// then argmax_{x_j >= tau} x_j + g_j. tau is found by histogram refinement
// in value space: NB bins over [max - WINDOW, max] (and, if needed, the
// finite values below), descending into the bin where the criterion (the
// k-th largest value for top-k, the top_p mass for top-p) crosses, until
// that bin holds at most CAP values; those are sorted in shared memory and
// resolved exactly, ties included. Bin membership is always recomputed from
// the same formula, so no value is lost between levels. Masses are summed
// as 2^40 fixed-point integers: deterministic on every run.
//
// Passes over the row: 1 when there is no filter (the draw is fused into the
// softmax pass); typically 3 for top-k and/or top-p (softmax, histogram,
// collect), 4 when more than CAP tokens survive (a final draw pass), a few
// more for pathological rows (many values in one narrow bin).
#include "common.cuh"

using namespace gk;

namespace {

constexpr int THREADS = SAMPLING_THREADS;
constexpr int NB = 1024;         // histogram bins per level
constexpr int CAP = 2048;        // values sorted in shared memory
constexpr int MAX_LEVELS = 8;    // refinement depth (float resolution is reached long before)
constexpr float WINDOW = 32.f;   // nats below the max covered by the first level
constexpr double MASS_ONE = 1099511627776.0;  // 2^40: fixed-point unit of probability mass

// ------------------------------------------------------------ Philox4x32-10
// Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011).
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const uint32_t hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
        k.x += 0x9E3779B9u;
        k.y += 0xBB67AE85u;
    }
    return c;
}

// Gumbel noise of token j: lane j % 4 of Philox([j / 4, row, step], seed),
// u = ((bits >> 9) + 0.5) 2^-23 in (0, 1), g = -ln(-ln u), as the CPU's
// RowStream (24 bits would round the top value to u = 1, g = +inf).
struct Noise {
    uint2 key;
    uint32_t row, step_lo, step_hi;
    uint32_t cached_block = 0xFFFFFFFFu;
    uint4 cached;

    __device__ __forceinline__ float gumbel(uint32_t j) {
        const uint32_t block = j >> 2;
        if (block != cached_block) {
            cached = philox4x32_10(make_uint4(block, row, step_lo, step_hi), key);
            cached_block = block;
        }
        // Selects, not an indexed array: that would live in local memory.
        const uint32_t bits = (j & 2) ? ((j & 1) ? cached.w : cached.z) : ((j & 1) ? cached.y : cached.x);
        const float u = ((float)(bits >> 9) + 0.5f) * (1.f / 8388608.f);
        return -logf(-logf(u));
    }
};

struct ArgMax {
    float key;
    uint32_t index;
};
struct BetterArg {  // larger key; the lower index on ties
    __device__ __forceinline__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
        return (a.key > b.key || (a.key == b.key && a.index < b.index)) ? a : b;
    }
};

struct MinMax {
    float lo, hi;  // over finite values
};
struct CombineMinMax {
    __device__ __forceinline__ MinMax operator()(const MinMax& a, const MinMax& b) const {
        return {fminf(a.lo, b.lo), fmaxf(a.hi, b.hi)};
    }
};

__device__ __forceinline__ uint64_t fixed_mass(float x, float mx) {
    return (uint64_t)((double)expf(x - mx) * MASS_ONE + 0.5);
}

// One refinement level. Level 0 admits values in [lo, hi]; every level puts
// an admitted value in bin floor((x - lo) * scale), clamped to [0, NB), and
// only the values of its `chosen` bin go on to the next level.
struct Level {
    float lo, hi, scale;
    int chosen;
    __device__ __forceinline__ int bin(float x) const {
        return min(NB - 1, max(0, (int)((x - lo) * scale)));
    }
};

__device__ __forceinline__ Level make_level(float lo, float hi) {
    return {lo, hi, hi > lo ? NB / (hi - lo) : 0.f, -1};
}

// Where a value stands after the first `depth` levels: -1 below (out of the
// search), 0 inside the current window, 1 above it. Only level 0 compares
// with edges; deeper levels compare bins, computed exactly as when they
// were histogrammed, so no value is lost to rounding at a bin edge.
__device__ __forceinline__ int place(const Level* levels, int depth, float x) {
    if (depth == 0) return 0;
    if (x < levels[0].lo) return -1;
    if (x > levels[0].hi) return 1;
    for (int l = 0; l < depth; ++l) {
        const int b = levels[l].bin(x);
        if (b != levels[l].chosen) return b > levels[l].chosen ? 1 : -1;
    }
    return 0;
}

enum Criterion : int { BY_COUNT = 0, BY_MASS = 1 };

struct Shared {
    unsigned int counts[NB];
    unsigned long long masses[NB];
    float cand_x[CAP];
    uint32_t cand_j[CAP];
    Level levels[MAX_LEVELS + 1];
    unsigned int n_cand;
    unsigned long long target;          // criterion threshold (count, or fixed-point mass)
    unsigned long long above_count, above_mass;  // values above the current window
    unsigned long long kept_mass;       // mass of the values >= tau (and >= floor)
    unsigned int window_count;          // values inside the current window
    float tau;
    int depth, crossed, single_value, collect_all;
};

// Sorts the first n candidates by x descending, then index ascending
// (bitonic sort over the next power of two, padded with -inf).
__device__ void sort_candidates(Shared& sh, unsigned int n) {
    unsigned int size = 1;
    while (size < n) size <<= 1;
    for (unsigned int i = n + threadIdx.x; i < size; i += THREADS) {
        sh.cand_x[i] = -INFINITY;
        sh.cand_j[i] = 0xFFFFFFFFu;
    }
    __syncthreads();
    for (unsigned int k = 2; k <= size; k <<= 1) {
        for (unsigned int j = k >> 1; j > 0; j >>= 1) {
            for (unsigned int i = threadIdx.x; i < size; i += THREADS) {
                const unsigned int p = i ^ j;
                if (p <= i) continue;
                const bool i_first =
                    sh.cand_x[i] > sh.cand_x[p] || (sh.cand_x[i] == sh.cand_x[p] && sh.cand_j[i] < sh.cand_j[p]);
                // Blocks with bit k set are ordered the other way (bitonic merge).
                if (i_first == ((i & k) != 0)) {
                    const float tx = sh.cand_x[i];
                    sh.cand_x[i] = sh.cand_x[p];
                    sh.cand_x[p] = tx;
                    const uint32_t tj = sh.cand_j[i];
                    sh.cand_j[i] = sh.cand_j[p];
                    sh.cand_j[p] = tj;
                }
            }
            __syncthreads();
        }
    }
}

template <typename T> struct RowCtx {
    const T* row;
    int64_t vocab;
    float inv_t, mx;
};

// Calls f(x, j) for every finite value x >= floor_x of the row.
template <typename T, typename F>
__device__ __forceinline__ void for_each_value(const RowCtx<T>& c, float floor_x, F&& f) {
    for_each_in_row<T, 2>(c.row, 0, c.vocab, c.inv_t, -INFINITY, [&](const float(&x)[VecOf<T>::N], int64_t j0, int n) {
        for (int i = 0; i < n; ++i)
            if (x[i] >= floor_x && isfinite(x[i])) f(x[i], (uint32_t)(j0 + i));
    });
}

// One level: histograms the window's values, then thread 0 scans bins from
// the top for the first where `above + cumulative` reaches the target (for
// a mass criterion with target 0, the target is top_p times the level-0
// total, which is every finite value's mass: values more than WINDOW below
// the max have fixed-point mass 0). Sets sh.crossed, the next level, and
// sh.single_value when the chosen bin cannot be split further.
template <typename T>
__device__ void refine(Shared& sh, const RowCtx<T>& c, int criterion, float top_p, float floor_x) {
    for (int b = threadIdx.x; b < NB; b += THREADS) {
        sh.counts[b] = 0;
        sh.masses[b] = 0;
    }
    __syncthreads();
    const int depth = sh.depth;
    const Level lv = sh.levels[depth];
    for_each_value(c, floor_x, [&](float x, uint32_t) {
        if (place(sh.levels, depth, x) != 0 || (depth == 0 && (x < lv.lo || x > lv.hi))) return;
        const int b = lv.bin(x);
        atomicAdd(&sh.counts[b], 1u);
        atomicAdd(&sh.masses[b], (unsigned long long)fixed_mass(x, c.mx));
    });
    __syncthreads();
    if (threadIdx.x != 0) return;
    if (criterion == BY_MASS && sh.target == 0) {
        unsigned long long total = 0;
        for (int b = 0; b < NB; ++b) total += sh.masses[b];
        sh.target = (unsigned long long)((double)top_p * (double)total);
    }
    unsigned long long acc = criterion == BY_COUNT ? sh.above_count : sh.above_mass;
    sh.crossed = 0;
    for (int b = NB - 1; b >= 0; --b) {
        const unsigned long long add = criterion == BY_COUNT ? sh.counts[b] : sh.masses[b];
        if (sh.counts[b] > 0 && acc + add >= sh.target) {
            sh.crossed = 1;
            sh.levels[depth].chosen = b;
            sh.window_count = sh.counts[b];
            const float w = (lv.hi - lv.lo) / NB;
            const float lo = lv.lo + b * w, hi = fminf(lv.hi, lv.lo + (b + 1) * w);
            sh.single_value = !(hi > lo) || depth + 1 >= MAX_LEVELS;
            sh.levels[depth + 1] = make_level(lo, hi);
            return;
        }
        acc += add;
        sh.above_count += sh.counts[b];
        sh.above_mass += sh.masses[b];
    }
}

// Gathers the values inside the window (and above it if `with_above`).
template <typename T>
__device__ void collect(Shared& sh, const RowCtx<T>& c, bool with_above, float floor_x) {
    if (threadIdx.x == 0) sh.n_cand = 0;
    __syncthreads();
    const int depth = sh.depth;
    for_each_value(c, floor_x, [&](float x, uint32_t j) {
        const int where = place(sh.levels, depth, x);
        if (where == 0 || (with_above && where == 1)) {
            const unsigned int slot = atomicAdd(&sh.n_cand, 1u);
            if (slot < CAP) {
                sh.cand_x[slot] = x;
                sh.cand_j[slot] = j;
            }
        }
    });
    __syncthreads();
}

// The exact threshold over the finite values >= floor_x (>= lo): the k-th
// largest value (BY_COUNT, target k), or the smallest value whose mass of
// strictly greater values is < top_p of the total (BY_MASS; `target` 0 lets
// level 0 compute the total). Sets sh.tau, sh.kept_mass, and
// sh.collect_all when the sorted candidates hold every value >= tau.
template <typename T>
__device__ void find_threshold(Shared& sh, const RowCtx<T>& c, float lo, int criterion,
                               unsigned long long target, float top_p, float floor_x) {
    if (threadIdx.x == 0) {
        sh.depth = 0;
        sh.above_count = sh.above_mass = 0;
        sh.target = target;
        sh.levels[0] = make_level(fmaxf(lo, c.mx - WINDOW), c.mx);
    }
    __syncthreads();
    bool below_left = lo < sh.levels[0].lo;
    while (true) {
        refine(sh, c, criterion, top_p, floor_x);
        __syncthreads();
        if (!sh.crossed) {
            if (sh.depth == 0 && below_left) {
                // Go on among the finite values under the first window; the
                // ones already seen now lie above it.
                below_left = false;
                if (threadIdx.x == 0) sh.levels[0] = make_level(lo, nextafterf(sh.levels[0].lo, -INFINITY));
                __syncthreads();
                continue;
            }
            // The target is never reached: every value >= floor_x is kept.
            if (threadIdx.x == 0) {
                sh.tau = fmaxf(lo, floor_x);
                sh.kept_mass = sh.above_mass;
                sh.collect_all = 0;
            }
            __syncthreads();
            return;
        }
        if (threadIdx.x == 0) sh.depth += 1;  // the chosen bin is now the window
        __syncthreads();
        if (sh.window_count <= CAP || sh.single_value) break;
    }
    if (sh.single_value && sh.window_count > CAP) {
        // Too many values in a bin that cannot be split: all equal (or two
        // adjacent floats). Decide the group at once; the draw then makes a pass.
        if (threadIdx.x == 0) {
            const Level& w = sh.levels[sh.depth];
            const bool cut = criterion == BY_MASS && sh.above_mass >= sh.target;
            sh.tau = cut ? nextafterf(w.hi, INFINITY) : w.lo;
            sh.kept_mass = sh.above_mass + (cut ? 0 : sh.masses[sh.levels[sh.depth - 1].chosen]);
            sh.collect_all = 0;
        }
        __syncthreads();
        return;
    }
    const bool with_above = sh.above_count + sh.window_count <= CAP;
    collect(sh, c, with_above, floor_x);
    const unsigned int n = min(sh.n_cand, (unsigned int)CAP);
    sort_candidates(sh, n);
    if (threadIdx.x == 0) {
        // Walk the window's values in descending order, equal values as one
        // group, starting from the totals above the window.
        unsigned long long count = sh.above_count, mass = sh.above_mass;
        unsigned int i = 0;
        if (with_above) i = (unsigned int)sh.above_count;  // sorted first, already counted
        float tau = i > 0 ? sh.cand_x[i - 1] : INFINITY;
        while (i < n) {
            const float v = sh.cand_x[i];
            unsigned int group = 0;
            unsigned long long group_mass = 0;
            for (; i + group < n && sh.cand_x[i + group] == v; ++group) group_mass += fixed_mass(v, c.mx);
            if (criterion == BY_MASS && mass >= sh.target) break;  // strictly-greater mass reached: cut
            tau = v;
            count += group;
            mass += group_mass;
            i += group;
            if (criterion == BY_COUNT && count >= sh.target) break;
        }
        sh.tau = tau;
        sh.kept_mass = mass;
        sh.collect_all = with_above;
    }
    __syncthreads();
}

template <typename T>
__device__ void sample_row(const T* logits, int64_t vocab, float temperature, int64_t top_k, float top_p, float min_p,
                           uint64_t seed, uint64_t step, uint32_t* tokens, float* logp, uint32_t* status) {
    __shared__ Shared sh;
    __shared__ Softmax sm_scratch[32];
    __shared__ ArgMax arg_scratch[32];
    __shared__ MinMax mm_scratch[32];
    const int64_t row = blockIdx.x;
    const T* z = logits + row * vocab;
    const bool greedy = temperature == 0.f;
    const float inv_t = greedy ? 1.f : 1.f / temperature;
    const bool top_k_on = top_k > 0 && top_k < vocab, top_p_on = top_p < 1.f, min_p_on = min_p > 0.f;
    const bool filtered = !greedy && (top_k_on || top_p_on || min_p_on);
    Noise noise{make_uint2((uint32_t)seed, (uint32_t)(seed >> 32)), (uint32_t)row, (uint32_t)step,
                (uint32_t)(step >> 32)};

    // Pass 1: softmax state (for the log-prob), min/max of x, and the draw
    // itself when nothing is filtered (greedy: the argmax of z).
    Softmax st = Softmax::empty();
    ArgMax best = {-INFINITY, 0xFFFFFFFFu};
    MinMax mm = {INFINITY, -INFINITY};
    for_each_in_row<T, 2>(z, 0, vocab, inv_t, -INFINITY, [&](const float(&x)[VecOf<T>::N], int64_t j0, int n) {
        float y[VecOf<T>::N];
#pragma unroll
        for (int i = 0; i < VecOf<T>::N; ++i) y[i] = x[i] * LOG2E;
        st.add<false>(y);
        for (int i = 0; i < n; ++i) {
            if (isfinite(x[i])) mm = {fminf(mm.lo, x[i]), fmaxf(mm.hi, x[i])};
            if (!filtered) {
                const float key = greedy ? x[i] : x[i] + noise.gumbel((uint32_t)(j0 + i));
                best = BetterArg{}(best, {key, (uint32_t)(j0 + i)});
            }
        }
    });
    st = block_reduce(st, MergeSoftmax{}, sm_scratch);
    mm = block_reduce(mm, CombineMinMax{}, mm_scratch);
    if (!st.finite()) {
        if (threadIdx.x == 0) {
            raise(status, OP_SAMPLING, NON_FINITE, row);
            tokens[row] = 0;
            logp[row] = NAN;
        }
        return;
    }
    const float lse = st.lse();

    if (filtered) {
        const RowCtx<T> c = {z, vocab, inv_t, mm.hi};
        float tau = -INFINITY;
        bool all_in_smem = false;
        unsigned long long kept_mass = 0;  // 0: unknown (no top-k), level 0 computes it
        if (top_k_on) {
            find_threshold(sh, c, mm.lo, BY_COUNT, (unsigned long long)top_k, 1.f, -INFINITY);
            tau = sh.tau;
            kept_mass = sh.kept_mass;
            all_in_smem = sh.collect_all;
        }
        if (top_p_on) {
            if (all_in_smem) {
                // Every value >= tau_k is sorted in shared memory: walk them.
                if (threadIdx.x == 0) {
                    const unsigned long long target = (unsigned long long)((double)top_p * (double)kept_mass);
                    const unsigned int n = min(sh.n_cand, (unsigned int)CAP);
                    unsigned long long mass = 0;
                    float t = tau;
                    for (unsigned int i = 0; i < n && sh.cand_x[i] >= tau;) {
                        const float v = sh.cand_x[i];
                        if (mass >= target) break;
                        t = v;
                        for (; i < n && sh.cand_x[i] == v; ++i) mass += fixed_mass(v, mm.hi);
                    }
                    sh.tau = t;
                }
                __syncthreads();
            } else {
                const unsigned long long target =
                    top_k_on ? (unsigned long long)((double)top_p * (double)kept_mass) : 0;
                find_threshold(sh, c, fmaxf(mm.lo, tau), BY_MASS, target, top_p, tau);
                all_in_smem = sh.collect_all;
            }
            tau = fmaxf(tau, sh.tau);
        }
        if (min_p_on) tau = fmaxf(tau, mm.hi + logf(min_p));

        // The draw: among the sorted candidates when they hold every kept
        // value, else in one more pass over the row.
        best = {-INFINITY, 0xFFFFFFFFu};
        if (all_in_smem) {
            const unsigned int n = min(sh.n_cand, (unsigned int)CAP);
            for (unsigned int i = threadIdx.x; i < n; i += THREADS)
                if (sh.cand_x[i] >= tau)
                    best = BetterArg{}(best, {sh.cand_x[i] + noise.gumbel(sh.cand_j[i]), sh.cand_j[i]});
        } else {
            for_each_value(c, tau, [&](float x, uint32_t j) {
                best = BetterArg{}(best, {x + noise.gumbel(j), j});
            });
        }
    }
    best = block_reduce(best, BetterArg{}, arg_scratch);
    if (threadIdx.x == 0) {
        tokens[row] = best.index;
        logp[row] = to_float(z[best.index]) * inv_t - lse;
    }
}

}  // namespace

#define GK_SAMPLING_KERNEL(T, TN)                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        sample_##TN(const T* logits, int64_t vocab, float temperature, int64_t top_k, float top_p, float min_p, \
                    uint64_t seed, uint64_t step, uint32_t* tokens, float* logp, uint32_t* status) {           \
        sample_row<T>(logits, vocab, temperature, top_k, top_p, min_p, seed, step, tokens, logp, status);      \
    }

GK_FOR_EACH_FLOAT(GK_SAMPLING_KERNEL)
