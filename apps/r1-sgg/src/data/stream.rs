//! The training set as the trainers draw from it: streamed from disk with
//! bounded memory, in a seeded order that `--resume` continues exactly.
//!
//! **What is held.** A JSONL set keeps an index of its records (12 bytes a
//! record, [`JsonlIndex`]) and reads a record's line and image when it is
//! drawn. A parquet set keeps its shards' footers ([`ParquetDataset`]; a
//! row's shard, row group and row follow from them, nothing is stored per
//! row) and the row groups of one shuffle window, encoded. Per epoch the
//! order is one `u32` a row. Nothing else grows with the data: a 56k-image
//! training set is never in memory at once (the `stream_memory` test
//! measures the peak heap for N and 4N rows). Evaluation sets are small
//! (`--eval-size`, R1-SGG's 5k-image val split) and are still loaded whole
//! ([`load_samples`](super::source::load_samples)).
//!
//! **The order** ([`Order::Epochs`]): epoch after epoch, each a seeded
//! permutation of all rows, fixed by `(seed, epoch)` alone, so draw `t` of
//! the run is row `order(t / N)[t % N]` whatever happened before:
//! - JSONL: a uniform random permutation of the records, as R1-SGG's
//!   trainers draw (transformers' `Trainer` shuffles its map-style
//!   `datasets.Dataset` with a `RandomSampler`, a new permutation each epoch;
//!   the permutation is not torch's, the distribution is the same).
//! - parquet: the row groups in a random order, then windows of `window`
//!   consecutive groups (`--shuffle-window`, 8 by default), each window's
//!   rows shuffled together (a shuffle buffer over shuffled row groups). Each
//!   row still comes once per epoch, in a different place each epoch, but
//!   not uniformly: rows of one row group (100 consecutive rows of a
//!   `datasets` shard) are drawn within the same `window x 100` draws. The
//!   alternative, R1-SGG's full permutation with random access, would decode
//!   a whole row group (100 encoded images) for every sample drawn: 100
//!   times the reading, where the window reads each group once an epoch for
//!   `window` groups of memory. A larger window comes closer to the full
//!   shuffle; one as large as the set is the full shuffle.
//!
//! [`Order::Independent`] draws each sample uniformly with replacement from
//! the trainer's own generator: the demo's synthetic set (generated in
//! memory, a few thousand 32-pixel images) keeps the order its published
//! results were run with.
//!
//! **Resume.** The stream's position (draws made, malformed rows skipped
//! included) is saved in each checkpoint ([`POSITION_KEY`]) and restored
//! with it, so a resumed run reads the same samples as one never stopped,
//! mid-epoch too. **Bad rows** fail with the reader's error naming the file
//! and line or shard and row, or under [`BadRows::Skip`] are skipped and
//! counted (each bad row once, however many epochs pass it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use super::jsonl::JsonlIndex;
use super::parquet::ParquetDataset;
use super::scene::add_labels;
use super::source::DataSource;
use super::{BadRows, DataError, Sample};
use crate::util::rng::Rng;

/// The key under which checkpoints keep the stream's position
/// (`TrainingState::extra`), as decimal text.
pub const POSITION_KEY: &str = "data_position";

/// Row groups shuffled together by default (`--shuffle-window`).
pub const DEFAULT_WINDOW: usize = 8;

/// How the training samples are ordered (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Each draw uniform over the set, with replacement, from the
    /// trainer's generator (the demo's synthetic set).
    Independent,
    /// Epochs of seeded permutations; a parquet set's row groups shuffled
    /// together `window` at a time.
    Epochs {
        /// The run's seed.
        seed: u64,
        /// Row groups whose rows are shuffled together (at least 1).
        window: usize,
    },
}

/// Where the rows are.
#[derive(Debug)]
enum Rows {
    Memory(Vec<Sample>),
    Jsonl(JsonlIndex),
    Parquet(ParquetDataset),
}

/// One sample drawn for training.
#[derive(Debug, Clone)]
pub struct Drawn {
    /// Its row in the set.
    pub index: usize,
    /// Times it was drawn before in this run: its epoch under
    /// [`Order::Epochs`] (so it survives `--resume`), this process's count
    /// under [`Order::Independent`].
    pub visit: usize,
    /// The sample, resized if the set resizes.
    pub sample: Sample,
}

/// What moves as samples are drawn.
#[derive(Debug, Default)]
struct Cursor {
    /// Draws made so far, skipped rows included (under [`Order::Epochs`]).
    position: u64,
    /// The permutation of the epoch `position` is in, once computed.
    epoch: Option<(u64, Vec<u32>)>,
    /// Draws per row (under [`Order::Independent`]).
    visits: HashMap<usize, usize>,
    /// Rows found malformed (skipped without reading again).
    bad: BTreeSet<usize>,
    /// The first one's error.
    first_bad: Option<String>,
    /// Whether `position` was restored from a checkpoint.
    restored: bool,
}

/// A training set drawn from batch by batch (see the module docs). Drawing
/// takes `&self` (the cursor is behind a lock), so the trainers and the
/// checkpointing hooks share it.
#[derive(Debug)]
pub struct TrainSet {
    rows: Rows,
    /// The rows in blocks read together (parquet row groups); `None`: each
    /// row its own block.
    groups: Option<Vec<Range<usize>>>,
    order: Order,
    bad_rows: BadRows,
    /// Samples are resized to `side x side` as read (the demo's model).
    side: Option<u32>,
    /// What `--data` named, for messages.
    name: PathBuf,
    cursor: Mutex<Cursor>,
}

impl TrainSet {
    /// Samples already in memory (the demo's synthetic set), drawn in
    /// [`Order::Independent`].
    pub fn in_memory(samples: Vec<Sample>) -> Self {
        Self::with_rows(
            Rows::Memory(samples),
            None,
            Order::Independent,
            BadRows::Fail,
            None,
            "memory".into(),
        )
    }

    /// Samples in memory drawn in `order` (what the stream does to files,
    /// on samples; for tests and small sets).
    pub fn in_memory_ordered(samples: Vec<Sample>, order: Order) -> Self {
        Self::with_rows(
            Rows::Memory(samples),
            None,
            order,
            BadRows::Fail,
            None,
            "memory".into(),
        )
    }

    /// Streams `source`: a JSONL file is indexed (one pass over its lines),
    /// parquet shards' footers are read; nothing else is read until drawn.
    /// A parquet set keeps `window` decoded row groups under
    /// [`Order::Epochs`]. Malformed records fail or are skipped per
    /// `bad_rows`; samples are resized to `side x side` when given. Errors
    /// are the readers' ([`DataError::Io`], [`DataError::Shard`]).
    pub fn open(
        source: &DataSource,
        bad_rows: BadRows,
        order: Order,
        side: Option<u32>,
    ) -> Result<Self, DataError> {
        Ok(match source {
            DataSource::Jsonl(path) => Self::with_rows(
                Rows::Jsonl(JsonlIndex::open(path)?),
                None,
                order,
                bad_rows,
                side,
                path.clone(),
            ),
            DataSource::Parquet(shards) => {
                let mut data = ParquetDataset::open(shards)?;
                if let Order::Epochs { window, .. } = order {
                    data.set_cached_groups(window);
                }
                let groups = Some(data.row_groups());
                let name = match shards.as_slice() {
                    [one] => one.clone(),
                    more => more
                        .first()
                        .and_then(|p| p.parent())
                        .map(PathBuf::from)
                        .unwrap_or_default(),
                };
                Self::with_rows(Rows::Parquet(data), groups, order, bad_rows, side, name)
            }
        })
        .and_then(|set| {
            // An epoch's order holds rows as u32.
            if set.len() > u32::MAX as usize {
                return Err(DataError::Source {
                    path: set.name.clone(),
                    reason: format!("{} rows; at most {} are streamed", set.len(), u32::MAX),
                });
            }
            Ok(set)
        })
    }

    fn with_rows(
        rows: Rows,
        groups: Option<Vec<Range<usize>>>,
        order: Order,
        bad_rows: BadRows,
        side: Option<u32>,
        name: PathBuf,
    ) -> Self {
        let order = match order {
            Order::Epochs { seed, window } => Order::Epochs {
                seed,
                window: window.max(1),
            },
            o => o,
        };
        TrainSet {
            rows,
            groups,
            order,
            bad_rows,
            side,
            name,
            cursor: Mutex::new(Cursor::default()),
        }
    }

    /// Rows in the set (malformed ones included).
    pub fn len(&self) -> usize {
        match &self.rows {
            Rows::Memory(s) => s.len(),
            Rows::Jsonl(j) => j.len(),
            Rows::Parquet(p) => p.len(),
        }
    }

    /// Whether the set has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The order draws follow.
    pub fn order(&self) -> Order {
        self.order
    }

    /// Every object category and predicate of the set, normalized, read
    /// without images (the JSONL lines; the parquet `objects` and
    /// `relationships` columns): what choosing the vocabulary needs.
    pub fn labels(&self, labels: &mut HashSet<String>) {
        match &self.rows {
            Rows::Memory(samples) => samples.iter().for_each(|s| add_labels(&s.graph, labels)),
            Rows::Jsonl(j) => j.labels(labels),
            Rows::Parquet(p) => p.labels(labels),
        }
    }

    /// Row groups of a parquet set decoded so far (0 for other sets): the
    /// reading the order costs.
    pub fn row_groups_read(&self) -> usize {
        match &self.rows {
            Rows::Parquet(p) => p.row_groups_read(),
            _ => 0,
        }
    }

    /// Epoch `epoch`'s permutation of the rows under [`Order::Epochs`] (see
    /// the module docs): a function of the seed, the epoch and the row
    /// groups only. Under [`Order::Independent`], the rows in order.
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let n = self.len();
        let Order::Epochs { seed, window } = self.order else {
            return (0..n as u32).collect();
        };
        // "stream" in ASCII: a stream of its own, not the sampler's.
        let mut rng = Rng::derive(&[seed, 0x73_74_72_65_61_6d, epoch]);
        match &self.groups {
            None => {
                let mut order: Vec<u32> = (0..n as u32).collect();
                rng.shuffle(&mut order);
                order
            }
            Some(groups) => {
                let mut blocks: Vec<usize> = (0..groups.len()).collect();
                rng.shuffle(&mut blocks);
                let mut order = Vec::with_capacity(n);
                for chunk in blocks.chunks(window) {
                    let start = order.len();
                    for &b in chunk {
                        order.extend(groups[b].clone().map(|r| r as u32));
                    }
                    rng.shuffle(&mut order[start..]);
                }
                order
            }
        }
    }

    /// Draws made so far under [`Order::Epochs`], malformed rows skipped
    /// included: what a checkpoint saves ([`POSITION_KEY`]).
    pub fn position(&self) -> u64 {
        self.lock().position
    }

    /// Continues from `position` (a checkpoint's), so the next draw is the
    /// one a run never stopped would make.
    pub fn restore(&self, position: u64) {
        let mut c = self.lock();
        c.position = position;
        c.restored = true;
    }

    /// Positions the stream for a stage starting at `start_step` with
    /// `per_step` samples a step, unless [`restore`](Self::restore) did
    /// since the last call (a checkpoint from before positions were saved resumes at
    /// `start_step * per_step`, exact when no row was skipped).
    pub fn begin(&self, start_step: usize, per_step: usize) {
        let mut c = self.lock();
        // A restored position serves the stage it was restored for only.
        if !std::mem::take(&mut c.restored) {
            c.position = (start_step as u64).saturating_mul(per_step as u64);
        }
    }

    /// Malformed rows skipped so far (each counted once), with the first
    /// one's error.
    pub fn skipped(&self) -> (usize, Option<String>) {
        let c = self.lock();
        (c.bad.len(), c.first_bad.clone())
    }

    /// Sample `index`, resized if the set resizes.
    fn read(&self, index: usize) -> Result<Sample, DataError> {
        let sample = match &self.rows {
            Rows::Memory(samples) => samples.get(index).cloned().ok_or(DataError::OutOfRange {
                index,
                len: samples.len(),
            }),
            Rows::Jsonl(j) => j.get(index),
            Rows::Parquet(p) => p.get(index).map(|r| r.sample),
        }?;
        Ok(match self.side {
            Some(side) => sample.resized(side, side),
            _ => sample,
        })
    }

    /// The next `n` samples. Under [`Order::Independent`] each is
    /// `rng.next_u64() % len` (all `n` drawn first, as the trainers always
    /// drew); under [`Order::Epochs`] the stream's next ones, `rng` unused.
    /// A malformed row is its reader's error, or under [`BadRows::Skip`]
    /// skipped (and counted); a set whose every row is bad is a
    /// [`DataError::Source`] rather than a loop without end.
    pub fn draw(&self, n: usize, rng: &mut Rng) -> Result<Vec<Drawn>, DataError> {
        let len = self.len();
        if len == 0 {
            return Err(self.no_samples());
        }
        let mut out = Vec::with_capacity(n);
        let mut c = self.lock();
        if self.order == Order::Independent {
            let picks: Vec<usize> = (0..n).map(|_| (rng.next_u64() % len as u64) as usize).collect();
            for index in picks {
                let seen = c.visits.entry(index).or_default();
                let visit = *seen;
                *seen += 1;
                out.push(Drawn {
                    index,
                    visit,
                    sample: self.read(index)?,
                });
            }
            return Ok(out);
        }
        while out.len() < n {
            let epoch = c.position / len as u64;
            if c.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
                c.epoch = Some((epoch, self.epoch_order(epoch)));
            }
            let index = c
                .epoch
                .as_ref()
                .map_or(0, |(_, order)| order[(c.position % len as u64) as usize] as usize);
            c.position += 1;
            let sample = if c.bad.contains(&index) {
                None
            } else {
                match self.read(index) {
                    Ok(s) => Some(s),
                    Err(e) if self.bad_rows == BadRows::Skip && e.is_bad_record() => {
                        c.bad.insert(index);
                        c.first_bad.get_or_insert_with(|| e.to_string());
                        None
                    }
                    Err(e) => return Err(e),
                }
            };
            match sample {
                Some(sample) => out.push(Drawn {
                    index,
                    visit: epoch as usize,
                    sample,
                }),
                // Every row found bad: nothing left to draw.
                None if c.bad.len() >= len => return Err(self.no_samples()),
                None => {}
            }
        }
        Ok(out)
    }

    fn no_samples(&self) -> DataError {
        DataError::Source {
            path: self.name.clone(),
            reason: format!("no readable sample among its {} rows", self.len()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cursor> {
        self.cursor.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::jsonl::write_jsonl;
    use crate::data::parquet::write_parquet;
    use crate::data::synthetic::{generate_split, Split};
    use crate::util::fs::temp_dir;
    use std::path::Path;

    fn epochs(seed: u64, window: usize) -> Order {
        Order::Epochs { seed, window }
    }

    fn ids(drawn: &[Drawn]) -> Vec<String> {
        drawn.iter().map(|d| d.sample.id.clone()).collect()
    }

    /// Every draw of `batches` batches of `n`, one id per draw.
    fn run(set: &TrainSet, batches: usize, n: usize) -> Vec<String> {
        let mut rng = Rng::new(0);
        (0..batches)
            .flat_map(|_| ids(&set.draw(n, &mut rng).unwrap()))
            .collect()
    }

    fn is_permutation(order: &[u32], n: usize) -> bool {
        let mut sorted = order.to_vec();
        sorted.sort_unstable();
        sorted == (0..n as u32).collect::<Vec<_>>()
    }

    #[test]
    fn each_epoch_is_a_seeded_permutation() {
        let dir = temp_dir("stream_order");
        let samples = generate_split(Split::Train, 250, 1);
        let shard = write_parquet(&samples, &dir, "train").unwrap();
        let jsonl = write_jsonl(&samples, &dir, "train").unwrap();
        for source in [DataSource::Parquet(vec![shard]), DataSource::Jsonl(jsonl)] {
            let set = TrainSet::open(&source, BadRows::Fail, epochs(7, 2), None).unwrap();
            let (a, b) = (set.epoch_order(0), set.epoch_order(1));
            assert!(is_permutation(&a, 250) && is_permutation(&b, 250));
            assert_ne!(a, b);
            // Fixed by the seed and the epoch.
            let again = TrainSet::open(&source, BadRows::Fail, epochs(7, 2), None).unwrap();
            assert_eq!(again.epoch_order(1), b);
            let other = TrainSet::open(&source, BadRows::Fail, epochs(8, 2), None).unwrap();
            assert_ne!(other.epoch_order(0), a);
        }
        // Parquet, row groups [0,100) [100,200) [200,250), windows of 2:
        // a window of two groups shuffled together, then one of one group.
        let set = TrainSet::open(
            &DataSource::Parquet(vec![dir.join("train.parquet")]),
            BadRows::Fail,
            epochs(7, 2),
            None,
        )
        .unwrap();
        let order = set.epoch_order(0);
        let group = |r: u32| r / 100;
        let last = group(order[249]);
        let size = if last == 2 { 50 } else { 100 };
        let (head, tail) = order.split_at(250 - size);
        assert!(tail.iter().all(|&r| group(r) == last));
        assert!(head.iter().all(|&r| group(r) != last));
        // Interleaved, not group after group.
        let changes = head.windows(2).filter(|w| group(w[0]) != group(w[1])).count();
        assert!(changes > 10, "{changes}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_epoch_decodes_each_row_group_once() {
        let dir = temp_dir("stream_groups");
        let samples = generate_split(Split::Train, 450, 2);
        let shard = write_parquet(&samples, &dir, "train").unwrap();
        let set = TrainSet::open(
            &DataSource::Parquet(vec![shard]),
            BadRows::Fail,
            epochs(3, 2),
            None,
        )
        .unwrap();
        let drawn = run(&set, 9, 50);
        assert_eq!(drawn.len(), 450);
        let distinct: BTreeSet<&String> = drawn.iter().collect();
        assert_eq!(distinct.len(), 450, "every row once an epoch");
        assert_eq!(set.row_groups_read(), 5, "each of the 5 row groups once");
        // The second epoch: once more each, but for those of the last window
        // still kept if the new epoch starts with them.
        run(&set, 9, 50);
        assert!(
            (8..=10).contains(&set.row_groups_read()),
            "{}",
            set.row_groups_read()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resuming_continues_the_same_order() {
        let dir = temp_dir("stream_resume");
        let samples = generate_split(Split::Train, 130, 3);
        let shard = write_parquet(&samples, &dir, "train").unwrap();
        let jsonl = write_jsonl(&samples, &dir, "train").unwrap();
        for source in [DataSource::Parquet(vec![shard]), DataSource::Jsonl(jsonl)] {
            let open = || TrainSet::open(&source, BadRows::Fail, epochs(11, 1), Some(8)).unwrap();
            // 7 batches of 24: across the epoch boundary at 130.
            let whole = run(&open(), 7, 24);
            let first = open();
            let head = run(&first, 3, 24);
            let saved = first.position();
            assert_eq!(saved, 72);
            let resumed = open();
            resumed.restore(saved);
            resumed.begin(3, 24);
            let tail = run(&resumed, 4, 24);
            assert_eq!([head, tail].concat(), whole);
            // The next stage (GRPO after SFT in `demo`) starts afresh.
            resumed.begin(0, 24);
            assert_eq!(run(&resumed, 1, 24), whole[..24]);
            // Without a saved position, the step says where to start.
            let by_step = open();
            by_step.begin(3, 24);
            assert_eq!(run(&by_step, 4, 24), whole[72..]);
            // Resized as read; a draw's visit is its epoch.
            let set = open();
            let mut rng = Rng::new(0);
            let drawn = set.draw(140, &mut rng).unwrap();
            assert!(drawn.iter().all(|d| d.sample.image.dimensions() == (8, 8)));
            assert!(drawn[..130].iter().all(|d| d.visit == 0) && drawn[130..].iter().all(|d| d.visit == 1));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/parquet")
            .join(name)
    }

    #[test]
    fn bad_rows_fail_or_are_skipped_once_and_counted() {
        // The fixture's bad shard: 10 rows, one good (image id 2343).
        let bad = fixture("bad/rows.parquet");
        let source = DataSource::Parquet(vec![bad.clone()]);
        let set = TrainSet::open(&source, BadRows::Fail, epochs(0, 8), None).unwrap();
        let err = set.draw(3, &mut Rng::new(0)).unwrap_err();
        assert!(
            matches!(&err, DataError::Row { shard, .. } if *shard == bad),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with(&format!("{}: row ", bad.display())),
            "{err}"
        );

        let set = TrainSet::open(&source, BadRows::Skip, epochs(0, 8), None).unwrap();
        let drawn = run(&set, 3, 1);
        assert_eq!(drawn, ["2343", "2343", "2343"]);
        let (count, first) = set.skipped();
        assert_eq!(count, set.len() - 1, "each bad row counted once over 3 epochs");
        assert!(first.unwrap().contains("row"));
        // Skipped rows count in the position: resuming from it is exact.
        let position = set.position();
        assert!(position > 2 * set.len() as u64, "{position}");
        let resumed = TrainSet::open(&source, BadRows::Skip, epochs(0, 8), None).unwrap();
        resumed.restore(position);
        assert_eq!(run(&resumed, 2, 1), run(&set, 2, 1));
        // Nothing readable: an error, not a loop without end.
        let types = DataSource::Parquet(vec![fixture("bad/types.parquet")]);
        let set = TrainSet::open(&types, BadRows::Skip, epochs(0, 8), None).unwrap();
        let err = set.draw(1, &mut Rng::new(0)).unwrap_err();
        assert!(matches!(err, DataError::Source { .. }), "{err:?}");
        assert!(err.to_string().contains("no readable sample"), "{err}");
    }

    #[test]
    fn independent_draws_are_the_trainers_picks() {
        let samples = generate_split(Split::Train, 10, 4);
        let set = TrainSet::in_memory(samples.clone());
        let mut rng = Rng::new(5);
        let drawn = set.draw(6, &mut rng).unwrap();
        let mut want = Rng::new(5);
        for d in &drawn {
            let index = (want.next_u64() % 10) as usize;
            assert_eq!((d.index, &d.sample.id), (index, &samples[index].id));
        }
        // The generator moved by exactly the picks.
        assert_eq!(rng.next_u64(), want.next_u64());
        // Visits count this process's draws of each row.
        let again = set.draw(40, &mut rng).unwrap();
        assert!(again.iter().any(|d| d.visit > 0));
        // In memory, ordered as files are: every sample once an epoch.
        let ordered = TrainSet::in_memory_ordered(samples, epochs(1, 1));
        let mut seen: Vec<usize> = ordered
            .draw(10, &mut rng)
            .unwrap()
            .iter()
            .map(|d| d.index)
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }
}
