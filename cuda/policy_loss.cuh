// One token's clipped policy loss and KL penalty on the GPU, shared by the
// policy loss (policy_loss.cu) and the fused LM-head loss
// (fused_linear_loss.cu). Math: src/ops/policy_loss.rs.
#pragma once

#include "kl.cuh"

namespace gk {

// The loss parameters one token needs.
struct TokenParams {
    float eps_low, eps_high, dual_clip;  // dual_clip 0 = off
    float log_ratio_clamp, beta;
    KlKind kl_kind;
};

// One token's loss pieces. Gradient flows through the unclipped term iff it
// is the larger loss (ties flow: inside the clip range both are equal).
struct TokenTerms {
    float ratio, loss, kl, dloss_dlogp;
    bool clip_low, clip_high, dual;
};

// From the (unclamped) importance log-ratio `lr`, the advantage and, with a
// reference model, `d_ref = ref - logp`.
__device__ __forceinline__ TokenTerms token_loss(const TokenParams& p, float lr, float adv, bool has_ref, float d_ref) {
    const float lr_c = fminf(fmaxf(lr, -p.log_ratio_clamp), p.log_ratio_clamp);
    const float r = expf(lr_c);
    const float r_clip = fminf(fmaxf(r, 1.f - p.eps_low), 1.f + p.eps_high);
    const float unclipped = -r * adv, clipped = -r_clip * adv;
    float pg = fmaxf(unclipped, clipped);
    float dpg = unclipped >= clipped && lr_c == lr ? -adv * r : 0.f;  // d(-r A)/dlogp = -A r
    bool dual = false;
    if (p.dual_clip > 0.f && adv < 0.f && pg > -p.dual_clip * adv) {
        pg = -p.dual_clip * adv;
        dpg = 0.f;
        dual = true;
    }
    float kl = 0.f, dkl = 0.f;
    if (has_ref) {
        const KlValueGrad k = kl_estimate(p.kl_kind, d_ref);
        kl = k.value;
        dkl = k.grad_logp;
    }
    return {r, pg + p.beta * kl, kl, dpg + p.beta * dkl, r < 1.f - p.eps_low && adv < 0.f,
            r > 1.f + p.eps_high && adv > 0.f, dual};
}

// Folds two PolicyLossPartial (a sequence's sums in the policy loss, a
// row's in the fused LM-head loss): sums, and the max of `ratio_max`.
struct CombinePartial {
    __device__ __forceinline__ PolicyLossPartial operator()(const PolicyLossPartial& a,
                                                            const PolicyLossPartial& b) const {
        return {a.loss + b.loss,           a.count + b.count, a.clip_low + b.clip_low, a.clip_high + b.clip_high,
                a.dual + b.dual,           a.ratio_sum + b.ratio_sum, fmaxf(a.ratio_max, b.ratio_max),
                a.kl_sum + b.kl_sum};
    }
};

}  // namespace gk
