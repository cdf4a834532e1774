//! Where an op's buffers live.
//!
//! Every op describes its inputs once, as a struct generic over a [`Memory`]:
//! [`Host`] holds plain slices, `cuda::Device` holds cudarc views. Validation
//! reads only lengths and parameters, so the CPU and the CUDA paths share it
//! and reject the same inputs with the same errors.

/// A family of buffer types: borrowed inputs, borrowed outputs and owned results.
///
/// Sealed: the ops are written for [`Host`] and `cuda::Device` only, so a
/// new memory kind is a change to this crate, not to its users.
pub trait Memory: sealed::Sealed {
    /// A borrowed, read-only buffer of `T`.
    type Buf<'a, T: 'a>;
    /// A borrowed buffer an op writes into.
    type BufMut<'a, T: 'a>;
    /// A buffer an op allocates and returns.
    type Owned<T>;
    /// Number of elements of a borrowed buffer.
    fn len<T>(buf: &Self::Buf<'_, T>) -> usize;
    /// Number of elements of a borrowed output buffer.
    fn len_mut<T>(buf: &Self::BufMut<'_, T>) -> usize;
}

pub(crate) mod sealed {
    /// Implemented by this crate's memory kinds only.
    pub trait Sealed {}
}

/// Host memory: `&[T]` in, `Vec<T>` out.
#[derive(Debug, Clone, Copy)]
pub struct Host;

impl sealed::Sealed for Host {}

impl Memory for Host {
    type Buf<'a, T: 'a> = &'a [T];
    type BufMut<'a, T: 'a> = &'a mut [T];
    type Owned<T> = Vec<T>;
    fn len<T>(buf: &&[T]) -> usize {
        buf.len()
    }
    fn len_mut<T>(buf: &&mut [T]) -> usize {
        buf.len()
    }
}

/// Length of an optional buffer, for validation.
pub(crate) fn opt_len<M: Memory, T>(buf: &Option<M::Buf<'_, T>>) -> Option<usize> {
    buf.as_ref().map(|b| M::len(b))
}
