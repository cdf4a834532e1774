//! GPU test helpers: a device handle that fails loudly when the GPU tests
//! were asked to run (`--include-ignored`) but no GPU is there, uploads,
//! downloads, NaN poisoning.
#![allow(dead_code)]

use cudarc::driver::{CudaSlice, DeviceRepr};
use grpo_kernels::cuda::Gpu;

/// The GPU, or a panic explaining why not (the GPU tests are `#[ignore]`d
/// and run only when asked, with `--include-ignored`, on a machine with one).
pub fn gpu() -> Gpu {
    match Gpu::try_default(0) {
        Ok(Some(gpu)) => gpu,
        Ok(None) => {
            panic!("GPU tests were asked to run (--include-ignored), but no CUDA device is usable here")
        }
        Err(e) => panic!("CUDA device unusable: {e}"),
    }
}

pub fn up<T: DeviceRepr>(gpu: &Gpu, xs: &[T]) -> CudaSlice<T> {
    gpu.stream().clone_htod(xs).expect("upload")
}

pub fn down<T: DeviceRepr + Default + Clone>(gpu: &Gpu, xs: &CudaSlice<T>) -> Vec<T> {
    gpu.stream().clone_dtoh(xs).expect("download")
}

/// A device buffer of `n` NaNs: anything a kernel fails to write stays NaN.
pub fn poisoned(gpu: &Gpu, n: usize) -> CudaSlice<f32> {
    up(gpu, &vec![f32::NAN; n])
}

/// Under compute-sanitizer (GK_SANITIZER=1) the suites keep their small
/// cases: the tool runs kernels 10-100x slower.
pub fn sanitizer() -> bool {
    std::env::var("GK_SANITIZER").is_ok_and(|v| v == "1")
}

/// `cases` without those over `max_elems` elements when under the sanitizer.
pub fn sized<T>(cases: Vec<T>, elems: impl Fn(&T) -> usize, max_elems: usize) -> Vec<T> {
    if sanitizer() {
        cases.into_iter().filter(|c| elems(c) <= max_elems).collect()
    } else {
        cases
    }
}

/// Fills and frees `n` floats of NaN, so that the next allocations of an op
/// (which come from the stream's memory pool) most likely start as NaN:
/// outputs the kernels fail to write then show.
pub fn poison_pool(gpu: &Gpu, n: usize) {
    drop(poisoned(gpu, n));
}
