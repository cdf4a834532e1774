// The ABI shared by the kernels and their Rust launchers: every enum, struct
// and constant whose value or layout both sides must agree on, declared once.
// build.rs generates the Rust side from this file (src/cuda/abi.rs includes
// it), as cudarc's `sys` is generated from a C header, and each
// `static_assert` below becomes a compile-time assert on both sides.
// Kernel argument lists are not here: each kernel is declared once in Rust
// (`kernels!` in src/cuda/abi.rs) and checked against the PTX's `.entry`.
//
// build.rs reads this file without a C parser, so it keeps to a small
// grammar, and any other line fails the build:
//   // comment                                (becomes the next item's doc)
//   enum Name : int { A = 0, B = 1 };          (explicit values; int or uint32_t)
//   struct Name {                              (one field per line, types:
//       float field;                            float double bool int uint32_t
//   };                                          int64_t uint64_t, an enum above,
//                                               any pointer: a device address)
//   constexpr int NAME = 512;
//   static_assert(sizeof(Name) == 32, "...");
//   static_assert(offsetof(Name, field) == 8, "...");
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace gk {

// ------------------------------------------------------------ block sizes
// Threads per block where a kernel depends on it (`__launch_bounds__`,
// shared arrays sized per warp); the launchers use the same constants.

// The log-prob forward and backward, and the fused linear tile kernels.
constexpr int LOGPROB_THREADS = 512;
// `group_advantages`: one block for the whole batch.
constexpr int ADVANTAGES_THREADS = 1024;
// The policy loss forward and backward: one block per sequence.
constexpr int POLICY_LOSS_THREADS = 256;
// `sample_*`: one block per row.
constexpr int SAMPLING_THREADS = 1024;
// The fused LM-head loss's sequence counts, their total and its summary.
constexpr int FUSED_LOSS_THREADS = 256;
// The corrections' per-sequence kernels, and the entropy quantile's one block.
constexpr int CORRECTIONS_THREADS = 256;
constexpr int ENTROPY_SELECT_THREADS = 1024;

// ------------------------------------------------------------ status word
// Kernels never trap on bad data: they write NaN where an output is
// undefined and raise a bit in the status word, which the host reads when
// it checks. Word 0: bits (1 << (4 * op + kind)); word 1 + kind: the
// smallest index that raised that kind, so the error can name a row.

// What a kernel found wrong with its data.
enum StatusKind : uint32_t { TOKEN_OUT_OF_RANGE = 0, NON_FINITE = 1, BAD_LAYOUT = 2 };
// The op whose kernel raised it.
enum OpId : uint32_t { OP_LOGPROB = 0, OP_FUSED_LINEAR = 1, OP_ADVANTAGES = 2, OP_POLICY_LOSS = 3, OP_KL = 4, OP_SAMPLING = 5, OP_FUSED_LINEAR_LOSS = 6, OP_CORRECTIONS = 7 };
// u32 words of the status word: the bits, then one index per kind.
constexpr int STATUS_WORDS = 4;

// ------------------------------------------------------------ log-softmax
// A log-softmax state over part of a row (`Softmax` in common.cuh, base 2:
// the max, the sum of 2^(x - max), the sum of 2^(x - max) (x - max)), which
// a split forward writes for each slice of a row and a finishing kernel
// merges (`partials` of the log-prob and fused linear kernels).
struct SoftmaxPartial {
    float m;
    float s;
    float e;
};
static_assert(sizeof(SoftmaxPartial) == 12, "SoftmaxPartial: three f32");

// ------------------------------------------------------------ KL
// KL estimator of d = ref_logp - logp (`KlEstimator` in src/ops/kl.rs);
// `_ST`: straight-through, the value of the named one with k2's gradient.
enum KlKind : int { KL_K1 = 0, KL_K2 = 1, KL_K3 = 2, KL_LOW_VAR_K3 = 3, KL_ABS = 4, KL_K1_ST = 5, KL_LOW_VAR_K3_ST = 6, KL_ABS_ST = 7 };

// ------------------------------------------------------------ advantages
// Advantage normalization (`AdvantageMode` in src/ops/advantages.rs).
enum AdvantageMode : int { GROUP_NORM = 0, GROUP_MEAN = 1, BATCH_NORM = 2, LEAVE_ONE_OUT = 3, NONE = 4, WHITEN = 5 };

// A group's sums, kept for the batch statistics (`group_advantages`'
// scratch, one per group). `overflow`: a combined reward of the group
// overflows f32 (raised once, for the reward: the group's std and
// advantages are then NaN, not raised again).
struct GroupStats {
    double sum;
    double mean;
    double sq_dev;
    // Scored (non-NaN) rewards; `flat`: fewer than two, or all equal.
    int64_t count;
    bool flat;
    bool overflow;
};
static_assert(sizeof(GroupStats) == 40, "GroupStats: five 8-byte words per group");

// ------------------------------------------------------------ policy loss
// Loss aggregation (`Aggregation` in src/ops/policy_loss.rs).
enum Aggregation : int { TOKEN_MEAN = 0, SEQ_MEAN_TOKEN_MEAN = 1, SEQ_MEAN_TOKEN_SUM = 2, SEQ_MEAN_TOKEN_SUM_NORM = 3 };

// The policy-gradient term (`PolicyObjective` in src/ops/policy_loss.rs).
enum Objective : int { OBJ_CLIP = 0, OBJ_CISPO = 1, OBJ_SAPO = 2, OBJ_VESPO = 3 };

// Indices of the forward's summary (`PolicyLossStats`' index constants).
enum Summary : int { LOSS = 0, CLIP_LOW = 1, CLIP_HIGH = 2, DUAL_CLIP = 3, RATIO_MEAN = 4, RATIO_MAX = 5, KL_MEAN = 6, TOKENS = 7, CLIP_LOW_SEQ = 8, CLIP_HIGH_SEQ = 9, CLIP_LOW_SEQ_MIN = 10, CLIP_HIGH_SEQ_MAX = 11, SEQS = 12, SUMMARY_LEN = 13 };

// Everything the policy loss kernels read but their outputs, passed by
// value. Null inputs are absent (`old_logp`: ratio 1; `ref_logp`: no KL;
// `mask`: all tokens in); exactly one of `adv_seq` and `adv_tok` is set.
struct PolicyLossParams {
    const float* logp;
    const float* old_logp;
    const float* ref_logp;
    const float* adv_seq;
    const float* adv_tok;
    const uint8_t* mask;
    // Null: padded, sequence s = [s * seq_len, (s + 1) * seq_len).
    const uint32_t* cu_seqlens;
    // Null: every policy-gradient weight is 1.
    const float* pg_weights;
    int64_t seqs;
    int64_t tokens;
    int64_t seq_len;
    float eps_low;
    float eps_high;
    // 0: no dual clip.
    float dual_clip;
    // +inf: no clamp.
    float log_ratio_clamp;
    float beta;
    // TokenMean's normalizer (0: the masked-in token count), or
    // SeqMeanTokenSumNorm's constant.
    float agg_constant;
    // Clip's delta (0: off).
    float delta;
    // The objective's parameters: CISPO (min_ratio, max_ratio), SAPO
    // (tau_pos, tau_neg), VESPO (k_pos, lambda_pos, k_neg, lambda_neg).
    float obj_a;
    float obj_b;
    float obj_c;
    float obj_d;
    // Sequence-level importance sampling (GSPO) when nonzero.
    int seq_level;
    // TRL's use_bias_correction_kl when nonzero.
    int kl_bias_correction;
    // verl's SeqMean divisor (non-empty sequences only) when nonzero.
    int exclude_empty_seqs;
    KlKind kl_kind;
    Aggregation aggregation;
    Objective objective;
};
static_assert(sizeof(PolicyLossParams) == 160, "PolicyLossParams: 160 bytes");
static_assert(offsetof(PolicyLossParams, seqs) == 64, "PolicyLossParams: scalars after 8 pointers");
static_assert(offsetof(PolicyLossParams, eps_low) == 88, "PolicyLossParams: floats after 3 i64");
static_assert(offsetof(PolicyLossParams, seq_level) == 132, "PolicyLossParams: ints after 11 floats");
static_assert(offsetof(PolicyLossParams, objective) == 152, "PolicyLossParams: objective last");

// A sequence's sums in the policy loss forward, folded by the last block,
// and a row's in the fused LM-head loss (`fll_rows`' per-row statistics,
// folded by `fll_summary`); `ratio_max` combines by max.
struct PolicyLossPartial {
    float loss;
    float count;
    float clip_low;
    float clip_high;
    float dual;
    float ratio_sum;
    float ratio_max;
    float kl_sum;
};
static_assert(sizeof(PolicyLossPartial) == 32, "PolicyLossPartial: eight f32");

// ------------------------------------------------------------ fused LM-head loss
// Everything `fll_rows` reads besides the row chunk's softmax partials,
// passed by value. Null inputs are absent (`old_logp`: ratio 1; `ref_logp`:
// no KL); exactly one of `adv_seq` and `adv_tok` is set.
struct FusedLossRowParams {
    const float* old_logp;
    const float* ref_logp;
    const float* adv_seq;
    const float* adv_tok;
    // [seqs] masked-in tokens per sequence (`fll_counts`).
    const float* counts;
    // [1] masked-in tokens in all (`fll_total`).
    const float* total;
    // [rows] each row's sequence (`fll_counts`).
    const int32_t* seq_of;
    int64_t rows;
    int64_t vocab;
    int64_t seqs;
    // 1 / temperature.
    float inv_t;
    float eps_low;
    float eps_high;
    // 0: no dual clip.
    float dual_clip;
    float log_ratio_clamp;
    float beta;
    // TokenMean's normalizer (0: the masked-in token count), or
    // SeqMeanTokenSumNorm's constant.
    float agg_constant;
    KlKind kl_kind;
    Aggregation aggregation;
};
static_assert(sizeof(FusedLossRowParams) == 120, "FusedLossRowParams: 120 bytes");
static_assert(offsetof(FusedLossRowParams, rows) == 56, "FusedLossRowParams: scalars after 7 pointers");
static_assert(offsetof(FusedLossRowParams, inv_t) == 80, "FusedLossRowParams: floats after 3 i64");
static_assert(offsetof(FusedLossRowParams, kl_kind) == 108, "FusedLossRowParams: enums after 7 floats");
static_assert(offsetof(FusedLossRowParams, aggregation) == 112, "FusedLossRowParams: aggregation last");

// ------------------------------------------------------------ corrections
// TRL's `vllm_importance_sampling_mode` (`IsMode` in src/ops/corrections.rs).
enum IsModeKind : int { IS_TOKEN_TRUNCATE = 0, IS_TOKEN_MASK = 1, IS_SEQUENCE_TRUNCATE = 2, IS_SEQUENCE_MASK = 3 };

// What the per-sequence correction kernels read, passed by value. Null
// `mask`: every token in; null `cu_seqlens`: padded by `seq_len`.
struct CorrectionParams {
    const float* logp;
    const float* sampler_logp;
    const uint8_t* mask;
    const uint32_t* cu_seqlens;
    // [seqs], read by `corr_off_policy` only.
    const float* advantages;
    int64_t seqs;
    int64_t tokens;
    int64_t seq_len;
    // The importance ratio's bounds, -inf / +inf where absent.
    float clip_min;
    float clip_max;
    // OPSM's delta.
    float threshold;
    IsModeKind mode;
};
static_assert(sizeof(CorrectionParams) == 80, "CorrectionParams: 80 bytes");
static_assert(offsetof(CorrectionParams, seqs) == 40, "CorrectionParams: scalars after 5 pointers");
static_assert(offsetof(CorrectionParams, clip_min) == 64, "CorrectionParams: floats after 3 i64");

// One sequence's partial statistics of the sampler ratio and of
// |logp - sampler_logp| (`IsPartial` in src/ops/corrections.rs), folded on
// the host in sequence order.
struct IsSeqPartial {
    double ratio_sum;
    double diff_sum;
    uint64_t ratio_count;
    uint64_t diff_count;
    float ratio_min;
    float ratio_max;
    float diff_max;
    float unused;
};
static_assert(sizeof(IsSeqPartial) == 48, "IsSeqPartial: 48 bytes");

}  // namespace gk
