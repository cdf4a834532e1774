//! How per-token arrays group into sequences.
//!
//! GRPO data is a batch of completions. A trainer either pads them to one
//! length (`[B, T]`, with a mask) or packs them back to back with offsets
//! (`cu_seqlens`, as FlashAttention's varlen kernels take them). Ops that
//! aggregate per sequence (the policy loss, advantage broadcasting) take a
//! [`SeqLayout`]; row-wise ops (log-probs, KL) need none.

use crate::error::{check, Error, Result};
use crate::memory::{Host, Memory};

/// The sequences of a batch of `N` tokens.
pub enum SeqLayout<'a, M: Memory = Host> {
    /// `batch` sequences padded to `seq_len`: token `t` of sequence `b` is
    /// element `b * seq_len + t`; `N = batch * seq_len`.
    Padded {
        /// Number of sequences `B`.
        batch: usize,
        /// Padded length `T`.
        seq_len: usize,
    },
    /// Sequences back to back: sequence `s` is elements
    /// `cu_seqlens[s]..cu_seqlens[s + 1]`. `cu_seqlens` has `S + 1` entries,
    /// starts at 0, never decreases, and ends at `N`; empty sequences are allowed.
    Packed {
        /// Offsets, `[S + 1]`.
        cu_seqlens: M::Buf<'a, u32>,
    },
}

impl<M: Memory> SeqLayout<'_, M> {
    /// Number of sequences `S`.
    pub fn num_seqs(&self) -> usize {
        match self {
            SeqLayout::Padded { batch, .. } => *batch,
            SeqLayout::Packed { cu_seqlens } => M::len(cu_seqlens).saturating_sub(1),
        }
    }

    /// Checks what lengths alone can show: at least one sequence, and for a
    /// padded layout `batch * seq_len == tokens`. Offsets are checked by
    /// [`SeqLayout::validate_offsets`] where they can be read.
    pub(crate) fn validate_shape(&self, op: &'static str, tokens: usize) -> Result<usize> {
        let seqs = self.num_seqs();
        check::non_empty(op, "sequences", seqs)?;
        if let SeqLayout::Padded { batch, seq_len } = self {
            let n = batch.checked_mul(*seq_len).ok_or_else(|| Error::InvalidLayout {
                op,
                reason: format!("{batch} x {seq_len} overflows usize"),
            })?;
            check::len(op, "tokens (batch * seq_len)", n, tokens)?;
        }
        Ok(seqs)
    }
}

impl<'a> SeqLayout<'a, Host> {
    /// Full validation on the host: shape, then offsets.
    pub(crate) fn validate(&self, op: &'static str, tokens: usize) -> Result<usize> {
        let seqs = self.validate_shape(op, tokens)?;
        if let SeqLayout::Packed { cu_seqlens } = self {
            Self::validate_offsets(op, cu_seqlens, tokens)?;
        }
        Ok(seqs)
    }

    /// `cu_seqlens` starts at 0, never decreases and ends at `tokens`.
    pub(crate) fn validate_offsets(op: &'static str, cu: &[u32], tokens: usize) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidLayout { op, reason });
        if cu[0] != 0 {
            return bad(format!("cu_seqlens[0] = {}, expected 0", cu[0]));
        }
        if let Some(s) = cu.windows(2).position(|w| w[1] < w[0]) {
            return bad(format!(
                "cu_seqlens decreases at {}: {} > {}",
                s + 1,
                cu[s],
                cu[s + 1]
            ));
        }
        let last = *cu.last().unwrap_or(&0) as usize;
        if last != tokens {
            return bad(format!(
                "cu_seqlens ends at {last}, but there are {tokens} tokens"
            ));
        }
        Ok(())
    }

    /// Token range of each sequence.
    pub fn ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + use<'_, 'a> {
        let seqs = self.num_seqs();
        (0..seqs).map(move |s| match self {
            SeqLayout::Padded { seq_len, .. } => s * seq_len..(s + 1) * seq_len,
            SeqLayout::Packed { cu_seqlens } => cu_seqlens[s] as usize..cu_seqlens[s + 1] as usize,
        })
    }
}
