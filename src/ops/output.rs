//! Fresh output vectors that parallel kernels write in full, never zeroed
//! first.
//!
//! `vec![0.0; n]` is a pass over the output before the kernel's own: the
//! allocator hands a loop of calls reused memory, which `calloc` zeroes. For
//! a memory-bound op (a KL estimator reads 8 bytes and writes 4 per token)
//! that pass was half the time. Kernels that fill such outputs take
//! `&mut [MaybeUninit<f32>]` and write every element with
//! [`MaybeUninit::write`].

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// `n` values that `fill(i, out)` writes, `chunk` at a time (the last chunk
/// shorter) in parallel, `i` being the chunk's index; also whether every
/// call of `fill` returned true.
///
/// # Safety
///
/// `fill` must write every element of each `out` it is given.
pub(crate) unsafe fn par_filled<T, F>(n: usize, chunk: usize, fill: F) -> (Vec<T>, bool)
where
    T: Send,
    F: Fn(usize, &mut [MaybeUninit<T>]) -> bool + Sync,
{
    let mut out = Vec::with_capacity(n);
    let all = out.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk)
        .enumerate()
        .map(|(i, c)| fill(i, c))
        .reduce(|| true, |a, b| a && b);
    // SAFETY: the first `n` elements are initialized: `fill` wrote every
    // chunk (the caller's contract), and the chunks cover `0..n`. A panic
    // in `fill` propagates before this, and the vector drops empty.
    unsafe { out.set_len(n) };
    (out, all)
}

/// [`par_filled`] into a caller's buffer: `fill(i, out)` writes chunk `i`
/// of `out`, in parallel; whether every call returned true. Safe: a
/// `MaybeUninit` view of initialized memory may only be written through.
pub(crate) fn par_fill_into<T, F>(out: &mut [T], chunk: usize, fill: F) -> bool
where
    T: Send,
    F: Fn(usize, &mut [MaybeUninit<T>]) -> bool + Sync,
{
    // SAFETY: `MaybeUninit<T>` has `T`'s layout, and `fill` can only store
    // initialized `T`s through it, so `out` stays initialized.
    let view =
        unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<MaybeUninit<T>>(), out.len()) };
    view.par_chunks_mut(chunk)
        .enumerate()
        .map(|(i, c)| fill(i, c))
        .reduce(|| true, |a, b| a && b)
}
