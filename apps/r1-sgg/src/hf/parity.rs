//! Parity with transformers 5.25 on the Qwen2-VL fixture (`fixtures/qwen2_vl/`, written by
//! `scripts/qwen2_vl_fixture.py`; its README says what each file holds).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::{Init, VarMap};
use image::RgbImage;
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::Value;

use super::processor::{expand_image_pads, ImageProcessorConfig, Qwen2VlImageProcessor, Qwen2VlProcessor};
use super::tokenizer::{ChatTemplate, Message, Qwen2VlTokenizer};
use super::weights::{load_weights, save_pretrained, SaveOptions, LM_HEAD};
use super::{read_json, ImageProcessorFile, ModelFiles, TemplateSource, WeightFiles};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen2_vl")
}

fn cases() -> Vec<Value> {
    let json = read_json(&fixture().join("cases.json")).unwrap();
    json["cases"].as_array().unwrap().clone()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// The reference file's tensor `name` as shape and little-endian element bytes.
fn reference(name: &str) -> (Vec<usize>, Dtype, Vec<u8>) {
    let bytes = fs::read(fixture().join("reference_untied.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(name).unwrap();
    (view.shape().to_vec(), view.dtype(), view.data().to_vec())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Both model directories, with where each file was found.
#[test]
fn locates_both_layouts() {
    let untied = ModelFiles::locate(fixture().join("untied")).unwrap();
    assert!(matches!(untied.weights, WeightFiles::Single(_)));
    assert_eq!(untied.chat_template.source, TemplateSource::ChatTemplateJinja);
    assert!(matches!(untied.image_processor, ImageProcessorFile::Processor(_)));

    let tied = ModelFiles::locate(fixture().join("tied_hub")).unwrap();
    match &tied.weights {
        WeightFiles::Sharded {
            shards, weight_map, ..
        } => {
            assert_eq!(shards.len(), 2);
            assert_eq!(weight_map.len(), 57);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(tied.chat_template.source, TemplateSource::ChatTemplateJson);
    assert!(matches!(
        tied.image_processor,
        ImageProcessorFile::Preprocessor(_)
    ));

    // The 5.x processor_config.json's `size` and the Hub's min/max_pixels give one config.
    let a = ImageProcessorConfig::from_file(&untied.image_processor).unwrap();
    let b = ImageProcessorConfig::from_file(&tied.image_processor).unwrap();
    assert_eq!(a, b);
    assert_eq!((a.min_pixels, a.max_pixels), (3136, 31360));
}

/// A zeroed VarMap with the names and shapes of `untied/model.safetensors` (the model's
/// variables, until the real `Qwen2Vl` builds them), `lm_head.weight` kept when `with_head`.
fn fixture_varmap(with_head: bool) -> VarMap {
    let bytes = fs::read(fixture().join("untied/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let varmap = VarMap::new();
    for (name, view) in st.tensors() {
        if with_head || name != LM_HEAD {
            varmap
                .get(view.shape(), &name, Init::Const(0.0), DType::F32, &Device::Cpu)
                .unwrap();
        }
    }
    varmap
}

/// Every tensor of the safetensors files, by name, as bytes.
fn file_tensors(files: &[PathBuf]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for path in files {
        let bytes = fs::read(path).unwrap();
        for (name, view) in SafeTensors::deserialize(&bytes).unwrap().tensors() {
            out.insert(name, view.data().to_vec());
        }
    }
    out
}

fn varmap_tensors(varmap: &VarMap) -> BTreeMap<String, Vec<u8>> {
    let data = varmap.data().lock().unwrap();
    data.iter()
        .map(|(name, var)| {
            let values = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                name.clone(),
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect()
}

#[test]
fn loads_both_checkpoints_and_saves_them_back() {
    let untied = ModelFiles::locate(fixture().join("untied")).unwrap();
    let model = fixture_varmap(true);
    let report = load_weights(&untied.weights, &model, false).unwrap();
    assert_eq!((report.loaded, report.renamed), (58, 0));
    assert_eq!(varmap_tensors(&model), file_tensors(untied.weights.files()));

    let tied = ModelFiles::locate(fixture().join("tied_hub")).unwrap();
    let headless = fixture_varmap(false);
    assert_eq!(load_weights(&tied.weights, &headless, true).unwrap().loaded, 57);
    assert_eq!(varmap_tensors(&headless), file_tensors(tied.weights.files()));
    // A model with its own head gets the embeddings; untied, the head is missing.
    let with_head = fixture_varmap(true);
    assert!(
        load_weights(&tied.weights, &with_head, true)
            .unwrap()
            .lm_head_from_embeddings
    );
    assert!(load_weights(&tied.weights, &fixture_varmap(true), false).is_err());

    // Saved back in both layouts, the tensors are the same bits.
    let tmp = tempfile::tempdir().unwrap();
    let config = untied.config_json().unwrap();
    let dir = tmp.path().join("untied");
    let opts = SaveOptions {
        config: &config,
        tie_word_embeddings: false,
        max_shard_bytes: super::weights::DEFAULT_MAX_SHARD_BYTES,
        source: &untied.dir,
        extra: &[],
    };
    save_pretrained(&model, &dir, &opts).unwrap();
    let saved = ModelFiles::locate(&dir).unwrap();
    assert_eq!(
        file_tensors(saved.weights.files()),
        file_tensors(untied.weights.files())
    );
    assert_eq!(saved.config_json().unwrap(), config);

    let config = tied.config_json().unwrap();
    let dir = tmp.path().join("tied_hub");
    let opts = SaveOptions {
        config: &config,
        tie_word_embeddings: true,
        max_shard_bytes: 600_000,
        source: &tied.dir,
        extra: &[],
    };
    save_pretrained(&headless, &dir, &opts).unwrap();
    let saved = ModelFiles::locate(&dir).unwrap();
    assert_eq!(saved.weights.files().len(), 2);
    assert_eq!(
        file_tensors(saved.weights.files()),
        file_tensors(tied.weights.files())
    );
    let index = read_json(&dir.join(super::WEIGHTS_INDEX_FILE)).unwrap();
    let hub_index = read_json(&tied.dir.join(super::WEIGHTS_INDEX_FILE)).unwrap();
    assert_eq!(
        index["metadata"]["total_size"],
        hub_index["metadata"]["total_size"]
    );
}

/// Tokenizers of both directories, each with its own template (`.jinja`, `.json`) and the one in
/// `tied_hub/tokenizer_config.json`.
fn tokenizers() -> Vec<Qwen2VlTokenizer> {
    let mut out = Vec::new();
    for dir in ["untied", "tied_hub"] {
        out.push(Qwen2VlTokenizer::from_files(&ModelFiles::locate(fixture().join(dir)).unwrap()).unwrap());
    }
    let config = fixture().join("tied_hub/tokenizer_config.json");
    let template = read_json(&config).unwrap()["chat_template"]
        .as_str()
        .unwrap()
        .to_owned();
    let template = ChatTemplate::new(&template, &config, Some(&config)).unwrap();
    out.push(Qwen2VlTokenizer::new(&fixture().join("tied_hub/tokenizer.json"), template).unwrap());
    out
}

#[test]
fn template_and_token_ids_match_transformers() {
    let cases = cases();
    let (shape, _, batch) = reference("input_ids");
    let batch = i64s(&batch);
    for tok in tokenizers() {
        let s = tok.special();
        assert_eq!(
            (
                s.endoftext,
                s.im_start,
                s.im_end,
                s.vision_start,
                s.vision_end,
                s.image_pad
            ),
            (1010, 1011, 1012, 1019, 1020, 1022)
        );
        for (k, case) in cases.iter().enumerate() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let text = tok.apply_chat_template(&messages, false).unwrap();
            assert_eq!(
                text,
                case["text"].as_str().unwrap(),
                "case {k}, {:?}",
                tok.template().path()
            );
            let prompt = tok.apply_chat_template(&messages[..1], true).unwrap();
            assert_eq!(prompt, case["prompt_text"].as_str().unwrap());

            let input_ids = tok.encode(&text).unwrap();
            assert_eq!(input_ids, ids(&case["input_ids"]), "case {k}");
            assert_eq!(tok.encode(&prompt).unwrap(), ids(&case["prompt_input_ids"]));
            assert_eq!(tok.decode(&input_ids, false).unwrap(), text);

            let n = case["num_image_tokens"].as_u64().unwrap() as usize;
            let expanded = expand_image_pads(&input_ids, s.image_pad, &[n]).unwrap();
            assert_eq!(expanded, ids(&case["input_ids_expanded"]));
            let row = &batch[k * shape[1]..][..expanded.len()];
            assert!(
                expanded.iter().zip(row).all(|(&a, &b)| i64::from(a) == b),
                "batch row {k}"
            );
        }
    }
}

#[test]
fn resized_images_and_pixel_values_match_transformers() {
    let files = ModelFiles::locate(fixture().join("untied")).unwrap();
    let processor =
        Qwen2VlImageProcessor::new(ImageProcessorConfig::from_file(&files.image_processor).unwrap());
    let cases = cases();
    let mut images = Vec::new();
    for (case, name) in cases.iter().zip(["resized_wide", "resized_tall"]) {
        let image = processor
            .load_image(&fixture().join(case["image"].as_str().unwrap()))
            .unwrap();
        let resized = processor.resize(&image).unwrap();
        let (shape, dtype, expected) = reference(name);
        assert_eq!(dtype, Dtype::U8);
        assert_eq!(
            [resized.height() as usize, resized.width() as usize, 3],
            shape[..]
        );
        // Pillow's BICUBIC, bit for bit.
        assert_eq!(resized.as_raw(), &expected, "{name}");
        images.push(image);
    }
    let out = processor.preprocess(&images).unwrap();
    let (_, _, grid) = reference("image_grid_thw");
    let grid: Vec<usize> = i64s(&grid).iter().map(|&v| v as usize).collect();
    assert_eq!(out.grid_thw.concat(), grid);
    let (shape, _, expected) = reference("pixel_values");
    assert_eq!([out.num_patches(), out.patch_dim], shape[..]);
    let expected = f32s(&expected);
    let max_diff = out
        .pixel_values
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // Same bytes after the resize and the same f64-then-f32 arithmetic as numpy: exact.
    assert_eq!(max_diff, 0.0, "pixel_values max |diff|");
}

#[test]
fn processor_matches_transformers_end_to_end() {
    let processor =
        Qwen2VlProcessor::from_files(&ModelFiles::locate(fixture().join("tied_hub")).unwrap()).unwrap();
    let (_, _, pixels) = reference("pixel_values");
    let pixels = f32s(&pixels);
    let mut offset = 0;
    for case in cases() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let image: RgbImage = processor
            .image_processor
            .load_image(&fixture().join(case["image"].as_str().unwrap()))
            .unwrap();
        let out = processor.process(&messages, &[image], false).unwrap();
        assert_eq!(out.text, case["text"].as_str().unwrap());
        assert_eq!(out.input_ids, ids(&case["input_ids_expanded"]));
        let grid: Vec<usize> = case["image_grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(out.images.grid_thw.concat(), grid);
        let n = out.images.pixel_values.len();
        assert_eq!(out.images.pixel_values, pixels[offset..offset + n]);
        offset += n;
    }
    assert_eq!(offset, pixels.len());
}
