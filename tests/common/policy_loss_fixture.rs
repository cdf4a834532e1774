//! The TRL 1.16 / verl policy-loss fixtures
//! (tests/fixtures/policy_loss_reference.py): padded batches with their
//! crate configuration and the reference loss, `d loss / d logp` and
//! statistics.

use grpo_kernels::{
    Aggregation, ImportanceLevel, KlEstimator, PolicyLossConfig, PolicyLossStats, PolicyObjective,
};
use serde_json::Value;

/// One fixture case.
#[derive(Debug, Clone)]
pub struct FixtureCase {
    pub name: String,
    pub batch: usize,
    pub seq_len: usize,
    pub logp: Vec<f32>,
    pub old_logp: Vec<f32>,
    pub ref_logp: Option<Vec<f32>>,
    pub advantages: Vec<f32>,
    pub per_token_advantages: bool,
    pub mask: Vec<u8>,
    pub pg_weights: Option<Vec<f32>>,
    pub cfg: PolicyLossConfig,
    pub loss: f64,
    pub dlogp: Vec<f64>,
    /// `(statistic, reference value)`; `clip_frac_region` is low + high.
    pub stats: Vec<(String, f64)>,
}

impl FixtureCase {
    /// The same case with NaN at every masked-out token (never read).
    pub fn nan_padded(&self) -> Self {
        let mut c = self.clone();
        let poison = |v: &mut Vec<f32>, mask: &[u8]| {
            for (x, &m) in v.iter_mut().zip(mask) {
                if m == 0 {
                    *x = f32::NAN;
                }
            }
        };
        let mask = c.mask.clone();
        poison(&mut c.logp, &mask);
        poison(&mut c.old_logp, &mask);
        if let Some(r) = &mut c.ref_logp {
            poison(r, &mask);
        }
        if let Some(w) = &mut c.pg_weights {
            poison(w, &mask);
        }
        if c.per_token_advantages {
            poison(&mut c.advantages, &mask);
        }
        c.name = format!("{} (NaN padding)", c.name);
        c
    }

    /// The named statistic of `stats`.
    pub fn stat(stats: &PolicyLossStats, name: &str) -> f64 {
        (match name {
            "clip_frac_low" => stats.clip_frac_low,
            "clip_frac_high" => stats.clip_frac_high,
            "clip_frac_region" => stats.clip_frac_low + stats.clip_frac_high,
            "dual_clip_frac" => stats.dual_clip_frac,
            "kl_mean" => stats.kl_mean,
            "clip_frac_low_seq" => stats.clip_frac_low_seq,
            "clip_frac_high_seq" => stats.clip_frac_high_seq,
            "clip_frac_low_seq_min" => stats.clip_frac_low_seq_min,
            "clip_frac_high_seq_max" => stats.clip_frac_high_seq_max,
            other => panic!("unknown statistic {other}"),
        }) as f64
    }
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn config(c: &Value) -> PolicyLossConfig {
    let f = |k: &str| c[k].as_f64().unwrap() as f32;
    let obj = &c["objective"];
    let params = |k: &str| f32s(&obj[k]);
    let objective = if let Some(clip) = obj.get("clip") {
        PolicyObjective::Clip {
            delta: clip["delta"].as_f64().map(|d| d as f32),
        }
    } else if obj.get("cispo").is_some() {
        let p = params("cispo");
        PolicyObjective::Cispo {
            min_ratio: p[0],
            max_ratio: p[1],
        }
    } else if obj.get("sapo").is_some() {
        let p = params("sapo");
        PolicyObjective::Sapo {
            tau_pos: p[0],
            tau_neg: p[1],
        }
    } else {
        let p = params("vespo");
        PolicyObjective::Vespo {
            k_pos: p[0],
            lambda_pos: p[1],
            k_neg: p[2],
            lambda_neg: p[3],
        }
    };
    let agg = c["aggregation"].as_object().unwrap();
    let (kind, value) = agg.iter().next().unwrap();
    let aggregation = match kind.as_str() {
        "token_mean" => Aggregation::TokenMean {
            normalizer: value.as_f64().map(|x| x as f32),
        },
        "seq_mean_token_mean" => Aggregation::SeqMeanTokenMean,
        "seq_mean_token_sum" => Aggregation::SeqMeanTokenSum,
        "seq_mean_token_sum_norm" => Aggregation::SeqMeanTokenSumNorm {
            constant: value.as_f64().unwrap() as f32,
        },
        other => panic!("aggregation {other}"),
    };
    PolicyLossConfig {
        objective,
        eps_low: f("eps_low"),
        eps_high: f("eps_high"),
        dual_clip: c.get("dual_clip").and_then(Value::as_f64).map(|x| x as f32),
        log_ratio_clamp: c["log_ratio_clamp"].as_f64().map_or(f32::INFINITY, |x| x as f32),
        importance: match c["importance"].as_str().unwrap() {
            "token" => ImportanceLevel::Token,
            _ => ImportanceLevel::Sequence,
        },
        beta: f("beta"),
        kl: match c["kl"].as_str().unwrap() {
            "k3" => KlEstimator::K3,
            "low_var_k3" => KlEstimator::LowVarK3,
            other => panic!("kl {other}"),
        },
        kl_bias_correction: c["kl_bias_correction"].as_bool().unwrap(),
        aggregation,
        exclude_empty_seqs: c["exclude_empty_seqs"].as_bool().unwrap(),
    }
}

/// Every case of `policy_loss_trl.json` (`"trl"`) or `policy_loss_verl.json` (`"verl"`).
pub fn cases(which: &str) -> Vec<FixtureCase> {
    let path = format!(
        "{}/tests/fixtures/policy_loss_{which}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("policy-loss fixture");
    let root: Value = serde_json::from_str(&text).expect("fixture JSON");
    root["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let e = &c["expected"];
            FixtureCase {
                name: format!("{which} {}", c["name"].as_str().unwrap()),
                batch: c["batch"].as_u64().unwrap() as usize,
                seq_len: c["seq_len"].as_u64().unwrap() as usize,
                logp: f32s(&c["logp"]),
                old_logp: f32s(&c["old_logp"]),
                ref_logp: (!c["ref_logp"].is_null()).then(|| f32s(&c["ref_logp"])),
                advantages: f32s(&c["advantages"]),
                per_token_advantages: c["per_token_advantages"].as_bool().unwrap(),
                mask: c["mask"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m.as_u64().unwrap() as u8)
                    .collect(),
                pg_weights: (!c["pg_weights"].is_null()).then(|| f32s(&c["pg_weights"])),
                cfg: config(&c["config"]),
                loss: e["loss"].as_f64().unwrap(),
                dlogp: f64s(&e["dlogp"]),
                stats: e["stats"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
                    .collect(),
            }
        })
        .collect()
}

/// Both fixtures, each case also with NaN padding.
pub fn all_cases() -> Vec<FixtureCase> {
    let mut all = cases("trl");
    all.extend(cases("verl"));
    let poisoned: Vec<FixtureCase> = all.iter().map(FixtureCase::nan_padded).collect();
    all.extend(poisoned);
    all
}
