// KL estimators per token, forward and backward (math in kl.cuh).
// Elementwise and grid-stride; memory-bound at any size that matters.
#include "common.cuh"
#include "kl.cuh"

using namespace gk;

// kl[i] = estimate(ref[i] - logp[i]); non-finite inputs, or an estimate
// that overflows f32, raise NON_FINITE.
extern "C" __global__ void kl_fwd(const float* logp, const float* ref, int64_t n, KlKind kind, float* kl,
                                  uint32_t* status) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float a = logp[i], b = ref[i], v = kl_estimate(kind, b - a).value;
        if (!isfinite(a) || !isfinite(b) || !isfinite(v)) raise(status, OP_KL, NON_FINITE, i);
        kl[i] = v;
    }
}

// dlogp[i] = grad[i] * d estimate / d logp; non-finite inputs or grad, or a
// result that overflows f32, raise NON_FINITE.
extern "C" __global__ void kl_bwd(const float* logp, const float* ref, const float* grad, int64_t n, KlKind kind,
                                  float* dlogp, uint32_t* status) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float a = logp[i], b = ref[i], v = grad[i] * kl_estimate(kind, b - a).grad_logp;
        if (!isfinite(a) || !isfinite(b) || !isfinite(grad[i]) || !isfinite(v)) raise(status, OP_KL, NON_FINITE, i);
        dlogp[i] = v;
    }
}
