//! What the Qwen2-VL benches share: their `QWEN2VL_BENCH_*` settings, the
//! model (random weights of a config, or the fixture's tiny checkpoint) and
//! the batch file `scripts/qwen2_vl_bench_batch.py` writes.
#![allow(dead_code)] // each bench uses its part

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use r1_sgg::hf::pretrained::Pretrained;
use r1_sgg::model::qwen2_vl::{Config, Inputs, Qwen2Vl};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/qwen2_vl")
        .join(rel)
}

/// `QWEN2VL_BENCH_<name>` (paths as given: relative to the working folder).
pub fn setting(name: &str) -> Option<String> {
    std::env::var(format!("QWEN2VL_BENCH_{name}")).ok()
}

/// `QWEN2VL_BENCH_<name>` as a number, else `default`.
pub fn number(name: &str, default: usize) -> usize {
    setting(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `QWEN2VL_BENCH_DEVICE`: `cuda`, else the CPU.
pub fn device() -> Device {
    match setting("DEVICE").as_deref() {
        Some("cuda") => Device::new_cuda(0).expect("a CUDA device"),
        _ => Device::Cpu,
    }
}

/// `QWEN2VL_BENCH_DTYPE`: `bf16`, else f32.
pub fn dtype() -> DType {
    match setting("DTYPE").as_deref() {
        Some("bf16") => DType::BF16,
        _ => DType::F32,
    }
}

/// `QWEN2VL_BENCH_BATCH`, else the fixture's reference batch.
pub fn batch_file() -> PathBuf {
    setting("BATCH").map_or_else(|| fixture("reference_untied.safetensors"), PathBuf::from)
}

/// A batch file (`input_ids`, `attention_mask`, `pixel_values`,
/// `image_grid_thw`, and `labels` for SFT: the fixture's reference layout)
/// as model inputs in `dtype` on `device`, with all its tensors.
pub fn read_batch(path: &Path, dtype: DType, device: &Device) -> (Inputs, HashMap<String, Tensor>) {
    let r: HashMap<String, Tensor> = candle_core::safetensors::load(path, device).expect("the batch file");
    let grids = r["image_grid_thw"]
        .to_vec2::<i64>()
        .expect("grids")
        .into_iter()
        .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
        .collect();
    let input = Inputs {
        input_ids: r["input_ids"].to_dtype(DType::U32).expect("ids"),
        attention_mask: Some(r["attention_mask"].clone()),
        pixel_values: Some(r["pixel_values"].to_dtype(dtype).expect("pixels")),
        image_grid_thw: grids,
        position_ids: None,
    };
    (input, r)
}

/// The model: random weights of `QWEN2VL_BENCH_CONFIG` (a path from the
/// working folder, or else from this crate's folder), or the fixture's.
pub fn model(dtype: DType, device: &Device) -> (Qwen2Vl, VarMap) {
    match setting("CONFIG") {
        Some(path) => {
            let path = match Path::new(&path) {
                p if p.is_file() => p.to_path_buf(),
                p => Path::new(env!("CARGO_MANIFEST_DIR")).join(p),
            };
            let cfg = Config::from_file(&path).expect("the config");
            let vars = VarMap::new();
            let model = Qwen2Vl::new(&cfg, VarBuilder::from_varmap(&vars, dtype, device)).expect("a model");
            (model, vars)
        }
        None => {
            let qwen = Pretrained::load(&fixture("untied"), dtype, device).expect("the fixture model");
            (qwen.model, qwen.vars)
        }
    }
}
