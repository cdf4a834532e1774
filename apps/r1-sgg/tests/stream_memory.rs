//! The training stream's memory does not grow with the data: drawing an
//! epoch and a half of a parquet or JSONL set of N rows and of 4N rows
//! peaks at the same heap, up to the few bytes a row of the index and the
//! epoch's order, while loading the same sets whole grows by every image.
//! (Measured by this test binary's allocator: the peak of live heap bytes.
//! One test in the binary, so no other test allocates meanwhile.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use r1_sgg::data::jsonl::write_jsonl;
use r1_sgg::data::parquet::write_parquet;
use r1_sgg::data::source::{load_samples, DataSource};
use r1_sgg::data::stream::{Order, TrainSet};
use r1_sgg::data::synthetic::{generate_split, Split};
use r1_sgg::data::BadRows;
use r1_sgg::util::rng::Rng;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: forwards the caller's valid layout to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` above with this layout.
        unsafe { System.dealloc(p, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The heap `f` peaks at above what was live when it started.
fn peak_of(f: impl FnOnce()) -> usize {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - base
}

/// Streams `source` for an epoch and a half in batches of 16, each batch
/// dropped before the next (as a trainer does), windows of 2 row groups.
fn stream(source: &DataSource) -> usize {
    peak_of(|| {
        let set = TrainSet::open(source, BadRows::Fail, Order::Epochs { seed: 3, window: 2 }, None).unwrap();
        let mut rng = Rng::new(0);
        let mut drawn = 0;
        while drawn < set.len() * 3 / 2 {
            let batch = set.draw(16, &mut rng).unwrap();
            assert!(batch.iter().all(|d| d.sample.image.width() == 64));
            drawn += batch.len();
        }
    })
}

/// Loads `source` whole, as evaluation sets are.
fn load(source: &DataSource) -> usize {
    peak_of(|| {
        let (samples, _) = load_samples(source, BadRows::Fail, |s| s).unwrap();
        assert!(!samples.is_empty());
    })
}

#[test]
fn streaming_memory_does_not_grow_with_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let n = 300;
    let image = 64 * 64 * 3;
    for rows in [n, 4 * n] {
        let samples = generate_split(Split::Train, rows, 1);
        write_parquet(&samples, dir.path(), &format!("train{rows}")).unwrap();
        write_jsonl(&samples, dir.path(), &format!("train{rows}")).unwrap();
    }
    let parquet = |rows: usize| DataSource::Parquet(vec![dir.path().join(format!("train{rows}.parquet"))]);
    let jsonl = |rows: usize| DataSource::Jsonl(dir.path().join(format!("train{rows}.jsonl")));
    for (format, source) in [
        ("parquet", &parquet as &dyn Fn(usize) -> DataSource),
        ("jsonl", &jsonl),
    ] {
        let (small, large) = (stream(&source(n)), stream(&source(4 * n)));
        let (whole_small, whole_large) = (load(&source(n)), load(&source(4 * n)));
        println!(
            "{format}: streaming peaks at {small} B for {n} rows, {large} B for {} rows; \
             loading whole at {whole_small} B and {whole_large} B",
            4 * n
        );
        // The index and the epoch's order: 12 + 4 bytes a row at most
        // (vectors may double their capacity), and allocator noise.
        let per_row = 2 * 16;
        assert!(
            large <= small + per_row * 3 * n + 64 * 1024,
            "{format}: {small} B for {n} rows grew to {large} B for {} rows",
            4 * n
        );
        // The measurement sees images: loading whole grows by each one.
        assert!(
            whole_large >= whole_small + 3 * n * image,
            "{format}: {whole_small} -> {whole_large}"
        );
        assert!(large * 4 < whole_large, "{format}: {large} vs {whole_large}");
    }
}
