// KL estimators of d = ref_logp - logp (Schulman, "Approximating KL
// Divergence", 2020), shared by the standalone op (kl.cu) and the policy
// loss (policy_loss.cu). Mirrors `KlEstimator::{value, grad_logp}` in
// src/ops/kl.rs.
#pragma once

#include "abi.h"

namespace gk {

// verl's low_var_kl bounds: d clamped to +-20, the estimate to +-10.
constexpr float LOW_VAR_D_CLAMP = 20.f, LOW_VAR_KL_CLAMP = 10.f;

struct KlValueGrad {
    float value;      // the estimate
    float grad_logp;  // d(value) / d(logp)
};

// e^d - 1 - d without the cancellation near 0: on |d| <= ln2/2 it is d^2 p(d)
// with the Cephes polynomial of e^r = 1 + r + r^2 p(r) (as math::exp_excess on
// the CPU); elsewhere the subtraction loses nothing that matters. e^d
// saturates at e^88.37 (about 2.4e38) as the CPU's does, never inf.
__device__ __forceinline__ float exp_excess(float d) {
    if (fabsf(d) <= 0.3465736f) {
        float p = 1.9875691e-4f;
        p = fmaf(p, d, 1.3981999e-3f);
        p = fmaf(p, d, 8.333452e-3f);
        p = fmaf(p, d, 4.1665796e-2f);
        p = fmaf(p, d, 1.6666665e-1f);
        p = fmaf(p, d, 0.5f);
        return p * (d * d);
    }
    return expf(fminf(d, 88.37f)) - d - 1.f;
}

// k1 = -d; k2 = d^2 / 2; k3 = e^d - d - 1 (gradient 1 - e^d = -(d + k3));
// low_var: k3 with clamps, zero gradient where a clamp is active; abs = |d|
// (gradient -sign(d), 0 at 0 as torch's); the straight-through kinds (`_ST`,
// verl's `+`): the named value with k2's gradient -d.
__device__ __forceinline__ KlValueGrad kl_estimate(int kind, float d) {
    switch (kind) {
        case KL_K1: return {-d, 1.f};
        case KL_K1_ST: return {-d, -d};
        case KL_K2: return {0.5f * d * d, -d};
        case KL_K3: {
            const float k = exp_excess(d);
            return {k, -(d + k)};
        }
        case KL_ABS: return {fabsf(d), d > 0.f ? -1.f : (d < 0.f ? 1.f : 0.f)};
        case KL_ABS_ST: return {fabsf(d), -d};
        default: {  // KL_LOW_VAR_K3, KL_LOW_VAR_K3_ST
            const float dc = fminf(fmaxf(d, -LOW_VAR_D_CLAMP), LOW_VAR_D_CLAMP);
            const float k = exp_excess(dc);
            const bool free = dc == d && k <= LOW_VAR_KL_CLAMP;
            const float grad = kind == KL_LOW_VAR_K3_ST ? -d : (free ? -(d + k) : 0.f);
            return {fminf(k, LOW_VAR_KL_CLAMP), grad};
        }
    }
}

}  // namespace gk
