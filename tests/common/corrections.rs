//! The TRL fixture of the corrections family (`tests/fixtures/corrections_trl.json`,
//! written by `corrections_reference.py`), read for the CPU and candle suites,
//! and the naive f64 references the random-input tests compare with.
#![allow(dead_code)]

use grpo_kernels::{IsMode, SamplerIsConfig, SeqLayout};
use serde_json::Value;

pub fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/corrections_trl.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

/// Floats, `null` read as NaN.
pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().map_or(f32::NAN, |x| x as f32))
        .collect()
}

pub fn u8s(v: &Value) -> Vec<u8> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

pub fn opt_f32(v: &Value) -> Option<f32> {
    v.as_f64().map(|x| x as f32)
}

/// A layout that owns its offsets.
#[derive(Debug, Clone)]
pub enum Layout {
    Padded(usize, usize),
    Packed(Vec<u32>),
}

impl Layout {
    pub fn from_json(v: &Value) -> Self {
        if let Some(p) = v.get("padded") {
            Layout::Padded(p[0].as_u64().unwrap() as usize, p[1].as_u64().unwrap() as usize)
        } else {
            let cu = v["packed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32);
            Layout::Packed(cu.collect())
        }
    }

    pub fn get(&self) -> SeqLayout<'_> {
        match self {
            Layout::Padded(batch, seq_len) => SeqLayout::Padded {
                batch: *batch,
                seq_len: *seq_len,
            },
            Layout::Packed(cu) => SeqLayout::Packed { cu_seqlens: cu },
        }
    }

    pub fn ranges(&self) -> Vec<std::ops::Range<usize>> {
        self.get().ranges().collect()
    }

    /// A random layout of `seqs` sequences: padded, or packed with lengths
    /// 0 to `max_len` (an empty one included).
    pub fn random(rng: &mut super::Rng, seqs: usize, max_len: usize, packed: bool) -> Self {
        if !packed {
            return Layout::Padded(seqs, max_len);
        }
        let mut cu = vec![0u32];
        for s in 0..seqs {
            let len = if s == 1 { 0 } else { rng.below(max_len + 1) };
            cu.push(cu[s] + len as u32);
        }
        Layout::Packed(cu)
    }

    pub fn tokens(&self) -> usize {
        self.ranges().last().map_or(0, |r| r.end)
    }
}

pub fn is_mode(name: &str) -> IsMode {
    match name {
        "token_truncate" => IsMode::TokenTruncate,
        "token_mask" => IsMode::TokenMask,
        "sequence_truncate" => IsMode::SequenceTruncate,
        "sequence_mask" => IsMode::SequenceMask,
        other => panic!("mode {other}"),
    }
}

pub fn is_config(case: &Value) -> SamplerIsConfig {
    SamplerIsConfig {
        mode: is_mode(case["mode"].as_str().unwrap()),
        clip_min: opt_f32(&case["clip_min"]),
        clip_max: opt_f32(&case["clip_max"]),
    }
}

/// `nan_to_num` in f64 of an f32 difference.
fn diff64(a: f32, b: f32) -> f64 {
    let d = a as f64 - b as f64;
    if d.is_nan() {
        0.0
    } else {
        d.clamp(-(f32::MAX as f64), f32::MAX as f64)
    }
}

/// The sampler IS weights in f64, straight from TRL's definition.
pub fn is_ref(old: &[f32], sampler: &[f32], mask: &[u8], layout: &Layout, cfg: &SamplerIsConfig) -> Vec<f64> {
    let lo = cfg.clip_min.map_or(f64::NEG_INFINITY, |x| x as f64);
    let hi = cfg.clip_max.map_or(f64::INFINITY, |x| x as f64);
    let bound = |r: f64| match cfg.mode {
        IsMode::TokenMask | IsMode::SequenceMask => {
            if r < lo || r > hi {
                0.0
            } else {
                r
            }
        }
        _ => r.max(lo).min(hi),
    };
    let d: Vec<f64> = (0..old.len())
        .map(|t| {
            if mask[t] == 0 {
                0.0
            } else {
                diff64(old[t], sampler[t])
            }
        })
        .collect();
    let mut w = vec![0.0; old.len()];
    for r in layout.ranges() {
        let seq: f64 = d[r.clone()].iter().sum();
        for t in r {
            w[t] = match cfg.mode {
                IsMode::SequenceMask | IsMode::SequenceTruncate => bound(seq.exp()),
                _ => bound(d[t].exp()),
            };
        }
    }
    w
}

/// The OPSM weights in f64.
pub fn opsm_ref(
    logp: &[f32],
    sampler: &[f32],
    mask: &[u8],
    layout: &Layout,
    adv: &[f32],
    delta: f32,
) -> Vec<f64> {
    let mut w = vec![0.0; logp.len()];
    for (s, r) in layout.ranges().into_iter().enumerate() {
        let on: Vec<usize> = r.clone().filter(|&t| mask[t] != 0).collect();
        let mean = on.iter().map(|&t| diff64(sampler[t], logp[t])).sum::<f64>() / on.len().max(1) as f64;
        let keep = adv[s] >= 0.0 || mean <= delta as f64;
        r.for_each(|t| w[t] = keep as u8 as f64);
    }
    w
}

/// The high-entropy mask in f64: the quantile by a full sort and linear
/// interpolation in f64, at `q = 1 - rho` rounded to f32 (torch makes an f32
/// tensor of TRL's `1 - top_entropy_quantile`: at `rho = 0.2` the rank lies
/// just above an integer, so a tie at the lower order statistic is out).
pub fn entropy_ref(h: &[f32], mask: &[u8], rho: f64) -> (Vec<f64>, Option<f64>) {
    let mut vals: Vec<f64> = (0..h.len())
        .filter(|&t| mask[t] != 0)
        .map(|t| h[t] as f64)
        .collect();
    if vals.is_empty() {
        return (vec![0.0; h.len()], None);
    }
    vals.sort_by(f64::total_cmp);
    let rank = ((1.0 - rho) as f32 as f64) * (vals.len() - 1) as f64;
    let (lo, hi) = (vals[rank.floor() as usize], vals[rank.ceil() as usize]);
    // The threshold is an f32 tensor in torch: rounded once from f64.
    let t = (lo + (rank - rank.floor()) * (hi - lo)) as f32 as f64;
    let w = (0..h.len())
        .map(|i| (mask[i] != 0 && h[i] as f64 >= t) as u8 as f64)
        .collect();
    (w, Some(t))
}

/// A random batch: the trainer's and sampler's log-probs (NaN in padding
/// and at some unscored tokens), a mask with padding, entropies with ties.
pub struct Batch {
    pub layout: Layout,
    pub logp: Vec<f32>,
    pub sampler: Vec<f32>,
    pub mask: Vec<u8>,
    pub entropy: Vec<f32>,
    pub adv: Vec<f32>,
}

pub fn batch(rng: &mut super::Rng, packed: bool) -> Batch {
    let (seqs, len) = (2 + rng.below(9), 1 + rng.below(23));
    batch_sized(rng, seqs, len, packed)
}

/// [`batch`] of `seqs` sequences of up to `max_len` tokens.
pub fn batch_sized(rng: &mut super::Rng, seqs: usize, max_len: usize, packed: bool) -> Batch {
    let (seqs, len) = (seqs, max_len);
    let layout = Layout::random(rng, seqs, len, packed);
    let n = layout.tokens().max(1);
    let layout = if n == layout.tokens() {
        layout
    } else {
        Layout::Padded(1, 1)
    };
    let mask: Vec<u8> = (0..n).map(|_| (rng.uniform() > 0.2) as u8).collect();
    let logp: Vec<f32> = (0..n)
        .map(|t| {
            if mask[t] == 0 {
                f32::NAN
            } else {
                -(3.0 * rng.uniform()) as f32
            }
        })
        .collect();
    let sampler = (0..n)
        .map(|t| match (mask[t], rng.below(8)) {
            (0, _) | (_, 0) => f32::NAN,
            _ => logp[t] + (0.5 * rng.normal()) as f32,
        })
        .collect();
    let entropy = (0..n)
        .map(|_| {
            if rng.below(4) == 0 {
                1.5
            } else {
                (4.0 * rng.uniform()) as f32
            }
        })
        .collect();
    let adv = (0..layout.ranges().len()).map(|_| rng.normal() as f32).collect();
    Batch {
        layout,
        logp,
        sampler,
        mask,
        entropy,
        adv,
    }
}

pub const MODES: [IsMode; 4] = [
    IsMode::TokenTruncate,
    IsMode::TokenMask,
    IsMode::SequenceTruncate,
    IsMode::SequenceMask,
];
