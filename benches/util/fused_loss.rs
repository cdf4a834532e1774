//! The fused LM-head + GRPO loss problem (`benches/fused_linear_loss.rs`
//! times it against the GEMMs and the two-call form; `versus_torch.rs`
//! against PyTorch): hidden states, the LM head, targets, old and
//! reference log-probs near the policy's own, per-sequence advantages, and
//! TRL's loss settings.

use grpo_kernels::{
    fused_linear_logprobs, Advantage, Aggregation, FusedLinearConfig, FusedLossConfig, KlEstimator,
    LinearLossInputs, LinearRows, PolicyLossConfig, SeqLayout,
};

/// TRL's defaults with a KL term: eps 0.2, beta 0.04, k3, token-mean
/// (TRL's `loss_type="bnpo"`).
pub fn loss_cfg() -> PolicyLossConfig {
    PolicyLossConfig {
        beta: 0.04,
        kl: KlEstimator::K3,
        aggregation: Aggregation::TokenMean { normalizer: None },
        ..PolicyLossConfig::default()
    }
}

/// [`loss_cfg`] with the fused op's default chunking.
pub fn fused_cfg() -> FusedLossConfig {
    FusedLossConfig {
        loss: loss_cfg(),
        ..FusedLossConfig::default()
    }
}

/// One batch: `n` rows of `h` hidden values, a `[v, h]` head, sequences
/// of `seq_len` tokens (`n / seq_len` of them, no padding).
pub struct Problem {
    pub n: usize,
    pub h: usize,
    pub v: usize,
    pub seq_len: usize,
    pub hidden: Vec<f32>,
    pub weight: Vec<f32>,
    pub targets: Vec<u32>,
    pub old: Vec<f32>,
    pub reference: Vec<f32>,
    /// `[n / seq_len]`.
    pub adv: Vec<f32>,
}

impl Problem {
    /// Seeded data; old and reference log-probs are the policy's own plus
    /// normal noise of sd 0.1 (ratios near 1, some clipped).
    pub fn new(n: usize, h: usize, v: usize, seq_len: usize) -> Self {
        let mut p = Self {
            n,
            h,
            v,
            seq_len,
            hidden: super::normals(n * h, 1.0, 1),
            weight: super::normals(v * h, 2.0 / (h as f32).sqrt(), 2),
            targets: super::targets(n, v, 3),
            old: Vec::new(),
            reference: Vec::new(),
            adv: super::normals(n / seq_len, 1.0, 4),
        };
        let logp = fused_linear_logprobs(&p.rows(), &FusedLinearConfig::default())
            .unwrap()
            .logp;
        let noisy = |seed| -> Vec<f32> {
            logp.iter()
                .zip(super::normals::<f32>(n, 0.1, seed))
                .map(|(l, e)| l + e)
                .collect()
        };
        (p.old, p.reference) = (noisy(5), noisy(6));
        p
    }

    pub fn rows(&self) -> LinearRows<'_, f32, u32> {
        LinearRows::new(&self.hidden, &self.weight, &self.targets, self.h)
    }

    pub fn layout(&self) -> SeqLayout<'_> {
        SeqLayout::Padded {
            batch: self.n / self.seq_len,
            seq_len: self.seq_len,
        }
    }

    /// The fused op's inputs: rows, per-sequence advantages, old and reference.
    pub fn loss_inputs(&self) -> LinearLossInputs<'_, f32, u32> {
        LinearLossInputs::new(self.rows(), Advantage::per_sequence(&self.adv), self.layout())
            .with_old(&self.old)
            .with_ref(&self.reference)
    }
}
