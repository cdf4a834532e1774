// One token's clipped policy loss and KL penalty on the GPU, shared by the
// policy loss (policy_loss.cu) and the fused LM-head loss
// (fused_linear_loss.cu). Math: src/ops/policy_loss.rs.
#pragma once

#include "kl.cuh"

namespace gk {

// VESPO's per-token log-ratio clamp and the bounds of its sequence log w
// (TRL 1.16 get_gamma_weights), and its floor on lambda.
constexpr float VESPO_TOKEN_CLAMP = 20.f;
constexpr float VESPO_LOG_W_MIN = -18.420681f;  // ln(1e-8)
constexpr float VESPO_LAMBDA_MIN = 1e-4f;
// Largest log-ratio whose exponential is taken as finite without a clamp.
constexpr float MAX_LOG_RATIO = 88.5f;

// The loss parameters one token needs. Members after `kl_kind` default to
// the plain clipped loss (the fused LM-head loss sets none of them).
struct TokenParams {
    float eps_low, eps_high, dual_clip;  // dual_clip 0 = off
    float log_ratio_clamp, beta;         // log_ratio_clamp +inf = off
    KlKind kl_kind;
    Objective objective;
    float delta;               // Clip's delta, 0 = off
    float a, b, c, d;          // the objective's parameters (PolicyLossParams' obj_*)
    bool kl_bias_correction;
};

// One token's inputs beside the parameters.
struct TokenIn {
    float log_ratio;  // unclamped: the token's, or its sequence's mean
    float adv;
    float d_ref;      // ref - logp (with a reference model)
    float logp;
    float pg_weight;  // 1 when absent
    float seq_log_w;  // VESPO's clamped sequence log w
};

// One token's loss pieces. Gradient flows through the unclipped term iff it
// is the larger loss (ties flow: inside the clip range both are equal).
struct TokenTerms {
    float ratio, loss, kl, dloss_dlogp;
    bool clip_low, clip_high, dual;
};

// One token's loss (math: src/ops/policy_loss.rs, `token_loss`), with a
// reference model iff `has_ref`.
__device__ __forceinline__ TokenTerms token_loss(const TokenParams& p, const TokenIn& x, bool has_ref) {
    const float lr = x.log_ratio, adv = x.adv;
    const float lr_c = fminf(fmaxf(lr, -p.log_ratio_clamp), p.log_ratio_clamp);
    const float r = lr_c > MAX_LOG_RATIO ? INFINITY : expf(lr_c);
    const float dr = lr_c == lr ? r : 0.f;  // d r / dlogp; 0 where clamped
    float pg, dpg;
    bool clip_low = false, clip_high = false, dual = false;
    switch (p.objective) {
        case OBJ_CISPO: {
            clip_low = r < p.a && adv < 0.f;
            clip_high = r > p.b && adv > 0.f;
            const float w = fminf(fmaxf(r, p.a), p.b);
            pg = -w * adv * x.logp;
            dpg = -w * adv;
            break;
        }
        case OBJ_SAPO: {
            const float tau = adv > 0.f ? p.a : p.b;
            const float e = expf(-tau * (r - 1.f)), s = 1.f / (1.f + e);
            const float one_minus_s = e < 1.f ? e * s : 1.f - s;  // no cancellation near s = 1
            pg = -s * (4.f / tau) * adv;
            dpg = -adv * 4.f * s * one_minus_s * dr;
            break;
        }
        case OBJ_VESPO: {
            const float k = adv >= 0.f ? p.a : p.c;
            const float lambda = fmaxf(adv >= 0.f ? p.b : p.d, VESPO_LAMBDA_MIN);
            const float log_phi = lambda + k * x.seq_log_w - lambda * expf(x.seq_log_w);
            const float phi = log_phi > 88.f ? 0.f : expf(log_phi);  // TRL: posinf -> 0
            pg = -phi * adv * x.logp;
            dpg = -phi * adv;
            break;
        }
        default: {
            const float lo = 1.f - p.eps_low, hi = 1.f + p.eps_high;
            const float delta = p.delta > 0.f ? p.delta : INFINITY;
            const float r_clip = fminf(fmaxf(r, lo), hi);
            const float unclipped = -fminf(r, delta) * adv, clipped = -r_clip * adv;
            const float d_unclipped = r <= delta ? -adv * dr : 0.f;
            const float d_clipped = r >= lo && r <= hi ? -adv * dr : 0.f;
            // As torch: each clamp passes its gradient inside its bounds, a tie splits it.
            pg = fmaxf(unclipped, clipped);
            dpg = unclipped > clipped   ? d_unclipped
                  : clipped > unclipped ? d_clipped
                                        : 0.5f * (d_unclipped + d_clipped);
            clip_low = r < lo && adv < 0.f;
            clip_high = r > hi && adv > 0.f;
            if (p.dual_clip > 0.f && adv < 0.f && pg > -p.dual_clip * adv) {
                pg = -p.dual_clip * adv;
                dpg = 0.f;
                dual = true;
            }
        }
    }
    float kl = 0.f, dkl = 0.f;
    if (has_ref) {
        const KlValueGrad k = kl_estimate(p.kl_kind, x.d_ref);
        kl = k.value;
        dkl = k.grad_logp;
        if (p.kl_bias_correction) {
            dkl = dkl * r + kl * dr;
            kl = kl * r;
        }
    }
    return {r, x.pg_weight * pg + p.beta * kl, kl, x.pg_weight * dpg + p.beta * dkl, clip_low, clip_high, dual};
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
