//! The CUDA path: every op on cudarc device buffers, on a caller's stream.
//!
//! ```no_run
//! # fn main() -> grpo_kernels::Result<()> {
//! use grpo_kernels::cuda::{self, Gpu};
//! let gpu = Gpu::new(cudarc::driver::CudaContext::new(0).map_err(grpo_kernels::Error::cuda)?.default_stream())?;
//! // ... launch ops with `cuda::token_logprobs(&gpu, ...)` etc., then, once a step:
//! gpu.check()?; // data errors raised by the kernels (one synchronization)
//! # Ok(()) }
//! ```
//!
//! **Asynchrony and errors.** Ops validate shapes and parameters on the host
//! and return a typed [`Error`] before launching anything. What only the data
//! can show (a token id out of range, a NaN logit or upstream gradient, a
//! result that overflows, bad `cu_seqlens`) is found by the kernels, which
//! then write NaN into the affected outputs (never a plausible wrong value)
//! and raise a bit in the [`Gpu`]'s status word, following the crate's
//! [rule on non-finite values](crate::error);
//! [`Gpu::check`] synchronizes the stream and turns the bits into
//! [`Error::Device`]. Nothing in an op synchronizes unless its docs say so.
//!
//! **Loading.** The PTX of `cuda/*.cu` is embedded in the crate at build
//! time and loaded once per CUDA context, whoever asks (this API or the
//! candle ops), on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use cudarc::cublas::{sys::cudaDataType_t, CudaBlas};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DeviceRepr, LaunchConfig, SyncOnDrop, ValidAsZeroBits,
};

use crate::element::{Float, TokenId};
use crate::error::{DeviceFault, Error, Result};
use crate::memory::Memory;

pub(crate) mod abi;
pub mod advantages;
pub mod corrections;
pub mod fused_linear;
pub mod fused_linear_loss;
pub mod kl;
pub mod logprob;
pub mod policy_loss;
pub mod sampling;

pub use advantages::{broadcast_to_tokens, group_advantages};
pub use corrections::{high_entropy_mask_into, off_policy_mask_into, sampler_is_weights_into};
pub use fused_linear::{
    fused_linear_logprobs, fused_linear_logprobs_backward, fused_linear_logprobs_backward_into,
    fused_linear_logprobs_into, LinearGradsOut,
};
pub use fused_linear_loss::{fused_linear_policy_loss, fused_linear_policy_loss_into, LinearLossDevice};
pub use kl::{kl_divergence, kl_divergence_backward};
pub use logprob::{
    token_logprobs, token_logprobs_backward, token_logprobs_backward_inplace, token_logprobs_backward_into,
    token_logprobs_into, LogProbsOut,
};
pub use policy_loss::{policy_loss, policy_loss_backward};
pub use sampling::sample;

/// The PTX of each kernel file, embedded by build.rs.
pub(crate) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Device memory: cudarc views in, cudarc slices out.
#[derive(Debug, Clone, Copy)]
pub struct Device;

impl crate::memory::sealed::Sealed for Device {}

impl Memory for Device {
    type Buf<'a, T: 'a> = CudaView<'a, T>;
    type BufMut<'a, T: 'a> = CudaViewMut<'a, T>;
    type Owned<T> = CudaSlice<T>;
    fn len<T>(buf: &CudaView<'_, T>) -> usize {
        buf.len()
    }
    fn len_mut<T>(buf: &CudaViewMut<'_, T>) -> usize {
        buf.len()
    }
}

/// Float types with CUDA kernels.
pub trait GpuFloat: Float + DeviceRepr + ValidAsZeroBits {
    /// The type's id for cuBLAS.
    const CUBLAS: cudaDataType_t;
}
impl GpuFloat for f32 {
    const CUBLAS: cudaDataType_t = cudaDataType_t::CUDA_R_32F;
}
impl GpuFloat for half::bf16 {
    const CUBLAS: cudaDataType_t = cudaDataType_t::CUDA_R_16BF;
}
impl GpuFloat for half::f16 {
    const CUBLAS: cudaDataType_t = cudaDataType_t::CUDA_R_16F;
}

/// Token id types with CUDA kernels.
pub trait GpuId: TokenId + DeviceRepr {}
impl GpuId for u32 {}
impl GpuId for i32 {}
impl GpuId for i64 {}

/// A kernel file: its PTX and its name in the module cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct KernelFile {
    pub name: &'static str,
    pub ptx: &'static str,
}

/// Modules and functions loaded into one CUDA context, shared by every
/// [`Gpu`] on it.
struct Loaded {
    ctx: Arc<CudaContext>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl Loaded {
    /// The context's cache, created on first use. Weak references: the
    /// modules unload when the last `Gpu` on the context is dropped.
    fn for_context(ctx: &Arc<CudaContext>) -> Arc<Loaded> {
        static REGISTRY: OnceLock<Mutex<Vec<Weak<Loaded>>>> = OnceLock::new();
        let mut registry = REGISTRY.get_or_init(Default::default).lock().unwrap();
        registry.retain(|w| w.strong_count() > 0);
        if let Some(found) = registry
            .iter()
            .filter_map(Weak::upgrade)
            .find(|l| l.ctx.cu_ctx() == ctx.cu_ctx())
        {
            return found;
        }
        let loaded = Arc::new(Loaded {
            ctx: ctx.clone(),
            modules: Default::default(),
            functions: Default::default(),
        });
        registry.push(Arc::downgrade(&loaded));
        loaded
    }

    fn function(&self, file: KernelFile, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap().get(name) {
            return Ok(f.clone());
        }
        let module = {
            let mut modules = self.modules.lock().unwrap();
            match modules.get(file.name) {
                Some(m) => m.clone(),
                None => {
                    let m = self.ctx.load_module(file.ptx.into()).map_err(Error::cuda)?;
                    modules.insert(file.name, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(name)
            .map_err(|e| Error::cuda_in(format!("kernel `{name}` of {}.cu", file.name), e))?;
        self.functions.lock().unwrap().insert(name.to_string(), f.clone());
        Ok(f)
    }
}

/// The status word with nothing raised (layout: `cuda/abi.h`): word 0
/// holds bit `4 * op + kind`, word `1 + kind` the smallest index that
/// raised `kind`.
const STATUS_CLEAR: [u32; abi::STATUS_WORDS as usize] = [0, u32::MAX, u32::MAX, u32::MAX];
const _: () = assert!(abi::STATUS_WORDS as usize == 1 + abi::StatusKind::ALL.len());

/// The public name of the op a kernel reports for.
fn op_name(op: abi::OpId) -> &'static str {
    match op {
        abi::OpId::OP_LOGPROB => "token_logprobs",
        abi::OpId::OP_FUSED_LINEAR => "fused_linear_logprobs",
        abi::OpId::OP_ADVANTAGES => "group_advantages",
        abi::OpId::OP_POLICY_LOSS => "policy_loss",
        abi::OpId::OP_KL => "kl_divergence",
        abi::OpId::OP_SAMPLING => "sample",
        abi::OpId::OP_FUSED_LINEAR_LOSS => "fused_linear_policy_loss",
        abi::OpId::OP_CORRECTIONS => "corrections",
    }
}

fn fault(kind: abi::StatusKind) -> DeviceFault {
    match kind {
        abi::StatusKind::TOKEN_OUT_OF_RANGE => DeviceFault::TokenOutOfRange,
        abi::StatusKind::NON_FINITE => DeviceFault::NonFinite,
        abi::StatusKind::BAD_LAYOUT => DeviceFault::InvalidLayout,
    }
}

/// The handle every CUDA op takes: a stream, the kernels loaded for its
/// context, and the status word the kernels report bad data into.
pub struct Gpu {
    stream: Arc<CudaStream>,
    loaded: Arc<Loaded>,
    status: Mutex<CudaSlice<u32>>,
    sm_count: usize,
    /// cuBLAS on the same stream, created by the first op that needs it.
    blas: OnceLock<CudaBlas>,
}

impl Gpu {
    /// Ops will run on `stream`. Fails (without panicking) when no CUDA
    /// driver can be loaded.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(Error::cuda)? as usize;
        let status = stream.clone_htod(&STATUS_CLEAR).map_err(Error::cuda)?;
        Ok(Self {
            loaded: Loaded::for_context(&ctx),
            stream,
            status: Mutex::new(status),
            sm_count,
            blas: OnceLock::new(),
        })
    }

    /// A `Gpu` on device `ordinal`'s default stream, or `Ok(None)` when this
    /// machine has no usable CUDA driver or device (so callers and tests can
    /// fall back to the CPU instead of crashing).
    pub fn try_default(ordinal: usize) -> Result<Option<Self>> {
        if !driver_present() {
            return Ok(None);
        }
        match CudaContext::device_count() {
            Ok(n) if (ordinal as i32) < n => {}
            _ => return Ok(None),
        }
        let ctx = CudaContext::new(ordinal).map_err(Error::cuda)?;
        Self::new(ctx.default_stream()).map(Some)
    }

    /// The stream ops run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Streaming multiprocessors on the device.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// Waits for the stream, then reports (and clears) what the kernels
    /// found wrong with their data since the last check.
    pub fn check(&self) -> Result<()> {
        let mut status = self.status.lock().unwrap();
        let words = self.stream.clone_dtoh(&*status).map_err(Error::cuda)?;
        if words[0] == 0 {
            return Ok(());
        }
        self.stream
            .memcpy_htod(&STATUS_CLEAR, &mut *status)
            .map_err(Error::cuda)?;
        let bit = words[0].trailing_zeros() as usize;
        let kinds = abi::StatusKind::ALL;
        let kind = kinds[(bit % 4).min(kinds.len() - 1)];
        Err(Error::Device {
            op: abi::OpId::ALL
                .get(bit / 4)
                .map_or("unknown op", |&op| op_name(op)),
            fault: fault(kind),
            index: words[1 + kind as usize] as usize,
        })
    }

    /// cuBLAS on this stream; an error (not cudarc's panic) when the
    /// library cannot be loaded.
    pub(crate) fn blas(&self) -> Result<&CudaBlas> {
        if let Some(blas) = self.blas.get() {
            return Ok(blas);
        }
        if !library_present(&["libcublas.so.13", "libcublas.so"], &["cublas64_13.dll"]) {
            return Err(Error::cuda_msg(
                "cuBLAS (libcublas.so.13) cannot be loaded: install the CUDA 13 toolkit or the \
                 nvidia-cublas wheel and add its lib folder to LD_LIBRARY_PATH",
            ));
        }
        let blas =
            CudaBlas::new(self.stream.clone()).map_err(|e| Error::cuda_in("creating a cuBLAS handle", e))?;
        Ok(self.blas.get_or_init(|| blas))
    }

    pub(crate) fn function(&self, file: KernelFile, name: &str) -> Result<CudaFunction> {
        self.loaded.function(file, name)
    }

    /// The status word, to pass to a kernel launch.
    pub(crate) fn status(&self) -> std::sync::MutexGuard<'_, CudaSlice<u32>> {
        self.status.lock().unwrap()
    }

    /// An uninitialized buffer, for outputs a kernel writes in full.
    pub(crate) fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        // cudarc multiplies `len` by the size unchecked: a wrapped product
        // would allocate a short buffer the kernel then overruns.
        if len
            .checked_mul(std::mem::size_of::<T>())
            .is_none_or(|b| b > isize::MAX as usize)
        {
            return Err(Error::cuda_msg(format!(
                "a device buffer of {len} elements of {} bytes exceeds the address space",
                std::mem::size_of::<T>()
            )));
        }
        // SAFETY: every caller launches a kernel that writes all `len` elements
        // before the buffer is handed out.
        unsafe { self.stream.alloc::<T>(len) }.map_err(Error::cuda)
    }

    /// How many slices to split each of `rows` rows of `vocab` elements into,
    /// so that about four blocks per SM are in flight, with slices no shorter
    /// than `min_slice`.
    pub(crate) fn vocab_splits(&self, rows: usize, vocab: usize, min_slice: usize) -> usize {
        let want = (4 * self.sm_count).div_ceil(rows.max(1));
        want.clamp(1, (vocab / min_slice).max(1))
    }
}

/// Whether a CUDA driver library can be loaded on this machine. (cudarc
/// panics on first use when it cannot, whether it loads the driver itself
/// or was linked against it by candle.)
pub(crate) fn driver_present() -> bool {
    library_present(&["libcuda.so.1", "libcuda.so"], &["nvcuda.dll"])
}

/// Whether one of the shared libraries named (per OS) can be loaded.
fn library_present(unix: &[&str], windows: &[&str]) -> bool {
    let names = if cfg!(windows) { windows } else { unix };
    // SAFETY: loading a CUDA library runs no code of ours; it is unloaded
    // again when the handle drops.
    names
        .iter()
        .any(|&name| unsafe { libloading::Library::new(name) }.is_ok())
}

/// `count` (rows, sequences: `what`) as a grid's x dimension, one block
/// each, or `Unsupported` when they exceed it (2^31 - 1).
pub(crate) fn grid_x(op: &'static str, what: &str, count: usize) -> Result<u32> {
    if count > i32::MAX as usize {
        return Err(Error::Unsupported {
            op,
            reason: format!("{count} {what} exceed a CUDA grid (2^31 - 1)"),
        });
    }
    Ok(count as u32)
}

/// One block of `threads` per sequence, the sequences checked by [`grid_x`].
pub(crate) fn block_per_sequence(op: &'static str, seqs: usize, threads: u32) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_x(op, "sequences", seqs)?, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The device addresses of buffers that a kernel reads through a struct
/// passed by value (`PolicyLossParams`, ...), each with the guard that
/// orders the kernel's reads after the stream's earlier work on it: keep
/// this alive until the launch is enqueued.
pub(crate) struct Addresses<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Addresses<'a> {
    pub(crate) fn new(stream: &'a CudaStream) -> Self {
        Self {
            stream,
            guards: Vec::new(),
        }
    }

    /// `buf`'s address.
    pub(crate) fn of<T>(&mut self, buf: &'a CudaView<'_, T>) -> u64 {
        let (ptr, guard) = buf.device_ptr(self.stream);
        self.guards.push(guard);
        ptr
    }

    /// `buf`'s address, or null (0) when absent.
    pub(crate) fn opt<T>(&mut self, buf: Option<&'a CudaView<'_, T>>) -> u64 {
        buf.map_or(0, |b| self.of(b))
    }
}

/// A launch's result as this crate's error.
pub(crate) fn launched(r: std::result::Result<(), cudarc::driver::DriverError>, kernel: &str) -> Result<()> {
    r.map_err(|e| Error::cuda_in(format!("launching `{kernel}`"), e))
}
