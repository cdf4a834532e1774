//! Shared by the benches: seeded data, the memory-copy floors, process
//! counters (page faults, peak RSS), raw array files, the fused LM-head
//! loss problem, and CUDA event timing.
#![allow(dead_code)]

pub mod fused_loss;

use std::io::Read;
use std::path::Path;

use grpo_kernels::Float;

/// Whether to set up and run the bench group `group`: all of them, unless
/// `GK_BENCH_GROUPS` is set; then those whose names contain it.
/// `bench/gpu/run.sh` sets `cuda`: criterion's own filter skips the timing
/// of the CPU groups but not their setup (gigabytes of random logits).
pub fn selected(group: &str) -> bool {
    match std::env::var("GK_BENCH_GROUPS") {
        Ok(want) if !group.contains(want.as_str()) => {
            eprintln!("{group}: skipped (GK_BENCH_GROUPS={want})");
            false
        }
        _ => true,
    }
}

/// A uniform in [0, 1): SplitMix64 of the counter `k` under `seed`, so
/// any element of a stream is drawn on its own (in parallel, the same for
/// any thread count).
pub fn unit(seed: u64, k: u64) -> f64 {
    let mut z = (seed ^ 0x9E37_79B9_7F4A_7C15).wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

/// `n` seeded standard normals (Box-Muller over [`unit`]), times `scale`.
pub fn normals<T: Float>(n: usize, scale: f32, seed: u64) -> Vec<T> {
    use rayon::prelude::*;
    (0..n as u64)
        .into_par_iter()
        .map(|i| {
            let (u1, u2) = (unit(seed, 2 * i + 1).max(1e-300), unit(seed, 2 * i + 2));
            let g = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            T::from_f32(g as f32 * scale)
        })
        .collect()
}

/// `n` seeded uniforms in `[lo, hi)`.
pub fn uniforms(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| lo + (hi - lo) * unit(seed, i) as f32)
        .collect()
}

/// Token ids in `0..vocab`.
pub fn targets(rows: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..rows as u64)
        .map(|i| ((i.wrapping_mul(0x9E37_79B9) ^ seed) % vocab as u64) as u32)
        .collect()
}

/// `dst [m, n] = a b` in f32 (the `gemm` crate, all threads), `a` stored
/// row-major as `[m, k]` (or `[k, m]` when `a_t`), `b` as `[k, n]` (or
/// `[n, k]` when `b_t`).
pub fn gemm_f32(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
) {
    assert!(dst.len() == m * n && a.len() == m * k && b.len() == k * n);
    let (a_rs, a_cs) = if a_t { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if b_t { (1, k) } else { (n, 1) };
    // SAFETY: the buffers hold the shapes asserted above at these strides,
    // and `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

/// `(minor page faults so far, peak resident set in bytes)` of this
/// process: `ru_minflt` and `ru_maxrss` of `getrusage(RUSAGE_SELF)`, the
/// counters Python's `resource.getrusage` reads.
pub fn rusage() -> (u64, u64) {
    // SAFETY: `rusage` is plain integers; getrusage fills the one it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a live struct, RUSAGE_SELF always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    assert_eq!(rc, 0, "getrusage failed");
    (u.ru_minflt as u64, u.ru_maxrss as u64 * 1024)
}

/// The median (the mean of the middle two for an even count).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

/// Plain numbers (`f32`, `bf16`, `u32`, `u8`) viewed as their little-endian
/// bytes (every supported target is little-endian).
pub fn as_bytes<T: Copy>(xs: &[T]) -> &[u8] {
    // SAFETY: plain data without padding, read as bytes while `xs` lives.
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}

/// Writes `xs` raw to `path`.
pub fn write_raw<T: Copy>(path: &Path, xs: &[T]) {
    std::fs::write(path, as_bytes(xs)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Reads a file [`write_raw`] wrote straight into one buffer (no second
/// copy: peak memory is the array itself).
pub fn read_raw<T: Copy + Default>(path: &Path) -> Vec<T> {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let bytes = f.metadata().unwrap().len() as usize;
    assert_eq!(bytes % std::mem::size_of::<T>(), 0, "{}: size", path.display());
    let mut xs = vec![T::default(); bytes / std::mem::size_of::<T>()];
    // SAFETY: the numbers `read_raw` is used for are valid for any bit
    // pattern; the view covers exactly `xs`, borrowed mutably.
    let view = unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast::<u8>(), bytes) };
    f.read_exact(view)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    xs
}

#[cfg(feature = "cuda")]
pub mod gpu {
    use cudarc::driver::sys::CUevent_flags;
    use grpo_kernels::cuda::Gpu;
    use std::time::Duration;

    /// Device time of `iters` runs of `f`, measured with CUDA events (after
    /// the stream drains whatever was queued before).
    pub fn time(gpu: &Gpu, iters: u64, mut f: impl FnMut()) -> Duration {
        let stream = gpu.stream();
        let ctx = stream.context();
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        stream.synchronize().unwrap();
        start.record(stream).unwrap();
        for _ in 0..iters {
            f();
        }
        end.record(stream).unwrap();
        end.synchronize().unwrap();
        gpu.check().expect("kernels raised a data error during the bench");
        Duration::from_secs_f64(start.elapsed_ms(&end).unwrap() as f64 / 1e3)
    }
}

/// The f32 multiply-add peak of this machine's `threads` cores in GFLOP/s
/// (2 flops per lane per FMA), measured: each rayon thread runs
/// independent FMA chains, enough to cover the FMA units' latency, on the
/// widest vectors it has (AVX-512, else AVX2 + FMA, else none: `None`).
/// A GEMM's GFLOP/s over this is the fraction of the hardware it uses.
pub fn fma_peak_gflops() -> Option<f64> {
    use rayon::prelude::*;
    use std::time::Instant;
    #[cfg(target_arch = "x86_64")]
    {
        const ITERS: u64 = 50_000_000;
        let lanes = if is_x86_feature_detected!("avx512f") {
            16
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            8
        } else {
            return None;
        };
        let threads = rayon::current_num_threads();
        let run = || {
            // SAFETY: the feature was detected above.
            (0..threads)
                .into_par_iter()
                .map(|_| unsafe {
                    if lanes == 16 {
                        fma_chains_avx512(ITERS)
                    } else {
                        fma_chains_avx2(ITERS)
                    }
                })
                .sum::<f32>()
        };
        std::hint::black_box(run());
        let t0 = Instant::now();
        std::hint::black_box(run());
        let flops = (threads as u64 * ITERS * FMA_CHAINS as u64 * lanes * 2) as f64;
        Some(flops / t0.elapsed().as_secs_f64() / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Independent accumulators per thread: two FMA ports of 4-cycle latency
/// need 8 in flight; 12 leaves room.
const FMA_CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); FMA_CHAINS];
    for _ in 0..iters {
        for x in &mut acc {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); FMA_CHAINS];
    for _ in 0..iters {
        for x in &mut acc {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut lanes = [0.0f32; 8];
    acc.iter()
        .map(|&x| {
            _mm256_storeu_ps(lanes.as_mut_ptr(), x);
            lanes.iter().sum::<f32>()
        })
        .sum()
}
