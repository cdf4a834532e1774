//! The vision tower attends within each image: with two images of `n`
//! patches each, no allocation of the forward reaches the size of one
//! `[heads, 2n, 2n]` score matrix across both images. (Counted by this test
//! binary's allocator: the largest single allocation.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use r1_sgg::model::qwen2_vl::{Config, Qwen2Vl};
use r1_sgg::model::SeededVars;

struct LargestAllocation;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: forwards the caller's valid layout to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: `p` came from `alloc` above with this layout.
        unsafe { System.dealloc(p, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

#[test]
fn vision_attention_never_spans_two_images() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen2_vl/untied");
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let vars = VarMap::new();
    let model = Qwen2Vl::new(&cfg, SeededVars::builder(&vars, 0, &Device::Cpu)).unwrap();
    // Two 40x40-patch images: 1600 patches each, 3200 in all.
    let (grid, n) = ([1, 40, 40], 1600);
    let pixels = Tensor::randn(0f32, 1.0, (2 * n, cfg.vision.patch_dim()), &Device::Cpu).unwrap();
    let across = cfg.vision.num_heads * (2 * n) * (2 * n) * DType::F32.size_in_bytes();
    let within = cfg.vision.num_heads * n * n * DType::F32.size_in_bytes();
    LARGEST.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let embeds = model.vision_embeds(&pixels, &[grid, grid]);
    COUNTING.store(false, Ordering::Relaxed);
    assert_eq!(embeds.unwrap().dims(), &[2 * n / 4, cfg.vision.hidden_size]);
    let largest = LARGEST.load(Ordering::Relaxed);
    // One image's scores (and the inputs, which are smaller here) fit; both images' never do.
    assert!(
        largest >= within,
        "the per-image scores ({within} B) were not even allocated: {largest} B"
    );
    assert!(
        largest < across / 2,
        "an allocation of {largest} B, against {across} B for scores across images"
    );
}
