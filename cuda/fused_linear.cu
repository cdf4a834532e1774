// Fused linear log-probs (math: src/ops/fused_linear.rs): the kernels that
// run between cuBLAS GEMMs (host loops: src/cuda/fused_linear.rs). The host
// loops over row chunks, then vocab chunks; each GEMM writes an f32 logits
// tile [rows, cols] for columns [col0, col0 + cols) of a vocabulary of
// `vocab`, which these kernels fold into per-row softmax states (forward)
// or turn into dlogits (backward), with the row math of logprob.cuh.
// [N, V] logits never exist.
#include "logprob.cuh"

using namespace gk;

namespace {

// Forward, one tile of rows [row0, row0 + gridDim.x): each row's state over
// the tile's columns into partials[row * chunks + chunk]; the target's raw
// logit into target_logits[row] when the target falls in the tile. Rows
// index the whole batch; the tile holds only its own. grid (tile rows).
template <typename I>
__device__ void tile_fwd(const float* tile, int64_t cols, int64_t col0, int64_t vocab, int64_t row0,
                         const I* targets, const uint8_t* mask, int64_t ignore_index, int has_ignore, float inv_t,
                         int entropy, int64_t chunk, int64_t chunks, Softmax* partials, float* target_logits) {
    const int64_t row = row0 + blockIdx.x;
    const RowSpec spec = row_spec(targets, mask, row, vocab, ignore_index, has_ignore);
    if (spec.target < 0 || !spec.in_range) return;  // the merge reports and fills these rows
    const float* x = tile + blockIdx.x * cols;
    const Softmax st = entropy ? slice_state<true>(x, 0, cols, inv_t) : slice_state<false>(x, 0, cols, inv_t);
    if (threadIdx.x != 0) return;
    partials[row * chunks + chunk] = st;
    const int64_t y = spec.target - col0;
    if (y >= 0 && y < cols) target_logits[row] = x[y];
}

// Backward, one tile: dlogits for the tile's columns, read from the f32 tile
// and written in the GEMM dtype T; zero for skipped rows, NaN for rows whose
// target is out of range, or whose saved values or upstream gradients are
// not finite or bound a gradient beyond T (raised once per row).
// grid (tile rows).
template <typename T, typename I>
__device__ void tile_bwd(const float* tile, T* dtile, int64_t cols, int64_t col0, int64_t vocab, int64_t row0,
                         const I* targets, const uint8_t* mask, int64_t ignore_index, int has_ignore, float inv_t,
                         const float* lse, const float* entropy, const float* grad_logp, const float* grad_entropy,
                         const float* grad_lse, uint32_t* status) {
    const int64_t row = row0 + blockIdx.x;
    const RowSpec spec = row_spec(targets, mask, row, vocab, ignore_index, has_ignore);
    const bool first = col0 == 0 && threadIdx.x == 0;
    if (!spec.in_range && first) raise(status, OP_FUSED_LINEAR, TOKEN_OUT_OF_RANGE, row);
    const bool live = spec.target >= 0 && spec.in_range;
    const float l = live ? lse[row] : 0.f, h = live && grad_entropy ? entropy[row] : 0.f;
    const float g = live ? grad_logp[row] : 0.f, g_h = live && grad_entropy ? grad_entropy[row] : 0.f;
    const float g_l = live && grad_lse ? grad_lse[row] : 0.f;
    const bool bad = live && !backward_row_ok<T>(inv_t, l, h, g, g_h, g_l);
    if (bad && first) raise(status, OP_FUSED_LINEAR, NON_FINITE, row);
    const int64_t local = blockIdx.x;
    backward_slice(tile + local * cols, dtile + local * cols, spec, bad, col0, 0, cols, inv_t, l, h, g, g_h, g_l);
}

// The hidden states of rows [row0, row0 + gridDim.x) with skipped rows
// zeroed, for the weight gradient's GEMM: a skipped row's dlogits are 0,
// but 0 times a NaN hidden state (padding may hold anything) is NaN.
// grid (rows), 256 threads.
template <typename T, typename I>
__device__ void active_hidden(const T* hidden, T* out, int64_t hidden_size, int64_t row0, const I* targets,
                              const uint8_t* mask, int64_t ignore_index, int has_ignore) {
    const int64_t row = row0 + blockIdx.x;
    const bool active = row_spec(targets, mask, row, INT64_MAX, ignore_index, has_ignore).target >= 0;
    const T* src = hidden + row * hidden_size;
    T* dst = out + blockIdx.x * hidden_size;
    for (int64_t j = threadIdx.x; j < hidden_size; j += blockDim.x) dst[j] = active ? src[j] : from_float<T>(0.f);
}

}  // namespace

// Per dtype: bias added to a tile (bias offset to the chunk), the f32 dhidden
// accumulator cast to the output dtype, a fill (the ones of db's GEMV), and
// the check of a finished gradient (dz W and dz^T h can overflow where dz
// does not): a non-finite element raises NON_FINITE with its index, unless
// a row already raised a fault (its NaN would be reported again, at a
// smaller index than the row's).
#define GK_FUSED_FLOAT_KERNELS(T, TN)                                                                          \
    extern "C" __global__ void fused_add_bias_##TN(float* tile, const T* bias, int64_t rows, int64_t cols) {   \
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * cols;                      \
             i += (int64_t)gridDim.x * blockDim.x)                                                             \
            tile[i] += to_float(bias[i % cols]);                                                               \
    }                                                                                                          \
    extern "C" __global__ void fused_cast_##TN(const float* src, T* dst, int64_t n) {                          \
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) \
            dst[i] = from_float<T>(src[i]);                                                                    \
    }                                                                                                          \
    extern "C" __global__ void fused_fill_##TN(T* dst, float value, int64_t n) {                               \
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) \
            dst[i] = from_float<T>(value);                                                                     \
    }                                                                                                          \
    extern "C" __global__ void fused_check_finite_##TN(const T* x, int64_t n, uint32_t* status) {              \
        if (status[0] & (0xFu << (4u * OP_FUSED_LINEAR))) return;                                              \
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) \
            if (!isfinite(to_float(x[i]))) raise(status, OP_FUSED_LINEAR, NON_FINITE, i);                      \
    }

#define GK_FUSED_ID_KERNELS(I, IN)                                                                             \
    extern "C" __global__ void __launch_bounds__(LOGPROB_THREADS) fused_tile_fwd_##IN(                         \
        const float* tile, int64_t cols, int64_t col0, int64_t vocab, int64_t row0, const I* targets,          \
        const uint8_t* mask, int64_t ignore_index, int has_ignore, float inv_t, int entropy, int64_t chunk,    \
        int64_t chunks, Softmax* partials, float* target_logits) {                                             \
        tile_fwd<I>(tile, cols, col0, vocab, row0, targets, mask, ignore_index, has_ignore, inv_t, entropy,    \
                    chunk, chunks, partials, target_logits);                                                   \
    }                                                                                                          \
    extern "C" __global__ void fused_merge_##IN(const float* target_logits, const I* targets,                  \
                                                const uint8_t* mask, int64_t rows, int64_t vocab,              \
                                                int64_t ignore_index, int has_ignore, float inv_t,             \
                                                int64_t chunks, const Softmax* partials, float* logp,          \
                                                float* entropy, float* lse, uint32_t* status) {                \
        merge_rows<float, I>(nullptr, target_logits, targets, mask, rows, vocab, ignore_index, has_ignore,     \
                             inv_t, chunks, partials, logp, entropy, lse, status, OP_FUSED_LINEAR);            \
    }

#define GK_FUSED_BWD_KERNEL(T, TN, I, IN)                                                                      \
    extern "C" __global__ void __launch_bounds__(LOGPROB_THREADS) fused_tile_bwd_##TN##_##IN(                  \
        const float* tile, T* dtile, int64_t cols, int64_t col0, int64_t vocab, int64_t row0, const I* targets, \
        const uint8_t* mask, int64_t ignore_index, int has_ignore, float inv_t, const float* lse,              \
        const float* entropy, const float* grad_logp, const float* grad_entropy, const float* grad_lse,        \
        uint32_t* status) {                                                                                    \
        tile_bwd<T, I>(tile, dtile, cols, col0, vocab, row0, targets, mask, ignore_index, has_ignore, inv_t,   \
                       lse, entropy, grad_logp, grad_entropy, grad_lse, status);                               \
    }                                                                                                          \
    extern "C" __global__ void fused_active_hidden_##TN##_##IN(const T* hidden, T* out, int64_t hidden_size,   \
                                                              int64_t row0, const I* targets,                  \
                                                              const uint8_t* mask, int64_t ignore_index,       \
                                                              int has_ignore) {                                \
        active_hidden<T, I>(hidden, out, hidden_size, row0, targets, mask, ignore_index, has_ignore);          \
    }

GK_FOR_EACH_FLOAT(GK_FUSED_FLOAT_KERNELS)
GK_FUSED_ID_KERNELS(uint32_t, u32)
GK_FUSED_ID_KERNELS(int32_t, i32)
GK_FUSED_ID_KERNELS(int64_t, i64)
GK_FOR_EACH_FLOAT_ID(GK_FUSED_BWD_KERNEL)
