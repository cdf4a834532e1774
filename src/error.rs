//! One error type for every op: it names the op, the argument and what was
//! wrong, so a trainer can print it and a test can match on it.
//!
//! # Non-finite values: one rule for every op and backend
//!
//! No op panics on any input, and no op returns a NaN or an infinity in a
//! result it reports as valid:
//!
//! 1. **Inputs.** A NaN or `+inf` (and `-inf`, except where an op gives it
//!    a meaning, as a logit of probability 0) in an element the op reads is
//!    [`Error::NonFinite`], `what` naming the argument and `index` its first
//!    such element (or row). Elements an op never reads (masked-out tokens,
//!    skipped rows) may hold anything.
//! 2. **Upstream gradients** are inputs like any other: every backward
//!    rejects a NaN or infinite gradient at a row or token it reads, with
//!    `what` the gradient's argument name (`grad_logp`, `grad_entropy`,
//!    `grad_lse`, `grad`, `grad_loss`, `grad_per_token`), before writing any
//!    output (an in-place backward leaves its buffer untouched). The candle
//!    ops inherit this: a NaN reaching `backward()` is this error, wrapped.
//! 3. **Results.** Where finite inputs of extreme magnitude give a result
//!    beyond the output type's range, the op returns [`Error::NonFinite`]
//!    with `what` naming the result (`logits / temperature`, `logp`,
//!    `dlogits`, `kl`, `dlogp`, `advantages`, `per_token`, `loss`, ...),
//!    unless its module documents a saturation (only the `k3` KL estimate,
//!    whose `e^d` saturates at `e^88.37`, and its derivative). The modules
//!    state each bound.
//! 4. **CUDA** kernels test the same conditions on the device: they write
//!    NaN into the outputs concerned and raise [`DeviceFault::NonFinite`],
//!    which `cuda::Gpu::check` reports as [`Error::Device`] with the first
//!    index (one index per fault kind, so where several values fail at
//!    once the index may differ from the CPU's). Two limits are the GPU's
//!    own: the log-prob, fused linear and sampling kernels keep softmax
//!    states in base 2, so a scaled logit beyond `±f32::MAX / log2(e)`
//!    (about `±2.36e38`) is non-finite there; and the policy loss sums
//!    token losses in f32, where the CPU widens each block's sum to f64.
//! 5. **Sizes.** A host buffer sized by the caller's arguments rather than
//!    by an input buffer (a padded layout's token count, a tile of the
//!    fused LM head) that cannot be allocated is [`Error::Allocation`], not
//!    an abort.

use std::fmt;

/// Everything an op can refuse or fail with. Ops never panic on bad input.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A buffer's length disagrees with the shape the op derived from its other inputs.
    ShapeMismatch {
        /// The op's name (as its function is named, e.g. `token_logprobs`).
        op: &'static str,
        /// The argument (or field of an input struct).
        what: &'static str,
        /// The length the other inputs imply.
        expected: usize,
        /// The length it has.
        got: usize,
    },
    /// An input that must hold at least one element holds none.
    Empty {
        /// The op's name.
        op: &'static str,
        /// The argument.
        what: &'static str,
    },
    /// A token id outside `0..vocab` (ignored ids excepted).
    TokenOutOfRange {
        /// The op's name.
        op: &'static str,
        /// The first row holding such an id.
        index: usize,
        /// The id.
        token: i64,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A scalar parameter outside its domain.
    InvalidParameter {
        /// The op's name.
        op: &'static str,
        /// The parameter (a config field, e.g. `temperature`).
        name: &'static str,
        /// Its value.
        value: f64,
        /// Its domain, in words.
        expected: &'static str,
    },
    /// A NaN or infinity in an input (or a logit row with no finite
    /// value), or a result beyond its type's range: see the [rule](self).
    NonFinite {
        /// The op's name.
        op: &'static str,
        /// The argument, or the result that overflows.
        what: &'static str,
        /// Its first such element (or row).
        index: usize,
    },
    /// A host buffer of `elements` values, sized by the caller's arguments,
    /// cannot be allocated.
    Allocation {
        /// The op's name.
        op: &'static str,
        /// The buffer.
        what: &'static str,
        /// How many values it would hold.
        elements: usize,
    },
    /// Sequence offsets or groups that do not describe the data.
    InvalidLayout {
        /// The op's name.
        op: &'static str,
        /// What is wrong, in words.
        reason: String,
    },
    /// Inputs on different devices, of an unsupported dtype, or otherwise
    /// unusable together (the candle layer's own checks among them).
    Unsupported {
        /// The op's name (`grpo_kernels::candle` for the candle layer's
        /// checks shared by every op: contiguity, storage dtype and device).
        op: &'static str,
        /// What is wrong, in words.
        reason: String,
    },
    /// A CUDA kernel found bad data (reported by `Gpu::check`).
    Device {
        /// The op whose kernel raised it.
        op: &'static str,
        /// What the kernel found.
        fault: DeviceFault,
        /// The first row, token or offset concerned.
        index: usize,
    },
    /// The CUDA driver, cuBLAS or a kernel launch failed, or a CUDA library
    /// cannot be loaded.
    Cuda {
        /// What was being done (e.g. ``launching `kl_fwd` ``); empty when
        /// the error was wrapped with `Error::cuda` alone.
        context: String,
        /// cudarc's error, where there is one; [`std::error::Error::source`]
        /// returns it too (a `cudarc::driver::DriverError` or
        /// `cudarc::cublas::result::CublasError`, to downcast).
        source: Option<CudaFailure>,
    },
}

/// The error a CUDA library call returned, kept as cudarc's value (a code,
/// comparable and matchable), not as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CudaFailure {
    /// A CUDA driver call (loading a module, allocating, copying, launching).
    #[cfg(feature = "cuda")]
    Driver(cudarc::driver::DriverError),
    /// A cuBLAS call.
    #[cfg(feature = "cuda")]
    Blas(cudarc::cublas::result::CublasError),
}

#[cfg(feature = "cuda")]
impl From<cudarc::driver::DriverError> for CudaFailure {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaFailure::Driver(e)
    }
}

#[cfg(feature = "cuda")]
impl From<cudarc::cublas::result::CublasError> for CudaFailure {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        CudaFailure::Blas(e)
    }
}

impl fmt::Display for CudaFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[cfg(feature = "cuda")]
        match self {
            CudaFailure::Driver(e) => write!(f, "{e}"),
            CudaFailure::Blas(e) => write!(f, "cuBLAS {e}"),
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = f;
            match *self {}
        }
    }
}

impl CudaFailure {
    /// cudarc's error, as `Error::source` gives it.
    fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        #[cfg(feature = "cuda")]
        match self {
            CudaFailure::Driver(e) => e,
            CudaFailure::Blas(e) => e,
        }
        #[cfg(not(feature = "cuda"))]
        match *self {}
    }
}

/// What a CUDA kernel found wrong with its input data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFault {
    /// A token id outside `0..vocab`.
    TokenOutOfRange,
    /// A NaN or infinity where a finite value is required.
    NonFinite,
    /// Sequence offsets that do not describe the data.
    InvalidLayout,
}

impl Error {
    /// Wraps a CUDA driver or cuBLAS error (`map_err(Error::cuda)`), keeping it
    /// as the source.
    #[cfg(feature = "cuda")]
    pub fn cuda(e: impl Into<CudaFailure>) -> Self {
        Error::Cuda {
            context: String::new(),
            source: Some(e.into()),
        }
    }

    /// A CUDA failure while doing `context`, caused by `e`.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_in(context: impl Into<String>, e: impl Into<CudaFailure>) -> Self {
        Error::Cuda {
            context: context.into(),
            source: Some(e.into()),
        }
    }

    /// A CUDA failure with no library error behind it (a library that
    /// cannot be loaded, a buffer beyond the address space).
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_msg(context: impl Into<String>) -> Self {
        Error::Cuda {
            context: context.into(),
            source: None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ShapeMismatch {
                op,
                what,
                expected,
                got,
            } => write!(f, "{op}: `{what}` has {got} elements, expected {expected}"),
            Error::Empty { op, what } => write!(f, "{op}: `{what}` is empty"),
            Error::TokenOutOfRange {
                op,
                index,
                token,
                vocab,
            } => write!(
                f,
                "{op}: token id {token} at row {index} is outside the vocabulary 0..{vocab}"
            ),
            Error::InvalidParameter {
                op,
                name,
                value,
                expected,
            } => write!(f, "{op}: parameter `{name}` = {value} must be {expected}"),
            Error::NonFinite { op, what, index } => {
                write!(f, "{op}: `{what}` is not finite (NaN, infinity or beyond its type's range) at index {index}")
            }
            Error::Allocation { op, what, elements } => {
                write!(
                    f,
                    "{op}: `{what}` needs {elements} elements, more than can be allocated"
                )
            }
            Error::InvalidLayout { op, reason } => write!(f, "{op}: invalid layout: {reason}"),
            Error::Unsupported { op, reason } => write!(f, "{op}: {reason}"),
            Error::Device { op, fault, index } => {
                let what = match fault {
                    DeviceFault::TokenOutOfRange => "a token id outside the vocabulary",
                    DeviceFault::NonFinite => "a NaN or infinity",
                    DeviceFault::InvalidLayout => "invalid sequence offsets",
                };
                write!(f, "{op} (CUDA): {what}, first at index {index}")
            }
            Error::Cuda { context, source } => match source {
                None => write!(f, "CUDA: {context}"),
                Some(e) if context.is_empty() => write!(f, "CUDA: {e}"),
                Some(e) => write!(f, "CUDA: {context}: {e}"),
            },
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Cuda { source: Some(e), .. } => Some(e.as_error()),
            _ => None,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks shared by every op's validation.
pub(crate) mod check {
    use super::{Error, Result};

    pub fn len(op: &'static str, what: &'static str, expected: usize, got: usize) -> Result<()> {
        if expected == got {
            Ok(())
        } else {
            Err(Error::ShapeMismatch {
                op,
                what,
                expected,
                got,
            })
        }
    }

    pub fn non_empty(op: &'static str, what: &'static str, n: usize) -> Result<()> {
        if n == 0 {
            Err(Error::Empty { op, what })
        } else {
            Ok(())
        }
    }

    /// `value` must be finite and satisfy `ok`; `expected` describes the domain.
    pub fn param(
        op: &'static str,
        name: &'static str,
        value: f64,
        ok: bool,
        expected: &'static str,
    ) -> Result<()> {
        if value.is_finite() && ok {
            Ok(())
        } else {
            Err(Error::InvalidParameter {
                op,
                name,
                value,
                expected,
            })
        }
    }

    /// First non-finite value, as a `NonFinite` error.
    pub fn finite(op: &'static str, what: &'static str, xs: &[f32]) -> Result<()> {
        finite_by(op, what, xs, |&x| x.is_finite())
    }

    /// First element `ok` rejects, as a `NonFinite` error.
    pub fn finite_by<T>(
        op: &'static str,
        what: &'static str,
        xs: &[T],
        ok: impl Fn(&T) -> bool,
    ) -> Result<()> {
        match xs.iter().position(|x| !ok(x)) {
            None => Ok(()),
            Some(index) => Err(Error::NonFinite { op, what, index }),
        }
    }

    /// An output buffer that is given exactly when `expected` is `Some`
    /// (an entropy buffer when entropies are asked for, a bias gradient
    /// when there is a bias): its length, or `Unsupported` stating `rule`
    /// when it is given without reason or missing.
    pub fn paired_len(
        op: &'static str,
        what: &'static str,
        expected: Option<usize>,
        got: Option<usize>,
        rule: &str,
    ) -> Result<()> {
        match (expected, got) {
            (Some(expected), Some(got)) => len(op, what, expected, got),
            (None, None) => Ok(()),
            _ => Err(Error::Unsupported {
                op,
                reason: rule.into(),
            }),
        }
    }

    /// An empty `Vec` with room for `n` elements, or an `Allocation` error
    /// (instead of an abort) when `n` values of `T` exceed the address
    /// space or the allocator refuses them.
    pub fn with_capacity<T>(op: &'static str, what: &'static str, n: usize) -> Result<Vec<T>> {
        let mut v = Vec::new();
        v.try_reserve_exact(n).map_err(|_| Error::Allocation {
            op,
            what,
            elements: n,
        })?;
        Ok(v)
    }

    /// `n` copies of `fill`, or an `Allocation` error (see [`with_capacity`]).
    pub fn filled<T: Clone>(op: &'static str, what: &'static str, n: usize, fill: T) -> Result<Vec<T>> {
        let mut v = with_capacity(op, what, n)?;
        v.resize(n, fill);
        Ok(v)
    }

    /// `n` f32 zeros, or an `Allocation` error (see [`with_capacity`]).
    /// The memory comes zeroed from the allocator (`calloc`: for a large
    /// buffer, pages the OS zeroes on first touch), so an output the op
    /// then writes in its parallel pass is not written twice, and its page
    /// faults are taken by the threads that write it.
    pub fn zeros(op: &'static str, what: &'static str, n: usize) -> Result<Vec<f32>> {
        let refused = Error::Allocation {
            op,
            what,
            elements: n,
        };
        let layout = match std::alloc::Layout::array::<f32>(n) {
            Ok(layout) if layout.size() > 0 => layout,
            Ok(_) => return Ok(Vec::new()),
            Err(_) => return Err(refused),
        };
        // SAFETY: the layout's size is not zero.
        let data = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<f32>();
        if data.is_null() {
            return Err(refused);
        }
        // SAFETY: `data` was allocated by the global allocator with the
        // layout of `n` f32s, which is what a Vec of capacity `n` frees it
        // with, and its `n` zeroed f32s are initialized (all-zero bits are 0.0).
        Ok(unsafe { Vec::from_raw_parts(data, n, n) })
    }

    /// Resizes `v` to `n` elements (new ones `fill`), or returns an
    /// `Allocation` error instead of aborting when growing it fails.
    pub fn grow<T: Clone>(
        op: &'static str,
        what: &'static str,
        v: &mut Vec<T>,
        n: usize,
        fill: T,
    ) -> Result<()> {
        if n > v.len() {
            v.try_reserve_exact(n - v.len()).map_err(|_| Error::Allocation {
                op,
                what,
                elements: n,
            })?;
        }
        v.resize(n, fill);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{check, Error};

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_errors_keep_cudarc_error_as_their_source() {
        use super::CudaFailure;
        use cudarc::driver::{sys::CUresult, DriverError};
        let driver = DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        for e in [Error::cuda(driver), Error::cuda_in("launching `kl_fwd`", driver)] {
            let source = std::error::Error::source(&e).expect("a source");
            assert_eq!(source.downcast_ref::<DriverError>(), Some(&driver));
            assert!(matches!(e, Error::Cuda { source: Some(CudaFailure::Driver(d)), .. } if d == driver));
        }
        let e = Error::cuda_msg("cuBLAS cannot be loaded");
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(e.to_string(), "CUDA: cuBLAS cannot be loaded");
    }

    #[test]
    fn sizes_that_cannot_be_allocated_are_errors() {
        let refused = |elements| Error::Allocation {
            op: "op",
            what: "buffer",
            elements,
        };
        // Past isize::MAX bytes (capacity overflow), and past any address space.
        for n in [usize::MAX / 2, 1 << 55] {
            assert_eq!(
                check::with_capacity::<f32>("op", "buffer", n).unwrap_err(),
                refused(n)
            );
            let mut v = vec![1.0f32; 3];
            assert_eq!(
                check::grow("op", "buffer", &mut v, n, 0.0).unwrap_err(),
                refused(n)
            );
            assert_eq!(v, [1.0; 3], "unchanged on error");
        }
        let mut v = vec![1.0f32; 3];
        check::grow("op", "buffer", &mut v, 5, 0.0).unwrap();
        assert_eq!(v, [1.0, 1.0, 1.0, 0.0, 0.0]);
        check::grow("op", "buffer", &mut v, 2, 0.0).unwrap();
        assert_eq!(v, [1.0, 1.0]);
        assert!(check::with_capacity::<f32>("op", "buffer", 7).unwrap().capacity() >= 7);
    }
}
