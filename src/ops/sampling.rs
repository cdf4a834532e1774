//! Fused token sampling: temperature, top-k, top-p and min-p filtering and
//! a draw from the filtered distribution, one token per row of logits
//! `[B, V]`, reproducible from `(seed, step)`, returning the token and its
//! log-probability.
//!
//! The filters follow Hugging Face transformers' logits warpers, applied in
//! its order: `TemperatureLogitsWarper`, `TopKLogitsWarper`,
//! `TopPLogitsWarper`, `MinPLogitsWarper`. The draw is the Gumbel-max trick
//! over the [Philox stream](crate::ops::philox): `argmax_j (x_j + g_j)` with
//! independent standard Gumbel `g_j` is an exact sample of `softmax(x)`
//! restricted to the `j` taken (Gumbel 1954; Maddison et al., "A* Sampling",
//! 2014), and needs no sort, no normalization and no prefix sum.
//!
//! # The rule, step by step
//!
//! A CUDA kernel follows the same steps, so that it picks the same token for
//! the same seed; they can disagree only where two values tie within
//! rounding (a key `x_j + g_j` or a threshold statistic below). The same
//! holds between CPUs: the copies compiled with FMA round the Gumbel noise's
//! `ln` and the weights' `exp` once per multiply-add, the baseline copy
//! twice. Row `b`:
//!
//! 1. **Scale.** `x_j = z_j * (1 / T)` in f32, with `1 / T` rounded to f32
//!    (`T = 0`, greedy, uses 1). `M = max_j x_j`;
//!    `lse = M + ln sum_j e^(x_j - M)`.
//! 2. **Greedy** (`T = 0`): the token is the lowest `j` with `x_j = M`; no
//!    filter and no randomness. Go to 6.
//! 3. **Thresholds.** Every filter keeps `{ j : x_j >= tau }` for a `tau`,
//!    so the filters combine as `tau = max(tau_k, tau_p, tau_m)`; an
//!    inactive filter has `tau = -inf`.
//!    - top-k (`0 < k < V`): `tau_k` = the k-th largest `x`. Ties with it
//!      are kept (HF removes `scores < kth largest`), so more than k tokens
//!      may stay.
//!    - top-p (`p < 1`), on the distribution renormalized over the top-k set
//!      `K = { j : x_j >= tau_k }`: with `w_j = e^(x_j - M)` and
//!      `Z = sum_{i in K} w_i`, keep `j in K` iff
//!      `sum_{i in K, x_i > x_j} w_i < p Z`: the mass strictly above `j` has
//!      not yet reached `p`. The kept set is `{ x_j >= tau_p }`, `tau_p` the
//!      smallest such `x_j`; the top token is always kept. Tokens of equal
//!      value are kept or dropped together, whatever their order in the row
//!      (FlashInfer's pivot search is order independent in the same way).
//!
//!      **How this differs from Hugging Face.** `TopPLogitsWarper` sorts the
//!      row ascending with `torch.sort` and drops every token whose
//!      cumulative probability is `<= 1 - p`. On a row whose tokens at the
//!      boundary have distinct values, that is exactly the rule above
//!      (checked against transformers 5.25 on the rows of
//!      `tests/fixtures/hf_top_p.json`). When tied values straddle the
//!      boundary, HF keeps only the part of the tie group that `torch.sort`
//!      happens to place last, an order it does not specify, while this rule
//!      keeps the whole group: the kept set here is HF's plus the rest of
//!      its lowest value's tie group, never less. With bf16 logits this is
//!      routine, not a corner case: on bf16 rows of N(0, 2.5²) logits at
//!      V = 32000 and top-p 0.9, HF cut a tie group in 97 rows of 100,
//!      17.6 more tokens a row were eligible here, and 0.056% of draws fell
//!      outside HF's set (`tests/fixtures/hf_top_p.py` measures it).
//!    - min-p (`min_p > 0`): HF removes `p_j < min_p * max_i p_i`, that is
//!      `x_j < M + ln(min_p)`: `tau_m = M + ln(min_p)` in f32.
//! 4. **Noise.** `g_j = -ln(-ln u_j)`, `u_j` the uniform of
//!    `(seed, row b, step, j)` (see [`RowStream`]).
//! 5. **Draw.** The token is `argmax_{j : x_j >= tau} (x_j + g_j)`, the key
//!    `x_j + g_j` rounded to f32, ties to the lowest `j`.
//! 6. **Log-prob.** `logp = x_token - lse`: the log-probability of the token
//!    under `softmax(z / T)` **before** filtering (under `softmax(z)` when
//!    greedy). This is the sampling policy's own log-prob, which a GRPO
//!    trainer compares with the log-probs it recomputes; it is not the
//!    log-prob under the truncated distribution actually sampled from.
//!
//! # How the CPU finds the thresholds (no sort of V)
//!
//! Only the thresholds above are part of the rule; how they are found is
//! free. Here, for one row, after the scaling pass:
//!
//! - **top-k**: one pass keeps the values at or above a floor, in a buffer;
//!   whenever the buffer outgrows `2k + 1024` values, `select_nth_unstable`
//!   raises the floor to the k-th largest it holds (a lower bound on the
//!   row's k-th largest). After the first few thousand tokens almost every
//!   value fails the (vectorized) compare. A last selection gives `tau_k`
//!   and the top-k set.
//! - **top-p** over a top-k set of at most 4096 values: sort the set and
//!   scan it in descending order (ties together), applying the rule above.
//! - **top-p** otherwise: a **histogram** pass puts each `x_j >= tau_k` in
//!   bucket `min(floor((M - x_j) * 64), 2047)` (1/64-nat buckets below the
//!   max; the last one holds everything 32 nats or more below it, `-inf`
//!   included) and adds up each bucket's mass `w_j` (f64). The bucket index
//!   never increases with `x`, so a bucket's tokens all lie strictly above
//!   the next bucket's. Walk the buckets, adding masses, to the first
//!   bucket where the mass reaches `p Z`; every earlier token is kept,
//!   every later one dropped, and `tau_p` lies in that bucket: gather it
//!   (one pass), sort it alone and scan it as above.
//! - **Draw**: the Gumbel keys are computed 64 indices at a time (16 Philox
//!   counters side by side, which vectorizes), skipping every block whose
//!   largest `x` is below `tau`, or is too small to win even with the
//!   largest possible noise (`max x + 17 <` the key of the row's argmax).
//!   Skipping never changes the result; it makes a top-k/top-p draw touch
//!   only the few blocks holding kept tokens. A block holding at most 10 kept
//!   tokens (a wide top-p set spread over the vocabulary has about one per
//!   block) computes just their noise, one Philox counter each. Any other
//!   block computes its 64 random words, and stops there when its largest
//!   `x` plus the noise of its largest word (the noise grows with the word)
//!   is below the best key so far: most blocks of a plain-temperature row.
//!
//! So a top-k row costs about three passes over `V` f32 values (scale,
//! top-k compare, block maxima), a top-p row four (scale, histogram, gather,
//! block maxima) plus sorting one bucket; a plain-temperature row costs the
//! scaling pass and one pass of Philox words, with the Gumbel noise of the
//! few blocks that can win. Rows are independent and run in parallel
//! (rayon), each thread with its own scratch.
//!
//! # Non-finite logits
//!
//! `-inf` means probability 0; such a token is never drawn. A NaN or `+inf`
//! logit, or a row with no finite logit, is an [`Error::NonFinite`] with
//! `what: "logits"` naming the row; a finite logit whose scaled value
//! `z / T` overflows f32 is `what: "logits / temperature"`. The temperature
//! must have a finite reciprocal (`T = 0` or `T >= 1 / f32::MAX`).

use std::cell::RefCell;

use rayon::prelude::*;

use crate::element::Float;
use crate::error::{check, Error, Result};
use crate::memory::{Host, Memory};
use crate::ops::logprob::scaled_row_fault;
use crate::ops::math::{self, multiversion, SoftmaxState, BLOCK};
use crate::ops::philox::{self, RowStream, BLOCK_TOKENS, GUMBEL_MAX};

pub(crate) const OP: &str = "sample";

/// Histogram buckets per nat below the row maximum.
const BUCKETS_PER_NAT: f32 = 64.0;
/// Number of buckets; the last one collects everything further down.
const BUCKETS: usize = 2048;
const LAST_BUCKET: usize = BUCKETS - 1;
/// Kept tokens in a block of 64 up to which the draw computes their Gumbel
/// noise one by one (a scalar Philox each) instead of the block's.
const SPARSE_KEPT: usize = 10;
/// What a Gumbel value may exceed the noise of a larger word by, through
/// `ln`'s rounding (2 ulp each, about 1e-5 at most): a bound's margin.
const NOISE_SLACK: f32 = 1e-3;

/// How to pick one token per row. The default samples from `softmax(z)`
/// with no filter, seed 0, step 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature `T >= 0`; logits are multiplied by `1 / T`, which
    /// must be finite (`T >= 1 / f32::MAX`, about 2.9e-39). `0` is greedy
    /// decoding (argmax, no filter, no randomness).
    pub temperature: f32,
    /// Keep the `top_k` largest logits (and ties with the k-th); `0`, or a
    /// value `>= V`, keeps all.
    pub top_k: usize,
    /// Keep the smallest set of top tokens whose mass reaches `top_p`
    /// (nucleus sampling), in `(0, 1]`; `1` keeps all. Tied tokens at the
    /// boundary are all kept, where Hugging Face keeps some of them in
    /// `torch.sort`'s order: see the [module docs](self), step 3.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the largest, in
    /// `[0, 1]`; `0` keeps all.
    pub min_p: f32,
    /// Key of the random stream.
    pub seed: u64,
    /// Decoding step: each step draws from a fresh part of the stream.
    pub step: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            step: 0,
        }
    }
}

impl SamplingConfig {
    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        let t = self.temperature as f64;
        let ok = t == 0.0 || (t > 0.0 && (1.0 / self.temperature).is_finite());
        check::param(
            op,
            "temperature",
            t,
            ok,
            "0 (greedy) or finite and >= 1 / f32::MAX (about 2.9e-39)",
        )?;
        let p = self.top_p as f64;
        check::param(op, "top_p", p, p > 0.0 && p <= 1.0, "in (0, 1]")?;
        let p = self.min_p as f64;
        check::param(op, "min_p", p, (0.0..=1.0).contains(&p), "in [0, 1]")
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Logit rows to sample from: `logits` is `[B, vocab]`, row-major.
pub struct SampleInputs<'a, T: 'a, M: Memory = Host> {
    /// `[B, vocab]`, row-major; `B = len / vocab`.
    pub logits: M::Buf<'a, T>,
    /// Vocabulary size `V`.
    pub vocab: usize,
}

impl<'a, T: 'a, M: Memory> SampleInputs<'a, T, M> {
    /// Number of rows `B` (0 when `vocab` is 0).
    pub fn rows(&self) -> usize {
        M::len(&self.logits).checked_div(self.vocab).unwrap_or(0)
    }

    /// Checks the lengths; returns the row count. A length that is not a
    /// multiple of `vocab` is reported against the next multiple up.
    pub(crate) fn validate(&self, op: &'static str) -> Result<usize> {
        let len = M::len(&self.logits);
        check::non_empty(op, "vocab", self.vocab)?;
        check::non_empty(op, "logits", len)?;
        let rows = len.div_ceil(self.vocab);
        check::len(op, "logits", rows.saturating_mul(self.vocab), len)?;
        // Tokens are returned as u32 and rows index the stream as u32.
        let limit = u32::MAX as usize + 1;
        if self.vocab > limit || rows > limit {
            return Err(Error::Unsupported {
                op,
                reason: format!("{rows} rows x {} vocab: both must be at most 2^32", self.vocab),
            });
        }
        Ok(rows)
    }
}

impl<'a, T> SampleInputs<'a, T, Host> {
    /// `logits` `[B, vocab]`.
    pub fn new(logits: &'a [T], vocab: usize) -> Self {
        Self { logits, vocab }
    }
}

/// One draw per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples<M: Memory = Host> {
    /// `[B]`: the chosen token ids.
    pub tokens: M::Owned<u32>,
    /// `[B]`: `log softmax(z / T)` at the chosen token, before filtering
    /// (`T = 1` when greedy); see the module docs.
    pub logp: M::Owned<f32>,
}

/// Samples one token per row (see the module docs for the exact rule).
///
/// Errors: `vocab == 0`, empty logits, a length that is not a multiple of
/// `vocab`, a parameter out of range or non-finite, a row holding a NaN or
/// `+inf` (or no finite logit).
pub fn sample<T: Float>(inputs: &SampleInputs<'_, T>, cfg: &SamplingConfig) -> Result<Samples> {
    let rows = inputs.validate(OP)?;
    let mut tokens = check::filled(OP, "tokens", rows, 0u32)?;
    let mut logp = check::zeros(OP, "logp", rows)?;
    sample_into(
        inputs,
        cfg,
        &mut SamplesOut {
            tokens: &mut tokens,
            logp: &mut logp,
        },
    )?;
    Ok(Samples { tokens, logp })
}

/// Where [`sample_into`] writes: caller-provided `[B]` buffers. Every
/// element is written; after an error their contents are unspecified.
pub struct SamplesOut<'a> {
    /// The chosen token ids.
    pub tokens: &'a mut [u32],
    /// `log softmax(z / T)` at the chosen token (see [`Samples::logp`]).
    pub logp: &'a mut [f32],
}

/// [`sample`] into caller-provided buffers: with them reused (and each
/// thread's scratch kept between calls), a decoding loop allocates
/// nothing. Errors: those of [`sample`] (a faulty row is the first such
/// row, as there), and output lengths.
pub fn sample_into<T: Float>(
    inputs: &SampleInputs<'_, T>,
    cfg: &SamplingConfig,
    out: &mut SamplesOut<'_>,
) -> Result<()> {
    let rows = inputs.validate(OP)?;
    cfg.validate(OP)?;
    check::len(OP, "tokens (output)", rows, out.tokens.len())?;
    check::len(OP, "logp (output)", rows, out.logp.len())?;
    let vocab = inputs.vocab;
    let first_fault = inputs
        .logits
        .par_chunks(vocab)
        .zip(out.tokens.par_iter_mut().zip(out.logp.par_iter_mut()))
        .enumerate()
        .with_min_len((1 << 16) / vocab + 1)
        .filter_map(|(row, (logits, (token, logp)))| {
            match SCRATCH.with_borrow_mut(|s| sample_row(logits, row as u32, cfg, s)) {
                Some((t, lp)) => {
                    (*token, *logp) = (t, lp);
                    None
                }
                None => Some(row),
            }
        })
        .min();
    match first_fault {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite {
            op: OP,
            what: scaled_row_fault(&inputs.logits[index * vocab..(index + 1) * vocab]),
            index,
        }),
    }
}

/// A thread's working memory, kept between calls.
struct Scratch {
    /// The row's scaled logits.
    x: Vec<f32>,
    thresholds: ThresholdScratch,
}

/// What finding the thresholds needs beside the row.
struct ThresholdScratch {
    /// Histogram masses.
    mass: Vec<f64>,
    /// Candidate scaled logits: the top-k set, or one bucket's.
    cand: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            x: Vec::new(),
            thresholds: ThresholdScratch {
                mass: Vec::new(),
                cand: Vec::new(),
            },
        })
    };
}

/// `(token, logp)` of one row, `None` if the row is not finite.
fn sample_row<T: Float>(logits: &[T], row: u32, cfg: &SamplingConfig, s: &mut Scratch) -> Option<(u32, f32)> {
    let inv_t = if cfg.is_greedy() {
        1.0
    } else {
        1.0 / cfg.temperature
    };
    s.x.resize(logits.len(), 0.0);
    let state = scale_row(logits, inv_t, &mut s.x);
    let (lse, _) = state.finish()?;
    let m = state.m;
    let x = &s.x[..];
    let first_max = x.iter().position(|&v| v == m)?;
    let token = if cfg.is_greedy() {
        first_max
    } else {
        let tau = threshold(x, m, cfg, &mut s.thresholds);
        gumbel_argmax(x, tau, first_max, &RowStream::new(cfg.seed, row, cfg.step))
    };
    Some((token as u32, x[token] - lse))
}

multiversion! {
    /// `dst = src * scale` in f32, and the online softmax state of `dst`,
    /// one L1-sized block at a time.
    fn scale_row<T: crate::Float>(src: &[T], scale: f32, dst: &mut [f32]) -> SoftmaxState {
        let mut state = SoftmaxState::EMPTY;
        for (s, d) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
            T::load_scaled(s, scale, d);
            state = state.update::<Mad, false>(d);
        }
        state
    }
}

/// How far a scaled logit `v <= m` lies below the row maximum, in buckets
/// (`+inf` for `-inf`).
#[inline(always)]
fn bucket_offset(v: f32, m: f32) -> f32 {
    (m - v) * BUCKETS_PER_NAT
}

/// Histogram bucket of a scaled logit `v <= m` (`v` may be `-inf`, not
/// NaN): non-increasing in `v`.
#[inline(always)]
fn bucket(v: f32, m: f32) -> u32 {
    let offset = bucket_offset(v, m).min(LAST_BUCKET as f32);
    // SAFETY: `offset` is in `[0, LAST_BUCKET]`: `m - v >= 0` (or `+inf`,
    // which `min` clamps), never NaN. The unchecked conversion vectorizes;
    // `as u32`'s saturating one is done lane by lane.
    unsafe { offset.to_int_unchecked() }
}

/// The draw's key `v + g` (module docs, step 5) of a scaled logit `v` whose
/// token's random word is `word`, with `M`'s multiply-add.
#[inline(always)]
fn key<M: math::MulAdd>(v: f32, word: u32) -> f32 {
    v + philox::gumbel::<M>(philox::uniform(word))
}

/// Whether a key `v + g` with `v <= top` and random word `<= top_word` may
/// reach `floor`. The noise grows with the word, so such keys are at most
/// `key(top, top_word)`, up to the rounding of `ln` and of the sum (under
/// the slack).
#[inline(always)]
fn may_reach<M: math::MulAdd>(top: f32, top_word: u32, floor: f32) -> bool {
    let bound = key::<M>(top, top_word);
    bound + bound.abs() * (2.0 * f32::EPSILON) + NOISE_SLACK >= floor
}

/// The largest of some random words.
#[inline(always)]
fn top_word(words: &[u32]) -> u32 {
    words.iter().fold(0, |a, &b| a.max(b))
}

/// `chunk` as an array of `N` values: itself when that long, else copied
/// into `padded`, whose tail stays `-inf` (probability 0, never kept), so
/// that loops over it have the fixed length that vectorizes fully.
#[inline(always)]
fn full_chunk<'a, const N: usize>(chunk: &'a [f32], padded: &'a mut [f32; N]) -> &'a [f32; N] {
    match chunk.try_into() {
        Ok(full) => full,
        Err(_) => {
            padded[..chunk.len()].copy_from_slice(chunk);
            padded
        }
    }
}

/// Unnormalized probability `e^(v - m)` of a scaled logit.
#[inline(always)]
fn weight<M: math::MulAdd>(v: f32, m: f32) -> f64 {
    math::exp::<M>(v - m) as f64
}

multiversion! {
    /// The mass `e^(x - m)` of every bucket, counting only `x >= min`.
    fn histogram(x: &[f32], m: f32, min: f32, mass: &mut [f64]) {
        const CHUNK: usize = 64;
        let (mut index, mut w) = ([0u32; CHUNK], [0.0f32; CHUNK]);
        let mut padded = [f32::NEG_INFINITY; CHUNK];
        for chunk in x.chunks(CHUNK) {
            let xs = full_chunk(chunk, &mut padded);
            // Vectorized: bucket indices and weights; then the scalar scatter.
            for ((b, w), &v) in index.iter_mut().zip(&mut w).zip(xs) {
                *b = bucket(v, m);
                let wv = weight::<Mad>(v, m) as f32;
                *w = if v >= min { wv } else { 0.0 };
            }
            for (&b, &w) in index.iter().zip(&w) {
                mass[b as usize] += w as f64;
            }
        }
    }
}

/// Values per membership test of [`push_members`].
const MEMBER_CHUNK: usize = 64;

/// Appends to `out` the values of `chunk` (at most [`MEMBER_CHUNK`]) that
/// `keep` accepts, in order: the test vectorized over the chunk, then, in
/// the few chunks that hold members, a branch-free compaction (members
/// spread over a row would mispredict a branch per value).
#[inline(always)]
fn push_members(chunk: &[f32], keep: impl Fn(f32) -> bool, out: &mut Vec<f32>) {
    let mut member = [0u8; MEMBER_CHUNK];
    for (is, &v) in member.iter_mut().zip(chunk) {
        *is = u8::from(keep(v));
    }
    if member.iter().fold(0, |any, &is| any | is) == 0 {
        return;
    }
    let mut end = out.len();
    out.resize(end + chunk.len(), 0.0);
    for (&is, &v) in member.iter().zip(chunk) {
        out[end] = v;
        end += is as usize;
    }
    out.truncate(end);
}

multiversion! {
    /// The scaled logits `>= min` of bucket `b`, into `out`.
    fn gather(x: &[f32], m: f32, b: usize, min: f32, out: &mut Vec<f32>) {
        // bucket(v) == b as a range of the bucket's f32 offset, which is
        // exact (b and b + 1 are) and cheaper than the index.
        // The last bucket has no upper end (`-inf` lies at offset `inf`).
        let (lo, hi, last) = (b as f32, (b + 1) as f32, b == LAST_BUCKET);
        out.clear();
        for chunk in x.chunks(MEMBER_CHUNK) {
            let member = |v: f32| {
                let offset = bucket_offset(v, m);
                (offset >= lo) & ((offset < hi) | last) & (v >= min)
            };
            push_members(chunk, member, out);
        }
    }
}

multiversion! {
    /// `tau_k`, the k-th largest of `x` (`0 < k < x.len()`), and its top-k
    /// set `{ x_j >= tau_k }` into `out`, in one pass: values at or above a
    /// floor are kept, and the floor rises to the k-th largest kept value
    /// whenever the kept ones outgrow their budget, so after the first few
    /// thousand tokens almost every value fails a vectorized compare.
    fn top_k_set(x: &[f32], k: usize, out: &mut Vec<f32>) -> f32 {
        let budget = 2 * k + 1024;
        let (mut floor, mut limit) = (f32::NEG_INFINITY, budget);
        out.clear();
        for chunk in x.chunks(MEMBER_CHUNK) {
            push_members(chunk, |v| v >= floor, out);
            if out.len() >= limit {
                floor = kth_largest(out, k);
                out.retain(|&v| v >= floor);
                // Ties at the floor all stay, so the kept may not shrink
                // (a flat bf16 row ties a lot): the next limit grows with
                // them, which keeps the selections linear in all.
                limit = 2 * out.len() + budget;
            }
        }
        let tau_k = kth_largest(out, k);
        out.retain(|&v| v >= tau_k);
        tau_k
    }
}

/// The k-th largest of `values` (`0 < k <= len`), reordering them.
fn kth_largest(values: &mut [f32], k: usize) -> f32 {
    *values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1
}

/// `tau_p` (module docs, step 3) from the candidates that may hold it,
/// `cand`, sorted here: `above` is the mass of the kept tokens above them
/// and `target` is `p Z`. The top candidate is always kept, as the mass
/// above it falls short of `target`. Weights use `M`'s multiply-add.
fn top_p_cut<M: math::MulAdd>(cand: &mut [f32], m: f32, mut above: f64, target: f64) -> f32 {
    cand.sort_unstable_by(|a, b| b.total_cmp(a));
    let mut tau_p = f32::NEG_INFINITY;
    let mut i = 0;
    while i < cand.len() && above < target {
        tau_p = cand[i];
        while i < cand.len() && cand[i] == tau_p {
            above += weight::<M>(cand[i], m);
            i += 1;
        }
    }
    tau_p
}

/// Top-k sets up to this size are sorted for top-p; larger ones go through
/// the histogram.
const SORTED_TOP_K: usize = 1 << 12;

multiversion! {
    /// `tau = max(tau_k, tau_p, tau_m)` of one row (module docs, step 3);
    /// its candidates' weights use the histogram's multiply-add.
    fn threshold(x: &[f32], m: f32, cfg: &SamplingConfig, s: &mut ThresholdScratch) -> f32 {
        let tau_m = m + cfg.min_p.ln();
        let top_k = (cfg.top_k > 0 && cfg.top_k < x.len()).then_some(cfg.top_k);
        let top_p = (cfg.top_p < 1.0).then_some(cfg.top_p as f64);
        let ThresholdScratch { mass, cand } = s;
        let tau_k = match top_k {
            Some(k) => top_k_set(x, k, cand),
            None => f32::NEG_INFINITY,
        };
        let Some(p) = top_p else {
            return tau_k.max(tau_m);
        };
        // A small top-k set is all the candidates top-p needs.
        if top_k.is_some() && cand.len() <= SORTED_TOP_K {
            let z: f64 = cand.iter().map(|&v| weight::<Mad>(v, m)).sum();
            return tau_k.max(top_p_cut::<Mad>(cand, m, 0.0, p * z)).max(tau_m);
        }
        // Otherwise the bucket where the mass crosses p Z, sorted alone.
        mass.clear();
        mass.resize(BUCKETS, 0.0);
        histogram(x, m, tau_k, mass);
        let target = p * mass.iter().sum::<f64>();
        let (mut above, mut c) = (0.0, 0);
        while c < LAST_BUCKET && above + mass[c] < target {
            above += mass[c];
            c += 1;
        }
        gather(x, m, c, tau_k, cand);
        tau_k.max(top_p_cut::<Mad>(cand, m, above, target)).max(tau_m)
    }
}

multiversion! {
    /// `argmax_{x_j >= tau} (x_j + g_j)`, lowest `j` on ties, skipping blocks
    /// that cannot reach the key of `first_max` (an argmax of `x`, always
    /// kept), which the winner's key reaches.
    fn gumbel_argmax(x: &[f32], tau: f32, first_max: usize, stream: &RowStream) -> usize {
        let floor = key::<Mad>(x[first_max], stream.bits(first_max as u32));
        let mut best = (f32::NEG_INFINITY, 0);
        let mut padded = [f32::NEG_INFINITY; BLOCK_TOKENS];
        let mut bits = [0u32; BLOCK_TOKENS];
        let mut keys = [0.0f32; BLOCK_TOKENS];
        for (block, chunk) in x.chunks(BLOCK_TOKENS).enumerate() {
            // The winner reaches `floor` and the best key so far (a later
            // index loses a tie), so no block below both can win.
            let floor = floor.max(best.0);
            let top = math::max(chunk);
            // Rounding is monotone: every key of the block is <= top + 17.
            if top < tau || top + GUMBEL_MAX < floor {
                continue;
            }
            // A block with a few kept tokens (a wide top-p set spread over
            // the vocabulary) draws their random words one by one: cheaper
            // than the block's 64, and the same keys in the same order.
            if chunk.iter().filter(|&&v| v >= tau).count() <= SPARSE_KEPT {
                let (mut index, mut words, mut kept) = ([0; SPARSE_KEPT], [0; SPARSE_KEPT], 0);
                let mut top_kept = f32::NEG_INFINITY;
                for (i, &v) in chunk.iter().enumerate() {
                    if v >= tau {
                        index[kept] = block * BLOCK_TOKENS + i;
                        words[kept] = stream.bits(index[kept] as u32);
                        top_kept = top_kept.max(v);
                        kept += 1;
                    }
                }
                if !may_reach::<Mad>(top_kept, top_word(&words[..kept]), floor) {
                    continue;
                }
                for (&j, &r) in index.iter().zip(&words).take(kept) {
                    let k = key::<Mad>(x[j], r);
                    if k > best.0 {
                        best = (k, j);
                    }
                }
                continue;
            }
            let xs = full_chunk(chunk, &mut padded);
            stream.bits_block(block as u32, &mut bits);
            // Most blocks of a row stop here, before their 128 `ln`.
            if !may_reach::<Mad>(top, top_word(&bits), floor) {
                continue;
            }
            for ((k, &v), &r) in keys.iter_mut().zip(xs).zip(&bits) {
                *k = if v >= tau { key::<Mad>(v, r) } else { f32::NEG_INFINITY };
            }
            for (i, &k) in keys.iter().enumerate() {
                if k > best.0 {
                    best = (k, block * BLOCK_TOKENS + i);
                }
            }
        }
        best.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tokens one row keeps: `{ j : x_j >= tau }` (module docs, step 3).
    fn kept(z: &[f32], cfg: &SamplingConfig) -> Vec<usize> {
        let mut x = vec![0.0; z.len()];
        let state = scale_row(z, 1.0 / cfg.temperature, &mut x);
        let mut scratch = ThresholdScratch {
            mass: Vec::new(),
            cand: Vec::new(),
        };
        let tau = threshold(&x, state.m, cfg, &mut scratch);
        (0..x.len()).filter(|&j| x[j] >= tau).collect()
    }

    /// Against transformers' warpers (`tests/fixtures/hf_top_p.py`): the
    /// same set where HF's boundary falls between distinct values, and
    /// otherwise HF's set plus the rest of its lowest value's tie group.
    #[test]
    fn top_p_against_hugging_face() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hf_top_p.json");
        let text = std::fs::read_to_string(path).expect("tests/fixtures/hf_top_p.json");
        let fixture: serde_json::Value = serde_json::from_str(&text).expect("fixture JSON");
        let rows = fixture["rows"].as_array().expect("rows");
        let mut cuts = 0;
        for row in rows {
            let name = row["name"].as_str().unwrap();
            // Parsed as f32 directly: through f64 a value could round twice.
            let z: Vec<f32> = row["logits"]
                .as_str()
                .unwrap()
                .split(' ')
                .map(|v| v.parse().unwrap())
                .collect();
            let hf: Vec<usize> = row["hf_kept"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j.as_u64().unwrap() as usize)
                .collect();
            let cfg = SamplingConfig {
                temperature: row["temperature"].as_f64().unwrap() as f32,
                top_k: row["top_k"].as_u64().unwrap() as usize,
                top_p: row["top_p"].as_f64().unwrap() as f32,
                ..SamplingConfig::default()
            };
            let ours = kept(&z, &cfg);
            let lowest = hf.iter().map(|&j| z[j]).fold(f32::INFINITY, f32::min);
            let closure: Vec<usize> = (0..z.len()).filter(|&j| z[j] >= lowest).collect();
            assert_eq!(ours, closure, "{name}: HF's set closed under ties");
            if row["hf_cuts_tie"].as_bool().unwrap() {
                assert!(ours.len() > hf.len(), "{name}: HF cut a tie group");
                cuts += 1;
            } else {
                assert_eq!(ours, hf, "{name}");
            }
        }
        assert!(
            rows.len() >= 10 && cuts >= 3,
            "the fixture covers both kinds of row"
        );
    }
}
