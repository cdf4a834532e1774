//! R1-SGG scene-graph example (temporary entry point): generates a few
//! synthetic samples, writes a preview grid of their images with boxes,
//! prints the prompt and their serialized answers with the rewards a
//! perfect answer earns, then times the generator and prints each split's
//! statistics. The full CLI (SFT, GRPO, evaluation) will replace this
//! file; the modules do not depend on it.
//!
//! `cargo run --release --example r1_sgg [preview.png]`

// The training loops that replace this main use the rest of the modules' API.
#[allow(dead_code)]
mod data;
#[allow(dead_code)]
mod format;
#[allow(dead_code)]
mod reward;
#[allow(dead_code)]
mod scene;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use data::{generate_split, render_preview, Split};
use format::{answer_text, augment, prompt, AnswerForm};
use reward::{score_text, ExactMatch, RewardConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("r1_sgg_preview.png"));
    let mut samples = generate_split(Split::Train, 6, 0);
    samples.extend(generate_split(Split::Shifted, 2, 0));
    render_preview(&samples, 4, 3).save(&out)?;
    println!("preview: {}\n", out.display());

    println!("prompt:\n{}\n", prompt(&scene::SYNTHETIC, AnswerForm::Relaxed));
    let cfg = RewardConfig {
        form: AnswerForm::Relaxed,
        ..RewardConfig::default()
    };
    for (i, s) in samples.iter().enumerate() {
        let answer = answer_text(&s.graph, None);
        let rewards = score_text(&answer, &s.graph, &cfg, &ExactMatch);
        println!(
            "{} ({} objects, {} relations), reward {:.2}",
            s.id,
            s.graph.objects.len(),
            s.graph.relations.len(),
            rewards.total()
        );
        println!("  {answer}");
        println!("  augmented: {}", answer_text(&augment(&s.graph, i as u64), None));
    }

    let start = Instant::now();
    let train = generate_split(Split::Train, 5000, 0);
    println!("\n5000 train samples in {:.2?}", start.elapsed());
    for (split, samples) in [
        (Split::Train, train),
        (Split::Shifted, generate_split(Split::Shifted, 5000, 0)),
    ] {
        let n = samples.len() as f64;
        let objects: usize = samples.iter().map(|s| s.graph.objects.len()).sum();
        let mut predicates: BTreeMap<&str, usize> = BTreeMap::new();
        for r in samples.iter().flat_map(|s| &s.graph.relations) {
            *predicates.entry(r.predicate.as_str()).or_default() += 1;
        }
        let relations: usize = predicates.values().sum();
        println!(
            "{}: {:.2} objects and {:.2} relations per image; predicates {predicates:?}",
            split.name(),
            objects as f64 / n,
            relations as f64 / n
        );
    }
    Ok(())
}
