//! The candle Qwen2-VL against transformers 5.25: the tiny random models
//! and reference outputs of `fixtures/qwen2_vl/` (its README says how they
//! were made). No Python runs here.
//!
//! Weights are loaded by `hf::pretrained::Pretrained::load`, which also
//! checks that the model asks for exactly the checkpoint's tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use grpo_kernels::{FusedLinearConfig, LogProbConfig};
use r1_sgg::hf::pretrained::Pretrained;
use r1_sgg::model::qwen2_vl::{Checkpointing, Config, Inputs, Qwen2Vl};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/qwen2_vl")
        .join(rel)
}

/// `untied` (transformers 5.25 layout) or `tied_hub` (the Hub's, two shards).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Variant {
    Untied,
    TiedHub,
}

impl Variant {
    fn dir(self) -> &'static str {
        match self {
            Variant::Untied => "untied",
            Variant::TiedHub => "tied_hub",
        }
    }

    fn reference(self) -> HashMap<String, Tensor> {
        let name = format!("reference_{}.safetensors", self.dir());
        candle_core::safetensors::load(fixture(&name), &Device::Cpu).unwrap()
    }
}

/// The model with the checkpoint's weights as `Var`s in `dtype`, loaded as a
/// user would ([`Pretrained::load`]: every tensor the model asks for must be
/// in the files, and no other).
fn load(variant: Variant, dtype: DType) -> (Qwen2Vl, VarMap) {
    let pretrained = Pretrained::load(&fixture(variant.dir()), dtype, &Device::Cpu).unwrap();
    (pretrained.model, pretrained.vars)
}

/// The reference batch: both cases, right-padded, with both images.
fn batch(r: &HashMap<String, Tensor>, dtype: DType) -> Inputs {
    let grids = r["image_grid_thw"]
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
        .collect();
    Inputs {
        input_ids: r["input_ids"].to_dtype(DType::U32).unwrap(),
        attention_mask: Some(r["attention_mask"].clone()),
        pixel_values: Some(r["pixel_values"].to_dtype(dtype).unwrap()),
        image_grid_thw: grids,
        position_ids: None,
    }
}

/// Max |a - b| over the positions where `mask` `[B, T]` is 1 (`a`, `b` `[B, T, ..]`).
fn masked_max_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let m = mask.to_dtype(DType::F32).unwrap();
    let m = m
        .reshape(m.dims().iter().copied().chain([1]).collect::<Vec<_>>())
        .unwrap();
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap();
    max(&d.broadcast_mul(&m).unwrap())
}

fn max(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    max(&t.abs().unwrap())
}

/// transformers' loss: the mean over the labelled targets of the batch of
/// `-log p(labels[b, t + 1] | ..t)`, here from the hidden states through
/// the fused linear log-prob op (the training path: no `[N, V]` logits).
fn sft_loss(model: &Qwen2Vl, input: &Inputs, labels: &Tensor) -> Tensor {
    let t = labels.dim(1).unwrap();
    let mask = labels.narrow(1, 1, t - 1).unwrap().ne(-100f64).unwrap();
    let cfg = FusedLinearConfig {
        logprob: LogProbConfig {
            ignore_index: None,
            ..LogProbConfig::default()
        },
        ..FusedLinearConfig::default()
    };
    let lp = model.token_logprobs(input, Some(&mask), &cfg).unwrap();
    let count = mask.to_dtype(DType::F32).unwrap().sum_all().unwrap();
    lp.logp
        .sum_all()
        .unwrap()
        .neg()
        .unwrap()
        .broadcast_div(&count)
        .unwrap()
}

/// Each reference gradient against ours: max |diff| / max |reference|.
fn check_grads(
    model: &Qwen2Vl,
    vm: &VarMap,
    loss: &Tensor,
    r: &HashMap<String, Tensor>,
    what: &str,
) -> usize {
    let grads = model.backward(loss).unwrap();
    let vars = vm.data().lock().unwrap();
    let mut n = 0;
    for (key, want) in r.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let got = grads
            .get(vars[name].as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        let rel = max_abs(&(got - want).unwrap()) / max_abs(want);
        println!("{what} grad {name}: max |diff| / max |ref| = {rel:.2e}");
        assert!(rel < 1e-3, "{what}: {name} relative error {rel}");
        n += 1;
    }
    n
}

/// 20 greedy tokens via prefill + decode_step from case 0's prompt, whose
/// image is the batch's first (`inputs`: the untied reference file).
fn greedy(model: &Qwen2Vl, inputs: &HashMap<String, Tensor>) -> Vec<u32> {
    let input = Inputs {
        input_ids: inputs["greedy_prompt_ids"].to_dtype(DType::U32).unwrap(),
        attention_mask: None,
        pixel_values: Some(inputs["pixel_values"].narrow(0, 0, 80).unwrap()),
        image_grid_thw: vec![[1, 8, 10]],
        position_ids: None,
    };
    let (mut cache, mut logits) = model.prefill(&input).unwrap();
    let mut out = Vec::new();
    for _ in 0..20 {
        let next = logits.argmax(1).unwrap();
        out.push(next.to_vec1::<u32>().unwrap()[0]);
        logits = model.decode_step(&mut cache, &next).unwrap();
    }
    out
}

#[test]
fn configs_of_both_layouts() {
    let untied = Config::from_file(&fixture("untied/config.json")).unwrap();
    let tied = Config::from_file(&fixture("tied_hub/config.json")).unwrap();
    assert!(!untied.tie_word_embeddings && tied.tie_word_embeddings);
    for c in [&untied, &tied] {
        assert_eq!(
            (c.image_token_id, c.vision_start_token_id, c.vision_end_token_id),
            (1022, 1019, 1020)
        );
        assert_eq!(
            (
                c.text.vocab_size,
                c.text.hidden_size,
                c.text.mrope_section.clone()
            ),
            (1024, 64, vec![2, 3, 3])
        );
        assert_eq!(
            (c.vision.depth, c.vision.embed_dim, c.vision.hidden_size),
            (2, 32, 64)
        );
        assert_eq!(c.eos_token_id, vec![1012]);
    }
    // Apart from the tie, the two layouts describe the same model.
    let c = Config {
        tie_word_embeddings: false,
        ..tied.clone()
    };
    assert_eq!(c.text, untied.text);
    assert_eq!(c.vision, untied.vision);
}

#[test]
fn untied_f32_matches_transformers() {
    let r = Variant::Untied.reference();
    let (mut model, vm) = load(Variant::Untied, DType::F32);
    let input = batch(&r, DType::F32);
    let mask = &r["attention_mask"];

    let ix = model.rope_index(&input).unwrap();
    let want = r["position_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    assert_eq!(ix.positions, want, "position ids");
    let deltas: Vec<i64> = r["rope_deltas"].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(ix.deltas, deltas, "rope deltas");

    let vis = model
        .vision_embeds(input.pixel_values.as_ref().unwrap(), &input.image_grid_thw)
        .unwrap();
    let d = max_abs(&(&vis - &r["vision_embeds"]).unwrap());
    println!(
        "vision embeds: max |diff| {d:.2e} (max |ref| {:.2})",
        max_abs(&r["vision_embeds"])
    );
    assert!(d < 1e-4, "vision embeds {d}");

    let logits = model.logits(&input).unwrap();
    let d = masked_max_diff(&logits, &r["logits"], mask);
    println!(
        "logits: max |diff| {d:.2e} on real tokens (max |ref| {:.2})",
        max_abs(&r["logits"])
    );
    assert!(d < 1e-4, "logits {d}");

    let loss = sft_loss(&model, &input, &r["labels"]);
    let (got, want) = (
        loss.to_scalar::<f32>().unwrap(),
        r["loss"].to_scalar::<f32>().unwrap(),
    );
    println!("loss: {got} vs {want}, |diff| {:.2e}", (got - want).abs());
    assert!((got - want).abs() < 1e-4, "loss {got} vs {want}");
    assert_eq!(check_grads(&model, &vm, &loss, &r, "untied"), 13);

    // The same gradients with every block checkpointed.
    model.set_checkpointing(Checkpointing {
        text: true,
        vision: true,
    });
    let loss = sft_loss(&model, &input, &r["labels"]);
    assert_eq!(check_grads(&model, &vm, &loss, &r, "untied checkpointed"), 13);
    model.set_checkpointing(Checkpointing::default());

    let want: Vec<u32> = r["greedy_tokens"]
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(greedy(&model, &r), want, "greedy tokens");
}

#[test]
fn tied_hub_f32_matches_transformers() {
    let inputs = Variant::Untied.reference();
    let r = Variant::TiedHub.reference();
    let (model, vm) = load(Variant::TiedHub, DType::F32);
    assert!(!vm.data().lock().unwrap().contains_key("lm_head.weight"));
    let input = batch(&inputs, DType::F32);

    let logits = model.logits(&input).unwrap();
    let d = masked_max_diff(&logits, &r["logits"], &inputs["attention_mask"]);
    println!("tied logits: max |diff| {d:.2e}");
    assert!(d < 1e-4, "tied logits {d}");

    let loss = sft_loss(&model, &input, &inputs["labels"]);
    let (got, want) = (
        loss.to_scalar::<f32>().unwrap(),
        r["loss"].to_scalar::<f32>().unwrap(),
    );
    println!("tied loss: {got} vs {want}");
    assert!((got - want).abs() < 1e-4, "tied loss {got} vs {want}");
    // The embedding's gradient sums the lookup's and the head's.
    assert_eq!(check_grads(&model, &vm, &loss, &r, "tied"), 12);

    let want: Vec<u32> = r["greedy_tokens"]
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(greedy(&model, &inputs), want, "tied greedy tokens");
}

/// bf16 weights and activations (norm statistics, rope and softmax in f32,
/// as transformers). bf16 keeps 8 significant bits, so each rounding of a
/// logit of size 6 moves it by up to 6 * 2^-9 = 0.012, and the roundings
/// of every activation through both towers add up: transformers' own bf16
/// logits are 0.146 (max over real tokens) from its f32 ones. Two bf16
/// implementations that round at slightly different points (where the
/// attention scale is applied, when the patch embedding is cast) each sit
/// about that far from f32, so neither can be held to the other much more
/// tightly. The bounds: ours within 0.25 of transformers' bf16 (the
/// fixture's suggestion, about 1.7x its bf16 error), and ours no further
/// from the f32 logits than 1.25x transformers' bf16.
#[test]
fn untied_bf16_is_as_close_to_f32_as_transformers_bf16() {
    let r = Variant::Untied.reference();
    let (model, _vm) = load(Variant::Untied, DType::BF16);
    let input = batch(&r, DType::BF16);
    let mask = &r["attention_mask"];
    let logits = model.logits(&input).unwrap();
    assert_eq!(logits.dtype(), DType::BF16);
    let (f32_ref, bf16_ref) = (&r["logits"], &r["logits_bf16"]);
    let ours_vs_hf = masked_max_diff(&logits, bf16_ref, mask);
    let ours_err = masked_max_diff(&logits, f32_ref, mask);
    let hf_err = masked_max_diff(bf16_ref, f32_ref, mask);
    println!(
        "bf16 max |diff| on real tokens: ours vs transformers bf16 {ours_vs_hf:.3}, \
         ours vs f32 {ours_err:.3}, transformers bf16 vs f32 {hf_err:.3}"
    );
    assert!(
        ours_vs_hf < 0.25,
        "bf16 logits vs transformers' bf16: {ours_vs_hf}"
    );
    assert!(
        ours_err < 1.25 * hf_err,
        "bf16 error {ours_err} vs transformers' own {hf_err}"
    );
}

/// Saved by the crate (the Hub's flat config, one file or shards), a model
/// loads back with the same configuration and every weight bit for bit, so
/// its logits are identical; the tied one has no `lm_head.weight`. (That
/// transformers loads such a directory with logits identical to the
/// reference's is checked by `scripts/qwen2_vl_fixture.py --check-saved DIR`:
/// 0.0 for both f32 variants, see the crate's README.)
#[test]
fn saved_models_load_back_bit_for_bit() {
    let tmp = std::env::temp_dir().join(format!("r1_sgg_qwen2_vl_save_{}", std::process::id()));
    for (variant, shard) in [(Variant::Untied, None), (Variant::TiedHub, Some(400_000))] {
        for dtype in [DType::F32, DType::BF16] {
            let original = Pretrained::load(&fixture(variant.dir()), dtype, &Device::Cpu).unwrap();
            let dir = tmp.join(format!("{}_{dtype:?}", variant.dir()));
            match shard {
                Some(bytes) => original.save_sharded(&dir, bytes).unwrap(),
                None => original.save(&dir).unwrap(),
            }
            let back = Pretrained::load(&dir, dtype, &Device::Cpu).unwrap();
            assert_eq!(back.config, original.config);
            assert_eq!(back.files.weights.files().len() > 1, shard.is_some());
            let (a, b) = (
                original.vars.data().lock().unwrap(),
                back.vars.data().lock().unwrap(),
            );
            assert_eq!(a.len(), b.len());
            assert_eq!(a.contains_key("lm_head.weight"), variant == Variant::Untied);
            for (name, var) in a.iter() {
                let other = &b[name];
                assert_eq!(var.dtype(), other.dtype(), "{name}");
                let bits = |t: &Tensor| {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                };
                let (x, y) = (bits(var.as_tensor()), bits(other.as_tensor()));
                assert!(
                    x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{name}"
                );
            }
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// The published 2B and 7B configurations (`fixtures/qwen2_vl/configs/`,
/// the Hub's flat layout with a near-empty vision config) parse to their
/// real sizes, the vision defaults filled in.
#[test]
fn published_configs_parse_to_their_sizes() {
    let two = Config::from_file(&fixture("configs/qwen2-vl-2b-instruct.json")).unwrap();
    let seven = Config::from_file(&fixture("configs/qwen2-vl-7b-instruct.json")).unwrap();
    assert!(two.tie_word_embeddings && !seven.tie_word_embeddings);
    assert_eq!(
        (
            two.text.hidden_size,
            two.text.num_hidden_layers,
            two.text.vocab_size
        ),
        (1536, 28, 151936)
    );
    assert_eq!((seven.text.hidden_size, seven.text.vocab_size), (3584, 152064));
    for (c, merger_out) in [(&two, 1536), (&seven, 3584)] {
        assert_eq!(
            (c.vision.depth, c.vision.embed_dim, c.vision.num_heads),
            (32, 1280, 16)
        );
        assert_eq!(c.vision.hidden_size, merger_out);
        assert_eq!(c.text.mrope_section, vec![16, 24, 24]);
        assert_eq!(c.image_token_id, 151655);
    }
}
