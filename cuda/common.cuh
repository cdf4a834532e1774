// The kernels' shared toolkit: element conversion, 16-byte vector access
// to rows of any alignment, warp and block reductions over any associative
// combine, the online softmax state, and the status word through which
// kernels report bad data without a host round trip.
//
// Every kernel file includes this, which includes abi.h (what the host
// must agree on); each op family's kernels live in their own .cu file, with
// row math shared between families in a header of its own (logprob.cuh,
// kl.cuh).
#pragma once

#include "abi.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace gk {

// ---------------------------------------------------------------- elements

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// The largest finite value of each element type, as a float: a result
// stored in that type must not exceed it in magnitude.
template <typename T> __device__ __forceinline__ float max_finite();
template <> __device__ __forceinline__ float max_finite<float>() { return 3.40282347e38f; }
template <> __device__ __forceinline__ float max_finite<__nv_bfloat16>() { return 3.38953139e38f; }
template <> __device__ __forceinline__ float max_finite<__half>() { return 65504.f; }

// Token ids as i64, whatever their storage type.
__device__ __forceinline__ int64_t to_id(uint32_t x) { return (int64_t)x; }
__device__ __forceinline__ int64_t to_id(int32_t x) { return (int64_t)x; }
__device__ __forceinline__ int64_t to_id(int64_t x) { return x; }

// ------------------------------------------------------------ status word
// Layout and ids in abi.h. The index words are lowered with atomicMin.

__device__ __forceinline__ void raise(uint32_t* status, OpId op, StatusKind kind, uint64_t index) {
    atomicOr(status, 1u << (4u * op + kind));
    atomicMin(status + 1 + kind, (uint32_t)min(index, (uint64_t)0xFFFFFFFEu));
}

// ------------------------------------------------------------ sequences

// Sequence s's token range [*begin, *end) of `tokens`: s * seq_len onward
// when padded (cu_seqlens null), else cu_seqlens[s] to cu_seqlens[s + 1].
// Offsets that decrease, pass `tokens`, or do not start at 0 and end at
// `tokens` raise BAD_LAYOUT for `op` (thread 0) and read as empty.
__device__ __forceinline__ void seq_range(const uint32_t* cu_seqlens, int64_t seq_len, int64_t seqs, int64_t tokens,
                                          int64_t s, OpId op, int64_t* begin, int64_t* end, uint32_t* status) {
    if (!cu_seqlens) {
        *begin = s * seq_len;
        *end = *begin + seq_len;
        return;
    }
    const int64_t a = cu_seqlens[s], b = cu_seqlens[s + 1];
    const bool ok = a <= b && b <= tokens && (s != 0 || a == 0) && (s != seqs - 1 || b == tokens);
    if (!ok) {
        if (threadIdx.x == 0) raise(status, op, BAD_LAYOUT, s);
        *begin = *end = 0;
        return;
    }
    *begin = a;
    *end = b;
}

// The same from a kernel's parameters (`cu_seqlens`, `seq_len`, `seqs`, `tokens`).
template <typename P>
__device__ __forceinline__ void seq_range(const P& p, OpId op, int64_t s, int64_t* begin, int64_t* end,
                                          uint32_t* status) {
    seq_range(p.cu_seqlens, p.seq_len, p.seqs, p.tokens, s, op, begin, end, status);
}

// ------------------------------------------------------------ reductions

struct Sum {
    template <typename V> __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
struct Max {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Shuffles a value of any trivially copyable type made of 32-bit words.
template <typename V> __device__ __forceinline__ V shfl_xor(V v, int lane_mask) {
    static_assert(sizeof(V) % 4 == 0, "shuffled types are made of 32-bit words");
    union { V v; uint32_t w[sizeof(V) / 4]; } u;
    u.v = v;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(V) / 4); ++i) u.w[i] = __shfl_xor_sync(0xffffffffu, u.w[i], lane_mask);
    return u.v;
}

// All lanes of the warp get the combination of the warp's values.
template <typename V, typename Op> __device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) v = op(v, shfl_xor(v, mask));
    return v;
}

// All threads of the block get the combination of the block's values, in a
// fixed order (so results are deterministic run to run). `scratch` holds
// one V per warp; blockDim.x is a multiple of 32, at most 1024.
template <typename V, typename Op> __device__ __forceinline__ V block_reduce(V v, Op op, V* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_reduce(v, op);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < warps; ++w) v = op(v, scratch[w]);
    return v;
}

// ------------------------------------------------------ online softmax
// 2^x on the special-function unit: relative error ~2^-22, subnormal results
// flushed to 0 (they are below any probability that matters), 2^-inf = 0.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// State of a set of values x, kept in base 2 so each value costs one FMA and
// one ex2: the kernels feed y = x * log2(e), and the state holds
// m = max y, s = sum 2^(y-m), e = sum 2^(y-m) (y-m).
// Then logsumexp(x) = (m + log2 s) ln 2 and the entropy of softmax(x) is
// (log2 s - e / s) ln 2. States of disjoint sets merge exactly. The CPU
// reference (src/ops/math.rs) keeps the same state in base e.
struct Softmax {
    float m, s, e;

    __device__ __forceinline__ static Softmax empty() { return {-INFINITY, 0.f, 0.f}; }

    // Re-expresses the state relative to a larger maximum.
    __device__ __forceinline__ Softmax rebase(float new_m) const {
        if (s == 0.f || new_m == m) return {new_m, s, e};
        const float delta = m - new_m, a = exp2_approx(delta);
        return {new_m, a * s, a * (e + delta * s)};
    }

    // Adds N values (base-2 scaled): one rebase per vector, one ex2 per
    // value; the entropy sum only when it is wanted.
    template <bool ENTROPY, int N> __device__ __forceinline__ void add(const float (&y)[N]) {
        float vm = y[0];
#pragma unroll
        for (int i = 1; i < N; ++i) vm = fmaxf(vm, y[i]);
        if (vm > m) *this = rebase(vm);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float d = y[i] - m, p = exp2_approx(d);
            s += p;
            if (ENTROPY) e += p > 0.f ? p * d : 0.f;  // -inf values: p = 0, d = -inf
        }
    }

    __device__ __forceinline__ Softmax merge(const Softmax& o) const {
        const float nm = fmaxf(m, o.m);
        if (nm == -INFINITY) return empty();
        const Softmax a = rebase(nm), b = o.rebase(nm);
        return {nm, a.s + b.s, a.e + b.e};
    }

    // False when a value was NaN or +inf, or none was finite.
    __device__ __forceinline__ bool finite() const {
        return isfinite(m) && isfinite(s) && isfinite(e) && s > 0.f;
    }
    // Natural-log results.
    __device__ __forceinline__ float lse() const { return (m + __log2f(s)) * LN2; }
    __device__ __forceinline__ float entropy() const { return (__log2f(s) - e / s) * LN2; }
};

// Split forwards write these states to memory the host allocates as
// `SoftmaxPartial`s: one layout.
static_assert(sizeof(Softmax) == sizeof(SoftmaxPartial) && offsetof(Softmax, m) == offsetof(SoftmaxPartial, m) &&
                  offsetof(Softmax, s) == offsetof(SoftmaxPartial, s) &&
                  offsetof(Softmax, e) == offsetof(SoftmaxPartial, e),
              "Softmax is stored as a SoftmaxPartial");

struct MergeSoftmax {
    __device__ __forceinline__ Softmax operator()(const Softmax& a, const Softmax& b) const { return a.merge(b); }
};

// ------------------------------------------------------ row traversal
// Visits x[begin, end) of a row, split among the block's threads, with
// 16-byte loads on the aligned middle and scalar loads on the ends (rows of
// a [rows, V] buffer are 16-byte aligned only when V * sizeof(T) is).
// `f(vals, j0, n)` gets n = VEC values starting at column j0, or n = 1 on
// the ends (vals[1..] then hold `pad`). UNROLL vectors are loaded before
// any is used, to keep enough bytes in flight.
// A plain type of exactly B bytes (B = 8 or 16), for vector loads/stores.
template <int B> struct Bytes;
template <> struct alignas(16) Bytes<16> { uint4 v; };
template <> struct alignas(8) Bytes<8> { uint2 v; };

template <typename T> struct VecOf {
    static constexpr int N = 16 / sizeof(T);
};

template <typename T, int UNROLL, typename F>
__device__ __forceinline__ void for_each_in_row(const T* __restrict__ row, int64_t begin, int64_t end, float scale,
                                                       float pad, F&& f) {
    constexpr int N = VecOf<T>::N;
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const uintptr_t addr = reinterpret_cast<uintptr_t>(row + begin);
    const int64_t head = min((int64_t)(((16 - addr % 16) % 16) / sizeof(T)), end - begin);
    const int64_t body_vecs = (end - begin - head) / N;
    const int64_t body_end = begin + head + body_vecs * N;

    auto scalar = [&](int64_t j) {
        float v[N];
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = pad;
        v[0] = to_float(row[j]) * scale;
        f(v, j, 1);
    };
    for (int64_t j = begin + tid; j < begin + head; j += nthreads) scalar(j);

    const uint4* body = reinterpret_cast<const uint4*>(row + begin + head);
    for (int64_t base = 0; base < body_vecs; base += (int64_t)nthreads * UNROLL) {
        uint4 raw[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int64_t k = base + (int64_t)u * nthreads + tid;
            if (k < body_vecs) raw[u] = __ldg(body + k);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int64_t k = base + (int64_t)u * nthreads + tid;
            if (k < body_vecs) {
                const T* t = reinterpret_cast<const T*>(&raw[u]);
                float v[N];
#pragma unroll
                for (int i = 0; i < N; ++i) v[i] = to_float(t[i]) * scale;
                f(v, begin + head + k * N, N);
            }
        }
    }
    for (int64_t j = body_end + tid; j < end; j += nthreads) scalar(j);
}

// Writes y[begin, end) of a row from x: y[j] = g(x[j] * scale, j), x and y
// possibly of different types (or the same buffer). 16-byte vectors when
// both rows allow them at the same element offsets.
template <typename Tin, typename Tout, typename G>
__device__ __forceinline__ void map_row(const Tin* x, Tout* y, int64_t begin, int64_t end, float scale, G&& g) {
    constexpr int N = VecOf<Tin>::N < VecOf<Tout>::N ? VecOf<Tin>::N : VecOf<Tout>::N;
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const uintptr_t ax = reinterpret_cast<uintptr_t>(x + begin), ay = reinterpret_cast<uintptr_t>(y + begin);
    constexpr uintptr_t in_bytes = N * sizeof(Tin), out_bytes = N * sizeof(Tout);
    int64_t head = (int64_t)(((in_bytes - ax % in_bytes) % in_bytes) / sizeof(Tin));
    // Vectors only when the output is aligned at the same element offset.
    if ((ay + head * sizeof(Tout)) % out_bytes != 0) head = end - begin;
    head = min(head, end - begin);
    const int64_t body_vecs = (end - begin - head) / N;
    const int64_t body_end = begin + head + body_vecs * N;

    for (int64_t j = begin + tid; j < begin + head; j += nthreads) y[j] = from_float<Tout>(g(to_float(x[j]) * scale, j));
    for (int64_t k = tid; k < body_vecs; k += nthreads) {
        const int64_t j0 = begin + head + k * N;
        Tin in[N];
        Tout out[N];
        // Not __ldg: x may alias y.
        *reinterpret_cast<Bytes<in_bytes>*>(in) = *reinterpret_cast<const Bytes<in_bytes>*>(x + j0);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = from_float<Tout>(g(to_float(in[i]) * scale, j0 + i));
        *reinterpret_cast<Bytes<out_bytes>*>(y + j0) = *reinterpret_cast<const Bytes<out_bytes>*>(out);
    }
    for (int64_t j = body_end + tid; j < end; j += nthreads) y[j] = from_float<Tout>(g(to_float(x[j]) * scale, j));
}

}  // namespace gk

// Declares extern "C" instantiations of a kernel template for every logit
// dtype: NAME_f32, NAME_bf16, NAME_f16.
#define GK_FOR_EACH_FLOAT(M) M(float, f32) M(__nv_bfloat16, bf16) M(__half, f16)
// ... and for every (logit dtype, token id dtype) pair.
#define GK_FOR_EACH_FLOAT_ID(M)                                                                            \
    M(float, f32, uint32_t, u32) M(float, f32, int32_t, i32) M(float, f32, int64_t, i64)                 \
    M(__nv_bfloat16, bf16, uint32_t, u32) M(__nv_bfloat16, bf16, int32_t, i32)                            \
    M(__nv_bfloat16, bf16, int64_t, i64) M(__half, f16, uint32_t, u32) M(__half, f16, int32_t, i32)       \
    M(__half, f16, int64_t, i64)
