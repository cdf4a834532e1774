// KL estimators of d = ref_logp - logp (Schulman, "Approximating KL
// Divergence", 2020), shared by the standalone op (kl.cu) and the policy
// loss (policy_loss.cu). Mirrors `KlEstimator::{value, grad_logp}` in
// src/ops/kl.rs.
#pragma once

namespace gk {

enum KlKind : int { KL_K1 = 0, KL_K2 = 1, KL_K3 = 2, KL_LOW_VAR_K3 = 3 };

// verl's low_var_kl bounds: d clamped to +-20, the estimate to +-10.
constexpr float LOW_VAR_D_CLAMP = 20.f, LOW_VAR_KL_CLAMP = 10.f;

struct KlValueGrad {
    float value;      // the estimate
    float grad_logp;  // d(value) / d(logp)
};

// k1 = -d; k2 = d^2 / 2; k3 = e^d - d - 1 (gradient 1 - e^d); low_var: k3 with
// clamps, zero gradient where a clamp is active.
__device__ __forceinline__ KlValueGrad kl_estimate(int kind, float d) {
    switch (kind) {
        case KL_K1: return {-d, 1.f};
        case KL_K2: return {0.5f * d * d, -d};
        case KL_K3: {
            const float ed = expf(d);
            return {ed - d - 1.f, 1.f - ed};
        }
        default: {
            const float dc = fminf(fmaxf(d, -LOW_VAR_D_CLAMP), LOW_VAR_D_CLAMP);
            const float ed = expf(dc), k = ed - dc - 1.f;
            const bool d_free = dc == d, k_free = k >= -LOW_VAR_KL_CLAMP && k <= LOW_VAR_KL_CLAMP;
            return {fminf(fmaxf(k, -LOW_VAR_KL_CLAMP), LOW_VAR_KL_CLAMP), d_free && k_free ? 1.f - ed : 0.f};
        }
    }
}

}  // namespace gk
