//! What a run reports: evaluation lines and tables, GRPO's recall change
//! over SFT with its interval, and the training charts.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::metrics::MetricsLog;
use super::plot::{line_chart_png, panels_png, smooth, Panel, Series};
use crate::eval::r1_sgg::R1SggSummary;
use crate::eval::stats::RelativeGain;
use crate::eval::EvalSummary;

/// The entry for `k` of a per-K list of an [`EvalSummary`].
pub fn entry_at<T>(list: &[(usize, T)], k: usize) -> Option<&T> {
    list.iter().find(|(kk, _)| *kk == k).map(|(_, v)| v)
}

pub fn at_k(list: &[(usize, f64)], k: usize) -> f64 {
    entry_at(list, k).copied().unwrap_or(0.0)
}

pub fn describe(s: &EvalSummary) -> String {
    format!(
        "{} images, failure rate {:.1}%, invalid {:.1}%, R@50 {:.1}%, mR@50 {:.1}%, objects found {:.1}%, pairs found {:.1}%, \
         labels outside the vocabulary {} of {}",
        s.images,
        100.0 * s.failure_rate,
        100.0 * s.invalid_rate,
        100.0 * at_k(&s.recall, 50),
        100.0 * at_k(&s.mean_recall, 50),
        100.0 * s.object_recall,
        100.0 * s.pair_recall,
        s.out_of_vocabulary,
        s.predicted_labels,
    )
}

/// R1-SGG's evaluation as its `vg150_eval.py` prints it: the failure rate
/// (unless `failures` is false: scoring gathered predictions, which hold
/// none), R@K and mR@K, the triplet recall; percentages, one line each.
pub fn describe_r1_sgg(s: &R1SggSummary, failures: bool) -> String {
    let pct = |v: &[(usize, f64)]| {
        v.iter()
            .map(|(k, r)| format!("@{k} {:.2}", 100.0 * r))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut text = String::new();
    if failures {
        text += &format!(
            "  failure rate {:.2}% ({} of {})\n",
            100.0 * s.failure_rate,
            s.failures,
            s.images
        );
    }
    text += &format!(
        "  R   {}   ({} images counted)\n",
        pct(&s.recall),
        s.recall_images
    );
    text += &format!("  mR  {}\n", pct(&s.mean_recall));
    text += &format!(
        "  triplet recall {:.2}, its mean over predicates {:.2}",
        100.0 * s.triplet_recall,
        100.0 * s.triplet_mean_recall
    );
    text
}

/// One metrics line for R1-SGG's evaluation of split `split` at `stage`.
pub fn r1_sgg_record(stage: &str, split: &str, s: &R1SggSummary) -> Value {
    let mut record = json!({
        "stage": stage,
        "eval": split,
        "evaluation": "r1_sgg",
        "images": s.images,
        "failure_rate": s.failure_rate,
        "recall_images": s.recall_images,
        "triplet_recall": s.triplet_recall,
    });
    if let Some(fields) = record.as_object_mut() {
        for (k, r) in &s.recall {
            fields.insert(format!("R@{k}"), json!(r));
        }
        for (k, r) in &s.mean_recall {
            fields.insert(format!("mR@{k}"), json!(r));
        }
    }
    record
}

/// One metrics line for an evaluation.
pub fn eval_record(stage: &str, step: Option<usize>, split: &str, s: &EvalSummary) -> Value {
    let mut record = json!({
        "stage": stage,
        "eval": split,
        "images": s.images,
        "failure_rate": s.failure_rate,
        "invalid_rate": s.invalid_rate,
        "object_recall": s.object_recall,
        "pair_recall": s.pair_recall,
        "predicted_labels": s.predicted_labels,
        "out_of_vocabulary": s.out_of_vocabulary,
    });
    if let Some(fields) = record.as_object_mut() {
        if let Some(step) = step {
            fields.insert("step".into(), json!(step));
        }
        for (k, r) in &s.recall {
            fields.insert(format!("R@{k}"), json!(r));
        }
        for (k, r) in &s.mean_recall {
            fields.insert(format!("mR@{k}"), json!(r));
        }
    }
    record
}

/// A markdown table: one row per (stage, split).
pub fn eval_table(stages: &[(&str, &Vec<(String, EvalSummary)>)]) -> String {
    let mut table = String::from(
        "| stage | split | failure rate | invalid | R@20 | R@50 | R@100 | mR@20 | mR@50 | mR@100 | objects found | pairs found |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let pct = |v: f64| format!("{:.1}%", 100.0 * v);
    for (stage, results) in stages {
        for (split, s) in results.iter() {
            table += &format!(
                "| {stage} | {split} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                pct(s.failure_rate),
                pct(s.invalid_rate),
                pct(at_k(&s.recall, 20)),
                pct(at_k(&s.recall, 50)),
                pct(at_k(&s.recall, 100)),
                pct(at_k(&s.mean_recall, 20)),
                pct(at_k(&s.mean_recall, 50)),
                pct(at_k(&s.mean_recall, 100)),
                pct(s.object_recall),
                pct(s.pair_recall),
            );
        }
    }
    table
}

/// GRPO's relative change of R@`k` over SFT on each split, compared image
/// by image, with its 95% interval ([`RelativeGain::paired`]): on a few
/// hundred images a recall of a few percent moves by tens of percent
/// between runs, and the interval says how much of a gain that covers.
pub fn recall_gains(sft: &[(String, EvalSummary)], grpo: &[(String, EvalSummary)], k: usize) -> String {
    let mut text = format!("GRPO against SFT, R@{k} on the same images (relative change, 95% interval):\n\n");
    for ((split, before), (_, after)) in sft.iter().zip(grpo) {
        let (b, a) = (100.0 * at_k(&before.recall, k), 100.0 * at_k(&after.recall, k));
        text += &match RelativeGain::paired(
            entry_at(&before.image_recall, k).map_or(&[], Vec::as_slice),
            entry_at(&after.image_recall, k).map_or(&[], Vec::as_slice),
        ) {
            Some(g) => format!(
                "- {split}: {b:.1}% -> {a:.1}%, {:+.0}% ({:+.0}% to {:+.0}%)\n",
                100.0 * g.gain,
                100.0 * (g.gain - g.half_width),
                100.0 * (g.gain + g.half_width),
            ),
            None => format!("- {split}: {b:.1}% -> {a:.1}% (no relative change: SFT recalls nothing)\n"),
        };
    }
    text
}

/// `(step, field)` of the metrics lines of `stage` that have `field`
/// (training lines, or evaluation lines when `eval` names a split).
pub fn curve(lines: &[Value], stage: &str, eval: Option<&str>, field: &str) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter(|l| l["stage"] == stage && l.get("eval").and_then(Value::as_str) == eval)
        .filter_map(|l| Some((l["step"].as_f64()?, l.get(field)?.as_f64()?)))
        .collect()
}

/// The SFT loss over steps, from sft.jsonl.
pub fn sft_chart(metrics: &Path, png: &Path) -> Result<()> {
    let lines: Vec<Value> = MetricsLog::read(metrics)?;
    let loss = curve(&lines, "sft", None, "loss");
    let smoothed = smooth(&loss, 20);
    line_chart_png(
        png,
        "SFT: cross-entropy per answer token",
        "step",
        "loss (nats)",
        &[
            Series {
                name: "loss",
                points: loss,
            },
            Series {
                name: "mean of 20",
                points: smoothed,
            },
        ],
    )
}

/// GRPO over steps, from grpo.jsonl: rewards, validation failure rate
/// and recall, completion length and clipping.
pub fn grpo_chart(metrics: &Path, png: &Path) -> Result<()> {
    let lines: Vec<Value> = MetricsLog::read(metrics)?;
    let train = |field| smooth(&curve(&lines, "grpo", None, field), 5);
    // The periodic validation lines are the GRPO evaluation lines with a step.
    let val = lines
        .iter()
        .find(|l| l["stage"] == "grpo" && l.get("step").is_some())
        .and_then(|l| l.get("eval")?.as_str())
        .unwrap_or("val");
    let eval = |field| curve(&lines, "grpo", Some(val), field);
    let pct = |points: Vec<(f64, f64)>| points.into_iter().map(|(x, y)| (x, 100.0 * y)).collect();
    let panels = [
        Panel {
            title: "reward per completion, weighted (mean of 5 steps)",
            x_label: "step",
            y_label: "reward",
            series: vec![
                Series {
                    name: "total",
                    points: train("reward"),
                },
                Series {
                    name: "format",
                    points: train("format"),
                },
                Series {
                    name: "node acc",
                    points: train("node_acc"),
                },
                Series {
                    name: "node box",
                    points: train("node_box"),
                },
                Series {
                    name: "edge",
                    points: train("edge"),
                },
            ],
        },
        Panel {
            title: "validation (greedy, up to 256 images)",
            x_label: "step",
            y_label: "%",
            series: vec![
                Series {
                    name: "failure rate",
                    points: pct(eval("failure_rate")),
                },
                Series {
                    name: "invalid (e.g. undefined object)",
                    points: pct(eval("invalid_rate")),
                },
                Series {
                    name: "R@50",
                    points: pct(eval("R@50")),
                },
                Series {
                    name: "mR@50",
                    points: pct(eval("mR@50")),
                },
            ],
        },
        Panel {
            title: "completion length (mean of 5 steps)",
            x_label: "step",
            y_label: "tokens",
            series: vec![Series {
                name: "mean length",
                points: train("length"),
            }],
        },
        Panel {
            title: "clipped tokens (mean of 5 steps)",
            x_label: "step",
            y_label: "fraction",
            series: vec![
                Series {
                    name: "low",
                    points: train("clip_low"),
                },
                Series {
                    name: "high",
                    points: train("clip_high"),
                },
            ],
        },
    ];
    panels_png(png, "GRPO", &panels)
}

pub fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_pick_their_stage_and_split() {
        let lines = vec![
            json!({"stage": "grpo", "step": 0, "reward": 1.0}),
            json!({"stage": "grpo", "step": 0, "eval": "val", "R@50": 0.25}),
            json!({"stage": "sft", "step": 0, "loss": 3.0}),
            json!({"stage": "grpo", "step": 1, "reward": 2.0}),
        ];
        assert_eq!(curve(&lines, "grpo", None, "reward"), [(0.0, 1.0), (1.0, 2.0)]);
        assert_eq!(curve(&lines, "grpo", Some("val"), "R@50"), [(0.0, 0.25)]);
        assert!(curve(&lines, "grpo", Some("test"), "R@50").is_empty());
    }
}
